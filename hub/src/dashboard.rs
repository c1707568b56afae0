//! The admin page: spokes with health, outstanding directives and recent
//! events, rendered on the server as plain HTML that refreshes itself. No
//! JavaScript. Read-only, and guarded by the admin token: a sign-in form
//! sets a session cookie (HttpOnly, SameSite=Strict), or a client sends
//! `Authorization: Bearer <admin token>`. Everything shown is escaped:
//! names, labels, payloads and messages come from spokes and operators.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hub_proto::v1 as proto;

use crate::api::Hub;
use crate::wire::ago;

const COOKIE: &str = "hub_session";
/// How long a sign-in lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// Rows per section.
const ROWS: u32 = 200;

/// Signed-in browser sessions: random ids and when they end. Kept in
/// memory; a restart signs everyone out.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, i64>>);

impl Sessions {
    fn create(&self, now_ms: i64) -> String {
        let id = crate::auth::generate_secret();
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, until| *until > now_ms);
        map.insert(id.clone(), now_ms + SESSION_MS);
        id
    }

    fn valid(&self, id: &str, now_ms: i64) -> bool {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(id).is_some_and(|until| *until > now_ms)
    }

    fn remove(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn signed_in(hub: &Hub, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        return hub.is_admin_token(token.trim());
    }
    session_id(headers).is_some_and(|id| hub.sessions().valid(id, hub.now_ms()))
}

/// `GET /`: the page, or the sign-in form (401).
pub async fn page(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    if !signed_in(&hub, &headers) {
        return sign_in(StatusCode::UNAUTHORIZED, "");
    }
    match render(&hub).await {
        Ok(html) => ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "rendering the admin page failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable\n",
            )
                .into_response()
        }
    }
}

/// The sign-in form.
#[derive(Debug, serde::Deserialize)]
pub struct SignIn {
    token: String,
}

/// `POST /login`: checks the admin token and sets the session cookie.
pub async fn login(State(hub): State<Hub>, Form(form): Form<SignIn>) -> Response {
    if !hub.is_admin_token(form.token.trim()) {
        return sign_in(StatusCode::UNAUTHORIZED, "That is not the admin token.");
    }
    let id = hub.sessions().create(hub.now_ms());
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_MS / 1000
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// `POST /logout`: ends the session.
pub async fn logout(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        hub.sessions().remove(id);
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

fn sign_in(status: StatusCode, message: &str) -> Response {
    let note = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(message))
    };
    let body = format!(
        "{HEAD}<title>hub: sign in</title></head><body><main class=\"narrow\">\
         <h1>hub</h1>{note}<form method=\"post\" action=\"/login\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The token is in <code>hub-data/admin.token</code> on the hub's machine.</p>\
         </main></body></html>"
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

const HEAD: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>\
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}\
main{max-width:1200px;margin:0 auto;padding:16px 24px}main.narrow{max-width:420px}\
header{display:flex;justify-content:space-between;align-items:baseline}\
h1{font-size:22px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e3e6ea;vertical-align:top}\
th{background:#eef0f3;font-weight:600}td.mono,code{font-family:ui-monospace,monospace;font-size:12px}\
.health{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}\
.ONLINE{background:#d3f5dc;color:#0b6b2a}.STALE{background:#fff0c2;color:#7a5a00}\
.OFFLINE{background:#fde0e0;color:#9b1c1c}.REVOKED{background:#e4e4e7;color:#3f3f46}\
.error{color:#9b1c1c}.hint,.muted{color:#6b7280}input{display:block;width:100%;margin:6px 0 12px;padding:6px}\
</style>";

async fn render(hub: &Hub) -> crate::Result<String> {
    let now = hub.now_ms();
    let store = hub.store();
    let spokes = hub.ledger().list_spokes("", ROWS as usize);
    let outstanding = hub.ledger().outstanding(ROWS as usize);
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
    let names: HashMap<String, String> = spokes
        .iter()
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    let refresh = hub.settings().heartbeat_interval.as_secs().clamp(2, 10);

    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "{HEAD}<meta http-equiv=\"refresh\" content=\"{refresh}\"><title>hub</title></head><body><main>\
         <header><h1>hub</h1><form method=\"post\" action=\"/logout\"><button type=\"submit\">Sign out</button></form></header>\
         <p class=\"muted\">Refreshes every {refresh} s. Last update: {}.</p>",
        escape(&fmt_time(now))
    );

    let _ = write!(
        html,
        "<h2 id=\"spokes\">Spokes ({})</h2><table id=\"spokes-table\"><thead><tr><th>Name</th><th>Health</th>\
         <th>Status</th><th>Last heartbeat</th><th>Version</th><th>Labels</th><th>Outstanding</th></tr></thead><tbody>",
        spokes.len()
    );
    if spokes.is_empty() {
        html.push_str("<tr><td colspan=\"7\" class=\"muted\">No spokes registered yet.</td></tr>");
    }
    for s in &spokes {
        let wire = hub.spoke_to_proto(s);
        let health = proto::SpokeHealth::try_from(wire.health)
            .map(|h| h.as_str_name().trim_start_matches("SPOKE_HEALTH_"))
            .unwrap_or("OFFLINE");
        let status = match (s.status, s.status_message.as_str()) {
            (proto::SpokeStatus::Unspecified, _) => String::new(),
            (st, "") => st
                .as_str_name()
                .trim_start_matches("SPOKE_STATUS_")
                .to_owned(),
            (st, msg) => format!(
                "{}: {msg}",
                st.as_str_name().trim_start_matches("SPOKE_STATUS_")
            ),
        };
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td><span class=\"health {health}\">{health}</span></td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            escape(&status),
            escape(&ago(s.last_heartbeat_at, now)),
            escape(&s.version),
            escape(&labels.join(", ")),
            s.outstanding
        );
    }
    html.push_str("</tbody></table>");

    let _ = write!(
        html,
        "<h2 id=\"directives\">Outstanding directives ({})</h2><table id=\"directives-table\"><thead><tr>\
         <th>Id</th><th>Spoke</th><th>Type</th><th>State</th><th>Attempts</th><th>Age</th><th>Payload</th>\
         </tr></thead><tbody>",
        outstanding.len()
    );
    if outstanding.is_empty() {
        html.push_str("<tr><td colspan=\"7\" class=\"muted\">Nothing outstanding.</td></tr>");
    }
    for d in &outstanding {
        let _ = write!(
            html,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} of {}</td><td>{}</td>\
             <td class=\"mono\">{}</td></tr>",
            d.id,
            escape(&d.spoke_name),
            escape(&d.directive_type),
            d.state.as_str(),
            d.attempts,
            d.max_attempts,
            escape(&ago(Some(d.created_at), now).replace(" ago", "")),
            escape(&truncate(&d.payload, 200))
        );
    }
    html.push_str("</tbody></table>");

    html.push_str(
        "<h2 id=\"events\">Recent events</h2><table id=\"events-table\"><thead><tr><th>#</th><th>Time</th>\
         <th>Type</th><th>Spoke</th><th>Directive</th><th>Details</th></tr></thead><tbody>",
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
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            e.seq,
            escape(&fmt_time(e.time)),
            e.kind.as_str(),
            escape(&spoke),
            escape(e.directive_id.as_deref().unwrap_or("")),
            escape(&truncate(&e.details, 200))
        );
    }
    html.push_str("</tbody></table></main></body></html>");
    Ok(html)
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(String::new, |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "a=1; hub_session=abc; b=2".parse().unwrap());
        assert_eq!(session_id(&headers), Some("abc"));
    }
}
