//! JSON objects (payloads, results, event details) to and from
//! `google.protobuf.Struct`, the same way on every side of the wire: whole
//! numbers come out without a fraction (`3`, not `3.0`), and JSON `null` is
//! an explicit `null_value` (a Value with no kind is invalid in proto3 JSON,
//! and strict printers such as grpcurl refuse it).

use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value};
use serde_json::Value as Json;

/// A Struct as a JSON object.
pub fn to_json(s: &Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // 2^53: beyond it not every integer is exact in a double.
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                Json::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number)
            }
        }
        Some(Kind::StructValue(s)) => to_json(s),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
    }
}

/// A JSON object as a Struct; `None` for any other JSON value.
pub fn from_json(value: Json) -> Option<Struct> {
    match value {
        Json::Object(map) => Some(from_map(map)),
        _ => None,
    }
}

fn from_map(map: serde_json::Map<String, Json>) -> Struct {
    Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, value_from_json(v)))
            .collect(),
    }
}

fn value_from_json(v: Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(value_from_json).collect(),
        }),
        Json::Object(map) => Kind::StructValue(from_map(map)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_with_integers_and_explicit_nulls() {
        let value = serde_json::json!({
            "doc": "a/b", "n": 3, "x": 3.5, "deep": {"list": [1, "two", null, true]}, "empty": {}
        });
        let s = from_json(value.clone()).unwrap();
        assert_eq!(to_json(&s), value);
        let Some(Kind::StructValue(deep)) = &s.fields["deep"].kind else {
            panic!("deep is an object");
        };
        let Some(Kind::ListValue(list)) = &deep.fields["list"].kind else {
            panic!("list is a list");
        };
        assert_eq!(list.values[2].kind, Some(Kind::NullValue(0)));
        assert!(from_json(serde_json::json!([1])).is_none());
    }
}
