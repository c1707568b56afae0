//! JSON objects (payloads, results, event details) to and from
//! `google.protobuf.Struct`, the same way on every side of the wire: whole
//! numbers come out without a fraction (`3`, not `3.0`), and JSON `null` is
//! an explicit `null_value` (a Value with no kind is invalid in proto3 JSON,
//! and strict printers such as grpcurl refuse it).
//!
//! A Struct can hold numbers JSON cannot: NaN and ±Infinity.
//! [`to_json_finite`] refuses them and says where they are, so a receiver
//! answers the sender instead of storing `null` in their place.

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
        Some(Kind::NumberValue(n)) => number(*n).unwrap_or(Json::Null),
        Some(Kind::StructValue(s)) => to_json(s),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
    }
}

/// A finite number as JSON, whole numbers without a fraction; `None` for
/// NaN and ±Infinity.
fn number(n: f64) -> Option<Json> {
    // 2^53: beyond it not every integer is exact in a double.
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Some(Json::from(n as i64))
    } else {
        serde_json::Number::from_f64(n).map(Json::Number)
    }
}

/// A NaN or ±Infinity inside a Struct, which JSON cannot carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFinite {
    /// Where it is, relative to the Struct: `.a.b[2]`, or `["a key"]` for a
    /// key that is not a plain identifier (keys past 64 characters are cut).
    pub path: String,
}

impl NotFinite {
    /// The full path under the message field holding the Struct, e.g.
    /// `payload.a.b[2]` for `field` = `payload`.
    pub fn field(&self, field: &str) -> String {
        format!("{field}{}", self.path)
    }
}

impl std::fmt::Display for NotFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: NaN and Infinity are not JSON numbers", self.path)
    }
}

impl std::error::Error for NotFinite {}

/// A Struct as a JSON object, like [`to_json`], but a NaN or ±Infinity
/// anywhere in it is an error naming where, instead of a `null`.
pub fn to_json_finite(s: &Struct) -> Result<Json, NotFinite> {
    let mut map = serde_json::Map::with_capacity(s.fields.len());
    for (k, v) in &s.fields {
        let json = finite_value(v).map_err(|mut e| {
            e.path.insert_str(0, &key_segment(k));
            e
        })?;
        map.insert(k.clone(), json);
    }
    Ok(Json::Object(map))
}

