//! Lifecycle events out to NATS JetStream (`--events-nats-url`): every
//! event in the log is published, in sequence order, to
//! `<prefix>.<kind>` (e.g. `hub.events.directive.completed`) as a
//! CloudEvents 1.0 JSON envelope whose `id` is the event's sequence, with
//! `Nats-Msg-Id` set to the sequence too.
//!
//! Nothing is lost and nothing doubled for a consumer: the publisher reads
//! the stored log after a durable cursor (the last sequence JetStream
//! acknowledged, kept in the hub's database by the group commit) and
//! resumes from it after a restart or an outage. A resumed publisher
//! first reads the message id of the stream's last message: when the hub
//! died after JetStream stored messages but before their mark was
//! committed, it goes on after them. Each publish carries
//! `Nats-Expected-Last-Msg-Id` (the previous sequence), so the stream
//! refuses a message that would land out of order or after a gap (the
//! publisher then starts again from the cursor), and the stream's
//! duplicate window drops a message published twice.
//!
//! It runs on the leading hub only (on PostgreSQL the leader lock makes
//! it one publisher across replicas; a new leader resumes from the
//! cursor), never holds up a call (it reads the store like any reader and
//! its mark is written with the next commit, waited for by nobody), and
//! retries with backoff while NATS is away. Events that retention removed
//! before they were published are reported loudly (an error line and
//! `hub_events_nats_skipped_total`), never passed over in silence.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use serde_json::json;

use crate::api::Hub;
use crate::events::EventFilter;
use crate::events::EventRecord;

/// Events read from the store and published per round.
const PAGE: u32 = 256;
/// Longest pause between attempts while NATS is away.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long JetStream drops a message id it has seen (the server's
/// default too).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How the hub publishes its events to NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// The server(s): `nats://host:4222`, `tls://…`, comma-separated.
    pub url: String,
    /// Subjects are `<prefix>.<kind>`.
    pub subject_prefix: String,
    /// The JetStream stream that takes `<prefix>.>`.
    pub stream: String,
    /// Create the stream (file storage) when it does not exist.
    pub create_stream: bool,
    /// The CloudEvents `source`: the hub's configured name.
    pub source: String,
    /// A NATS credentials file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A token.
    pub token: Option<String>,
    /// CA certificates (PEM) to trust for TLS, beside the system's.
    pub tls_ca: Option<PathBuf>,
}

/// What the publisher is doing, for `/metrics` and the admin page.
#[derive(Debug, Default)]
pub struct PublisherStatus {
    inner: Mutex<PublisherState>,
}

/// A snapshot of [`PublisherStatus`].
#[derive(Debug, Clone, Default)]
pub struct PublisherState {
    /// Connected to NATS with the stream found or made.
    pub connected: bool,
    /// The highest sequence JetStream acknowledged, with all before it.
    pub published: i64,
    /// Events retention removed before they were published.
    pub skipped: u64,
    /// Why the latest attempt failed, while it has not recovered.
    pub last_error: Option<String>,
}

impl PublisherStatus {
    /// The state now.
    pub fn get(&self) -> PublisherState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PublisherState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a round of publishing stopped.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("connecting to NATS: {0}")]
    Connect(String),
    #[error("JetStream stream {stream}: {why}")]
    Stream { stream: String, why: String },
    #[error("reading the event log: {0}")]
    Store(#[from] crate::Error),
    #[error("publishing event {seq}: {why}")]
    Publish { seq: i64, why: String },
}

/// The subject kind of an event: `DIRECTIVE_COMPLETED` becomes
/// `directive.completed`, `SPOKE_HEALTH_CHANGED` `spoke.health_changed`.
pub fn kind_token(kind: crate::events::Kind) -> String {
    let name = kind.as_str().to_ascii_lowercase();
    match name.split_once('_') {
        Some((what, change)) => format!("{what}.{change}"),
        None => name,
    }
}

