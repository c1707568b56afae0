//! The operator's load: directives created while the faults happen, each
//! with a unique number `n` in its payload. Half of them carry an
//! idempotency key and are retried with the same key until the hub answers
//! (a lost reply must not create twice); the others are tried once, and a
//! failure whose outcome the caller cannot know is noted as such. A few
//! are fan-outs to every spoke. The workload (key, target, handler time)
//! of each `n` follows from the seed.
//!
//! Given several hub URLs (replicas: one leads, the others forward to
//! it), creator `k` starts at URL `k % n` and moves to the next URL after
//! a failure in transit; a keyed create is retried there with the same
//! key. An unkeyed create is sent again (to the next URL) only when the
//! connection to the replica was refused: then the request never left
//! this process. An UNAVAILABLE answer proves nothing (a standby gives it
//! when the leader went away, perhaps after the create reached it), so it
//! leaves the unkeyed create's outcome unknown.

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
    /// Moves of a creator to the next hub URL (with several).
    pub url_switches: u64,
    /// Unkeyed creates sent again after a refused connection.
    pub refused_resends: u64,
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
        Self::start_with_urls(&[url.to_owned()], spokes, seed)
    }

    /// Like [`start`](Self::start) with several hub URLs: creator `k`
    /// starts at URL `k % n` and moves on after a failure in transit.
    pub fn start_with_urls(urls: &[String], spokes: Vec<String>, seed: u64) -> Self {
        assert!(!urls.is_empty(), "at least one hub URL");
        let channels: Vec<Channel> = urls
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy()
            })
            .collect();
        let (stop, _) = watch::channel(None);
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let next = Arc::new(AtomicU64::new(0));
        let spokes = Arc::new(spokes);
        let tasks = (0..CREATORS)
            .map(|k| {
                let mut creator = Creator {
                    admins: channels
                        .iter()
                        .cloned()
                        .map(AdminServiceClient::new)
                        .collect(),
                    current: k % channels.len(),
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

    /// Moves of a creator to the next hub URL so far.
    pub fn url_switches(&self) -> u64 {
        self.log.lock().unwrap().url_switches
    }

    /// Unkeyed creates sent again after a refused connection so far.
    pub fn refused_resends(&self) -> u64 {
        self.log.lock().unwrap().refused_resends
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
    /// One client per hub URL, and the one in use.
    admins: Vec<AdminServiceClient<Channel>>,
    current: usize,
    spokes: Arc<Vec<String>>,
    seed: u64,
    stop: watch::Receiver<Option<tokio::time::Instant>>,
    log: Arc<Mutex<LoadLog>>,
}

impl Creator {
    async fn create(&mut self, n: u64) {
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
            let mut admin = self.admins[self.current].clone();
            let status = match admin.create_directive(call).await {
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
            let several = self.admins.len() > 1;
            if several {
                self.current = (self.current + 1) % self.admins.len();
                self.log.lock().unwrap().url_switches += 1;
            }
            if key.is_none() && !(several && never_sent(&status)) {
                break Outcome::Unknown;
            }
            let give_up = *self.stop.borrow();
            if give_up.is_some_and(|at| tokio::time::Instant::now() >= at) {
                break Outcome::GaveUp(status.to_string());
            }
            if key.is_some() {
                self.log.lock().unwrap().retries += 1;
            } else {
                self.log.lock().unwrap().refused_resends += 1;
            }
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

/// Whether the call failed because its connection was refused: the
/// request never left this process, so no hub can have acted on it.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection refused is told apart from an UNAVAILABLE answer,
    /// which a hub may give after acting on the call.
    #[tokio::test]
    async fn only_a_refused_connection_counts_as_never_sent() {
        let [port] = crate::common::free_ports();
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = AdminServiceClient::new(channel)
            .create_directive(proto::CreateDirectiveRequest::default())
            .await
            .unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        assert!(!never_sent(&tonic::Status::unavailable(
            "the leading hub replica went away; retry shortly"
        )));
    }
}
