//! The HTTP side: `/healthz` (the process answers), `/readyz` (the
//! database answers and every migration is applied), `/metrics` (Prometheus
//! text), and the admin page at `/` (see [`crate::dashboard`]).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::api::Hub;
use crate::dashboard;

/// The HTTP routes.
pub fn router(hub: Hub) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/login", post(dashboard::login))
        .route("/logout", post(dashboard::logout))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

async fn readyz(State(hub): State<Hub>) -> (StatusCode, &'static str) {
    match hub.store().ready().await {
        Ok(true) => (StatusCode::OK, "ready\n"),
        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "migrations pending\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
    }
}

async fn metrics(State(hub): State<Hub>) -> axum::response::Response {
    let ledger = hub.ledger();
    let body = hub.telemetry().render(
        ledger.connected(),
        &ledger.spokes_by_health(),
        &ledger.directives_by_state(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
