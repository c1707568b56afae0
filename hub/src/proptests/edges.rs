//! The small conversions every request shares: ids, enums used as filters,
//! times and durations, and Struct ↔ stored JSON text.

use pbjson_types::{Duration, Timestamp};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::directives::{State, parse_id};
use crate::events::Kind as EventKind;
use crate::wire::{
    duration_ms, ms_of, ms_of_duration, ns_of, struct_of_json, timestamp_ms, timestamp_ns,
    value_of_struct,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn ids_parse_or_name_the_field(s in prop_oneof![
        text(),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
    ]) {
        match parse_id(&s, "directive_id") {
            Ok(id) => prop_assert_eq!(Some(id), Uuid::parse_str(&s).ok()),
            Err(e) => prop_assert!(names(&e, "directive_id"), "{:?}", e),
        }
    }

    #[test]
    fn issued_ids_round_trip(n in any::<u128>()) {
        let id = Uuid::from_u128(n);
        prop_assert_eq!(parse_id(&id.to_string(), "spoke_id").unwrap(), id);
    }

    #[test]
    fn enum_filters_map_or_name_the_field(value in prop_oneof![any::<i32>(), -2..40i32]) {
        match State::from_proto(value, "state") {
            Ok(None) => prop_assert_eq!(value, 0),
            Ok(Some(state)) => {
                prop_assert_eq!(state.to_proto() as i32, value);
                prop_assert_eq!(State::parse(state.as_str()).unwrap(), state);
            }
            Err(e) => prop_assert!(names(&e, "state"), "{:?}", e),
        }
        match EventKind::from_proto(value, "types") {
            Ok(kind) => {
                prop_assert_eq!(kind.to_proto() as i32, value);
                prop_assert_eq!(EventKind::parse(kind.as_str()).unwrap(), kind);
            }
            Err(e) => prop_assert!(names(&e, "types"), "{:?}", e),
        }
    }

    #[test]
    fn times_convert_or_name_the_field((seconds, nanos) in seconds_nanos()) {
        let ts = Timestamp { seconds, nanos };
        match ms_of(&ts, "expires_at") {
            // Whole milliseconds come back as they were.
            Ok(ms) if nanos % 1_000_000 == 0 => prop_assert_eq!(timestamp_ms(ms), ts),
            Ok(_) => {}
            Err(e) => prop_assert!(names(&e, "expires_at"), "{:?}", e),
        }
        match ns_of(&ts, "start_time") {
            Ok(ns) => prop_assert_eq!(timestamp_ns(ns), ts),
            Err(e) => prop_assert!(names(&e, "start_time"), "{:?}", e),
        }
        let d = Duration { seconds, nanos };
        match ms_of_duration(&d, "wait") {
            Ok(ms) => {
                prop_assert!(ms >= 0);
                if nanos % 1_000_000 == 0 {
                    prop_assert_eq!(duration_ms(ms), d);
                }
            }
            Err(e) => prop_assert!(names(&e, "wait"), "{:?}", e),
        }
    }

    #[test]
    fn stored_json_text_round_trips(s in finite_struct()) {
        let text = hub_proto::json::to_json_finite(&s).unwrap().to_string();
        let back = struct_of_json(&text).unwrap();
        prop_assert_eq!(value_of_struct(&back), value_of_struct(&s));
    }
}
