//! The floor: a minimal in-memory server of the `hub.v1` contract, with no
//! storage at all. It is the most any server can reach through this
//! contract on this machine, so the benchmark reports the hub against it.
//!
//! It keeps only what the cycle needs in one `Mutex`: spokes by key, name and
//! id, each spoke's live stream (an unbounded channel) and its outstanding
//! directives, resent oldest first when a stream opens (so it is
//! at-least-once across reconnects, like the hub, but forgets everything
//! when it stops). It does not enforce the in-flight window, keeps no
//! finished directives (an ack of an unknown id answers OK, duplicate) and
//! sends no keepalives. It has the batched paths (AckStream,
//! CreateDirectives); RPCs the benchmark does not use answer UNIMPLEMENTED.
//! Accepted sockets get `TCP_NODELAY`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hub_proto::v1 as pb;
use hub_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use hub_proto::v1::spoke_service_server::{SpokeService, SpokeServiceServer};
use pb::directive_target::Target;
use pb::watch_directives_response::Message;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// Options of `hub-bench floor`.
#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Token AdminService calls must carry.
    #[arg(long)]
    pub admin_token: String,
    /// Token Register must carry for a new spoke.
    #[arg(long)]
    pub enrollment_token: String,
    /// In-flight window granted when a spoke asks for none.
    #[arg(long, default_value_t = 32)]
    pub default_in_flight: u32,
    /// Largest in-flight window granted.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: u32,
}

/// Serves the floor until SIGINT or SIGTERM.
pub async fn serve(args: FloorArgs) -> anyhow::Result<()> {
    let floor = Floor(Arc::new(Shared {
        admin_token: args.admin_token,
        enrollment_token: args.enrollment_token,
        default_in_flight: args.default_in_flight,
        max_in_flight: args.max_in_flight,
        state: Mutex::default(),
    }));
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(SpokeServiceServer::new(floor.clone()))
        .add_service(AdminServiceServer::new(floor).max_encoding_message_size(usize::MAX))
        .serve_with_shutdown(args.listen, crate::stop_signal())
        .await?;
    Ok(())
}

/// Boxed, so a channel's first block (32 slots) stays small per idle spoke.
type Item = Result<Box<pb::WatchDirectivesResponse>, Box<Status>>;
type Sender = UnboundedSender<Item>;

#[derive(Clone)]
struct Floor(Arc<Shared>);

