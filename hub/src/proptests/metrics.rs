//! `Batch::parse` (PushMetricsRequest): whole-batch problems are errors
//! naming `batch_id` or `points`; a bad point is rejected with a reason
//! that begins with the point's field (`value: not finite`).

use std::collections::HashMap;

use hub_proto::v1 as proto;
use pbjson_types::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::metrics::Batch;
use crate::wire::timestamp_ns;

/// 2027-01-15, in Unix ns.
const NOW_NS: i64 = 1_800_000_000_000_000_000;
const MAX_POINTS: usize = 50;
const POINT_FIELDS: &[&str] = &["domain", "name", "value", "unit", "labels", "time"];

fn any_point() -> impl Strategy<Value = proto::MetricPoint> {
    (
        prop_oneof![text(), "[A-Za-z][A-Za-z0-9_.-]{0,63}"],
        prop_oneof![text(), "[A-Za-z][A-Za-z0-9_.-]{0,127}"],
        any::<f64>(),
        text(),
        prop_oneof![
            prop::collection::hash_map(text(), text(), 0..4),
            (17..20usize).prop_map(|n| (0..n).map(|i| (format!("k{i}"), String::new())).collect()),
        ],
        prop::option::of(prop_oneof![
            seconds_nanos().prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
            (-600_000_000_000_000..600_000_000_000_000i64).prop_map(|d| timestamp_ns(NOW_NS + d)),
        ]),
    )
        .prop_map(
            |(domain, name, value, unit, labels, time)| proto::MetricPoint {
                domain,
                name,
                value,
                unit,
                labels,
                time,
            },
        )
}

fn valid_point() -> impl Strategy<Value = proto::MetricPoint> {
    (
        prop_oneof!["[A-Za-z][A-Za-z0-9_.-]{0,15}", Just("d".repeat(64))],
        prop_oneof!["[A-Za-z][A-Za-z0-9_.-]{0,15}", Just("n".repeat(128))],
        prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO,
        prop_oneof!["\\PC{0,8}", Just("u".repeat(32))],
        prop_oneof![
            prop::collection::hash_map("[A-Za-z][A-Za-z0-9_.-]{0,8}", "\\PC{0,8}", 0..4),
            Just(
                (0..16)
                    .map(|i| (format!("k{i:062}"), "v".repeat(256)))
                    .collect()
            ),
        ],
        // Within the last 7 days and the next 5 minutes.
        -600_000_000_000_000i64..300_000_000_000,
    )
        .prop_map(
            |(domain, name, value, unit, labels, age)| proto::MetricPoint {
                domain,
                name,
                value,
                unit,
                labels,
                time: Some(timestamp_ns(NOW_NS + age)),
            },
        )
}

/// One field of a point made bad.
#[derive(Debug, Clone)]
enum BadPoint {
    Domain(String),
    Name(String),
    Value(f64),
    Unit(String),
    Labels(HashMap<String, String>),
    Time(Option<Timestamp>),
}

fn bad_ident(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        "[0-9_.-][A-Za-z0-9_.-]{0,10}",
        (1..20usize).prop_map(move |n| "a".repeat(max + n)),
    ]
    .prop_filter("not an identifier", move |s| {
        !hub_proto::rules::is_metric_ident(s, max)
    })
}

fn bad_point() -> impl Strategy<Value = BadPoint> {
    use BadPoint as B;
    prop_oneof![
        bad_ident(64).prop_map(B::Domain),
        bad_ident(128).prop_map(B::Name),
        non_finite().prop_map(B::Value),
        longer_than(32).prop_map(B::Unit),
        bad_ident(64).prop_map(|k| B::Labels([(k, String::new())].into())),
        longer_than(256).prop_map(|v| B::Labels([("k".to_owned(), v)].into())),
        (17..30usize)
            .prop_map(|n| B::Labels((0..n).map(|i| (format!("k{i}"), String::new())).collect())),
        Just(B::Time(None)),
        // Too old, too far ahead, not a valid time.
        (1..1_000_000_000_000i64)
            .prop_map(|d| B::Time(Some(timestamp_ns(NOW_NS - 7 * 86_400 * 1_000_000_000 - d)))),
        (1..1_000_000_000_000i64)
            .prop_map(|d| B::Time(Some(timestamp_ns(NOW_NS + 300_000_000_000 + d)))),
        (
            any::<i64>(),
            prop_oneof![i32::MIN..0, 1_000_000_000..=i32::MAX]
        )
            .prop_map(|(seconds, nanos)| B::Time(Some(Timestamp { seconds, nanos }))),
    ]
}

