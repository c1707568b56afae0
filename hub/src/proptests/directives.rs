//! `NewDirective::parse` (CreateDirectiveRequest) and `Ack::try_from`
//! (AckRequest).

use hub_proto::rules;
use hub_proto::v1 as proto;
use pbjson_types::{Duration, Struct, Timestamp};
use proptest::prelude::*;
use proto::directive_target::Target as T;
use uuid::Uuid;

use super::*;
use crate::directives::{Ack, AckOutcome, CreateDefaults, NewDirective};
use crate::wire::{struct_of_json, value_of_struct};

/// 2027-01-15, in Unix ms.
const NOW: i64 = 1_800_000_000_000;
/// Large enough for any generated valid payload; the limit itself has its
/// own property.
const DEFAULTS: CreateDefaults = CreateDefaults {
    ack_deadline_ms: 30_000,
    max_attempts: 5,
    max_payload_bytes: 4 * 1024 * 1024,
};

const CREATE_FIELDS: &[&str] = &[
    "target",
    "type",
    "payload",
    "expires_at",
    "ack_deadline",
    "max_attempts",
    "idempotency_key",
    "coalesce_key",
];
const ACK_FIELDS: &[&str] = &[
    "directive_id",
    "outcome",
    "progress",
    "progress_message",
    "error",
    "result",
];

fn target(t: T) -> Option<proto::DirectiveTarget> {
    Some(proto::DirectiveTarget { target: Some(t) })
}

fn selector(match_labels: std::collections::HashMap<String, String>) -> T {
    T::Selector(proto::LabelSelector { match_labels })
}

fn uuid_text() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string())
}

fn not_uuid() -> impl Strategy<Value = String> {
    text().prop_filter("not a UUID", |s| Uuid::parse_str(s).is_err())
}

fn spoke_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,62}"
}

fn labels(
    n: std::ops::Range<usize>,
) -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map("[A-Za-z0-9._/-]{1,12}", "\\PC{0,12}", n)
}

fn any_target() -> impl Strategy<Value = Option<proto::DirectiveTarget>> {
    prop_oneof![
        Just(None),
        Just(Some(proto::DirectiveTarget { target: None })),
        prop_oneof![text(), uuid_text()].prop_map(|s| target(T::SpokeId(s))),
        text().prop_map(|s| target(T::SpokeName(s))),
        prop::collection::hash_map(text(), text(), 0..5).prop_map(|m| target(selector(m))),
        any::<bool>().prop_map(|b| target(T::AllSpokes(b))),
    ]
}

fn valid_target() -> impl Strategy<Value = Option<proto::DirectiveTarget>> {
    prop_oneof![
        uuid_text().prop_map(|s| target(T::SpokeId(s))),
        spoke_name().prop_map(|s| target(T::SpokeName(s))),
        labels(1..5).prop_map(|m| target(selector(m))),
        // As many labels, as long, as the rules allow.
        Just(target(selector(
            (0..32)
                .map(|i| (format!("k{i:062}"), "v".repeat(256)))
                .collect()
        ))),
        Just(target(T::AllSpokes(true))),
    ]
}

fn timestamp((seconds, nanos): (i64, i32)) -> Timestamp {
    Timestamp { seconds, nanos }
}

fn duration((seconds, nanos): (i64, i32)) -> Duration {
    Duration { seconds, nanos }
}

prop_compose! {
    fn any_create()(
        target in any_target(),
        kind in prop_oneof![text(), "[A-Za-z0-9_./-]{1,64}"],
        payload in prop::option::of(any_struct()),
        priority in any::<i32>(),
        expires_at in prop::option::of(seconds_nanos()),
        ack_deadline in prop::option::of(seconds_nanos()),
        max_attempts in prop_oneof![any::<u32>(), 0..120u32],
        idempotency_key in text(),
        coalesce_key in text(),
        force in any::<bool>(),
    ) -> proto::CreateDirectiveRequest {
        proto::CreateDirectiveRequest {
            target,
            r#type: kind,
            payload,
            priority,
            expires_at: expires_at.map(timestamp),
            ack_deadline: ack_deadline.map(duration),
            max_attempts,
            idempotency_key,
            coalesce_key,
            force,
        }
    }
}

