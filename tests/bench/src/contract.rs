//! The load generator's side of `hub.v1`, shared by every scenario on the hub
//! and the floor: spokes (one gRPC channel, so one TCP connection, each),
//! a fleet of them holding `WatchDirectives` open and reconnecting on their
//! own, and the admin client that creates directives.
//!
//! How a spoke acks and how the producer creates are the two paths the
//! batched RPCs of the contract will add to ([`AckPath`], [`CreatePath`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hub_proto::v1 as pb;
use pb::admin_service_client::AdminServiceClient;
use pb::spoke_service_client::SpokeServiceClient;
use pb::watch_directives_response::Message;
use pbjson_types::Struct;
use pbjson_types::value::Kind;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// The directive type every bench spoke declares.
pub const DIRECTIVE_TYPE: &str = "bench";

/// Responses (a fan-out's create lists every directive) may be large.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Where a server is and the tokens it takes.
#[derive(Debug, Clone)]
pub struct Target {
    /// gRPC addresses: one, or one per replica of the same hub (spoke `i`
    /// and admin connection `i` use the `i`-th, round robin).
    pub addrs: Vec<SocketAddr>,
    /// AdminService token.
    pub admin_token: String,
    /// Register token for new spokes.
    pub enrollment_token: String,
}

impl Target {
    /// The address connection `i` uses (round robin over `addrs`).
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }
}

/// How a spoke acks a directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckPath {
    /// One unary `Ack` call per directive.
    Unary,
    /// Each ack a message on the spoke's one `AckStream`.
    Stream,
}

/// How the producer creates directives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CreatePath {
    /// One unary `CreateDirective` call per directive.
    Single,
    /// Whatever window slots are free in one `CreateDirectives` call.
    Batch,
}

/// Most items in one `CreateDirectives` call (the contract's limit).
pub const MAX_CREATE_BATCH: usize = 1000;

/// An ack waiting for its answer on the spoke's AckStream.
type PendingAck = (pb::AckRequest, oneshot::Sender<Result<(), Status>>);

fn bearer(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    format!("Bearer {token}")
        .parse()
        .context("token is not valid metadata")
}