/// The CloudEvents 1.0 JSON envelope of `event`.
pub fn envelope(event: &EventRecord, source: &str) -> crate::Result<Vec<u8>> {
    let data = serde_json::to_value(event.to_proto()?)
        .map_err(|e| crate::Error::Corrupt(format!("event {}: {e}", event.seq)))?;
    let time = chrono::DateTime::from_timestamp_millis(event.time)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let subject = event.directive_id.as_ref().or(event.spoke_id.as_ref());
    let mut envelope = json!({
        "specversion": "1.0",
        "id": event.seq.to_string(),
        "source": source,
        "type": format!("hub.v1.{}", kind_token(event.kind)),
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(subject) = subject {
        envelope["subject"] = json!(subject);
    }
    Ok(envelope.to_string().into_bytes())
}

/// Publishes the event log to NATS JetStream until the hub stops (see the
/// module's doc); returns at once when `--events-nats-url` is not set.
pub async fn run_publisher(hub: Hub) {
    let Some(settings) = hub.settings().nats.clone() else {
        return;
    };
    let mut shutdown = hub.shutdown();
    // What /metrics and the admin page show before NATS first answers.
    if let Ok(published) = hub.store().published_events(&settings.stream).await {
        hub.publisher().lock().published = published;
    }
    let mut backoff = Duration::from_millis(500);
    loop {
        let before = hub.publisher().get().published;
        let outcome = tokio::select! {
            outcome = publish(&hub, &settings) => outcome,
            () = shutdown.wait() => return,
        };
        let Err(e) = outcome;
        let (first, progressed) = {
            let mut state = hub.publisher().lock();
            state.connected = false;
            (
                state.last_error.replace(e.to_string()).is_none(),
                state.published > before,
            )
        };
        // Back off from the start again only after a round that got on.
        if progressed {
            backoff = Duration::from_millis(500);
        }
        if first {
            tracing::warn!(error = %e, "publishing events to NATS failed; retrying");
        } else {
            tracing::debug!(error = %e, "publishing events to NATS failed again");
        }
        hub.telemetry().events_nats_connected.set(0);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(settings: &NatsSettings) -> Result<async_nats::Client, PublishError> {
    let connect_error = |e: &dyn std::fmt::Display| PublishError::Connect(e.to_string());
    let mut options = async_nats::ConnectOptions::new()
        .name("hub")
        .connection_timeout(Duration::from_secs(5));
    if let Some(path) = &settings.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| connect_error(&format!("{}: {e}", path.display())))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &settings.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    options
        .connect(settings.url.as_str())
        .await
        .map_err(|e| connect_error(&e))
}

/// Where a stream stands when publishing (re)starts.
struct StreamEnd {
    /// The stream's last sequence: the next message gets the one after.
    last_sequence: u64,
    /// The event the last message carries; `None` when the stream is
    /// empty, or its last message is not one of this hub's events (or
    /// could not be read).
    last_event: Option<i64>,
    /// Whether the last message is known: the stream is empty or its last
    /// message is one of this hub's events. Only then is each publish
    /// sent with the stream sequence it must follow.
    known: bool,
}

/// Finds (or makes) the stream and reads where it ends.
async fn open_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
) -> Result<StreamEnd, PublishError> {
    let stream_error = |why: String| PublishError::Stream {
        stream: settings.stream.clone(),
        why,
    };
    let mut stream = if settings.create_stream {
        js.get_or_create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: vec![format!("{}.>", settings.subject_prefix)],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| stream_error(e.to_string()))?
    } else {
        js.get_stream(&settings.stream).await.map_err(|e| {
            stream_error(format!(
                "{e} (--events-nats-create-stream is off: create it with subjects {}.>)",
                settings.subject_prefix
            ))
        })?
    };
    let state = stream
        .info()
        .await
        .map_err(|e| stream_error(e.to_string()))?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(StreamEnd {
            last_sequence: state.last_sequence,
            last_event: None,
            known: true,
        });
    }
    let last_event = match stream.get_raw_message(state.last_sequence).await {
        Ok(last) => last
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .and_then(|id| id.as_str().parse::<i64>().ok()),
        Err(e) => {
            tracing::warn!(stream = %settings.stream, error = %e, "cannot read the stream's last message");
            None
        }
    };
    if last_event.is_none() {
        tracing::warn!(stream = %settings.stream, "the stream's last message is not one of this hub's events; publishing without ordering checks until one is");
    }
    Ok(StreamEnd {
        last_sequence: state.last_sequence,
        last_event,
        known: last_event.is_some(),
    })
}

