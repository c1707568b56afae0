//! Conversions between the wire's well-known types (Struct, Timestamp,
//! Duration) and the values the hub stores.

use chrono::{DateTime, Utc};
use pbjson_types::{Duration, Struct, Timestamp};

use crate::error::{Error, Result};

/// How long before `now_ms` a time was, for people: "12s ago", "3m ago",
/// "2h ago", "5d ago"; "never" when unset.
pub fn ago(at_ms: Option<i64>, now_ms: i64) -> String {
    let Some(at) = at_ms else {
        return "never".to_owned();
    };
    let secs = (now_ms - at).max(0) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// A Unix-millisecond time as a protobuf Timestamp.
pub fn timestamp_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A Unix-nanosecond time as a protobuf Timestamp.
pub fn timestamp_ns(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// A Timestamp as Unix milliseconds, checked to be a valid time.
pub fn ms_of(ts: &Timestamp, field: &str) -> Result<i64> {
    Ok(datetime_of(ts, field)?.timestamp_millis())
}

/// A Timestamp as Unix nanoseconds, checked to be representable.
pub fn ns_of(ts: &Timestamp, field: &str) -> Result<i64> {
    datetime_of(ts, field)?
        .timestamp_nanos_opt()
        .ok_or_else(|| Error::invalid(field, "timestamp out of range"))
}

fn datetime_of(ts: &Timestamp, field: &str) -> Result<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::invalid(field, "nanos must be within 0..1e9"));
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
        .ok_or_else(|| Error::invalid(field, "timestamp out of range"))
}

/// A millisecond count as a protobuf Duration.
pub fn duration_ms(ms: i64) -> Duration {
    Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A std Duration as a protobuf Duration.
pub fn duration_std(d: std::time::Duration) -> Duration {
    duration_ms(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A protobuf Duration as milliseconds, checked to be non-negative.
pub fn ms_of_duration(d: &Duration, field: &str) -> Result<i64> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    d.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(d.nanos / 1_000_000)))
        .ok_or_else(|| Error::invalid(field, "duration out of range"))
}

/// A Struct as a JSON object value.
pub fn value_of_struct(s: &Struct) -> serde_json::Value {
    hub_proto::json::to_json(s)
}

/// Stored JSON text back as a Struct.
pub fn struct_of_json(text: &str) -> Result<Struct> {
    let value = serde_json::from_str(text)
        .map_err(|e| Error::Corrupt(format!("stored JSON object: {e}")))?;
    hub_proto::json::from_json(value)
        .ok_or_else(|| Error::Corrupt("stored JSON is not an object".into()))
}

/// A JSON object value (from `serde_json::json!`) as a Struct; anything
/// else gives an empty Struct.
pub fn struct_of_value(value: serde_json::Value) -> Struct {
    hub_proto::json::from_json(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json_text() {
        let value = serde_json::json!({
            "doc": "a/b", "n": 3.5, "deep": {"list": [1, "two", null, true]}, "empty": {}
        });
        let s = struct_of_value(value.clone());
        let text = value_of_struct(&s).to_string();
        let back = struct_of_json(&text).unwrap();
        assert_eq!(back, s);
        // null is an explicit null_value, which strict proto3 JSON printers
        // (grpcurl) require.
        let null = &back.fields["deep"];
        let Some(pbjson_types::value::Kind::StructValue(deep)) = &null.kind else {
            panic!("deep is an object");
        };
        let Some(pbjson_types::value::Kind::ListValue(list)) = &deep.fields["list"].kind else {
            panic!("list is a list");
        };
        assert_eq!(
            list.values[2].kind,
            Some(pbjson_types::value::Kind::NullValue(0))
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
    }

    #[test]
    fn times_convert_both_ways() {
        let ts = timestamp_ms(1_700_000_000_123);
        assert_eq!(ms_of(&ts, "t").unwrap(), 1_700_000_000_123);
        let ts = timestamp_ns(-1);
        assert_eq!(ns_of(&ts, "t").unwrap(), -1);
        let bad = Timestamp {
            seconds: 0,
            nanos: -5,
        };
        assert!(ms_of(&bad, "t").is_err());
        assert_eq!(ms_of_duration(&duration_ms(1500), "d").unwrap(), 1500);
        assert!(
            ms_of_duration(
                &Duration {
                    seconds: -1,
                    nanos: 0
                },
                "d"
            )
            .is_err()
        );
    }
}
