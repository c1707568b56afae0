//! The hub's own metrics, served as Prometheus (OpenMetrics) text on
//! `GET /metrics`: live counters kept here, gauges read at scrape time, and
//! a tower layer timing every gRPC call by method and status code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::Instrument;

/// Label set of the ack counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// in_progress, completed, failed or rejected.
    pub outcome: &'static str,
}

/// Label set of the metric point counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PointLabels {
    /// accepted, rejected or duplicate.
    pub result: &'static str,
}

/// Label set of the webhook request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// delivered, http_error, timeout, connect_error or refused.
    pub result: &'static str,
}

/// Label set of the RPC latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `package.Service/Method`, or `other` for unknown paths.
    pub method: &'static str,
    /// The gRPC status code name.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    health: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The metric registry and the handles the services update.
pub struct Telemetry {
    registry: Registry,
    /// Directives sent to spokes (every attempt).
    pub deliveries: Counter,
    /// Deliveries after the first attempt.
    pub redeliveries: Counter,
    /// Acks received, by outcome.
    pub acks: Family<OutcomeLabels, Counter>,
    /// Metric points received, by what happened to them.
    pub points: Family<PointLabels, Counter>,
    /// Group commits of the ledger's log.
    pub commits: Counter,
    /// Commits that failed (their calls were answered UNAVAILABLE).
    pub commit_failures: Counter,
    /// Changes (rows and events) per commit.
    pub commit_changes: Histogram,
    /// How long each commit took (statements, sync).
    pub commit_seconds: Histogram,
    /// Connected to NATS JetStream with the events stream found (0 or 1).
    pub events_nats_connected: Gauge,
    /// The highest event sequence JetStream acknowledged.
    pub events_nats_published: Gauge,
    /// Committed events not yet acknowledged by JetStream.
    pub events_nats_lag: Gauge,
    /// Events retention removed before they were published.
    pub events_nats_skipped: Counter,
    /// Webhook requests, by result.
    pub webhook_attempts: Family<WebhookLabels, Counter>,
    rpc: Family<RpcLabels, Histogram>,
    connected_streams: Gauge,
    spokes: Family<HealthLabels, Gauge>,
    directives: Family<StateLabels, Gauge>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry(..)")
    }
}

/// Every method the hub serves; other paths are counted as `other` so a
/// caller cannot grow the label set.
const METHODS: &[&str] = &[
    "hub.v1.SpokeService/Register",
    "hub.v1.SpokeService/WatchDirectives",
    "hub.v1.SpokeService/Ack",
    "hub.v1.SpokeService/Heartbeat",
    "hub.v1.SpokeService/PushMetrics",
    "hub.v1.SpokeService/PollDirectives",
    "hub.v1.SpokeService/AckStream",
    "hub.v1.AdminService/CreateDirective",
    "hub.v1.AdminService/CreateDirectives",
    "hub.v1.AdminService/CancelDirective",
    "hub.v1.AdminService/GetDirective",
    "hub.v1.AdminService/ListDirectives",
    "hub.v1.AdminService/ListSpokes",
    "hub.v1.AdminService/GetSpoke",
    "hub.v1.AdminService/RevokeSpoke",
    "hub.v1.AdminService/RotateSpokeKey",
    "hub.v1.AdminService/QueryMetrics",
    "hub.v1.AdminService/WatchEvents",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
];

const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hub");
        let t = Self {
            registry: Registry::default(),
            deliveries: Counter::default(),
            redeliveries: Counter::default(),
            acks: Family::default(),
            points: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            commit_changes: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            rpc: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            connected_streams: Gauge::default(),
            events_nats_connected: Gauge::default(),
            events_nats_published: Gauge::default(),
            events_nats_lag: Gauge::default(),
            events_nats_skipped: Counter::default(),
            webhook_attempts: Family::default(),
            spokes: Family::default(),
            directives: Family::default(),
        };
        registry.register(
            "deliveries",
            "Directives sent to spokes, every attempt",
            t.deliveries.clone(),
        );
        registry.register(
            "redeliveries",
            "Deliveries after the first attempt",
            t.redeliveries.clone(),
        );
        registry.register("acks", "Acks received, by outcome", t.acks.clone());
        registry.register(
            "metric_points",
            "Metric points received, by result (accepted, rejected, duplicate)",
            t.points.clone(),
        );
        registry.register(
            "commits",
            "Group commits: each is one transaction and one sync for every write gathered meanwhile",
            t.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Commits that failed; their calls were answered UNAVAILABLE",
            t.commit_failures.clone(),
        );
        registry.register(
            "commit_changes",
            "Changes (rows and events) per group commit",
            t.commit_changes.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "How long each group commit took, statements and sync",
            t.commit_seconds.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency (streams: until the response starts), by method and code",
            t.rpc.clone(),
        );
        registry.register(
            "connected_streams",
            "Open WatchDirectives streams on this hub",
            t.connected_streams.clone(),
        );
        registry.register(
            "events_nats_connected",
            "1 while the hub is connected to NATS JetStream with its events stream (--events-nats-url)",
            t.events_nats_connected.clone(),
        );
        registry.register(
            "events_nats_published_sequence",
            "The highest event sequence NATS JetStream acknowledged",
            t.events_nats_published.clone(),
        );
        registry.register(
            "events_nats_lag",
            "Committed events NATS JetStream has not acknowledged yet",
            t.events_nats_lag.clone(),
        );
        registry.register(
            "events_nats_skipped",
            "Events retention removed before they were published to NATS",
            t.events_nats_skipped.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook requests (directives POSTed to spokes), by result: delivered, http_error, \
             timeout, connect_error, refused",
            t.webhook_attempts.clone(),
        );
        registry.register("spokes", "Registered spokes by health", t.spokes.clone());
        registry.register("directives", "Directives by state", t.directives.clone());
        Self { registry, ..t }
    }
}

