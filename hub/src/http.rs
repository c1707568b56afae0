//! The HTTP side: `/healthz` (the process answers), `/readyz` (the
//! database answers and every migration is applied), `/metrics` (Prometheus
//! text), and the operator console at `/` (see [`crate::console`]).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::api::Hub;
use crate::console;

/// The HTTP routes.
pub fn router(hub: Hub) -> Router {
    console::routes()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(console::security_headers))
        .with_state(hub)
}

/// Ready when the database answers, every migration is applied, the
/// latest commit succeeded and a write could start now.
async fn readyz(State(hub): State<Hub>) -> (StatusCode, String) {
    let unavailable = |why: &str| (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    match hub.store().ready().await {
        Ok(true) => {}
        Ok(false) => return unavailable("migrations pending"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            return unavailable("database unreachable");
        }
    }
    if let Some(e) = hub.ledger().write_error() {
        return unavailable(&format!("database not writable: {e}"));
    }
    match hub.store().can_write(READY_WRITE_WAIT).await {
        Ok(true) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(false) => unavailable("database locked by another process"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness write probe failed");
            unavailable("database not writable")
        }
    }
}

/// How long `/readyz` waits for the database's write lock.
const READY_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn metrics(State(hub): State<Hub>) -> axum::response::Response {
    let ledger = hub.ledger();
    if hub.settings().nats.is_some() {
        // Behind the log as it is now, whether or not NATS answers.
        let published = hub.publisher().get().published;
        let telemetry = hub.telemetry();
        telemetry.events_nats_published.set(published);
        telemetry
            .events_nats_lag
            .set(hub.store().last_event().saturating_sub(published));
    }
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
