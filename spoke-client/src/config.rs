//! The client builder: every option a spoke sets, checked when the client
//! is built so that a mistake fails at startup with the setter's name, not
//! later on the wire.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backoff::Backoff;
use crate::client::Client;
use crate::directives::Pause;
use crate::error::{Error, Result};
use crate::event::{Event, Observer};
use crate::handler::{self, BoxHandler, Context};
use crate::tls::Tls;

/// Options of a [`Client`], set with `#[must_use]` setters and checked by
/// [`ClientBuilder::build`].
///
/// ```no_run
/// # async fn demo() -> Result<(), spoke_client::Error> {
/// use std::time::Duration;
/// use spoke_client::{Client, Context};
///
/// let client = Client::builder("billing")
///     .endpoint("http://hub-a.internal:50051")
///     .endpoint("http://hub-b.internal:50051") // failover
///     .label("team", "finance")
///     .version("1.4.0")
///     .enrollment_token(std::fs::read_to_string("hub-data/enrollment.token").unwrap())
///     .state_dir("/var/lib/billing/spoke")
///     .concurrency(4)
///     .flush_interval(Duration::from_secs(30))
///     .handler("ping", "1", |_: serde_json::Value, _ctx: Context| async {
///         Ok::<_, String>(serde_json::json!({"pong": true}))
///     })
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until build() is called"]
pub struct ClientBuilder {
    config: Config,
    handlers: Vec<(String, String, BoxHandler)>,
    observer: Option<Observer>,
    /// Testing only (see `pause_before_outcome`).
    pause: Option<Pause>,
}

/// Validated options, shared by the client's components.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub endpoints: Vec<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub enrollment_token: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub concurrency: usize,
    /// The window asked of the hub; `None`: as many as `concurrency`.
    pub max_in_flight: Option<u32>,
    pub max_buffered_points: u64,
    pub flush_at_points: u64,
    pub max_batch_points: u32,
    pub flush_interval: Duration,
    pub shutdown_grace: Duration,
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    pub tls: Tls,
    pub endpoint_fallback_after: Duration,
}

