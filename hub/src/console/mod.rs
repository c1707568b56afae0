//! The admin page: spokes with health, outstanding directives and recent
//! events, rendered on the server as plain HTML that refreshes itself. No
//! JavaScript. Read-only, and guarded by the admin token: a sign-in form
//! sets a session cookie (HttpOnly, SameSite=Strict, and Secure when the
//! HTTP port serves TLS), or a client sends `Authorization: Bearer <admin
//! token>`. A wrong token counts against the peer address's budget of
//! failed authentications, shared with the gRPC port (`guard`): past it,
//! tokens from that address are answered 429 without a look. Everything
//! shown is escaped: names, labels, payloads and messages come from spokes
//! and operators; and every HTTP response carries headers that forbid
//! scripts, framing and content sniffing ([`security_headers`]).

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::Form;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hub_proto::v1 as proto;

use crate::api::Hub;
use crate::error::Error;
use crate::wire::ago;

const COOKIE: &str = "hub_session";
/// How long a sign-in lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// Rows per section.
const ROWS: u32 = 200;

/// The content security policy of every HTTP response: nothing may load or
/// run (the page has no scripts, images or external styles) except its own
/// inline `<style>`; forms post only to the hub; no one may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to a response (a layer on every HTTP route).
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

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

/// Whether a request may see the page.
enum Access {
    Granted,
    Denied,
    /// A Bearer token from a throttled address: not looked at.
    Throttled(Duration),
}

/// How long `peer` must wait before a token it sends is looked at, if it
/// failed too often.
fn throttled(hub: &Hub, peer: SocketAddr) -> Option<Duration> {
    hub.guard()
        .limits
        .auth_gate_now(Some(peer))
        .err()
        .map(|e| match e {
            Error::RateLimited { retry_after, .. } => retry_after,
            _ => Duration::from_secs(1),
        })
}

/// Counts a wrong token from `peer` (logged in aggregate by `guard`).
fn failed(hub: &Hub, peer: SocketAddr) {
    hub.guard().limits.auth_failed(Some(peer));
}

/// A Bearer token counts against the throttle like a sign-in; a session
/// cookie does not (a stale one after a restart is no guess, and the page
/// refreshes itself).
fn access(hub: &Hub, peer: SocketAddr, headers: &HeaderMap) -> Access {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        if let Some(wait) = throttled(hub, peer) {
            return Access::Throttled(wait);
        }
        if hub.is_admin_token(token.trim()) {
            return Access::Granted;
        }
        failed(hub, peer);
        return Access::Denied;
    }
    match session_id(headers).is_some_and(|id| hub.sessions().valid(id, hub.now_ms())) {
        true => Access::Granted,
        false => Access::Denied,
    }
}

/// `GET /`: the page, the sign-in form (401), or 429 for a Bearer token
/// from a throttled address.
pub async fn page(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match access(&hub, peer, &headers) {
        Access::Granted => {}
        Access::Denied => return sign_in(StatusCode::UNAUTHORIZED, ""),
        Access::Throttled(wait) => return too_many(wait),
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

/// `POST /login`: checks the admin token and sets the session cookie; from
/// an address that sent too many wrong tokens, 429 without a look at it.
pub async fn login(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<SignIn>,
) -> Response {
    if let Some(wait) = throttled(&hub, peer) {
        return too_many(wait);
    }
    if !hub.is_admin_token(form.token.trim()) {
        failed(&hub, peer);
        return sign_in(StatusCode::UNAUTHORIZED, "That is not the admin token.");
    }
    let id = hub.sessions().create(hub.now_ms());
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_MS / 1000,
        secure(&hub)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// `POST /logout`: ends the session.
pub async fn logout(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        hub.sessions().remove(id);
    }
    let cookie = format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        secure(&hub)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// The cookie attribute that keeps a session off plaintext connections,
/// when the HTTP port serves TLS.
fn secure(hub: &Hub) -> &'static str {
    if hub.settings().http_tls {
        "; Secure"
    } else {
        ""
    }
}

/// 429 with the sign-in form and `Retry-After` (whole seconds, rounded up).
fn too_many(wait: Duration) -> Response {
    let seconds = u64::try_from(wait.as_millis().div_ceil(1000).max(1)).unwrap_or(u64::MAX);
    let message = format!("Too many wrong tokens from your address. Try again in {seconds} s.");
    let mut response = sign_in(StatusCode::TOO_MANY_REQUESTS, &message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
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
         <th>Status</th><th>Last heartbeat</th><th>Version</th><th>Labels</th><th>Outstanding</th><th>Delivery</th></tr></thead><tbody>",
        spokes.len()
    );
    if spokes.is_empty() {
        html.push_str("<tr><td colspan=\"8\" class=\"muted\">No spokes registered yet.</td></tr>");
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
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            escape(&status),
            escape(&ago(s.last_heartbeat_at, now)),
            escape(&s.version),
            escape(&labels.join(", ")),
            s.outstanding,
            delivery_cell(s, wire.connected, now),
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
    html.push_str("</tbody></table>");
    if let Some(nats) = &hub.settings().nats {
        publisher_section(&mut html, nats, &hub.publisher().get(), store.last_event());
    }
    html.push_str("</main></body></html>");
    Ok(html)
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
        "<h2 id=\"nats\">Events to NATS JetStream</h2><table id=\"nats-table\"><tbody>\
         <tr><th>Stream</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Subjects</th><td class=\"mono\">{}.&gt;</td></tr>\
         <tr><th>Status</th><td>{}</td></tr>\
         <tr><th>Last published</th><td>{}</td></tr>\
         <tr><th>Behind the log</th><td>{}</td></tr>\
         <tr><th>Removed by retention before publishing</th><td>{}</td></tr>\
         </tbody></table>",
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
fn delivery_cell(s: &crate::spokes::SpokeRecord, connected: bool, now: i64) -> String {
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
pub fn webhook_outcome(w: &crate::spokes::WebhookAttempt, now: i64) -> String {
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