fn finite_value(v: &Value) -> Result<Json, NotFinite> {
    Ok(match &v.kind {
        Some(Kind::NumberValue(n)) => number(*n).ok_or(NotFinite {
            path: String::new(),
        })?,
        Some(Kind::StructValue(s)) => to_json_finite(s)?,
        Some(Kind::ListValue(l)) => Json::Array(
            l.values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    finite_value(v).map_err(|mut e| {
                        e.path.insert_str(0, &format!("[{i}]"));
                        e
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => value_to_json(v),
    })
}

/// How a key appears in a path: `.name` for a plain identifier, else
/// quoted and escaped (`["a b"]`), cut to 64 characters so that an error
/// stays small whatever the key.
fn key_segment(key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        return format!(".{key}");
    }
    match key.char_indices().nth(64) {
        Some((cut, _)) => format!("[{:?}]", format!("{}…", &key[..cut])),
        None => format!("[{key:?}]"),
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
        // Through text and back, a double keeps its last bit (serde_json's
        // float_roundtrip; found by the properties below).
        let big = 1.5971320069572595e247;
        let text = to_json(&from_json(serde_json::json!({ "n": big })).unwrap()).to_string();
        let back: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(back["n"].as_f64(), Some(big));
    }

    fn number(n: f64) -> Value {
        Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_path() {
        let mut s = from_json(serde_json::json!({"a": {"b": [1, 2, 3]}, "ok": 1.5})).unwrap();
        assert_eq!(to_json_finite(&s).unwrap(), to_json(&s));
        let Some(Kind::StructValue(a)) = &mut s.fields.get_mut("a").unwrap().kind else {
            panic!("a is an object");
        };
        let Some(Kind::ListValue(b)) = &mut a.fields.get_mut("b").unwrap().kind else {
            panic!("b is a list");
        };
        b.values[2] = number(f64::NAN);
        let err = to_json_finite(&s).unwrap_err();
        assert_eq!(err.path, ".a.b[2]");
        assert_eq!(err.field("payload"), "payload.a.b[2]");
        assert_eq!(
            err.to_string(),
            ".a.b[2]: NaN and Infinity are not JSON numbers"
        );
        // The lenient mapping still writes null (for values already stored).
        assert_eq!(to_json(&s)["a"]["b"][2], Json::Null);

        let odd = |key: &str| {
            let s = Struct {
                fields: [(key.to_owned(), number(f64::NEG_INFINITY))].into(),
            };
            to_json_finite(&s).unwrap_err().path
        };
        assert_eq!(odd("x_1-y"), ".x_1-y");
        assert_eq!(odd("a b"), r#"["a b"]"#);
        assert_eq!(odd(""), r#"[""]"#);
        assert_eq!(odd("1st"), r#"["1st"]"#);
        assert_eq!(odd("tab\there\n"), r#"["tab\there\n"]"#);
        let long = odd(&"k".repeat(1000));
        assert_eq!(long, format!("[\"{}…\"]", "k".repeat(64)));
    }

    mod properties {
        //! Arbitrary objects: the mapping never panics, JSON objects round
        //! trip, and a refusal points at a number that is not finite.

        use proptest::prelude::*;

        use super::super::*;

        /// Largest integer a double holds exactly, plus one.
        const EXACT: i64 = 1 << 53;

        /// Any JSON value whose numbers survive a trip through a double the
        /// way this mapping writes them: integers within 2^53, other finite
        /// numbers with a fraction or beyond it.
        fn json() -> impl Strategy<Value = Json> {
            let fraction = any::<f64>().prop_filter("finite, not a small integer", |n| {
                n.is_finite() && (n.fract() != 0.0 || n.abs() >= EXACT as f64)
            });
            let leaf = prop_oneof![
                Just(Json::Null),
                any::<bool>().prop_map(Json::Bool),
                (-EXACT + 1..EXACT).prop_map(Json::from),
                fraction.prop_map(|n| Json::from(serde_json::Number::from_f64(n).unwrap())),
                any::<String>().prop_map(Json::String),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                    prop::collection::btree_map(any::<String>(), inner, 0..6)
                        .prop_map(|m| Json::Object(m.into_iter().collect())),
                ]
            })
        }

        fn object() -> impl Strategy<Value = Json> {
            prop::collection::btree_map(any::<String>(), json(), 0..6)
                .prop_map(|m| Json::Object(m.into_iter().collect()))
        }

        /// Any Struct: every kind, numbers including NaN, ±Infinity,
        /// subnormals and huge ones, and values with no kind at all.
        fn any_struct() -> impl Strategy<Value = Struct> {
            let leaf = prop_oneof![
                Just(Value { kind: None }),
                any::<i32>().prop_map(|n| Value {
                    kind: Some(Kind::NullValue(n))
                }),
                any::<bool>().prop_map(|b| Value {
                    kind: Some(Kind::BoolValue(b))
                }),
                any::<f64>().prop_map(|n| Value {
                    kind: Some(Kind::NumberValue(n))
                }),
                prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)].prop_map(
                    |n| Value {
                        kind: Some(Kind::NumberValue(n))
                    }
                ),
                any::<String>().prop_map(|s| Value {
                    kind: Some(Kind::StringValue(s))
                }),
            ];
            let value = leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(|values| Value {
                        kind: Some(Kind::ListValue(ListValue { values }))
                    }),
                    prop::collection::hash_map(any::<String>(), inner, 0..6).prop_map(|fields| {
                        Value {
                            kind: Some(Kind::StructValue(Struct { fields })),
                        }
                    }),
                ]
            });
            prop::collection::hash_map(any::<String>(), value, 0..6)
                .prop_map(|fields| Struct { fields })
        }

        /// The paths of every NaN and ±Infinity in `s`, found by a walk of
        /// the test's own.
        fn non_finite_paths(s: &Struct, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in &s.fields {
                walk(v, &format!("{prefix}{}", key_segment(k)), out);
            }
        }

        fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
            match &v.kind {
                Some(Kind::NumberValue(n)) if !n.is_finite() => out.push(path.to_owned()),
                Some(Kind::StructValue(s)) => non_finite_paths(s, path, out),
                Some(Kind::ListValue(l)) => {
                    for (i, v) in l.values.iter().enumerate() {
                        walk(v, &format!("{path}[{i}]"), out);
                    }
                }
                _ => {}
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn json_objects_round_trip(value in object()) {
                let s = from_json(value.clone()).unwrap();
                prop_assert_eq!(&to_json(&s), &value);
                prop_assert_eq!(&to_json_finite(&s).unwrap(), &value);
                // And through the text a store keeps.
                let text = to_json(&s).to_string();
                let back = from_json(serde_json::from_str(&text).unwrap()).unwrap();
                prop_assert_eq!(back, s);
            }

            #[test]
            fn only_objects_become_structs(value in json()) {
                prop_assert_eq!(from_json(value.clone()).is_some(), value.is_object());
            }

            #[test]
            fn any_struct_maps_without_panic_and_refusals_point_at_the_number(s in any_struct()) {
                let lenient = to_json(&s);
                let mut bad = Vec::new();
                non_finite_paths(&s, "", &mut bad);
                match to_json_finite(&s) {
                    Ok(json) => {
                        prop_assert!(bad.is_empty(), "accepted non-finite numbers at {:?}", bad);
                        prop_assert_eq!(json, lenient);
                    }
                    Err(e) => {
                        prop_assert!(bad.contains(&e.path), "{:?} is not one of {:?}", e.path, bad);
                        prop_assert!(e.path.chars().count() <= 32 * (64 + 8));
                    }
                }
            }

            #[test]
            fn finite_structs_round_trip_through_json(s in any_struct()) {
                let mut bad = Vec::new();
                non_finite_paths(&s, "", &mut bad);
                prop_assume!(bad.is_empty());
                // Only the spellings of null differ: no kind, or any enum
                // number, come back as the explicit null_value 0.
                let back = from_json(to_json(&s)).unwrap();
                prop_assert_eq!(to_json(&back), to_json(&s));
                prop_assert_eq!(from_json(to_json(&back)).unwrap(), back);
            }
        }
    }
}
