//! Acks over one `AckStream` per connection. A task owns the stream (an
//! actor): final acks, progress reports, renewals and resends from every
//! handler queue on its bounded channel; it sends each as a message and,
//! since the hub answers every message in the order sent, hands each answer
//! to the oldest caller still waiting.
//!
//! The stream opens with the connection's first ack. A hub without the
//! method (an older hub answers UNIMPLEMENTED) gets unary `Ack` calls for
//! the rest of the connection; the next connection tries the stream again,
//! since the next endpoint may be newer. When the stream breaks, every ack
//! still unanswered fails with UNAVAILABLE: it may or may not be committed,
//! and its caller treats it like any ack that failed in transit (a final
//! one stays FINISHED and is sent again after reconnecting; the hub answers
//! a repeated final ack as a duplicate). The next ack opens a new stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hub_proto::v1 as proto;
use hub_proto::v1::ack_stream_response::Outcome as Answered;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status, Streaming};

use crate::error::{Error, Result};
use crate::link::Rpc;

/// Acks queued for the actor.
const QUEUE: usize = 256;
/// Acks sent on the stream and not answered yet. Beyond this the actor
/// reads answers before it sends more, so its outgoing buffer (this size)
/// never fills.
const UNANSWERED: usize = 256;

/// What a caller of [`Acks::send`] is told.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The hub's answer: the result, or the status unary `Ack` would have
    /// answered (or why no answer came).
    Hub(Result<proto::AckResponse>),
    /// This hub has no `AckStream`: send the ack with unary `Ack`.
    Unary(proto::AckRequest),
}

/// An ack waiting for the actor.
struct Queued {
    ack: proto::AckRequest,
    reply: oneshot::Sender<Answer>,
}

/// The ack stream of one connection; cheap to clone. The actor ends once
/// every handle is gone, after the answers still due (or the timeout).
#[derive(Clone)]
pub(crate) struct Acks {
    queue: mpsc::Sender<Queued>,
    /// Set once the hub answered UNIMPLEMENTED: skip the actor.
    unary: Arc<AtomicBool>,
}

impl Acks {
    /// Starts the actor for the connection `rpc`; `timeout` bounds opening
    /// the stream and the wait for the last answers.
    pub fn spawn(rpc: Rpc, timeout: Duration) -> Self {
        let (queue, inbox) = mpsc::channel(QUEUE);
        let unary = Arc::new(AtomicBool::new(false));
        let actor = Actor {
            rpc,
            inbox,
            unary: unary.clone(),
            timeout,
        };
        tokio::spawn(actor.run());
        Self { queue, unary }
    }

    /// Sends `ack` on the stream and waits for its answer.
    pub async fn send(&self, ack: proto::AckRequest) -> Answer {
        if self.unary.load(Ordering::Relaxed) {
            return Answer::Unary(ack);
        }
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Queued { ack, reply }).await.is_err() {
            return Answer::Hub(Err(Error::NotConnected));
        }
        answer
            .await
            .unwrap_or(Answer::Hub(Err(Error::NotConnected)))
    }
}

/// The task that owns the stream.
struct Actor {
    rpc: Rpc,
    inbox: mpsc::Receiver<Queued>,
    unary: Arc<AtomicBool>,
    timeout: Duration,
}

/// A caller waiting for its answer.
struct Waiter {
    /// The directive it acked: the answer must name it.
    id: String,
    reply: oneshot::Sender<Answer>,
    /// The ack itself, kept while the stream is opening: a hub without
    /// one hands it back to be sent with unary `Ack`.
    kept: Option<proto::AckRequest>,
}

/// The call, until the hub answers its headers; then the answers.
type Opening =
    Pin<Box<dyn Future<Output = Result<Streaming<proto::AckStreamResponse>, Status>> + Send>>;

/// Where a stream's answers come from.
enum Answers {
    Opening(Opening),
    Open(Box<Streaming<proto::AckStreamResponse>>),
}

/// A stream, opening or open. Acks are sent as soon as they come, even
/// before the hub answers the headers.
struct Stream {
    /// Closed (`None`) to end the stream after the last ack.
    out: Option<mpsc::Sender<proto::AckRequest>>,
    answers: Answers,
    /// Sent and not answered, oldest first: the order answers come in.
    waiting: VecDeque<Waiter>,
}

/// What the stream did.
enum Event {
    Opened(Result<Streaming<proto::AckStreamResponse>, Status>),
    Answer(Result<Option<proto::AckStreamResponse>, Status>),
}

/// Why a stream is over.
enum End {
    /// The hub has no AckStream; its acks went back to their callers.
    Unimplemented,
    /// Broken or ended; its unanswered acks failed with this status.
    Broken(Status),
}

/// What the actor does next while a stream exists.
enum Step {
    Send(Queued),
    Event(Event),
    /// Every handle is gone: the connection ended.
    Close,
}

