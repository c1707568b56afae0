//! Directive handlers: the typed functions a spoke registers per directive
//! type, the [`Context`] each run gets, and the outcome a run produces.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;
use hub_proto::v1 as proto;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::link::Link;
use crate::metrics::{Buffer, Point};
use crate::wire::struct_of_json;

/// The longest error message the hub takes.
const MAX_ERROR_CHARS: usize = 4096;
/// The longest progress message the hub takes.
const MAX_PROGRESS_CHARS: usize = 1024;

/// A handler with its payload and result types erased.
pub(crate) type BoxHandler =
    Arc<dyn Fn(serde_json::Value, Context) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// How a run ended, as recorded locally and acked to the hub.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Done, with a JSON object result.
    Completed(serde_json::Value),
    /// The handler failed.
    Failed(String),
    /// The spoke refuses the directive (no handler, bad payload).
    Rejected(String),
}

impl Outcome {
    /// A handler's `Ok` value as a COMPLETED outcome with a JSON object.
    pub fn completed(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(v @ serde_json::Value::Object(_)) => Self::Completed(v),
            Ok(serde_json::Value::Null) => Self::Completed(serde_json::json!({})),
            Ok(v) => Self::Completed(serde_json::json!({ "value": v })),
            Err(e) => Self::Failed(format!("the handler's result is not JSON: {e}")),
        }
    }

    /// A FAILED outcome; the message is never empty nor too long for the hub.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(error_text(message.into()))
    }

    /// A REJECTED outcome.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::Rejected(error_text(message.into()))
    }

    /// The stored name of the outcome.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Completed(_) => "COMPLETED",
            Self::Failed(_) => "FAILED",
            Self::Rejected(_) => "REJECTED",
        }
    }

    /// The final ack that reports this outcome.
    pub fn ack(&self, directive_id: &str) -> proto::AckRequest {
        let mut ack = proto::AckRequest {
            directive_id: directive_id.to_owned(),
            ..Default::default()
        };
        match self {
            Self::Completed(result) => {
                ack.outcome = proto::AckOutcome::Completed.into();
                ack.result = Some(struct_of_json(result.clone()));
            }
            Self::Failed(error) => {
                ack.outcome = proto::AckOutcome::Failed.into();
                ack.error.clone_from(error);
            }
            Self::Rejected(error) => {
                ack.outcome = proto::AckOutcome::Rejected.into();
                ack.error.clone_from(error);
            }
        }
        ack
    }
}

