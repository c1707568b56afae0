//! Reconnection as an explicit state machine with one step function:
//! `Connect` (dial an endpoint, register, open the directive stream) →
//! `Watch` (the stream is open) → `Wait` (back off) → `Connect` … until a
//! fatal error. [`classify`] is the one place that decides which gRPC codes
//! are fatal and which are retried.
//!
//! Failover: each failure moves to the next endpoint; within a round of
//! endpoints the next one is tried at once, and only after every endpoint
//! failed in a row does the client wait its [`Backoff`] delay. A stream that
//! proved healthy (a message arrived or a heartbeat was answered) resets the
//! backoff. A `retry_after` hint from the hub is a floor on the next wait,
//! honoured up to [`MAX_RETRY_AFTER`]: a huge hint must not strand a spoke.

use std::future::Future;
use std::time::Duration;

use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::status::Tracker;

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
/// key), INVALID_ARGUMENT (the registration itself is refused: fix the
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
}

/// The reconnect loop.
pub(crate) struct Machine<D: Dial> {
    dial: D,
    endpoints: Vec<String>,
    backoff: Backoff,
    cursor: usize,
    failed_in_round: usize,
    status: Tracker,
}

impl<D: Dial> Machine<D> {
    pub fn new(dial: D, endpoints: Vec<String>, backoff: Backoff, status: Tracker) -> Self {
        assert!(!endpoints.is_empty(), "the builder requires an endpoint");
        Self {
            dial,
            endpoints,
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
                let endpoint = self.endpoints[self.cursor].clone();
                match self.dial.open(&endpoint).await {
                    Ok(stream) => {
                        tracing::info!(%endpoint, "connected to the hub");
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
        if classify(status.code()) == Disposition::Fatal {
            return Err(fatal(&status));
        }
        self.status.update(|s| {
            s.connected = false;
            s.last_error = Some(status.to_string());
        });
        let n = self.endpoints.len();
        self.cursor = (self.cursor + 1) % n;
        self.failed_in_round += 1;
        let mut delay = Duration::ZERO;
        if self.failed_in_round >= n {
            self.failed_in_round = 0;
            delay = self.backoff.next_delay();
        }
        if let Some(floor) = retry_after {
            delay = delay.max(floor.min(MAX_RETRY_AFTER));
        }
        tracing::warn!(error = %status, next = %self.endpoints[self.cursor], ?delay, "hub connection failed; retrying");
        Ok(State::Wait(delay))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;

    use super::*;

    /// What a scripted attempt does.
    enum Script {
        Refuse(Code),
        /// Opens a stream that ends with this code, healthy or not, with an
        /// optional retry hint.
        Stream(bool, Code, Option<Duration>),
    }

    #[derive(Clone)]
    struct Fake {
        script: Arc<Mutex<VecDeque<Script>>>,
        attempts: Arc<Mutex<Vec<(String, Duration)>>>,
        start: Instant,
    }

    struct FakeStream(bool, Code, Option<Duration>);

    impl Dial for Fake {
        type Stream = FakeStream;
        fn open(&mut self, endpoint: &str) -> impl Future<Output = Result<FakeStream>> + Send {
            self.attempts
                .lock()
                .unwrap()
                .push((endpoint.to_owned(), self.start.elapsed()));
            let next = self.script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(Script::Refuse(code)) => Err(Status::new(code, "scripted").into()),
                    Some(Script::Stream(healthy, code, hint)) => {
                        Ok(FakeStream(healthy, code, hint))
                    }
                    None => Err(Status::unauthenticated("script over").into()),
                }
            }
        }
    }

    impl Watch for FakeStream {
        async fn run(self) -> StreamEnd {
            StreamEnd {
                healthy: self.0,
                error: Status::new(self.1, "stream ended").into(),
                retry_after: self.2,
            }
        }
    }

    /// Runs the machine over a script; answers the fatal error and every
    /// attempt as (endpoint, seconds since start).
    async fn play(endpoints: &[&str], script: Vec<Script>) -> (Error, Vec<(String, f64)>) {
        let fake = Fake {
            script: Arc::new(Mutex::new(script.into())),
            attempts: Arc::default(),
            start: Instant::now(),
        };
        let backoff =
            Backoff::new(Duration::from_secs(1), 1.6, 0.0, Duration::from_secs(120)).unwrap();
        let endpoints = endpoints.iter().map(|e| e.to_string()).collect();
        let machine = Machine::new(fake.clone(), endpoints, backoff, Tracker::default());
        let fatal = machine.run().await;
        let attempts = fake
            .attempts
            .lock()
            .unwrap()
            .iter()
            .map(|(e, d)| (e.clone(), (d.as_secs_f64() * 1000.0).round() / 1000.0))
            .collect();
        (fatal, attempts)
    }

    fn at(endpoint: &str, secs: f64) -> (String, f64) {
        (endpoint.to_owned(), secs)
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_exponentially_and_resets_after_a_healthy_stream() {
        let (fatal, attempts) = play(
            &["a"],
            vec![
                Script::Refuse(Code::Unavailable),
                Script::Refuse(Code::Unavailable),
                Script::Refuse(Code::DeadlineExceeded),
                Script::Stream(true, Code::Unavailable, None),
                Script::Refuse(Code::Unavailable),
                Script::Stream(false, Code::Aborted, None),
            ],
        )
        .await;
        assert_eq!(
            attempts,
            vec![
                at("a", 0.0),
                at("a", 1.0),
                at("a", 2.6),
                at("a", 5.16),
                at("a", 6.16),
                at("a", 7.76),
                at("a", 10.32)
            ]
        );
        assert!(matches!(fatal, Error::Unauthenticated { .. }), "{fatal:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn fails_over_at_once_and_backs_off_after_a_full_round() {
        let (_, attempts) = play(
            &["a", "b"],
            vec![
                Script::Refuse(Code::Unavailable),
                Script::Refuse(Code::Unavailable),
                Script::Refuse(Code::Unavailable),
                Script::Stream(true, Code::Unavailable, None),
            ],
        )
        .await;
        assert_eq!(
            attempts,
            vec![
                at("a", 0.0),
                at("b", 0.0),
                at("a", 1.0),
                at("b", 1.0),
                at("a", 1.0)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_hint_is_a_floor_on_the_wait() {
        let (_, attempts) = play(
            &["a"],
            vec![Script::Stream(
                true,
                Code::Unavailable,
                Some(Duration::from_secs(30)),
            )],
        )
        .await;
        assert_eq!(attempts, vec![at("a", 0.0), at("a", 30.0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_retry_hint_is_capped() {
        let huge = Duration::from_secs(u64::MAX);
        let (_, attempts) = play(
            &["a"],
            vec![Script::Stream(true, Code::Unavailable, Some(huge))],
        )
        .await;
        let capped = MAX_RETRY_AFTER.as_secs_f64();
        assert_eq!(attempts, vec![at("a", 0.0), at("a", capped)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_code_stops_at_once_with_a_clear_error() {
        let (fatal, attempts) =
            play(&["a", "b"], vec![Script::Refuse(Code::Unauthenticated)]).await;
        assert_eq!(attempts.len(), 1);
        assert!(fatal.to_string().contains("credentials"), "{fatal}");
        let (fatal, _) = play(
            &["a"],
            vec![Script::Stream(true, Code::PermissionDenied, None)],
        )
        .await;
        assert!(matches!(
            fatal,
            Error::Refused {
                code: Code::PermissionDenied,
                ..
            }
        ));
    }

    #[test]
    fn classification_of_every_code() {
        use Disposition::{Fatal, Retry};
        let table = [
            (Code::Unauthenticated, Fatal),
            (Code::PermissionDenied, Fatal),
            (Code::InvalidArgument, Fatal),
            (Code::AlreadyExists, Fatal),
            (Code::Unimplemented, Fatal),
            (Code::Unavailable, Retry),
            (Code::DeadlineExceeded, Retry),
            (Code::ResourceExhausted, Retry),
            (Code::Aborted, Retry),
            (Code::Internal, Retry),
            (Code::Unknown, Retry),
            (Code::Cancelled, Retry),
            (Code::NotFound, Retry),
        ];
        for (code, want) in table {
            assert_eq!(classify(code), want, "{code:?}");
        }
    }
}
