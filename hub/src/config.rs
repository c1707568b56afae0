//! Command-line and environment configuration, validated before any port is
//! bound. Every error names the flag (and its environment variable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cli::{ClientCommand, Connection};
use crate::guard::GuardArgs;
use crate::settings::Settings;
use crate::store::Durability;
use crate::tls::{ClientAuth, ClientAuthMode, TlsError, TlsIdentity};

/// The hub: a gRPC control plane that pushes directives to spokes.
///
/// `hub serve` runs the server; the other subcommands call a running hub's
/// AdminService (address and admin token from flags, HUB_ADDR /
/// HUB_ADMIN_TOKEN, or the data directory of a hub on this machine).
#[derive(Debug, Parser)]
#[command(name = "hub", version, about)]
pub struct Cli {
    /// Options shared by the server and the client subcommands.
    #[command(flatten)]
    pub global: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of the `hub` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub server.
    Serve(Box<ServeArgs>),
    /// Operator commands against a running hub.
    #[command(flatten)]
    Client(ClientCommand),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options of `hub serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "HUB_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// HTTP listen address (health, readiness, admin page).
    #[arg(long, env = "HUB_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Database URL: sqlite:<file> (one hub per file), or postgres://user:password@host:port/database (several hubs may serve one database as replicas: one leads, the others forward calls to it and take over when it goes) [default: sqlite://<data-dir>/hub.db].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Connections that read the database (queries, the admin page); the hub writes on one more of its own.
    #[arg(long, env = "HUB_DATABASE_POOL_SIZE", default_value_t = 8)]
    pub database_pool_size: u32,
    /// How long connecting to PostgreSQL (or waiting for a reading connection) may take before a call is answered UNAVAILABLE.
    #[arg(long, env = "HUB_DATABASE_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub database_connect_timeout: Duration,
    /// Enrollment token for registering new spokes [default: generated into <data-dir>/enrollment.token].
    #[arg(long, env = "HUB_ENROLLMENT_TOKEN", hide_env_values = true)]
    pub enrollment_token: Option<String>,
    /// Interval spokes are told to heartbeat at (e.g. 10s, 500ms, 2m).
    #[arg(long, env = "HUB_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Interval of keepalive messages on WatchDirectives.
    #[arg(long, env = "HUB_KEEPALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// Default ack deadline of a directive.
    #[arg(long, env = "HUB_ACK_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub ack_deadline: Duration,
    /// Default delivery attempts before a directive fails.
    #[arg(long, env = "HUB_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Default in-flight window per spoke.
    #[arg(long, env = "HUB_DEFAULT_IN_FLIGHT", default_value_t = 32)]
    pub default_in_flight: u32,
    /// Largest in-flight window a spoke may ask for.
    #[arg(long, env = "HUB_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: u32,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "HUB_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Largest directive payload accepted (JSON-encoded), in bytes.
    #[arg(long, env = "HUB_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Most points in one metric batch.
    #[arg(long, env = "HUB_MAX_POINTS_PER_BATCH", default_value_t = 1000)]
    pub max_points_per_batch: u32,
    /// Most concurrent HTTP/2 streams per connection.
    #[arg(long, env = "HUB_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keepalive pings.
    #[arg(long, env = "HUB_HTTP2_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// Time to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "HUB_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Time to let in-flight calls finish on shutdown.
    #[arg(long, env = "HUB_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long events are kept (e.g. 7d).
    #[arg(long, env = "HUB_EVENT_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub event_retention: Duration,
    /// How long metric points are kept (e.g. 30d).
    #[arg(long, env = "HUB_METRIC_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub metric_retention: Duration,
    /// How long final directives (and deleted spokes with nothing left) are
    /// kept after their last change (e.g. 30d).
    #[arg(long, env = "HUB_DIRECTIVE_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub directive_retention: Duration,
    /// How long an idempotency key is remembered (e.g. 24h).
    #[arg(long, env = "HUB_IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_retention: Duration,
    /// Log format.
    #[arg(long, env = "HUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Durability of commits: full (fsync each commit; survives power loss)
    /// or normal (survives a killed process; may lose the last moments on
    /// an OS crash or power loss).
    #[arg(long, env = "HUB_SYNC", value_enum, default_value_t = Durability::Full)]
    pub sync: Durability,
    /// PEM certificate chain (leaf first) for TLS on the gRPC port; needs --tls-key [default: plaintext].
    #[arg(long, env = "HUB_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HUB_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that gRPC clients' certificates must chain to; needs --tls-cert [default: no client certificates asked for].
    #[arg(long, env = "HUB_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: a client without a valid certificate is refused (required) or let in (optional; one it shows must still be valid) [default: required].
    #[arg(long, env = "HUB_TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<ClientAuthMode>,
    /// Serve the HTTP port (admin page, /metrics, /healthz, /readyz) over TLS with --tls-cert and --tls-key [default: on when they are given].
    #[arg(long, env = "HUB_HTTP_TLS", value_enum)]
    pub http_tls: Option<Switch>,
    /// Endpoints spokes should use from now on, told in every hint (e.g. https://hub-b.example:7443,https://hub-c.example:7443): spokes keep them and dial them from their next connection on, falling back to their configured endpoints if none answers [default: no hint].
    #[arg(
        long,
        env = "HUB_SPOKE_ENDPOINTS",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub spoke_endpoints: Vec<String>,
    /// On PostgreSQL: the gRPC URL the other replicas forward calls to while this hub leads (e.g. http://10.0.0.5:50051) [default: http(s)://<--listen address>, with 127.0.0.1 for 0.0.0.0 and ::1 for ::].
    #[arg(long, env = "HUB_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,
    /// This hub's name: the CloudEvents `source` of the events it publishes to NATS.
    #[arg(long, env = "HUB_NAME", default_value = "hub")]
    pub name: String,
    /// Publish every event to NATS JetStream at this server (nats://host:4222, tls://host:4222; several comma-separated) [default: off].
    #[arg(long, env = "HUB_EVENTS_NATS_URL", value_name = "URL")]
    pub events_nats_url: Option<String>,
    /// Events are published on <prefix>.<kind>, e.g. hub.events.directive.completed.
    #[arg(
        long,
        env = "HUB_EVENTS_NATS_SUBJECT_PREFIX",
        default_value = "hub.events"
    )]
    pub events_nats_subject_prefix: String,
    /// The JetStream stream that takes <prefix>.>.
    #[arg(long, env = "HUB_EVENTS_NATS_STREAM", default_value = "HUB_EVENTS")]
    pub events_nats_stream: String,
    /// Create the stream (file storage, subjects <prefix>.>) when it does not exist.
    #[arg(
        long,
        env = "HUB_EVENTS_NATS_CREATE_STREAM",
        value_enum,
        default_value = "on"
    )]
    pub events_nats_create_stream: Switch,
    /// A NATS credentials file (user JWT and NKey seed).
    #[arg(long, env = "HUB_EVENTS_NATS_CREDS", value_name = "FILE")]
    pub events_nats_creds: Option<PathBuf>,
    /// A NATS token.
    #[arg(long, env = "HUB_EVENTS_NATS_TOKEN", hide_env_values = true)]
    pub events_nats_token: Option<String>,
    /// CA certificates (PEM) to trust for TLS to NATS, beside the system's; makes TLS required.
    #[arg(long, env = "HUB_EVENTS_NATS_TLS_CA", value_name = "FILE")]
    pub events_nats_tls_ca: Option<PathBuf>,
    /// Webhook delivery: time to connect to a spoke's webhook (and finish TLS).
    #[arg(long, env = "HUB_WEBHOOK_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub webhook_connect_timeout: Duration,
    /// Webhook delivery: time for a spoke's webhook to answer, once connected.
    #[arg(long, env = "HUB_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// Webhook requests out at once, over all spokes.
    #[arg(long, env = "HUB_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub webhook_concurrency: usize,
    /// Webhook requests out at once to one spoke (its window bounds them too).
    #[arg(long, env = "HUB_WEBHOOK_SPOKE_CONCURRENCY", default_value_t = 8)]
    pub webhook_spoke_concurrency: usize,
    /// Allow webhook URLs on link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, ...).
    #[arg(long, env = "HUB_WEBHOOK_ALLOW_LINK_LOCAL")]
    pub webhook_allow_link_local: bool,
    /// CA certificates (PEM) to trust for webhook HTTPS, beside the system's.
    #[arg(long, env = "HUB_WEBHOOK_CA", value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
    /// Connection caps, idle timeout and rate limits.
    #[command(flatten)]
    pub guard: GuardArgs,
}

/// An option that is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// A configuration problem, naming the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An option's value is unusable.
    #[error("{option}: {reason}")]
    Invalid {
        /// The flag and its environment variable.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The data directory or a token file could not be used.
    #[error("{option}: {path}: {source}")]
    Io {
        /// The flag and its environment variable.
        option: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        reason: reason.into(),
    }
}

/// Where a secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Given by flag or environment.
    Configured,
    /// Read from, or generated into, this file.
    File(PathBuf),
}

/// Everything `hub serve` needs, validated.
#[derive(Debug)]
pub struct Config {
    /// The data directory.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// Database URL.
    pub database_url: String,
    /// Where other replicas reach this hub while it leads (`None`: the
    /// bound gRPC address, see [`Config::advertised_url`]).
    pub advertise_url: Option<String>,
    /// Reading connections to the database.
    pub database_pool_size: u32,
    /// Longest wait for a database connection.
    pub database_connect_timeout: Duration,
    /// Admin token (never logged).
    pub admin_token: String,
    /// Where the admin token came from.
    pub admin_token_source: SecretSource,
    /// Enrollment token (never logged).
    pub enrollment_token: String,
    /// Where the enrollment token came from.
    pub enrollment_token_source: SecretSource,
    /// Behaviour and limits.
    pub settings: Settings,
    /// Log format.
    pub log_format: LogFormat,
    /// Durability of commits.
    pub durability: Durability,
}

const MIN_TOKEN_LEN: usize = 16;

impl Config {
    /// Where other replicas reach this hub while it leads: `--advertise-url`,
    /// or the bound gRPC address `bound` (loopback for an unspecified one).
    pub fn advertised_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.advertise_url {
            return url.clone();
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let scheme = if self.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    }

    /// How `hub serve` opens the store.
    pub fn store_options(&self) -> crate::store::Options {
        crate::store::Options {
            durability: self.durability,
            pool_size: self.database_pool_size,
            connect_timeout: self.database_connect_timeout,
        }
    }
}

impl Config {
    /// Validates the options, creates the data directory, and reads or
    /// generates the tokens. Binds nothing.
    pub fn load(args: ServeArgs, global: &Connection) -> Result<Self, ConfigError> {
        check_durations(&args)?;
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&args.ack_deadline) {
            return Err(invalid(
                "--ack-deadline (HUB_ACK_DEADLINE)",
                "must be between 1s and 24h",
            ));
        }
        if !(1..=100).contains(&args.max_attempts) {
            return Err(invalid(
                "--max-attempts (HUB_MAX_ATTEMPTS)",
                "must be 1 to 100",
            ));
        }
        if args.max_in_flight == 0 {
            return Err(invalid(
                "--max-in-flight (HUB_MAX_IN_FLIGHT)",
                "must be at least 1",
            ));
        }
        if args.default_in_flight == 0 || args.default_in_flight > args.max_in_flight {
            return Err(invalid(
                "--default-in-flight (HUB_DEFAULT_IN_FLIGHT)",
                "must be at least 1 and at most --max-in-flight",
            ));
        }
        if args.max_message_bytes < 64 * 1024 {
            return Err(invalid(
                "--max-message-bytes (HUB_MAX_MESSAGE_BYTES)",
                "must be at least 65536",
            ));
        }
        if args.max_payload_bytes == 0 || args.max_payload_bytes >= args.max_message_bytes {
            return Err(invalid(
                "--max-payload-bytes (HUB_MAX_PAYLOAD_BYTES)",
                "must be at least 1 and less than --max-message-bytes",
            ));
        }
        if args.max_points_per_batch == 0 {
            return Err(invalid(
                "--max-points-per-batch (HUB_MAX_POINTS_PER_BATCH)",
                "must be at least 1",
            ));
        }
        if args.max_concurrent_streams == 0 {
            return Err(invalid(
                "--max-concurrent-streams (HUB_MAX_CONCURRENT_STREAMS)",
                "must be at least 1",
            ));
        }
        let nats = nats_settings(&args)?;
        let webhook = webhook_settings(&args)?;
        let guard = args.guard.into_settings()?;
        if args.listen == args.http_listen && args.listen.port() != 0 {
            return Err(invalid(
                "--http-listen (HUB_HTTP_LISTEN)",
                "must differ from --listen",
            ));
        }
        let tls = tls_identity(args.tls_cert.as_deref(), args.tls_key.as_deref())?;
        let tls_client_auth = client_auth(
            args.tls_client_ca.as_deref(),
            args.tls_client_auth,
            tls.is_some(),
        )?;
        let http_tls = match (args.http_tls, tls.is_some()) {
            (Some(Switch::On), false) => {
                return Err(invalid(HTTP_TLS, "needs --tls-cert and --tls-key"));
            }
            (Some(Switch::Off), _) => false,
            (_, identity) => identity,
        };
        let spoke_endpoints = spoke_endpoints(args.spoke_endpoints)?;
        if let Some(url) = &args.advertise_url {
            check_spoke_endpoint(url).map_err(|reason| invalid(ADVERTISE_URL, reason))?;
            let https = url.starts_with("https://");
            if https != tls.is_some() {
                return Err(invalid(
                    ADVERTISE_URL,
                    "must be https:// when the hub serves TLS (--tls-cert), http:// otherwise",
                ));
            }
        }

        let data_dir = &global.data_dir;
        create_private_dir(data_dir).map_err(|source| ConfigError::Io {
            option: "--data-dir (HUB_DATA_DIR)",
            path: data_dir.clone(),
            source,
        })?;
        let database_url = match args.database_url {
            Some(url) if url.starts_with("sqlite:") || crate::store::is_postgres_url(&url) => url,
            Some(_) => {
                return Err(invalid(
                    "--database-url (DATABASE_URL)",
                    "must be a sqlite:, postgres:// or postgresql:// URL",
                ));
            }
            None => format!("sqlite://{}", data_dir.join("hub.db").display()),
        };
        if !(1..=1024).contains(&args.database_pool_size) {
            return Err(invalid(
                "--database-pool-size (HUB_DATABASE_POOL_SIZE)",
                "must be between 1 and 1024",
            ));
        }
        let (admin_token, admin_token_source) = secret(
            global.admin_token.clone(),
            data_dir,
            "admin.token",
            "--admin-token (HUB_ADMIN_TOKEN)",
        )?;
        let (enrollment_token, enrollment_token_source) = secret(
            args.enrollment_token,
            data_dir,
            "enrollment.token",
            "--enrollment-token (HUB_ENROLLMENT_TOKEN)",
        )?;
        if admin_token == enrollment_token {
            return Err(invalid(
                "--enrollment-token (HUB_ENROLLMENT_TOKEN)",
                "must differ from the admin token",
            ));
        }

        let settings = Settings {
            heartbeat_interval: args.heartbeat_interval,
            keepalive_interval: args.keepalive_interval,
            ack_deadline: args.ack_deadline,
            max_attempts: args.max_attempts,
            default_in_flight: args.default_in_flight,
            max_in_flight: args.max_in_flight,
            max_message_bytes: args.max_message_bytes,
            max_payload_bytes: args.max_payload_bytes,
            max_points_per_batch: args.max_points_per_batch,
            max_concurrent_streams: args.max_concurrent_streams,
            http2_keepalive_interval: args.http2_keepalive_interval,
            http2_keepalive_timeout: args.http2_keepalive_timeout,
            shutdown_grace: args.shutdown_grace,
            event_retention: args.event_retention,
            metric_retention: args.metric_retention,
            directive_retention: args.directive_retention,
            idempotency_retention: args.idempotency_retention,
            tls,
            tls_client_auth,
            http_tls,
            guard,
            spoke_endpoints,
            nats,
            webhook,
            ..Settings::default()
        };
        Ok(Self {
            data_dir: data_dir.clone(),
            listen: args.listen,
            http_listen: args.http_listen,
            database_url,
            advertise_url: args.advertise_url,
            database_pool_size: args.database_pool_size,
            database_connect_timeout: args.database_connect_timeout,
            admin_token,
            admin_token_source,
            enrollment_token,
            enrollment_token_source,
            settings,
            log_format: args.log_format,
            durability: args.sync,
        })
    }
}

/// Longest interval or timeout accepted: timers add these to the current
/// instant, which panics past the clock's range, and beyond a day they are
/// surely a typo.
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Longest retention accepted (ten years).
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

/// What range a duration option takes.
#[derive(Clone, Copy)]
enum Span {
    /// An interval or timeout: more than zero, at most [`MAX_INTERVAL`].
    Interval,
    /// The shutdown grace: zero (stop at once) to [`MAX_INTERVAL`].
    Grace,
    /// A retention: more than zero, at most [`MAX_RETENTION`].
    Retention,
}

/// Checks every duration option against its [`Span`]; the error names the
/// flag and its environment variable.
fn check_durations(args: &ServeArgs) -> Result<(), ConfigError> {
    use Span::{Grace, Interval, Retention};
    let checks = [
        (
            args.heartbeat_interval,
            Interval,
            "--heartbeat-interval (HUB_HEARTBEAT_INTERVAL)",
        ),
        (
            args.keepalive_interval,
            Interval,
            "--keepalive-interval (HUB_KEEPALIVE_INTERVAL)",
        ),
        (
            args.http2_keepalive_interval,
            Interval,
            "--http2-keepalive-interval (HUB_HTTP2_KEEPALIVE_INTERVAL)",
        ),
        (
            args.http2_keepalive_timeout,
            Interval,
            "--http2-keepalive-timeout (HUB_HTTP2_KEEPALIVE_TIMEOUT)",
        ),
        (
            args.database_connect_timeout,
            Interval,
            "--database-connect-timeout (HUB_DATABASE_CONNECT_TIMEOUT)",
        ),
        (
            args.shutdown_grace,
            Grace,
            "--shutdown-grace (HUB_SHUTDOWN_GRACE)",
        ),
        (
            args.event_retention,
            Retention,
            "--event-retention (HUB_EVENT_RETENTION)",
        ),
        (
            args.metric_retention,
            Retention,
            "--metric-retention (HUB_METRIC_RETENTION)",
        ),
        (
            args.directive_retention,
            Retention,
            "--directive-retention (HUB_DIRECTIVE_RETENTION)",
        ),
        (
            args.idempotency_retention,
            Retention,
            "--idempotency-retention (HUB_IDEMPOTENCY_RETENTION)",
        ),
    ];
    for (value, span, option) in checks {
        let (zero_ok, max, max_text) = match span {
            Interval => (false, MAX_INTERVAL, "24h"),
            Grace => (true, MAX_INTERVAL, "24h"),
            Retention => (false, MAX_RETENTION, "3650d"),
        };
        if value.is_zero() && !zero_ok {
            return Err(invalid(option, "must be greater than zero"));
        }
        if value > max {
            return Err(invalid(option, format!("must be at most {max_text}")));
        }
    }
    Ok(())
}

const SPOKE_ENDPOINTS: &str = "--spoke-endpoints (HUB_SPOKE_ENDPOINTS)";
const NAME: &str = "--name (HUB_NAME)";
const NATS_URL: &str = "--events-nats-url (HUB_EVENTS_NATS_URL)";
const NATS_PREFIX: &str = "--events-nats-subject-prefix (HUB_EVENTS_NATS_SUBJECT_PREFIX)";
const NATS_STREAM: &str = "--events-nats-stream (HUB_EVENTS_NATS_STREAM)";
const NATS_CREDS: &str = "--events-nats-creds (HUB_EVENTS_NATS_CREDS)";
const NATS_TLS_CA: &str = "--events-nats-tls-ca (HUB_EVENTS_NATS_TLS_CA)";

/// The NATS publisher's settings, checked; `None` without a URL. The
/// hub's name is checked either way.
fn nats_settings(args: &ServeArgs) -> Result<Option<crate::nats::NatsSettings>, ConfigError> {
    let name = args.name.trim();
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(invalid(NAME, "1 to 255 characters, no control characters"));
    }
    let Some(url) = args.events_nats_url.as_deref().map(str::trim) else {
        return Ok(None);
    };
    if url.is_empty() {
        return Ok(None);
    }
    for server in url.split(',') {
        let server = server.trim();
        let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|s| server.starts_with(s));
        if !scheme_ok || server.parse::<http::Uri>().is_err() {
            return Err(invalid(
                NATS_URL,
                format!("{server:?}: not a nats://host:port or tls://host:port URL"),
            ));
        }
    }
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let prefix = args.events_nats_subject_prefix.trim();
    if !prefix.split('.').all(token_ok) {
        return Err(invalid(
            NATS_PREFIX,
            "dot-separated tokens of letters, digits, '_' and '-' (no wildcards or spaces)",
        ));
    }
    let stream = args.events_nats_stream.trim();
    if !token_ok(stream) {
        return Err(invalid(
            NATS_STREAM,
            "letters, digits, '_' and '-' (JetStream stream names take no '.', spaces or wildcards)",
        ));
    }
    for (option, path) in [
        (NATS_CREDS, &args.events_nats_creds),
        (NATS_TLS_CA, &args.events_nats_tls_ca),
    ] {
        if let Some(path) = path {
            std::fs::metadata(path).map_err(|source| ConfigError::Io {
                option,
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(Some(crate::nats::NatsSettings {
        url: url.to_owned(),
        subject_prefix: prefix.to_owned(),
        stream: stream.to_owned(),
        create_stream: matches!(args.events_nats_create_stream, Switch::On),
        source: name.to_owned(),
        creds_file: args.events_nats_creds.clone(),
        token: args.events_nats_token.clone(),
        tls_ca: args.events_nats_tls_ca.clone(),
    }))
}
const WEBHOOK_CA: &str = "--webhook-ca (HUB_WEBHOOK_CA)";

/// How webhook requests are made, checked.
fn webhook_settings(args: &ServeArgs) -> Result<crate::webhook::WebhookSettings, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    for (value, option) in [
        (
            args.webhook_connect_timeout,
            "--webhook-connect-timeout (HUB_WEBHOOK_CONNECT_TIMEOUT)",
        ),
        (
            args.webhook_timeout,
            "--webhook-timeout (HUB_WEBHOOK_TIMEOUT)",
        ),
    ] {
        if value < Duration::from_millis(100) || value > Duration::from_secs(600) {
            return Err(invalid(option, "must be between 100ms and 10m"));
        }
    }
    for (value, option) in [
        (
            args.webhook_concurrency,
            "--webhook-concurrency (HUB_WEBHOOK_CONCURRENCY)",
        ),
        (
            args.webhook_spoke_concurrency,
            "--webhook-spoke-concurrency (HUB_WEBHOOK_SPOKE_CONCURRENCY)",
        ),
    ] {
        if !(1..=4096).contains(&value) {
            return Err(invalid(option, "must be between 1 and 4096"));
        }
    }
    let mut extra_roots = Vec::new();
    if let Some(path) = &args.webhook_ca {
        let pem = std::fs::read(path).map_err(|source| ConfigError::Io {
            option: WEBHOOK_CA,
            path: path.clone(),
            source,
        })?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            extra_roots
                .push(cert.map_err(|e| invalid(WEBHOOK_CA, format!("not PEM certificates: {e}")))?);
        }
        if extra_roots.is_empty() {
            return Err(invalid(WEBHOOK_CA, "holds no PEM certificate"));
        }
    }
    Ok(crate::webhook::WebhookSettings {
        connect_timeout: args.webhook_connect_timeout,
        timeout: args.webhook_timeout,
        concurrency: args.webhook_concurrency,
        per_spoke: args.webhook_spoke_concurrency,
        allow_link_local: args.webhook_allow_link_local,
        extra_roots,
        own_ports: Vec::new(),
    })
}

const ADVERTISE_URL: &str = "--advertise-url (HUB_ADVERTISE_URL)";
/// Most endpoints in the hint, and longest URL: the contract's bounds
/// (`HubHints.endpoints`), since the hint goes out in every Register reply.
const MAX_SPOKE_ENDPOINTS: usize = 16;
const MAX_SPOKE_ENDPOINT_CHARS: usize = 1024;

/// Checks the endpoints spokes are told to move to: each an `http://` or
/// `https://` URL with a host and nothing after the port, all of one scheme
/// (spoke-client refuses a mix, which would carry keys in clear), none
/// twice, a bounded number.
fn spoke_endpoints(urls: Vec<String>) -> Result<Vec<String>, ConfigError> {
    // `HUB_SPOKE_ENDPOINTS=` (set but empty) means no hint, as unset does.
    if let [only] = urls.as_slice()
        && only.trim().is_empty()
    {
        return Ok(Vec::new());
    }
    if urls.len() > MAX_SPOKE_ENDPOINTS {
        return Err(invalid(
            SPOKE_ENDPOINTS,
            format!("at most {MAX_SPOKE_ENDPOINTS} endpoints"),
        ));
    }
    let mut checked: Vec<String> = Vec::with_capacity(urls.len());
    for url in urls {
        let url = url.trim().to_owned();
        check_spoke_endpoint(&url).map_err(|reason| invalid(SPOKE_ENDPOINTS, reason))?;
        if checked.contains(&url) {
            return Err(invalid(SPOKE_ENDPOINTS, format!("{url} given twice")));
        }
        checked.push(url);
    }
    let https = checked.iter().filter(|u| u.starts_with("https://")).count();
    if https != 0 && https != checked.len() {
        return Err(invalid(
            SPOKE_ENDPOINTS,
            "mixed http:// and https:// endpoints: spokes would send their keys in clear \
             to the http:// ones; use one scheme",
        ));
    }
    Ok(checked)
}

/// One endpoint of `--spoke-endpoints`; answers why it is unusable.
fn check_spoke_endpoint(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("an empty endpoint (a stray comma?)".into());
    }
    if url.chars().count() > MAX_SPOKE_ENDPOINT_CHARS {
        return Err(format!(
            "an endpoint longer than {MAX_SPOKE_ENDPOINT_CHARS} characters"
        ));
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: not a URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url}: must start with http:// or https://"));
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| format!("{url}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url}: no user name or password in the URL"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url}: nothing after the host and port (a gRPC endpoint has no path)"
        ));
    }
    Ok(())
}

