//! Property tests of every wire → domain conversion: arbitrary input
//! (any Unicode, control characters, very long strings, any number
//! including NaN, ±Infinity and the ends of every integer type, deep
//! Structs, missing fields) never panics, and every refusal names a field.
//!
//! "Names a field", concretely: the error is `Error::InvalidArgument` whose
//! `field` is a path that begins with the proto name of a field of the
//! request (`type`, `target.spoke_name`, `capabilities[3].directive_type`,
//! `payload.a.b[2]`), or `Error::ResourceExhausted` (a size limit) whose
//! message begins with `<field>: `; either way the status the caller sees
//! begins with that path. Where a generator makes exactly one field of an
//! otherwise valid request bad, the error must name that very field. A
//! rejected metric point has a reason in the same form.
//!
//! Where a round trip exists (JSON objects, times, ids, enums), valid input
//! comes back equal. The JSON mapping itself (`hub_proto::json`) has its
//! own properties next to it, in `proto/json.rs`.

mod directives;
mod edges;
mod metrics;
mod spokes;

use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value};
use proptest::prelude::*;

use crate::error::Error;

/// Cases per property: enough to find the edges, few enough that the unit
/// tests stay quick.
pub(crate) const CASES: u32 = 64;

/// The field an error names (see the module comment), if it names one.
pub(crate) fn field_of(e: &Error) -> Option<&str> {
    match e {
        Error::InvalidArgument { field, .. } if !field.is_empty() => Some(field),
        Error::ResourceExhausted(message) => message
            .split_once(": ")
            .map(|(field, _)| field)
            .filter(|f| !f.is_empty()),
        _ => None,
    }
}

/// The top-level proto field of a path: `target` for `target.spoke_name`,
/// `capabilities` for `capabilities[3].version`.
pub(crate) fn root(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or(path)
}

/// Whether `e` names a field whose top-level proto name is among `fields`.
pub(crate) fn names_one_of(e: &Error, fields: &[&str]) -> bool {
    field_of(e).is_some_and(|f| fields.contains(&root(f)))
}

/// Whether `e` names `field` itself or a path inside it.
pub(crate) fn names(e: &Error, field: &str) -> bool {
    field_of(e).is_some_and(|f| {
        f == field
            || f.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    })
}

/// Any text a client could send: arbitrary Unicode, control characters,
/// near-valid identifiers, long strings.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x1f\\x7f]{0,8}",
        "[a-zA-Z0-9._/ -]{0,80}",
        "\\PC{0,64}",
        Just(String::new()),
    ]
}

/// Text longer than `max` characters.
pub(crate) fn longer_than(max: usize) -> impl Strategy<Value = String> {
    (1..20usize, "\\PC").prop_map(move |(extra, c)| c.repeat(max + extra))
}

/// Any finite JSON value, as Struct values.
fn finite_value() -> impl Strategy<Value = Value> {
    let number = |n: f64| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let leaf = prop_oneof![
        Just(Value {
            kind: Some(Kind::NullValue(0))
        }),
        any::<bool>().prop_map(|b| Value {
            kind: Some(Kind::BoolValue(b))
        }),
        any::<i64>().prop_map(move |n| number(n as f64)),
        (prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO)
            .prop_map(number),
        text().prop_map(|s| Value {
            kind: Some(Kind::StringValue(s))
        }),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|values| Value {
                kind: Some(Kind::ListValue(ListValue { values }))
            }),
            prop::collection::hash_map(text(), inner, 0..5).prop_map(|fields| Value {
                kind: Some(Kind::StructValue(Struct { fields }))
            }),
        ]
    })
}

/// A JSON object with finite numbers only.
pub(crate) fn finite_struct() -> impl Strategy<Value = Struct> {
    prop::collection::hash_map(text(), finite_value(), 0..5).prop_map(|fields| Struct { fields })
}

/// NaN, +Infinity or -Infinity.
pub(crate) fn non_finite() -> impl Strategy<Value = f64> {
    prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)]
}

/// A JSON object with at least one NaN or infinity, at the top, in a list
/// or in a nested object.
pub(crate) fn non_finite_struct() -> impl Strategy<Value = Struct> {
    (finite_struct(), text(), text(), non_finite(), 0..3u8).prop_map(
        |(mut s, key, inner_key, n, depth)| {
            let bad = Value {
                kind: Some(Kind::NumberValue(n)),
            };
            let value = match depth {
                0 => bad,
                1 => Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![
                            Value {
                                kind: Some(Kind::NumberValue(1.0)),
                            },
                            bad,
                        ],
                    })),
                },
                _ => Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [(inner_key, bad)].into(),
                    })),
                },
            };
            s.fields.insert(key, value);
            s
        },
    )
}

/// Any Struct at all: finite, or with NaN and infinities somewhere.
pub(crate) fn any_struct() -> impl Strategy<Value = Struct> {
    prop_oneof![finite_struct(), non_finite_struct()]
}

/// A Timestamp or Duration-like pair: valid, at the edges, or nonsense.
pub(crate) fn seconds_nanos() -> impl Strategy<Value = (i64, i32)> {
    prop_oneof![
        (any::<i64>(), any::<i32>()),
        (-100_000_000_000i64..100_000_000_000, 0..1_000_000_000i32),
        (
            prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1)],
            prop_oneof![
                Just(i32::MIN),
                Just(-1),
                Just(999_999_999),
                Just(1_000_000_000)
            ],
        ),
    ]
}
