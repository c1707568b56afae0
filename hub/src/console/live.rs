//! Live updates: `/live` streams the event log as Server-Sent Events, fed
//! by the same commit signal as `WatchEvents` (through `AdminService`
//! itself), resuming after `?after=` or the `Last-Event-ID` header; and
//! `/console.js`, the one script of the console, which follows it and
//! refreshes the page's live sections in place.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_server::AdminService;

use super::authorize;
use crate::api::Hub;
use crate::api::admin::AdminApi;

/// The console's script (no other script runs on its pages).
const SCRIPT: &str = include_str!("console.js");
/// A comment line this often keeps proxies and the browser from giving up
/// on a quiet stream.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Where a live stream starts.
#[derive(Debug, Default, serde::Deserialize)]
pub struct LiveQuery {
    /// The last event sequence the page saw.
    #[serde(default)]
    after: Option<u64>,
}

/// `GET /console.js`.
pub async fn script() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        SCRIPT,
    )
        .into_response()
}

/// `GET /live?after=N`: every event after N, then each as it is committed,
/// as `text/event-stream` (`id:` the sequence, `data:` the event in proto3
/// JSON). Events retention removed are skipped (the page reloads its
/// sections anyway).
pub async fn stream(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<LiveQuery>,
) -> Response {
    let viewer = match authorize(&hub, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return *refused,
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut after = resume.or(query.after).unwrap_or(0);
    let admin = AdminApi::new(hub.clone());
    let watch = |after| {
        admin.watch_events(tonic::Request::new(proto::WatchEventsRequest {
            after_sequence: after,
            ..Default::default()
        }))
    };
    let events = match watch(after).await {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::OutOfRange => {
            // Retention removed some: go on from what is there.
            after = 0;
            match watch(after).await {
                Ok(r) => r.into_inner(),
                Err(status) => return super::actions::refused(&viewer, &status),
            }
        }
        Err(status) => return super::actions::refused(&viewer, &status),
    };
    let messages = events.map(|item| match item {
        Ok(proto::WatchEventsResponse { event: Some(event) }) => {
            let data = serde_json::to_string(&event).unwrap_or_default();
            Ok::<_, std::convert::Infallible>(format!("id: {}\ndata: {data}\n\n", event.sequence))
        }
        Ok(_) => Ok(String::new()),
        // The hub stopping: the browser reconnects with Last-Event-ID.
        Err(status) => Ok(format!(": {}\n\n", status.message().replace('\n', " "))),
    });
    let keepalive = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(KEEPALIVE))
        .map(|_| Ok(": keepalive\n\n".to_owned()));
    let hello = futures_util::stream::once(async { Ok("retry: 2000\n\n".to_owned()) });
    let body = hello
        .chain(futures_util::stream::select(messages, keepalive))
        .take_until(shutdown(hub.clone()));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Completes when the hub shuts down.
async fn shutdown(hub: Hub) {
    hub.shutdown().wait().await;
}
