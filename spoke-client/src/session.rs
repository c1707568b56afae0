//! One connection to one hub: dial, register (first start: with the
//! enrollment token and the key this spoke proposes, kept before the call,
//! then keeping the key the reply carries; later: with the stored key),
//! open `WatchDirectives`, then serve the stream — directives, cancels,
//! keepalives, hints — with heartbeats alongside, until it ends.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hub_proto::v1 as proto;
use hub_proto::v1::watch_directives_response::Message;
use tokio::sync::Notify;
use tonic::Status;
use tonic::transport::Channel;

use crate::config::Config;
use crate::directives::Directives;
use crate::endpoints::Endpoints;
use crate::error::{Error, Result, causes};
use crate::event::{self, Event, Observer};
use crate::heartbeat;
use crate::keys::{self, Keys};
use crate::link::{self, Link};
use crate::reconnect::{Dial, StreamEnd, Watch};
use crate::status::{KeyState, Tracker};
use crate::store::{Registration, Store};
use crate::wire::{duration, now_ms};

/// Keepalive interval assumed until the hub says otherwise.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Heartbeat interval assumed until the hub says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// A stream silent for this many keepalive intervals is presumed dead.
const MISSED_KEEPALIVES: u32 = 3;

/// What every session shares with the rest of the client.
#[derive(Clone)]
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub capabilities: Arc<Vec<(String, String)>>,
    pub store: Store,
    pub link: Link,
    pub status: Tracker,
    pub directives: Directives,
    pub hub_max_batch: Arc<AtomicU32>,
    /// The registration, once known (loaded at start or issued by the hub).
    pub registration: Arc<Mutex<Option<Registration>>>,
    /// Told of each registration.
    pub observer: Option<Observer>,
    /// Sends a heartbeat now (the application changed its status).
    pub beat_now: Arc<Notify>,
    /// The configured endpoints and the hub's hint.
    pub endpoints: Endpoints,
    /// Installed keys, waited for after the hub refused the key.
    pub keys: Keys,
}

/// Dials endpoints for the reconnect machine.
pub(crate) struct Connector {
    pub shared: Shared,
    /// The key generation the latest attempt used: a refusal is about that
    /// key, and any newer one is worth trying.
    pub tried: u64,
}

/// An open directive stream and what serving it needs.
pub(crate) struct Session {
    shared: Shared,
    stream: tonic::Streaming<proto::WatchDirectivesResponse>,
    keepalive: Duration,
    heartbeat: Duration,
}

impl Dial for Connector {
    type Stream = Session;

    fn open(&mut self, endpoint: &str) -> impl Future<Output = Result<Session>> + Send {
        // Read before the registration is: a key installed after this is
        // newer than the one this attempt uses.
        self.tried = self.shared.keys.generation();
        let shared = self.shared.clone();
        let endpoint = endpoint.to_owned();
        async move { open(shared, endpoint).await }
    }