fn authorized<T>(message: T, auth: &MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// True when a gRPC server answers at `addr` (any status but UNAVAILABLE:
/// an unauthenticated Heartbeat is refused by a server that is up).
pub async fn answers(addr: SocketAddr) -> bool {
    let Ok(channel) = channel(addr).await else {
        return false;
    };
    let reply = SpokeServiceClient::new(channel)
        .heartbeat(pb::HeartbeatRequest::default())
        .await;
    !matches!(reply, Err(s) if s.code() == Code::Unavailable)
}

/// A registered spoke with its own connection.
pub struct Spoke {
    /// Position in its fleet.
    pub index: usize,
    /// Its name (target of directives).
    pub name: String,
    auth: MetadataValue<Ascii>,
    client: SpokeServiceClient<Channel>,
    ack_path: AckPath,
    /// The AckStream actor's queue, started with the first streamed ack and
    /// again after its stream broke.
    acks: Mutex<Option<mpsc::Sender<PendingAck>>>,
}

impl Spoke {
    /// Connects and registers `name` with the enrollment token, asking for
    /// an in-flight window of `window`.
    pub async fn register(
        target: &Target,
        index: usize,
        name: String,
        window: u32,
        ack_path: AckPath,
    ) -> anyhow::Result<Spoke> {
        let channel = channel(target.addr(index))
            .await
            .with_context(|| format!("spoke {name}: connecting"))?;
        let mut client = SpokeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let request = pb::RegisterRequest {
            name: name.clone(),
            capabilities: vec![pb::Capability {
                directive_type: DIRECTIVE_TYPE.into(),
                version: "1".into(),
            }],
            version: "bench".into(),
            max_in_flight: window,
            ..Default::default()
        };
        let reply = client
            .register(authorized(request, &bearer(&target.enrollment_token)?))
            .await
            .with_context(|| format!("spoke {name}: Register"))?
            .into_inner();
        Ok(Spoke {
            index,
            name,
            auth: bearer(&reply.spoke_key)?,
            client,
            ack_path,
            acks: Mutex::new(None),
        })
    }

    /// Acks a directive COMPLETED with a small result; returns when the
    /// server confirmed it.
    pub async fn complete(&self, directive_id: String, result: Struct) -> Result<(), Status> {
        let request = pb::AckRequest {
            directive_id,
            outcome: pb::AckOutcome::Completed as i32,
            result: Some(result),
            ..Default::default()
        };
        match self.ack_path {
            AckPath::Unary => {
                self.client
                    .clone()
                    .ack(authorized(request, &self.auth))
                    .await?;
                Ok(())
            }
            AckPath::Stream => {
                let (done, answer) = oneshot::channel();
                self.ack_queue()
                    .send((request, done))
                    .await
                    .map_err(|_| Status::unavailable("the ack stream ended"))?;
                answer
                    .await
                    .unwrap_or_else(|_| Err(Status::unavailable("the ack stream ended")))
            }
        }
    }

    /// One Heartbeat (status OK); returns when the server answered.
    pub async fn heartbeat(&self) -> Result<(), Status> {
        let request = pb::HeartbeatRequest {
            status: pb::SpokeStatus::Ok as i32,
            ..Default::default()
        };
        self.client
            .clone()
            .heartbeat(authorized(request, &self.auth))
            .await?;
        Ok(())
    }

    /// The queue of the spoke's AckStream actor, started if it is not running.
    fn ack_queue(&self) -> mpsc::Sender<PendingAck> {
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = acks.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(ack_stream(self.client.clone(), self.auth.clone(), rx));
        *acks = Some(tx.clone());
        tx
    }
}

/// Owns one AckStream: sends each queued ack and hands each answer (they come
/// in order) to the ack waiting longest. When the stream breaks, every ack
/// without an answer fails and the actor ends.
async fn ack_stream(
    mut client: SpokeServiceClient<Channel>,
    auth: MetadataValue<Ascii>,
    mut queue: mpsc::Receiver<PendingAck>,
) {
    let (requests, outgoing) = mpsc::channel(1024);
    let answers = client
        .ack_stream(authorized(ReceiverStream::new(outgoing), &auth))
        .await;
    let mut answers = match answers {
        Ok(answers) => answers.into_inner(),
        Err(status) => {
            queue.close();
            while let Some((_, done)) = queue.recv().await {
                let _ = done.send(Err(status.clone()));
            }
            return;
        }
    };
    let mut waiting = std::collections::VecDeque::new();
    let broken = loop {
        tokio::select! {
            next = queue.recv() => match next {
                Some((request, done)) => {
                    waiting.push_back(done);
                    if requests.send(request).await.is_err() {
                        break Status::unavailable("the ack stream ended");
                    }
                }
                None => return,
            },
            answer = answers.message() => match answer {
                Ok(Some(answer)) => {
                    let result = match answer.outcome {
                        Some(pb::ack_stream_response::Outcome::Ack(_)) => Ok(()),
                        Some(pb::ack_stream_response::Outcome::Error(e)) => {
                            Err(Status::new(Code::from_i32(e.code), e.message))
                        }
                        None => Err(Status::internal("an answer without an outcome")),
                    };
                    if let Some(done) = waiting.pop_front() {
                        let _ = done.send(result);
                    }
                }
                Ok(None) => break Status::unavailable("the ack stream ended"),
                Err(status) => break status,
            },
        }
    };
    queue.close();
    for done in waiting {
        let _ = done.send(Err(broken.clone()));
    }
    while let Some((_, done)) = queue.recv().await {
        let _ = done.send(Err(broken.clone()));
    }
}

/// What a fleet does with each directive its spokes receive. Called on the
/// spoke's stream task: spawn anything that waits.
pub trait Handler: Send + Sync + 'static {
    /// `epoch` is the [`Streams`] epoch in which this spoke's stream opened.
    fn directive(&self, spoke: &Arc<Spoke>, directive: pb::Directive, epoch: u64);
}

/// Counts streams opened per epoch: the fleet's first connect is epoch 1; a
/// new epoch (e.g. before a server restart) counts the spokes whose stream
/// opened again since.
#[derive(Default)]
pub struct Streams {
    state: Mutex<(u64, usize)>,
    changed: Notify,
    fatal: Mutex<Option<String>>,
}

