//! Spokes: registration input, the stored record, and derived health.

use std::collections::BTreeMap;
use std::sync::Arc;

use hub_proto::rules;
use hub_proto::v1 as proto;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::wire::timestamp_ms;

/// Validated contents of a `RegisterRequest`.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Unique spoke name.
    pub name: String,
    /// Labels for selectors.
    pub labels: BTreeMap<String, String>,
    /// Declared directive types and handler versions.
    pub capabilities: Vec<(String, String)>,
    /// The spoke's version string.
    pub version: String,
    /// The granted in-flight window.
    pub max_in_flight: u32,
    /// Where to POST directives (checked: see `webhook::WebhookUrl`);
    /// `None`: stream and poll delivery.
    pub webhook_url: Option<String>,
}

impl Registration {
    /// Validates a request; the window is granted within the hub's limits.
    pub fn parse(
        req: proto::RegisterRequest,
        default_window: u32,
        max_window: u32,
    ) -> Result<Self> {
        check_name(&req.name, "name")?;
        check_labels(&req.labels, "labels")?;
        if req.capabilities.len() > 256 {
            return Err(Error::invalid("capabilities", "at most 256 entries"));
        }
        let mut capabilities = Vec::with_capacity(req.capabilities.len());
        for (i, cap) in req.capabilities.into_iter().enumerate() {
            check_directive_type(
                &cap.directive_type,
                &format!("capabilities[{i}].directive_type"),
            )?;
            check_len(&cap.version, 64, &format!("capabilities[{i}].version"))?;
            if capabilities.iter().any(|(t, _)| *t == cap.directive_type) {
                return Err(Error::invalid(
                    format!("capabilities[{i}].directive_type"),
                    format!("{:?} is declared twice", cap.directive_type),
                ));
            }
            capabilities.push((cap.directive_type, cap.version));
        }
        check_len(&req.version, 64, "version")?;
        let max_in_flight = match req.max_in_flight {
            0 => default_window,
            n => n.min(max_window),
        };
        let webhook_url = match req.webhook_url.as_str() {
            "" => None,
            url => Some(crate::webhook::WebhookUrl::parse(url)?.to_string()),
        };
        Ok(Self {
            webhook_url,
            name: req.name,
            labels: req.labels.into_iter().collect(),
            capabilities,
            version: req.version,
            max_in_flight,
        })
    }
}

/// What identifies a spoke and what it registered with: changes only on
/// re-registration, revocation and key rotation (the ledger replaces it).
#[derive(Debug, Clone)]
pub struct SpokeInfo {
    /// Hub-assigned id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// SHA-256 of its key, hex.
    pub key_hash: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `labels` as stored (JSON text).
    pub labels_json: String,
    /// Declared directive types and handler versions.
    pub capabilities: Vec<(String, String)>,
    /// `capabilities` as stored (JSON text).
    pub capabilities_json: String,
    /// In-flight window.
    pub max_in_flight: u32,
    /// First registration, Unix ms.
    pub registered_at: i64,
    /// When revoked, if revoked.
    pub revoked_at: Option<i64>,
    /// Webhook delivery, when the spoke registered a URL.
    pub webhook: Option<Arc<Webhook>>,
}

/// A spoke's webhook: where its directives are POSTed, and the secret they
/// are signed with (Standard Webhooks form, `whsec_…`).
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    /// The URL, as checked at registration.
    pub url: String,
    /// The signing secret.
    pub secret: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The latest webhook request to a spoke and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    /// When it ended, Unix ms.
    pub at: i64,
    /// The directive it carried.
    pub directive_id: Uuid,
    /// Its attempt number.
    pub attempt: u32,
    /// "delivered", "http_error", "timeout", "connect_error" or "refused".
    pub result: &'static str,
    /// The answer's HTTP status, if one came.
    pub http_status: Option<u16>,
    /// What went wrong (or why an outcome in the answer was not applied).
    pub error: String,
}

impl SpokeInfo {
    /// A spoke as stored; the JSON columns are derived from the values.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Uuid,
        name: String,
        key_hash: String,
        labels: BTreeMap<String, String>,
        capabilities: Vec<(String, String)>,
        max_in_flight: u32,
        registered_at: i64,
        revoked_at: Option<i64>,
    ) -> Self {
        Self {
            labels_json: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".to_owned()),
            capabilities_json: serde_json::to_string(&capabilities)
                .unwrap_or_else(|_| "[]".to_owned()),
            id,
            name,
            key_hash,
            labels,
            capabilities,
            max_in_flight,
            registered_at,
            revoked_at,
            webhook: None,
        }
    }

    /// The same spoke with webhook delivery set (or not).
    #[must_use]
    pub fn with_webhook(mut self, webhook: Option<Arc<Webhook>>) -> Self {
        self.webhook = webhook;
        self
    }

    /// Whether the spoke declared `directive_type`.
    pub fn handles(&self, directive_type: &str) -> bool {
        self.capabilities.iter().any(|(t, _)| t == directive_type)
    }

    /// Whether every pair of `selector` is among the spoke's labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// What a spoke reports and when it was last seen: changes with every
