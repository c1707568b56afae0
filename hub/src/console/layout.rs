//! What every console page shares: the head and style, the frame with its
//! navigation and live-status line, escaping, and small formatters.

use std::fmt::Write;

use hub_proto::v1 as proto;

use super::Viewer;

/// The document head up to the title, with the one stylesheet (inline).
/// Contrast: text and badges are at least 4.5:1 on their backgrounds.
pub const HEAD: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>\
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}\
main{max-width:1200px;margin:0 auto;padding:16px 24px}main.narrow{max-width:420px}\
header{display:flex;justify-content:space-between;align-items:baseline;gap:16px;flex-wrap:wrap}\
nav a{margin-right:14px}a{color:#1d4ed8}a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #2563eb;outline-offset:1px}\
h1{font-size:22px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e3e6ea;vertical-align:top}\
th{background:#eef0f3;font-weight:600}td.mono,code,pre,.mono{font-family:ui-monospace,monospace;font-size:12px}\
pre{background:#fff;border:1px solid #e3e6ea;padding:8px;white-space:pre-wrap;word-break:break-all}\
.health{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}\
.ONLINE{background:#d3f5dc;color:#0b6b2a}.STALE{background:#fff0c2;color:#7a5a00}\
.OFFLINE{background:#fde0e0;color:#9b1c1c}.REVOKED{background:#e4e4e7;color:#3f3f46}\
.error{color:#9b1c1c}.notice{color:#0b6b2a}.hint,.muted{color:#5b6170}\
main.narrow input{display:block;width:100%;margin:6px 0 12px;padding:6px}\
form.inline{display:inline-block;margin:0 8px 8px 0}fieldset{background:#fff;border:1px solid #e3e6ea;margin:12px 0}\
label{font-weight:600;margin-right:6px}textarea{width:100%;min-height:80px;font-family:ui-monospace,monospace}\
.filters{display:flex;gap:12px;align-items:end;flex-wrap:wrap;margin:8px 0}\
#live{font-size:12px}#live.on{color:#0b6b2a}#live.off{color:#9b1c1c}\
figure{background:#fff;border:1px solid #e3e6ea;margin:12px 0;padding:8px}figcaption{font-weight:600}\
.legend span{margin-right:12px;font-size:12px}.secret{font-size:16px;background:#fff7d6;padding:8px}\
</style>";

/// A whole page: head, title, navigation, the live-status line, `body`.
/// `after` is the last event sequence the page reflects: the live script
/// resumes after it.
pub fn frame(viewer: &Viewer, title: &str, after: i64, body: &str) -> String {
    format!(
        "{HEAD}<title>{}</title><script src=\"/console.js\" defer></script></head>\
         <body data-after=\"{after}\"><main>\
         <header><h1><a href=\"/\">hub</a></h1>\
         <nav aria-label=\"Console\"><a href=\"/\">Fleet</a><a href=\"/events\">Events</a></nav>\
         <p id=\"live\" role=\"status\" aria-live=\"polite\" class=\"muted\">Without JavaScript: reload to update.</p>\
         {}<button type=\"submit\">Sign out</button></form></header>\
         {body}</main></body></html>",
        escape(title),
        form_open(viewer, "/logout", "logout"),
    )
}

/// A POST form's opening tag and hidden token.
pub fn form_open(viewer: &Viewer, action: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"{class}\">{}",
        escape(action),
        viewer.csrf_field()
    )
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

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// At most `max` characters, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A time as "2026-11-30 13:06:42 UTC".
pub fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(String::new, |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

/// A wire timestamp as Unix ms.
pub fn ms(ts: Option<&pbjson_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// A health's short name (ONLINE, STALE, OFFLINE, REVOKED).
pub fn health_name(health: i32) -> &'static str {
    proto::SpokeHealth::try_from(health)
        .map(|h| h.as_str_name().trim_start_matches("SPOKE_HEALTH_"))
        .unwrap_or("OFFLINE")
}

/// A health badge (text and colour).
pub fn health_badge(health: i32) -> String {
    let name = health_name(health);
    format!("<span class=\"health {name}\">{name}</span>")
}

/// A directive state's short name.
pub fn state_name(state: i32) -> &'static str {
    proto::DirectiveState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("DIRECTIVE_STATE_"))
        .unwrap_or("UNSPECIFIED")
}

/// A spoke's status as reported: "OK", "DEGRADED: message", or "".
pub fn status_text(status: i32, message: &str) -> String {
    match (proto::SpokeStatus::try_from(status), message) {
        (Ok(proto::SpokeStatus::Unspecified) | Err(_), _) => String::new(),
        (Ok(st), "") => st
            .as_str_name()
            .trim_start_matches("SPOKE_STATUS_")
            .to_owned(),
        (Ok(st), msg) => format!(
            "{}: {msg}",
            st.as_str_name().trim_start_matches("SPOKE_STATUS_")
        ),
    }
}

/// A JSON object shown indented.
pub fn pretty(json: &serde_json::Value) -> String {
    serde_json::to_string_pretty(json).unwrap_or_default()
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
    fn encoding_keeps_unreserved_characters_only() {
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode("x=1&y=<z>/"), "x%3D1%26y%3D%3Cz%3E%2F");
    }
}
