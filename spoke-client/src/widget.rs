//! The "hub status" widget: a [`Status`] rendered as JSON or as an HTML
//! snippet, for a spoke to show in its own admin page.
//!
//! Both renderers take the time to measure the heartbeat's age from
//! (`*_at`), so what they print can be checked without a clock; the plain
//! forms use the system clock. Times are RFC 3339 in UTC, formatted here
//! from [`SystemTime`] rather than with a date library.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::status::{KeyState, SpokeStatus, Status};

/// Scoped to `.hub-status`, so it leaves the host page alone. The meaning
/// never rests on colour: every state is also a word.
const STYLE: &str = "<style>\
.hub-status{border:1px solid #8888;border-radius:4px;padding:.5em 1em;max-width:44em}\
.hub-status-state{font-weight:bold;margin:.25em 0 .5em}\
.hub-status-up .hub-status-mark{color:#1a7f37}\
.hub-status-down .hub-status-mark{color:#b42318}\
.hub-status-alert{color:#b42318}\
.hub-status dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}\
.hub-status dt{font-weight:600}\
.hub-status dd{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}\
</style>";

impl Status {
    /// The snapshot as JSON, with the heartbeat's age measured now; see
    /// [`to_json_at`](Self::to_json_at) for the fields.
    ///
    /// For a JSON endpoint in the spoke's own admin server (axum here;
    /// any framework does):
    ///
    /// ```ignore
    /// async fn hub_status(State(client): State<spoke_client::Client>) -> Json<serde_json::Value> {
    ///     Json(client.status().to_json())
    /// }
    /// ```
    #[must_use]
    pub fn to_json(&self) -> Value {
        self.to_json_at(SystemTime::now())
    }

    /// The snapshot as JSON, with the heartbeat's age measured at `now`.
    ///
    /// The field names are stable: `connected`, `endpoint` (or null),
    /// `endpoints`, `endpoints_from_hub`, `last_heartbeat` (RFC 3339 UTC,
    /// or null before the first), `last_heartbeat_age_seconds` (whole
    /// seconds, 0 if the heartbeat is after `now`; null before the first),
    /// `pending_directives`, `in_flight_directives`, `buffered_points`,
    /// `failed_pushes`, `dropped_points`, `rejected_points`, `last_error`
    /// (or null), `key` (`{"state": "pending" | "accepted" | "refused",
    /// "message": the hub's message when refused, else null}`),
    /// `spoke_status` (`"ok"`, `"degraded"` or `"error"`) and
    /// `status_message`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// let status = spoke_client::Status::default();
    /// let json = status.to_json_at(SystemTime::now());
    /// assert_eq!(json["connected"], false);
    /// assert_eq!(json["last_heartbeat"], serde_json::Value::Null);
    /// assert_eq!(json["key"]["state"], "pending");
    /// ```
    #[must_use]
    pub fn to_json_at(&self, now: SystemTime) -> Value {
        let (key_state, key_message) = match &self.key {
            KeyState::Pending => ("pending", None),
            KeyState::Accepted => ("accepted", None),
            KeyState::Refused { message } => ("refused", Some(message.as_str())),
        };
        json!({
            "connected": self.connected,
            "endpoint": self.endpoint,
            "endpoints": self.endpoints,
            "endpoints_from_hub": self.endpoints_from_hub,
            "last_heartbeat": self.last_heartbeat.map(rfc3339),
            "last_heartbeat_age_seconds": self.last_heartbeat.map(|at| age_seconds(at, now)),
            "pending_directives": self.pending_directives,
            "in_flight_directives": self.in_flight_directives,
            "buffered_points": self.buffered_points,
            "failed_pushes": self.failed_pushes,
            "dropped_points": self.dropped_points,
            "rejected_points": self.rejected_points,
            "last_error": self.last_error,
            "key": { "state": key_state, "message": key_message },
            "spoke_status": spoke_status_name(self.spoke_status),
            "status_message": self.status_message,
        })
    }

    /// The snapshot as a self-contained HTML snippet, with the heartbeat's
    /// age measured now; see [`to_html_at`](Self::to_html_at).
    ///
    /// Drop it anywhere in a page the spoke serves:
    ///
    /// ```no_run
    /// # fn demo(client: spoke_client::Client) {
    /// let page = format!(
    ///     "<!doctype html><html lang=\"en\"><title>Billing admin</title><h1>Billing</h1>{}</html>",
    ///     client.status().to_html()
    /// );
    /// # }
    /// ```
    ///
    /// or answer with it alone, for a page that fetches and inserts it
    /// (axum here; any framework does):
    ///
    /// ```ignore
    /// async fn hub_status(State(client): State<spoke_client::Client>) -> Html<String> {
    ///     Html(client.status().to_html())
    /// }
    /// ```
    #[must_use]
    pub fn to_html(&self) -> String {
        self.to_html_at(SystemTime::now())
    }

