//! Acks, unary and streamed. Both go through [`apply_ack`]: the ledger
//! decides, the answer waits for the commit. On `AckStream` every message
//! is decided as it arrives, in order, and answered in the same order once
//! its commit is done, so acks from one stream share commits.

use std::pin::Pin;

use hub_proto::v1 as proto;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::Hub;
use crate::directives::{Ack, AckApplied};
use crate::error::{Error, Result};
use crate::ledger::{self, AckStep, Committed};
use crate::limits;
use crate::telemetry::OutcomeLabels;

/// Acks decided and not yet answered, per stream: how far a spoke may run
/// ahead of the commits.
const ACKS_IN_FLIGHT: usize = 1024;
/// Answers buffered per stream before the hub waits for the spoke to read.
const ANSWER_BUFFER: usize = 256;

/// The answers of one AckStream.
pub type AckAnswers = Pin<Box<dyn Stream<Item = Result<proto::AckStreamResponse, Status>> + Send>>;

/// An ack decided by the ledger, waiting for what its answer depends on.
enum Decided {
    /// Logged: answered once committed.
    Logged(AckApplied, Committed),
    /// Not outstanding: the store answers after a barrier.
    Unknown(Ack),
    /// Refused at once.
    Failed(Error),
}

/// Decides an ack against the ledger (the order of calls is the order of
/// decisions).
fn decide(hub: &Hub, spoke_id: Uuid, ack: Ack) -> Decided {
    match hub.ledger().ack(spoke_id, &ack, hub.now_ms()) {
        Ok(AckStep::Logged(applied, done)) => Decided::Logged(applied, done),
        Ok(AckStep::Unknown) => Decided::Unknown(ack),
        Err(e) => Decided::Failed(e),
    }
}

/// Waits for what a decided ack depends on; counts it.
async fn settle(hub: &Hub, spoke_id: Uuid, decided: Decided) -> Result<AckApplied> {
    let applied = match decided {
        Decided::Logged(applied, done) => {
            ledger::committed(done).await?;
            applied
        }
        Decided::Unknown(ack) => answer_from_store(hub, spoke_id, &ack).await?,
        Decided::Failed(e) => return Err(e),
    };
    let outcome = match applied.state {
        crate::directives::State::InProgress => "in_progress",
        crate::directives::State::Completed => "completed",
        crate::directives::State::Failed => "failed",
        _ => "rejected",
    };
    hub.telemetry()
        .acks
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    Ok(applied)
}

/// Applies one ack with the rules of the contract; answered after its
/// commit.
pub async fn apply_ack(hub: &Hub, spoke_id: Uuid, ack: Ack) -> Result<AckApplied> {
    let decided = decide(hub, spoke_id, ack);
    settle(hub, spoke_id, decided).await
}

/// An ack of a directive the ledger does not hold: final, another spoke's,
/// or unknown. Answered from the store once everything logged so far is
/// committed.
async fn answer_from_store(hub: &Hub, spoke_id: Uuid, ack: &Ack) -> Result<AckApplied> {
    let id = ack.directive_id;
    hub.ledger().barrier().await?;
    let wanted = ack.outcome.state();
    match hub.store().directive_state(id).await? {
        Some((owner, state)) if owner == spoke_id => {
            if state == wanted && state.is_final() {
                Ok(AckApplied {
                    state,
                    duplicate: true,
                })
            } else {
                Err(Error::FailedPrecondition(format!(
                    "directive {id} is {}: it can no longer be acked as {}",
                    state.as_str(),
                    wanted.as_str()
                )))
            }
        }
        _ => Err(Error::NotFound(format!("directive {id} not found"))),
    }
}

/// The wire form of an applied ack.
pub fn ack_response(applied: AckApplied) -> proto::AckResponse {
    proto::AckResponse {
        state: applied.state.to_proto().into(),
        duplicate: applied.duplicate,
    }
}

/// The wire form of one item's error: the status a single call would
/// answer (database details stay in the log, as for any call).
pub fn item_error(e: Error) -> proto::ItemError {
    let status = Status::from(e);
    proto::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// Serves one AckStream: a reader decides each ack as it arrives, an
/// answerer sends the answers in the same order as their commits finish.
/// Every ack is checked against the key the stream opened with: once it
/// is revoked or rotated, the stream ends UNAUTHENTICATED, as a unary Ack
/// with it would be refused.
pub fn ack_stream(
    hub: Hub,
    spoke_id: Uuid,
    key_hash: String,
    incoming: Streaming<proto::AckRequest>,
) -> AckAnswers {
    let (decided_tx, decided_rx) = mpsc::channel(ACKS_IN_FLIGHT);
    let (tx, rx) = mpsc::channel(ANSWER_BUFFER);
    let reader = Reader {
        hub: hub.clone(),
        spoke_id,
        key_hash,
    };
    tokio::spawn(reader.run(incoming, decided_tx));
    tokio::spawn(answer_acks(hub, spoke_id, decided_rx, tx));
    Box::pin(ReceiverStream::new(rx))
}

/// What the reader hands the answerer, in arrival order.
enum Next {
    Ack(String, Decided),
    /// The stream broke: end it with this status after the answers so far.
    End(Status),
}

/// Reads and decides the acks of one stream.
struct Reader {
    hub: Hub,
    spoke_id: Uuid,
    key_hash: String,
}

impl Reader {
    async fn run(self, mut incoming: Streaming<proto::AckRequest>, decided: mpsc::Sender<Next>) {
        let Self {
            hub,
            spoke_id,
            key_hash,
        } = self;
        let mut shutdown = hub.shutdown();
        loop {
            let msg = tokio::select! {
                msg = incoming.message() => msg,
                () = shutdown.wait() => {
                    let status = Status::unavailable("hub is shutting down; acks without an answer may not be committed: send them again");
                    let _ = decided.send(Next::End(status)).await;
                    return;
                }
                () = decided.closed() => return,
            };
            let next = match msg {
                Ok(Some(req)) => match hub.check_key(&key_hash, spoke_id) {
                    Err(e) => Next::End(e.into()),
                    Ok(()) => {
                        let id = req.directive_id.clone();
                        match Ack::try_from(req) {
                            Ok(ack) => Next::Ack(id, decide(&hub, spoke_id, ack)),
                            Err(e) => Next::Ack(id, Decided::Failed(e)),
                        }
                    }
                },
                Ok(None) => return,
                Err(status) => Next::End(limits::map_status(status)),
            };
            let end = matches!(next, Next::End(_));
            if decided.send(next).await.is_err() || end {
                return;
            }
        }
    }
}

async fn answer_acks(
    hub: Hub,
    spoke_id: Uuid,
    mut decided: mpsc::Receiver<Next>,
    tx: mpsc::Sender<Result<proto::AckStreamResponse, Status>>,
) {
    use proto::ack_stream_response::Outcome;
    while let Some(next) = decided.recv().await {
        let answer = match next {
            Next::Ack(directive_id, decided) => {
                let outcome = match settle(&hub, spoke_id, decided).await {
                    Ok(applied) => Outcome::Ack(ack_response(applied)),
                    Err(e) => Outcome::Error(item_error(e)),
                };
                Ok(proto::AckStreamResponse {
                    directive_id,
                    outcome: Some(outcome),
                })
            }
            Next::End(status) => Err(status),
        };
        if tx.send(answer).await.is_err() {
            return;
        }
    }
}
