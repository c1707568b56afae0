//! Directives: states, create requests, acks, and the stored record.

use std::collections::BTreeMap;

use hub_proto::v1 as proto;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::spokes::{check_directive_type, check_labels, check_len, check_name};
use crate::wire::{duration_ms, ms_of, ms_of_duration, struct_of_json, timestamp_ms};

/// The lifecycle state of a directive (see `DirectiveState` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting to be delivered.
    Pending,
    /// Sent, not acked yet.
    Delivered,
    /// Acked IN_PROGRESS.
    InProgress,
    /// Final: done.
    Completed,
    /// Final: failed.
    Failed,
    /// Final: refused by the spoke.
    Rejected,
    /// Final: expired.
    Expired,
    /// Final: cancelled.
    Cancelled,
}

impl State {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Delivered => "DELIVERED",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Rejected => "REJECTED",
            Self::Expired => "EXPIRED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "PENDING" => Self::Pending,
            "DELIVERED" => Self::Delivered,
            "IN_PROGRESS" => Self::InProgress,
            "COMPLETED" => Self::Completed,
            "FAILED" => Self::Failed,
            "REJECTED" => Self::Rejected,
            "EXPIRED" => Self::Expired,
            "CANCELLED" => Self::Cancelled,
            other => return Err(Error::Corrupt(format!("directive state {other:?}"))),
        })
    }

    /// Whether the state never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Delivered | Self::InProgress)
    }

    /// The wire enum.
    pub fn to_proto(self) -> proto::DirectiveState {
        match self {
            Self::Pending => proto::DirectiveState::Pending,
            Self::Delivered => proto::DirectiveState::Delivered,
            Self::InProgress => proto::DirectiveState::InProgress,
            Self::Completed => proto::DirectiveState::Completed,
            Self::Failed => proto::DirectiveState::Failed,
            Self::Rejected => proto::DirectiveState::Rejected,
            Self::Expired => proto::DirectiveState::Expired,
            Self::Cancelled => proto::DirectiveState::Cancelled,
        }
    }

    /// From the wire enum; `None` for UNSPECIFIED (meaning "any" in filters).
    pub fn from_proto(value: i32, field: &str) -> Result<Option<Self>> {
        Ok(Some(match proto::DirectiveState::try_from(value) {
            Ok(proto::DirectiveState::Unspecified) => return Ok(None),
            Ok(proto::DirectiveState::Pending) => Self::Pending,
            Ok(proto::DirectiveState::Delivered) => Self::Delivered,
            Ok(proto::DirectiveState::InProgress) => Self::InProgress,
            Ok(proto::DirectiveState::Completed) => Self::Completed,
            Ok(proto::DirectiveState::Failed) => Self::Failed,
            Ok(proto::DirectiveState::Rejected) => Self::Rejected,
            Ok(proto::DirectiveState::Expired) => Self::Expired,
            Ok(proto::DirectiveState::Cancelled) => Self::Cancelled,
            Err(_) => return Err(Error::invalid(field, format!("unknown state {value}"))),
        }))
    }
}

/// Which spokes a create aims at.
#[derive(Debug, Clone)]
pub enum Target {
    /// One spoke by id.
    SpokeId(Uuid),
    /// One spoke by name.
    SpokeName(String),
    /// Every spoke with all these labels.
    Selector(BTreeMap<String, String>),
    /// Every spoke.
    All,
}

impl Target {
    /// Whether the target may match many spokes (a fan-out).
    pub fn is_fan_out(&self) -> bool {
        matches!(self, Self::Selector(_) | Self::All)
    }
}

/// Limits and defaults that shape a create.
#[derive(Debug, Clone, Copy)]
pub struct CreateDefaults {
    /// Ack deadline when the request sets none, ms.
    pub ack_deadline_ms: i64,
    /// Max attempts when the request sets none.
    pub max_attempts: u32,
    /// Largest accepted encoded payload, bytes.
    pub max_payload_bytes: usize,
}