    fn holds_key(&self) -> bool {
        self.shared
            .registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn new_key(&mut self) -> impl Future<Output = Result<()>> + Send {
        let shared = self.shared.clone();
        let tried = self.tried;
        async move { keys::wait_for_new(&shared, tried).await }
    }
}

async fn open(shared: Shared, url: String) -> Result<Session> {
    let config = &shared.config;
    let channel = config
        .tls
        .endpoint(&url)?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {url}: {}", causes(&e))))?;
    // Registering runs to completion even if run() is dropped meanwhile: a
    // key the hub issued must reach the store, or it is lost for good.
    let registering = tokio::spawn(register(shared.clone(), channel.clone()));
    let (key, hints) = registering
        .await
        .map_err(|e| Status::internal(format!("registration task: {e}")))??;
    if let Some(hints) = &hints {
        shared
            .endpoints
            .offer(&hints.endpoints, &shared.store)
            .await;
    }
    let rpc = link::rpc(channel, &key)?;
    let stream = rpc
        .clone()
        .watch_directives(proto::WatchDirectivesRequest {})
        .await?
        .into_inner();
    shared.link.connect(rpc);
    shared.status.update(|s| {
        s.connected = true;
        s.endpoint = Some(url.clone());
    });
    let directives = shared.directives.clone();
    tokio::spawn(async move { directives.resend_acks().await });
    let keepalive = hints
        .as_ref()
        .and_then(|h| duration(h.keepalive_interval.as_ref()))
        .unwrap_or(DEFAULT_KEEPALIVE);
    let heartbeat = hints
        .as_ref()
        .and_then(|h| duration(h.heartbeat_interval.as_ref()))
        .unwrap_or(DEFAULT_HEARTBEAT);
    Ok(Session {
        shared,
        stream,
        keepalive,
        heartbeat,
    })
}

/// Registers (or re-registers, refreshing labels and capabilities);
/// answers the key to use and the hub's hints.
async fn register(shared: Shared, channel: Channel) -> Result<(String, Option<proto::HubHints>)> {
    let config = &shared.config;
    // Registrations happen one at a time (the reconnect loop is their only
    // caller), so a short lock to read and another to write are enough.
    let known = shared
        .registration
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let (secret, proposed_key) = match &known {
        Some(reg) => (reg.spoke_key.clone(), String::new()),
        None => {
            let token = config.enrollment_token.clone().ok_or_else(|| {
                Error::config(
                    "enrollment_token",
                    "required on the first start: the state directory holds no key yet",
                )
            })?;
            (token, proposed_key(&shared).await?)
        }
    };
    let enrolling = known.is_none();
    let request = proto::RegisterRequest {
        name: config.name.clone(),
        labels: config.labels.clone().into_iter().collect(),
        capabilities: shared
            .capabilities
            .iter()
            .map(|(t, v)| proto::Capability {
                directive_type: t.clone(),
                version: v.clone(),
            })
            .collect(),
        version: config.version.clone(),
        max_in_flight: config.window(),
        proposed_key,
        // spoke-client holds a stream: it never asks for webhook delivery.
        webhook_url: String::new(),
    };
    let mut call = tonic::Request::new(request);
    call.set_timeout(config.call_timeout);
    let reply = link::rpc(channel, &secret)?
        .register(call)
        .await?
        .into_inner();
    let spoke_id = reply
        .spoke
        .as_ref()
        .map(|s| s.id.clone())
        .unwrap_or_default();
    let key = match known {
        // An installed key: in a state directory that never registered,
        // or for a spoke registered anew under this name, the reply tells
        // its spoke id.
        Some(reg) if !spoke_id.is_empty() && reg.spoke_id != spoke_id => {
            let reg = Registration {
                spoke_id: spoke_id.clone(),
                ..reg
            };
            shared.store.save_registration(&reg, now_ms()).await?;
            let key = reg.spoke_key.clone();
            *shared
                .registration
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(reg);
            key
        }
        Some(reg) => reg.spoke_key,
        None => {
            let spoke = reply.spoke.unwrap_or_default();
            if reply.spoke_key.is_empty() {
                return Err(Error::Corrupt(
                    "the hub registered the spoke but sent no key".into(),
                ));
            }
            // The reply's key, whatever was proposed: an older hub ignores
            // the proposal and sends its own.
            let reg = Registration {
                name: spoke.name,
                spoke_id: spoke.id,
                spoke_key: reply.spoke_key,
            };
            let reg = shared.store.enrolled(&reg, now_ms()).await?;
            tracing::info!(spoke_id = %reg.spoke_id, "registered with the hub; key kept in the state directory");
            let key = reg.spoke_key.clone();
            *shared
                .registration
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(reg);
            key
        }
    };
    shared.status.update(|s| s.key = KeyState::Accepted);
    if let Some(hints) = &reply.hints {
        shared
            .hub_max_batch
            .store(hints.max_points_per_batch, Ordering::Relaxed);
    }
    event::tell(
        shared.observer.as_ref(),
        Event::Registered {
            spoke_id,
            new: enrolling,
        },
    );
    Ok((key, reply.hints))
}

/// The key to propose at enrollment: the one kept from an earlier attempt
/// (its reply may have been lost after the hub stored it), else a new one,
/// kept before it is ever sent.
async fn proposed_key(shared: &Shared) -> Result<String> {
    let name = &shared.config.name;
    if let Some(key) = shared.store.proposed_key(name).await? {
        return Ok(key);
    }
    let key = keys::new_key();
    shared.store.propose_key(name, &key, now_ms()).await?;
    Ok(key)
}

/// How long a silent stream is trusted: a few keepalive intervals,
/// saturating, since the interval is the hub's to set and may be huge.
fn idle_limit(keepalive: Duration) -> Duration {
    keepalive.saturating_mul(MISSED_KEEPALIVES)
}

impl Watch for Session {
    fn run(self) -> impl Future<Output = StreamEnd> + Send {
        self.serve()
    }
}

impl Session {
    async fn serve(mut self) -> StreamEnd {
        let shared = self.shared.clone();
        let healthy = AtomicBool::new(false);
        let mut retry_after = None;
        let beat = || {
            let shared = &shared;
            let healthy = &healthy;
            async move {
                let s = shared.status.snapshot();
                let req = proto::HeartbeatRequest {
                    status: proto::SpokeStatus::from(s.spoke_status).into(),
                    status_message: s.status_message,
                    in_flight_directives: u32::try_from(s.in_flight_directives).unwrap_or(u32::MAX),
                    buffered_metric_points: s.buffered_points,
                    failed_metric_pushes: s.failed_pushes,
                    version: shared.config.version.clone(),
                };
                let reply = shared.link.heartbeat(req).await?;
                healthy.store(true, Ordering::Relaxed);
                shared
                    .status
                    .update(|s| s.last_heartbeat = Some(SystemTime::now()));
                Ok(duration(reply.next_interval.as_ref()))
            }
        };
        let heartbeats = heartbeat::run(beat, self.heartbeat, &shared.beat_now);
        tokio::pin!(heartbeats);
        let error: Error = loop {
            let idle = idle_limit(self.keepalive);
            tokio::select! {
                fatal = &mut heartbeats => break fatal.into(),
                next = tokio::time::timeout(idle, self.stream.message()) => match next {
                    Err(_) => break Status::unavailable(format!("nothing from the hub for {idle:?}; presuming the stream dead")).into(),
                    Ok(Err(status)) => break status.into(),
                    Ok(Ok(None)) => break Status::unavailable("the hub closed the directive stream").into(),
                    Ok(Ok(Some(msg))) => {
                        healthy.store(true, Ordering::Relaxed);
                        if let Some(hint) = self.handle(msg.message).await {
                            retry_after = Some(hint);
                        }
                    }
                },
            }
        };
        shared.link.disconnect();
        shared.status.update(|s| s.connected = false);
        StreamEnd {
            healthy: healthy.load(Ordering::Relaxed),
            error,
            retry_after,
        }
    }

