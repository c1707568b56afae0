//! The fleet page (`/`): every spoke with health, status, last heartbeat,
//! delivery and outstanding count, filtered by label and health and
//! sorted; the outstanding directives; the latest events; the NATS
//! publisher.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::layout::{encode, escape, fmt_time, frame, health_badge, status_text, truncate};
use super::{authorize, html_page};
use crate::api::Hub;
use crate::spokes::{SpokeRecord, WebhookAttempt};
use crate::wire::ago;

/// Rows per section.
const ROWS: usize = 200;

/// The fleet page's filters and order.
#[derive(Debug, Default, serde::Deserialize)]
pub struct FleetQuery {
    /// `key=value`: only spokes with that label.
    #[serde(default)]
    label: String,
    /// ONLINE, STALE, OFFLINE or REVOKED; empty: all.
    #[serde(default)]
    health: String,
    /// name (default), health, heartbeat or outstanding.
    #[serde(default)]
    sort: String,
    /// What an action just did (a fixed word, never free text).
    #[serde(default)]
    done: String,
}

/// `GET /`: the fleet page.
pub async fn page(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<FleetQuery>,
) -> Response {
    let viewer = match authorize(&hub, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return *refused,
    };
    html_page(render(&hub, &viewer, &query).await)
}

async fn render(hub: &Hub, viewer: &super::Viewer, query: &FleetQuery) -> crate::Result<String> {
    let now = hub.now_ms();
    let store = hub.store();
    let after = store.last_event();
    let all = hub.ledger().list_spokes("", usize::MAX);
    let total = all.len();
    let names: HashMap<String, String> = all
        .iter()
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    let mut spokes: Vec<(SpokeRecord, hub_proto::v1::Spoke)> = all
        .into_iter()
        .map(|s| {
            let wire = hub.spoke_to_proto(&s);
            (s, wire)
        })
        .filter(|(s, wire)| {
            let label_ok = match query.label.split_once('=') {
                Some((k, v)) => s.labels.get(k.trim()).is_some_and(|l| l == v.trim()),
                None => query.label.trim().is_empty() || s.labels.contains_key(query.label.trim()),
            };
            let health_ok =
                query.health.is_empty() || super::layout::health_name(wire.health) == query.health;
            label_ok && health_ok
        })
        .collect();
    match query.sort.as_str() {
        "health" => spokes.sort_by_key(|(s, w)| (w.health, s.name.clone())),
        "heartbeat" => spokes.sort_by_key(|(s, _)| std::cmp::Reverse(s.last_heartbeat_at)),
        "outstanding" => spokes.sort_by_key(|(s, _)| std::cmp::Reverse(s.outstanding)),
        _ => {}
    }
    spokes.truncate(ROWS);
    let outstanding = hub.ledger().outstanding(ROWS);
    let mut payloads = store.payloads(&outstanding.missing_payloads).await?;
    let outstanding: Vec<_> = outstanding
        .directives
        .into_iter()
        .map(|mut d| {
            if let Some(payload) = payloads.remove(&d.id) {
                d.payload = payload;
            }
            d
        })
        .collect();
    let events = store.recent_events(50).await?;

    let mut html = String::with_capacity(16 * 1024);
    if query.done == "deleted" {
        html.push_str("<p class=\"notice\" role=\"status\">The spoke was deleted.</p>");
    }
    filters(&mut html, query);
    let _ = write!(
        html,
        "<section id=\"fleet\" data-live><h2 id=\"spokes\">Spokes ({} of {total})</h2>\
         <p class=\"muted\">As of {}.</p>\
         <table id=\"spokes-table\"><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Health</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Last heartbeat</th><th scope=\"col\">Version</th>\
         <th scope=\"col\">Labels</th><th scope=\"col\">Outstanding</th><th scope=\"col\">Delivery</th>\
         </tr></thead><tbody>",
        spokes.len(),
        escape(&fmt_time(now)),
    );
    if spokes.is_empty() {
        html.push_str("<tr><td colspan=\"8\" class=\"muted\">No spokes match.</td></tr>");
    }
    for (s, wire) in &spokes {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(
            html,
            "<tr><td><a href=\"/spokes/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            encode(&s.name),
            escape(&s.name),
            health_badge(wire.health),
            escape(&status_text(wire.status, &s.status_message)),
            escape(&ago(s.last_heartbeat_at, now)),
            escape(&s.version),
            escape(&labels.join(", ")),
            s.outstanding,
            delivery_cell(s, wire.connected, now),
        );
    }
    html.push_str("</tbody></table></section>");

    let _ = write!(
        html,
        "<section id=\"outstanding\" data-live><h2 id=\"directives\">Outstanding directives ({})</h2>\
         <table id=\"directives-table\"><thead><tr>\
         <th scope=\"col\">Id</th><th scope=\"col\">Spoke</th><th scope=\"col\">Type</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Attempts</th><th scope=\"col\">Age</th>\
         <th scope=\"col\">Payload</th></tr></thead><tbody>",
        outstanding.len()
    );
    if outstanding.is_empty() {
        html.push_str("<tr><td colspan=\"7\" class=\"muted\">Nothing outstanding.</td></tr>");
    }
    for d in &outstanding {
        let _ = write!(
            html,
            "<tr><td class=\"mono\"><a href=\"/directives/{id}\">{id}</a></td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{} of {}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            escape(&d.spoke_name),
            escape(&d.directive_type),
            d.state.as_str(),
            d.attempts,
            d.max_attempts,
            escape(&ago(Some(d.created_at), now).replace(" ago", "")),
            escape(&truncate(&d.payload, 200)),
            id = d.id,
        );
    }
    html.push_str("</tbody></table></section>");

    html.push_str(
        "<section id=\"recent\" data-live><h2 id=\"events\">Recent events</h2>\
         <p><a href=\"/events\">The whole event log, with filters</a></p>\
         <table id=\"events-table\"><thead><tr><th scope=\"col\">#</th><th scope=\"col\">Time</th>\
         <th scope=\"col\">Type</th><th scope=\"col\">Spoke</th><th scope=\"col\">Directive</th>\
         <th scope=\"col\">Details</th></tr></thead><tbody>",
    );
    if events.is_empty() {
        html.push_str("<tr><td colspan=\"6\" class=\"muted\">No events yet.</td></tr>");
    }
    for e in &events {
        let spoke = e
            .spoke_id
            .as_ref()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
            .unwrap_or_default();
        let directive = match e.directive_id.as_deref() {
            Some(id) => format!("<a href=\"/directives/{}\">{}</a>", encode(id), escape(id)),
            None => String::new(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{directive}</td>\
             <td class=\"mono\">{}</td></tr>",
            e.seq,
            escape(&fmt_time(e.time)),
            e.kind.as_str(),
            escape(&spoke),
            escape(&truncate(&e.details, 200))
        );
    }
    html.push_str("</tbody></table></section>");
    if let Some(nats) = &hub.settings().nats {
        publisher_section(&mut html, nats, &hub.publisher().get(), store.last_event());
    }
    Ok(frame(viewer, "hub", after, &html))
}

/// The filter form: label, health, order (a GET form: works without
/// JavaScript, and the URL can be shared).
fn filters(html: &mut String, query: &FleetQuery) {
    let option = |value: &str, text: &str, current: &str| {
        format!(
            "<option value=\"{value}\"{}>{text}</option>",
            if value == current { " selected" } else { "" }
        )
    };
    let health: String = [
        ("", "any"),
        ("ONLINE", "ONLINE"),
        ("STALE", "STALE"),
        ("OFFLINE", "OFFLINE"),
        ("REVOKED", "REVOKED"),
    ]
    .iter()
    .map(|(v, t)| option(v, t, &query.health))
    .collect();
    let sort: String = [
        ("name", "name"),
        ("health", "health"),
        ("heartbeat", "latest heartbeat"),
        ("outstanding", "most outstanding"),
    ]
    .iter()
    .map(|(v, t)| option(v, t, &query.sort))
    .collect();
    let _ = write!(
        html,
        "<form method=\"get\" action=\"/\" class=\"filters\" aria-label=\"Filter spokes\">\
         <div><label for=\"f-label\">Label</label><input id=\"f-label\" name=\"label\" \
         placeholder=\"region=eu\" value=\"{}\"></div>\
         <div><label for=\"f-health\">Health</label><select id=\"f-health\" name=\"health\">{health}</select></div>\
         <div><label for=\"f-sort\">Sort by</label><select id=\"f-sort\" name=\"sort\">{sort}</select></div>\
         <button type=\"submit\">Apply</button></form>",
        escape(&query.label)
    );
}

/// The NATS events publisher's state (with `--events-nats-url`).
fn publisher_section(
    html: &mut String,
    nats: &crate::nats::NatsSettings,
    state: &crate::nats::PublisherState,
    committed: i64,
) {
    let status = match (&state.last_error, state.connected) {
        (_, true) => "publishing".to_owned(),
        (Some(e), false) => format!("not publishing: {e}"),
        (None, false) => "connecting".to_owned(),
    };
    let _ = write!(
        html,
        "<section id=\"publisher\" data-live><h2 id=\"nats\">Events to NATS JetStream</h2>\
         <table id=\"nats-table\"><tbody>\
         <tr><th>Stream</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Subjects</th><td class=\"mono\">{}.&gt;</td></tr>\
         <tr><th>Status</th><td>{}</td></tr>\
         <tr><th>Last published</th><td>{}</td></tr>\
         <tr><th>Behind the log</th><td>{}</td></tr>\
         <tr><th>Removed by retention before publishing</th><td>{}</td></tr>\
         </tbody></table></section>",
        escape(&nats.stream),
        escape(&nats.subject_prefix),
        escape(&status),
        state.published,
        committed.saturating_sub(state.published),
        state.skipped,
    );
}

/// How a spoke gets its directives: "stream" (open or not), or its webhook
/// with the latest request's result; escaped.
pub fn delivery_cell(s: &SpokeRecord, connected: bool, now: i64) -> String {
    let Some(url) = &s.webhook_url else {
        return if connected {
            "stream (open)"
        } else {
            "stream / poll"
        }
        .to_owned();
    };
    let last = match &s.last_webhook {
        None => "no request yet".to_owned(),
        Some(w) => webhook_outcome(w, now),
    };
    format!(
        "webhook <span class=\"mono\">{}</span><br><span class=\"muted\">last: {}</span>",
        escape(&truncate(url, 80)),
        escape(&last)
    )
}

/// The latest webhook request in words: result, HTTP status, attempt,
/// error, age.
pub fn webhook_outcome(w: &WebhookAttempt, now: i64) -> String {
    let mut text = w.result.to_owned();
    if let Some(status) = w.http_status {
        let _ = write!(text, " (HTTP {status})");
    }
    let _ = write!(text, ", attempt {} of {}", w.attempt, w.directive_id);
    if !w.error.is_empty() {
        let _ = write!(text, ": {}", truncate(&w.error, 200));
    }
    let _ = write!(text, ", {}", ago(Some(w.at), now));
    text
}