impl Actor {
    async fn run(mut self) {
        let mut stream: Option<Stream> = None;
        loop {
            let Some(current) = stream.as_mut() else {
                let Some(first) = self.inbox.recv().await else {
                    return;
                };
                let mut opening = self.open();
                opening.send(first);
                stream = Some(opening);
                continue;
            };
            let room = current.waiting.len() < UNANSWERED;
            let step = tokio::select! {
                next = self.inbox.recv(), if room => next.map_or(Step::Close, Step::Send),
                event = current.event() => Step::Event(event),
            };
            match step {
                Step::Send(queued) => current.send(queued),
                Step::Event(event) => match current.handle(event) {
                    Ok(()) => {}
                    Err(End::Unimplemented) => {
                        tracing::info!(
                            "the hub has no AckStream (an older hub): acking with unary Ack on this connection"
                        );
                        self.unary.store(true, Ordering::Relaxed);
                        return self.bounce().await;
                    }
                    Err(End::Broken(why)) => {
                        tracing::debug!(error = %why, "ack stream ended; the next ack opens another");
                        stream = None;
                    }
                },
                Step::Close => {
                    if let Some(last) = stream.take() {
                        last.finish(self.timeout).await;
                    }
                    return;
                }
            }
        }
    }

    /// Starts opening a stream.
    fn open(&self) -> Stream {
        let (out, mut outgoing) = mpsc::channel(UNANSWERED);
        let requests = futures_util::stream::poll_fn(move |cx| outgoing.poll_recv(cx));
        let (mut rpc, timeout) = (self.rpc.clone(), self.timeout);
        let opening = async move {
            match tokio::time::timeout(timeout, rpc.ack_stream(requests)).await {
                Ok(opened) => opened.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "the hub did not open the ack stream within {timeout:?}"
                ))),
            }
        };
        Stream {
            out: Some(out),
            answers: Answers::Opening(Box::pin(opening)),
            waiting: VecDeque::new(),
        }
    }

    /// After UNIMPLEMENTED: hands every ack still queued back to be sent
    /// with unary `Ack`, until the connection ends.
    async fn bounce(mut self) {
        while let Some(queued) = self.inbox.recv().await {
            let _ = queued.reply.send(Answer::Unary(queued.ack));
        }
    }
}

impl Stream {
    fn send(&mut self, queued: Queued) {
        let kept = matches!(self.answers, Answers::Opening(_)).then(|| queued.ack.clone());
        let id = queued.ack.directive_id.clone();
        // Never full: what it holds is also in `waiting`, which is bounded
        // by its size. Closed only when the call is over; its answers then
        // end too, and fail the others.
        let sent = match &self.out {
            Some(out) => out.try_send(queued.ack).is_ok(),
            None => false,
        };
        if sent {
            self.waiting.push_back(Waiter {
                id,
                reply: queued.reply,
                kept,
            });
        } else {
            let closed = Status::unavailable("the ack stream ended before this ack was sent");
            let _ = queued.reply.send(Answer::Hub(Err(closed.into())));
        }
    }

    /// The next thing the stream does (cancel-safe).
    async fn event(&mut self) -> Event {
        match &mut self.answers {
            Answers::Opening(opening) => Event::Opened(opening.await),
            Answers::Open(answers) => Event::Answer(answers.message().await),
        }
    }

    /// Acts on `event`; `Err` when the stream is over.
    fn handle(&mut self, event: Event) -> Result<(), End> {
        let next = match event {
            Event::Opened(Ok(answers)) => {
                self.answers = Answers::Open(Box::new(answers));
                for waiter in &mut self.waiting {
                    waiter.kept = None;
                }
                return Ok(());
            }
            Event::Opened(Err(status)) if status.code() == Code::Unimplemented => {
                // Never dispatched: nothing of it was applied.
                for waiter in self.waiting.drain(..) {
                    if let Some(ack) = waiter.kept {
                        let _ = waiter.reply.send(Answer::Unary(ack));
                    }
                }
                return Err(End::Unimplemented);
            }
            Event::Opened(Err(status)) => Err(status),
            Event::Answer(next) => next,
        };
        deliver(&mut self.waiting, next).map_err(|broken| {
            fail(&mut self.waiting, &broken);
            End::Broken(broken)
        })
    }

