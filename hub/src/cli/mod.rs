//! The operator CLI: subcommands of the `hub` binary that call
//! `AdminService` on a running hub and print aligned tables, or JSON with
//! `--json`. The address and admin token come from flags, `HUB_ADDR` /
//! `HUB_ADMIN_TOKEN`, or the local data directory of a hub running on this
//! machine.

mod batch;
mod commands;
mod render;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hub_proto::v1::admin_service_client::AdminServiceClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub use commands::run;

use crate::error::causes;

/// Where the hub is and how to authenticate, shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// gRPC address of the hub [default: from <data-dir>/grpc.addr, else 127.0.0.1:50051].
    #[arg(long, env = "HUB_ADDR", global = true)]
    pub addr: Option<String>,
    /// Admin token: `serve` uses it instead of generating one, client commands send it [default: <data-dir>/admin.token].
    #[arg(long, env = "HUB_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// Data directory: `serve` keeps its database and generated tokens there; client commands find a local hub's address and admin token there.
    #[arg(
        long,
        env = "HUB_DATA_DIR",
        default_value = "./hub-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Print JSON (proto3 JSON mapping) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// PEM CA certificate to trust for an https:// --addr [default: the system's roots].
    #[arg(long, env = "HUB_TLS_CA", value_name = "PATH", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to show a hub that asks for one (its
    /// --tls-client-ca); needs --tls-client-key and an https:// --addr.
    #[arg(
        long,
        env = "HUB_TLS_CLIENT_CERT",
        value_name = "PATH",
        global = true,
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(
        long,
        env = "HUB_TLS_CLIENT_KEY",
        value_name = "PATH",
        global = true,
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

/// The client subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// List spokes with health, last heartbeat, version, labels and outstanding directives.
    Spokes,
    /// Show one spoke: details, capabilities and recent directives.
    Spoke {
        /// The spoke's name.
        name: String,
    },
    /// Send a directive to one spoke, a label selector, or all spokes; or
    /// many, one per line of a file (--from).
    Send(Box<SendArgs>),
    /// List directives, newest first.
    Directives {
        /// Only this spoke (name).
        #[arg(long)]
        spoke: Option<String>,
        /// Only this state (pending, delivered, in_progress, completed, failed, rejected, expired, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only this directive type.
        #[arg(long = "type")]
        directive_type: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one directive with its payload and result.
    Directive {
        /// The directive id.
        id: String,
    },
    /// Cancel a directive that is not final yet.
    Cancel {
        /// The directive id.
        id: String,
        /// Why (shown to the spoke).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Query metric points.
    Metrics {
        /// Only this spoke (name).
        #[arg(long)]
        spoke: Option<String>,
        /// Only this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only this metric name.
        #[arg(long)]
        name: Option<String>,
        /// Only points measured within this long before now (e.g. 1h, 30m).
        #[arg(long, value_parser = crate::config::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show stored events; with --follow keep streaming live ones.
    Events {
        /// Keep following new events (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Only this event type (e.g. directive_completed); repeatable.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only events about this spoke (name).
        #[arg(long)]
        spoke: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Revoke a spoke: its key stops working at once.
    Revoke {
        /// The spoke's name.
        name: String,
    },
    /// Delete a spoke: its key stops working, its directives that are not
    /// final are cancelled, and its name is free to register again.
    DeleteSpoke {
        /// The spoke's name.
        name: String,
        /// Confirm: deleting cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Give a spoke a new key (printed once); the old one stops working.
    RotateKey {
        /// The spoke's name.
        name: String,
    },
}

/// Options of `hub send`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "selector", "all", "from"])))]
pub struct SendArgs {
    /// The directive type (e.g. sync_doc).
    #[arg(value_name = "TYPE", required_unless_present = "from")]
    pub directive_type: Option<String>,
    /// One spoke, by name.
    #[arg(long)]
    pub to: Option<String>,
    /// Every spoke with these labels: k=v,k2=v2.
    #[arg(long)]
    pub selector: Option<String>,
    /// Every spoke.
    #[arg(long)]
    pub all: bool,
    /// The payload: a JSON object, or @file to read it from a file.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Higher is delivered first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Expire if not final within this long (e.g. 10m).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub expires_in: Option<std::time::Duration>,
    /// Time the spoke has to ack each delivery (e.g. 30s).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub ack_deadline: Option<std::time::Duration>,
    /// Deliveries before the directive fails.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Repeating a send with the same key creates nothing new.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Replace a PENDING directive with the same key for the same spoke.
    #[arg(long)]
    pub coalesce_key: Option<String>,
    /// Send even if the spoke did not declare the type.
    #[arg(long)]
    pub force: bool,
    /// Send many directives through CreateDirectives: JSON lines, one
    /// CreateDirectiveRequest in its proto3 JSON form per line, e.g.
    /// {"target": {"spokeName": "a"}, "type": "sync_doc", "payload": {...}};
    /// `-` reads standard input. Every line is checked before anything is
    /// sent, and each line sets all of its own options.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "directive_type", "payload", "priority", "expires_in", "ack_deadline",
            "max_attempts", "idempotency_key", "coalesce_key", "force",
        ],
    )]
    pub from: Option<String>,
}

/// A CLI failure: one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The hub answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// The hub could not be reached.
    #[error("cannot reach the hub at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The command line or its inputs are unusable.
    #[error("{0}")]
    Usage(String),
    /// Some items of a batch failed (each is reported in the output).
    #[error("{0}")]
    ItemsFailed(String),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// The canonical upper-case name of a gRPC code (e.g. NOT_FOUND).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

type Admin = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

impl Connection {
    /// The address to use: flag or env, else the running local hub's, else
    /// the default.
    fn address(&self) -> String {
        let addr = self.addr.clone().unwrap_or_else(|| {
            std::fs::read_to_string(self.data_dir.join("grpc.addr"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "127.0.0.1:50051".to_owned())
        });
        if addr.contains("://") {
            addr
        } else if self.tls_ca.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// TLS for an `https://` address: the `--tls-ca` certificate, else the
    /// system's roots; and the client certificate, if one is given.
    fn tls(&self, addr: &str) -> Result<Option<ClientTlsConfig>, CliError> {
        if !addr.starts_with("https://") {
            let flag = if self.tls_ca.is_some() {
                Some("--tls-ca (HUB_TLS_CA)")
            } else if self.tls_client_cert.is_some() {
                Some("--tls-client-cert (HUB_TLS_CLIENT_CERT)")
            } else {
                None
            };
            return match flag {
                Some(flag) => Err(CliError::Usage(format!(
                    "{flag} needs an https:// address, not {addr}"
                ))),
                None => Ok(None),
            };
        }
        let config = self.trust()?;
        let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) else {
            return Ok(Some(config));
        };
        let read = |path: &PathBuf, flag: &str| {
            std::fs::read(path)
                .map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
        };
        let cert = read(cert, "--tls-client-cert (HUB_TLS_CLIENT_CERT)")?;
        let key = read(key, "--tls-client-key (HUB_TLS_CLIENT_KEY)")?;
        Ok(Some(
            config.identity(tonic::transport::Identity::from_pem(cert, key)),
        ))
    }

    /// The CAs an `https://` hub's certificate may chain to.
    fn trust(&self) -> Result<ClientTlsConfig, CliError> {
        let Some(path) = &self.tls_ca else {
            return Ok(ClientTlsConfig::new().with_native_roots());
        };
        let bad = |reason: String| {
            CliError::Usage(format!(
                "--tls-ca (HUB_TLS_CA) {}: {reason}",
                path.display()
            ))
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
    }

    fn token(&self) -> Result<String, CliError> {
        if let Some(token) = &self.admin_token {
            return Ok(token.trim().to_owned());
        }
        let path = self.data_dir.join("admin.token");
        std::fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|e| {
            CliError::Usage(format!(
                "no admin token: pass --admin-token or HUB_ADMIN_TOKEN, or run where {} is readable ({e})",
                path.display()
            ))
        })
    }

    /// An AdminService client carrying the admin token.
    pub async fn connect(&self) -> Result<Admin, CliError> {
        let token = self.token()?;
        let addr = self.address();
        let header = format!("Bearer {token}").parse().map_err(|_| {
            CliError::Usage("the admin token has characters that cannot be sent".into())
        })?;
        let mut endpoint = Channel::from_shared(addr.clone())
            .map_err(|e| CliError::Usage(format!("--addr {addr:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(tls) = self.tls(&addr)? {
            endpoint = endpoint.tls_config(tls).map_err(|e| CliError::Connect {
                addr: addr.clone(),
                reason: causes(&e),
            })?;
        }
        let channel = endpoint.connect().await.map_err(|e| CliError::Connect {
            addr: addr.clone(),
            reason: causes(&e),
        })?;
        Ok(AdminServiceClient::with_interceptor(
            channel,
            BearerToken(header),
        ))
    }
}