/// heartbeat, lives in memory and is stored in batches.
#[derive(Debug, Clone)]
pub struct SpokeLive {
    /// The spoke's version string.
    pub version: String,
    /// Latest heartbeat, Unix ms.
    pub last_heartbeat_at: Option<i64>,
    /// Latest sign of life (registration, heartbeat, stream), Unix ms.
    pub last_seen_at: Option<i64>,
    /// Latest reported status.
    pub status: proto::SpokeStatus,
    /// Latest status message.
    pub status_message: String,
    /// Reported in-flight directives.
    pub reported_in_flight: u32,
    /// Reported buffered metric points.
    pub reported_buffered_points: u64,
    /// Reported failed metric pushes.
    pub reported_failed_pushes: u64,
    /// The health last recorded with an event (`health_name`).
    pub health: &'static str,
}

impl SpokeLive {
    /// A spoke that has just registered: seen now, ONLINE.
    pub fn registered(version: String, now_ms: i64) -> Self {
        Self {
            version,
            last_heartbeat_at: None,
            last_seen_at: Some(now_ms),
            status: proto::SpokeStatus::Unspecified,
            status_message: String::new(),
            reported_in_flight: 0,
            reported_buffered_points: 0,
            reported_failed_pushes: 0,
            health: "ONLINE",
        }
    }
}

/// A spoke as stored, plus the hub-side counts read with it.
#[derive(Debug, Clone)]
pub struct SpokeRecord {
    /// Hub-assigned id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Declared directive types and handler versions.
    pub capabilities: Vec<(String, String)>,
    /// Version string.
    pub version: String,
    /// In-flight window.
    pub max_in_flight: u32,
    /// First registration, Unix ms.
    pub registered_at: i64,
    /// When revoked, if revoked.
    pub revoked_at: Option<i64>,
    /// Latest heartbeat, Unix ms.
    pub last_heartbeat_at: Option<i64>,
    /// Latest sign of life (registration, heartbeat, stream), Unix ms.
    pub last_seen_at: Option<i64>,
    /// Latest reported status.
    pub status: proto::SpokeStatus,
    /// Latest status message.
    pub status_message: String,
    /// Reported in-flight directives.
    pub reported_in_flight: u32,
    /// Reported buffered metric points.
    pub reported_buffered_points: u64,
    /// Reported failed metric pushes.
    pub reported_failed_pushes: u64,
    /// Directives not final yet.
    pub outstanding: u64,
    /// The webhook URL, for a spoke with webhook delivery.
    pub webhook_url: Option<String>,
    /// The latest webhook request to it since the hub started.
    pub last_webhook: Option<WebhookAttempt>,
}

impl SpokeRecord {
    /// A snapshot of a spoke with `outstanding` directives not final yet.
    pub fn new(info: &SpokeInfo, live: &SpokeLive, outstanding: u64) -> Self {
        Self {
            id: info.id,
            name: info.name.clone(),
            labels: info.labels.clone(),
            capabilities: info.capabilities.clone(),
            version: live.version.clone(),
            max_in_flight: info.max_in_flight,
            registered_at: info.registered_at,
            revoked_at: info.revoked_at,
            last_heartbeat_at: live.last_heartbeat_at,
            last_seen_at: live.last_seen_at,
            status: live.status,
            status_message: live.status_message.clone(),
            reported_in_flight: live.reported_in_flight,
            reported_buffered_points: live.reported_buffered_points,
            reported_failed_pushes: live.reported_failed_pushes,
            outstanding,
            webhook_url: info.webhook.as_ref().map(|w| w.url.clone()),
            last_webhook: None,
        }
    }

    /// Whether every pair of `selector` is among the spoke's labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// Health derived at `now` (see [`health_at`]).
    pub fn health(&self, now_ms: i64, interval_ms: i64, connected: bool) -> proto::SpokeHealth {
        if self.revoked_at.is_some() {
            return proto::SpokeHealth::Revoked;
        }
        health_at(self.last_seen_at, now_ms, interval_ms, connected)
    }

