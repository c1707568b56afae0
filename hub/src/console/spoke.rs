//! A spoke's page (`/spokes/{name}`): details, capabilities and labels,
//! its directives, its recent events, its metrics as charts over a chosen
//! range, and the forms that act on it.

use std::fmt::Write;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_server::AdminService;

use super::layout::{
    encode, escape, fmt_time, form_open, frame, health_badge, ms, state_name, status_text, truncate,
};
use super::{Viewer, authorize, charts, html_page};
use crate::api::Hub;
use crate::api::admin::AdminApi;
use crate::events::EventFilter;
use crate::wire::{ago, timestamp_ms};

/// Directives listed on the page.
const DIRECTIVES: u32 = 50;
/// Events of the spoke listed on the page.
const EVENTS: usize = 30;
/// How far back in the log the page looks for the spoke's events.
const EVENT_WINDOW: i64 = 20_000;
/// Most points read for the charts.
const MAX_POINTS: usize = 20_000;

/// The chart ranges offered, and the default.
pub const RANGES: [(&str, i64); 4] = [
    ("1h", 3_600_000),
    ("6h", 6 * 3_600_000),
    ("24h", 24 * 3_600_000),
    ("7d", 7 * 24 * 3_600_000),
];

/// The page's options.
#[derive(Debug, Default, serde::Deserialize)]
pub struct SpokeQuery {
    /// The charts' range (see [`RANGES`]).
    #[serde(default)]
    range: String,
    /// What an action just did (a fixed word, never free text).
    #[serde(default)]
    done: String,
}

/// `GET /spokes/{name}`.
pub async fn page(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<SpokeQuery>,
) -> Response {
    let viewer = match authorize(&hub, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return *refused,
    };
    match render(&hub, &viewer, &name, &query, None).await {
        Ok(Some(html)) => html_page(Ok(html)),
        Ok(None) => super::actions::not_found(&viewer, &format!("No spoke is named {name:?}.")),
        Err(e) => html_page(Err(e)),
    }
}

