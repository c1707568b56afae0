//! What the client tells an observer set with
//! [`ClientBuilder::on_event`](crate::ClientBuilder::on_event): each
//! registration with the hub, each outcome recorded, each redelivery
//! answered from the record.

use std::sync::Arc;

/// The observer set with [`ClientBuilder::on_event`](crate::ClientBuilder::on_event).
pub(crate) type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Calls `observer`, if there is one, with `event`.
pub(crate) fn tell(observer: Option<&Observer>, event: Event) {
    if let Some(observer) = observer {
        observer(&event);
    }
}

/// Something the client did, reported to the observer set with
/// [`ClientBuilder::on_event`](crate::ClientBuilder::on_event).
///
/// ```no_run
/// # async fn demo() -> Result<(), spoke_client::Error> {
/// use spoke_client::Event;
///
/// let client = spoke_client::Client::builder("audited")
///     .endpoint("http://127.0.0.1:50051")
///     .state_dir("./audited-state")
///     .on_event(|event: &Event| match event {
///         Event::Registered { spoke_id, new, .. } => println!("registered as {spoke_id} (new: {new})"),
///         Event::Finished { id, outcome, .. } => println!("{id}: {outcome}"),
///         Event::Redelivered { id, .. } => println!("{id}: acked again from the record"),
///         _ => {}
///     })
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The hub accepted a `Register` call: on every connection, before the
    /// directive stream opens.
    #[non_exhaustive]
    Registered {
        /// The spoke's id on the hub.
        spoke_id: String,
        /// Registered with the enrollment token, and the key the reply
        /// carries (the one this client proposed, or an older hub's own) is
        /// now kept in the state directory; `false` when the stored key
        /// re-registered the spoke.
        new: bool,
    },
    /// A run ended and its outcome is now recorded in the state directory,
    /// with the metric points the run recorded; the ack is sent after the
    /// observer returns. Also reported for
    /// directives no handler runs: a type without a handler, or a payload
    /// that does not deserialize (both REJECTED).
    #[non_exhaustive]
    Finished {
        /// The directive's id.
        id: String,
        /// Its type.
        directive_type: String,
        /// `"COMPLETED"`, `"FAILED"` or `"REJECTED"`.
        outcome: &'static str,
    },
    /// The hub delivered again a directive that already finished here: the
    /// recorded outcome is acked again and nothing runs.
    #[non_exhaustive]
    Redelivered {
        /// The directive's id.
        id: String,
        /// The hub's delivery number.
        attempt: u32,
    },
}
