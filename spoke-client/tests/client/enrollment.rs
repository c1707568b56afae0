//! Enrollment is safe to retry: the client proposes its own key, keeps it
//! before calling Register, and proposes the same one again after a lost
//! reply, in the same process or the next one; and it keeps whatever key
//! the reply carries (an older hub ignores the proposal).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hub_proto::v1 as proto;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use hub_proto::v1::spoke_service_server::{SpokeService, SpokeServiceServer};
use serde_json::{Value, json};
use spoke_client::{Client, Error, Event};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::proxy::Proxy;
use crate::support::*;

/// How many spokes the hub registered (SPOKE_REGISTERED events).
async fn registrations(hub: &TestHub) -> usize {
    let req = proto::WatchEventsRequest {
        types: vec![proto::EventType::SpokeRegistered.into()],
        stop_after_replay: true,
        ..Default::default()
    };
    let mut events = hub
        .admin()
        .await
        .watch_events(authed(req))
        .await
        .expect("WatchEvents")
        .into_inner();
    let mut n = 0;
    while events.message().await.expect("the event stream").is_some() {
        n += 1;
    }
    n
}

/// A spoke with a `ping` handler that reports whether it enrolled (`new`
/// registrations) to `heard`.
async fn pinger(
    name: &str,
    url: &str,
    dir: &std::path::Path,
    heard: &Arc<Mutex<Vec<bool>>>,
) -> Client {
    let heard = heard.clone();
    spoke(name, url, dir)
        .handler("ping", "1", |_: Value, _| async {
            Ok::<_, String>(json!({"pong": true}))
        })
        .on_event(move |e: &Event| {
            if let Event::Registered { new, .. } = e {
                heard.lock().unwrap().push(*new);
            }
        })
        .build()
        .await
        .expect("build")
}

/// How many registrations the observer heard were enrollments.
fn enrollments(heard: &Mutex<Vec<bool>>) -> usize {
    heard.lock().unwrap().iter().filter(|new| **new).count()
}

