//! Webhook delivery: for each spoke registered with a webhook URL, a worker
//! POSTs its directives, signed the Standard Webhooks way, and reports each
//! answer to the ledger (see `ledger::webhooks` for what an answer
//! decides).
//!
//! The dispatcher keeps one worker per spoke with webhook delivery. A
//! worker takes one directive at a time while the spoke's window has room
//! and it holds fewer than `per_spoke` requests, each request in a task of
//! its own under a hub-wide bound (`concurrency`); so a spoke whose
//! endpoint hangs holds at most `per_spoke` of the hub's requests, for at
//! most the connect and answer timeouts, and other spokes go on.
//!
//! A 2xx answer may carry the outcome (`{"outcome": "COMPLETED", ...}`):
//! it is applied exactly as an `Ack` from the spoke would be.

mod client;
mod sign;
mod target;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hub_proto::v1 as proto;
use rand::Rng;
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use self::client::{Answer, Client, MAX_ANSWER_BYTES};
pub use self::sign::{new_secret, signature};
pub use self::target::{AddressPolicy, WebhookUrl};
use crate::api::Hub;
use crate::directives::{Ack, DirectiveRecord};
use crate::ledger::WebhookTake;
use crate::spokes::{Webhook, WebhookAttempt};
use crate::telemetry::WebhookLabels;

/// The first retry's delay; each further one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How webhook requests are made (`hub serve --webhook-…`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Time to connect (and finish the TLS handshake).
    pub connect_timeout: Duration,
    /// Time for the answer once connected.
    pub timeout: Duration,
    /// Requests out at once, hub-wide.
    pub concurrency: usize,
    /// Requests out at once to one spoke.
    pub per_spoke: usize,
    /// Link-local and cloud metadata addresses allowed.
    pub allow_link_local: bool,
    /// Trusted beside the system's roots (`--webhook-ca`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// The hub's own ports, refused as webhook targets on this machine
    /// (set by `server::run` from its listeners).
    pub own_ports: Vec<u16>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            concurrency: 64,
            per_spoke: 8,
            allow_link_local: false,
            extra_roots: Vec::new(),
            own_ports: Vec::new(),
        }
    }
}

impl WebhookSettings {
    /// Which addresses webhooks may reach.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy {
            allow_link_local: self.allow_link_local,
            own_ports: self.own_ports.clone(),
        }
    }
}

/// The delay before retrying after failed attempt number `attempt` (1 s,
/// doubling, at most 5 min), with ±20 % jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// Runs the webhook workers until the hub shuts down: one per spoke with
/// webhook delivery, started and stopped as spokes register, change mode,
/// are revoked or deleted.
pub async fn run_dispatcher(hub: Hub) {
    let settings = &hub.settings().webhook;
    let client = Arc::new(Client::new(
        settings.policy(),
        &settings.extra_roots,
        settings.connect_timeout,
        settings.timeout,
    ));
    let overall = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut workers: HashMap<Uuid, JoinHandle<()>> = HashMap::new();
    let mut shutdown = hub.shutdown();
    loop {
        let ledger = hub.ledger().clone();
        let changed = ledger.webhooks_changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let spokes: HashSet<Uuid> = ledger.webhook_spokes().into_iter().collect();
        workers.retain(|id, worker| {
            let keep = spokes.contains(id) && !worker.is_finished();
            if !keep {
                worker.abort();
            }
            keep
        });
        for id in spokes {
            workers.entry(id).or_insert_with(|| {
                tokio::spawn(run_worker(hub.clone(), client.clone(), overall.clone(), id))
            });
        }
        tokio::select! {
            () = changed => {}
            () = shutdown.wait() => break,
        }
    }
    for worker in workers.into_values() {
        worker.abort();
    }
}

/// One spoke's worker: takes its directives one at a time as far as its
/// window and `per_spoke` allow, each request in a task of its own.
async fn run_worker(hub: Hub, client: Arc<Client>, overall: Arc<Semaphore>, spoke_id: Uuid) {
    let Some(wake) = hub.ledger().webhook_attach(spoke_id) else {
        return;
    };
    let per_spoke = Arc::new(Semaphore::new(hub.settings().webhook.per_spoke.max(1)));
    let mut shutdown = hub.shutdown();
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = shutdown.wait() => return,
        }
        loop {
            let Ok(mine) = per_spoke.clone().try_acquire_owned() else {
                break;
            };
            let shared = tokio::select! {
                permit = overall.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = shutdown.wait() => return,
            };
            match hub.ledger().webhook_take(spoke_id, hub.now_ms()) {
                WebhookTake::Stop => return,
                WebhookTake::Idle => break,
                WebhookTake::Post(delivery, webhook) => {
                    let hub = hub.clone();
                    let client = client.clone();
                    let wake = wake.clone();
                    tokio::spawn(async move {
                        let permits = (mine, shared);
                        post(&hub, &client, spoke_id, delivery, &webhook, permits).await;
                        // A request slot is free.
                        wake.notify_one();
                    });
                }
            }
        }
    }
}

