//! The operator console: pages for the fleet, a spoke (with its metrics as
//! charts), a directive and the event log; forms that act (send, cancel,
//! revoke, rotate a key, delete); and live updates from the event log.
//!
//! Rendered on the server as plain HTML, readable without JavaScript. A
//! small script of the hub's own (`/console.js`, no other source) follows
//! the event log over Server-Sent Events (`/live`, fed by the same commit
//! signal as `WatchEvents`) and refreshes the page's live sections in
//! place; it says so when the connection drops and resumes after the last
//! event it saw.
//!
//! Guarded by the admin token: a sign-in form sets a session cookie
//! (HttpOnly, SameSite=Strict, and Secure when the HTTP port serves TLS),
//! or a client sends `Authorization: Bearer <admin token>`. A wrong token
//! counts against the peer address's budget of failed authentications,
//! shared with the gRPC port (`guard`): past it, tokens from that address
//! are answered 429 without a look. Every form POST carries the session's
//! own random token (checked in constant time, on top of SameSite), and a
//! destructive action asks to be confirmed first. Every action calls the
//! same `AdminService` code the CLI reaches over gRPC, so it answers with
//! the same errors. Everything shown is escaped: names, labels, payloads,
//! metric labels and messages come from spokes and operators; and every
//! HTTP response carries headers that allow only the hub's own script,
//! and forbid framing and content sniffing ([`security_headers`]).

mod actions;
mod charts;
mod directive;
mod events;
mod fleet;
mod layout;
mod live;
mod spoke;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::Form;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use self::layout::escape;
pub use self::layout::escape as escape_html;
use crate::api::Hub;
use crate::error::Error;

const COOKIE: &str = "hub_session";
/// How long a sign-in lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;

/// The content security policy of every HTTP response: nothing may load or
/// run but the hub's own script and inline `<style>`, connections go to the
/// hub only (the live stream), forms post only to the hub, no one may
/// frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     connect-src 'self'; style-src 'unsafe-inline'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (the HTTP port adds health and metrics).
pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/", get(fleet::page))
        .route("/spokes/{name}", get(spoke::page))
        .route("/directives/{id}", get(directive::page))
        .route("/events", get(events::page))
        .route("/live", get(live::stream))
        .route("/console.js", get(live::script))
        .route("/spokes/{name}/send", post(actions::send))
        .route("/spokes/{name}/revoke", post(actions::revoke))
        .route("/spokes/{name}/rotate", post(actions::rotate))
        .route("/spokes/{name}/delete", post(actions::delete))
        .route("/directives/{id}/cancel", post(actions::cancel))
        .route("/login", post(login))
        .route("/logout", post(logout))
}

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

/// Signed-in browser sessions. A session id is `<end>.<nonce>.<mac>`: when
/// it ends (Unix ms), 32 random bytes, and an HMAC of both under a key
/// derived from the admin token; so sessions outlive a restart of the hub
/// (a console's live stream resumes) and end when the admin token changes.
/// The form token of a session is another HMAC of its nonce. Signing out
/// ends a session in this process (and deletes the browser's cookie).
pub struct Sessions {
    key: ring::hmac::Key,
    /// Sessions signed out, until they would have ended.
    ended: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(..)")
    }
}