    /// Handles one stream message; answers a `retry_after` hint if it was one.
    async fn handle(&mut self, msg: Option<Message>) -> Option<Duration> {
        match msg? {
            Message::Directive(d) => {
                if let Err(e) = self.shared.directives.receive(d).await {
                    tracing::error!(error = %e, "could not record a directive; the hub will deliver it again");
                    self.shared.status.error(&e);
                }
                None
            }
            Message::Cancelled(c) => {
                self.shared.directives.cancel(&c.directive_id, &c.reason);
                None
            }
            Message::Keepalive(_) => None,
            Message::Hints(h) => {
                self.shared
                    .endpoints
                    .offer(&h.endpoints, &self.shared.store)
                    .await;
                if let Some(k) = duration(h.keepalive_interval.as_ref()) {
                    self.keepalive = k;
                }
                if h.max_points_per_batch > 0 {
                    self.shared
                        .hub_max_batch
                        .store(h.max_points_per_batch, Ordering::Relaxed);
                }
                duration(h.retry_after.as_ref())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_keepalive_hint_saturates() {
        assert_eq!(idle_limit(Duration::from_secs(15)), Duration::from_secs(45));
        let hint = pbjson_types::Duration {
            seconds: i64::MAX,
            nanos: 999_999_999,
        };
        let huge = duration(Some(&hint)).unwrap();
        assert_eq!(idle_limit(huge), Duration::MAX);
    }
}
