//! Behaviour and limits of a running hub, as validated by `config`.

use std::time::Duration;

use crate::clock::Clock;
use crate::guard::GuardSettings;
use crate::tls::{ClientAuth, TlsIdentity};

/// Behaviour and limits of a running hub.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Heartbeat interval told to spokes.
    pub heartbeat_interval: Duration,
    /// Keepalive message interval on WatchDirectives.
    pub keepalive_interval: Duration,
    /// Default ack deadline.
    pub ack_deadline: Duration,
    /// Default delivery attempts.
    pub max_attempts: u32,
    /// Default in-flight window.
    pub default_in_flight: u32,
    /// Largest in-flight window.
    pub max_in_flight: u32,
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Largest directive payload, bytes.
    pub max_payload_bytes: usize,
    /// Most points per metric batch.
    pub max_points_per_batch: u32,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    pub http2_keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout.
    pub http2_keepalive_timeout: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// How long events are kept.
    pub event_retention: Duration,
    /// How long metric points are kept.
    pub metric_retention: Duration,
    /// How long final directives are kept after their last change.
    pub directive_retention: Duration,
    /// How long idempotency keys are remembered.
    pub idempotency_retention: Duration,
    /// How often the retention task runs.
    pub retention_interval: Duration,
    /// Where "now" comes from (tests use a manual clock).
    pub clock: Clock,
    /// Connection caps, idle timeout, rate limits (see `guard`).
    pub guard: GuardSettings,
    /// The gRPC port's TLS identity; `None` serves plaintext.
    pub tls: Option<TlsIdentity>,
    /// Verify gRPC clients' certificates against this CA (needs `tls`).
    pub tls_client_auth: Option<ClientAuth>,
    /// Serve the HTTP port over TLS with `tls`'s identity too (needs `tls`;
    /// `hub serve` turns it on with a certificate unless `--http-tls off`).
    pub http_tls: bool,
    /// The endpoints spokes are told to use from now on (`HubHints.endpoints`,
    /// in every hint the hub sends); empty: no hint. `config` checks them;
    /// tests set them directly.
    pub spoke_endpoints: Vec<String>,
    /// Where events are published (`--events-nats-url`); `None`: nowhere.
    pub nats: Option<crate::nats::NatsSettings>,
    /// How webhook requests are made (`--webhook-…`).
    pub webhook: crate::webhook::WebhookSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            ack_deadline: Duration::from_secs(30),
            max_attempts: 5,
            default_in_flight: 32,
            max_in_flight: 256,
            max_message_bytes: 4 * 1024 * 1024,
            max_payload_bytes: 1024 * 1024,
            max_points_per_batch: 1000,
            max_concurrent_streams: 256,
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            event_retention: Duration::from_secs(7 * 86_400),
            metric_retention: Duration::from_secs(30 * 86_400),
            directive_retention: Duration::from_secs(30 * 86_400),
            idempotency_retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(60),
            clock: Clock::system(),
            guard: GuardSettings::default(),
            tls: None,
            tls_client_auth: None,
            http_tls: false,
            spoke_endpoints: Vec::new(),
            nats: None,
            webhook: crate::webhook::WebhookSettings::default(),
        }
    }
}