/// Sends one directive and reports what came of it.
async fn post(
    hub: &Hub,
    client: &Client,
    spoke_id: Uuid,
    delivery: crate::ledger::Delivery,
    webhook: &Webhook,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let Some((id, attempt)) = delivery.directives.first().map(|d| (d.id, d.attempts)) else {
        return;
    };
    let directive = match crate::api::with_payloads(hub, delivery).await {
        Ok(d) => d.into_iter().next(),
        Err(e) => {
            // Not the spoke's doing: retried, not counted as a request.
            tracing::warn!(error = %e, directive_id = %id, "webhook: cannot read the payload; retried later");
            let wait = i64::try_from(backoff(attempt).as_millis()).unwrap_or(i64::MAX);
            let why = format!("the hub could not read the payload: {e}");
            hub.ledger()
                .webhook_failed(spoke_id, id, attempt, &why, wait, hub.now_ms());
            return;
        }
    };
    let Some(directive) = directive else {
        return;
    };
    let answer = match request(&directive) {
        Ok(body) => {
            let url = match WebhookUrl::parse(&webhook.url) {
                Ok(url) => url,
                Err(e) => {
                    let why = format!("stored URL refused: {e}");
                    return report_failure(hub, spoke_id, id, attempt, "refused", None, why);
                }
            };
            let headers = headers(webhook, &directive, &body, hub.now_ms() / 1000);
            client.post(&url, headers, body).await
        }
        Err(e) => Answer::Connect(format!("cannot encode the directive: {e}")),
    };
    match answer {
        Answer::Http { status, body } if (200..300).contains(&status) => {
            hub.ledger()
                .webhook_delivered(spoke_id, id, attempt, hub.now_ms());
            let error = match body.as_deref().map(outcome_of) {
                None => format!(
                    "the answer was over {MAX_ANSWER_BYTES} bytes or broke off; ack with Ack"
                ),
                Some(Ok(None)) => String::new(),
                Some(Ok(Some(ack))) => apply_outcome(hub, spoke_id, id, ack).await,
                Some(Err(e)) => e,
            };
            if !error.is_empty() {
                tracing::info!(%spoke_id, directive_id = %id, %error, "webhook: outcome not applied");
            }
            record(hub, spoke_id, id, attempt, "delivered", Some(status), error);
        }
        Answer::Http { status, .. } => {
            let why = format!("HTTP {status}");
            report_failure(hub, spoke_id, id, attempt, "http_error", Some(status), why);
        }
        Answer::Timeout(why) => report_failure(hub, spoke_id, id, attempt, "timeout", None, why),
        Answer::Connect(why) => {
            report_failure(hub, spoke_id, id, attempt, "connect_error", None, why);
        }
        Answer::Refused(why) => report_failure(hub, spoke_id, id, attempt, "refused", None, why),
    }
}

/// The body: the directive in proto3 JSON, its payload exactly as created
/// (whole numbers without a fraction).
fn request(directive: &DirectiveRecord) -> crate::error::Result<Bytes> {
    let corrupt =
        |e: serde_json::Error| crate::error::Error::Corrupt(format!("directive JSON: {e}"));
    let mut body = serde_json::to_value(directive.to_proto()?).map_err(corrupt)?;
    body["payload"] = serde_json::from_str(&directive.payload).map_err(corrupt)?;
    serde_json::to_vec(&body).map(Bytes::from).map_err(corrupt)
}

/// The Standard Webhooks headers, and the directive id and attempt.
fn headers(
    webhook: &Webhook,
    directive: &DirectiveRecord,
    body: &[u8],
    now_s: i64,
) -> Vec<(&'static str, String)> {
    let id = directive.id.to_string();
    vec![
        (
            "webhook-signature",
            signature(&webhook.secret, &id, now_s, body),
        ),
        ("webhook-timestamp", now_s.to_string()),
        ("webhook-id", id.clone()),
        ("hub-directive-id", id),
        ("hub-attempt", directive.attempts.to_string()),
    ]
}

