//! The operator's load: directives created while the faults happen, each
//! with a unique number `n` in its payload. Half of them carry an
//! idempotency key and are retried with the same key until the hub answers
//! (a lost reply must not create twice); the others are tried once, and a
//! failure whose outcome the caller cannot know is noted as such. A few
//! are fan-outs to every spoke. The workload (key, target, handler time)
//! of each `n` follows from the seed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use proto::directive_target::Target;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::hub_bin::ADMIN_TOKEN;

/// Concurrent creators, each pausing this long between creates.
const CREATORS: usize = 3;
const PAUSE: Duration = Duration::from_millis(100);
/// How long a keyed create keeps retrying once the load is stopped.
const RETRY_AFTER_STOP: Duration = Duration::from_secs(30);

/// How one create call ended, as the operator saw it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The hub answered with these directive ids.
    Created(Vec<String>),
    /// An unkeyed create failed in transit: it may or may not exist.
    Unknown,
    /// A keyed create was still failing when the retries stopped.
    GaveUp(String),
    /// The hub refused a valid create.
    Refused(String),
}

/// One create, by its number.
#[derive(Debug, Clone)]
pub struct Create {
    pub n: u64,
    pub key: Option<String>,
    /// The spoke's name, or `None` for a fan-out to every spoke.
    pub target: Option<String>,
    pub outcome: Outcome,
}

/// What the operator did.
#[derive(Debug, Default)]
pub struct LoadLog {
    pub creates: Vec<Create>,
    /// Keyed creates sent again after a failure.
    pub retries: u64,
    /// Answers that said the key was seen before (`idempotent_replay`).
    pub replays: u64,
}

/// The running load.
pub struct Load {
    stop: watch::Sender<Option<tokio::time::Instant>>,
    tasks: Vec<JoinHandle<()>>,
    log: Arc<Mutex<LoadLog>>,
}

impl Load {
    /// Starts creating directives for `spokes` on the hub at `url`.
    pub fn start(url: &str, spokes: Vec<String>, seed: u64) -> Self {
        let channel = Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let (stop, _) = watch::channel(None);
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let next = Arc::new(AtomicU64::new(0));
        let spokes = Arc::new(spokes);
        let tasks = (0..CREATORS)
            .map(|_| {
                let creator = Creator {
                    admin: AdminServiceClient::new(channel.clone()),
                    spokes: spokes.clone(),
                    seed,
                    stop: stop.subscribe(),
                    log: log.clone(),
                };
                let next = next.clone();
                tokio::spawn(async move {
                    while creator.stop.borrow().is_none() {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        creator.create(n).await;
                        tokio::time::sleep(PAUSE).await;
                    }
                })
            })
            .collect();
        Self { stop, tasks, log }
    }

    /// Stops creating; waits for the keyed retries still going.
    pub async fn finish(self) -> LoadLog {
        self.stop
            .send_replace(Some(tokio::time::Instant::now() + RETRY_AFTER_STOP));
        for task in self.tasks {
            task.await.unwrap();
        }
        let mut log = std::mem::take(&mut *self.log.lock().unwrap());
        log.creates.sort_by_key(|c| c.n);
        log
    }
}

struct Creator {
    admin: AdminServiceClient<Channel>,
    spokes: Arc<Vec<String>>,
    seed: u64,
    stop: watch::Receiver<Option<tokio::time::Instant>>,
    log: Arc<Mutex<LoadLog>>,
}

impl Creator {
    async fn create(&self, n: u64) {
        // Each n's workload from the seed alone, whatever the timing.
        let mut rng = StdRng::seed_from_u64(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keyed = rng.random_bool(0.5);
        let fan_out = rng.random_bool(0.04);
        let key = (keyed || fan_out).then(|| format!("key-{n}"));
        let target =
            (!fan_out).then(|| self.spokes[rng.random_range(0..self.spokes.len())].clone());
        let request = proto::CreateDirectiveRequest {
            target: Some(proto::DirectiveTarget {
                target: Some(match &target {
                    Some(name) => Target::SpokeName(name.clone()),
                    None => Target::AllSpokes(true),
                }),
            }),
            r#type: "job".into(),
            payload: hub_proto::json::from_json(
                serde_json::json!({"n": n, "sleep_ms": rng.random_range(0..200)}),
            ),
            // Every lost connection may cost a delivery attempt; this suite
            // is about loss and duplication, not about exhausting attempts.
            max_attempts: 100,
            idempotency_key: key.clone().unwrap_or_default(),
            ..Default::default()
        };
        let outcome = loop {
            let mut call = tonic::Request::new(request.clone());
            call.metadata_mut().insert(
                "authorization",
                format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
            );
            call.set_timeout(Duration::from_secs(5));
            let status = match self.admin.clone().create_directive(call).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.idempotent_replay {
                        self.log.lock().unwrap().replays += 1;
                    }
                    break Outcome::Created(reply.directives.into_iter().map(|d| d.id).collect());
                }
                Err(status) => status,
            };
            if !in_transit(&status) {
                break Outcome::Refused(status.to_string());
            }
            if key.is_none() {
                break Outcome::Unknown;
            }
            let give_up = *self.stop.borrow();
            if give_up.is_some_and(|at| tokio::time::Instant::now() >= at) {
                break Outcome::GaveUp(status.to_string());
            }
            self.log.lock().unwrap().retries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.log.lock().unwrap().creates.push(Create {
            n,
            key,
            target,
            outcome,
        });
    }
}

/// Whether a failure may have happened on the way, so the caller cannot
/// know whether the hub acted: a transport error (tonic attaches its
/// source: refused connection, reset, timeout), or the hub saying
/// UNAVAILABLE. Any other status is the hub's refusal.
fn in_transit(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        )
}
