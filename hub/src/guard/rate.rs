//! Budgets (GCRA, with `governor`): calls per spoke, failed
//! authentications per peer address, and enrollments.
//!
//! A call over its budget is not refused at once: it waits up to
//! `rate_limit_wait` for room, and only then is answered
//! RESOURCE_EXHAUSTED with a retry-after hint ([`Error::RateLimited`]). A
//! well-behaved spoke that bursts a little sees a short delay, never an
//! error; a flooding one gets at most its budget through, and each of its
//! concurrent loops at most one refusal per wait, so refusing it costs the
//! hub next to nothing.
//!
//! Failed authentications are counted per peer address (IPv6 per /64, as
//! one host usually holds a whole /64); past the limit the address is
//! refused without a check until its budget has room again.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use tokio::time::Instant;
use uuid::Uuid;

use futures_util::StreamExt;
use hub_proto::v1 as proto;
use tonic::{Code, Status};

use super::{GuardSettings, Tally};
use crate::api::acks::AckAnswers;
use crate::error::{Error, Result};

/// The hub's clock for budgets: Tokio's, so tests with paused time are
/// deterministic.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Keyed<K> = RateLimiter<K, HashMapStateStore<K>, TokioClock, NoOpMiddleware<Duration>>;
type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// The budgets of one hub.
#[derive(Debug)]
pub struct Limits {
    clock: TokioClock,
    wait: Duration,
    spoke_quota: String,
    spokes: Keyed<Uuid>,
    enrollment_quota: String,
    enrollments: Direct,
    failures: FailureThrottle,
    refused_calls: Tally,
    refused_enrollments: Tally,
    failed_auth: Tally,
    throttled_auth: Tally,
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limits {
    /// Budgets as `settings` say.
    pub fn new(settings: &GuardSettings) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let spoke = Quota::per_second(nonzero(settings.spoke_rate))
            .allow_burst(nonzero(settings.spoke_burst));
        let enroll = Quota::per_minute(nonzero(settings.enrollments_per_minute))
            .allow_burst(nonzero(settings.enrollment_burst));
        let limit = settings.auth_failure_limit.max(1);
        let window = settings.auth_failure_window;
        Self {
            wait: settings.rate_limit_wait,
            spoke_quota: format!(
                "{}/s, burst {} (--spoke-rate, --spoke-burst)",
                settings.spoke_rate, settings.spoke_burst
            ),
            spokes: RateLimiter::hashmap_with_clock(spoke, clock.clone()),
            enrollment_quota: format!(
                "{}/min, burst {} (--enrollments-per-minute, --enrollment-burst)",
                settings.enrollments_per_minute, settings.enrollment_burst
            ),
            enrollments: RateLimiter::direct_with_clock(enroll, clock.clone()),
            failures: FailureThrottle {
                period: (window / limit).max(Duration::from_nanos(1)),
                window,
                due: Mutex::new(HashMap::new()),
            },
            refused_calls: Tally::new("calls refused by the per-spoke rate limit"),
            refused_enrollments: Tally::new("enrollments refused by the enrollment rate limit"),
            failed_auth: Tally::new("failed authentications"),
            throttled_auth: Tally::new(
                "calls refused unchecked: too many failed authentications from their address",
            ),
            clock,
        }
    }

    /// Takes one call from `spoke`'s budget, waiting for room up to the
    /// configured wait.
    pub async fn spoke_call(&self, spoke: Uuid) -> Result<()> {
        match self.acquire(|| self.spokes.check_key(&spoke)).await {
            Ok(()) => Ok(()),
            Err(retry_after) => {
                self.refused_calls.add(format_args!("spoke {spoke}"));
                Err(Error::RateLimited {
                    what: format!(
                        "this spoke's calls are over its budget of {}",
                        self.spoke_quota
                    ),
                    retry_after,
                })
            }
        }
    }

    /// Takes one enrollment (a new spoke) from the hub's budget.
    pub async fn enrollment(&self, peer: Option<SocketAddr>) -> Result<()> {
        match self.acquire(|| self.enrollments.check()).await {
            Ok(()) => Ok(()),
            Err(retry_after) => {
                self.refused_enrollments.add(Offender(peer));
                Err(Error::RateLimited {
                    what: format!(
                        "enrollments are over the hub's budget of {}",
                        self.enrollment_quota
                    ),
                    retry_after,
                })
            }
        }
    }

    /// Lets a credential check from `peer` go ahead, unless the address
    /// failed too often: then refuses it, after holding it for as long as
    /// the block lasts, at most the configured wait.
    pub async fn auth_gate(&self, peer: Option<SocketAddr>) -> Result<()> {
        let Some(until) = self.blocked_until(peer) else {
            return Ok(());
        };
        let left = until.saturating_sub(self.clock.now());
        tokio::time::sleep(left.min(self.wait)).await;
        self.auth_gate_now(peer)
    }