    /// The snapshot as a self-contained HTML snippet, with the heartbeat's
    /// age measured at `now`.
    ///
    /// One `<section aria-label="Hub status">` holding a line that says
    /// "Connected" or "Disconnected" and a `<dl>` of the rest. Every value
    /// is HTML-escaped (an endpoint, error or status message cannot inject
    /// markup); there is no script and nothing external, only a small
    /// `<style>` scoped to the `hub-status` classes. Under a
    /// Content-Security-Policy that forbids inline styles the snippet
    /// reads the same, unstyled: style the `hub-status-*` classes from the
    /// page's own stylesheet instead.
    ///
    /// ```
    /// use std::time::SystemTime;
    ///
    /// let html = spoke_client::Status::default().to_html_at(SystemTime::now());
    /// assert!(html.starts_with("<section class=\"hub-status\" aria-label=\"Hub status\">"));
    /// assert!(html.contains("Disconnected"));
    /// ```
    #[must_use]
    pub fn to_html_at(&self, now: SystemTime) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("<section class=\"hub-status\" aria-label=\"Hub status\">");
        out.push_str(STYLE);
        let (class, mark, word) = if self.connected {
            ("hub-status-up", "●", "Connected")
        } else {
            ("hub-status-down", "○", "Disconnected")
        };
        let _ = write!(
            out,
            "<p class=\"hub-status-state {class}\">\
             <span class=\"hub-status-mark\" aria-hidden=\"true\">{mark}</span> {word}</p><dl>"
        );

        let endpoint = self.endpoint.as_deref().map_or_else(
            || "none yet".to_owned(),
            |e| format!("<code>{}</code>", escape(e)),
        );
        row(&mut out, "Endpoint", &endpoint);

        let mut endpoints = self
            .endpoints
            .iter()
            .map(|e| format!("<code>{}</code>", escape(e)))
            .collect::<Vec<_>>()
            .join(", ");
        if endpoints.is_empty() {
            endpoints.push_str("none");
        }
        endpoints.push_str(if self.endpoints_from_hub {
            " (from the hub)"
        } else {
            " (configured)"
        });
        row(&mut out, "Endpoints", &endpoints);

        let heartbeat = self.last_heartbeat.map_or_else(
            || "never".to_owned(),
            |at| {
                let at_text = rfc3339(at);
                format!(
                    "<time datetime=\"{at_text}\">{at_text}</time> ({})",
                    ago(age_seconds(at, now))
                )
            },
        );
        row(&mut out, "Last heartbeat", &heartbeat);

        let key = match &self.key {
            KeyState::Pending => "Pending (no hub has answered yet)".to_owned(),
            KeyState::Accepted => "Accepted".to_owned(),
            KeyState::Refused { message } => format!(
                "<span class=\"hub-status-alert\">Refused</span>: {}",
                escape(message)
            ),
        };
        row(&mut out, "Key", &key);

        for (label, count) in [
            ("Pending directives", self.pending_directives),
            ("In-flight directives", self.in_flight_directives),
            ("Buffered points", self.buffered_points),
            ("Failed pushes", self.failed_pushes),
            ("Dropped points", self.dropped_points),
            ("Rejected points", self.rejected_points),
        ] {
            row(&mut out, label, &count.to_string());
        }

        let error = self.last_error.as_deref().map_or_else(
            || "none".to_owned(),
            |e| format!("<span class=\"hub-status-alert\">{}</span>", escape(e)),
        );
        row(&mut out, "Last error", &error);

        let mut status = match self.spoke_status {
            SpokeStatus::Ok => "OK",
            SpokeStatus::Degraded => "Degraded",
            SpokeStatus::Error => "Error",
        }
        .to_owned();
        if !self.status_message.is_empty() {
            let _ = write!(status, ": {}", escape(&self.status_message));
        }
        row(&mut out, "Application status", &status);

        out.push_str("</dl></section>");
        out
    }
}

