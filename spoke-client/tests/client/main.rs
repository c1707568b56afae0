//! Integration tests of the spoke client against the real hub in process,
//! with real SQLite files on both sides.

mod support;

mod older_hub;
mod proxy;

mod acks;
mod auth;
mod directives;
mod enrollment;
mod keys;
mod limits;
mod metrics;
mod migration;
mod restarts;
mod status;
mod tls;
mod window;