    /// The wire form, with health derived by the caller.
    pub fn to_proto(&self, health: proto::SpokeHealth, connected: bool) -> proto::Spoke {
        proto::Spoke {
            id: self.id.to_string(),
            name: self.name.clone(),
            labels: self.labels.clone().into_iter().collect(),
            capabilities: self
                .capabilities
                .iter()
                .map(|(t, v)| proto::Capability {
                    directive_type: t.clone(),
                    version: v.clone(),
                })
                .collect(),
            version: self.version.clone(),
            health: health.into(),
            status: self.status.into(),
            status_message: self.status_message.clone(),
            registered_at: Some(timestamp_ms(self.registered_at)),
            last_heartbeat_at: self.last_heartbeat_at.map(timestamp_ms),
            connected,
            reported_in_flight: self.reported_in_flight,
            reported_buffered_points: self.reported_buffered_points,
            reported_failed_pushes: self.reported_failed_pushes,
            outstanding_directives: self.outstanding,
            max_in_flight: self.max_in_flight,
            delivery_mode: if self.webhook_url.is_some() {
                proto::DeliveryMode::Webhook
            } else {
                proto::DeliveryMode::Stream
            }
            .into(),
            webhook_url: self.webhook_url.clone().unwrap_or_default(),
            last_webhook: self.last_webhook.as_ref().map(|w| proto::WebhookAttempt {
                at: Some(timestamp_ms(w.at)),
                directive_id: w.directive_id.to_string(),
                attempt: w.attempt,
                result: w.result.to_owned(),
                http_status: w.http_status.map_or(0, u32::from),
                error: w.error.clone(),
            }),
        }
    }
}

/// Heartbeat intervals without a sign of life before a spoke is STALE.
pub const STALE_AFTER_INTERVALS: i64 = 3;
/// Heartbeat intervals without a sign of life before a spoke is OFFLINE.
pub const OFFLINE_AFTER_INTERVALS: i64 = 10;

/// Health of a spoke last seen at `last_seen_ms`: ONLINE while connected or
/// seen within [`STALE_AFTER_INTERVALS`] heartbeat intervals, STALE up to
/// [`OFFLINE_AFTER_INTERVALS`], then OFFLINE.
pub fn health_at(
    last_seen_ms: Option<i64>,
    now_ms: i64,
    interval_ms: i64,
    connected: bool,
) -> proto::SpokeHealth {
    if connected {
        return proto::SpokeHealth::Online;
    }
    // Saturating: a time or interval at the ends of i64 must not overflow.
    match last_seen_ms.map(|at| now_ms.saturating_sub(at)) {
        Some(age) if age <= STALE_AFTER_INTERVALS.saturating_mul(interval_ms) => {
            proto::SpokeHealth::Online
        }
        Some(age) if age <= OFFLINE_AFTER_INTERVALS.saturating_mul(interval_ms) => {
            proto::SpokeHealth::Stale
        }
        _ => proto::SpokeHealth::Offline,
    }
}

/// The name a health is stored under.
pub fn health_name(health: proto::SpokeHealth) -> &'static str {
    match health {
        proto::SpokeHealth::Online => "ONLINE",
        proto::SpokeHealth::Stale => "STALE",
        proto::SpokeHealth::Revoked => "REVOKED",
        proto::SpokeHealth::Offline | proto::SpokeHealth::Unspecified => "OFFLINE",
    }
}

/// Validated contents of a `HeartbeatRequest`.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// Reported status.
    pub status: proto::SpokeStatus,
    /// Status message.
    pub status_message: String,
    /// Directives in flight at the spoke.
    pub in_flight: u32,
    /// Points in the spoke's buffer.
    pub buffered_points: u64,
    /// Failed pushes so far.
    pub failed_pushes: u64,
    /// New version string, if any.
    pub version: Option<String>,
}

impl TryFrom<proto::HeartbeatRequest> for Heartbeat {
    type Error = Error;

    fn try_from(req: proto::HeartbeatRequest) -> Result<Self> {
        let status = match proto::SpokeStatus::try_from(req.status) {
            Ok(proto::SpokeStatus::Unspecified) | Err(_) => {
                return Err(Error::invalid("status", "must be OK, DEGRADED or ERROR"));
            }
            Ok(s) => s,
        };
        check_len(&req.status_message, 1024, "status_message")?;
        check_len(&req.version, 64, "version")?;
        Ok(Self {
            status,
            status_message: req.status_message,
            in_flight: req.in_flight_directives,
            buffered_points: req.buffered_metric_points,
            failed_pushes: req.failed_metric_pushes,
            version: Some(req.version).filter(|v| !v.is_empty()),
        })
    }
}