impl Streams {
    fn new() -> Self {
        Streams {
            state: Mutex::new((1, 0)),
            ..Default::default()
        }
    }

    /// Starts a new epoch; returns its number.
    pub fn begin_epoch(&self) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = (state.0 + 1, 0);
        state.0
    }

    /// A spoke whose last stream opened in `*mine` has opened one now.
    fn opened(&self, mine: &mut u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *mine < state.0 {
            *mine = state.0;
            state.1 += 1;
            self.changed.notify_waiters();
        }
    }

    fn fail(&self, message: String) {
        self.fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(message);
        self.changed.notify_waiters();
    }

    /// Waits until `count` spokes opened a stream in the current epoch.
    pub async fn wait_open(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if let Some(e) = self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                bail!("{e}");
            }
            let open = self.state.lock().unwrap_or_else(|e| e.into_inner()).1;
            if open >= count {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!("only {open} of {count} streams open after {timeout:?}");
            }
        }
    }
}

/// Spokes that hold `WatchDirectives` open and reconnect on their own
/// (backoff from a random 100–500 ms, x1.6, ±20 % jitter, 2 s cap). Dropping
/// the fleet ends every stream task.
pub struct Fleet {
    /// The spokes, by index.
    pub spokes: Vec<Arc<Spoke>>,
    /// Stream counts.
    pub streams: Arc<Streams>,
    _tasks: JoinSet<()>,
}

/// What [`Fleet::connect`] sets up.
pub struct FleetSpec<'a> {
    /// The server.
    pub target: &'a Target,
    /// Spokes are named `{prefix}-{index}`.
    pub prefix: &'a str,
    /// How many spokes.
    pub count: usize,
    /// The in-flight window each asks for.
    pub window: u32,
    /// At most this many connecting and registering at once.
    pub concurrency: usize,
    /// How they ack.
    pub ack_path: AckPath,
    /// How long registering and opening every stream may take.
    pub timeout: Duration,
}

impl Fleet {
    /// Registers the spokes, opens each one's stream as soon as it is
    /// registered, and returns when every stream is open (response headers
    /// received), with the time that took.
    pub async fn connect(
        spec: FleetSpec<'_>,
        handler: Arc<dyn Handler>,
    ) -> anyhow::Result<(Fleet, Duration)> {
        let started = Instant::now();
        let streams = Arc::new(Streams::new());
        let mut tasks = JoinSet::new();
        let mut spokes = Vec::with_capacity(spec.count);
        let mut registrations = futures_util::stream::iter(0..spec.count)
            .map(|i| {
                let name = format!("{}-{i}", spec.prefix);
                Spoke::register(spec.target, i, name, spec.window, spec.ack_path)
            })
            .buffer_unordered(spec.concurrency.max(1));
        let register_all = async {
            while let Some(spoke) = registrations.next().await {
                let spoke = Arc::new(spoke?);
                tasks.spawn(watch(spoke.clone(), streams.clone(), handler.clone()));
                spokes.push(spoke);
            }
            anyhow::Ok(())
        };
        let (count, timeout) = (spec.count, spec.timeout);
        tokio::time::timeout(timeout, register_all)
            .await
            .with_context(|| format!("registering {count} spokes took over {timeout:?}"))??;
        spokes.sort_by_key(|s| s.index);
        let left = timeout.saturating_sub(started.elapsed());
        streams.wait_open(count, left).await?;
        let took = started.elapsed();
        Ok((
            Fleet {
                spokes,
                streams,
                _tasks: tasks,
            },
            took,
        ))
    }
}