    /// [`Limits::auth_gate`] without the hold (for a caller that cannot
    /// wait: the AdminService interceptor).
    pub fn auth_gate_now(&self, peer: Option<SocketAddr>) -> Result<()> {
        let Some(until) = self.blocked_until(peer) else {
            return Ok(());
        };
        self.throttled_auth.add(Offender(peer));
        Err(Error::RateLimited {
            what: "too many failed authentications from this address".into(),
            retry_after: until.saturating_sub(self.clock.now()),
        })
    }

    /// Counts a failed credential check from `peer`.
    pub fn auth_failed(&self, peer: Option<SocketAddr>) {
        self.failed_auth.add(Offender(peer));
        self.failures.failed(address_key(peer), self.clock.now());
    }

    /// Until when `peer` is refused unchecked, if it is.
    fn blocked_until(&self, peer: Option<SocketAddr>) -> Option<Duration> {
        self.failures
            .blocked_until(address_key(peer), self.clock.now())
    }

    /// Waits for `check` to pass, at most the configured wait; the time
    /// until it would pass otherwise.
    async fn acquire(
        &self,
        check: impl Fn() -> Result<(), NotUntil<Duration>>,
    ) -> Result<(), Duration> {
        let deadline = Instant::now() + self.wait;
        loop {
            let not_until = match check() {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until,
            };
            let retry_after = not_until.wait_time_from(self.clock.now());
            let now = Instant::now();
            if now >= deadline {
                return Err(retry_after.max(Duration::from_millis(1)));
            }
            // At least a millisecond (no busy loop), at most what is left
            // of the wait (which may be less than a millisecond).
            let nap = retry_after
                .max(Duration::from_millis(1))
                .min(deadline - now);
            tokio::time::sleep(nap).await;
        }
    }

    /// Forgets budgets that are full again and blocks that ended, and logs
    /// the refusals a quiet spell left unlogged (run every
    /// [`super::LOG_INTERVAL`]).
    pub fn maintain(&self) {
        self.spokes.retain_recent();
        self.spokes.shrink_to_fit();
        self.failures.forget_old(self.clock.now());
        for tally in [
            &self.refused_calls,
            &self.refused_enrollments,
            &self.failed_auth,
            &self.throttled_auth,
        ] {
            tally.flush();
        }
    }
}

/// Whether an ack the hub refused was the caller's fault (an ack of a
/// directive not delivered to it, in a state that takes no ack, or
/// malformed): such acks are charged to the spoke's budget, acks of
/// directives delivered to it are free.
pub fn is_refused_ack(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument { .. }
            | Error::NotFound(_)
            | Error::AlreadyExists(_)
            | Error::FailedPrecondition(_)
    )
}

/// Whether an AckStream answer costs the spoke a call: a refused ack (as
/// [`is_refused_ack`]) or a progress report.
fn is_charged_answer(answer: &proto::AckStreamResponse) -> bool {
    use proto::ack_stream_response::Outcome;
    match &answer.outcome {
        Some(Outcome::Ack(ack)) => ack.state == proto::DirectiveState::InProgress as i32,
        Some(Outcome::Error(e)) => matches!(
            Code::from_i32(e.code),
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition
        ),
        None => false,
    }
}

/// Charges `spoke` one call per refused ack or progress report among the
/// `answers` of its AckStream, each before it is sent. While the budget
/// has no room the answers wait, and with them (through the stream's
/// buffers and HTTP/2 flow control) the spoke's further acks; if there is
/// still none after the wait, the stream ends RESOURCE_EXHAUSTED.
pub fn charge_ack_answers(
    guard: std::sync::Arc<super::Guard>,
    spoke: Uuid,
    answers: AckAnswers,
) -> AckAnswers {
    enum State {
        Open(AckAnswers),
        End(Status),
        Done,
    }
    Box::pin(futures_util::stream::unfold(
        State::Open(answers),
        move |state| {
            let guard = guard.clone();
            async move {
                match state {
                    State::Done => None,
                    State::End(status) => Some((Err(status), State::Done)),
                    State::Open(mut answers) => {
                        let item = answers.next().await?;
                        let next = match &item {
                            Ok(answer) if is_charged_answer(answer) => {
                                match guard.limits.spoke_call(spoke).await {
                                    Ok(()) => State::Open(answers),
                                    Err(e) => State::End(e.into()),
                                }
                            }
                            _ => State::Open(answers),
                        };
                        Some((item, next))
                    }
                }
            }
        },
    ))
}

/// Failed authentications per address, as a GCRA of its own (governor has
/// no way to look without taking, and the gate must only look): each
/// failure pushes the address's due time `period` (window ÷ limit) further;
/// the address is refused while its due time is more than `window −
/// period` ahead, that is right after `limit` failures in a row, and then
/// may try once more per `period`.
#[derive(Debug)]
struct FailureThrottle {
    period: Duration,
    window: Duration,
    due: Mutex<HashMap<IpAddr, Duration>>,
}

