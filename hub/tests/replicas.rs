//! Three real `hub` processes on one PostgreSQL database, as an operator
//! runs replicas: one leads, two stand by and forward. Every call is made
//! through the replica the test names, so each check says which path it
//! took: registering through a standby, a directive created on one replica
//! reaching a spoke streaming from another, a second stream on a third
//! replica ending the first with ABORTED, an ack deadline passing once
//! (not once per replica), WatchEvents identical and gap-free on every
//! replica, and a standby taking over when the leader is killed with
//! SIGKILL, with what the old leader confirmed still there.
//!
//! Needs `HUB_TEST_POSTGRES_URL` (a server where the test may create a
//! database, with `psql` on the PATH); says it skipped without it.
#![cfg(unix)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use proto::watch_directives_response::Message;
use tonic::Code;
use tonic::transport::Channel;

use common::{authed, channel, free_ports, http_get, postgres_test_database, replay_events};

const ADMIN: &str = "admin-token-for-replica-tests-0123";
const ENROLL: &str = "enrollment-token-for-replica-tests";
/// A bound against a hang, not a timing requirement.
const BOUND: Duration = Duration::from_secs(20);

/// A replica: the binary on its own data dir and fixed ports.
struct Replica {
    name: &'static str,
    port: u16,
    http_port: u16,
    child: Option<Child>,
}

impl Replica {
    fn start(run: &Path, name: &'static str, database: &str) -> Self {
        let [port, http_port] = free_ports();
        let mut replica = Self {
            name,
            port,
            http_port,
            child: None,
        };
        replica.spawn(run, database);
        replica
    }

