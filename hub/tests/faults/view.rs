//! What the hub and the spokes hold once the faults are over, read the way
//! an operator would: directives (ListDirectives), completion events
//! (WatchEvents), metric points (QueryMetrics), and each spoke's own SQLite
//! record of the directives it received.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use proto::DirectiveState;
use tonic::transport::Channel;

use crate::fleet::DOMAIN;
use crate::hub_bin::ADMIN_TOKEN;

pub fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    req
}

pub fn is_final(state: i32) -> bool {
    [
        DirectiveState::Completed,
        DirectiveState::Failed,
        DirectiveState::Rejected,
        DirectiveState::Cancelled,
        DirectiveState::Expired,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

pub fn state_name(state: i32) -> &'static str {
    DirectiveState::try_from(state).map_or("?", |s| s.as_str_name())
}

pub fn json_of(s: Option<&pbjson_types::Struct>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, hub_proto::json::to_json)
}

pub fn time_of(ts: Option<&pbjson_types::Timestamp>) -> Option<SystemTime> {
    let ts = ts?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(ts.seconds).ok()?, nanos))
}

/// Milliseconds from `a` to `b` (negative if `b` is earlier).
pub fn ms(a: SystemTime, b: SystemTime) -> i128 {
    match b.duration_since(a) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    }
}

/// What the hub holds at the end.
pub struct HubView {
    pub directives: Vec<proto::Directive>,
    /// COMPLETED events per directive, with their times.
    pub completions: HashMap<String, Vec<SystemTime>>,
}

pub async fn directives(admin: &mut AdminServiceClient<Channel>) -> Vec<proto::Directive> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let req = proto::ListDirectivesRequest {
            page_size: 1000,
            page_token: token,
            ..Default::default()
        };
        let page = admin
            .list_directives(authed(req))
            .await
            .expect("ListDirectives")
            .into_inner();
        all.extend(page.directives);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

pub async fn completions(
    admin: &mut AdminServiceClient<Channel>,
) -> HashMap<String, Vec<SystemTime>> {
    let req = proto::WatchEventsRequest {
        types: vec![proto::EventType::DirectiveCompleted.into()],
        stop_after_replay: true,
        ..Default::default()
    };
    let mut events = admin
        .watch_events(authed(req))
        .await
        .expect("WatchEvents")
        .into_inner();
    let mut out = HashMap::<String, Vec<SystemTime>>::new();
    while let Some(msg) = events.message().await.expect("the event stream") {
        let event = msg.event.expect("an event");
        let at = time_of(event.time.as_ref()).unwrap_or(UNIX_EPOCH);
        out.entry(event.directive_id).or_default().push(at);
    }
    out
}

pub async fn points(
    admin: &mut AdminServiceClient<Channel>,
    spoke: &str,
) -> Vec<proto::MetricPoint> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let req = proto::QueryMetricsRequest {
            spoke_name: spoke.into(),
            domain: DOMAIN.into(),
            page_size: 1000,
            page_token: token,
            ..Default::default()
        };
        let page = admin
            .query_metrics(authed(req))
            .await
            .expect("QueryMetrics")
            .into_inner();
        all.extend(page.points.into_iter().filter_map(|p| p.point));
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// A directive as a spoke's state directory records it.
pub struct Local {
    pub status: String,
    pub runs: i64,
    /// Why the hub took no ack, for a CLOSED one.
    pub note: String,
}

/// Every directive in the spoke's local state (read-only, so it may run).
pub fn local_state(state_dir: &Path) -> HashMap<String, Local> {
    let db = rusqlite::Connection::open_with_flags(
        state_dir.join("spoke.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the spoke's state");
    let mut query = db
        .prepare("SELECT id, status, runs, note FROM directives")
        .unwrap();
    query
        .query_map([], |row| {
            let local = Local {
                status: row.get(1)?,
                runs: row.get(2)?,
                note: row.get(3)?,
            };
            Ok((row.get(0)?, local))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A time as the logs print it (UTC), to find a moment in them.
pub fn clock(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%H:%M:%S%.3f")
        .to_string()
}