impl Telemetry {
    /// Counts directives sent to a spoke.
    pub fn delivered(&self, attempts: impl IntoIterator<Item = u32>) {
        for attempt in attempts {
            self.deliveries.inc();
            if attempt > 1 {
                self.redeliveries.inc();
            }
        }
    }

    /// Renders the registry after setting the gauges read at scrape time.
    pub fn render(
        &self,
        connected_streams: usize,
        spokes_by_health: &[(String, i64)],
        directives_by_state: &[(String, i64)],
    ) -> String {
        self.connected_streams.set(connected_streams as i64);
        set_counts(
            &self.spokes,
            &["ONLINE", "STALE", "OFFLINE", "REVOKED"],
            spokes_by_health,
            |health| HealthLabels { health },
        );
        set_counts(
            &self.directives,
            &[
                "PENDING",
                "DELIVERED",
                "IN_PROGRESS",
                "COMPLETED",
                "FAILED",
                "REJECTED",
                "EXPIRED",
                "CANCELLED",
            ],
            directives_by_state,
            |state| StateLabels { state },
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn observe_rpc(&self, path: &str, code: &'static str, started: Instant) {
        let path = path.trim_start_matches('/');
        let method = METHODS
            .iter()
            .find(|m| **m == path)
            .copied()
            .unwrap_or("other");
        self.rpc
            .get_or_create(&RpcLabels { method, code })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Sets one gauge per name to its count (0 when absent, so a state that
/// emptied shows 0 rather than its last value).
fn set_counts<L>(
    family: &Family<L, Gauge>,
    names: &[&'static str],
    counts: &[(String, i64)],
    label: impl Fn(&'static str) -> L,
) where
    L: Clone + std::hash::Hash + Eq,
{
    for name in names {
        let n = counts
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, n)| *n);
        family.get_or_create(&label(name)).set(n);
    }
}

/// Times every gRPC call (see [`RpcTimer`]).
#[derive(Clone, Debug)]
pub struct RpcTimerLayer(pub Arc<Telemetry>);

impl<S> tower::Layer<S> for RpcTimerLayer {
    type Service = RpcTimer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTimer {
            inner,
            telemetry: self.0.clone(),
        }
    }
}

/// Records each call's latency and status code, and logs one line per
/// failed call. Each call runs in an `rpc` span whose `spoke_id` and
/// `directive_id` the services fill in, so the error line names them.
/// Unary errors carry their status in the response headers; otherwise the
/// code is read as OK here, since the real one travels in trailers after
/// the body.
#[derive(Clone, Debug)]
pub struct RpcTimer<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcTimer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let started = Instant::now();
        let telemetry = self.telemetry.clone();
        let span = tracing::info_span!(
            "rpc",
            method = %path.trim_start_matches('/'),
            spoke_id = tracing::field::Empty,
            directive_id = tracing::field::Empty,
        );
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let res = fut.await;
                if let Ok(response) = &res {
                    let headers = response.headers();
                    let code = headers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok())
                        .and_then(|n| CODES.get(n).copied())
                        .unwrap_or("OK");
                    telemetry.observe_rpc(&path, code, started);
                    if code != "OK" {
                        let message = headers
                            .get("grpc-message")
                            .map(|v| percent_decode(v.as_bytes()))
                            .unwrap_or_default();
                        // Refused credentials and rate limits are logged in
                        // aggregate by `guard`: a line each would let a flood
                        // of them flood the log.
                        if code == "UNAUTHENTICATED"
                            || headers.contains_key(crate::error::RETRY_AFTER_MS)
                        {
                            tracing::debug!(code, error = %message, "rpc failed");
                        } else {
                            tracing::warn!(code, error = %message, "rpc failed");
                        }
                    }
                }
                res
            }
            .instrument(span),
        )
    }
}

/// Decodes a percent-encoded `grpc-message` header.
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_do_not_grow_the_label_set() {
        let t = Telemetry::default();
        t.observe_rpc("/hub.v1.SpokeService/Ack", "OK", Instant::now());
        t.observe_rpc("/evil/x1", "UNIMPLEMENTED", Instant::now());
        t.observe_rpc("/evil/x2", "UNIMPLEMENTED", Instant::now());
        let text = t.render(0, &[], &[]);
        assert!(
            text.contains(
                r#"hub_rpc_duration_seconds_count{method="hub.v1.SpokeService/Ack",code="OK"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hub_rpc_duration_seconds_count{method="other",code="UNIMPLEMENTED"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("evil"));
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"spoke%20%22x%22 not found"),
            "spoke \"x\" not found"
        );
        assert_eq!(percent_decode(b"100%"), "100%");
    }
}
