//! `hub.v1.SpokeService`: what spokes call.

use std::pin::Pin;

use hub_proto::v1 as proto;
use hub_proto::v1::spoke_service_server::SpokeService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use std::sync::Arc;

use super::{Caller, Hub, acks};
use crate::auth::{ProposedKey, bearer, generate_secret, hash_secret};
use crate::directives::{Ack, AckOutcome, DirectiveRecord};
use crate::error::{Error, Result};
use crate::ledger::{self, Delivery, End as StreamEnd, Step, Subscription};
use crate::metrics::Batch;
use crate::spokes::{Heartbeat, Registration, SpokeInfo};
use crate::store::StoredBatch;
use crate::telemetry::PointLabels;
use crate::wire::{duration_std, ms_of_duration, timestamp_ms};
use crate::{guard, limits};

/// Directives taken from the store per query while streaming.
const TAKE_CHUNK: u32 = 64;
/// Messages buffered per stream before the stream task waits for the spoke.
const STREAM_BUFFER: usize = 32;

/// A stream's outgoing messages, boxed: the channel allocates its slots up
/// front, and an idle spoke should cost 32 pointers, not 32 messages.
type Outbox = mpsc::Sender<Result<Box<proto::WatchDirectivesResponse>, Box<Status>>>;
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
        let peer = request.remote_addr();
        let existing = hub.authenticate_register(Caller::of(&request)).await?;
        if let Some(spoke) = &existing {
            hub.guard().limits.spoke_call(spoke.id).await?;
        }
        let settings = hub.settings();
        let mut request = request.into_inner();
        let proposed = std::mem::take(&mut request.proposed_key);
        let reg = Registration::parse(request, settings.default_in_flight, settings.max_in_flight)?;
        if let Some(url) = &reg.webhook_url {
            let url = crate::webhook::WebhookUrl::parse(url)?;
            settings.webhook.policy().check(&url)?;
        }
        let (registered, spoke_key) = match existing {
            None => {
                let proposed = ProposedKey::parse(proposed)?;
                if let Some(p) = &proposed
                    && hub.inner.enrollment_token.matches(p.key())
                {
                    // Anyone holding the token could then act as this spoke.
                    return Err(
                        Error::invalid("proposed_key", "must not be the enrollment token").into(),
                    );
                }
                hub.guard().limits.enrollment(peer).await?;
                // A proposed key makes a retry of this call recognisable
                // (the ledger answers it as the first); a key of our own
                // is shown once.
                let (key, key_hash) = match proposed {
                    Some(p) => (p.key().to_owned(), p.hash().to_owned()),
                    None => {
                        let key = generate_secret();
                        let hash = hash_secret(&key);
                        (key, hash)
                    }
                };
                let (registered, done) = hub.ledger().register(reg, key_hash, hub.now_ms())?;
                ledger::committed(done).await?;
                let spoke = &registered.record;
                tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke registered");
                (registered, key)
            }
            Some(existing) if existing.name != reg.name => {
                return Err(Error::Unauthenticated("the key belongs to another spoke name").into());
            }
            Some(existing) => {
                let (registered, done) = hub.ledger().reregister(existing.id, reg, hub.now_ms())?;
                if let Some(done) = done {
                    ledger::committed(done).await?;
                    let spoke = &registered.record;
                    tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke re-registered");
                }
                (registered, String::new())
            }
        };
        let spoke = &registered.record;
        Ok(Response::new(proto::RegisterResponse {
            spoke: Some(hub.spoke_to_proto(spoke)),
            spoke_key,
            hints: Some(hub.hints(spoke.max_in_flight)),
            webhook_secret: registered.webhook_secret.unwrap_or_default(),
        }))
    }

    type WatchDirectivesStream = DirectiveStream;

    async fn watch_directives(
        &self,
        request: Request<proto::WatchDirectivesRequest>,
    ) -> Result<Response<Self::WatchDirectivesStream>, Status> {
        let spoke = self.spoke_call(Caller::of(&request)).await?;
        let subscription = self.hub.ledger().subscribe(spoke.id, self.hub.now_ms())?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tracing::debug!(spoke_id = %spoke.id, "directive stream opened");
        tokio::spawn(stream_directives(self.hub.clone(), spoke, subscription, tx));
        let stream = ReceiverStream::new(rx).map(|item| item.map(|m| *m).map_err(|s| *s));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<proto::AckRequest>,
    ) -> Result<Response<proto::AckResponse>, Status> {
        let spoke = self.hub.authenticate_spoke(Caller::of(&request)).await?;
        // Acks of directives delivered to the spoke are free (the hub's
        // own deliveries bound them); progress reports and refused acks
        // cost a call.
        let limits = &self.hub.guard().limits;
        let ack = match Ack::try_from(request.into_inner()) {
            Ok(ack) => ack,
            Err(e) => {
                limits.spoke_call(spoke.id).await?;
                return Err(e.into());
            }
        };
        tracing::Span::current().record("directive_id", tracing::field::display(ack.directive_id));
        let progress = matches!(ack.outcome, AckOutcome::InProgress { .. });
        if progress {
            limits.spoke_call(spoke.id).await?;
        }
        match acks::apply_ack(&self.hub, spoke.id, ack).await {
            Ok(applied) => Ok(Response::new(acks::ack_response(applied))),
            Err(e) => {
                if !progress && guard::rate::is_refused_ack(&e) {
                    limits.spoke_call(spoke.id).await?;
                }
                Err(e.into())
            }
        }
    }

    type AckStreamStream = acks::AckAnswers;

    async fn ack_stream(
        &self,
        request: Request<Streaming<proto::AckRequest>>,
    ) -> Result<Response<Self::AckStreamStream>, Status> {
        let spoke = self.spoke_call(Caller::of(&request)).await?;
        let key_hash = hash_secret(bearer(request.metadata())?);
        let answers = acks::ack_stream(self.hub.clone(), spoke.id, key_hash, request.into_inner());
        Ok(Response::new(guard::rate::charge_ack_answers(
            self.hub.guard().clone(),
            spoke.id,
            answers,
        )))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let spoke = self.spoke_call(Caller::of(&request)).await?;
        let heartbeat = Heartbeat::try_from(request.into_inner())?;
        let now = self.hub.now_ms();
        self.hub.ledger().heartbeat(spoke.id, heartbeat, now);
        Ok(Response::new(proto::HeartbeatResponse {
            next_interval: Some(duration_std(self.hub.settings().heartbeat_interval)),
            hub_time: Some(timestamp_ms(now)),
        }))
    }

    async fn push_metrics(
        &self,
        request: Request<Streaming<proto::PushMetricsRequest>>,
    ) -> Result<Response<proto::PushMetricsResponse>, Status> {
        let spoke = self.spoke_call(Caller::of(&request)).await?;
        let mut stream = request.into_inner();
        let max_points = self.hub.settings().max_points_per_batch as usize;
        // Batches are logged as they arrive and share commits; the reply
        // waits for all of them.
        let mut pending = Vec::new();
        let read = async {
            while let Some(msg) = stream.message().await.map_err(limits::map_status)? {
                if pending.len() >= MAX_BATCHES_PER_CALL {
                    return Err(Error::ResourceExhausted(format!(
                        "at most {MAX_BATCHES_PER_CALL} batches per PushMetrics call; the earlier ones are stored"
                    ))
                    .into());
                }
                // The call paid for its first batch; each further batch is
                // a call of the spoke's budget. (A one-batch push costing
                // one call keeps the retry hint of a refused push honest:
                // it says when one call fits, and one call is what the
                // retry needs.)
                if !pending.is_empty() {
                    self.hub.guard().limits.spoke_call(spoke.id).await?;
                }
                let now = self.hub.now_ms();
                let batch = Arc::new(Batch::parse(msg, max_points, now.saturating_mul(1_000_000))?);
                let ledger = self.hub.ledger().clone();
                let stored = {
                    let batch = batch.clone();
                    let spoke_id = spoke.id;
                    tokio::spawn(async move { ledger.store_metrics(spoke_id, batch, now).await })
                };
                pending.push((batch, stored));
            }
            Ok::<_, Status>(())
        }
        .await;
        let mut batches = Vec::with_capacity(pending.len());
        for (batch, stored) in pending {
            let stored = stored
                .await
                .map_err(|_| Error::Unavailable("storing a metric batch was interrupted"))??;
            batches.push(self.batch_result(&batch, stored));
        }
        read?;
        Ok(Response::new(proto::PushMetricsResponse { batches }))
    }

    async fn poll_directives(
        &self,
        request: Request<proto::PollDirectivesRequest>,
    ) -> Result<Response<proto::PollDirectivesResponse>, Status> {
        let spoke = self.spoke_call(Caller::of(&request)).await?;
        if spoke.webhook.is_some() {
            return Err(Error::FailedPrecondition(
                "this spoke registered a webhook_url: its directives are POSTed there; \
                 re-register without webhook_url to poll"
                    .into(),
            )
            .into());
        }
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
        hub.ledger().seen(spoke.id, hub.now_ms());
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms as u64);
        let waker = hub.ledger().poll_waker(spoke.id);
        let mut shutdown = hub.shutdown();
        let taken = loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = hub.ledger().poll(spoke.id, max, hub.now_ms());
            if !taken.directives.is_empty() || tokio::time::Instant::now() >= deadline {
                break taken;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {}
                () = shutdown.wait() => break Delivery::default(),
            }
        };
        let taken = with_payloads(hub, taken).await?;
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