/// A validated `CreateDirectiveRequest`.
#[derive(Debug, Clone)]
pub struct NewDirective {
    /// Who gets it.
    pub target: Target,
    /// Directive type.
    pub directive_type: String,
    /// JSON payload text.
    pub payload: String,
    /// Priority, higher first.
    pub priority: i32,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Ack deadline, ms.
    pub ack_deadline_ms: i64,
    /// Deliveries before failing.
    pub max_attempts: u32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Coalesce key.
    pub coalesce_key: Option<String>,
    /// Skip the capability check.
    pub force: bool,
}

impl NewDirective {
    /// Validates a create request at `now_ms`.
    pub fn parse(
        req: proto::CreateDirectiveRequest,
        defaults: CreateDefaults,
        now_ms: i64,
    ) -> Result<Self> {
        use proto::directive_target::Target as T;
        let target = match req.target.and_then(|t| t.target) {
            None => {
                return Err(Error::invalid(
                    "target",
                    "required: spoke_id, spoke_name, selector or all_spokes",
                ));
            }
            Some(T::SpokeId(id)) => Target::SpokeId(parse_id(&id, "target.spoke_id")?),
            Some(T::SpokeName(name)) => {
                check_name(&name, "target.spoke_name")?;
                Target::SpokeName(name)
            }
            Some(T::Selector(sel)) => {
                if sel.match_labels.is_empty() {
                    return Err(Error::invalid(
                        "target.selector.match_labels",
                        "at least one label",
                    ));
                }
                check_labels(&sel.match_labels, "target.selector.match_labels")?;
                Target::Selector(sel.match_labels.into_iter().collect())
            }
            Some(T::AllSpokes(true)) => Target::All,
            Some(T::AllSpokes(false)) => {
                return Err(Error::invalid("target.all_spokes", "must be true when set"));
            }
        };
        check_directive_type(&req.r#type, "type")?;
        let payload = json_text(req.payload.as_ref(), "payload")?;
        if payload.len() > defaults.max_payload_bytes {
            return Err(Error::ResourceExhausted(format!(
                "payload: {} bytes encoded, the limit is {}",
                payload.len(),
                defaults.max_payload_bytes
            )));
        }
        let expires_at = match &req.expires_at {
            None => None,
            Some(ts) => {
                let at = ms_of(ts, "expires_at")?;
                if at <= now_ms {
                    return Err(Error::invalid("expires_at", "must be in the future"));
                }
                Some(at)
            }
        };
        let ack_deadline_ms = match &req.ack_deadline {
            None => defaults.ack_deadline_ms,
            Some(d) => {
                let ms = ms_of_duration(d, "ack_deadline")?;
                if !(1_000..=86_400_000).contains(&ms) {
                    return Err(Error::invalid("ack_deadline", "must be between 1s and 24h"));
                }
                ms
            }
        };
        let max_attempts = match req.max_attempts {
            0 => defaults.max_attempts,
            n if n <= 100 => n,
            _ => return Err(Error::invalid("max_attempts", "at most 100")),
        };
        check_len(&req.idempotency_key, 128, "idempotency_key")?;
        check_len(&req.coalesce_key, 128, "coalesce_key")?;
        Ok(Self {
            target,
            directive_type: req.r#type,
            payload,
            priority: req.priority,
            expires_at,
            ack_deadline_ms,
            max_attempts,
            idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
            coalesce_key: Some(req.coalesce_key).filter(|k| !k.is_empty()),
            force: req.force,
        })
    }
}

/// The parts of a directive that never change after it is created.
#[derive(Debug, Clone)]
pub struct Fixed {
    /// Type.
    pub directive_type: String,
    /// Priority.
    pub priority: i32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Created, Unix ms.
    pub created_at: i64,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Ack deadline, ms.
    pub ack_deadline_ms: i64,
    /// The create call that made it.
    pub group_id: Uuid,
    /// Idempotency key of that call.
    pub idempotency_key: Option<String>,
    /// Coalesce key.
    pub coalesce_key: Option<String>,
}

/// A directive as stored.
#[derive(Debug, Clone)]
pub struct DirectiveRecord {
    /// Id.
    pub id: Uuid,
    /// Spoke id.
    pub spoke_id: Uuid,
    /// Spoke name.
    pub spoke_name: String,
    /// Type.
    pub directive_type: String,
    /// Payload JSON text.
    pub payload: String,
    /// State.
    pub state: State,
    /// Deliveries so far.
    pub attempts: u32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Priority.
    pub priority: i32,
    /// Created, Unix ms.
    pub created_at: i64,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Ack deadline, ms.
    pub ack_deadline_ms: i64,
    /// Next ack due, Unix ms.
    pub ack_due_at: Option<i64>,
    /// Group id.
    pub group_id: Uuid,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Coalesce key.
    pub coalesce_key: Option<String>,
    /// Result JSON text.
    pub result: Option<String>,
    /// Error or reason.
    pub error: String,
    /// Latest progress.
    pub progress: u32,
    /// Latest progress message.
    pub progress_message: String,
}

impl DirectiveRecord {
    /// The wire form.
    pub fn to_proto(&self) -> Result<proto::Directive> {
        self.wire(true)
    }

