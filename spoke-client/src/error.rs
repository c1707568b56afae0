//! The crate's one error type.

use std::path::PathBuf;

use tonic::Code;

/// Everything that can go wrong in the spoke client.
///
/// ```no_run
/// # async fn demo(client: spoke_client::Client) {
/// match client.run().await {
///     Ok(()) => println!("shut down"),
///     Err(spoke_client::Error::Unauthenticated { message }) => {
///         eprintln!("key revoked ({message}): ask the operator for a new one");
///     }
///     Err(e) => eprintln!("spoke stopped: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given a value the client cannot work with.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The builder setter (or field) at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The hub refused this spoke's credentials. The key was revoked or
    /// rotated, or the state directory belongs to another hub; retrying with
    /// the same key cannot succeed. For a spoke key, `run` waits for a new
    /// one (see [`crate::keys`]) and returns this if shut down meanwhile; a
    /// refused enrollment token stops `run` with it at once.
    #[error(
        "the hub refused this spoke's credentials ({message}): the key was revoked or rotated, \
         or the state directory was registered with another hub; not retrying"
    )]
    Unauthenticated {
        /// The hub's message.
        message: String,
    },
    /// The hub refused a call with a code that retrying cannot fix (see
    /// [`crate::reconnect::classify`]).
    #[error("the hub refused the call with {code:?}: {message}; not retrying")]
    Refused {
        /// The gRPC code.
        code: Code,
        /// The hub's message.
        message: String,
    },
    /// The call needs a live connection to a hub and there is none right now.
    #[error("not connected to a hub")]
    NotConnected,
    /// The call needs [`Client::run`](crate::Client::run) to be running.
    #[error("the client is not running")]
    NotRunning,
    /// A call to the hub failed with a status that may go away on retry.
    #[error("call to the hub failed: {0}")]
    Status(#[source] Box<tonic::Status>),
    /// The local state database failed.
    #[error("local state: {0}")]
    Store(#[from] sqlx::Error),
    /// The local state database could not be migrated.
    #[error("local state migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The state directory could not be created or protected.
    #[error("state directory {path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The local state holds something this version cannot read.
    #[error("local state is corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// A configuration error naming the setter at fault.
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::Status(Box::new(status))
    }
}

/// What went wrong below an error, for one line of output: tonic's
/// transport error only says "transport error", its sources say why
/// ("tcp connect error: Connection refused", "invalid peer certificate:
/// UnknownIssuer"). The error itself when it has no source.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Some layers repeat their source in their own message.
        if !parts.last().is_some_and(|p| p.ends_with(&part)) {
            parts.push(part);
        }
        source = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
