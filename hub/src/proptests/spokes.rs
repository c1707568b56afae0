//! `Registration::parse` (RegisterRequest), `Heartbeat::try_from`
//! (HeartbeatRequest), ListSpokes' page token, and health at the ends of
//! time.

use std::collections::HashMap;

use hub_proto::rules;
use hub_proto::v1 as proto;
use proptest::prelude::*;

use super::*;
use crate::spokes::{Heartbeat, Registration, health_at, page_after};

const REGISTER_FIELDS: &[&str] = &["name", "labels", "capabilities", "version"];
const HEARTBEAT_FIELDS: &[&str] = &["status", "status_message", "version"];
const DEFAULT_WINDOW: u32 = 32;
const MAX_WINDOW: u32 = 256;

fn capability(directive_type: String, version: String) -> proto::Capability {
    proto::Capability {
        directive_type,
        version,
    }
}

prop_compose! {
    fn any_register()(
        name in text(),
        labels in prop_oneof![
            prop::collection::hash_map(text(), text(), 0..5),
            (30..40usize).prop_map(|n| (0..n).map(|i| (format!("k{i}"), String::new())).collect()),
        ],
        capabilities in prop::collection::vec((text(), text()), 0..8),
        many in prop::option::of(250..300usize),
        version in text(),
        max_in_flight in any::<u32>(),
    ) -> proto::RegisterRequest {
        let mut capabilities: Vec<_> =
            capabilities.into_iter().map(|(t, v)| capability(t, v)).collect();
        if let Some(n) = many {
            capabilities.extend((0..n).map(|i| capability(format!("t{i}"), String::new())));
        }
        proto::RegisterRequest { name, labels, capabilities, version, max_in_flight, ..Default::default() }
    }
}

prop_compose! {
    fn valid_register()(
        name in "[a-z0-9][a-z0-9._-]{0,62}",
        labels in prop_oneof![
            prop::collection::hash_map("[A-Za-z0-9._/-]{1,12}", "\\PC{0,12}", 0..5),
            Just((0..32).map(|i| (format!("k{i:062}"), "v".repeat(256))).collect()),
        ],
        types in prop::collection::btree_set("[A-Za-z0-9_./-]{1,64}", 0..10),
        version in "\\PC{0,64}",
        max_in_flight in any::<u32>(),
    ) -> proto::RegisterRequest {
        let capabilities = types
            .into_iter()
            .map(|t| capability(t, "1".into()))
            .collect();
        proto::RegisterRequest { name, labels, capabilities, version, max_in_flight, ..Default::default() }
    }
}

/// One field of a registration made bad.
#[derive(Debug, Clone)]
enum BadRegister {
    Name(String),
    Labels(HashMap<String, String>),
    /// A capability list and the path the error must name.
    Capabilities(Vec<proto::Capability>, &'static str),
    Version(String),
}

fn bad_register() -> impl Strategy<Value = BadRegister> {
    use BadRegister as B;
    prop_oneof![
        text()
            .prop_filter("not a name", |s| !rules::is_spoke_name(s))
            .prop_map(B::Name),
        text()
            .prop_filter("bad key", |k| !rules::is_label_key(k))
            .prop_map(|k| B::Labels([(k, "v".to_owned())].into())),
        longer_than(rules::MAX_LABEL_VALUE_CHARS)
            .prop_map(|v| B::Labels([("k".to_owned(), v)].into())),
        (33..40usize).prop_map(|n| {
            B::Labels((0..n).map(|i| (format!("k{i}"), String::new())).collect())
        }),
        text()
            .prop_filter("bad type", |t| !rules::is_directive_type(t))
            .prop_map(|t| B::Capabilities(
                vec![capability(t, String::new())],
                "capabilities[0].directive_type"
            )),
        longer_than(64).prop_map(|v| B::Capabilities(
            vec![capability("t".into(), v)],
            "capabilities[0].version"
        )),
        Just(B::Capabilities(
            vec![
                capability("t".into(), "1".into()),
                capability("t".into(), "2".into())
            ],
            "capabilities[1].directive_type",
        )),
        (257..300usize).prop_map(|n| {
            B::Capabilities(
                (0..n)
                    .map(|i| capability(format!("t{i}"), String::new()))
                    .collect(),
                "capabilities",
            )
        }),
        longer_than(64).prop_map(B::Version),
    ]
}

impl BadRegister {
    /// Breaks `req`; the field the error must name.
    fn apply(self, req: &mut proto::RegisterRequest) -> &'static str {
        match self {
            Self::Name(n) => {
                req.name = n;
                "name"
            }
            Self::Labels(l) => {
                req.labels = l;
                "labels"
            }
            Self::Capabilities(c, field) => {
                req.capabilities = c;
                field
            }
            Self::Version(v) => {
                req.version = v;
                "version"
            }
        }
    }
}