    /// The wire form without the payload (left unset).
    pub fn to_proto_without_payload(&self) -> Result<proto::Directive> {
        self.wire(false)
    }

    fn wire(&self, payload: bool) -> Result<proto::Directive> {
        Ok(proto::Directive {
            id: self.id.to_string(),
            spoke_id: self.spoke_id.to_string(),
            spoke_name: self.spoke_name.clone(),
            r#type: self.directive_type.clone(),
            payload: if payload {
                Some(struct_of_json(&self.payload)?)
            } else {
                None
            },
            state: self.state.to_proto().into(),
            attempt: self.attempts,
            max_attempts: self.max_attempts,
            priority: self.priority,
            created_at: Some(timestamp_ms(self.created_at)),
            updated_at: Some(timestamp_ms(self.updated_at)),
            expires_at: self.expires_at.map(timestamp_ms),
            ack_deadline: Some(duration_ms(self.ack_deadline_ms)),
            ack_due_at: self.ack_due_at.map(timestamp_ms),
            group_id: self.group_id.to_string(),
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            coalesce_key: self.coalesce_key.clone().unwrap_or_default(),
            result: self.result.as_deref().map(struct_of_json).transpose()?,
            error: self.error.clone(),
            progress: self.progress,
            progress_message: self.progress_message.clone(),
        })
    }
}

/// What an ack asks for.
#[derive(Debug, Clone)]
pub enum AckOutcome {
    /// Still working; optional progress.
    InProgress {
        /// 0-100.
        progress: Option<u32>,
        /// Progress message.
        message: String,
    },
    /// Final with a result (JSON text).
    Completed(String),
    /// Final with an error.
    Failed(String),
    /// Final refusal with an error.
    Rejected(String),
}

impl AckOutcome {
    /// The state the outcome leads to.
    pub fn state(&self) -> State {
        match self {
            Self::InProgress { .. } => State::InProgress,
            Self::Completed(_) => State::Completed,
            Self::Failed(_) => State::Failed,
            Self::Rejected(_) => State::Rejected,
        }
    }
}

/// The result of applying an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckApplied {
    /// State after the ack.
    pub state: State,
    /// Whether it repeated an earlier final ack and changed nothing.
    pub duplicate: bool,
}

/// A validated `AckRequest`.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Directive id.
    pub directive_id: Uuid,
    /// Outcome.
    pub outcome: AckOutcome,
}

impl TryFrom<proto::AckRequest> for Ack {
    type Error = Error;

    fn try_from(req: proto::AckRequest) -> Result<Self> {
        let directive_id = parse_id(&req.directive_id, "directive_id")?;
        let error = |e: String| -> Result<String> {
            if e.trim().is_empty() {
                return Err(Error::invalid("error", "required for FAILED and REJECTED"));
            }
            check_len(&e, 4096, "error")?;
            Ok(e)
        };
        let outcome = match proto::AckOutcome::try_from(req.outcome) {
            Ok(proto::AckOutcome::InProgress) => {
                if req.progress.is_some_and(|p| p > 100) {
                    return Err(Error::invalid("progress", "must be 0 to 100"));
                }
                check_len(&req.progress_message, 1024, "progress_message")?;
                AckOutcome::InProgress {
                    progress: req.progress,
                    message: req.progress_message,
                }
            }
            Ok(proto::AckOutcome::Completed) => {
                AckOutcome::Completed(json_text(req.result.as_ref(), "result")?)
            }
            Ok(proto::AckOutcome::Failed) => AckOutcome::Failed(error(req.error)?),
            Ok(proto::AckOutcome::Rejected) => AckOutcome::Rejected(error(req.error)?),
            Ok(proto::AckOutcome::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    "outcome",
                    "must be IN_PROGRESS, COMPLETED, FAILED or REJECTED",
                ));
            }
        };
        Ok(Self {
            directive_id,
            outcome,
        })
    }
}