impl ClientBuilder {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            config: Config {
                endpoints: Vec::new(),
                name: name.into(),
                labels: BTreeMap::new(),
                version: String::new(),
                enrollment_token: None,
                state_dir: None,
                concurrency: 8,
                max_in_flight: None,
                max_buffered_points: 100_000,
                flush_at_points: 1_000,
                max_batch_points: 1_000,
                flush_interval: Duration::from_secs(10),
                shutdown_grace: Duration::from_secs(10),
                call_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(5),
                backoff: Backoff::grpc_default(),
                tls: Tls::default(),
                endpoint_fallback_after: Duration::from_secs(120),
            },
            handlers: Vec::new(),
            observer: None,
            pause: None,
        }
    }

    /// Adds a hub endpoint: `http://host:port`, or `https://host:port` for
    /// TLS (see [`tls_ca_cert`](Self::tls_ca_cert)). With several, the
    /// client fails over to the next one when the current one cannot be
    /// reached; they must all use the same scheme (`build` refuses a mix,
    /// which would send the key in clear to the `http://` ones).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.config.endpoints.push(url.into());
        self
    }

    /// How long the endpoints the hub told the client to use (a hint, see
    /// [`Status::endpoints`](crate::Status)) may fail to answer before the
    /// client falls back to the configured ones (default 2 min). The
    /// fallback runs the same way the other way round, so the hinted
    /// endpoints are tried again after the configured ones failed as long.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// use std::time::Duration;
    ///
    /// let client = spoke_client::Client::builder("billing")
    ///     .endpoint("https://hub-a.internal:50051")
    ///     .endpoint_fallback_after(Duration::from_secs(300))
    ///     .state_dir("/var/lib/billing/spoke")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn endpoint_fallback_after(mut self, after: Duration) -> Self {
        self.config.endpoint_fallback_after = after;
        self
    }

    /// Trusts this CA certificate (PEM) for `https://` endpoints, instead of
    /// the system's root certificates. Call it again to trust several.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// let client = spoke_client::Client::builder("billing")
    ///     .endpoint("https://hub.internal:50051")
    ///     .tls_ca_cert(std::fs::read("/etc/billing/hub-ca.pem").unwrap())
    ///     .state_dir("/var/lib/billing/spoke")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_ca_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.config.tls.ca_certs.push(pem.into());
        self
    }

    /// The name the hub's certificate must carry, when it is not the
    /// endpoint's host (an endpoint given by IP address, a tunnel).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// let client = spoke_client::Client::builder("billing")
    ///     .endpoint("https://10.0.0.7:50051")
    ///     .tls_ca_cert(std::fs::read("/etc/billing/hub-ca.pem").unwrap())
    ///     .tls_domain_name("hub.internal")
    ///     .state_dir("/var/lib/billing/spoke")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        self.config.tls.domain_name = Some(name.into());
        self
    }

    /// A client certificate chain and its private key (both PEM) shown to
    /// the hub, for mutual TLS.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// let client = spoke_client::Client::builder("billing")
    ///     .endpoint("https://hub.internal:50051")
    ///     .tls_ca_cert(std::fs::read("/etc/billing/hub-ca.pem").unwrap())
    ///     .tls_identity(
    ///         std::fs::read("/etc/billing/spoke.pem").unwrap(),
    ///         std::fs::read("/etc/billing/spoke.key").unwrap(),
    ///     )
    ///     .state_dir("/var/lib/billing/spoke")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.config.tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Adds a label, used by operators' label selectors.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.labels.insert(key.into(), value.into());
        self
    }

    /// The spoke's own version string, shown to operators.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.config.version = version.into();
        self
    }

    /// The hub's enrollment token: needed on the first start only, when the
    /// state directory holds no key yet.
    pub fn enrollment_token(mut self, token: impl Into<String>) -> Self {
        self.config.enrollment_token = Some(token.into().trim().to_owned());
        self
    }

    /// Where the client keeps its SQLite state (registration and key,
    /// received directives, metric buffer). Required; created if missing.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.state_dir = Some(dir.into());
        self
    }

    /// Most handlers running at once (default 8). Unless
    /// [`max_in_flight`](Self::max_in_flight) says otherwise, it is also the
    /// window asked of the hub, so the hub delivers no more directives than
    /// can run at once and the rest wait at the hub, their ack deadlines
    /// not started.
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.config.concurrency = handlers;
        self
    }

    /// The in-flight window asked of the hub: how many directives it
    /// delivers before their acks (default: as many as
    /// [`concurrency`](Self::concurrency); 0 asks for the hub's default; the
    /// hub caps it at its maximum).
    ///
    /// A window larger than the concurrency prefetches: the directives
    /// beyond it wait here for a free handler, and the client renews their
    /// ack deadlines meanwhile (an IN_PROGRESS ack saying they are queued),
    /// so waiting never costs them an attempt. A smaller window leaves
    /// handler slots unused: at most that many directives run at once.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// // Two handlers at a time, six more directives ready behind them.
    /// let client = spoke_client::Client::builder("renderer")
    ///     .endpoint("http://127.0.0.1:50051")
    ///     .state_dir("./spoke-state")
    ///     .concurrency(2)
    ///     .max_in_flight(8)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn max_in_flight(mut self, directives: u32) -> Self {
        self.config.max_in_flight = Some(directives);
        self
    }

    /// Most points kept in the local buffer (default 100 000); beyond it the
    /// oldest are dropped and counted in [`Status::dropped_points`](crate::Status).
    pub fn max_buffered_points(mut self, points: u64) -> Self {
        self.config.max_buffered_points = points;
        self
    }

    /// Flush as soon as this many points are buffered (default 1 000).
    pub fn flush_at_points(mut self, points: u64) -> Self {
        self.config.flush_at_points = points;
        self
    }

    /// Most points per pushed batch (default 1 000; the hub's own limit, from
    /// its hints, wins if lower).
    pub fn max_batch_points(mut self, points: u32) -> Self {
        self.config.max_batch_points = points;
        self
    }

    /// Flush the metric buffer this often (default 10 s).
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.config.flush_interval = every;
        self
    }

    /// How long shutdown waits for running handlers before cancelling them
    /// (default 10 s); the final metric flush gets as long again.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Deadline of each unary call to the hub (default 10 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// Deadline of each connection attempt (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Reconnection delays (default: [`Backoff::grpc_default`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Handles directives of `directive_type`, declared to the hub as a
    /// capability with `version`. The payload is deserialized into `P` (use
    /// `serde_json::Value` for raw JSON); `Ok(result)` acks COMPLETED with the
    /// result serialized as JSON (a non-object is wrapped as
    /// `{"value": ...}`, `()` becomes `{}`), `Err(e)` acks FAILED with
    /// `e.to_string()`. A payload that does not deserialize into `P` is acked
    /// REJECTED, naming the serde error.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct SyncDoc { doc: String }
    ///
    /// let client = spoke_client::Client::builder("docs")
    ///     .endpoint("http://127.0.0.1:50051")
    ///     .state_dir("./spoke-state")
    ///     .handler("sync_doc", "2", |job: SyncDoc, ctx: spoke_client::Context| async move {
    ///         ctx.progress(50, "halfway").await.ok();
    ///         Ok::<_, std::io::Error>(serde_json::json!({"synced": job.doc}))
    ///     })
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn handler<P, R, E, F, Fut>(
        mut self,
        directive_type: impl Into<String>,
        version: impl Into<String>,
        handler: F,
    ) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(P, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    {
        self.handlers.push((
            directive_type.into(),
            version.into(),
            handler::boxed(handler),
        ));
        self
    }

    /// Calls `observer` on each [`Event`]: a registration, an outcome
    /// recorded (just before its ack), a finished directive delivered again.
    /// It runs on the client's tasks, so it must be quick and must not block
    /// on I/O beyond a local write; it suits audit logs, counters and tests.
    /// A process that exits inside it on [`Event::Finished`] leaves the
    /// outcome recorded but unacked: the next start acks it without running
    /// the directive again.
    pub fn on_event(mut self, observer: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.observer = Some(std::sync::Arc::new(observer));
        self
    }

    /// Testing only (feature `testing`): every run awaits `pause(id)` after
    /// its handler returned and before its outcome is recorded, so a test
    /// can act in that window (deliver the directive again, kill the
    /// process).
    #[cfg(feature = "testing")]
    pub fn pause_before_outcome<F, Fut>(mut self, pause: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.pause = Some(std::sync::Arc::new(move |id| Box::pin(pause(id))));
        self
    }

    /// Checks every option, opens (or creates) the local state and returns
    /// the client. Nothing touches the network until [`Client::run`].
    pub async fn build(self) -> Result<Client> {
        let config = self.config.validated()?;
        let mut handlers = BTreeMap::new();
        let mut capabilities = Vec::new();
        for (kind, version, handler) in self.handlers {
            check_type(&kind)?;
            if version.chars().count() > 64 {
                return Err(Error::config(
                    "handler",
                    format!("version of {kind:?}: at most 64 characters"),
                ));
            }
            if handlers.insert(kind.clone(), handler).is_some() {
                return Err(Error::config(
                    "handler",
                    format!("{kind:?} registered twice"),
                ));
            }
            capabilities.push((kind, version));
        }
        if capabilities.len() > 256 {
            return Err(Error::config("handler", "at most 256 directive types"));
        }
        let client = Client::start(config, handlers, capabilities, self.observer).await?;
        if let Some(pause) = self.pause {
            client.pause_before_outcome(pause);
        }
        Ok(client)
    }
}