async fn works(hub: &TestHub, name: &str) {
    let d = hub.send(name, "ping", json!({})).await;
    let done = hub.final_state(&d.id).await;
    assert_eq!(
        done.state,
        proto::DirectiveState::Completed as i32,
        "{done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_first_register_reply_is_retried_with_the_same_key() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr).await;
    let state = tempfile::tempdir().unwrap();
    let heard: Arc<Mutex<Vec<bool>>> = Arc::default();
    let client = pinger("billing", &proxy.url(), state.path(), &heard).await;

    // The hub stores the spoke and answers; the answer never arrives.
    proxy.stall();
    let running = run(&client);
    eventually("the hub to answer Register", || async {
        (hub.rpc_count("Register").await == 1).then_some(())
    })
    .await;
    proxy.cut();

    // The client tries again by itself, with the key it proposed.
    eventually("the spoke to connect again", || async {
        assert!(!running.is_finished(), "run stopped: {:?}", client.status());
        client.status().connected.then_some(())
    })
    .await;
    works(&hub, "billing").await;
    assert!(hub.rpc_count("Register").await >= 2);
    assert_eq!(registrations(&hub).await, 1, "one spoke");
    assert_eq!(enrollments(&heard), 1, "one enrollment confirmed");
    client.shutdown();
    running.await.unwrap().unwrap();

    // The key in the state directory is the one the hub holds.
    let again = Client::builder("billing")
        .endpoint(hub.url())
        .state_dir(state.path())
        .handler("ping", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    let running = run(&again);
    connected(&again).await;
    works(&hub, "billing").await;
    again.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_killed_before_saving_its_key_enrolls_again_after_a_restart() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr).await;
    let state = tempfile::tempdir().unwrap();
    let heard: Arc<Mutex<Vec<bool>>> = Arc::default();

    // The first process: the hub answers, the process dies before the
    // answer reaches it.
    proxy.stall();
    let first = pinger("billing", &proxy.url(), state.path(), &heard).await;
    let running = run(&first);
    eventually("the hub to answer Register", || async {
        (hub.rpc_count("Register").await == 1).then_some(())
    })
    .await;
    running.abort();
    drop(first);
    proxy.cut();
    assert!(heard.lock().unwrap().is_empty(), "no key was saved");

    // The next process, on the same state directory.
    let second = pinger("billing", &hub.url(), state.path(), &heard).await;
    let running = run(&second);
    eventually("the restarted spoke to connect", || async {
        assert!(!running.is_finished(), "run stopped: {:?}", second.status());
        second.status().connected.then_some(())
    })
    .await;
    works(&hub, "billing").await;
    assert_eq!(registrations(&hub).await, 1, "one spoke");
    assert_eq!(enrollments(&heard), 1);
    second.shutdown();
    running.await.unwrap().unwrap();
}

/// A hub from before `proposed_key`: it drops the field (a newer field an
/// older hub does not know) and makes the key itself; it serves Register
/// only.
struct IgnoresProposals {
    upstream: SpokeServiceClient<Channel>,
}

type Never<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

fn older() -> Status {
    Status::unimplemented("this test hub serves Register only")
}

#[tonic::async_trait]
impl SpokeService for IgnoresProposals {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let auth = request.metadata().get("authorization").cloned();
        let mut inner = request.into_inner();
        inner.proposed_key.clear();
        let mut forwarded = Request::new(inner);
        if let Some(auth) = auth {
            forwarded.metadata_mut().insert("authorization", auth);
        }
        self.upstream.clone().register(forwarded).await
    }

    type WatchDirectivesStream = Never<proto::WatchDirectivesResponse>;

    async fn watch_directives(
        &self,
        _: Request<proto::WatchDirectivesRequest>,
    ) -> Result<Response<Self::WatchDirectivesStream>, Status> {
        Err(older())
    }

    async fn ack(
        &self,
        _: Request<proto::AckRequest>,
    ) -> Result<Response<proto::AckResponse>, Status> {
        Err(older())
    }

    async fn heartbeat(
        &self,
        _: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        Err(older())
    }

    async fn push_metrics(
        &self,
        _: Request<Streaming<proto::PushMetricsRequest>>,
    ) -> Result<Response<proto::PushMetricsResponse>, Status> {
        Err(older())
    }

    async fn poll_directives(
        &self,
        _: Request<proto::PollDirectivesRequest>,
    ) -> Result<Response<proto::PollDirectivesResponse>, Status> {
        Err(older())
    }

    type AckStreamStream = Never<proto::AckStreamResponse>;

    async fn ack_stream(
        &self,
        _: Request<Streaming<proto::AckRequest>>,
    ) -> Result<Response<Self::AckStreamStream>, Status> {
        Err(older())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_an_older_hub_sends_instead_is_the_one_kept() {
    let hub = TestHub::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_url = format!("http://{}", listener.local_addr().unwrap());
    let front = IgnoresProposals {
        upstream: SpokeServiceClient::new(Channel::from_shared(hub.url()).unwrap().connect_lazy()),
    };
    let serving = tokio::spawn(
        Server::builder()
            .add_service(SpokeServiceServer::new(front))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let state = tempfile::tempdir().unwrap();
    let heard: Arc<Mutex<Vec<bool>>> = Arc::default();
    let client = pinger("billing", &front_url, state.path(), &heard).await;
    let err = run(&client).await.unwrap().expect_err("no stream there");
    assert!(
        matches!(
            err,
            Error::Refused {
                code: Code::Unimplemented,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(enrollments(&heard), 1, "registered");
    serving.abort();

    // The hub's own key was kept: the real hub takes it.
    let again = Client::builder("billing")
        .endpoint(hub.url())
        .state_dir(state.path())
        .handler("ping", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    let running = run(&again);
    connected(&again).await;
    works(&hub, "billing").await;
    again.shutdown();
    running.await.unwrap().unwrap();
}