impl SpokeApi {
    /// The calling spoke, authenticated and charged one call of its budget.
    async fn spoke_call(&self, caller: Caller<'_>) -> Result<Arc<SpokeInfo>> {
        let spoke = self.hub.authenticate_spoke(caller).await?;
        self.hub.guard().limits.spoke_call(spoke.id).await?;
        Ok(spoke)
    }

    /// The reply's report on one stored batch, counted in the hub's metrics.
    fn batch_result(&self, batch: &Batch, stored: StoredBatch) -> proto::BatchResult {
        let points = &self.hub.telemetry().points;
        match stored {
            StoredBatch::Accepted(n) => {
                points
                    .get_or_create(&PointLabels { result: "accepted" })
                    .inc_by(u64::from(n));
                points
                    .get_or_create(&PointLabels { result: "rejected" })
                    .inc_by(batch.rejected.len() as u64);
                proto::BatchResult {
                    batch_id: batch.batch_id.clone(),
                    status: proto::BatchStatus::Accepted.into(),
                    accepted_points: n,
                    rejected: batch
                        .rejected
                        .iter()
                        .map(|(index, reason)| proto::PointRejection {
                            index: *index,
                            reason: reason.clone(),
                        })
                        .collect(),
                }
            }
            StoredBatch::Duplicate(n) => {
                points
                    .get_or_create(&PointLabels {
                        result: "duplicate",
                    })
                    .inc_by((batch.points.len() + batch.rejected.len()) as u64);
                proto::BatchResult {
                    batch_id: batch.batch_id.clone(),
                    status: proto::BatchStatus::Duplicate.into(),
                    accepted_points: n,
                    rejected: Vec::new(),
                }
            }
        }
    }
}