prop_compose! {
    fn valid_create()(
        target in valid_target(),
        kind in "[A-Za-z0-9_./-]{1,64}",
        payload in prop::option::of(finite_struct()),
        priority in any::<i32>(),
        expires_in in prop::option::of((1..=10 * 365 * 86_400i64, 0..1_000_000_000i32)),
        ack_deadline in prop::option::of((1..86_400i64, 0..1_000_000_000i32)),
        max_attempts in 0..=100u32,
        idempotency_key in "\\PC{0,128}",
        coalesce_key in "\\PC{0,128}",
        force in any::<bool>(),
    ) -> proto::CreateDirectiveRequest {
        proto::CreateDirectiveRequest {
            target,
            r#type: kind,
            payload,
            priority,
            expires_at: expires_in.map(|(s, n)| timestamp((NOW / 1000 + s, n))),
            ack_deadline: ack_deadline.map(duration),
            max_attempts,
            idempotency_key,
            coalesce_key,
            force,
        }
    }
}

/// One field of a create made bad.
#[derive(Debug, Clone)]
enum BadCreate {
    /// The target, and the path the error must name.
    Target(Option<proto::DirectiveTarget>, &'static str),
    Type(String),
    Payload(Struct),
    ExpiresAt(Timestamp),
    AckDeadline(Duration),
    MaxAttempts(u32),
    IdempotencyKey(String),
    CoalesceKey(String),
}

impl BadCreate {
    /// Breaks `req`; the field the error must name.
    fn apply(self, req: &mut proto::CreateDirectiveRequest) -> &'static str {
        match self {
            Self::Target(t, field) => {
                req.target = t;
                field
            }
            Self::Type(t) => {
                req.r#type = t;
                "type"
            }
            Self::Payload(p) => {
                req.payload = Some(p);
                "payload"
            }
            Self::ExpiresAt(t) => {
                req.expires_at = Some(t);
                "expires_at"
            }
            Self::AckDeadline(d) => {
                req.ack_deadline = Some(d);
                "ack_deadline"
            }
            Self::MaxAttempts(n) => {
                req.max_attempts = n;
                "max_attempts"
            }
            Self::IdempotencyKey(k) => {
                req.idempotency_key = k;
                "idempotency_key"
            }
            Self::CoalesceKey(k) => {
                req.coalesce_key = k;
                "coalesce_key"
            }
        }
    }
}

