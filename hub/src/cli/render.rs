//! Output: aligned tables, relative times ("12s ago"), and short names for
//! the contract's enums.

use std::io::Write;

use hub_proto::v1 as proto;
use pbjson_types::Timestamp;

/// A table printed with aligned columns.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table, or `empty` when it has no rows.
    pub fn print(&self, out: &mut dyn Write, empty: &str) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return writeln!(out, "{empty}");
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let padded: Vec<String> = cells
                .zip(&widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            padded.join("  ").trim_end().to_owned()
        };
        writeln!(out, "{}", line(&mut self.headers.iter().copied()))?;
        for row in &self.rows {
            writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
        }
        Ok(())
    }
}

/// Milliseconds of a Timestamp.
fn ms(ts: &Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000)
}

/// How long before `now_ms` a time was, as "12s ago"; "never" when unset.
pub fn ago(ts: Option<&Timestamp>, now_ms: i64) -> String {
    crate::wire::ago(ts.map(ms), now_ms)
}

/// A time as RFC 3339 (UTC, seconds); "-" when unset.
pub fn time(ts: Option<&Timestamp>) -> String {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// Labels as `k=v,k2=v2` (sorted); "-" when none.
pub fn labels(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        return "-".to_owned();
    }
    pairs.sort();
    pairs.join(",")
}

/// A JSON object (payload, result, details) on one line.
pub fn json(s: Option<&pbjson_types::Struct>) -> String {
    s.map_or_else(
        || "{}".to_owned(),
        |s| crate::wire::value_of_struct(s).to_string(),
    )
}

/// A health without its enum prefix: ONLINE, STALE, OFFLINE, REVOKED.
pub fn health(value: i32) -> String {
    strip(
        proto::SpokeHealth::try_from(value).map(|h| h.as_str_name()),
        "SPOKE_HEALTH_",
    )
}

/// A directive state without its prefix: PENDING, COMPLETED, ...
pub fn state(value: i32) -> String {
    strip(
        proto::DirectiveState::try_from(value).map(|s| s.as_str_name()),
        "DIRECTIVE_STATE_",
    )
}

/// An event type without its prefix: DIRECTIVE_COMPLETED, ...
pub fn event_type(value: i32) -> String {
    strip(
        proto::EventType::try_from(value).map(|t| t.as_str_name()),
        "EVENT_TYPE_",
    )
}

/// A spoke status without its prefix: OK, DEGRADED, ERROR.
pub fn status(value: i32) -> String {
    strip(
        proto::SpokeStatus::try_from(value).map(|s| s.as_str_name()),
        "SPOKE_STATUS_",
    )
}

fn strip<E>(name: Result<&'static str, E>, prefix: &str) -> String {
    match name {
        Ok(n) => n.strip_prefix(prefix).unwrap_or(n).to_owned(),
        Err(_) => "?".to_owned(),
    }
}

/// Writes a message as pretty proto3 JSON.
pub fn write_json<T: serde::Serialize>(out: &mut dyn Write, value: &T) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::other)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["NAME", "HEALTH"]);
        t.row(vec!["billing-eu".into(), "ONLINE".into()]);
        t.row(vec!["a".into(), "OFFLINE".into()]);
        let mut out = Vec::new();
        t.print(&mut out, "none").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME        HEALTH\nbilling-eu  ONLINE\na           OFFLINE\n"
        );
    }

    #[test]
    fn relative_times_read_naturally() {
        let at = |ms: i64| Timestamp {
            seconds: ms / 1000,
            nanos: 0,
        };
        assert_eq!(ago(Some(&at(88_000)), 100_000), "12s ago");
        assert_eq!(ago(Some(&at(0)), 180_000), "3m ago");
        assert_eq!(ago(Some(&at(0)), 7_200_000), "2h ago");
        assert_eq!(ago(None, 1), "never");
    }
}
