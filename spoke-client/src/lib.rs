//! The Rust library every spoke uses to talk to the hub.
//!
//! Build a [`Client`], register one handler per directive type, record
//! metrics from anywhere, and [`run`](Client::run) it. Registration (the key
//! is kept in the state directory), the `WatchDirectives` stream with
//! reconnection, backoff and failover, heartbeats, acks and metric flushing
//! are the library's job.
//!
//! Enrollment is safe to retry: the client proposes its own key and keeps
//! it before the first `Register`, so a lost reply never locks it out of
//! its name. After `hub rotate-key`, hand the spoke its new key with
//! [`Client::install_key`] or the `new-key` file in the state directory; a
//! refused key (rotated or revoked) leaves the client waiting for one, with
//! [`KeyState::Refused`] in [`Client::status`]. See [`keys`].
//!
//! ```no_run
//! use spoke_client::{Client, Context};
//!
//! #[derive(serde::Deserialize)]
//! struct SyncDoc { doc: String }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), spoke_client::Error> {
//!     let client = Client::builder("docs")
//!         .endpoint("http://127.0.0.1:50051")
//!         .enrollment_token(std::fs::read_to_string("hub-data/enrollment.token").unwrap())
//!         .state_dir("./docs-state")
//!         .handler("sync_doc", "1", |job: SyncDoc, ctx: Context| async move {
//!             ctx.progress(10, "started").await.ok();
//!             Ok::<_, String>(serde_json::json!({"synced": job.doc}))
//!         })
//!         .build()
//!         .await?;
//!     client.record("statistics", "docs_started", 1.0, &[("region", "eu")]);
//!     client.run_until(async { tokio::signal::ctrl_c().await.unwrap() }).await
//! }
//! ```
//!
//! # Showing the hub status in the spoke's own admin page
//!
//! [`Client::status`] is a snapshot of what the client knows: whether it is
//! connected and to which endpoint, the last heartbeat, pending and
//! in-flight directives, buffered, dropped and rejected points, failed
//! pushes, the latest error, whether the hub takes the key, and the status
//! the application reports. [`Status::to_json`] renders it with stable
//! snake_case field names (times in RFC 3339 UTC), and [`Status::to_html`]
//! as a self-contained snippet — one `<section aria-label="Hub status">`
//! that says "Connected" or "Disconnected" in words, every value escaped,
//! no script, nothing external, a small `<style>` scoped to `hub-status-*`
//! classes. Serve either from the admin server the spoke already has; the
//! client itself never binds a port. With axum, say:
//!
//! ```ignore
//! use axum::{Json, Router, extract::State, response::Html, routing::get};
//!
//! let admin = Router::new()
//!     .route("/hub-status", get(|State(c): State<spoke_client::Client>| async move {
//!         Html(c.status().to_html())
//!     }))
//!     .route("/hub-status.json", get(|State(c): State<spoke_client::Client>| async move {
//!         Json(c.status().to_json())
//!     }))
//!     .with_state(client.clone());
//! ```
//!
//! or inline the snippet in a page rendered by hand:
//!
//! ```no_run
//! # fn demo(client: spoke_client::Client) {
//! let page = format!(
//!     "<!doctype html><html lang=\"en\"><title>Billing admin</title><h1>Billing</h1>{}</html>",
//!     client.status().to_html()
//! );
//! # }
//! ```
//!
//! [`Status::to_json_at`] and [`Status::to_html_at`] take the time to
//! measure the heartbeat's age from, for tests of the page.
//!
//! Components:
//! - [`config`]: the builder and its validation;
//! - [`client`]: the handle and `run`, which wires the rest together;
//! - [`reconnect`]: the reconnect state machine and [`classify`];
//!   [`backoff`]: its delays; `endpoints`: the configured endpoints or the
//!   ones the hub told the spoke to use, and the fallback between them;
//! - `session`: one connection — register, stream, heartbeats (`heartbeat`);
//! - [`keys`]: the key proposed at enrollment (safe to retry), and a new
//!   key after `hub rotate-key` ([`Client::install_key`] or the `new-key`
//!   file in the state directory);
//! - `directives`: dedup, bounded concurrency, outcomes and acks;
//!   [`handler`]: typed handlers and their [`Context`];
//! - [`metrics`]: the buffer actor; [`flush`]: the task that pushes it;
//! - `store`: the local SQLite state, the only module that touches sqlx;
//! - `link`: the current connection, shared by every caller; `acks`: its
//!   ack stream (an actor; unary `Ack` with an older hub);
//! - `tls`: CA, server name and client identity for `https://` endpoints;
//! - [`status`]: what [`Client::status`] reports, and (`widget`) its JSON
//!   and HTML renderings; [`event`]: what an
//!   observer is told; `wire`: protobuf well-known types; [`error`]: the
//!   crate's error type.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
pub mod backoff;
pub mod client;
pub mod config;
mod directives;
mod endpoints;
pub mod error;
pub mod event;
pub mod flush;
pub mod handler;
mod heartbeat;
pub mod keys;
mod link;
pub mod metrics;
pub mod reconnect;
mod session;
pub mod status;
mod store;
mod tls;
mod widget;
mod wire;

pub use backoff::Backoff;
pub use client::Client;
pub use config::ClientBuilder;
pub use error::{Error, Result};
pub use event::Event;
pub use flush::FlushReport;
pub use handler::Context;
pub use hub_proto as proto;
pub use metrics::Point;
pub use reconnect::{Disposition, classify};
pub use status::{KeyState, SpokeStatus, Status};
