//! Integration tests: the real hub in process, real SQLite files, real
//! gRPC clients generated from `proto/`.

mod support;

mod bad_input;
mod batched;
mod cli;
mod delivery;
mod events;
mod http;
mod lifecycle;
mod metrics;
mod registration;
mod timers;
mod tls;
