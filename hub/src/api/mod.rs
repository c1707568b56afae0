//! The gRPC surface: `SpokeService` for spokes and `AdminService` for
//! operators, over one shared [`Hub`] state. Requests are converted into
//! domain values at this edge; errors leave through [`crate::error`].

pub mod acks;
pub mod admin;
pub mod spoke;

pub(crate) use acks::apply_ack;
pub(crate) use spoke::with_payloads;

use std::net::SocketAddr;
use std::sync::Arc;

use hub_proto::v1 as proto;
use tonic::metadata::MetadataMap;

use crate::auth::{TokenHash, bearer, hash_secret};
use crate::clock::Clock;
use crate::console::Sessions;
use crate::directives::CreateDefaults;
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::ledger::{Ledger, TimerPlan};
use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::spokes::{SpokeInfo, SpokeRecord};
use crate::store::Store;
use crate::telemetry::Telemetry;
use crate::wire::duration_std;

/// State shared by every call; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    sessions: Sessions,
    settings: Settings,
    admin_token: TokenHash,
    enrollment_token: TokenHash,
    shutdown: Shutdown,
    guard: Arc<Guard>,
    publisher: crate::nats::PublisherStatus,
}

/// Who is calling: the peer's address (for the failed-authentication
/// throttle) and the call's metadata (for its credentials).
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The peer's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// The call's metadata.
    pub metadata: &'a MetadataMap,
}

impl<'a> Caller<'a> {
    /// The caller of `request`.
    pub fn of<T>(request: &'a tonic::Request<T>) -> Self {
        Self {
            peer: request.remote_addr(),
            metadata: request.metadata(),
        }
    }
}

impl Hub {
    /// Assembles the shared state.
    pub fn new(
        ledger: Ledger,
        settings: Settings,
        admin_token: TokenHash,
        enrollment_token: TokenHash,
        shutdown: Shutdown,
    ) -> Self {
        let guard = Arc::new(Guard::new(&settings.guard));
        // Console sessions last as long as the admin token (across restarts).
        let sessions = Sessions::new(admin_token.derive("hub console sessions v1"));
        Self {
            inner: Arc::new(Inner {
                ledger,
                sessions,
                settings,
                admin_token,
                enrollment_token,
                shutdown,
                guard,
                publisher: Default::default(),
            }),
        }
    }

    /// What the NATS events publisher is doing.
    pub fn publisher(&self) -> &crate::nats::PublisherStatus {
        &self.inner.publisher
    }

    /// The store (for queries; writes go through the ledger).
    pub fn store(&self) -> &Store {
        self.inner.ledger.store()
    }

    /// The in-memory state every decision is made against.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// Settings.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The shutdown signal.
    pub fn shutdown(&self) -> Shutdown {
        self.inner.shutdown.clone()
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.settings.clock
    }