/// The JSON text stored for the Struct in `field` (`{}` when unset). NaN
/// and ±Infinity are refused, naming where they are (`payload.a.b[2]`):
/// JSON has no such numbers, and storing `null` would change the data.
fn json_text(s: Option<&pbjson_types::Struct>, field: &str) -> Result<String> {
    match s {
        None => Ok("{}".to_owned()),
        Some(s) => hub_proto::json::to_json_finite(s)
            .map(|json| json.to_string())
            .map_err(|e| Error::invalid(e.field(field), "NaN and Infinity are not JSON numbers")),
    }
}

/// Parses a UUID field.
pub fn parse_id(s: &str, field: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    Uuid::parse_str(s).map_err(|_| Error::invalid(field, "not a UUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: CreateDefaults = CreateDefaults {
        ack_deadline_ms: 30_000,
        max_attempts: 5,
        max_payload_bytes: 1024,
    };

    fn req() -> proto::CreateDirectiveRequest {
        proto::CreateDirectiveRequest {
            target: Some(proto::DirectiveTarget {
                target: Some(proto::directive_target::Target::SpokeName("s1".into())),
            }),
            r#type: "sync_doc".into(),
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn create_applies_defaults() {
        let d = NewDirective::parse(req(), DEFAULTS, 0).unwrap();
        assert_eq!(d.payload, "{}");
        assert_eq!(d.ack_deadline_ms, 30_000);
        assert_eq!(d.max_attempts, 5);
        assert!(d.idempotency_key.is_none());
    }

    #[test]
    fn create_names_the_bad_field() {
        let mut r = req();
        r.target = None;
        assert_eq!(
            field_of(NewDirective::parse(r, DEFAULTS, 0).unwrap_err()),
            "target"
        );
        let mut r = req();
        r.r#type = String::new();
        assert_eq!(
            field_of(NewDirective::parse(r, DEFAULTS, 0).unwrap_err()),
            "type"
        );
        let mut r = req();
        r.expires_at = Some(timestamp_ms(5));
        assert_eq!(
            field_of(NewDirective::parse(r, DEFAULTS, 10).unwrap_err()),
            "expires_at"
        );
        let mut r = req();
        r.max_attempts = 101;
        assert_eq!(
            field_of(NewDirective::parse(r, DEFAULTS, 0).unwrap_err()),
            "max_attempts"
        );
    }

    #[test]
    fn oversized_payload_is_resource_exhausted() {
        let mut r = req();
        r.payload = Some(crate::wire::struct_of_value(
            serde_json::json!({"x": "y".repeat(2000)}),
        ));
        assert!(matches!(
            NewDirective::parse(r, DEFAULTS, 0),
            Err(Error::ResourceExhausted(_))
        ));
    }

    #[test]
    fn failed_ack_needs_an_error() {
        let ack = proto::AckRequest {
            directive_id: Uuid::now_v7().to_string(),
            outcome: proto::AckOutcome::Failed.into(),
            ..Default::default()
        };
        assert_eq!(field_of(Ack::try_from(ack).unwrap_err()), "error");
    }

    #[test]
    fn states_round_trip() {
        for s in [
            State::Pending,
            State::Delivered,
            State::InProgress,
            State::Completed,
            State::Failed,
            State::Rejected,
            State::Expired,
            State::Cancelled,
        ] {
            assert_eq!(State::parse(s.as_str()).unwrap(), s);
            assert_eq!(
                State::from_proto(s.to_proto().into(), "s").unwrap(),
                Some(s)
            );
        }
    }
}