/// The page of spoke `name` (`None` if there is none), with `error` (an
/// action's refusal) shown above the forms.
pub async fn render(
    hub: &Hub,
    viewer: &Viewer,
    name: &str,
    query: &SpokeQuery,
    error: Option<&str>,
) -> crate::Result<Option<String>> {
    let Some(record) = hub.ledger().spoke_by_name(name) else {
        return Ok(None);
    };
    let now = hub.now_ms();
    let after = hub.store().last_event();
    let s = hub.spoke_to_proto(&record);
    let admin = AdminApi::new(hub.clone());
    let directives = admin
        .list_directives(tonic::Request::new(proto::ListDirectivesRequest {
            spoke_name: name.to_owned(),
            page_size: DIRECTIVES,
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().directives)
        .unwrap_or_default();
    let filter = EventFilter {
        kinds: Vec::new(),
        spoke_id: Some(record.id),
    };
    let mut events = hub
        .store()
        .events_between((after - EVENT_WINDOW).max(0), after, &filter, u32::MAX)
        .await?;
    events.reverse();
    events.truncate(EVENTS);
    let range = RANGES
        .iter()
        .find(|(r, _)| *r == query.range)
        .unwrap_or(&RANGES[2]);
    let points = points(hub, name, now - range.1, now).await;

    let mut html = String::with_capacity(32 * 1024);
    let _ = write!(html, "<h2>Spoke {}</h2>", escape(&s.name));
    if query.done == "revoked" {
        html.push_str(
            "<p class=\"notice\" role=\"status\">The spoke is revoked: its key no longer works.</p>",
        );
    }
    if let Some(error) = error {
        let _ = write!(
            html,
            "<p class=\"error\" role=\"alert\">{}</p>",
            escape(error)
        );
    }
    let delivery = super::fleet::delivery_cell(&record, s.connected, now);
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = write!(
        html,
        "<section id=\"details\" data-live><table id=\"spoke-details\"><tbody>\
         <tr><th scope=\"row\">Id</th><td class=\"mono\">{}</td></tr>\
         <tr><th scope=\"row\">Health</th><td>{}{}</td></tr>\
         <tr><th scope=\"row\">Status</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Last heartbeat</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Registered</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Version</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Labels</th><td>{}</td></tr>\
         <tr><th scope=\"row\">In-flight window</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Delivery</th><td>{delivery}</td></tr>\
         <tr><th scope=\"row\">Outstanding</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Reported</th><td>{} in flight, {} buffered points, {} failed pushes</td></tr>\
         </tbody></table>",
        escape(&s.id),
        health_badge(s.health),
        if s.connected { " (stream open)" } else { "" },
        escape(&status_text(s.status, &s.status_message)),
        escape(&ago(record.last_heartbeat_at, now)),
        escape(&fmt_time(record.registered_at)),
        escape(&s.version),
        escape(&labels.join(", ")),
        s.max_in_flight,
        s.outstanding_directives,
        s.reported_in_flight,
        s.reported_buffered_points,
        s.reported_failed_pushes,
    );
    html.push_str(
        "<h3>Capabilities</h3><table id=\"capabilities\"><thead><tr><th scope=\"col\">Type</th>\
         <th scope=\"col\">Handler version</th></tr></thead><tbody>",
    );
    if s.capabilities.is_empty() {
        html.push_str("<tr><td colspan=\"2\" class=\"muted\">None declared.</td></tr>");
    }
    for c in &s.capabilities {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&c.directive_type),
            escape(&c.version)
        );
    }
    html.push_str("</tbody></table></section>");

    html.push_str(
        "<section id=\"spoke-directives\" data-live><h3>Directives</h3>\
         <table id=\"directives-table\"><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">Type</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Attempts</th><th scope=\"col\">Age</th>\
         <th scope=\"col\">Payload</th></tr></thead><tbody>",
    );
    if directives.is_empty() {
        html.push_str("<tr><td colspan=\"6\" class=\"muted\">None yet.</td></tr>");
    }
    for d in &directives {
        let payload = d
            .payload
            .as_ref()
            .map(|p| hub_proto::json::to_json(p).to_string())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr><td class=\"mono\"><a href=\"/directives/{id}\">{id}</a></td><td>{}</td>\
             <td class=\"state\">{}</td><td>{} of {}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            escape(&d.r#type),
            state_name(d.state),
            d.attempt,
            d.max_attempts,
            escape(&ago(ms(d.created_at.as_ref()), now).replace(" ago", "")),
            escape(&truncate(&payload, 200)),
            id = escape(&d.id),
        );
    }
    html.push_str("</tbody></table></section>");

    html.push_str(
        "<section id=\"spoke-events\" data-live><h3>Recent events</h3>\
         <table id=\"events-table\"><thead><tr><th scope=\"col\">#</th><th scope=\"col\">Time</th>\
         <th scope=\"col\">Type</th><th scope=\"col\">Directive</th><th scope=\"col\">Details</th>\
         </tr></thead><tbody>",
    );
    if events.is_empty() {
        html.push_str("<tr><td colspan=\"5\" class=\"muted\">No recent events.</td></tr>");
    }
    for e in &events {
        let directive = match e.directive_id.as_deref() {
            Some(id) => format!("<a href=\"/directives/{}\">{}</a>", encode(id), escape(id)),
            None => String::new(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{directive}</td>\
             <td class=\"mono\">{}</td></tr>",
            e.seq,
            escape(&fmt_time(e.time)),
            e.kind.as_str(),
            escape(&truncate(&e.details, 200)),
        );
    }
    let _ = write!(
        html,
        "</tbody></table><p><a href=\"/events?spoke={}\">All of this spoke's events</a></p></section>",
        encode(name)
    );

    let ranges: Vec<String> = RANGES
        .iter()
        .map(|(r, _)| {
            if *r == range.0 {
                format!("<strong aria-current=\"true\">{r}</strong>")
            } else {
                format!("<a href=\"/spokes/{}?range={r}\">{r}</a>", encode(name))
            }
        })
        .collect();
    let _ = write!(
        html,
        "<section id=\"metrics\" data-live><h3>Metrics, last {}</h3><p>Range: {}</p>{}</section>",
        range.0,
        ranges.join(" · "),
        charts::render(&points, now - range.1, now)
    );

    actions(&mut html, viewer, &s);
    Ok(Some(frame(
        viewer,
        &format!("hub: {}", s.name),
        after,
        &html,
    )))
}