/// One connection's worth of publishing: returns only when it fails.
async fn publish(
    hub: &Hub,
    settings: &NatsSettings,
) -> Result<std::convert::Infallible, PublishError> {
    let client = connect(settings).await?;
    let js = jetstream::new(client);
    let end = open_stream(&js, settings).await?;
    let stream_name: Arc<str> = settings.stream.as_str().into();
    let store = hub.store();
    let stored = store.published_events(&settings.stream).await?;
    let mut cursor = stored;
    match end.last_event {
        // JetStream holds messages whose mark was lost with a killed hub:
        // go on after them.
        Some(last) if last > cursor => {
            tracing::info!(
                mark = cursor,
                last,
                "the stream holds events past the stored mark; resuming after them"
            );
            cursor = last;
            hub.ledger().events_published(stream_name.clone(), cursor);
        }
        // The stream lost messages it had acknowledged: send them again.
        Some(last) if last < cursor => {
            tracing::warn!(
                from = last + 1,
                to = cursor,
                "the stream lost events it had acknowledged; publishing them again"
            );
            cursor = last;
        }
        _ => {}
    }
    // The stream sequence each publish must follow, so that nothing lands
    // out of order or after a gap (a refusal starts publishing over).
    let mut follows = end.known.then_some(end.last_sequence);
    {
        let mut state = hub.publisher().lock();
        state.connected = true;
        state.last_error = None;
        state.published = cursor.max(stored);
    }
    hub.telemetry().events_nats_connected.set(1);
    tracing::info!(stream = %settings.stream, after = cursor, "publishing events to NATS JetStream");
    let mut committed = store.committed_events();
    let all = EventFilter::default();
    loop {
        let upto = *committed.borrow_and_update();
        while cursor < upto {
            let page = store.events_between(cursor, upto, &all, PAGE).await?;
            let first = page.first().map_or(upto + 1, |e| e.seq);
            if first > cursor + 1 {
                // Retention removed them before they were published.
                let missed = first.min(upto + 1) - cursor - 1;
                tracing::error!(
                    from = cursor + 1,
                    to = cursor + missed,
                    "events were removed by retention before they were published to NATS: consumers will not see them"
                );
                hub.telemetry().events_nats_skipped.inc_by(missed as u64);
                hub.publisher().lock().skipped += missed as u64;
                cursor += missed;
                hub.ledger().events_published(stream_name.clone(), cursor);
            }
            let mut acks = Vec::with_capacity(page.len());
            for event in &page {
                let subject = format!("{}.{}", settings.subject_prefix, kind_token(event.kind));
                let mut message = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(envelope(event, &settings.source)?))
                    .message_id(event.seq.to_string());
                if let Some(last) = follows {
                    message = message.expected_last_sequence(last);
                    follows = Some(last + 1);
                }
                let sent = js.send_publish(subject, message).await;
                let ack = sent.map_err(|e| PublishError::Publish {
                    seq: event.seq,
                    why: e.to_string(),
                })?;
                acks.push((event.seq, ack));
            }
            let mut failed = None;
            for (seq, ack) in acks {
                match ack.await {
                    Ok(ack) => {
                        cursor = seq;
                        // Where the stream really is (a message it dropped
                        // as a duplicate took no sequence).
                        if follows.is_some() || ack.sequence > 0 {
                            follows = Some(ack.sequence);
                        }
                    }
                    Err(e) => {
                        let why = match e.kind() {
                            PublishErrorKind::WrongLastSequence => format!(
                                "{e}: the stream does not end where this hub left it; starting again from the stored mark"
                            ),
                            _ => e.to_string(),
                        };
                        failed = Some(PublishError::Publish { seq, why });
                        break;
                    }
                }
            }
            if cursor > stored {
                hub.ledger().events_published(stream_name.clone(), cursor);
            }
            hub.publisher().lock().published = cursor.max(stored);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        if committed.changed().await.is_err() {
            // The store is closing: the hub stops.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Kind;

    #[test]
    fn subjects_name_the_kind_in_two_tokens() {
        assert_eq!(kind_token(Kind::DirectiveCompleted), "directive.completed");
        assert_eq!(kind_token(Kind::SpokeHealthChanged), "spoke.health_changed");
        assert_eq!(kind_token(Kind::MetricsReceived), "metrics.received");
    }

    #[test]
    fn the_envelope_is_a_cloud_event_of_the_proto_json() {
        let event = EventRecord {
            seq: 42,
            kind: Kind::DirectiveCompleted,
            time: 1_800_000_000_123,
            spoke_id: Some("0190a2b4-0000-7000-8000-000000000001".into()),
            directive_id: Some("0190a2b4-0000-7000-8000-000000000002".into()),
            details: r#"{"attempt":1}"#.into(),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&envelope(&event, "eu-west").unwrap()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], "42");
        assert_eq!(json["source"], "eu-west");
        assert_eq!(json["type"], "hub.v1.directive.completed");
        assert_eq!(json["time"], "2027-01-15T08:00:00.123Z");
        assert_eq!(json["subject"], "0190a2b4-0000-7000-8000-000000000002");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["data"]["sequence"], "42");
        assert_eq!(json["data"]["type"], "EVENT_TYPE_DIRECTIVE_COMPLETED");
        assert_eq!(
            json["data"]["directiveId"],
            "0190a2b4-0000-7000-8000-000000000002"
        );
        // A spoke's event names the spoke.
        let spoke = EventRecord {
            directive_id: None,
            kind: Kind::SpokeRegistered,
            ..event
        };
        let json: serde_json::Value =
            serde_json::from_slice(&envelope(&spoke, "eu-west").unwrap()).unwrap();
        assert_eq!(json["subject"], "0190a2b4-0000-7000-8000-000000000001");
        assert_eq!(json["type"], "hub.v1.spoke.registered");
    }
}
