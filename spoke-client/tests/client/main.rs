//! Integration tests of the spoke client against the real hub in process,
//! with real SQLite files on both sides.

mod support;

mod older_hub;
mod proxy;

mod acks;
mod auth;
mod directives;
mod metrics;
mod restarts;
mod status;
mod tls;