    /// Ends the stream after the last ack (half-close: the hub answers what
    /// it has, then ends it), waiting up to `timeout` for the answers.
    async fn finish(mut self, timeout: Duration) {
        self.out = None;
        let last = async {
            while !self.waiting.is_empty() {
                let event = self.event().await;
                if self.handle(event).is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(timeout, last).await.is_err() {
            let late = Status::unavailable("the connection closed before the hub answered");
            fail(&mut self.waiting, &late);
        }
    }
}

/// Hands the next answer to the oldest waiting caller. `Err`: the stream
/// is over, and why, as UNAVAILABLE whatever ended it, so that no caller
/// mistakes the end of the stream (or a refusal to open it) for a refusal
/// of its own ack.
fn deliver(
    waiting: &mut VecDeque<Waiter>,
    next: Result<Option<proto::AckStreamResponse>, Status>,
) -> Result<(), Status> {
    let answer = match next {
        Ok(Some(answer)) => answer,
        Ok(None) => return Err(Status::unavailable("the hub ended the ack stream")),
        Err(status) => {
            return Err(Status::unavailable(format!(
                "the ack stream failed before the hub answered: {:?}: {}",
                status.code(),
                status.message()
            )));
        }
    };
    let Some(waiter) = waiting.pop_front() else {
        return Err(Status::unavailable("the hub answered an ack never sent"));
    };
    if answer.directive_id != waiter.id {
        let _ = waiter.reply.send(Answer::Hub(Err(Status::unavailable(
            "the hub answered acks out of order",
        )
        .into())));
        return Err(Status::unavailable(format!(
            "the hub answered an ack of {:?} where one of {:?} was due",
            answer.directive_id, waiter.id
        )));
    }
    let _ = waiter.reply.send(Answer::Hub(result_of(answer)));
    Ok(())
}

/// Fails every waiting caller: their acks may or may not be committed.
fn fail(waiting: &mut VecDeque<Waiter>, why: &Status) {
    for waiter in waiting.drain(..) {
        let _ = waiter.reply.send(Answer::Hub(Err(why.clone().into())));
    }
}

/// One answer as unary `Ack` would have given it.
fn result_of(answer: proto::AckStreamResponse) -> Result<proto::AckResponse> {
    match answer.outcome {
        Some(Answered::Ack(response)) => Ok(response),
        Some(Answered::Error(e)) => Err(Status::new(Code::from_i32(e.code), e.message).into()),
        None => Err(Status::unavailable(
            "the hub answered an ack with neither a result nor an error",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: &str, outcome: Answered) -> proto::AckStreamResponse {
        proto::AckStreamResponse {
            directive_id: id.into(),
            outcome: Some(outcome),
        }
    }

    fn waiter(id: &str) -> (Waiter, oneshot::Receiver<Answer>) {
        let (reply, rx) = oneshot::channel();
        let waiter = Waiter {
            id: id.into(),
            reply,
            kept: None,
        };
        (waiter, rx)
    }

    fn status_of(answer: Answer) -> Status {
        match answer {
            Answer::Hub(Err(Error::Status(s))) => *s,
            other => panic!("not a status: {other:?}"),
        }
    }

    #[tokio::test]
    async fn answers_go_to_callers_in_order_and_errors_keep_their_code() {
        let (a, a_rx) = waiter("a");
        let (b, b_rx) = waiter("b");
        let mut waiting = VecDeque::from([a, b]);
        let completed = proto::AckResponse {
            state: proto::DirectiveState::Completed.into(),
            duplicate: true,
        };
        deliver(
            &mut waiting,
            Ok(Some(answer("a", Answered::Ack(completed)))),
        )
        .unwrap();
        let refused = proto::ItemError {
            code: Code::FailedPrecondition as i32,
            message: "directive b is CANCELLED".into(),
        };
        deliver(
            &mut waiting,
            Ok(Some(answer("b", Answered::Error(refused)))),
        )
        .unwrap();
        match a_rx.await.unwrap() {
            Answer::Hub(Ok(r)) => assert_eq!(r, completed),
            other => panic!("{other:?}"),
        }
        let refused = status_of(b_rx.await.unwrap());
        assert_eq!(
            (refused.code(), refused.message()),
            (Code::FailedPrecondition, "directive b is CANCELLED")
        );
    }

    #[tokio::test]
    async fn a_broken_stream_fails_the_unanswered_as_unavailable_whatever_its_code() {
        let (a, a_rx) = waiter("a");
        let mut waiting = VecDeque::from([a]);
        let broken = deliver(&mut waiting, Err(Status::not_found("route gone"))).unwrap_err();
        fail(&mut waiting, &broken);
        let status = status_of(a_rx.await.unwrap());
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("route gone"), "{status:?}");
    }

    #[tokio::test]
    async fn acks_sent_while_opening_go_back_to_unary_on_unimplemented() {
        let (out, _outgoing) = mpsc::channel(UNANSWERED);
        let mut stream = Stream {
            out: Some(out),
            answers: Answers::Opening(Box::pin(std::future::pending())),
            waiting: VecDeque::new(),
        };
        let mut replies = Vec::new();
        for id in ["a", "b"] {
            let (reply, rx) = oneshot::channel();
            let ack = proto::AckRequest {
                directive_id: id.into(),
                ..Default::default()
            };
            stream.send(Queued { ack, reply });
            replies.push(rx);
        }
        let refused = Event::Opened(Err(Status::unimplemented("")));
        assert!(matches!(stream.handle(refused), Err(End::Unimplemented)));
        for (rx, id) in replies.into_iter().zip(["a", "b"]) {
            match rx.await.unwrap() {
                Answer::Unary(ack) => assert_eq!(ack.directive_id, id),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_answer_for_another_ack_ends_the_stream() {
        let (a, a_rx) = waiter("a");
        let (b, b_rx) = waiter("b");
        let mut waiting = VecDeque::from([a, b]);
        let ok = Answered::Ack(proto::AckResponse::default());
        let broken = deliver(&mut waiting, Ok(Some(answer("b", ok)))).unwrap_err();
        fail(&mut waiting, &broken);
        for rx in [a_rx, b_rx] {
            assert_eq!(status_of(rx.await.unwrap()).code(), Code::Unavailable);
        }
    }
}
