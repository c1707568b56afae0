//! What the client reports about itself: the snapshot returned by
//! [`Client::status`](crate::Client::status), and the shared cell every
//! component updates (a short std mutex, never held across an `.await`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// A snapshot of the client: what a "hub status" widget shows, rendered
/// for the spoke's own admin page by [`to_json`](Self::to_json) and
/// [`to_html`](Self::to_html).
///
/// ```no_run
/// # async fn demo(client: spoke_client::Client) {
/// let s = client.status();
/// println!(
///     "connected={} in-flight={} buffered={} dropped={} last error={:?}",
///     s.connected, s.in_flight_directives, s.buffered_points, s.dropped_points, s.last_error
/// );
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// Whether a directive stream to a hub is open right now.
    pub connected: bool,
    /// The endpoint of the current (or last) connection.
    pub endpoint: Option<String>,
    /// The endpoints the client dials now, in order: the configured ones,
    /// or the ones the hub told it to use from now on (kept in the state
    /// directory; see [`ClientBuilder::endpoint_fallback_after`](crate::ClientBuilder::endpoint_fallback_after)).
    pub endpoints: Vec<String>,
    /// Whether [`endpoints`](Self::endpoints) came from the hub's hint.
    pub endpoints_from_hub: bool,
    /// When the hub last answered a heartbeat.
    pub last_heartbeat: Option<SystemTime>,
    /// Directives received and waiting for a free handler slot.
    pub pending_directives: u64,
    /// Handlers running now.
    pub in_flight_directives: u64,
    /// Metric points in the local buffer, not yet accepted by the hub.
    pub buffered_points: u64,
    /// Metric pushes that failed since the client started.
    pub failed_pushes: u64,
    /// Points dropped since the client started: the buffer overflowed (the
    /// oldest go first), the channel to the buffer was full, the hub
    /// refused a whole batch as invalid, the hub refused a point as too
    /// large even alone (it would block every point behind it), a batch
    /// had to be cut after two pushes of it went unanswered and the hub
    /// may or may not hold some of its points (dropped rather than ever
    /// counted twice), or a run ended without an outcome recorded
    /// (interrupted by shutdown, it runs again and records its points
    /// again). The log says which, at WARN or ERROR.
    pub dropped_points: u64,
    /// Points refused one by one as invalid since the client started: by
    /// the hub (each with a reason in the log), or at record time for a
    /// value that is not finite.
    pub rejected_points: u64,
    /// The latest error, if any, for display.
    pub last_error: Option<String>,
    /// Whether the hub takes this spoke's key. [`KeyState::Refused`] is
    /// where a revoked or rotated key ends: the client stops connecting
    /// and waits for a new key.
    pub key: KeyState,
    /// What the application reports in heartbeats, set with
    /// [`Client::set_status`](crate::Client::set_status).
    pub spoke_status: SpokeStatus,
    /// The message reported with it.
    pub status_message: String,
}

/// Whether the hub takes this spoke's key, in [`Status::key`].
///
/// ```no_run
/// # fn demo(client: spoke_client::Client) {
/// use spoke_client::KeyState;
///
/// if let KeyState::Refused { message } = client.status().key {
///     eprintln!("the hub refused our key ({message}): run `hub rotate-key` and install the new one");
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// No hub has answered with this key yet: before the first
    /// registration of a run, and after a new key was installed.
    #[default]
    Pending,
    /// The hub accepted the key at the latest registration.
    Accepted,
    /// The hub refused the key (UNAUTHENTICATED: it was revoked or rotated,
    /// or the state directory belongs to another hub). Terminal for this
    /// key: the client does not connect again until a new one is installed
    /// with [`Client::install_key`](crate::Client::install_key) or the
    /// `new-key` file in the state directory (after `hub rotate-key`). A
    /// revoked key never works again: the client stays here until it is
    /// shut down or given a key.
    Refused {
        /// The hub's message, e.g. "spoke key revoked".
        message: String,
    },
}

/// How the application says it is doing, reported to the hub in every
/// heartbeat (the contract's `hub.v1.SpokeStatus`) and shown to operators
/// by `GetSpoke`, `hub spokes` and the admin page.
///
/// ```no_run
/// # fn demo(client: spoke_client::Client) {
/// use spoke_client::SpokeStatus;
///
/// client.set_status(SpokeStatus::Degraded, "disk 91% full");
/// // ... later ...
/// client.set_status(SpokeStatus::Ok, "");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SpokeStatus {
    /// Working normally (the default).
    #[default]
    Ok,
    /// Working, but something is impaired (say what in the message).
    Degraded,
    /// Cannot do its work (say why in the message).
    Error,
}

impl From<SpokeStatus> for hub_proto::v1::SpokeStatus {
    fn from(status: SpokeStatus) -> Self {
        match status {
            SpokeStatus::Ok => Self::Ok,
            SpokeStatus::Degraded => Self::Degraded,
            SpokeStatus::Error => Self::Error,
        }
    }
}

/// The live status, shared by every component; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Tracker {
    inner: Arc<Mutex<Status>>,
}

impl Tracker {
    /// Changes the status under the lock.
    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> Status {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records `error` as the latest error.
    pub fn error(&self, error: impl ToString) {
        let text = error.to_string();
        self.update(|s| s.last_error = Some(text));
    }
}