struct Shared {
    admin_token: String,
    enrollment_token: String,
    default_in_flight: u32,
    max_in_flight: u32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    spokes: Vec<Spoke>,
    by_key: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

struct Spoke {
    id: String,
    name: String,
    stream: Option<Sender>,
    /// Sent and not acked (or not sent yet), by id: UUIDv7, so oldest first.
    outstanding: BTreeMap<String, pb::Directive>,
}

impl Spoke {
    /// Sends on the live stream, if any; a closed stream is forgotten and the
    /// directive stays outstanding for the next one.
    fn send(&mut self, directive: pb::Directive) {
        if let Some(tx) = &self.stream {
            let msg = Box::new(pb::WatchDirectivesResponse {
                message: Some(Message::Directive(directive)),
            });
            if tx.send(Ok(msg)).is_err() {
                self.stream = None;
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spoke_of(&self, state: &State, meta: &MetadataMap) -> Result<usize, Status> {
        bearer(meta)
            .and_then(|key| state.by_key.get(key).copied())
            .ok_or_else(|| Status::unauthenticated("unknown spoke key"))
    }

    fn check_admin(&self, meta: &MetadataMap) -> Result<(), Status> {
        match bearer(meta) {
            Some(t) if t == self.admin_token => Ok(()),
            _ => Err(Status::unauthenticated("admin token required")),
        }
    }

    fn hints(&self, max_in_flight: u32) -> pb::HubHints {
        pb::HubHints {
            heartbeat_interval: Some(duration(Duration::from_secs(10))),
            keepalive_interval: Some(duration(Duration::from_secs(15))),
            retry_after: None,
            max_in_flight,
            max_points_per_batch: 1000,
            endpoints: Vec::new(),
        }
    }
}

/// Applies an ack to the spoke's outstanding directives.
fn ack(spoke: &mut Spoke, req: &pb::AckRequest) -> Result<pb::AckResponse, Status> {
    let outcome = pb::AckOutcome::try_from(req.outcome).unwrap_or_default();
    let new_state = match outcome {
        pb::AckOutcome::Unspecified => {
            return Err(Status::invalid_argument("outcome: required"));
        }
        pb::AckOutcome::InProgress => pb::DirectiveState::InProgress,
        pb::AckOutcome::Completed => pb::DirectiveState::Completed,
        pb::AckOutcome::Failed => pb::DirectiveState::Failed,
        pb::AckOutcome::Rejected => pb::DirectiveState::Rejected,
    };
    let duplicate = if new_state == pb::DirectiveState::InProgress {
        if let Some(d) = spoke.outstanding.get_mut(&req.directive_id) {
            d.state = new_state as i32;
        }
        false
    } else {
        spoke.outstanding.remove(&req.directive_id).is_none()
    };
    Ok(pb::AckResponse {
        state: new_state as i32,
        duplicate,
    })
}

fn bearer(meta: &MetadataMap) -> Option<&str> {
    meta.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn now() -> pbjson_types::Timestamp {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: t.as_secs() as i64,
        nanos: t.subsec_nanos() as i32,
    }
}

fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl SpokeService for Floor {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let shared = &self.0;
        let mut state = shared.lock();
        let req = request.get_ref();
        let window = match req.max_in_flight {
            0 => shared.default_in_flight,
            n => n.min(shared.max_in_flight),
        };
        let (index, key) = match state.by_name.get(&req.name) {
            Some(&i) if shared.spoke_of(&state, request.metadata()).ok() == Some(i) => {
                (i, String::new())
            }
            Some(_) => return Err(Status::already_exists("spoke name taken")),
            None => {
                if bearer(request.metadata()) != Some(shared.enrollment_token.as_str()) {
                    return Err(Status::unauthenticated("enrollment token required"));
                }
                if req.name.is_empty() {
                    return Err(Status::invalid_argument("name: required"));
                }
                let index = state.spokes.len();
                let id = uuid::Uuid::now_v7().to_string();
                let key = format!(
                    "{:032x}{:032x}",
                    rand::random::<u128>(),
                    rand::random::<u128>()
                );
                state.by_key.insert(key.clone(), index);
                state.by_name.insert(req.name.clone(), index);
                state.by_id.insert(id.clone(), index);
                state.spokes.push(Spoke {
                    id,
                    name: req.name.clone(),
                    stream: None,
                    outstanding: BTreeMap::new(),
                });
                (index, key)
            }
        };
        let spoke = &state.spokes[index];
        let reply = pb::RegisterResponse {
            spoke: Some(pb::Spoke {
                id: spoke.id.clone(),
                name: spoke.name.clone(),
                max_in_flight: window,
                ..Default::default()
            }),
            spoke_key: key,
            hints: Some(shared.hints(window)),
            webhook_secret: String::new(),
        };
        Ok(Response::new(reply))
    }

    type WatchDirectivesStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchDirectivesResponse, Status>> + Send>>;

    async fn watch_directives(
        &self,
        request: Request<pb::WatchDirectivesRequest>,
    ) -> Result<Response<Self::WatchDirectivesStream>, Status> {
        let shared = &self.0;
        let (tx, rx) = unbounded_channel();
        {
            let mut state = shared.lock();
            let index = shared.spoke_of(&state, request.metadata())?;
            let spoke = &mut state.spokes[index];
            if let Some(old) = spoke.stream.replace(tx) {
                let _ = old.send(Err(Box::new(Status::aborted(
                    "superseded by a newer stream",
                ))));
            }
            let backlog: Vec<pb::Directive> = spoke
                .outstanding
                .values_mut()
                .map(|d| {
                    d.attempt += 1;
                    d.state = pb::DirectiveState::Delivered as i32;
                    d.clone()
                })
                .collect();
            for d in backlog {
                spoke.send(d);
            }
        }
        let stream = UnboundedReceiverStream::new(rx).map(|item| item.map(|m| *m).map_err(|s| *s));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let shared = &self.0;
        let mut state = shared.lock();
        let index = shared.spoke_of(&state, request.metadata())?;
        Ok(Response::new(ack(
            &mut state.spokes[index],
            request.get_ref(),
        )?))
    }

    type AckStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::AckStreamResponse, Status>> + Send>>;

    async fn ack_stream(
        &self,
        request: Request<Streaming<pb::AckRequest>>,
    ) -> Result<Response<Self::AckStreamStream>, Status> {
        use pb::ack_stream_response::Outcome;
        let shared = self.0.clone();
        let index = shared.spoke_of(&shared.lock(), request.metadata())?;
        let mut acks = request.into_inner();
        let (tx, rx) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(req)) = acks.message().await {
                let outcome = match ack(&mut shared.lock().spokes[index], &req) {
                    Ok(answer) => Outcome::Ack(answer),
                    Err(s) => Outcome::Error(pb::ItemError {
                        code: s.code() as i32,
                        message: s.message().to_owned(),
                    }),
                };
                let answer = pb::AckStreamResponse {
                    directive_id: req.directive_id,
                    outcome: Some(outcome),
                };
                if tx.send(Ok(answer)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let shared = &self.0;
        shared.spoke_of(&shared.lock(), request.metadata())?;
        Ok(Response::new(pb::HeartbeatResponse {
            next_interval: Some(duration(Duration::from_secs(10))),
            hub_time: Some(now()),
        }))
    }

    async fn push_metrics(
        &self,
        _request: Request<Streaming<pb::PushMetricsRequest>>,
    ) -> Result<Response<pb::PushMetricsResponse>, Status> {
        Err(Status::unimplemented("the floor stores no metrics"))
    }

    async fn poll_directives(
        &self,
        _request: Request<pb::PollDirectivesRequest>,
    ) -> Result<Response<pb::PollDirectivesResponse>, Status> {
        Err(Status::unimplemented("the floor only streams"))
    }
}

#[tonic::async_trait]
impl AdminService for Floor {
    async fn create_directive(
        &self,
        request: Request<pb::CreateDirectiveRequest>,
    ) -> Result<Response<pb::CreateDirectiveResponse>, Status> {
        self.0.check_admin(request.metadata())?;
        Ok(Response::new(self.0.create(request.into_inner())?))
    }

    async fn create_directives(
        &self,
        request: Request<pb::CreateDirectivesRequest>,
    ) -> Result<Response<pb::CreateDirectivesResponse>, Status> {
        use pb::create_directives_result::Outcome;
        self.0.check_admin(request.metadata())?;
        let req = request.into_inner();
        let results = req
            .items
            .into_iter()
            .map(|item| {
                let outcome = match self.0.create(item) {
                    Ok(mut created) => {
                        if !req.include_payloads {
                            for d in &mut created.directives {
                                d.payload = None;
                            }
                        }
                        Outcome::Created(created)
                    }
                    Err(s) => Outcome::Error(pb::ItemError {
                        code: s.code() as i32,
                        message: s.message().to_owned(),
                    }),
                };
                pb::CreateDirectivesResult {
                    outcome: Some(outcome),
                }
            })
            .collect();
        Ok(Response::new(pb::CreateDirectivesResponse {
            results,
            ..Default::default()
        }))
    }

    async fn cancel_directive(
        &self,
        _request: Request<pb::CancelDirectiveRequest>,
    ) -> Result<Response<pb::CancelDirectiveResponse>, Status> {
        Err(unimplemented())
    }

    async fn get_directive(
        &self,
        _request: Request<pb::GetDirectiveRequest>,
    ) -> Result<Response<pb::GetDirectiveResponse>, Status> {
        Err(unimplemented())
    }

    async fn list_directives(
        &self,
        _request: Request<pb::ListDirectivesRequest>,
    ) -> Result<Response<pb::ListDirectivesResponse>, Status> {
        Err(unimplemented())
    }

    async fn list_spokes(
        &self,
        _request: Request<pb::ListSpokesRequest>,
    ) -> Result<Response<pb::ListSpokesResponse>, Status> {
        Err(unimplemented())
    }

    async fn get_spoke(
        &self,
        _request: Request<pb::GetSpokeRequest>,
    ) -> Result<Response<pb::GetSpokeResponse>, Status> {
        Err(unimplemented())
    }

    async fn revoke_spoke(
        &self,
        _request: Request<pb::RevokeSpokeRequest>,
    ) -> Result<Response<pb::RevokeSpokeResponse>, Status> {
        Err(unimplemented())
    }

    async fn rotate_spoke_key(
        &self,
        _request: Request<pb::RotateSpokeKeyRequest>,
    ) -> Result<Response<pb::RotateSpokeKeyResponse>, Status> {
        Err(unimplemented())
    }

    async fn delete_spoke(
        &self,
        _: Request<pb::DeleteSpokeRequest>,
    ) -> Result<Response<pb::DeleteSpokeResponse>, Status> {
        Err(unimplemented())
    }

    async fn query_metrics(
        &self,
        _request: Request<pb::QueryMetricsRequest>,
    ) -> Result<Response<pb::QueryMetricsResponse>, Status> {
        Err(unimplemented())
    }

    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

    async fn watch_events(
        &self,
        _request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(unimplemented())
    }
}

impl Shared {
    /// One CreateDirective, after the admin check.
    fn create(
        &self,
        req: pb::CreateDirectiveRequest,
    ) -> Result<pb::CreateDirectiveResponse, Status> {
        if req.r#type.is_empty() {
            return Err(Status::invalid_argument("type: required"));
        }
        let mut state = self.lock();
        let targets: Vec<usize> = match req.target.and_then(|t| t.target) {
            Some(Target::SpokeName(name)) => vec![
                *state
                    .by_name
                    .get(&name)
                    .ok_or_else(|| Status::not_found("target.spoke_name: no such spoke"))?,
            ],
            Some(Target::SpokeId(id)) => vec![
                *state
                    .by_id
                    .get(&id)
                    .ok_or_else(|| Status::not_found("target.spoke_id: no such spoke"))?,
            ],
            Some(Target::AllSpokes(true)) => (0..state.spokes.len()).collect(),
            Some(Target::Selector(_)) => {
                return Err(Status::unimplemented("the floor has no label selectors"));
            }
            _ => return Err(Status::invalid_argument("target: required")),
        };
        let group_id = uuid::Uuid::now_v7().to_string();
        let created = now();
        let mut directives = Vec::with_capacity(targets.len());
        for index in targets {
            let spoke = &mut state.spokes[index];
            let live = spoke.stream.is_some();
            let directive = pb::Directive {
                id: uuid::Uuid::now_v7().to_string(),
                spoke_id: spoke.id.clone(),
                spoke_name: spoke.name.clone(),
                r#type: req.r#type.clone(),
                payload: req.payload.clone(),
                state: if live {
                    pb::DirectiveState::Delivered
                } else {
                    pb::DirectiveState::Pending
                } as i32,
                attempt: u32::from(live),
                max_attempts: if req.max_attempts == 0 {
                    5
                } else {
                    req.max_attempts
                },
                priority: req.priority,
                created_at: Some(created),
                updated_at: Some(created),
                expires_at: req.expires_at,
                ack_deadline: req.ack_deadline.or(Some(duration(Duration::from_secs(30)))),
                group_id: group_id.clone(),
                idempotency_key: req.idempotency_key.clone(),
                coalesce_key: req.coalesce_key.clone(),
                ..Default::default()
            };
            spoke
                .outstanding
                .insert(directive.id.clone(), directive.clone());
            spoke.send(directive.clone());
            directives.push(directive);
        }
        Ok(pb::CreateDirectiveResponse {
            directive_count: u32::try_from(directives.len()).unwrap_or(u32::MAX),
            directives,
            group_id,
            skipped_spokes: 0,
            idempotent_replay: false,
            payloads_omitted: false,
            directives_omitted: false,
        })
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("not part of the floor")
}