    fn spawn(&mut self, run: &Path, database: &str) {
        let dir = run.join(self.name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("hub.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--database-url", database])
            .args(["--admin-token", ADMIN, "--enrollment-token", ENROLL])
            .args(["--keepalive-interval", "1s", "--ack-deadline", "1s"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the hub binary");
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What `/readyz` says: "ready" on the leader, "ready: a standby…" on
    /// a standby while a leader serves.
    async fn readiness(&self) -> Option<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let get = http_get(addr, "/readyz");
        let (_, body) = tokio::time::timeout(Duration::from_secs(2), get)
            .await
            .ok()
            .flatten()?;
        Some(body.trim().to_owned())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until exactly one replica leads and the others say they forward
/// to it; returns the leader's index.
async fn one_leader(replicas: &[Replica]) -> usize {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let mut said = Vec::new();
        for r in replicas {
            said.push(r.readiness().await.unwrap_or_default());
        }
        let leaders: Vec<usize> = (0..said.len()).filter(|i| said[*i] == "ready").collect();
        assert!(leaders.len() <= 1, "several replicas lead: {said:?}");
        if let [leader] = leaders[..] {
            let to_leader = format!(
                "ready: a standby; calls are forwarded to the leading hub at {} ",
                replicas[leader].url()
            );
            let standbys = said.iter().filter(|s| s.starts_with(&to_leader)).count();
            if standbys == replicas.len() - 1 {
                return leader;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no single leader with standbys forwarding to it within {BOUND:?}: {said:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin(url: &str) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(channel(url).await)
}

async fn spoke(url: &str) -> SpokeServiceClient<Channel> {
    SpokeServiceClient::new(channel(url).await)
}

/// The next directive on `stream`, skipping keepalives.
async fn next_directive(
    stream: &mut tonic::Streaming<proto::WatchDirectivesResponse>,
) -> proto::Directive {
    loop {
        let msg = tokio::time::timeout(BOUND, stream.message())
            .await
            .expect("a message in time")
            .expect("the stream stays open")
            .expect("the stream stays open");
        if let Some(Message::Directive(d)) = msg.message {
            return d;
        }
    }
}

fn create(spoke_name: &str, kind: &str, max_attempts: u32) -> proto::CreateDirectiveRequest {
    proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::SpokeName(
                spoke_name.into(),
            )),
        }),
        r#type: kind.into(),
        max_attempts,
        ..Default::default()
    }
}

/// Every event through `url`'s WatchEvents, replayed up to now.
async fn events(url: &str) -> Vec<proto::Event> {
    replay_events(url, ADMIN).await
}

async fn directive(url: &str, id: &str) -> proto::Directive {
    admin(url)
        .await
        .get_directive(authed(
            proto::GetDirectiveRequest {
                directive_id: id.into(),
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .directive
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_and_a_standby_takes_over_from_a_killed_leader() {
    let Some(database) = postgres_test_database("replicas") else {
        eprintln!("skipped: HUB_TEST_POSTGRES_URL is not set");
        return;
    };
    let run = tempfile::tempdir().unwrap();
    let mut replicas = vec![Replica::start(run.path(), "hub-a", &database)];
    // The first leads; the others start once it does, and stand by.
    one_leader(&replicas).await;
    replicas.push(Replica::start(run.path(), "hub-b", &database));
    replicas.push(Replica::start(run.path(), "hub-c", &database));
    assert_eq!(one_leader(&replicas).await, 0);
    let [a, b, c] = [0, 1, 2].map(|i| replicas[i].url());

    // A standby answers health for the services as the leader does.
    for url in [&a, &b] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(url).await);
        for service in ["", "hub.v1.SpokeService", "hub.v1.AdminService"] {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health of {service:?} through {url}: {e}"))
                .into_inner()
                .status;
            assert_eq!(
                status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service:?} through {url}"
            );
        }
    }

    // Registered through a standby.
    let registered = spoke(&b)
        .await
        .register(authed(
            proto::RegisterRequest {
                name: "edge-1".into(),
                capabilities: vec![proto::Capability {
                    directive_type: "work".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ENROLL,
        ))
        .await
        .expect("a standby forwards Register")
        .into_inner();
    let key = registered.spoke_key;

    // Streaming from the other standby; created on the first one.
    let mut on_c = spoke(&c)
        .await
        .watch_directives(authed(proto::WatchDirectivesRequest {}, &key))
        .await
        .unwrap()
        .into_inner();
    let created = admin(&b)
        .await
        .create_directive(authed(create("edge-1", "work", 3), ADMIN))
        .await
        .unwrap()
        .into_inner();
    let first = next_directive(&mut on_c).await;
    assert_eq!(first.id, created.directives[0].id);
    spoke(&a)
        .await
        .ack(authed(
            proto::AckRequest {
                directive_id: first.id.clone(),
                outcome: proto::AckOutcome::Completed as i32,
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("the leader takes an ack for a stream on a standby");
    assert_eq!(
        directive(&c, &first.id).await.state,
        proto::DirectiveState::Completed as i32
    );

    // A second stream through another replica ends the first: ABORTED.
    let mut on_a = spoke(&a)
        .await
        .watch_directives(authed(proto::WatchDirectivesRequest {}, &key))
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match tokio::time::timeout(BOUND, on_c.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the older stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");

    // An ack deadline passes once, not once per replica: two deliveries
    // and one failure for a directive of two attempts never acked.
    let unacked = admin(&c)
        .await
        .create_directive(authed(create("edge-1", "work", 2), ADMIN))
        .await
        .unwrap()
        .into_inner()
        .directives
        .remove(0);
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let d = next_directive(&mut on_a).await;
        assert_eq!(d.id, unacked.id);
        attempts.push(d.attempt);
    }
    assert_eq!(attempts, [1, 2]);
    let deadline = tokio::time::Instant::now() + BOUND;
    while directive(&b, &unacked.id).await.state != proto::DirectiveState::Failed as i32 {
        assert!(tokio::time::Instant::now() < deadline, "never FAILED");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every replica shows the same events, numbered without a gap.
    let seen = events(&a).await;
    for url in [&b, &c] {
        assert_eq!(events(url).await, seen, "WatchEvents through {url}");
    }
    let sequences: Vec<u64> = seen.iter().map(|e| e.sequence).collect();
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(sequences, expected, "gap-free from 1");
    let of_unacked = |t: proto::EventType| {
        seen.iter()
            .filter(|e| e.directive_id == unacked.id && e.r#type == t as i32)
            .count()
    };
    assert_eq!(of_unacked(proto::EventType::DirectiveDelivered), 2);
    assert_eq!(of_unacked(proto::EventType::DirectiveFailed), 1);

    // The leader killed: a standby takes over, and what the old leader
    // confirmed is there; the spoke streams again, through the other.
    drop(on_a);
    replicas[0].kill();
    let leader = one_leader(&replicas[1..]).await + 1;
    let other = if leader == 1 { &c } else { &b };
    assert_eq!(
        directive(other, &first.id).await.state,
        proto::DirectiveState::Completed as i32
    );
    let mut again = spoke(other)
        .await
        .watch_directives(authed(proto::WatchDirectivesRequest {}, &key))
        .await
        .unwrap()
        .into_inner();
    let after = admin(&replicas[leader].url())
        .await
        .create_directive(authed(create("edge-1", "work", 3), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_directive(&mut again).await.id, after.directives[0].id);
    let later = events(other).await;
    assert_eq!(
        &later[..seen.len()],
        &seen[..],
        "the old events stay as they were"
    );
    let sequences: Vec<u64> = later.iter().map(|e| e.sequence).collect();
    let expected: Vec<u64> = (1..=later.len() as u64).collect();
    assert_eq!(sequences, expected, "still gap-free after the takeover");
}
