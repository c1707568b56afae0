//! The hub: a gRPC control plane that pushes directives to spokes, takes
//! their acks and heartbeats, and stores their metrics.
//!
//! Components:
//! - [`config`]: flags and environment, validated before anything binds;
//! - [`cli`]: the operator subcommands (`hub spokes`, `hub send`, ...);
//! - [`server`]: assembles and runs the gRPC and HTTP servers ([`run`]);
//! - [`api`]: `SpokeService` and `AdminService`, the edge where wire types
//!   become domain values;
//! - [`spokes`], [`directives`], [`metrics`]: domain rules and validation;
//! - [`ledger`]: the in-memory state every decision is made against (the
//!   fleet, outstanding directives, delivery order and windows, due times,
//!   live streams), and the committer that writes its log in groups;
//! - [`events`]: the event log's types; [`timers`]: redelivery, expiry,
//!   the health sweeper and retention; [`clock`]: system or manual time;
//! - [`store`]: the database, the only module that touches sqlx: group
//!   commits of the ledger's log, the snapshot it is rebuilt from, queries;
//! - [`guard`]: connection caps and idle timeouts, per-spoke rate limits,
//!   the failed-authentication throttle and the enrollment limit;
//! - [`auth`]: keys and tokens; [`tls`]: the certificate and key of both
//!   ports, the CA for gRPC client certificates, the HTTP port's TLS
//!   listener; [`limits`]: the statuses of requests tonic
//!   could not read (too large, undecodable);
//! - [`http`]: health, readiness, `/metrics` and the admin page over HTTP;
//!   [`console`]: the operator console (admin pages); [`telemetry`]: the hub's own
//!   Prometheus metrics; [`shutdown`]: the
//!   drain signal;
//! - [`wire`]: well-known protobuf types to and from stored values;
//! - [`error`]: the error type and its one mapping to gRPC statuses;
//! - `testing` (feature `testing`): the in-process hub the tests share;
//!   `proptests` (tests only): properties of every wire → domain conversion.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod directives;
pub mod error;
pub mod events;
pub mod guard;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod nats;
#[cfg(test)]
mod proptests;
pub mod replica;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod spokes;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod timers;
pub mod tls;
pub mod webhook;
pub mod wire;

pub use clock::Clock;
pub use error::{Error, Result};
pub use server::{RunError, Secrets, run};
pub use settings::Settings;
pub use store::Store;
pub use tls::TlsIdentity;
