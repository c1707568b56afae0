//! The hub's error type and the one place it becomes a gRPC status.

use tonic::{Code, Status};

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing, malformed or unknown credentials.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A request field is missing or malformed; the string names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the proto (e.g. `payload` or `target.spoke_name`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The thing asked for does not exist (or belongs to another spoke).
    #[error("{0}")]
    NotFound(String),
    /// The thing already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The current state forbids the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size or rate limit was exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A rate limit refused the call; retrying after `retry_after` may
    /// work (sent as the `retry-after-ms` metadata entry too).
    #[error("{what}; retry after {} ms", retry_after_ms(*.retry_after))]
    RateLimited {
        /// Which limit, and its configuration.
        what: String,
        /// When room is expected.
        retry_after: std::time::Duration,
    },
    /// A position asked for is not (or no longer) available, e.g. events
    /// retention removed.
    #[error("{0}")]
    OutOfRange(String),
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    ShuttingDown,
    /// The hub cannot serve this now; retrying later may work.
    #[error("{0}")]
    Unavailable(&'static str),
    /// This replica does not lead (or no longer does): another one serves
    /// from the same database, and this one writes nothing.
    #[error("this hub replica does not lead its database; another replica serves, retry there")]
    NotLeading,
    /// The database failed; details are logged, not sent to the caller.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The writing connection failed; details are logged, not sent.
    #[error("database write error")]
    Write(#[source] rusqlite::Error),
    /// Stored data could not be decoded; details are logged.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// The metadata entry of a RESOURCE_EXHAUSTED answer from a rate limit:
/// milliseconds until a retry may succeed.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Whole milliseconds, rounded up, so "retry after 0 ms" never happens.
fn retry_after_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Short-hand for a result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        Self::Database(err)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Self::Write(err)
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::RateLimited { retry_after, .. } => {
                let mut status = Status::resource_exhausted(err.to_string());
                // What a client reads to back off (google.rpc.RetryInfo's
                // role, without a proto dependency).
                status.metadata_mut().insert(
                    RETRY_AFTER_MS,
                    tonic::metadata::MetadataValue::from(retry_after_ms(*retry_after)),
                );
                return status;
            }
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ShuttingDown | Error::Unavailable(_) | Error::NotLeading => Code::Unavailable,
            Error::Database(source) => {
                tracing::error!(error = %source, "database error");
                return match sqlx_transient(source) {
                    Some(why) => Status::unavailable(why),
                    None => Status::internal("internal error"),
                };
            }
            Error::Write(source) => {
                tracing::error!(error = %source, "database write error");
                return match rusqlite_transient(source) {
                    Some(why) => Status::unavailable(why),
                    None => Status::internal("internal error"),
                };
            }
            Error::Corrupt(what) => {
                tracing::error!(what = %what, "corrupt stored data");
                return Status::internal("internal error");
            }
        };
        Status::new(code, err.to_string())
    }
}

/// What a caller may retry: the database was locked by another process, or
/// its disk is full or failing. (SQLite's primary result codes.)
fn transient(primary: i32) -> Option<&'static str> {
    const BUSY: i32 = 5;
    const LOCKED: i32 = 6;
    const IOERR: i32 = 10;
    const FULL: i32 = 13;
    match primary {
        BUSY | LOCKED => Some("the hub's database is locked; retry shortly"),
        IOERR | FULL => Some("the hub cannot write to its database (disk full or failing)"),
        _ => None,
    }
}

fn sqlx_transient(err: &sqlx::Error) -> Option<&'static str> {
    match err {
        sqlx::Error::PoolTimedOut => Some("the hub's database is busy; retry shortly"),
        // A lost or refused connection (PostgreSQL over the network).
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            Some("the hub's database is unreachable; retry shortly")
        }
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return postgres_transient(pg.code());
            }
            let code: i32 = db.code()?.parse().ok()?;
            transient(code & 0xff)
        }
        _ => None,
    }
}

/// What a caller may retry on PostgreSQL, by SQLSTATE: the connection was
/// lost or the server is shutting down or starting, it is out of
/// resources, a lock or serialization conflict, a standby that takes no
/// writes (a failover), or a failing disk.
fn postgres_transient(sqlstate: &str) -> Option<&'static str> {
    match sqlstate {
        s if s.starts_with("08") => Some("the hub's database is unreachable; retry shortly"),
        "57P01" | "57P02" | "57P03" => Some("the hub's database is unreachable; retry shortly"),
        s if s.starts_with("53") => Some(
            "the hub's database is out of resources (disk, memory or connections); retry later",
        ),
        "40001" | "40P01" | "55P03" => Some("the hub's database is locked; retry shortly"),
        "25006" => Some("the hub's database takes no writes now (a standby); retry later"),
        "58000" | "58030" => Some("the hub cannot write to its database (disk full or failing)"),
        _ => None,
    }
}

fn rusqlite_transient(err: &rusqlite::Error) -> Option<&'static str> {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => transient(e.extended_code & 0xff),
        _ => None,
    }
}

/// What went wrong below an error, for one line of output: tonic's
/// transport error only says "transport error", its sources say why
/// ("tcp connect error: Connection refused", "invalid peer certificate:
/// UnknownIssuer"). The error itself when it has no source.
pub fn causes(e: &dyn std::error::Error) -> String {
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