impl Sessions {
    /// Sessions signed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            ended: Mutex::default(),
        }
    }

    fn mac(&self, text: &str) -> String {
        let tag = ring::hmac::sign(&self.key, text.as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn create(&self, now_ms: i64) -> String {
        let signed = format!("{}.{}", now_ms + SESSION_MS, crate::auth::generate_secret());
        format!("{signed}.{}", self.mac(&signed))
    }

    /// The session's form token, while it is valid.
    fn csrf(&self, id: &str, now_ms: i64) -> Option<String> {
        let (signed, mac) = id.rsplit_once('.')?;
        let (until, nonce) = signed.split_once('.')?;
        if !crate::auth::hashes_match(&self.mac(signed), mac) {
            return None;
        }
        let until: i64 = until.parse().ok()?;
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(id);
        (until > now_ms && !ended).then(|| self.mac(&format!("csrf.{nonce}")))
    }

    fn remove(&self, id: &str, now_ms: i64) {
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ended.retain(|_, until| *until > now_ms);
        ended.insert(id.to_owned(), now_ms + SESSION_MS);
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

/// Who is looking: a browser session (its forms carry `csrf`), or a client
/// with the admin token in a header (no cookie, so no forgery to fear).
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    csrf: Option<String>,
}

impl Viewer {
    /// The hidden form field every POST form carries.
    fn csrf_field(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            escape(self.csrf.as_deref().unwrap_or(""))
        )
    }

    /// Whether a form's token is this session's (always, for a Bearer
    /// client).
    fn form_token_ok(&self, sent: &str) -> bool {
        match &self.csrf {
            None => true,
            Some(csrf) => crate::auth::hashes_match(csrf, sent),
        }
    }
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

/// Lets a request in, or answers it: the sign-in form (401) or 429. A
/// Bearer token counts against the throttle like a sign-in; a session
/// cookie does not (a stale one after a restart is no guess).
fn authorize(hub: &Hub, peer: SocketAddr, headers: &HeaderMap) -> Result<Viewer, Box<Response>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        if let Some(wait) = throttled(hub, peer) {
            return Err(Box::new(too_many(wait)));
        }
        if hub.is_admin_token(token.trim()) {
            return Ok(Viewer { csrf: None });
        }
        failed(hub, peer);
        return Err(Box::new(sign_in(StatusCode::UNAUTHORIZED, "")));
    }
    match session_id(headers).and_then(|id| hub.sessions().csrf(id, hub.now_ms())) {
        Some(csrf) => Ok(Viewer { csrf: Some(csrf) }),
        None => Err(Box::new(sign_in(StatusCode::UNAUTHORIZED, ""))),
    }
}

/// A rendered page, or why there is none.
fn html_page(rendered: crate::Result<String>) -> Response {
    match rendered {
        Ok(html) => ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "rendering a console page failed");
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

/// `POST /logout`: ends the session (with its form token: a forged sign-out
/// is refused like any forged form).
pub async fn logout(State(hub): State<Hub>, headers: HeaderMap, body: String) -> Response {
    // The token is hex: no decoding needed.
    let sent = body
        .split('&')
        .find_map(|field| field.strip_prefix("csrf="))
        .unwrap_or_default();
    if let Some(id) = session_id(&headers) {
        let now = hub.now_ms();
        if let Some(csrf) = hub.sessions().csrf(id, now) {
            if !crate::auth::hashes_match(&csrf, sent) {
                return (
                    StatusCode::FORBIDDEN,
                    "sign out from the console's own form\n",
                )
                    .into_response();
            }
            hub.sessions().remove(id, now);
        }
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
        "{}<title>hub: sign in</title></head><body><main class=\"narrow\">\
         <h1>hub</h1>{note}<form method=\"post\" action=\"/login\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The token is in <code>hub-data/admin.token</code> on the hub's machine.</p>\
         </main></body></html>",
        layout::HEAD
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "a=1; hub_session=abc; b=2".parse().unwrap());
        assert_eq!(session_id(&headers), Some("abc"));
    }

    #[test]
    fn a_session_has_its_own_form_token_until_it_ends_or_signs_out() {
        let sessions = Sessions::new([7; 32]);
        let a = sessions.create(0);
        let b = sessions.create(0);
        let (ta, tb) = (sessions.csrf(&a, 1).unwrap(), sessions.csrf(&b, 1).unwrap());
        assert_ne!(ta, tb);
        assert_eq!(ta.len(), 64);
        assert!(sessions.csrf(&a, SESSION_MS).is_none());
        // Another process with the same admin token knows it; another
        // token, or a changed end, does not.
        assert_eq!(Sessions::new([7; 32]).csrf(&a, 1), Some(ta.clone()));
        assert!(Sessions::new([8; 32]).csrf(&a, 1).is_none());
        let (end, rest) = a.split_once('.').unwrap();
        assert_eq!(end, SESSION_MS.to_string());
        let forged = format!("{}.{rest}", SESSION_MS * 9);
        assert!(sessions.csrf(&forged, 1).is_none());
        sessions.remove(&b, 1);
        assert!(sessions.csrf(&b, 2).is_none());
        let viewer = Viewer {
            csrf: Some(ta.clone()),
        };
        assert!(viewer.form_token_ok(&ta));
        assert!(!viewer.form_token_ok(&tb));
        assert!(!viewer.form_token_ok(""));
    }
}
