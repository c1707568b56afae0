//! `hub.v1.SpokeService`: what spokes call.

use std::pin::Pin;

use hub_proto::v1 as proto;
use hub_proto::v1::spoke_service_server::SpokeService;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Hub;
use crate::auth::{bearer, generate_secret, hash_secret};
use crate::directives::{Ack, State};
use crate::dispatch::{self, Control};
use crate::error::{Error, Result};
use crate::limits;
use crate::metrics::Batch;
use crate::spokes::{Heartbeat, Registration, SpokeRecord};
use crate::store::StoredBatch;
use crate::telemetry::{OutcomeLabels, PointLabels};
use crate::wire::{duration_std, ms_of_duration, timestamp_ms};

/// Directives taken from the store per query while streaming.
const TAKE_CHUNK: u32 = 64;
/// Messages buffered per stream before the stream task waits for the spoke.
const STREAM_BUFFER: usize = 32;
/// Longest a long poll waits, ms.
const MAX_POLL_WAIT_MS: i64 = 30_000;
/// Most batches one PushMetrics call may carry.
const MAX_BATCHES_PER_CALL: usize = 1000;

/// The SpokeService implementation.
#[derive(Clone)]
pub struct SpokeApi {
    hub: Hub,
}

impl SpokeApi {
    /// A service over `hub`.
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

type DirectiveStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchDirectivesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SpokeService for SpokeApi {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let hub = &self.hub;
        // Who is calling comes first: an unauthenticated caller learns
        // nothing, not even whether its request was well-formed.
        let secret = bearer(request.metadata())?;
        let existing = if hub.is_enrollment_token(secret) {
            None
        } else {
            let spoke = hub
                .store()
                .spoke_by_key_hash(&hash_secret(secret))
                .await?
                .ok_or(Error::Unauthenticated(
                    "unknown enrollment token or spoke key",
                ))?;
            if spoke.revoked_at.is_some() {
                return Err(Error::Unauthenticated("spoke key revoked").into());
            }
            Some(spoke)
        };
        let settings = hub.settings();
        let reg = Registration::parse(
            request.into_inner(),
            settings.default_in_flight,
            settings.max_in_flight,
        )?;
        let (spoke, spoke_key) = match existing {
            None => {
                let key = generate_secret();
                let spoke = hub
                    .store()
                    .insert_spoke(&reg, &hash_secret(&key), hub.now_ms())
                    .await?;
                tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke registered");
                (spoke, key)
            }
            Some(existing) if existing.name != reg.name => {
                return Err(Error::Unauthenticated("the key belongs to another spoke name").into());
            }
            Some(existing) => {
                let spoke = hub
                    .store()
                    .update_registration(existing.id, &reg, hub.now_ms())
                    .await?;
                tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke re-registered");
                (spoke, String::new())
            }
        };
        Ok(Response::new(proto::RegisterResponse {
            spoke: Some(hub.spoke_to_proto(&spoke)),
            spoke_key,
            hints: Some(hub.hints(spoke.max_in_flight)),
        }))
    }

    type WatchDirectivesStream = DirectiveStream;