/// The spoke name a ListSpokes `page_token` continues after (`""`: from the
/// start). The hub's tokens are spoke names, so anything else is a token it
/// did not issue (as ListDirectives and QueryMetrics refuse theirs).
pub fn page_after(page_token: &str) -> Result<&str> {
    if page_token.is_empty() || rules::is_spoke_name(page_token) {
        Ok(page_token)
    } else {
        Err(Error::invalid("page_token", "not a token from this API"))
    }
}

/// Checks a spoke name: 1 to 63 of `[a-z0-9._-]`, starting alphanumeric.
pub fn check_name(name: &str, field: &str) -> Result<()> {
    if rules::is_spoke_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
        ))
    }
}

/// Checks labels (or a label selector): at most 32; keys of
/// `[A-Za-z0-9._/-]{1,63}`, values up to 256 characters.
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    field: &str,
) -> Result<()> {
    for (n, (k, v)) in labels.into_iter().enumerate() {
        if n >= rules::MAX_LABELS {
            return Err(Error::invalid(field, "at most 32 labels"));
        }
        if !rules::is_label_key(k) {
            return Err(Error::invalid(
                format!("{field}[{k:?}]"),
                "key must be 1 to 63 characters of A-Z, a-z, 0-9, '-', '_', '.', '/'",
            ));
        }
        check_len(v, rules::MAX_LABEL_VALUE_CHARS, &format!("{field}[{k:?}]"))?;
    }
    Ok(())
}

/// Checks a directive type: 1 to 64 of `[A-Za-z0-9_.\-/]`.
pub fn check_directive_type(t: &str, field: &str) -> Result<()> {
    if rules::is_directive_type(t) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.', '/'",
        ))
    }
}

/// Checks a free-text field: its length in characters, and no NUL
/// character (PostgreSQL cannot store one in text, so neither backend
/// takes it).
pub fn check_len(s: &str, max: usize, field: &str) -> Result<()> {
    if s.chars().count() > max {
        Err(Error::invalid(field, format!("at most {max} characters")))
    } else if s.contains('\0') {
        Err(Error::invalid(field, "must not contain NUL characters"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_with_a_nul_character_is_refused_naming_the_field() {
        check_len("all good \u{1}", 64, "status_message").unwrap();
        let e = check_len("a\0b", 64, "status_message").unwrap_err();
        assert_eq!(
            e.to_string(),
            "status_message: must not contain NUL characters"
        );
    }

    #[test]
    fn window_is_granted_within_the_hub_maximum() {
        let req = |w| proto::RegisterRequest {
            name: "s".into(),
            max_in_flight: w,
            ..Default::default()
        };
        assert_eq!(
            Registration::parse(req(0), 16, 64).unwrap().max_in_flight,
            16
        );
        assert_eq!(
            Registration::parse(req(8), 16, 64).unwrap().max_in_flight,
            8
        );
        assert_eq!(
            Registration::parse(req(1000), 16, 64)
                .unwrap()
                .max_in_flight,
            64
        );
    }

    #[test]
    fn health_follows_heartbeat_age() {
        let mut spoke = SpokeRecord {
            id: Uuid::nil(),
            name: "s".into(),
            labels: BTreeMap::new(),
            capabilities: vec![],
            version: String::new(),
            max_in_flight: 1,
            registered_at: 0,
            revoked_at: None,
            last_heartbeat_at: None,
            last_seen_at: None,
            status: proto::SpokeStatus::Unspecified,
            status_message: String::new(),
            reported_in_flight: 0,
            reported_buffered_points: 0,
            reported_failed_pushes: 0,
            outstanding: 0,
            webhook_url: None,
            last_webhook: None,
        };
        assert_eq!(
            spoke.health(100_000, 10_000, false),
            proto::SpokeHealth::Offline
        );
        assert_eq!(
            spoke.health(100_000, 10_000, true),
            proto::SpokeHealth::Online
        );
        spoke.last_seen_at = Some(80_000);
        assert_eq!(
            spoke.health(100_000, 10_000, false),
            proto::SpokeHealth::Online
        );
        assert_eq!(
            spoke.health(150_000, 10_000, false),
            proto::SpokeHealth::Stale
        );
        assert_eq!(
            spoke.health(181_000, 10_000, false),
            proto::SpokeHealth::Offline
        );
        spoke.revoked_at = Some(1);
        assert_eq!(
            spoke.health(100_000, 10_000, true),
            proto::SpokeHealth::Revoked
        );
    }
}