/// One `<dt>`/`<dd>` pair; `html` is already escaped.
fn row(out: &mut String, label: &str, html: &str) {
    let _ = write!(out, "<dt>{label}</dt><dd>{html}</dd>");
}

fn spoke_status_name(status: SpokeStatus) -> &'static str {
    match status {
        SpokeStatus::Ok => "ok",
        SpokeStatus::Degraded => "degraded",
        SpokeStatus::Error => "error",
    }
}

/// Whole seconds from `at` to `now`; 0 when `at` is later (the clock was
/// set back since).
fn age_seconds(at: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(at).map_or(0, |d| d.as_secs())
}

fn ago(seconds: u64) -> String {
    match seconds {
        0..120 => format!("{seconds} s ago"),
        120..7200 => format!("{} min ago", seconds / 60),
        7200..172_800 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

/// `at` as RFC 3339 in UTC to the second, e.g. `2023-11-14T22:13:20Z`.
fn rfc3339(at: SystemTime) -> String {
    // Whole seconds since the epoch, rounded down also before it.
    let secs = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script>";
    const HOSTILE_ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn populated() -> Status {
        Status {
            connected: true,
            endpoint: Some("https://hub-b.example:50051".into()),
            endpoints: vec![
                "https://hub-a.example:50051".into(),
                "https://hub-b.example:50051".into(),
            ],
            endpoints_from_hub: true,
            last_heartbeat: Some(at(1_700_000_000)),
            pending_directives: 3,
            in_flight_directives: 2,
            buffered_points: 42,
            failed_pushes: 7,
            dropped_points: 5,
            rejected_points: 6,
            last_error: Some("push failed: UNAVAILABLE".into()),
            key: KeyState::Refused {
                message: "spoke key revoked".into(),
            },
            spoke_status: SpokeStatus::Degraded,
            status_message: "disk 91% full".into(),
        }
    }

    #[test]
    fn json_of_a_populated_status_has_every_field() {
        let json = populated().to_json_at(at(1_700_000_012));
        assert_eq!(
            json,
            json!({
                "connected": true,
                "endpoint": "https://hub-b.example:50051",
                "endpoints": ["https://hub-a.example:50051", "https://hub-b.example:50051"],
                "endpoints_from_hub": true,
                "last_heartbeat": "2023-11-14T22:13:20Z",
                "last_heartbeat_age_seconds": 12,
                "pending_directives": 3,
                "in_flight_directives": 2,
                "buffered_points": 42,
                "failed_pushes": 7,
                "dropped_points": 5,
                "rejected_points": 6,
                "last_error": "push failed: UNAVAILABLE",
                "key": { "state": "refused", "message": "spoke key revoked" },
                "spoke_status": "degraded",
                "status_message": "disk 91% full",
            })
        );
    }

    #[test]
    fn json_of_the_default_status_has_every_field() {
        let json = Status::default().to_json_at(at(1_700_000_000));
        assert_eq!(
            json,
            json!({
                "connected": false,
                "endpoint": null,
                "endpoints": [],
                "endpoints_from_hub": false,
                "last_heartbeat": null,
                "last_heartbeat_age_seconds": null,
                "pending_directives": 0,
                "in_flight_directives": 0,
                "buffered_points": 0,
                "failed_pushes": 0,
                "dropped_points": 0,
                "rejected_points": 0,
                "last_error": null,
                "key": { "state": "pending", "message": null },
                "spoke_status": "ok",
                "status_message": "",
            })
        );
    }

    #[test]
    fn json_key_and_status_names() {
        let accepted = Status {
            key: KeyState::Accepted,
            spoke_status: SpokeStatus::Error,
            ..Status::default()
        }
        .to_json_at(at(0));
        assert_eq!(
            accepted["key"],
            json!({ "state": "accepted", "message": null })
        );
        assert_eq!(accepted["spoke_status"], "error");
    }

    #[test]
    fn heartbeat_after_now_has_age_zero() {
        let status = Status {
            last_heartbeat: Some(at(1_000)),
            ..Status::default()
        };
        assert_eq!(status.to_json_at(at(990))["last_heartbeat_age_seconds"], 0);
        assert!(status.to_html_at(at(990)).contains("(0 s ago)"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(4_107_456_000)), "2100-02-28T00:00:00Z");
        assert_eq!(rfc3339(at(253_402_300_799)), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(at(1_700_000_000) + Duration::from_millis(999)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(500)),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(62_135_596_800)),
            "0001-01-01T00:00:00Z"
        );
    }

    #[test]
    fn ages_in_words() {
        assert_eq!(ago(0), "0 s ago");
        assert_eq!(ago(119), "119 s ago");
        assert_eq!(ago(120), "2 min ago");
        assert_eq!(ago(7_199), "119 min ago");
        assert_eq!(ago(7_200), "2 h ago");
        assert_eq!(ago(172_800), "2 d ago");
    }

    #[test]
    fn html_of_the_default_status_says_disconnected() {
        let html = Status::default().to_html_at(at(0));
        assert!(html.starts_with("<section class=\"hub-status\" aria-label=\"Hub status\">"));
        assert!(html.ends_with("</dl></section>"));
        assert!(html.contains(
            "<p class=\"hub-status-state hub-status-down\">\
             <span class=\"hub-status-mark\" aria-hidden=\"true\">○</span> Disconnected</p>"
        ));
        assert!(!html.contains("> Connected<"));
        assert!(html.contains("<dt>Endpoint</dt><dd>none yet</dd>"));
        assert!(html.contains("<dt>Endpoints</dt><dd>none (configured)</dd>"));
        assert!(html.contains("<dt>Last heartbeat</dt><dd>never</dd>"));
        assert!(html.contains("<dt>Key</dt><dd>Pending (no hub has answered yet)</dd>"));
        assert!(html.contains("<dt>Buffered points</dt><dd>0</dd>"));
        assert!(html.contains("<dt>Last error</dt><dd>none</dd>"));
        assert!(html.contains("<dt>Application status</dt><dd>OK</dd>"));
    }

    #[test]
    fn html_of_a_populated_status_shows_state_and_counts() {
        let html = populated().to_html_at(at(1_700_000_012));
        assert!(html.contains(
            "<span class=\"hub-status-mark\" aria-hidden=\"true\">●</span> Connected</p>"
        ));
        assert!(!html.contains("Disconnected"));
        assert!(
            html.contains("<dt>Endpoint</dt><dd><code>https://hub-b.example:50051</code></dd>")
        );
        assert!(html.contains(
            "<dd><code>https://hub-a.example:50051</code>, \
             <code>https://hub-b.example:50051</code> (from the hub)</dd>"
        ));
        assert!(html.contains(
            "<dt>Last heartbeat</dt><dd><time datetime=\"2023-11-14T22:13:20Z\">\
             2023-11-14T22:13:20Z</time> (12 s ago)</dd>"
        ));
        for (label, count) in [
            ("Pending directives", 3),
            ("In-flight directives", 2),
            ("Buffered points", 42),
            ("Failed pushes", 7),
            ("Dropped points", 5),
            ("Rejected points", 6),
        ] {
            let expected = format!("<dt>{label}</dt><dd>{count}</dd>");
            assert!(html.contains(&expected), "{expected} missing from {html}");
        }
        assert!(html.contains(
            "<dt>Key</dt><dd><span class=\"hub-status-alert\">Refused</span>: spoke key revoked</dd>"
        ));
        assert!(html.contains("<dt>Application status</dt><dd>Degraded: disk 91% full</dd>"));
    }

    #[test]
    fn html_escapes_hostile_text() {
        let status = Status {
            endpoint: Some(format!("http://x/{HOSTILE}")),
            endpoints: vec![format!("http://y/\"'&{HOSTILE}")],
            last_error: Some(HOSTILE.into()),
            key: KeyState::Refused {
                message: HOSTILE.into(),
            },
            status_message: HOSTILE.into(),
            ..Status::default()
        };
        let html = status.to_html_at(at(0));
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains(&format!("<code>http://x/{HOSTILE_ESCAPED}</code>")));
        assert!(html.contains(&format!(
            "<code>http://y/&quot;&#39;&amp;{HOSTILE_ESCAPED}</code>"
        )));
        assert!(html.contains(&format!(
            "<dt>Last error</dt><dd><span class=\"hub-status-alert\">{HOSTILE_ESCAPED}</span></dd>"
        )));
        assert!(html.contains(&format!("Refused</span>: {HOSTILE_ESCAPED}</dd>")));
        assert!(html.contains(&format!("<dd>OK: {HOSTILE_ESCAPED}</dd>")));
    }

    #[test]
    fn html_has_no_script_and_nothing_external() {
        let html = populated().to_html_at(at(0));
        for banned in ["<script", "src=", "href=", "url(", "@import", "javascript:"] {
            assert!(!html.contains(banned), "{banned} in {html}");
        }
    }
}
