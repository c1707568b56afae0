//! Conversions between the wire's well-known types (Struct, Timestamp,
//! Duration) and the JSON values and std times the client works with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbjson_types::{Struct, Timestamp};

/// A Struct as a JSON object (see [`hub_proto::json`]: whole numbers come
/// out without a fraction, so a payload field typed `u32` deserializes).
pub(crate) fn json_of_struct(s: &Struct) -> serde_json::Value {
    hub_proto::json::to_json(s)
}

/// A JSON object as a Struct (anything else becomes `{}`; callers wrap
/// non-objects first). JSON null stays an explicit null.
pub(crate) fn struct_of_json(value: serde_json::Value) -> Struct {
    hub_proto::json::from_json(value).unwrap_or_default()
}

/// Unix nanoseconds of a std time (negative before 1970, saturating).
pub(crate) fn unix_ns(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// Unix nanoseconds as a Timestamp.
pub(crate) fn timestamp_ns(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// The current time in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    unix_ns(SystemTime::now()) / 1_000_000
}

/// A protobuf Duration as a std one; `None` when unset, zero or negative.
pub(crate) fn duration(d: Option<&pbjson_types::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_with_whole_numbers_as_integers() {
        let value = serde_json::json!({"n": 3, "x": 1.5, "deep": {"l": [1, "a", null, true]}});
        let s = struct_of_json(value.clone());
        assert_eq!(json_of_struct(&s), value);
        let n: u32 = serde_json::from_value(json_of_struct(&s)["n"].clone()).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn times_and_durations_convert() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let ts = timestamp_ns(unix_ns(t));
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
        let d = pbjson_types::Duration {
            seconds: 2,
            nanos: 500_000_000,
        };
        assert_eq!(duration(Some(&d)), Some(Duration::from_millis(2500)));
        assert_eq!(duration(Some(&pbjson_types::Duration::default())), None);
        assert_eq!(duration(None), None);
    }
}