fn error_text(message: String) -> String {
    let message = message.trim();
    if message.is_empty() {
        return "the handler failed without a message".to_owned();
    }
    truncate(message, MAX_ERROR_CHARS)
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Erases a typed handler: payload decoding, result encoding and error
/// text all happen here.
pub(crate) fn boxed<P, R, E, F, Fut>(handler: F) -> BoxHandler
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Fn(P, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
{
    Arc::new(move |payload, ctx| {
        let payload = match serde_json::from_value::<P>(payload) {
            Ok(p) => p,
            Err(e) => {
                let outcome = Outcome::rejected(format!("payload: {e}"));
                return Box::pin(async move { outcome });
            }
        };
        let run = handler(payload, ctx);
        Box::pin(async move {
            match run.await {
                Ok(result) => Outcome::completed(result),
                Err(e) => Outcome::failed(e.to_string()),
            }
        })
    })
}

/// What a handler knows about the directive it runs, and how it talks back.
///
/// ```no_run
/// # async fn demo() -> Result<(), spoke_client::Error> {
/// use spoke_client::{Client, Context};
///
/// let client = Client::builder("indexer")
///     .endpoint("http://127.0.0.1:50051")
///     .state_dir("./indexer-state")
///     .handler("reindex", "1", |_: serde_json::Value, ctx: Context| async move {
///         for step in 0..10u32 {
///             if ctx.is_cancelled() {
///                 return Err(format!("cancelled at step {step}"));
///             }
///             // ... one step of work ...
///             ctx.progress(step * 10, format!("step {step}")).await.ok();
///         }
///         Ok(serde_json::json!({"directive": ctx.id(), "attempt": ctx.attempt()}))
///     })
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    id: String,
    directive_type: String,
    attempt: u32,
    cancel: Cancel,
    link: Link,
    buffer: Buffer,
    /// The latest progress reported, repeated by [`Context::renew`].
    last_progress: Mutex<(Option<u32>, String)>,
    /// Points recorded while the run is open, written with its outcome;
    /// `None` once the run ended (later points go to the buffer).
    points: Mutex<Option<Vec<Point>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.inner.id)
            .field("directive_type", &self.inner.directive_type)
            .field("attempt", &self.inner.attempt)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Context {
    pub(crate) fn new(
        id: String,
        directive_type: String,
        attempt: u32,
        cancel: Cancel,
        link: Link,
        buffer: Buffer,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                id,
                directive_type,
                attempt,
                cancel,
                link,
                buffer,
                last_progress: Mutex::default(),
                points: Mutex::new(Some(Vec::new())),
            }),
        }
    }

    /// The directive's id (a UUIDv7 string).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The directive's type.
    pub fn directive_type(&self) -> &str {
        &self.inner.directive_type
    }

    /// The hub's delivery number: 1 on the first delivery, higher when the
    /// directive is delivered again (a missed ack deadline, or a rerun after
    /// the spoke restarted mid-run).
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Whether the directive was cancelled (by the hub, or by the client's
    /// shutdown after its grace period).
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.token.is_cancelled()
    }

    /// Completes when the directive is cancelled; use it in `select!`.
    pub async fn cancelled(&self) {
        self.inner.cancel.token.cancelled().await;
    }

    /// Why the directive was cancelled, once it is.
    pub fn cancel_reason(&self) -> Option<String> {
        self.inner.cancel.reason()
    }

    /// Tells the hub the directive is IN_PROGRESS (`percent` 0-100), which
    /// also restarts its ack deadline. Fails with
    /// [`Error::NotConnected`](crate::Error::NotConnected) rather than wait
    /// when no hub is reachable right now.
    pub async fn progress(&self, percent: u32, message: impl Into<String>) -> Result<()> {
        let report = (
            Some(percent.min(100)),
            truncate(&message.into(), MAX_PROGRESS_CHARS),
        );
        *self
            .inner
            .last_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = report.clone();
        self.send_progress(report).await
    }

    /// Records a metric point measured now; never waits. Unlike
    /// [`Client::record`](crate::Client::record), a point recorded while
    /// the run is open is kept with the run and written in the same local
    /// transaction as its outcome: once the outcome is recorded the points
    /// are too, and a run that never records an outcome (the process died,
    /// or shutdown interrupted it: it runs again) keeps none of them, so a
    /// finished run's points are neither lost nor doubled. A run keeps at
    /// most [`max_buffered_points`](crate::ClientBuilder::max_buffered_points)
    /// points (the rest are dropped and counted); a hub-cancelled run's
    /// points are kept too. After the run ended (a task the handler left
    /// behind), points go to the buffer like [`Client::record`](crate::Client::record)'s.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), spoke_client::Error> {
    /// use spoke_client::{Client, Context};
    ///
    /// let client = Client::builder("billing")
    ///     .endpoint("http://127.0.0.1:50051")
    ///     .state_dir("./billing-state")
    ///     .handler("invoice", "1", |_: serde_json::Value, ctx: Context| async move {
    ///         // ... bill the customer ...
    ///         ctx.record("compensation", "invoiced", 1250.0, &[("currency", "EUR")]);
    ///         Ok::<_, String>(()) // the point is durable with this outcome
    ///     })
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn record(&self, domain: &str, name: &str, value: f64, labels: &[(&str, &str)]) {
        let mut point = Point::new(domain, name, value);
        for (k, v) in labels {
            point = point.label(*k, *v);
        }
        self.record_point(point);
    }

    /// Records a [`Point`] (with a unit, labels, a time), kept with the run
    /// like [`Context::record`]'s.
    pub fn record_point(&self, point: Point) {
        let buffer = &self.inner.buffer;
        let mut open = self
            .inner
            .points
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(points) = open.as_mut() else {
            drop(open);
            return buffer.record(point);
        };
        if !buffer.admits(&point) {
            return;
        }
        if (points.len() as u64) < buffer.max_points() {
            points.push(point);
        } else {
            buffer.dropped(1);
        }
    }

    /// Ends the run's keeping of points: answers those recorded so far, to
    /// be written with the outcome; later ones go to the buffer.
    pub(crate) fn take_points(&self) -> Vec<Point> {
        self.inner
            .points
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    }

    /// Repeats the latest progress (or reports IN_PROGRESS without one), so
    /// the hub restarts the ack deadline of a long run.
    pub(crate) async fn renew(&self) -> Result<()> {
        let report = self
            .inner
            .last_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.send_progress(report).await
    }

    async fn send_progress(&self, (progress, message): (Option<u32>, String)) -> Result<()> {
        let ack = proto::AckRequest {
            directive_id: self.inner.id.clone(),
            outcome: proto::AckOutcome::InProgress.into(),
            progress,
            progress_message: message,
            ..Default::default()
        };
        self.inner.link.ack(ack).await.map(drop)
    }
}

