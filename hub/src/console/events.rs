//! The event log (`/events`): the newest events first, filtered by type
//! and spoke, page by page back through the log.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::layout::{encode, escape, fmt_time, frame, truncate};
use super::{authorize, html_page};
use crate::api::Hub;
use crate::events::{EventFilter, Kind};

/// Events per page.
const PAGE: usize = 100;
/// How many sequence numbers one page looks back through at most.
const WINDOW: i64 = 50_000;

/// The filters.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EventsQuery {
    /// An event type's stored name (e.g. DIRECTIVE_COMPLETED); empty: all.
    #[serde(default, rename = "type")]
    kind: String,
    /// A spoke's name; empty: all.
    #[serde(default)]
    spoke: String,
    /// Only events before this sequence (paging back); 0: the newest.
    #[serde(default)]
    before: i64,
}

/// `GET /events`.
pub async fn page(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    let viewer = match authorize(&hub, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return *refused,
    };
    html_page(render(&hub, &viewer, &query).await)
}

async fn render(hub: &Hub, viewer: &super::Viewer, query: &EventsQuery) -> crate::Result<String> {
    let last = hub.store().last_event();
    let upto = if query.before > 0 {
        (query.before - 1).min(last)
    } else {
        last
    };
    let kind = Kind::all().find(|k| k.as_str() == query.kind);
    let spoke = hub.ledger().spoke_by_name(query.spoke.trim());
    let mut html = String::with_capacity(32 * 1024);
    form(&mut html, query);
    let unknown_spoke = !query.spoke.trim().is_empty() && spoke.is_none();
    let events = if unknown_spoke {
        let _ = write!(
            html,
            "<p class=\"error\" role=\"alert\">No spoke is named {}.</p>",
            escape(&format!("{:?}", query.spoke.trim()))
        );
        Vec::new()
    } else {
        let filter = EventFilter {
            kinds: kind.into_iter().collect(),
            spoke_id: spoke.as_ref().map(|s| s.id),
        };
        let mut events = hub
            .store()
            .events_between((upto - WINDOW).max(0), upto, &filter, u32::MAX)
            .await?;
        events.reverse();
        events.truncate(PAGE);
        events
    };
    let names: HashMap<String, String> = hub
        .ledger()
        .list_spokes("", usize::MAX)
        .into_iter()
        .map(|s| (s.id.to_string(), s.name))
        .collect();
    html.push_str(
        "<section id=\"log\" data-live><table id=\"events-table\"><thead><tr><th scope=\"col\">#</th>\
         <th scope=\"col\">Time</th><th scope=\"col\">Type</th><th scope=\"col\">Spoke</th>\
         <th scope=\"col\">Directive</th><th scope=\"col\">Details</th></tr></thead><tbody>",
    );
    if events.is_empty() {
        html.push_str("<tr><td colspan=\"6\" class=\"muted\">No events match.</td></tr>");
    }
    for e in &events {
        let spoke = e
            .spoke_id
            .as_ref()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
            .unwrap_or_default();
        let spoke = if spoke.is_empty() {
            String::new()
        } else {
            format!(
                "<a href=\"/spokes/{}\">{}</a>",
                encode(&spoke),
                escape(&spoke)
            )
        };
        let directive = match e.directive_id.as_deref() {
            Some(id) => format!("<a href=\"/directives/{}\">{}</a>", encode(id), escape(id)),
            None => String::new(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{spoke}</td><td class=\"mono\">{directive}</td>\
             <td class=\"mono\">{}</td></tr>",
            e.seq,
            escape(&fmt_time(e.time)),
            e.kind.as_str(),
            escape(&truncate(&e.details, 300)),
        );
    }
    html.push_str("</tbody></table>");
    let oldest_shown = events.last().map(|e| e.seq);
    let reached = (upto - WINDOW).max(0);
    if let Some(next) = oldest_shown
        .filter(|_| events.len() == PAGE)
        .or((reached > 0).then_some(reached + 1))
    {
        let _ = write!(
            html,
            "<p><a id=\"older\" href=\"/events?type={}&amp;spoke={}&amp;before={next}\">Older events</a></p>",
            encode(&query.kind),
            encode(&query.spoke),
        );
    }
    html.push_str("</section>");
    Ok(frame(viewer, "hub: events", last, &html))
}

fn form(html: &mut String, query: &EventsQuery) {
    let mut options = String::from("<option value=\"\">any</option>");
    for kind in Kind::all() {
        let _ = write!(
            options,
            "<option value=\"{k}\"{}>{k}</option>",
            if kind.as_str() == query.kind {
                " selected"
            } else {
                ""
            },
            k = kind.as_str()
        );
    }
    let _ = write!(
        html,
        "<h2>Event log</h2><form method=\"get\" action=\"/events\" class=\"filters\" aria-label=\"Filter events\">\
         <div><label for=\"e-type\">Type</label><select id=\"e-type\" name=\"type\">{options}</select></div>\
         <div><label for=\"e-spoke\">Spoke</label><input id=\"e-spoke\" name=\"spoke\" value=\"{}\"></div>\
         <button type=\"submit\">Apply</button></form>",
        escape(&query.spoke)
    );
}
