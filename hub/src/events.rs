//! Events: the record of every state change, with a hub-wide sequence.

use hub_proto::v1 as proto;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::wire::{struct_of_json, timestamp_ms};

/// What an event records (see `EventType` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A spoke registered for the first time.
    SpokeRegistered,
    /// A spoke's health changed.
    SpokeHealthChanged,
    /// A spoke was revoked.
    SpokeRevoked,
    /// A spoke's key was rotated.
    SpokeKeyRotated,
    /// A directive was created.
    DirectiveCreated,
    /// A directive was delivered.
    DirectiveDelivered,
    /// An IN_PROGRESS ack arrived.
    DirectiveProgress,
    /// A directive completed.
    DirectiveCompleted,
    /// A directive failed.
    DirectiveFailed,
    /// A directive was rejected.
    DirectiveRejected,
    /// A directive expired.
    DirectiveExpired,
    /// A directive was cancelled.
    DirectiveCancelled,
    /// A metric batch was stored.
    MetricsReceived,
    /// A spoke registered again and changed something.
    SpokeUpdated,
    /// A spoke was deleted.
    SpokeDeleted,
    /// A delivery's ack deadline passed: the directive is PENDING again.
    DirectiveRequeued,
}

const ALL: [(Kind, &str, proto::EventType); 16] = [
    (
        Kind::SpokeRegistered,
        "SPOKE_REGISTERED",
        proto::EventType::SpokeRegistered,
    ),
    (
        Kind::SpokeHealthChanged,
        "SPOKE_HEALTH_CHANGED",
        proto::EventType::SpokeHealthChanged,
    ),
    (
        Kind::SpokeRevoked,
        "SPOKE_REVOKED",
        proto::EventType::SpokeRevoked,
    ),
    (
        Kind::SpokeKeyRotated,
        "SPOKE_KEY_ROTATED",
        proto::EventType::SpokeKeyRotated,
    ),
    (
        Kind::DirectiveCreated,
        "DIRECTIVE_CREATED",
        proto::EventType::DirectiveCreated,
    ),
    (
        Kind::DirectiveDelivered,
        "DIRECTIVE_DELIVERED",
        proto::EventType::DirectiveDelivered,
    ),
    (
        Kind::DirectiveProgress,
        "DIRECTIVE_PROGRESS",
        proto::EventType::DirectiveProgress,
    ),
    (
        Kind::DirectiveCompleted,
        "DIRECTIVE_COMPLETED",
        proto::EventType::DirectiveCompleted,
    ),
    (
        Kind::DirectiveFailed,
        "DIRECTIVE_FAILED",
        proto::EventType::DirectiveFailed,
    ),
    (
        Kind::DirectiveRejected,
        "DIRECTIVE_REJECTED",
        proto::EventType::DirectiveRejected,
    ),
    (
        Kind::DirectiveExpired,
        "DIRECTIVE_EXPIRED",
        proto::EventType::DirectiveExpired,
    ),
    (
        Kind::DirectiveCancelled,
        "DIRECTIVE_CANCELLED",
        proto::EventType::DirectiveCancelled,
    ),
    (
        Kind::MetricsReceived,
        "METRICS_RECEIVED",
        proto::EventType::MetricsReceived,
    ),
    (
        Kind::SpokeUpdated,
        "SPOKE_UPDATED",
        proto::EventType::SpokeUpdated,
    ),
    (
        Kind::SpokeDeleted,
        "SPOKE_DELETED",
        proto::EventType::SpokeDeleted,
    ),
    (
        Kind::DirectiveRequeued,
        "DIRECTIVE_REQUEUED",
        proto::EventType::DirectiveRequeued,
    ),
];

impl Kind {
    /// Every kind, in the contract's order.
    pub fn all() -> impl Iterator<Item = Kind> {
        ALL.iter().map(|(k, ..)| *k)
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        ALL.iter()
            .find(|(k, ..)| *k == self)
            .map_or("", |(_, s, _)| s)
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<Self> {
        ALL.iter()
            .find(|(_, name, _)| *name == s)
            .map(|(k, ..)| *k)
            .ok_or_else(|| Error::Corrupt(format!("event type {s:?}")))
    }

    /// The wire enum.
    pub fn to_proto(self) -> proto::EventType {
        ALL.iter()
            .find(|(k, ..)| *k == self)
            .map_or(proto::EventType::Unspecified, |(.., p)| *p)
    }

    /// From the wire enum, for filters.
    pub fn from_proto(value: i32, field: &str) -> Result<Self> {
        ALL.iter()
            .find(|(.., p)| *p as i32 == value)
            .map(|(k, ..)| *k)
            .ok_or_else(|| Error::invalid(field, format!("unknown event type {value}")))
    }
}

/// An event to write, in the same transaction as its change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What happened.
    pub kind: Kind,
    /// The spoke concerned.
    pub spoke_id: Option<Uuid>,
    /// The directive concerned.
    pub directive_id: Option<Uuid>,
    /// Details, a JSON object.
    pub details: serde_json::Value,
}

impl NewEvent {
    /// An event about a spoke.
    pub fn spoke(kind: Kind, spoke_id: Uuid, details: serde_json::Value) -> Self {
        Self {
            kind,
            spoke_id: Some(spoke_id),
            directive_id: None,
            details,
        }
    }

    /// An event about a directive of a spoke.
    pub fn directive(
        kind: Kind,
        spoke_id: Uuid,
        directive_id: Uuid,
        details: serde_json::Value,
    ) -> Self {
        Self {
            kind,
            spoke_id: Some(spoke_id),
            directive_id: Some(directive_id),
            details,
        }
    }
}

/// An event as stored.
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// Sequence number.
    pub seq: i64,
    /// What happened.
    pub kind: Kind,
    /// When, Unix ms.
    pub time: i64,
    /// The spoke concerned.
    pub spoke_id: Option<String>,
    /// The directive concerned.
    pub directive_id: Option<String>,
    /// Details JSON text.
    pub details: String,
}

impl EventRecord {
    /// The wire form.
    pub fn to_proto(&self) -> Result<proto::Event> {
        Ok(proto::Event {
            sequence: self.seq as u64,
            r#type: self.kind.to_proto().into(),
            time: Some(timestamp_ms(self.time)),
            spoke_id: self.spoke_id.clone().unwrap_or_default(),
            directive_id: self.directive_id.clone().unwrap_or_default(),
            details: Some(struct_of_json(&self.details)?),
        })
    }
}

/// Filters of an event query.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only these kinds (empty: all).
    pub kinds: Vec<Kind>,
    /// Only this spoke.
    pub spoke_id: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for (kind, name, wire) in ALL {
            assert_eq!(Kind::parse(name).unwrap(), kind);
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.to_proto(), wire);
            assert_eq!(Kind::from_proto(wire as i32, "f").unwrap(), kind);
        }
        assert!(Kind::from_proto(0, "types").is_err());
    }
}