impl Config {
    /// The in-flight window to ask of the hub (0: the hub's default).
    pub fn window(&self) -> u32 {
        self.max_in_flight
            .unwrap_or_else(|| u32::try_from(self.concurrency).unwrap_or(u32::MAX))
    }

    fn validated(mut self) -> Result<Self> {
        if self.endpoints.is_empty() {
            return Err(Error::config(
                "endpoint",
                "at least one hub endpoint is required",
            ));
        }
        for url in &self.endpoints {
            check_endpoint(url)?;
        }
        check_one_scheme(&self.endpoints)?;
        self.tls.check(&self.endpoints)?;
        check_name(&self.name)?;
        check_labels(&self.labels)?;
        if self.version.chars().count() > 64 {
            return Err(Error::config("version", "at most 64 characters"));
        }
        if self.enrollment_token.as_deref() == Some("") {
            return Err(Error::config("enrollment_token", "empty"));
        }
        let dir = self.state_dir.as_ref().ok_or_else(|| {
            Error::config("state_dir", "required: where the key and buffers live")
        })?;
        if dir.as_os_str().is_empty() {
            return Err(Error::config("state_dir", "empty path"));
        }
        positive("concurrency", self.concurrency as u64)?;
        positive("max_buffered_points", self.max_buffered_points)?;
        positive("flush_at_points", self.flush_at_points)?;
        positive("max_batch_points", u64::from(self.max_batch_points))?;
        if self.flush_at_points > self.max_buffered_points {
            return Err(Error::config(
                "flush_at_points",
                "must not exceed max_buffered_points",
            ));
        }
        for (field, d) in [
            ("flush_interval", self.flush_interval),
            ("call_timeout", self.call_timeout),
            ("connect_timeout", self.connect_timeout),
            ("endpoint_fallback_after", self.endpoint_fallback_after),
        ] {
            if d.is_zero() {
                return Err(Error::config(field, "must be positive"));
            }
        }
        self.endpoints.dedup();
        Ok(self)
    }
}

