//! What keeps one client from taking the hub down: a cap on open
//! connections per port and a deadline for a connection's first request
//! ([`conn`], told about requests by the layers of [`activity`]), per-spoke call budgets, a per-address throttle of failed
//! authentications and a budget of enrollments ([`rate`]). Refusals are
//! logged in aggregate, one line per kind per [`LOG_INTERVAL`], never one
//! line per refusal: a flood must not become a flood of log lines.
//!
//! [`GuardArgs`] are the flags of `hub serve` (flattened into
//! `config::ServeArgs`), validated into [`GuardSettings`].

pub mod activity;
pub mod conn;
pub mod rate;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use tokio::time::Instant;

use crate::config::ConfigError;

pub use conn::ConnLimit;
pub use rate::Limits;

/// At most one log line per kind of refusal in this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// File descriptors kept free for everything but connections (the
/// database and its WAL, logs, the listeners, TLS files).
const RESERVED_FILES: u64 = 256;

/// The guards of one running hub (part of `api::Hub`).
#[derive(Debug)]
pub struct Guard {
    /// Budgets of calls, enrollments and failed authentications.
    pub limits: Limits,
    /// The gRPC port's connections.
    pub grpc: ConnLimit,
    /// The HTTP port's connections.
    pub http: ConnLimit,
}

impl Guard {
    /// Guards as `settings` say.
    pub fn new(settings: &GuardSettings) -> Self {
        Self {
            limits: Limits::new(settings),
            grpc: ConnLimit::grpc(settings.max_grpc_connections, settings.idle_timeout),
            http: ConnLimit::http(settings.max_http_connections, settings.idle_timeout),
        }
    }

    /// Every [`LOG_INTERVAL`] until `shutdown`: forgets what no longer
    /// needs remembering and logs refusals a quiet spell left unlogged.
    pub async fn run_maintenance(
        self: std::sync::Arc<Self>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let mut every = tokio::time::interval(LOG_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    self.limits.maintain();
                    self.grpc.maintain();
                    self.http.maintain();
                }
                () = shutdown.wait() => return,
            }
        }
    }
}

/// The limits, as validated by `config` (tests construct them directly).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardSettings {
    /// Most open connections on the gRPC port; more are closed at once.
    pub max_grpc_connections: usize,
    /// Most open connections on the HTTP port.
    pub max_http_connections: usize,
    /// A connection that has not delivered a complete request this long
    /// after it opened (TLS handshake, HTTP/2 preface and request headers
    /// included) is closed; on the HTTP port also a connection idle this
    /// long between requests.
    pub idle_timeout: Duration,
    /// Calls per second a spoke may make, sustained.
    pub spoke_rate: u32,
    /// Calls a spoke may make at once above its sustained rate.
    pub spoke_burst: u32,
    /// How long a call over its budget waits for room before it is refused
    /// with RESOURCE_EXHAUSTED (zero: refused at once).
    pub rate_limit_wait: Duration,
    /// Failed authentications per peer address per `auth_failure_window`;
    /// past them the address is refused without a check.
    pub auth_failure_limit: u32,
    /// The window of `auth_failure_limit`.
    pub auth_failure_window: Duration,
    /// New spokes per minute through the enrollment token, sustained.
    pub enrollments_per_minute: u32,
    /// New spokes at once above that rate.
    pub enrollment_burst: u32,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            max_grpc_connections: 16_384,
            max_http_connections: 512,
            idle_timeout: Duration::from_secs(10),
            spoke_rate: 50,
            spoke_burst: 100,
            rate_limit_wait: Duration::from_secs(1),
            auth_failure_limit: 20,
            auth_failure_window: Duration::from_secs(60),
            enrollments_per_minute: 600,
            enrollment_burst: 100,
        }
    }
}

