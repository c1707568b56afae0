//! Integration tests: the real hub in process, real SQLite files, real
//! gRPC clients generated from `proto/`.

mod support;

mod abuse;
mod bad_input;
mod batched;
mod cli;
mod data_dir;
mod delivery;
mod enrollment;
mod events;
mod hardening;
mod http;
mod lifecycle;
mod metrics;
mod registration;
mod timers;
mod tls;