/// The directives of `delivery`, with the payloads the ledger did not
/// hold read from the store.
pub(crate) async fn with_payloads(hub: &Hub, delivery: Delivery) -> Result<Vec<DirectiveRecord>> {
    let Delivery {
        mut directives,
        missing_payloads,
        ..
    } = delivery;
    hub.telemetry()
        .delivered(directives.iter().map(|d| d.attempts));
    if !missing_payloads.is_empty() {
        let mut payloads = hub.store().payloads(&missing_payloads).await?;
        for d in &mut directives {
            if let Some(payload) = payloads.remove(&d.id) {
                d.payload = payload;
            }
        }
    }
    Ok(directives)
}

/// Why a stream task stopped.
enum End {
    /// The spoke went away, or the hub is shutting down.
    Quiet,
    /// End the stream with this status.
    Status(Status),
}

/// Feeds one spoke's stream: the backlog first, then whatever a wake-up
/// announces, plus keepalives and notices, until the spoke leaves, a newer
/// stream takes over, or the hub shuts down.
async fn stream_directives(
    hub: Hub,
    spoke: Arc<SpokeInfo>,
    subscription: Subscription,
    tx: Outbox,
) {
    let end = match run_stream(&hub, &spoke, &subscription, &tx).await {
        Ok(end) => end,
        Err(e) => End::Status(e.into()),
    };
    if let End::Status(status) = end {
        let _ = tx.send(Err(Box::new(status))).await;
    }
    drop(subscription);
    // Staleness counts from the moment the stream went away.
    hub.ledger().seen(spoke.id, hub.now_ms());
    tracing::debug!(spoke_id = %spoke.id, "directive stream closed");
}

