//! A directive's page (`/directives/{id}`): its payload, result or error,
//! progress and attempts, the timeline of its events, and a form to cancel
//! it while it is not final.

use std::fmt::Write;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_server::AdminService;

use super::layout::{encode, escape, fmt_time, form_open, frame, ms, pretty, state_name};
use super::{Viewer, authorize, html_page};
use crate::api::Hub;
use crate::api::admin::AdminApi;
use crate::events::EventFilter;

/// How far back in the log the page looks for the directive's events.
const EVENT_WINDOW: i64 = 50_000;

/// The page's options.
#[derive(Debug, Default, serde::Deserialize)]
pub struct DirectiveQuery {
    /// What an action just did (a fixed word, never free text).
    #[serde(default)]
    done: String,
}

/// `GET /directives/{id}`.
pub async fn page(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<DirectiveQuery>,
) -> Response {
    let viewer = match authorize(&hub, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return *refused,
    };
    render(&hub, &viewer, &id, &query.done, None).await
}

/// The page of directive `id`, with a notice for `done` and `error` (an
/// action's refusal) shown.
pub async fn render(
    hub: &Hub,
    viewer: &Viewer,
    id: &str,
    done: &str,
    error: Option<(axum::http::StatusCode, &str)>,
) -> Response {
    let got = AdminApi::new(hub.clone())
        .get_directive(tonic::Request::new(proto::GetDirectiveRequest {
            directive_id: id.to_owned(),
        }))
        .await;
    let d = match got {
        Ok(r) => match r.into_inner().directive {
            Some(d) => d,
            None => return super::actions::not_found(viewer, "No such directive."),
        },
        Err(status) => return super::actions::refused(viewer, &status),
    };
    let after = hub.store().last_event();
    let events = match timeline(hub, &d, after).await {
        Ok(events) => events,
        Err(e) => return html_page(Err(e)),
    };
    let state = state_name(d.state);
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "<h2>Directive <span class=\"mono\">{}</span></h2>",
        escape(&d.id)
    );
    if done == "cancelled" {
        html.push_str("<p class=\"notice\" role=\"status\">The directive is cancelled.</p>");
    } else if done == "sent" {
        html.push_str("<p class=\"notice\" role=\"status\">The directive was created.</p>");
    }
    if let Some((_, error)) = error {
        let _ = write!(
            html,
            "<p class=\"error\" role=\"alert\">{}</p>",
            escape(error)
        );
    }
    let payload = d
        .payload
        .as_ref()
        .map(|p| pretty(&hub_proto::json::to_json(p)))
        .unwrap_or_else(|| "{}".to_owned());
    let outcome = match (&d.result, d.error.as_str()) {
        (Some(result), _) => format!(
            "<tr><th scope=\"row\">Result</th><td><pre id=\"result\">{}</pre></td></tr>",
            escape(&pretty(&hub_proto::json::to_json(result)))
        ),
        (None, "") => String::new(),
        (None, error) => format!(
            "<tr><th scope=\"row\">Error</th><td id=\"error\">{}</td></tr>",
            escape(error)
        ),
    };
    let time = |t: Option<&pbjson_types::Timestamp>| ms(t).map(fmt_time).unwrap_or_default();
    let _ = write!(
        html,
        "<section id=\"directive\" data-live><table id=\"directive-details\"><tbody>\
         <tr><th scope=\"row\">Spoke</th><td><a href=\"/spokes/{}\">{}</a></td></tr>\
         <tr><th scope=\"row\">Type</th><td>{}</td></tr>\
         <tr><th scope=\"row\">State</th><td id=\"state\">{state}</td></tr>\
         <tr><th scope=\"row\">Attempts</th><td>{} of {}</td></tr>\
         <tr><th scope=\"row\">Progress</th><td>{}%{}</td></tr>\
         <tr><th scope=\"row\">Priority</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Created</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Updated</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Expires</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Payload</th><td><pre id=\"payload\">{}</pre></td></tr>{outcome}\
         </tbody></table>",
        encode(&d.spoke_name),
        escape(&d.spoke_name),
        escape(&d.r#type),
        d.attempt,
        d.max_attempts,
        d.progress,
        if d.progress_message.is_empty() {
            String::new()
        } else {
            format!(": {}", escape(&d.progress_message))
        },
        d.priority,
        time(d.created_at.as_ref()),
        time(d.updated_at.as_ref()),
        match ms(d.expires_at.as_ref()) {
            Some(at) => fmt_time(at),
            None => "never".to_owned(),
        },
        escape(&payload),
    );
    html.push_str("<h3>Timeline</h3><ol id=\"timeline\">");
    for e in &events {
        let _ = write!(
            html,
            "<li><span class=\"mono\">#{}</span> {} <strong>{}</strong> <span class=\"mono\">{}</span></li>",
            e.seq,
            escape(&fmt_time(e.time)),
            e.kind.as_str(),
            escape(&e.details)
        );
    }
    if events.is_empty() {
        html.push_str("<li class=\"muted\">No events retained.</li>");
    }
    html.push_str("</ol>");
    if !matches!(
        state,
        "COMPLETED" | "FAILED" | "REJECTED" | "EXPIRED" | "CANCELLED"
    ) {
        let _ = write!(
            html,
            "{}<label for=\"cancel-reason\">Reason</label>\
             <input id=\"cancel-reason\" name=\"reason\" maxlength=\"1024\">\
             <button type=\"submit\">Cancel directive…</button></form>",
            form_open(
                viewer,
                &format!("/directives/{}/cancel", encode(&d.id)),
                "inline cancel"
            )
        );
    }
    html.push_str("</section>");
    let page = html_page(Ok(frame(
        viewer,
        &format!("hub: directive {}", d.id),
        after,
        &html,
    )));
    match error {
        Some((status, _)) => (status, page).into_response(),
        None => page,
    }
}

/// The directive's events, oldest first, among the spoke's latest
/// [`EVENT_WINDOW`] events of the log.
async fn timeline(
    hub: &Hub,
    d: &proto::Directive,
    after: i64,
) -> crate::Result<Vec<crate::events::EventRecord>> {
    let filter = EventFilter {
        kinds: Vec::new(),
        spoke_id: uuid::Uuid::parse_str(&d.spoke_id).ok(),
    };
    let events = hub
        .store()
        .events_between((after - EVENT_WINDOW).max(0), after, &filter, u32::MAX)
        .await?;
    Ok(events
        .into_iter()
        .filter(|e| e.directive_id.as_deref() == Some(d.id.as_str()))
        .collect())
}