impl BadPoint {
    /// Breaks `point`; the field its rejection must name.
    fn apply(self, point: &mut proto::MetricPoint) -> &'static str {
        match self {
            Self::Domain(d) => {
                point.domain = d;
                "domain"
            }
            Self::Name(n) => {
                point.name = n;
                "name"
            }
            Self::Value(v) => {
                point.value = v;
                "value"
            }
            Self::Unit(u) => {
                point.unit = u;
                "unit"
            }
            Self::Labels(l) => {
                point.labels = l;
                "labels"
            }
            Self::Time(t) => {
                point.time = t;
                "time"
            }
        }
    }
}

/// Whether a rejection reason names `field` (or a path inside it).
fn reason_names(reason: &str, field: &str) -> bool {
    reason
        .strip_prefix(field)
        .is_some_and(|rest| rest.starts_with([':', '[', '.']))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_batch_is_split_or_refused_naming_a_field(
        batch_id in text(),
        points in prop::collection::vec(any_point(), 0..8),
        many in prop::option::of(MAX_POINTS + 1..MAX_POINTS + 5),
    ) {
        let mut points = points;
        if let Some(n) = many {
            points.resize(n, proto::MetricPoint::default());
        }
        let count = points.len();
        let req = proto::PushMetricsRequest { batch_id, points };
        match Batch::parse(req, MAX_POINTS, NOW_NS) {
            Ok(batch) => {
                prop_assert_eq!(batch.points.len() + batch.rejected.len(), count);
                for point in &batch.points {
                    prop_assert!(point.value.is_finite());
                }
                for (_, reason) in &batch.rejected {
                    prop_assert!(
                        POINT_FIELDS.iter().any(|f| reason_names(reason, f)),
                        "{:?}", reason
                    );
                }
            }
            Err(e) => prop_assert!(names_one_of(&e, &["batch_id", "points"]), "{:?}", e),
        }
    }

    #[test]
    fn a_bad_batch_names_batch_id_or_points(
        points in prop::collection::vec(valid_point(), 1..4),
        bad_id in prop_oneof![Just(String::new()), longer_than(128)],
        which in 0..3u8,
    ) {
        let (req, field) = match which {
            0 => (proto::PushMetricsRequest { batch_id: bad_id, points }, "batch_id"),
            1 => (proto::PushMetricsRequest { batch_id: "b".into(), points: vec![] }, "points"),
            _ => {
                let points = vec![points[0].clone(); MAX_POINTS + 1];
                (proto::PushMetricsRequest { batch_id: "b".into(), points }, "points")
            }
        };
        let e = Batch::parse(req, MAX_POINTS, NOW_NS).unwrap_err();
        prop_assert!(names(&e, field), "{:?} should name {}", e, field);
    }

    #[test]
    fn valid_points_are_stored_as_sent(points in prop::collection::vec(valid_point(), 1..8)) {
        let req = proto::PushMetricsRequest { batch_id: "b".into(), points: points.clone() };
        let batch = Batch::parse(req, MAX_POINTS, NOW_NS).unwrap();
        prop_assert!(batch.rejected.is_empty(), "{:?}", batch.rejected);
        for (stored, sent) in batch.points.iter().zip(&points) {
            prop_assert_eq!(&stored.name, &sent.name);
            prop_assert_eq!(stored.value.to_bits(), sent.value.to_bits());
            prop_assert_eq!(timestamp_ns(stored.time_ns), sent.time.unwrap());
        }
    }

    #[test]
    fn one_bad_point_field_is_the_one_named(
        points in prop::collection::vec(valid_point(), 1..5),
        at in any::<prop::sample::Index>(),
        bad in bad_point(),
    ) {
        let mut points = points;
        let i = at.index(points.len());
        let field = bad.apply(&mut points[i]);
        let req = proto::PushMetricsRequest { batch_id: "b".into(), points };
        let batch = Batch::parse(req, MAX_POINTS, NOW_NS).unwrap();
        prop_assert_eq!(batch.rejected.len(), 1);
        let (index, reason) = &batch.rejected[0];
        prop_assert_eq!(*index as usize, i);
        prop_assert!(reason_names(reason, field), "{:?} should name {}", reason, field);
    }
}