impl GuardSettings {
    /// Lowers the connection caps so that both ports at their caps stay
    /// within `open_files` (the process's limit, after `hub serve` raised
    /// it): past the limit `accept` fails for everyone, while a refused
    /// connection costs nothing. Returns what was lowered, for a warning.
    pub fn fit_open_files(&mut self, open_files: u64) -> Option<String> {
        let budget =
            usize::try_from(open_files.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
        let wanted = self
            .max_grpc_connections
            .saturating_add(self.max_http_connections);
        if wanted <= budget {
            return None;
        }
        let before = (self.max_grpc_connections, self.max_http_connections);
        self.max_http_connections = self.max_http_connections.min((budget / 8).max(1));
        self.max_grpc_connections = budget.saturating_sub(self.max_http_connections).max(1);
        Some(format!(
            "the open-files limit is {open_files}: --max-grpc-connections lowered from {} to {}, \
             --max-http-connections from {} to {} (raise the hard limit, e.g. LimitNOFILE=, to allow more)",
            before.0, self.max_grpc_connections, before.1, self.max_http_connections
        ))
    }
}

/// The flags of the limits (part of `hub serve`).
#[derive(Debug, Args)]
pub struct GuardArgs {
    /// Most open connections on the gRPC port; further ones are closed at
    /// once (lowered at start to fit the open-files limit).
    #[arg(long, env = "HUB_MAX_GRPC_CONNECTIONS", default_value_t = 16_384)]
    pub max_grpc_connections: usize,
    /// Most open connections on the HTTP port.
    #[arg(long, env = "HUB_MAX_HTTP_CONNECTIONS", default_value_t = 512)]
    pub max_http_connections: usize,
    /// Closes a connection that sends no complete request this long after
    /// opening (TLS handshake, HTTP/2 preface, headers), and an HTTP-port
    /// connection idle this long between requests.
    #[arg(long, env = "HUB_IDLE_CONNECTION_TIMEOUT", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub idle_connection_timeout: Duration,
    /// Calls per second each spoke may make, sustained (acks of directives
    /// delivered to it are free).
    #[arg(long, env = "HUB_SPOKE_RATE", default_value_t = 50)]
    pub spoke_rate: u32,
    /// Calls each spoke may make at once above --spoke-rate.
    #[arg(long, env = "HUB_SPOKE_BURST", default_value_t = 100)]
    pub spoke_burst: u32,
    /// How long a call over its limit waits for room before it is refused
    /// with RESOURCE_EXHAUSTED (0s: refused at once).
    #[arg(long, env = "HUB_RATE_LIMIT_WAIT", default_value = "1s", value_parser = crate::config::parse_duration)]
    pub rate_limit_wait: Duration,
    /// Failed authentications allowed per peer address per
    /// --auth-failure-window; past them the address is refused unchecked.
    #[arg(long, env = "HUB_AUTH_FAILURE_LIMIT", default_value_t = 20)]
    pub auth_failure_limit: u32,
    /// The window of --auth-failure-limit.
    #[arg(long, env = "HUB_AUTH_FAILURE_WINDOW", default_value = "1m", value_parser = crate::config::parse_duration)]
    pub auth_failure_window: Duration,
    /// New spokes per minute through the enrollment token, sustained.
    #[arg(long, env = "HUB_ENROLLMENTS_PER_MINUTE", default_value_t = 600)]
    pub enrollments_per_minute: u32,
    /// New spokes at once above --enrollments-per-minute.
    #[arg(long, env = "HUB_ENROLLMENT_BURST", default_value_t = 100)]
    pub enrollment_burst: u32,
}

fn invalid(option: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        option,
        reason: reason.to_owned(),
    }
}