fn any_heartbeat() -> impl Strategy<Value = proto::HeartbeatRequest> {
    (
        prop_oneof![any::<i32>(), 0..5i32],
        text(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        text(),
    )
        .prop_map(
            |(status, status_message, a, b, c, version)| proto::HeartbeatRequest {
                status,
                status_message,
                in_flight_directives: a,
                buffered_metric_points: b,
                failed_metric_pushes: c,
                version,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_register_is_parsed_or_refused_naming_a_field(req in any_register()) {
        match Registration::parse(req, DEFAULT_WINDOW, MAX_WINDOW) {
            Ok(reg) => prop_assert!((1..=MAX_WINDOW).contains(&reg.max_in_flight)),
            Err(e) => prop_assert!(names_one_of(&e, REGISTER_FIELDS), "{:?}", e),
        }
    }

    #[test]
    fn a_valid_register_is_kept_as_sent(req in valid_register()) {
        let reg = Registration::parse(req.clone(), DEFAULT_WINDOW, MAX_WINDOW).unwrap();
        prop_assert_eq!(&reg.name, &req.name);
        prop_assert_eq!(reg.labels, req.labels.into_iter().collect());
        prop_assert_eq!(reg.capabilities.len(), req.capabilities.len());
        prop_assert_eq!(
            reg.max_in_flight,
            if req.max_in_flight == 0 { DEFAULT_WINDOW } else { req.max_in_flight.min(MAX_WINDOW) }
        );
    }

    #[test]
    fn one_bad_register_field_is_the_one_named(req in valid_register(), bad in bad_register()) {
        let mut req = req;
        let field = bad.apply(&mut req);
        let e = Registration::parse(req, DEFAULT_WINDOW, MAX_WINDOW).unwrap_err();
        prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{:?}", e);
        prop_assert!(names(&e, field), "{:?} should name {}", e, field);
    }

    #[test]
    fn any_heartbeat_is_parsed_or_refused_naming_a_field(req in any_heartbeat()) {
        let valid_status = (1..=3).contains(&req.status);
        match Heartbeat::try_from(req.clone()) {
            Ok(hb) => {
                prop_assert!(valid_status);
                prop_assert_eq!(hb.status as i32, req.status);
                prop_assert_eq!(hb.buffered_points, req.buffered_metric_points);
            }
            Err(e) => {
                prop_assert!(names_one_of(&e, HEARTBEAT_FIELDS), "{:?}", e);
                if !valid_status {
                    prop_assert!(names(&e, "status"), "{:?}", e);
                }
            }
        }
    }

    #[test]
    fn a_long_heartbeat_text_is_the_field_named(
        message in prop_oneof![longer_than(1024), "\\PC{0,1024}"],
        version in prop_oneof![longer_than(64), "\\PC{0,64}"],
    ) {
        let (long_message, long_version) =
            (message.chars().count() > 1024, version.chars().count() > 64);
        let req = proto::HeartbeatRequest {
            status: proto::SpokeStatus::Ok as i32,
            status_message: message,
            version,
            ..Default::default()
        };
        match Heartbeat::try_from(req) {
            Ok(_) => prop_assert!(!long_message && !long_version),
            Err(e) if long_message => prop_assert!(names(&e, "status_message"), "{:?}", e),
            Err(e) => {
                prop_assert!(long_version);
                prop_assert!(names(&e, "version"), "{:?}", e);
            }
        }
    }

    #[test]
    fn list_spokes_takes_only_the_tokens_it_issues(token in prop_oneof![text(), "[a-z0-9][a-z0-9._-]{0,62}"]) {
        // The tokens the hub issues are the names of spokes it listed.
        let issued = token.is_empty() || rules::is_spoke_name(&token);
        match page_after(&token) {
            Ok(after) => {
                prop_assert!(issued);
                prop_assert_eq!(after, token.as_str());
            }
            Err(e) => {
                prop_assert!(!issued);
                prop_assert!(names(&e, "page_token"), "{:?}", e);
            }
        }
    }

    #[test]
    fn health_is_derived_at_any_time(
        last_seen in prop::option::of(any::<i64>()),
        now in any::<i64>(),
        interval in any::<i64>(),
        connected in any::<bool>(),
    ) {
        let health = health_at(last_seen, now, interval, connected);
        prop_assert!(!connected || health == proto::SpokeHealth::Online);
    }
}