impl FailureThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Duration>> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slack(&self) -> Duration {
        self.window.saturating_sub(self.period)
    }

    fn failed(&self, key: IpAddr, now: Duration) {
        let mut due = self.lock();
        let at = due.entry(key).or_insert(now);
        *at = (*at).max(now) + self.period;
    }

    fn blocked_until(&self, key: IpAddr, now: Duration) -> Option<Duration> {
        let until = self.lock().get(&key)?.saturating_sub(self.slack());
        (until > now).then_some(until)
    }

    /// Addresses whose failures are all forgiven.
    fn forget_old(&self, now: Duration) {
        let mut due = self.lock();
        due.retain(|_, at| *at > now);
        due.shrink_to_fit();
    }
}

/// A peer address for a log line.
struct Offender(Option<SocketAddr>);

impl std::fmt::Display for Offender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{}", addr.ip()),
            None => f.write_str("unknown address"),
        }
    }
}

/// The key failed authentications are counted under: the IPv4 address, or
/// the /64 of an IPv6 one.
fn address_key(peer: Option<SocketAddr>) -> IpAddr {
    match peer.map(|p| p.ip()) {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V4(v4)) => IpAddr::V4(v4),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GuardSettings {
        GuardSettings {
            spoke_rate: 10,
            spoke_burst: 2,
            rate_limit_wait: Duration::from_millis(50),
            auth_failure_limit: 3,
            auth_failure_window: Duration::from_secs(60),
            enrollments_per_minute: 60,
            enrollment_burst: 1,
            ..GuardSettings::default()
        }
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_spoke_over_its_budget_waits_then_is_refused_with_a_hint() {
        let limits = Limits::new(&settings());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        limits.spoke_call(a).await.unwrap();
        limits.spoke_call(a).await.unwrap();
        // The third waits for the next slot (100 ms at 10/s): longer than
        // the 50 ms wait, so it is refused after the wait.
        let start = Instant::now();
        let err = limits.spoke_call(a).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        match err {
            Error::RateLimited { retry_after, what } => {
                assert_eq!(retry_after, Duration::from_millis(50));
                assert!(what.contains("--spoke-rate"), "{what}");
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        // Another spoke has its own budget.
        limits.spoke_call(b).await.unwrap();
        // Once the slot is there, the call goes through after a short wait.
        tokio::time::advance(Duration::from_millis(20)).await;
        let start = Instant::now();
        limits.spoke_call(a).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_of_less_than_a_millisecond_is_kept() {
        // Found by the benchmark's flood: the last nap of a wait can be
        // shorter than the shortest nap.
        let limits = Limits::new(&GuardSettings {
            rate_limit_wait: Duration::from_micros(500),
            ..settings()
        });
        let spoke = Uuid::now_v7();
        limits.spoke_call(spoke).await.unwrap();
        limits.spoke_call(spoke).await.unwrap();
        let start = Instant::now();
        assert!(limits.spoke_call(spoke).await.is_err());
        // Tokio's timers count whole milliseconds.
        assert!(start.elapsed() <= Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_authentications_block_the_address_not_others() {
        let limits = Limits::new(&settings());
        let attacker = peer("192.0.2.7:4000");
        for _ in 0..3 {
            limits.auth_gate(attacker).await.unwrap();
            limits.auth_failed(attacker);
        }
        // The fourth attempt is refused unchecked, from any port of that
        // host, until one failure's worth (window ÷ limit) has passed.
        match limits.auth_gate_now(peer("192.0.2.7:4001")).unwrap_err() {
            Error::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(20));
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        assert!(limits.auth_gate_now(peer("192.0.2.8:4000")).is_ok());
        // A blocked call is held for the wait before it is refused.
        let start = Instant::now();
        assert!(limits.auth_gate(attacker).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        // Then one more try per 20 s.
        tokio::time::advance(Duration::from_secs(20)).await;
        limits.maintain();
        assert!(limits.auth_gate_now(attacker).is_ok());
        limits.auth_failed(attacker);
        assert!(limits.auth_gate_now(attacker).is_err());
        // A minute without failures forgives them all.
        tokio::time::advance(Duration::from_secs(60)).await;
        limits.maintain();
        for _ in 0..3 {
            assert!(limits.auth_gate_now(attacker).is_ok());
            limits.auth_failed(attacker);
        }
        assert!(limits.auth_gate_now(attacker).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn enrollments_have_one_budget_for_the_hub() {
        let limits = Limits::new(&settings());
        limits.enrollment(peer("192.0.2.1:1")).await.unwrap();
        let err = limits.enrollment(peer("192.0.2.2:1")).await.unwrap_err();
        match err {
            Error::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_millis(950));
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    #[test]
    fn ipv6_peers_share_their_slash_64() {
        let a = address_key(peer("[2001:db8:1:2:aaaa::1]:1"));
        let b = address_key(peer("[2001:db8:1:2:bbbb::2]:1"));
        let c = address_key(peer("[2001:db8:1:3::1]:1"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = address_key(peer("[::ffff:192.0.2.1]:1"));
        assert_eq!(mapped, "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