impl GuardArgs {
    /// Checks every value; errors name the flag and its variable.
    pub fn into_settings(self) -> Result<GuardSettings, ConfigError> {
        let at_least_one = |n: u64, option| {
            if n == 0 {
                Err(invalid(option, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        at_least_one(
            self.max_grpc_connections as u64,
            "--max-grpc-connections (HUB_MAX_GRPC_CONNECTIONS)",
        )?;
        at_least_one(
            self.max_http_connections as u64,
            "--max-http-connections (HUB_MAX_HTTP_CONNECTIONS)",
        )?;
        at_least_one(self.spoke_rate.into(), "--spoke-rate (HUB_SPOKE_RATE)")?;
        at_least_one(self.spoke_burst.into(), "--spoke-burst (HUB_SPOKE_BURST)")?;
        at_least_one(
            self.auth_failure_limit.into(),
            "--auth-failure-limit (HUB_AUTH_FAILURE_LIMIT)",
        )?;
        at_least_one(
            self.enrollments_per_minute.into(),
            "--enrollments-per-minute (HUB_ENROLLMENTS_PER_MINUTE)",
        )?;
        at_least_one(
            self.enrollment_burst.into(),
            "--enrollment-burst (HUB_ENROLLMENT_BURST)",
        )?;
        let hour = Duration::from_secs(3600);
        if self.idle_connection_timeout.is_zero() || self.idle_connection_timeout > hour {
            return Err(invalid(
                "--idle-connection-timeout (HUB_IDLE_CONNECTION_TIMEOUT)",
                "must be between 1ms and 1h",
            ));
        }
        if self.rate_limit_wait > Duration::from_secs(60) {
            return Err(invalid(
                "--rate-limit-wait (HUB_RATE_LIMIT_WAIT)",
                "must be at most 60s",
            ));
        }
        if self.auth_failure_window.is_zero()
            || self.auth_failure_window > Duration::from_secs(86_400)
        {
            return Err(invalid(
                "--auth-failure-window (HUB_AUTH_FAILURE_WINDOW)",
                "must be between 1ms and 24h",
            ));
        }
        Ok(GuardSettings {
            max_grpc_connections: self.max_grpc_connections,
            max_http_connections: self.max_http_connections,
            idle_timeout: self.idle_connection_timeout,
            spoke_rate: self.spoke_rate,
            spoke_burst: self.spoke_burst,
            rate_limit_wait: self.rate_limit_wait,
            auth_failure_limit: self.auth_failure_limit,
            auth_failure_window: self.auth_failure_window,
            enrollments_per_minute: self.enrollments_per_minute,
            enrollment_burst: self.enrollment_burst,
        })
    }
}

/// Counts refusals of one kind and logs them: the first at once, then at
/// most one WARN line per [`LOG_INTERVAL`] with the count since the
/// previous line and the latest offender (the reporter flushes what a
/// quiet spell left behind).
#[derive(Debug)]
pub struct Tally {
    what: &'static str,
    pending: AtomicU64,
    last: Mutex<(Option<Instant>, String)>,
}

impl Tally {
    /// A tally whose lines say `what`.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            pending: AtomicU64::new(0),
            last: Mutex::new((None, String::new())),
        }
    }

    /// Counts one refusal of `offender`; logs when a line is due.
    pub fn add(&self, offender: impl std::fmt::Display) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.1.clear();
        let _ = std::fmt::Write::write_fmt(&mut last.1, format_args!("{offender}"));
        self.log_if_due(&mut last);
    }

    /// Logs what is waiting if a line is due; the count logged, if any.
    pub fn flush(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.log_if_due(&mut last)
    }

    fn log_if_due(&self, last: &mut (Option<Instant>, String)) -> Option<u64> {
        if last.0.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            return None;
        }
        let n = self.pending.swap(0, Ordering::Relaxed);
        if n == 0 {
            return None;
        }
        last.0 = Some(Instant::now());
        tracing::warn!(count = n, latest = %last.1, "{}", self.what);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_open_files_limit() {
        let mut s = GuardSettings::default();
        assert_eq!(s.fit_open_files(1 << 20), None);
        assert_eq!(s, GuardSettings::default());
        let note = s.fit_open_files(1024).expect("lowered");
        assert!(note.contains("--max-grpc-connections lowered"), "{note}");
        assert_eq!(s.max_http_connections, 96);
        assert_eq!(s.max_grpc_connections, 1024 - 256 - 96);
        let mut tiny = GuardSettings::default();
        tiny.fit_open_files(10);
        assert_eq!(
            (tiny.max_grpc_connections, tiny.max_http_connections),
            (1, 1)
        );
    }

    fn parse(extra: &[&str]) -> Result<GuardSettings, ConfigError> {
        use clap::Parser;
        let mut argv = vec!["hub", "serve"];
        argv.extend_from_slice(extra);
        let cli = crate::config::Cli::try_parse_from(argv).unwrap();
        match cli.command {
            crate::config::Command::Serve(args) => args.guard.into_settings(),
            crate::config::Command::Client(_) => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn flags_default_to_the_documented_limits_and_errors_name_them() {
        assert_eq!(parse(&[]).unwrap(), GuardSettings::default());
        let s = parse(&["--spoke-rate", "5", "--rate-limit-wait", "0s"]).unwrap();
        assert_eq!((s.spoke_rate, s.rate_limit_wait), (5, Duration::ZERO));
        for (flag, value, named) in [
            ("--spoke-rate", "0", "--spoke-rate (HUB_SPOKE_RATE)"),
            (
                "--max-grpc-connections",
                "0",
                "--max-grpc-connections (HUB_MAX_GRPC_CONNECTIONS)",
            ),
            (
                "--idle-connection-timeout",
                "0s",
                "--idle-connection-timeout (HUB_IDLE_CONNECTION_TIMEOUT)",
            ),
            (
                "--rate-limit-wait",
                "2m",
                "--rate-limit-wait (HUB_RATE_LIMIT_WAIT)",
            ),
            (
                "--auth-failure-window",
                "0s",
                "--auth-failure-window (HUB_AUTH_FAILURE_WINDOW)",
            ),
            (
                "--enrollment-burst",
                "0",
                "--enrollment-burst (HUB_ENROLLMENT_BURST)",
            ),
        ] {
            let err = parse(&[flag, value]).unwrap_err().to_string();
            assert!(err.starts_with(named), "{flag} {value}: {err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tally_logs_the_first_at_once_then_once_per_interval() {
        let t = Tally::new("refused");
        t.add("a");
        assert_eq!(t.flush(), None, "the first was logged at once");
        t.add("b");
        t.add("c");
        assert_eq!(t.flush(), None, "within the interval");
        tokio::time::advance(LOG_INTERVAL).await;
        assert_eq!(t.flush(), Some(2));
        tokio::time::advance(LOG_INTERVAL).await;
        assert_eq!(t.flush(), None, "nothing new: no line");
        t.add("d");
        assert_eq!(t.flush(), None, "logged at once after a quiet spell");
    }
}