const TLS_CERT: &str = "--tls-cert (HUB_TLS_CERT)";
const TLS_KEY: &str = "--tls-key (HUB_TLS_KEY)";

/// Reads and checks the TLS certificate and key: both or neither.
fn tls_identity(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<TlsIdentity>, ConfigError> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => return Err(invalid(TLS_KEY, "required with --tls-cert")),
        (None, Some(_)) => return Err(invalid(TLS_CERT, "required with --tls-key")),
    };
    let read = |path: &Path, option| {
        std::fs::read(path).map_err(|source| ConfigError::Io {
            option,
            path: path.to_path_buf(),
            source,
        })
    };
    let identity = TlsIdentity::from_pem(read(cert, TLS_CERT)?, read(key, TLS_KEY)?);
    identity.map(Some).map_err(|e| match e {
        TlsError::Cert(reason) => invalid(TLS_CERT, format!("{}: {reason}", cert.display())),
        TlsError::Key(reason) => invalid(TLS_KEY, format!("{}: {reason}", key.display())),
        other => invalid(TLS_CERT, other.to_string()),
    })
}

const TLS_CLIENT_CA: &str = "--tls-client-ca (HUB_TLS_CLIENT_CA)";
const TLS_CLIENT_AUTH: &str = "--tls-client-auth (HUB_TLS_CLIENT_AUTH)";
const HTTP_TLS: &str = "--http-tls (HUB_HTTP_TLS)";