/// The outcome a 2xx answer carries, as the Ack it stands for: `None` when
/// the body is not a JSON object with an `outcome`; an error (why it is not
/// applied) when it has one that is not valid.
fn outcome_of(body: &[u8]) -> Result<Option<proto::AckRequest>, String> {
    let Ok(serde_json::Value::Object(mut answer)) = serde_json::from_slice(body) else {
        return Ok(None);
    };
    let Some(outcome) = answer.remove("outcome") else {
        return Ok(None);
    };
    let name = outcome.as_str().unwrap_or_default().to_ascii_uppercase();
    let outcome = match name.trim_start_matches("ACK_OUTCOME_") {
        "IN_PROGRESS" => proto::AckOutcome::InProgress,
        "COMPLETED" => proto::AckOutcome::Completed,
        "FAILED" => proto::AckOutcome::Failed,
        "REJECTED" => proto::AckOutcome::Rejected,
        _ => {
            return Err(format!(
                "outcome {outcome}: must be IN_PROGRESS, COMPLETED, FAILED or REJECTED"
            ));
        }
    };
    let result = match answer.remove("result") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(map)) => {
            hub_proto::json::from_json(serde_json::Value::Object(map))
        }
        Some(_) => return Err("result: must be a JSON object".to_owned()),
    };
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s,
        _ => String::new(),
    };
    let progress = match answer.remove("progress") {
        None | Some(serde_json::Value::Null) => None,
        Some(p) => Some(
            p.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or("progress: must be a whole number from 0 to 100")?,
        ),
    };
    Ok(Some(proto::AckRequest {
        directive_id: String::new(),
        outcome: outcome.into(),
        result,
        error: text(answer.remove("error")),
        progress,
        progress_message: text(answer.remove("message")),
    }))
}

/// Applies an outcome from an answer as the spoke's ack; answers why not,
/// or an empty string.
async fn apply_outcome(hub: &Hub, spoke_id: Uuid, id: Uuid, mut ack: proto::AckRequest) -> String {
    ack.directive_id = id.to_string();
    let ack = match Ack::try_from(ack) {
        Ok(ack) => ack,
        Err(e) => return format!("outcome refused: {e}"),
    };
    match crate::api::apply_ack(hub, spoke_id, ack).await {
        Ok(_) => String::new(),
        Err(e) => format!("outcome refused: {e}"),
    }
}

fn report_failure(
    hub: &Hub,
    spoke_id: Uuid,
    id: Uuid,
    attempt: u32,
    result: &'static str,
    status: Option<u16>,
    why: String,
) {
    let wait = backoff(attempt);
    tracing::info!(%spoke_id, directive_id = %id, attempt, result, error = %why, retry_in = ?wait, "webhook request failed");
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    hub.ledger()
        .webhook_failed(spoke_id, id, attempt, &why, wait_ms, hub.now_ms());
    record(hub, spoke_id, id, attempt, result, status, why);
}

fn record(
    hub: &Hub,
    spoke_id: Uuid,
    directive_id: Uuid,
    attempt: u32,
    result: &'static str,
    http_status: Option<u16>,
    error: String,
) {
    hub.telemetry()
        .webhook_attempts
        .get_or_create(&WebhookLabels { result })
        .inc();
    hub.ledger().webhook_attempted(
        spoke_id,
        WebhookAttempt {
            at: hub.now_ms(),
            directive_id,
            attempt,
            result,
            http_status,
            error,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_with_jitter() {
        for (attempt, base) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (9, 256.0),
            (10, 300.0),
            (40, 300.0),
        ] {
            let wait = backoff(attempt).as_secs_f64();
            assert!(
                (base * 0.8..=base * 1.2).contains(&wait),
                "attempt {attempt}: {wait} s, expected {base} s ± 20 %"
            );
        }
    }

    #[test]
    fn an_answer_carries_an_outcome_or_not() {
        assert!(outcome_of(b"").unwrap().is_none());
        assert!(outcome_of(b"ok").unwrap().is_none());
        assert!(outcome_of(br#"{"received": true}"#).unwrap().is_none());
        let done = outcome_of(br#"{"outcome": "COMPLETED", "result": {"n": 3}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(done.outcome, proto::AckOutcome::Completed as i32);
        assert!(done.result.unwrap().fields.contains_key("n"));
        let failed = outcome_of(br#"{"outcome": "ack_outcome_failed", "error": "disk full"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(failed.outcome, proto::AckOutcome::Failed as i32);
        assert_eq!(failed.error, "disk full");
        let working = outcome_of(br#"{"outcome": "IN_PROGRESS", "progress": 40, "message": "m"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (working.progress, working.progress_message.as_str()),
            (Some(40), "m")
        );
        assert!(outcome_of(br#"{"outcome": "DONE"}"#).is_err());
        assert!(outcome_of(br#"{"outcome": "COMPLETED", "result": [1]}"#).is_err());
        assert!(outcome_of(br#"{"outcome": "IN_PROGRESS", "progress": -1}"#).is_err());
    }
}