    async fn watch_directives(
        &self,
        request: Request<proto::WatchDirectivesRequest>,
    ) -> Result<Response<Self::WatchDirectivesStream>, Status> {
        let spoke = self.hub.authenticate_spoke(request.metadata()).await?;
        let registration = self.hub.dispatcher().register(spoke.id);
        self.hub
            .store()
            .mark_seen(spoke.id, self.hub.now_ms())
            .await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tracing::debug!(spoke_id = %spoke.id, "directive stream opened");
        tokio::spawn(stream_directives(self.hub.clone(), spoke, registration, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(
        &self,
        request: Request<proto::AckRequest>,
    ) -> Result<Response<proto::AckResponse>, Status> {
        let spoke = self.hub.authenticate_spoke(request.metadata()).await?;
        let ack = Ack::try_from(request.into_inner())?;
        tracing::Span::current().record("directive_id", tracing::field::display(ack.directive_id));
        let applied = self
            .hub
            .store()
            .apply_ack(spoke.id, &ack, self.hub.now_ms())
            .await?;
        let outcome = match applied.state {
            State::InProgress => "in_progress",
            State::Completed => "completed",
            State::Failed => "failed",
            _ => "rejected",
        };
        self.hub
            .telemetry()
            .acks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if applied.state.is_final() && !applied.duplicate {
            // A final ack frees a slot in the spoke's in-flight window.
            self.hub.dispatcher().wake(spoke.id);
        }
        Ok(Response::new(proto::AckResponse {
            state: applied.state.to_proto().into(),
            duplicate: applied.duplicate,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let spoke = self.hub.authenticate_spoke(request.metadata()).await?;
        let heartbeat = Heartbeat::try_from(request.into_inner())?;
        let now = self.hub.now_ms();
        self.hub
            .store()
            .record_heartbeat(spoke.id, &heartbeat, now)
            .await?;
        Ok(Response::new(proto::HeartbeatResponse {
            next_interval: Some(duration_std(self.hub.settings().heartbeat_interval)),
            hub_time: Some(timestamp_ms(now)),
        }))
    }

    async fn push_metrics(
        &self,
        request: Request<Streaming<proto::PushMetricsRequest>>,
    ) -> Result<Response<proto::PushMetricsResponse>, Status> {
        let spoke = self.hub.authenticate_spoke(request.metadata()).await?;
        let mut stream = request.into_inner();
        let max_points = self.hub.settings().max_points_per_batch as usize;
        let mut batches = Vec::new();
        while let Some(msg) = stream.message().await.map_err(limits::map_status)? {
            if batches.len() >= MAX_BATCHES_PER_CALL {
                return Err(Error::ResourceExhausted(format!(
                    "at most {MAX_BATCHES_PER_CALL} batches per PushMetrics call; the earlier ones are stored"
                ))
                .into());
            }
            let now = self.hub.now_ms();
            let batch = Batch::parse(msg, max_points, now.saturating_mul(1_000_000))?;
            let rejected = batch
                .rejected
                .iter()
                .map(|(index, reason)| proto::PointRejection {
                    index: *index,
                    reason: reason.clone(),
                })
                .collect();
            let stored = self.hub.store().store_batch(spoke.id, &batch, now).await?;
            let points = &self.hub.telemetry().points;
            match stored {
                StoredBatch::Accepted(n) => {
                    points
                        .get_or_create(&PointLabels { result: "accepted" })
                        .inc_by(u64::from(n));
                    points
                        .get_or_create(&PointLabels { result: "rejected" })
                        .inc_by(batch.rejected.len() as u64);
                }
                StoredBatch::Duplicate(_) => {
                    points
                        .get_or_create(&PointLabels {
                            result: "duplicate",
                        })
                        .inc_by((batch.points.len() + batch.rejected.len()) as u64);
                }
            }
            let result = match stored {
                StoredBatch::Accepted(n) => proto::BatchResult {
                    batch_id: batch.batch_id,
                    status: proto::BatchStatus::Accepted.into(),
                    accepted_points: n,
                    rejected,
                },
                StoredBatch::Duplicate(n) => proto::BatchResult {
                    batch_id: batch.batch_id,
                    status: proto::BatchStatus::Duplicate.into(),
                    accepted_points: n,
                    rejected: Vec::new(),
                },
            };
            batches.push(result);
        }
        Ok(Response::new(proto::PushMetricsResponse { batches }))
    }

    async fn poll_directives(
        &self,
        request: Request<proto::PollDirectivesRequest>,
    ) -> Result<Response<proto::PollDirectivesResponse>, Status> {
        let spoke = self.hub.authenticate_spoke(request.metadata()).await?;
        let req = request.into_inner();
        let max = match req.max_directives {
            0 => 1,
            n if n <= 100 => n,
            _ => return Err(Error::invalid("max_directives", "at most 100").into()),
        };
        let wait_ms = match &req.wait {
            None => 0,
            Some(d) => ms_of_duration(d, "wait")?.min(MAX_POLL_WAIT_MS),
        };
        let hub = &self.hub;
        hub.store().mark_seen(spoke.id, hub.now_ms()).await?;
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms as u64);
        let waker = hub.dispatcher().poll_waker(spoke.id);
        let mut shutdown = hub.shutdown();
        // Waits between queries hold no database connection.
        let taken = loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = hub
                .store()
                .take_pending(
                    spoke.id,
                    &spoke.name,
                    spoke.max_in_flight,
                    max,
                    hub.now_ms(),
                )
                .await?;
            if !taken.is_empty() || tokio::time::Instant::now() >= deadline {
                break taken;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {}
                () = shutdown.wait() => break Vec::new(),
            }
        };
        delivered(hub, &taken);
        let directives = taken
            .iter()
            .map(|d| d.to_proto())
            .collect::<Result<Vec<_>>>()?;
        Ok(Response::new(proto::PollDirectivesResponse {
            directives,
            hints: Some(hub.hints(spoke.max_in_flight)),
        }))
    }
}

/// Counts deliveries, and makes sure the delivery timer wakes for the ack
/// deadlines of `taken`.
fn delivered(hub: &Hub, taken: &[crate::directives::DirectiveRecord]) {
    hub.telemetry().delivered(taken.iter().map(|d| d.attempts));
    if let Some(due) = taken.iter().filter_map(|d| d.ack_due_at).min() {
        hub.timer_plan().schedule(due);
    }
}

/// Why a stream task stopped.
enum End {
    /// The spoke went away, or the hub is shutting down.
    Quiet,
    /// End the stream with this status.
    Status(Status),
}

/// Feeds one spoke's stream: the backlog first, then whatever a wake-up
/// announces, plus keepalives and control messages, until the spoke leaves,
/// a newer stream takes over, or the hub shuts down.
async fn stream_directives(
    hub: Hub,
    spoke: SpokeRecord,
    mut registration: dispatch::Subscription,
    tx: mpsc::Sender<Result<proto::WatchDirectivesResponse, Status>>,
) {
    let end = match run_stream(&hub, &spoke, &mut registration, &tx).await {
        Ok(end) => end,
        Err(e) => End::Status(e.into()),
    };
    if let End::Status(status) = end {
        let _ = tx.send(Err(status)).await;
    }
    drop(registration);
    // Staleness counts from the moment the stream went away.
    if let Err(e) = hub.store().mark_seen(spoke.id, hub.now_ms()).await {
        tracing::warn!(spoke_id = %spoke.id, error = %e, "recording the end of a stream failed");
    }
    tracing::debug!(spoke_id = %spoke.id, "directive stream closed");
}

async fn run_stream(
    hub: &Hub,
    spoke: &SpokeRecord,
    registration: &mut dispatch::Subscription,
    tx: &mpsc::Sender<Result<proto::WatchDirectivesResponse, Status>>,
) -> Result<End> {
    use proto::watch_directives_response::Message;
    let mut shutdown = hub.shutdown();
    let every = hub.settings().keepalive_interval;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // The slot is registered before the backlog query, so a directive
    // committed from here on either is in the backlog or wakes us below.
    let window = spoke.max_in_flight;
    let backlog = hub
        .store()
        .take_backlog(spoke.id, &spoke.name, window, hub.now_ms())
        .await?;
    delivered(hub, &backlog);
    if !send_directives(tx, &backlog).await? {
        return Ok(End::Quiet);
    }
    loop {
        tokio::select! {
            () = registration.wake.notified() => {
                loop {
                    let taken = hub
                        .store()
                        .take_pending(spoke.id, &spoke.name, window, TAKE_CHUNK, hub.now_ms())
                        .await?;
                    delivered(hub, &taken);
                    if !send_directives(tx, &taken).await? {
                        return Ok(End::Quiet);
                    }
                    if taken.len() < TAKE_CHUNK as usize {
                        break;
                    }
                }
            }
            _ = keepalive.tick() => {
                let msg = Message::Keepalive(proto::Keepalive { hub_time: Some(timestamp_ms(hub.now_ms())) });
                if !send(tx, msg).await {
                    return Ok(End::Quiet);
                }
            }
            control = registration.control.recv() => match control {
                Some(Control::Cancelled { directive_id, reason }) => {
                    let msg = Message::Cancelled(proto::DirectiveCancelled {
                        directive_id: directive_id.to_string(),
                        reason,
                    });
                    if !send(tx, msg).await {
                        return Ok(End::Quiet);
                    }
                }
                Some(Control::KeyInvalidated(reason)) => {
                    return Ok(End::Status(Status::unauthenticated(reason)));
                }
                Some(Control::Superseded) | None => {
                    return Ok(End::Status(Status::aborted(
                        "superseded by a newer WatchDirectives stream of this spoke",
                    )));
                }
            },
            () = shutdown.wait() => {
                let mut hints = hub.hints(spoke.max_in_flight);
                hints.retry_after = Some(duration_std(std::time::Duration::from_secs(1)));
                let _ = send(tx, Message::Hints(hints)).await;
                return Ok(End::Status(Status::unavailable("hub is shutting down; reconnect")));
            }
            () = tx.closed() => return Ok(End::Quiet),
        }
    }
}

async fn send(
    tx: &mpsc::Sender<Result<proto::WatchDirectivesResponse, Status>>,
    message: proto::watch_directives_response::Message,
) -> bool {
    tx.send(Ok(proto::WatchDirectivesResponse {
        message: Some(message),
    }))
    .await
    .is_ok()
}

/// Sends directives in order; `false` when the spoke has gone.
async fn send_directives(
    tx: &mpsc::Sender<Result<proto::WatchDirectivesResponse, Status>>,
    directives: &[crate::directives::DirectiveRecord],
) -> Result<bool> {
    for d in directives {
        if !send(
            tx,
            proto::watch_directives_response::Message::Directive(d.to_proto()?),
        )
        .await
        {
            return Ok(false);
        }
    }
    Ok(true)
}