fn positive(field: &'static str, n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::config(field, "must be at least 1"));
    }
    Ok(())
}

/// One endpoint: `http://` or `https://` with a host, as tonic parses it
/// (also the rule for the hub's endpoint hints).
pub(crate) fn check_endpoint(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            Error::config(
                "endpoint",
                format!("{url}: must start with http:// or https://"),
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(Error::config("endpoint", format!("{url}: no host")));
    }
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::config("endpoint", format!("{url}: {e}")))?;
    Ok(())
}

/// All endpoints `http://` or all `https://`: the key goes to whichever
/// the client fails over to, so a single plaintext one would carry it in
/// clear.
pub(crate) fn check_one_scheme(endpoints: &[String]) -> Result<()> {
    let (https, http): (Vec<&String>, Vec<&String>) = endpoints
        .iter()
        .partition(|url| url.starts_with("https://"));
    if https.is_empty() || http.is_empty() {
        return Ok(());
    }
    let list = |urls: Vec<&String>| {
        urls.iter()
            .map(|u| u.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::config(
        "endpoint",
        format!(
            "mixed http:// and https:// endpoints: {} would carry the spoke's key in clear, \
             beside {}; use https:// for all of them (or http:// for all, on a trusted network)",
            list(http),
            list(https)
        ),
    ))
}

/// The hub's rule for names: 1 to 63 of `[a-z0-9_.-]`, starting with a
/// letter or digit.
fn check_name(name: &str) -> Result<()> {
    if hub_proto::rules::is_spoke_name(name) {
        Ok(())
    } else {
        Err(Error::config(
            "name",
            format!(
                "{name:?}: 1 to 63 lowercase letters, digits, '-', '_', '.', starting with a letter or digit"
            ),
        ))
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > hub_proto::rules::MAX_LABELS {
        return Err(Error::config("label", "at most 32 labels"));
    }
    for (k, v) in labels {
        if !hub_proto::rules::is_label_key(k) {
            return Err(Error::config(
                "label",
                format!("key {k:?}: 1 to 63 of letters, digits, '-', '_', '.', '/'"),
            ));
        }
        if v.chars().count() > hub_proto::rules::MAX_LABEL_VALUE_CHARS {
            return Err(Error::config(
                "label",
                format!("value of {k:?}: at most 256 characters"),
            ));
        }
    }
    Ok(())
}

fn check_type(kind: &str) -> Result<()> {
    if hub_proto::rules::is_directive_type(kind) {
        Ok(())
    } else {
        Err(Error::config(
            "handler",
            format!("directive type {kind:?}: 1 to 64 of letters, digits, '_', '-', '.', '/'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        let mut b = ClientBuilder::new("billing")
            .endpoint("http://127.0.0.1:50051")
            .state_dir("/tmp/x");
        b.config.labels.insert("team".into(), "finance".into());
        b.config
    }

    fn field_of(c: Config) -> &'static str {
        match c.validated() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_sensible_configuration_passes() {
        base().validated().unwrap();
    }

    #[test]
    fn each_mistake_names_its_setter() {
        let mut c = base();
        c.endpoints.clear();
        assert_eq!(field_of(c), "endpoint");
        let mut c = base();
        c.endpoints = vec!["ftp://hub:21".into()];
        assert_eq!(field_of(c), "endpoint");
        let mut c = base();
        c.endpoints = vec!["127.0.0.1:50051".into()];
        assert_eq!(field_of(c), "endpoint");
        let mut c = base();
        c.name = "Billing".into();
        assert_eq!(field_of(c), "name");
        let mut c = base();
        c.labels.insert("bad key".into(), "v".into());
        assert_eq!(field_of(c), "label");
        let mut c = base();
        c.state_dir = None;
        assert_eq!(field_of(c), "state_dir");
        let mut c = base();
        c.concurrency = 0;
        assert_eq!(field_of(c), "concurrency");
        let mut c = base();
        c.flush_at_points = c.max_buffered_points + 1;
        assert_eq!(field_of(c), "flush_at_points");
        let mut c = base();
        c.flush_interval = Duration::ZERO;
        assert_eq!(field_of(c), "flush_interval");
        let mut c = base();
        c.endpoint_fallback_after = Duration::ZERO;
        assert_eq!(field_of(c), "endpoint_fallback_after");
    }

    #[test]
    fn mixed_plaintext_and_tls_endpoints_are_refused_naming_them() {
        let mut c = base();
        c.endpoints = vec![
            "https://hub-a.internal:50051".into(),
            "http://hub-b.internal:50051".into(),
        ];
        match c.validated() {
            Err(Error::Config { field, reason }) => {
                assert_eq!(field, "endpoint");
                assert!(reason.contains("mixed http:// and https://"), "{reason}");
                assert!(reason.contains("http://hub-b.internal:50051"), "{reason}");
                assert!(reason.contains("https://hub-a.internal:50051"), "{reason}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        let mut c = base();
        c.endpoints = vec!["http://a:1".into(), "http://b:1".into()];
        c.validated().unwrap();
    }

    #[test]
    fn the_window_asked_of_the_hub_is_the_concurrency_unless_set() {
        let mut c = base();
        c.concurrency = 3;
        assert_eq!(c.window(), 3);
        c.max_in_flight = Some(0);
        assert_eq!(c.window(), 0, "0 asks for the hub's default");
        c.max_in_flight = Some(12);
        assert_eq!(c.window(), 12);
        let mut c = base();
        c.concurrency = usize::MAX;
        assert_eq!(c.window(), u32::MAX, "the hub caps it");
    }

    #[test]
    fn directive_types_follow_the_hub_rules() {
        assert!(check_type("sync_doc").is_ok());
        assert!(check_type("ai/task.v2").is_ok());
        assert!(check_type("").is_err());
        assert!(check_type("has space").is_err());
    }
}