async fn run_stream(
    hub: &Hub,
    spoke: &SpokeInfo,
    subscription: &Subscription,
    tx: &Outbox,
) -> Result<End> {
    use proto::watch_directives_response::Message;
    let mut shutdown = hub.shutdown();
    // Bounded as the flag is, for Settings built without Config: an
    // interval panics on zero, and its ticks add the period to the current
    // instant, which panics past the clock's range.
    let every = hub.settings().keepalive_interval.clamp(
        std::time::Duration::from_millis(1),
        crate::config::MAX_INTERVAL,
    );
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Where spokes should go from now on travels on the stream too (not only
    // in Register's reply), for spokes that learn their hints there.
    if !hub.settings().spoke_endpoints.is_empty()
        && !send(tx, Message::Hints(hub.hints(spoke.max_in_flight))).await
    {
        return Ok(End::Quiet);
    }
    // The stream is registered before the backlog is taken, so a directive
    // published from here on either is in the backlog or wakes us below.
    let backlog = hub.ledger().backlog(subscription, hub.now_ms());
    if let Some(end) = send_step(hub, spoke.id, tx, backlog).await? {
        return Ok(end);
    }
    loop {
        tokio::select! {
            () = subscription.woken() => {
                loop {
                    let step = hub.ledger().next(subscription, TAKE_CHUNK, hub.now_ms());
                    let full = matches!(&step, Step::Work(d) if d.directives.len() >= TAKE_CHUNK as usize);
                    if let Some(end) = send_step(hub, spoke.id, tx, step).await? {
                        return Ok(end);
                    }
                    if !full {
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

/// Sends what the ledger handed out; `Some` when the stream must end.
async fn send_step(
    hub: &Hub,
    spoke_id: uuid::Uuid,
    tx: &Outbox,
    step: Step,
) -> Result<Option<End>> {
    use proto::watch_directives_response::Message;
    let mut delivery = match step {
        Step::End(StreamEnd::Superseded) => {
            return Ok(Some(End::Status(Status::aborted(
                "superseded by a newer WatchDirectives stream of this spoke",
            ))));
        }
        Step::End(StreamEnd::KeyInvalidated(reason)) => {
            return Ok(Some(End::Status(Status::unauthenticated(reason))));
        }
        Step::Work(delivery) => delivery,
    };
    let mut notices = std::mem::take(&mut delivery.notices).into_iter();
    while let Some((directive_id, reason)) = notices.next() {
        let msg = Message::Cancelled(proto::DirectiveCancelled {
            directive_id: directive_id.to_string(),
            reason: reason.clone(),
        });
        if !send(tx, msg).await {
            // The stream is gone: the spoke's next stream gets them.
            let unsent = std::iter::once((directive_id, reason))
                .chain(notices)
                .collect();
            hub.ledger().unsent_notices(spoke_id, unsent);
            return Ok(Some(End::Quiet));
        }
    }
    let directives = with_payloads(hub, delivery).await?;
    for d in &directives {
        if !send(tx, Message::Directive(d.to_proto()?)).await {
            return Ok(Some(End::Quiet));
        }
    }
    Ok(None)
}

async fn send(tx: &Outbox, message: proto::watch_directives_response::Message) -> bool {
    tx.send(Ok(Box::new(proto::WatchDirectivesResponse {
        message: Some(message),
    })))
    .await
    .is_ok()
}