async fn watch(spoke: Arc<Spoke>, streams: Arc<Streams>, handler: Arc<dyn Handler>) {
    let mut epoch = 0;
    let mut backoff = Backoff::new();
    loop {
        let request = authorized(pb::WatchDirectivesRequest {}, &spoke.auth);
        match spoke.client.clone().watch_directives(request).await {
            Ok(response) => {
                streams.opened(&mut epoch);
                backoff = Backoff::new();
                let mut stream = response.into_inner();
                while let Ok(Some(msg)) = stream.message().await {
                    if let Some(Message::Directive(d)) = msg.message {
                        handler.directive(&spoke, d, epoch);
                    }
                }
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                streams.fail(format!("spoke {}: WatchDirectives: {s}", spoke.name));
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Reconnection delays: a random first one, then growing to a cap.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const CAP: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(rand::random_range(100..=500)),
        }
    }

    fn next(&mut self) -> Duration {
        let jitter = rand::random_range(0.8..1.2);
        let delay = self.next.mul_f64(jitter);
        self.next = self.next.mul_f64(1.6).min(Self::CAP);
        delay
    }
}

/// The operator side: creates directives over a few connections (the hub
/// allows 256 concurrent calls per connection; the producer may have more in
/// flight).
pub struct Admin {
    clients: Vec<AdminServiceClient<Channel>>,
    auth: MetadataValue<Ascii>,
    next: AtomicUsize,
    /// How creates are sent.
    pub create_path: CreatePath,
}

impl Admin {
    /// Opens enough connections for `in_flight` concurrent creates, as
    /// many to each of the target's addresses (calls go round robin over
    /// the connections, so evenly over the replicas of a hub).
    pub async fn connect(
        target: &Target,
        in_flight: usize,
        create_path: CreatePath,
    ) -> anyhow::Result<Admin> {
        let mut clients = Vec::new();
        let replicas = target.addrs.len().max(1);
        let count = in_flight.div_ceil(128).max(1).div_ceil(replicas) * replicas;
        for i in 0..count {
            let channel = channel(target.addr(i)).await.context("admin: connecting")?;
            clients.push(
                AdminServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            );
        }
        Ok(Admin {
            clients,
            auth: bearer(&target.admin_token)?,
            next: AtomicUsize::new(0),
            create_path,
        })
    }

    /// One CreateDirective of the bench type; returns when the server
    /// answered.
    pub async fn create(
        &self,
        target: pb::directive_target::Target,
        payload: Struct,
        ack_deadline: Option<Duration>,
    ) -> Result<pb::CreateDirectiveResponse, Status> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let request = pb::CreateDirectiveRequest {
            target: Some(pb::DirectiveTarget {
                target: Some(target),
            }),
            r#type: DIRECTIVE_TYPE.into(),
            payload: Some(payload),
            ack_deadline: ack_deadline.map(|d| pbjson_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            ..Default::default()
        };
        Ok(self.clients[i]
            .clone()
            .create_directive(authorized(request, &self.auth))
            .await?
            .into_inner())
    }
}

impl Admin {
    /// One CreateDirectives call with a directive per `(spoke name, payload)`;
    /// returns when the server answered, failing if any item failed.
    pub async fn create_batch(&self, items: Vec<(String, Struct)>) -> anyhow::Result<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let items = items
            .into_iter()
            .map(|(name, payload)| pb::CreateDirectiveRequest {
                target: Some(pb::DirectiveTarget {
                    target: Some(pb::directive_target::Target::SpokeName(name)),
                }),
                r#type: DIRECTIVE_TYPE.into(),
                payload: Some(payload),
                ..Default::default()
            })
            .collect();
        let request = pb::CreateDirectivesRequest {
            items,
            include_payloads: false,
        };
        let reply = self.clients[i]
            .clone()
            .create_directives(authorized(request, &self.auth))
            .await?
            .into_inner();
        for result in reply.results {
            if let Some(pb::create_directives_result::Outcome::Error(e)) = result.outcome {
                bail!("CreateDirectives item: code {}: {}", e.code, e.message);
            }
        }
        Ok(())
    }
}

/// A JSON object as a Struct.
pub fn to_struct(json: serde_json::Value) -> Struct {
    hub_proto::json::from_json(json).unwrap_or_default()
}

/// A number field of a payload.
pub fn number(payload: Option<&Struct>, field: &str) -> Option<f64> {
    match payload?.fields.get(field)?.kind {
        Some(Kind::NumberValue(n)) => Some(n),
        _ => None,
    }
}

/// A string field of a payload.
pub fn text<'a>(payload: Option<&'a Struct>, field: &str) -> Option<&'a str> {
    match &payload?.fields.get(field)?.kind {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}