    /// Now, Unix ms, by the hub's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock().now_ms()
    }

    /// The hub's own metrics.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        self.inner.ledger.telemetry()
    }

    /// Signed-in admin page sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Checks an admin token presented outside gRPC (the admin page).
    pub fn is_admin_token(&self, token: &str) -> bool {
        self.inner.admin_token.matches(token)
    }

    /// The delivery timer's plan.
    pub fn timer_plan(&self) -> &TimerPlan {
        self.inner.ledger.timer_plan()
    }

    /// The connection caps and rate limits.
    pub fn guard(&self) -> &Arc<Guard> {
        &self.inner.guard
    }

    /// The spoke whose key the call carries; revoked and rotated keys are
    /// refused. Under the failed-authentication throttle.
    pub async fn authenticate_spoke(&self, caller: Caller<'_>) -> Result<Arc<SpokeInfo>> {
        self.guard().limits.auth_gate(caller.peer).await?;
        let spoke = self.counted(caller.peer, self.spoke_of(caller.metadata))?;
        // Names the spoke in this call's log lines (see telemetry).
        tracing::Span::current().record("spoke_id", tracing::field::display(spoke.id));
        Ok(spoke)
    }

    /// Who registers: `None` for the enrollment token (a new spoke), or
    /// the spoke whose key the call carries. Under the failed-authentication
    /// throttle.
    pub async fn authenticate_register(
        &self,
        caller: Caller<'_>,
    ) -> Result<Option<Arc<SpokeInfo>>> {
        self.guard().limits.auth_gate(caller.peer).await?;
        let who = self.registering(caller.metadata);
        self.counted(caller.peer, who)
    }

    fn registering(&self, metadata: &MetadataMap) -> Result<Option<Arc<SpokeInfo>>> {
        let secret = bearer(metadata)?;
        if self.inner.enrollment_token.matches(secret) {
            return Ok(None);
        }
        let unknown = Error::Unauthenticated("unknown enrollment token or spoke key");
        let spoke = self
            .ledger()
            .spoke_by_key(&hash_secret(secret))
            .ok_or(unknown)?;
        if spoke.revoked_at.is_some() {
            return Err(Error::Unauthenticated("spoke key revoked"));
        }
        Ok(Some(spoke))
    }

    fn spoke_of(&self, metadata: &MetadataMap) -> Result<Arc<SpokeInfo>> {
        let key = bearer(metadata)?;
        let spoke = self
            .ledger()
            .spoke_by_key(&hash_secret(key))
            .ok_or(Error::Unauthenticated("unknown spoke key"))?;
        if spoke.revoked_at.is_some() {
            return Err(Error::Unauthenticated("spoke key revoked"));
        }
        Ok(spoke)
    }

    /// Counts a failed credential check against the caller's address.
    fn counted<R>(&self, peer: Option<SocketAddr>, checked: Result<R>) -> Result<R> {
        if matches!(checked, Err(Error::Unauthenticated(_))) {
            self.guard().limits.auth_failed(peer);
        }
        checked
    }

    /// Whether the key hashing to `key_hash` still belongs to spoke
    /// `spoke_id` and is not revoked (for a stream that outlives the check
    /// made when it opened).
    pub fn check_key(&self, key_hash: &str, spoke_id: uuid::Uuid) -> Result<()> {
        match self.ledger().spoke_by_key(key_hash) {
            Some(spoke) if spoke.id == spoke_id && spoke.revoked_at.is_none() => Ok(()),
            Some(spoke) if spoke.id == spoke_id => Err(Error::Unauthenticated("spoke key revoked")),
            _ => Err(Error::Unauthenticated("spoke key rotated or unknown")),
        }
    }

    /// Checks the admin token of an AdminService call, under the
    /// failed-authentication throttle (refused at once: the interceptor
    /// that calls this cannot wait).
    pub fn authenticate_admin(&self, caller: Caller<'_>) -> Result<()> {
        self.guard().limits.auth_gate_now(caller.peer)?;
        let checked = bearer(caller.metadata).and_then(|token| {
            if self.inner.admin_token.matches(token) {
                Ok(())
            } else {
                Err(Error::Unauthenticated("wrong admin token"))
            }
        });
        self.counted(caller.peer, checked)
    }

    fn hints(&self, max_in_flight: u32) -> proto::HubHints {
        let s = self.settings();
        proto::HubHints {
            heartbeat_interval: Some(duration_std(s.heartbeat_interval)),
            keepalive_interval: Some(duration_std(s.keepalive_interval)),
            retry_after: None,
            max_in_flight,
            max_points_per_batch: s.max_points_per_batch,
            endpoints: s.spoke_endpoints.clone(),
        }
    }

    fn create_defaults(&self) -> CreateDefaults {
        let s = self.settings();
        CreateDefaults {
            ack_deadline_ms: i64::try_from(s.ack_deadline.as_millis()).unwrap_or(i64::MAX),
            max_attempts: s.max_attempts,
            max_payload_bytes: s.max_payload_bytes,
        }
    }

    /// The spoke in wire form, with health derived now.
    pub fn spoke_to_proto(&self, spoke: &SpokeRecord) -> proto::Spoke {
        let connected = self.ledger().is_connected(spoke.id);
        let interval =
            i64::try_from(self.settings().heartbeat_interval.as_millis()).unwrap_or(i64::MAX);
        let health = spoke.health(self.now_ms(), interval, connected);
        spoke.to_proto(health, connected)
    }
}