/// The spoke's points since `from`, oldest first (through QueryMetrics,
/// page by page, up to [`MAX_POINTS`]).
async fn points(hub: &Hub, name: &str, from: i64, to: i64) -> Vec<proto::StoredMetricPoint> {
    let admin = AdminApi::new(hub.clone());
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .query_metrics(tonic::Request::new(proto::QueryMetricsRequest {
                spoke_name: name.to_owned(),
                start_time: Some(timestamp_ms(from)),
                end_time: Some(timestamp_ms(to + 1)),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            }))
            .await;
        let Ok(page) = page.map(tonic::Response::into_inner) else {
            break;
        };
        out.extend(page.points);
        if page.next_page_token.is_empty() || out.len() >= MAX_POINTS {
            break;
        }
        page_token = page.next_page_token;
    }
    out
}

/// The forms: send a directive, revoke, rotate the key, delete.
fn actions(html: &mut String, viewer: &Viewer, s: &proto::Spoke) {
    let name = encode(&s.name);
    let types: String = s
        .capabilities
        .iter()
        .map(|c| {
            format!(
                "<option value=\"{t}\">{t}</option>",
                t = escape(&c.directive_type)
            )
        })
        .collect();
    html.push_str("<section id=\"actions\"><h3>Act</h3>");
    if s.capabilities.is_empty() {
        html.push_str("<p class=\"muted\">The spoke declared no directive types to send.</p>");
    } else {
        let _ = write!(
            html,
            "{}<fieldset><legend>Send a directive</legend>\
             <div><label for=\"send-type\">Type</label><select id=\"send-type\" name=\"type\" required>{types}</select></div>\
             <div><label for=\"send-payload\">Payload (a JSON object)</label>\
             <textarea id=\"send-payload\" name=\"payload\" data-json-object required \
             aria-describedby=\"send-payload-help\">{{}}</textarea>\
             <span id=\"send-payload-help\" class=\"hint\">Checked here and by the hub.</span></div>\
             <div><label for=\"send-priority\">Priority</label><input id=\"send-priority\" name=\"priority\" \
             type=\"number\" value=\"0\" step=\"1\"></div>\
             <div><label for=\"send-expires\">Expires in (seconds, empty: never)</label>\
             <input id=\"send-expires\" name=\"expires_in\" type=\"number\" min=\"1\" step=\"1\"></div>\
             <button type=\"submit\">Send</button></fieldset></form>",
            form_open(viewer, &format!("/spokes/{name}/send"), "send")
        );
    }
    for (what, label) in [
        ("revoke", "Revoke…"),
        ("rotate", "Rotate key…"),
        ("delete", "Delete spoke…"),
    ] {
        let _ = write!(
            html,
            "{}<button type=\"submit\">{label}</button></form>",
            form_open(viewer, &format!("/spokes/{name}/{what}"), "inline")
        );
    }
    html.push_str("</section>");
}

/// A spoke page answering an action refused by the hub, with the status.
pub async fn with_error(
    hub: &Hub,
    viewer: &Viewer,
    name: &str,
    status: axum::http::StatusCode,
    error: &str,
) -> Response {
    match render(hub, viewer, name, &SpokeQuery::default(), Some(error)).await {
        Ok(Some(html)) => (status, html_page(Ok(html))).into_response(),
        Ok(None) => super::actions::not_found(viewer, error),
        Err(e) => html_page(Err(e)),
    }
}
