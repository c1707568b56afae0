//! The real `hub` binary killed with SIGKILL in the middle of work, for
//! both durability settings: nothing it confirmed is lost, nothing it
//! delivered and did not see acked is lost, and a delivery repeats at most
//! with the attempt number it went out with (its mark may not have been
//! committed) or the next one.
#![cfg(unix)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use proto::watch_directives_response::Message;
use tonic::transport::Channel;

use common::{authed, channel};

const ADMIN: &str = "admin-token-for-kill-tests-0123";
const ENROLL: &str = "enrollment-token-for-kill-tests";
const DIRECTIVES: usize = 40;
const ACKED: usize = 20;

/// A running hub binary; killed (SIGKILL) and reaped when dropped.
struct Hub(Child);

impl Hub {
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a fresh port in `dir`; returns it and its address.
async fn start(dir: &Path, sync: &str) -> (Hub, String) {
    let addr_file = dir.join("grpc.addr");
    let _ = std::fs::remove_file(&addr_file);
    let hub = Hub(Command::new(env!("CARGO_BIN_EXE_hub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(["--admin-token", ADMIN, "--enrollment-token", ENROLL])
        .args(["--sync", sync, "--keepalive-interval", "1s"])
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the hub binary"));
    for _ in 0..500 {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            let addr = format!("http://{}", addr.trim());
            if let Ok(channel) = Channel::from_shared(addr.clone()).unwrap().connect().await {
                drop(channel);
                return (hub, addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the hub did not start within 10 s");
}

/// Directives on a new stream until the first keepalive: the backlog.
async fn backlog(spoke: &mut SpokeServiceClient<Channel>, key: &str) -> Vec<proto::Directive> {
    let mut stream = spoke
        .watch_directives(authed(proto::WatchDirectivesRequest {}, key))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .expect("the stream stays open");
        match msg.message {
            Some(Message::Directive(d)) => out.push(d),
            Some(Message::Keepalive(_)) => return out,
            _ => {}
        }
    }
}

async fn killed_mid_work_loses_nothing(sync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (hub, addr) = start(dir.path(), sync).await;
    let mut spoke = SpokeServiceClient::new(channel(&addr).await);
    let mut admin = AdminServiceClient::new(channel(&addr).await);
    let registered = spoke
        .register(authed(
            proto::RegisterRequest {
                name: "worker".into(),
                capabilities: vec![proto::Capability {
                    directive_type: "job".into(),
                    version: "1".into(),
                }],
                max_in_flight: 64,
                ..Default::default()
            },
            ENROLL,
        ))
        .await
        .unwrap()
        .into_inner();
    let key = registered.spoke_key;
    let mut created = BTreeSet::new();
    for n in 0..DIRECTIVES {
        let req = proto::CreateDirectiveRequest {
            target: Some(proto::DirectiveTarget {
                target: Some(proto::directive_target::Target::SpokeName("worker".into())),
            }),
            r#type: "job".into(),
            payload: Some(serde_json::from_value(serde_json::json!({ "n": n })).unwrap()),
            ..Default::default()
        };
        let res = admin.create_directive(authed(req, ADMIN)).await.unwrap();
        created.insert(res.into_inner().directives[0].id.clone());
    }
    let first = backlog(&mut spoke, &key).await;
    let sent: BTreeMap<String, u32> = first.iter().map(|d| (d.id.clone(), d.attempt)).collect();
    assert_eq!(sent.keys().cloned().collect::<BTreeSet<_>>(), created);
    let acked: BTreeSet<String> = sent.keys().take(ACKED).cloned().collect();
    let ack = |id: &String| proto::AckRequest {
        directive_id: id.clone(),
        outcome: proto::AckOutcome::Completed.into(),
        result: Some(serde_json::from_value(serde_json::json!({"done": id})).unwrap()),
        ..Default::default()
    };
    // Half acked one call each, half on one AckStream; each confirmed.
    let unary: Vec<&String> = acked.iter().step_by(2).collect();
    let streamed: Vec<&String> = acked.iter().skip(1).step_by(2).collect();
    for id in unary {
        spoke.ack(authed(ack(id), &key)).await.unwrap();
    }
    let requests: Vec<proto::AckRequest> = streamed.iter().map(|id| ack(id)).collect();
    let mut answers = spoke
        .ack_stream(authed(tokio_stream::iter(requests), &key))
        .await
        .unwrap()
        .into_inner();
    for id in streamed {
        let answer = answers.message().await.unwrap().expect("an answer per ack");
        assert_eq!(&answer.directive_id, id);
        assert!(
            matches!(
                answer.outcome,
                Some(proto::ack_stream_response::Outcome::Ack(_))
            ),
            "{answer:?}"
        );
    }

    hub.kill(); // SIGKILL
    let (hub, addr) = start(dir.path(), sync).await;
    let mut spoke = SpokeServiceClient::new(channel(&addr).await);
    let mut admin = AdminServiceClient::new(channel(&addr).await);

    let again = backlog(&mut spoke, &key).await;
    let again_ids: BTreeSet<String> = again.iter().map(|d| d.id.clone()).collect();
    let unacked: BTreeSet<String> = created.difference(&acked).cloned().collect();
    assert_eq!(again_ids, unacked, "exactly the unacked directives return");
    for d in &again {
        let before = sent[&d.id];
        assert!(
            d.attempt == before || d.attempt == before + 1,
            "attempt {} after {before}",
            d.attempt
        );
    }
    for id in &acked {
        let got = admin
            .get_directive(authed(
                proto::GetDirectiveRequest {
                    directive_id: id.clone(),
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner()
            .directive
            .unwrap();
        assert_eq!(got.state, proto::DirectiveState::Completed as i32);
        let result = hub_proto::json::to_json(&got.result.unwrap());
        assert_eq!(result, serde_json::json!({"done": id}));
    }
    hub.kill();
}

#[tokio::test]
async fn a_killed_hub_with_sync_full_loses_nothing_it_confirmed() {
    killed_mid_work_loses_nothing("full").await;
}

#[tokio::test]
async fn a_killed_hub_with_sync_normal_loses_nothing_it_confirmed() {
    killed_mid_work_loses_nothing("normal").await;
}
