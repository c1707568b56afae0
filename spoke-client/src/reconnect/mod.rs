//! Reconnection as an explicit state machine with one step function:
//! `Connect` (dial an endpoint, register, open the directive stream) →
//! `Watch` (the stream is open) → `Wait` (back off) → `Connect` … until a
//! fatal error. A spoke key the hub refuses (UNAUTHENTICATED: revoked or
//! rotated) is not fatal but terminal for that key: `AwaitKey` waits,
//! without dialing, until a new key is installed, then connects at once. [`classify`] is the one place that decides which gRPC codes
//! are fatal and which are retried.
//!
//! Failover: each failure moves to the next endpoint; within a round of
//! endpoints the next one is tried at once, and only after every endpoint
//! failed in a row does the client wait its [`Backoff`] delay. A stream that
//! proved healthy (a message arrived or a heartbeat was answered) resets the
//! backoff. A `retry_after` hint from the hub is a floor on the next wait,
//! honoured up to [`MAX_RETRY_AFTER`]: a huge hint must not strand a spoke.
//!
//! Which list of endpoints is dialed is the `Route`'s choice (see
//! `endpoints`): the configured list, or the one the hub told the client to
//! use, with a fallback from either to the other when it does not answer
//! for a while. A wait never runs past that fallback, and a code that would
//! be fatal from a configured endpoint only counts as a failed attempt from
//! a hinted one: a hint must never be able to stop a spoke.

use std::future::Future;
use std::time::Duration;

use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::endpoints::{Endpoints, Route};
use crate::error::{Error, Result};
use crate::status::{KeyState, Tracker};

/// The longest `retry_after` hint honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// What to do about a gRPC code from the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Retrying (after backoff) may succeed.
    Retry,
    /// Retrying cannot succeed: stop and report.
    Fatal,
}

/// Whether a failed call to the hub is worth retrying.
///
/// Fatal: UNAUTHENTICATED and PERMISSION_DENIED (revoked, rotated or wrong
/// key; when a spoke key is refused the client does not stop but waits for
/// a new one, see [`crate::keys`]), INVALID_ARGUMENT (the registration itself is refused: fix the
/// configuration), ALREADY_EXISTS (the name is taken and this state
/// directory has no key for it), UNIMPLEMENTED (not a hub). Everything else
/// (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED when a newer
/// stream took over, INTERNAL, UNKNOWN transport failures, …) is retried.
///
/// ```
/// use spoke_client::{Disposition, classify};
/// use tonic::Code;
///
/// assert_eq!(classify(Code::Unavailable), Disposition::Retry);
/// assert_eq!(classify(Code::Unauthenticated), Disposition::Fatal);
/// ```
pub fn classify(code: Code) -> Disposition {
    match code {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::Unimplemented => Disposition::Fatal,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => Disposition::Retry,
    }
}

/// The error that stops the client for a fatal status.
fn fatal(status: &Status) -> Error {
    match status.code() {
        Code::Unauthenticated => Error::Unauthenticated {
            message: status.message().to_owned(),
        },
        code => Error::Refused {
            code,
            message: status.message().to_owned(),
        },
    }
}

/// How a directive stream ended.
#[derive(Debug)]
pub(crate) struct StreamEnd {
    /// A message arrived or a heartbeat was answered while it was open.
    pub healthy: bool,
    /// Why it ended.
    pub error: Error,
    /// The hub's latest `retry_after` hint on that stream.
    pub retry_after: Option<Duration>,
}