/// The cancellation signal of one directive run, with its reason.
#[derive(Clone, Default)]
pub(crate) struct Cancel {
    pub token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Cancel {
    /// A signal that also fires when `parent` fires (client shutdown).
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            reason: Arc::default(),
        }
    }

    /// Fires the signal with `reason` (the first reason wins).
    pub fn fire(&self, reason: impl Into<String>) {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| reason.into());
        self.token.cancel();
    }

    /// The reason given to [`Cancel::fire`], if it fired that way.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_json_objects() {
        assert_eq!(
            Outcome::completed(()),
            Outcome::Completed(serde_json::json!({}))
        );
        assert_eq!(
            Outcome::completed(7),
            Outcome::Completed(serde_json::json!({"value": 7}))
        );
        assert_eq!(
            Outcome::completed(serde_json::json!({"a": 1})),
            Outcome::Completed(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            Outcome::failed("  "),
            Outcome::Failed("the handler failed without a message".into())
        );
        let Outcome::Failed(long) = Outcome::failed("x".repeat(5000)) else {
            panic!()
        };
        assert_eq!(long.len(), MAX_ERROR_CHARS);
    }

    #[tokio::test]
    async fn payloads_are_typed_and_a_mismatch_is_rejected() {
        #[derive(serde::Deserialize)]
        struct Job {
            n: u32,
        }
        let h = boxed(|job: Job, _ctx| async move {
            Ok::<_, String>(serde_json::json!({"twice": job.n * 2}))
        });
        let ctx = || {
            Context::new(
                "id".into(),
                "t".into(),
                1,
                Cancel::default(),
                Link::new(std::time::Duration::from_secs(1)),
                Buffer::detached(),
            )
        };
        assert_eq!(
            h(serde_json::json!({"n": 2}), ctx()).await,
            Outcome::Completed(serde_json::json!({"twice": 4}))
        );
        let Outcome::Rejected(reason) = h(serde_json::json!({"n": "two"}), ctx()).await else {
            panic!("a bad payload is rejected")
        };
        assert!(reason.starts_with("payload: invalid type"), "{reason}");
        let failing = boxed(|_: serde_json::Value, _ctx| async { Err::<(), _>("disk full") });
        assert_eq!(
            failing(serde_json::json!({}), ctx()).await,
            Outcome::Failed("disk full".into())
        );
    }
}