/// Reads and checks the CA for client certificates: only over TLS.
fn client_auth(
    ca: Option<&Path>,
    mode: Option<ClientAuthMode>,
    identity: bool,
) -> Result<Option<ClientAuth>, ConfigError> {
    let Some(ca) = ca else {
        return match mode {
            Some(_) => Err(invalid(TLS_CLIENT_AUTH, "needs --tls-client-ca")),
            None => Ok(None),
        };
    };
    if !identity {
        return Err(invalid(TLS_CLIENT_CA, "needs --tls-cert and --tls-key"));
    }
    let pem = std::fs::read(ca).map_err(|source| ConfigError::Io {
        option: TLS_CLIENT_CA,
        path: ca.to_path_buf(),
        source,
    })?;
    ClientAuth::from_pem(pem, mode.unwrap_or_default())
        .map(Some)
        .map_err(|e| invalid(TLS_CLIENT_CA, format!("{}: {e}", ca.display())))
}

/// A configured secret, or the one in `dir/file`, generated (mode 0600) on
/// first start.
fn secret(
    configured: Option<String>,
    dir: &Path,
    file: &str,
    option: &'static str,
) -> Result<(String, SecretSource), ConfigError> {
    if let Some(token) = configured {
        if token.trim().len() < MIN_TOKEN_LEN {
            return Err(invalid(
                option,
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        return Ok((token.trim().to_owned(), SecretSource::Configured));
    }
    let path = dir.join(file);
    let io = |source| ConfigError::Io {
        option,
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.len() < MIN_TOKEN_LEN {
                return Err(invalid(
                    option,
                    format!("{} holds too short a token", path.display()),
                ));
            }
            Ok((token, SecretSource::File(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::auth::generate_secret();
            write_private(&path, &token).map_err(io)?;
            Ok((token, SecretSource::File(path)))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{contents}\n"))
}

/// Creates the data directory (and missing parents) mode 0700: it holds the
/// database and the tokens. An existing directory keeps its mode (the
/// store warns when others can read it).
#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Parses durations like `10s`, `250ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 250ms, 2m, 1h or 7d"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => {
            return Err(format!(
                "{s:?} is not a duration like 10s, 250ms, 2m, 1h or 7d"
            ));
        }
    };
    // Each option has its own, smaller bound (see `check_durations`); this
    // one holds for any duration flag, so no timer is ever handed one that
    // overflows the clock.
    if d > MAX_RETENTION {
        return Err(format!("{s:?} is longer than 3650d"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["hub", "serve", "--data-dir", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).unwrap();
        match cli.command {
            Command::Serve(a) => Config::load(*a, &cli.global),
            Command::Client(_) => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn durations_are_bounded_and_errors_name_the_flag_and_variable() {
        let dir = tempfile::tempdir().unwrap();
        let intervals = [
            ("--heartbeat-interval", "HUB_HEARTBEAT_INTERVAL"),
            ("--keepalive-interval", "HUB_KEEPALIVE_INTERVAL"),
            ("--http2-keepalive-interval", "HUB_HTTP2_KEEPALIVE_INTERVAL"),
            ("--http2-keepalive-timeout", "HUB_HTTP2_KEEPALIVE_TIMEOUT"),
            ("--shutdown-grace", "HUB_SHUTDOWN_GRACE"),
            ("--ack-deadline", "HUB_ACK_DEADLINE"),
        ];
        for (flag, var) in intervals {
            let err = load(dir.path(), &[flag, "25h"]).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{flag} ({var}): ")), "{err}");
            assert!(load(dir.path(), &[flag, "24h"]).is_ok(), "{flag} 24h");
        }
        for flag in [
            "--event-retention",
            "--metric-retention",
            "--directive-retention",
            "--idempotency-retention",
        ] {
            assert!(load(dir.path(), &[flag, "3650d"]).is_ok(), "{flag}");
            let err = load(dir.path(), &[flag, "0s"]).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
        let err = load(dir.path(), &["--keepalive-interval", "0ms"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--keepalive-interval (HUB_KEEPALIVE_INTERVAL): must be greater than zero"
        );
        assert!(load(dir.path(), &["--shutdown-grace", "0s"]).is_ok());
        // Far past any bound: refused while parsing, naming the flag.
        let argv = ["hub", "serve", "--keepalive-interval", "106751991167300d"];
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("--keepalive-interval"), "{err}");
        assert!(parse_duration("3651d").is_err());
        assert_eq!(
            parse_duration("3650d").unwrap(),
            Duration::from_secs(3650 * 86_400)
        );
    }

    #[test]
    fn tokens_are_generated_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let first = load(dir.path(), &[]).unwrap();
        let second = load(dir.path(), &[]).unwrap();
        assert_eq!(first.admin_token, second.admin_token);
        assert_ne!(first.admin_token, first.enrollment_token);
        let path = dir.path().join("admin.token");
        assert_eq!(first.admin_token_source, SecretSource::File(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(first.database_url.ends_with("hub.db"));
    }

    #[test]
    fn postgres_urls_and_pool_options_reach_the_store_options() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = load(dir.path(), &[]).unwrap().store_options();
        assert_eq!(defaults, crate::store::Options::default());
        for url in [
            "postgres://hub:secret@db.internal:5432/fleet",
            "postgresql://hub@db.internal/fleet?sslmode=require",
        ] {
            let config = load(
                dir.path(),
                &[
                    "--database-url",
                    url,
                    "--database-pool-size",
                    "3",
                    "--database-connect-timeout",
                    "750ms",
                    "--sync",
                    "normal",
                ],
            )
            .unwrap();
            assert_eq!(config.database_url, url);
            let options = config.store_options();
            assert_eq!(options.pool_size, 3);
            assert_eq!(options.connect_timeout, Duration::from_millis(750));
            assert_eq!(options.durability, Durability::Normal);
        }
    }

    #[test]
    fn sync_is_full_unless_told_normal() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), &[]).unwrap().durability, Durability::Full);
        let normal = load(dir.path(), &["--sync", "normal"]).unwrap();
        assert_eq!(normal.durability, Durability::Normal);
        let argv = ["hub", "serve", "--sync", "sometimes"];
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("--sync"), "{err}");
    }

    #[test]
    fn errors_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), &["--admin-token", "short"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--admin-token (HUB_ADMIN_TOKEN)"),
            "{err}"
        );
        let err = load(dir.path(), &["--default-in-flight", "500"]).unwrap_err();
        assert!(err.to_string().starts_with("--default-in-flight"), "{err}");
        let err = load(dir.path(), &["--database-url", "mysql://x"]).unwrap_err();
        assert!(
            err.to_string().starts_with("--database-url (DATABASE_URL)"),
            "{err}"
        );
        let err = load(dir.path(), &["--database-pool-size", "0"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--database-pool-size (HUB_DATABASE_POOL_SIZE)"),
            "{err}"
        );
        let err = load(dir.path(), &["--database-connect-timeout", "0s"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--database-connect-timeout (HUB_DATABASE_CONNECT_TIMEOUT)"),
            "{err}"
        );
        let parse = Cli::try_parse_from(["hub", "serve", "--listen", "nowhere"]).unwrap_err();
        assert!(parse.to_string().contains("--listen"), "{parse}");
    }

    #[test]
    fn nats_publishing_is_off_without_a_url_and_its_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), &[]).unwrap().settings.nats.is_none());
        let on = load(
            dir.path(),
            &[
                "--events-nats-url",
                "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
                "--name",
                "eu-west",
                "--events-nats-subject-prefix",
                "fleet.events",
                "--events-nats-create-stream",
                "off",
            ],
        )
        .unwrap()
        .settings
        .nats
        .unwrap();
        assert_eq!(on.url, "nats://127.0.0.1:4222,nats://127.0.0.1:4223");
        assert_eq!(on.source, "eu-west");
        assert_eq!(on.subject_prefix, "fleet.events");
        assert_eq!(on.stream, "HUB_EVENTS");
        assert!(!on.create_stream);
        let missing = dir.path().join("missing.creds");
        let missing = missing.to_str().unwrap();
        for (args, flag) in [
            (vec!["--events-nats-url", "http://x:1"], "--events-nats-url"),
            (
                vec![
                    "--events-nats-url",
                    "nats://x:1",
                    "--events-nats-subject-prefix",
                    "a.*",
                ],
                "--events-nats-subject-prefix",
            ),
            (
                vec![
                    "--events-nats-url",
                    "nats://x:1",
                    "--events-nats-subject-prefix",
                    "a..b",
                ],
                "--events-nats-subject-prefix",
            ),
            (
                vec![
                    "--events-nats-url",
                    "nats://x:1",
                    "--events-nats-stream",
                    "a.b",
                ],
                "--events-nats-stream",
            ),
            (
                vec![
                    "--events-nats-url",
                    "nats://x:1",
                    "--events-nats-creds",
                    missing,
                ],
                "--events-nats-creds",
            ),
            (vec!["--name", " "], "--name"),
        ] {
            let err = load(dir.path(), &args).unwrap_err();
            assert!(err.to_string().starts_with(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_advertised_url_is_the_flag_or_the_bound_address() {
        let dir = tempfile::tempdir().unwrap();
        let config = load(dir.path(), &[]).unwrap();
        assert_eq!(
            config.advertised_url("0.0.0.0:7000".parse().unwrap()),
            "http://127.0.0.1:7000"
        );
        assert_eq!(
            config.advertised_url("[::]:7000".parse().unwrap()),
            "http://[::1]:7000"
        );
        assert_eq!(
            config.advertised_url("10.1.2.3:7000".parse().unwrap()),
            "http://10.1.2.3:7000"
        );
        let given = load(
            dir.path(),
            &["--advertise-url", "http://hub-a.internal:7000"],
        )
        .unwrap();
        assert_eq!(
            given.advertised_url("0.0.0.0:1".parse().unwrap()),
            "http://hub-a.internal:7000"
        );
        for bad in ["hub-a:7000", "http://hub-a:7000/path", "https://hub-a:7000"] {
            let err = load(dir.path(), &["--advertise-url", bad]).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("--advertise-url (HUB_ADVERTISE_URL)"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn spoke_endpoints_are_checked_and_errors_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load(dir.path(), &[])
                .unwrap()
                .settings
                .spoke_endpoints
                .is_empty()
        );
        let config = load(
            dir.path(),
            &[
                "--spoke-endpoints",
                "https://hub-b.example:7443, https://hub-c.example",
            ],
        )
        .unwrap();
        assert_eq!(
            config.settings.spoke_endpoints,
            ["https://hub-b.example:7443", "https://hub-c.example"]
        );
        let none = load(dir.path(), &["--spoke-endpoints", ""]).unwrap();
        assert!(none.settings.spoke_endpoints.is_empty());
        let refused = [
            (
                "ftp://hub-b.example:21",
                "must start with http:// or https://",
            ),
            ("hub-b.example:7443", "must start with http:// or https://"),
            ("https://", "not a URL"),
            (
                "https://hub-b.example:7443/hub",
                "nothing after the host and port",
            ),
            (
                "https://hub-b.example?x=1",
                "nothing after the host and port",
            ),
            ("https://user:pw@hub-b.example", "no user name or password"),
            ("https://hub b.example", "not a URL"),
            ("https://hub-b.example,", "an empty endpoint"),
            (
                "https://a.example,http://b.example",
                "mixed http:// and https://",
            ),
            ("http://a.example,http://a.example", "given twice"),
        ];
        for (value, why) in refused {
            let err = load(dir.path(), &["--spoke-endpoints", value])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("--spoke-endpoints (HUB_SPOKE_ENDPOINTS): "),
                "{value}: {err}"
            );
            assert!(err.contains(why), "{value}: {err}");
        }
        let many = (0..17)
            .map(|i| format!("http://hub-{i}.example"))
            .collect::<Vec<_>>()
            .join(",");
        let err = load(dir.path(), &["--spoke-endpoints", &many]).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
        let long = format!("https://{}.example", "h".repeat(1024));
        let err = load(dir.path(), &["--spoke-endpoints", &long]).unwrap_err();
        assert!(err.to_string().contains("longer than 1024"), "{err}");
    }

    /// A certificate for 127.0.0.1 and its key, self-signed.
    fn self_signed(dir: &Path) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.join("hub.crt"), dir.join("hub.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (
            cert_path.to_str().unwrap().to_owned(),
            key_path.to_str().unwrap().to_owned(),
        )
    }

    #[test]
    fn tls_needs_a_readable_matching_certificate_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let config = load(dir.path(), &["--tls-cert", &cert, "--tls-key", &key]).unwrap();
        assert!(config.settings.tls.is_some());
        assert!(load(dir.path(), &[]).unwrap().settings.tls.is_none());

        let err = load(dir.path(), &["--tls-cert", &cert]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tls-key (HUB_TLS_KEY): required with --tls-cert"
        );
        let err = load(dir.path(), &["--tls-key", &key]).unwrap_err();
        assert!(
            err.to_string().starts_with("--tls-cert (HUB_TLS_CERT)"),
            "{err}"
        );

        let missing = dir.path().join("missing.crt");
        let err = load(
            dir.path(),
            &["--tls-cert", missing.to_str().unwrap(), "--tls-key", &key],
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("--tls-cert (HUB_TLS_CERT): "),
            "{err}"
        );
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let garbage = dir.path().join("garbage.crt");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let err = load(
            dir.path(),
            &["--tls-cert", garbage.to_str().unwrap(), "--tls-key", &key],
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("--tls-cert (HUB_TLS_CERT): "),
            "{err}"
        );
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");

        // A certificate with the key of another one.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = self_signed(other.path());
        let err = load(dir.path(), &["--tls-cert", &cert, "--tls-key", &other_key]).unwrap_err();
        assert!(
            err.to_string().starts_with("--tls-key (HUB_TLS_KEY): "),
            "{err}"
        );
        // The certificate file given as the key.
        let err = load(dir.path(), &["--tls-cert", &cert, "--tls-key", &cert]).unwrap_err();
        assert!(
            err.to_string().starts_with("--tls-key (HUB_TLS_KEY): "),
            "{err}"
        );
    }
}