/// Opens a connection to one endpoint: connect, register, open the stream.
pub(crate) trait Dial {
    /// An open directive stream.
    type Stream: Watch + Send;
    /// Tries `endpoint`.
    fn open(&mut self, endpoint: &str) -> impl Future<Output = Result<Self::Stream>> + Send;
    /// Whether the attempts use a spoke key (not the enrollment token): a
    /// refused key can be replaced, a refused enrollment token is a
    /// configuration mistake.
    fn holds_key(&self) -> bool;
    /// Completes once a key newer than the one the latest attempt used is
    /// installed.
    fn new_key(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// An open directive stream.
pub(crate) trait Watch {
    /// Serves the stream until it ends.
    fn run(self) -> impl Future<Output = StreamEnd> + Send;
}

/// The machine's states.
pub(crate) enum State<S> {
    /// Try the current endpoint.
    Connect,
    /// The stream is open.
    Watch(S),
    /// Wait, then connect.
    Wait(Duration),
    /// The hub refused the spoke key: wait for a new one, then connect.
    AwaitKey,
}

/// The reconnect loop.
pub(crate) struct Machine<D: Dial> {
    dial: D,
    route: Route,
    backoff: Backoff,
    cursor: usize,
    failed_in_round: usize,
    status: Tracker,
}

impl<D: Dial> Machine<D> {
    pub fn new(dial: D, endpoints: Endpoints, backoff: Backoff, status: Tracker) -> Self {
        Self {
            dial,
            route: Route::new(endpoints),
            backoff,
            cursor: 0,
            failed_in_round: 0,
            status,
        }
    }

    /// Runs until a fatal error, which it returns.
    pub async fn run(mut self) -> Error {
        let mut state = State::Connect;
        loop {
            state = match self.step(state).await {
                Ok(next) => next,
                Err(fatal) => {
                    tracing::error!(error = %fatal, "giving up on the hub");
                    self.status.error(&fatal);
                    return fatal;
                }
            };
        }
    }

    /// One transition.
    pub async fn step(&mut self, state: State<D::Stream>) -> Result<State<D::Stream>> {
        match state {
            State::Connect => {
                if self.route.before_attempt() {
                    self.cursor = 0;
                    self.failed_in_round = 0;
                }
                let endpoint = self.route.list()[self.cursor].clone();
                match self.dial.open(&endpoint).await {
                    Ok(stream) => {
                        self.route.connected();
                        tracing::info!(%endpoint, hinted = self.route.on_hint(), "connected to the hub");
                        Ok(State::Watch(stream))
                    }
                    Err(e) => self.after_failure(e, None),
                }
            }
            State::Watch(stream) => {
                let end = stream.run().await;
                if end.healthy {
                    self.backoff.reset();
                    self.failed_in_round = 0;
                }
                self.after_failure(end.error, end.retry_after)
            }
            State::Wait(delay) => {
                tokio::time::sleep(delay).await;
                Ok(State::Connect)
            }
            State::AwaitKey => {
                self.dial.new_key().await?;
                tracing::info!("a new spoke key is installed; connecting");
                // A fresh start with a fresh key.
                self.backoff.reset();
                self.failed_in_round = 0;
                Ok(State::Connect)
            }
        }
    }

    /// Decides what follows a failed attempt or an ended stream.
    fn after_failure(
        &mut self,
        error: Error,
        retry_after: Option<Duration>,
    ) -> Result<State<D::Stream>> {
        let status = match error {
            Error::Status(status) => status,
            other => return Err(other),
        };
        if status.code() == Code::Unauthenticated && !self.route.on_hint() && self.dial.holds_key()
        {
            let message = status.message().to_owned();
            let error = fatal(&status);
            tracing::error!(%error, "the hub refused this spoke's key; waiting for a new one (Client::install_key, or the new-key file in the state directory)");
            self.status.update(|s| {
                s.connected = false;
                s.last_error = Some(error.to_string());
                s.key = KeyState::Refused { message };
            });
            return Ok(State::AwaitKey);
        }
        if classify(status.code()) == Disposition::Fatal {
            if !self.route.on_hint() {
                return Err(fatal(&status));
            }
            // The configured endpoints, tried after the fallback time, have
            // the last word on whether this spoke may connect.
            tracing::error!(error = %status, "an endpoint the hub named refused this spoke; counting it as unreachable");
        }
        self.status.update(|s| {
            s.connected = false;
            s.last_error = Some(status.to_string());
        });
        let n = self.route.list().len();
        self.cursor = (self.cursor + 1) % n;
        self.failed_in_round += 1;
        let mut delay = Duration::ZERO;
        if self.failed_in_round >= n {
            self.failed_in_round = 0;
            delay = self.backoff.next_delay();
        }
        if let Some(left) = self.route.time_left() {
            delay = delay.min(left);
        }
        if let Some(floor) = retry_after {
            delay = delay.max(floor.min(MAX_RETRY_AFTER));
        }
        tracing::warn!(error = %status, next = %self.route.list()[self.cursor], ?delay, "hub connection failed; retrying");
        Ok(State::Wait(delay))
    }
}

#[cfg(test)]
mod tests;