fn bad_create() -> impl Strategy<Value = BadCreate> {
    use BadCreate as B;
    let labels_field = "target.selector.match_labels";
    let bad_labels = prop_oneof![
        Just(std::collections::HashMap::new()),
        (
            labels(0..5),
            text().prop_filter("bad key", |k| !rules::is_label_key(k))
        )
            .prop_map(|(mut m, k)| {
                m.insert(k, "v".into());
                m
            }),
        longer_than(rules::MAX_LABEL_VALUE_CHARS).prop_map(|v| [("k".to_owned(), v)].into()),
        (33..40usize).prop_map(|n| (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()),
    ];
    prop_oneof![
        Just(B::Target(None, "target")),
        Just(B::Target(Some(Default::default()), "target")),
        not_uuid().prop_map(|s| B::Target(target(T::SpokeId(s)), "target.spoke_id")),
        text()
            .prop_filter("not a name", |s| !rules::is_spoke_name(s))
            .prop_map(|s| B::Target(target(T::SpokeName(s)), "target.spoke_name")),
        bad_labels.prop_map(move |m| B::Target(target(selector(m)), labels_field)),
        Just(B::Target(target(T::AllSpokes(false)), "target.all_spokes")),
        text()
            .prop_filter("bad type", |t| !rules::is_directive_type(t))
            .prop_map(B::Type),
        non_finite_struct().prop_map(B::Payload),
        prop_oneof![
            (-62_000_000_000i64..NOW / 1000, 0..1_000_000_000i32),
            (
                any::<i64>(),
                prop_oneof![i32::MIN..0, 1_000_000_000..=i32::MAX]
            ),
        ]
        .prop_map(|t| B::ExpiresAt(timestamp(t))),
        prop_oneof![
            (i64::MIN..0, 0..1_000_000_000i32),
            (Just(0i64), 0..1_000_000_000i32),
            (86_401..=i64::MAX, 0..1_000_000_000i32),
            (
                any::<i64>(),
                prop_oneof![i32::MIN..0, 1_000_000_000..=i32::MAX]
            ),
        ]
        .prop_map(|d| B::AckDeadline(duration(d))),
        (101..=u32::MAX).prop_map(B::MaxAttempts),
        longer_than(128).prop_map(B::IdempotencyKey),
        longer_than(128).prop_map(B::CoalesceKey),
    ]
}

fn any_ack() -> impl Strategy<Value = proto::AckRequest> {
    (
        prop_oneof![text(), uuid_text()],
        prop_oneof![any::<i32>(), 0..6i32],
        prop::option::of(any_struct()),
        text(),
        prop::option::of(prop_oneof![any::<u32>(), 0..120u32]),
        text(),
    )
        .prop_map(
            |(directive_id, outcome, result, error, progress, progress_message)| {
                proto::AckRequest {
                    directive_id,
                    outcome,
                    result,
                    error,
                    progress,
                    progress_message,
                }
            },
        )
}

fn valid_ack() -> impl Strategy<Value = proto::AckRequest> {
    (
        uuid_text(),
        1..=4i32,
        prop::option::of(finite_struct()),
        "\\PC{0,64}[a-z]",
        prop::option::of(0..=100u32),
        "\\PC{0,200}",
    )
        .prop_map(
            |(directive_id, outcome, result, error, progress, progress_message)| {
                proto::AckRequest {
                    directive_id,
                    outcome,
                    result,
                    error,
                    progress,
                    progress_message,
                }
            },
        )
}

/// One field of an ack made bad (for an outcome that reads it), and the
/// field the error must name.
fn bad_ack() -> impl Strategy<Value = (proto::AckRequest, &'static str)> {
    let outcome = |o: proto::AckOutcome| o as i32;
    let failing = prop_oneof![
        Just(outcome(proto::AckOutcome::Failed)),
        Just(outcome(proto::AckOutcome::Rejected))
    ];
    let breaks = prop_oneof![
        not_uuid().prop_map(|s| (0, s, None, None)),
        prop_oneof![i32::MIN..1, 5..=i32::MAX].prop_map(|o| (1, String::new(), Some(o), None)),
        (101..=u32::MAX).prop_map(move |p| (2, String::new(), None, Some(p))),
        longer_than(1024).prop_map(|m| (3, m, None, None)),
        ("[ \\t\\r\\n]{0,5}", failing.clone()).prop_map(|(e, o)| (4, e, Some(o), None)),
        (longer_than(4096), failing).prop_map(|(e, o)| (4, e, Some(o), None)),
        Just((5, String::new(), None, None)),
    ];
    (valid_ack(), breaks, non_finite_struct()).prop_map(
        move |(mut req, (which, text, o, p), bad_result)| {
            let field = match which {
                0 => {
                    req.directive_id = text;
                    "directive_id"
                }
                1 => {
                    req.outcome = o.unwrap_or_default();
                    "outcome"
                }
                2 => {
                    req.outcome = outcome(proto::AckOutcome::InProgress);
                    req.progress = p;
                    "progress"
                }
                3 => {
                    req.outcome = outcome(proto::AckOutcome::InProgress);
                    req.progress_message = text;
                    "progress_message"
                }
                4 => {
                    req.outcome = o.unwrap_or_default();
                    req.error = text;
                    "error"
                }
                _ => {
                    req.outcome = outcome(proto::AckOutcome::Completed);
                    req.result = Some(bad_result);
                    "result"
                }
            };
            (req, field)
        },
    )
}

/// The JSON a Struct stands for.
fn json(s: Option<&Struct>) -> serde_json::Value {
    s.map_or_else(|| serde_json::json!({}), value_of_struct)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_create_is_parsed_or_refused_naming_a_field(req in any_create()) {
        if let Err(e) = NewDirective::parse(req, DEFAULTS, NOW) {
            prop_assert!(names_one_of(&e, CREATE_FIELDS), "{:?}", e);
        }
    }

    #[test]
    fn a_valid_create_is_kept_as_sent(req in valid_create()) {
        let d = NewDirective::parse(req.clone(), DEFAULTS, NOW).unwrap();
        prop_assert_eq!(&d.directive_type, &req.r#type);
        prop_assert_eq!(d.priority, req.priority);
        prop_assert!((1_000..=86_400_000).contains(&d.ack_deadline_ms));
        prop_assert!((1..=100).contains(&d.max_attempts));
        prop_assert!(d.expires_at.is_none_or(|at| at > NOW));
        // The stored text is the payload, numbers and all.
        let stored = struct_of_json(&d.payload).unwrap();
        prop_assert_eq!(value_of_struct(&stored), json(req.payload.as_ref()));
    }

    #[test]
    fn one_bad_create_field_is_the_one_named(req in valid_create(), bad in bad_create()) {
        let mut req = req;
        let field = bad.apply(&mut req);
        let e = NewDirective::parse(req, DEFAULTS, NOW).unwrap_err();
        prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{:?}", e);
        prop_assert!(names(&e, field), "{:?} should name {}", e, field);
    }

    #[test]
    fn an_oversized_payload_names_the_payload(req in valid_create(), blob in "\\PC{9,40}") {
        let mut req = req;
        req.payload = Some(crate::wire::struct_of_value(serde_json::json!({ "blob": blob })));
        let small = CreateDefaults { max_payload_bytes: 8, ..DEFAULTS };
        let e = NewDirective::parse(req, small, NOW).unwrap_err();
        prop_assert!(matches!(e, Error::ResourceExhausted(_)), "{:?}", e);
        prop_assert!(names(&e, "payload"), "{:?}", e);
    }

    #[test]
    fn any_ack_is_parsed_or_refused_naming_a_field(req in any_ack()) {
        if let Err(e) = Ack::try_from(req) {
            prop_assert!(names_one_of(&e, ACK_FIELDS), "{:?}", e);
        }
    }

    #[test]
    fn a_valid_ack_keeps_its_result(req in valid_ack()) {
        let ack = Ack::try_from(req.clone()).unwrap();
        prop_assert_eq!(ack.directive_id.to_string(), req.directive_id);
        match ack.outcome {
            AckOutcome::Completed(text) => {
                let stored = struct_of_json(&text).unwrap();
                prop_assert_eq!(value_of_struct(&stored), json(req.result.as_ref()));
            }
            AckOutcome::InProgress { progress, message } => {
                prop_assert_eq!(progress, req.progress);
                prop_assert_eq!(message, req.progress_message);
            }
            AckOutcome::Failed(e) | AckOutcome::Rejected(e) => prop_assert_eq!(e, req.error),
        }
    }

    #[test]
    fn one_bad_ack_field_is_the_one_named((req, field) in bad_ack()) {
        let e = Ack::try_from(req).unwrap_err();
        prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{:?}", e);
        prop_assert!(names(&e, field), "{:?} should name {}", e, field);
    }
}
