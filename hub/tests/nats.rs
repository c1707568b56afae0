//! Events out to NATS JetStream (`hub serve --events-nats-url`), end to
//! end: the real `hub` binary on SQLite and a real `nats-server` with
//! JetStream, each test with its own of both. Events are made with real
//! gRPC calls and read back with an async-nats JetStream consumer (and, when
//! `HUB_TEST_NATS_PYTHON` names a python with nats-py, with
//! `tests/nats/consumer.py` too), and compared one by one with what
//! `WatchEvents` replays: every event once, in order, on its subject, in its
//! CloudEvents envelope; through a NATS outage, a SIGKILLed hub, and a
//! stream that only appears later.
//!
//! The NATS server is `HUB_TEST_NATS_SERVER`, else `nats-server` on the
//! PATH, else `/usr/sbin/nats-server`; without one the tests say so and
//! pass (`tests/run.sh` installs it).
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use proto::watch_directives_response::Message;
use serde_json::{Value, json};
use tonic::transport::Channel;

use common::{
    PATIENCE, authed, channel, eventually, free_ports, http_get, postgres_test_database,
    replay_events,
};

const ADMIN: &str = "admin-token-for-nats-tests-0123";
const ENROLL: &str = "enrollment-token-for-nats-tests";
const STREAM: &str = "HUB_EVENTS";
const PREFIX: &str = "hub.events";
const SOURCE: &str = "nats-test-hub";

// ---------------------------------------------------------------- processes

/// The nats-server binary, or `None` (and why) when there is none.
fn nats_server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("HUB_TEST_NATS_SERVER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "HUB_TEST_NATS_SERVER={} is not a file",
                path.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    on_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            "no nats-server (set HUB_TEST_NATS_SERVER, put it on the PATH, or apt-get install nats-server)".to_owned()
        })
}

/// The nats-server binary, or a printed reason to skip the test.
macro_rules! nats_server_or_skip {
    () => {
        match nats_server_binary() {
            Ok(bin) => bin,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

/// A nats-server with JetStream on 127.0.0.1; SIGKILLed when dropped. Its
/// store directory outlives it, so it can be started again on it.
struct Nats {
    bin: PathBuf,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Nats {
    async fn start(bin: PathBuf, root: &Path) -> Nats {
        let mut nats = Nats {
            bin,
            port: free_ports::<1>()[0],
            store: root.join("nats-store"),
            log: root.join("nats.log"),
            child: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and store, and waits until JetStream
    /// answers.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.store)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let url = self.url();
        eventually("nats-server answers with JetStream", || async {
            let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
            // Account info (asked raw: async-nats 0.51 reads a newer answer).
            let answer = client
                .request("$JS.API.INFO", "".into())
                .await
                .map_err(|e| e.to_string())?;
            let answer: Value =
                serde_json::from_slice(&answer.payload).map_err(|e| e.to_string())?;
            match answer.get("error") {
                None => Ok(()),
                Some(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    /// SIGKILL, keeping the store.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.url()).await.unwrap())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real hub binary; SIGKILLed and reaped when dropped.
struct Hub {
    child: Child,
    grpc: String,
    http: String,
    log: PathBuf,
}

impl Hub {
    /// Starts `hub serve` on `data` (SQLite) publishing to `nats`, with its
    /// HTTP port on a free port; `extra` are more flags.
    async fn start(data: &Path, log: PathBuf, nats: &Nats, extra: &[&str]) -> Hub {
        let addr_file = data.join("grpc.addr");
        let _ = std::fs::remove_file(&addr_file);
        let [port] = free_ports();
        let http = format!("127.0.0.1:{port}");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hub"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", &http])
            .arg("--data-dir")
            .arg(data)
            .args(["--admin-token", ADMIN, "--enrollment-token", ENROLL])
            .args(["--name", SOURCE, "--events-nats-url", &nats.url()])
            .args(extra)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the hub binary");
        let mut hub = Hub {
            child,
            grpc: String::new(),
            http,
            log,
        };
        hub.grpc = eventually("the hub serves gRPC", || async {
            let addr = std::fs::read_to_string(&addr_file).map_err(|e| e.to_string())?;
            let addr = format!("http://{}", addr.trim());
            Channel::from_shared(addr.clone())
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            Ok(addr)
        })
        .await;
        hub
    }

    /// SIGKILL.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(channel(&self.grpc).await)
    }

    async fn spokes(&self) -> SpokeServiceClient<Channel> {
        SpokeServiceClient::new(channel(&self.grpc).await)
    }

    /// The value of the sample `name` on `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.http.parse().unwrap(), "/metrics")
            .await
            .expect("an HTTP response");
        body.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} on /metrics:\n{body}"))
    }

    /// What the hub logged so far.
    fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The hub's last few log lines about NATS, to explain a failure.
    fn nats_log_tail(&self) -> String {
        let log = self.logged();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("NATS")).collect();
        lines[lines.len().saturating_sub(3)..].join("\n")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ events

/// Every event the hub stored, by `WatchEvents`' replay.
async fn replay(hub: &Hub) -> Vec<proto::Event> {
    let events = replay_events(&hub.grpc, ADMIN).await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, i as u64 + 1, "WatchEvents replays 1..N");
    }
    events
}

/// One message as a JetStream consumer got it.
#[derive(Debug)]
struct Received {
    stream_sequence: u64,
    subject: String,
    msg_id: Option<String>,
    envelope: Value,
}

/// The first `count` messages of the stream, through a new ephemeral pull
/// consumer on `hub.events.>` from the stream's start.
async fn consume(js: &jetstream::Context, count: usize) -> Vec<Received> {
    let stream = js.get_stream(STREAM).await.unwrap();
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: format!("{PREFIX}.>"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < count {
        let message = tokio::time::timeout_at(deadline, messages.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} messages within {PATIENCE:?}", out.len()))
            .expect("the consumer goes on")
            .unwrap();
        let info = message.info().unwrap();
        out.push(Received {
            stream_sequence: info.stream_sequence,
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned()),
            envelope: serde_json::from_slice(&message.payload).unwrap(),
        });
        message.ack().await.unwrap();
    }
    out
}

/// `EVENT_TYPE_DIRECTIVE_COMPLETED` is `directive.completed`.
fn kind(event: &proto::Event) -> String {
    let name = proto::EventType::try_from(event.r#type)
        .unwrap()
        .as_str_name()
        .strip_prefix("EVENT_TYPE_")
        .unwrap()
        .to_ascii_lowercase();
    let (what, change) = name.split_once('_').unwrap();
    format!("{what}.{change}")
}

/// The stream holds exactly `events` (all the hub stored), nothing
/// before, between or twice; waits until it does.
async fn stream_holds_exactly(js: &jetstream::Context, hub: &Hub) -> Vec<proto::Event> {
    eventually("the stream holds every stored event", || async {
        let events = replay(hub).await;
        let mut stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
        let state = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .clone();
        let last = events.len() as u64;
        if (state.first_sequence, state.last_sequence, state.messages) == (1, last, last) {
            Ok(events)
        } else {
            Err(format!(
                "{last} events stored; the stream has {} messages, sequences {}..={}; \
                 the hub's last words on NATS:\n{}",
                state.messages,
                state.first_sequence,
                state.last_sequence,
                hub.nats_log_tail()
            ))
        }
    })
    .await
}

/// Reads the stream's first `events.len()` messages and checks each
/// against the event of the same sequence; answers what was read.
async fn check_stream(js: &jetstream::Context, events: &[proto::Event]) -> Vec<Received> {
    let received = consume(js, events.len()).await;
    for (got, event) in received.iter().zip(events) {
        let seq = event.sequence;
        let at = format!("event {seq}: {got:?}\nstored: {event:?}");
        assert_eq!(got.stream_sequence, seq, "in order, once: {at}");
        assert_eq!(
            got.msg_id.as_deref(),
            Some(seq.to_string().as_str()),
            "{at}"
        );
        assert_eq!(got.subject, format!("{PREFIX}.{}", kind(event)), "{at}");
        let envelope = got.envelope.as_object().expect("a JSON object");
        assert_eq!(envelope["specversion"], "1.0", "{at}");
        assert_eq!(envelope["id"], seq.to_string(), "{at}");
        assert_eq!(envelope["source"], SOURCE, "{at}");
        assert_eq!(envelope["type"], format!("hub.v1.{}", kind(event)), "{at}");
        assert_eq!(envelope["datacontenttype"], "application/json", "{at}");
        let time = event.time.as_ref().expect("a time");
        let time = chrono::DateTime::from_timestamp(time.seconds, time.nanos as u32)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_eq!(envelope["time"], time, "{at}");
        let subject = [&event.directive_id, &event.spoke_id]
            .into_iter()
            .find(|id| !id.is_empty());
        assert_eq!(
            envelope.get("subject").and_then(Value::as_str),
            subject.map(String::as_str),
            "{at}"
        );
        assert_eq!(
            envelope["data"],
            serde_json::to_value(event).unwrap(),
            "{at}"
        );
        let keys: Vec<&str> = envelope.keys().map(String::as_str).collect();
        let mut expected = vec![
            "data",
            "datacontenttype",
            "id",
            "source",
            "specversion",
            "time",
            "type",
        ];
        if subject.is_some() {
            expected.push("subject");
        }
        expected.sort_unstable();
        assert_eq!(keys, expected, "{at}");
    }
    received
}

// ---------------------------------------------------------------- workload

async fn register(spokes: &mut SpokeServiceClient<Channel>, name: &str) -> (String, String) {
    let res = spokes
        .register(authed(
            proto::RegisterRequest {
                name: name.into(),
                labels: [("zone".to_owned(), "a".to_owned())].into(),
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
    (res.spoke.unwrap().id, res.spoke_key)
}

fn create_request(spoke: &str, n: usize) -> proto::CreateDirectiveRequest {
    proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::SpokeName(spoke.into())),
        }),
        r#type: "job".into(),
        payload: hub_proto::json::from_json(json!({ "n": n })),
        ..Default::default()
    }
}

async fn create(admin: &mut AdminServiceClient<Channel>, spoke: &str, n: usize) -> String {
    let res = admin
        .create_directive(authed(create_request(spoke, n), ADMIN))
        .await
        .unwrap();
    res.into_inner().directives[0].id.clone()
}

/// Makes an event of most kinds: registrations, creates, deliveries,
/// progress, each final outcome, a cancel, metrics, a key rotation, an
/// update and a revoke.
async fn lifecycle(hub: &Hub) {
    let mut admin = hub.admin().await;
    let mut spokes = hub.spokes().await;
    let (_, alpha) = register(&mut spokes, "alpha").await;
    register(&mut spokes, "beta").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(create(&mut admin, "alpha", n).await);
    }
    let cancelled = create(&mut admin, "beta", 3).await;
    admin
        .cancel_directive(authed(
            proto::CancelDirectiveRequest {
                directive_id: cancelled,
                reason: "not needed".into(),
            },
            ADMIN,
        ))
        .await
        .unwrap();
    // alpha takes its three on a stream.
    let mut stream = spokes
        .watch_directives(authed(proto::WatchDirectivesRequest {}, &alpha))
        .await
        .unwrap()
        .into_inner();
    let mut delivered = Vec::new();
    while delivered.len() < ids.len() {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a directive")
            .unwrap()
            .expect("the stream stays open");
        if let Some(Message::Directive(d)) = msg.message {
            delivered.push(d.id);
        }
    }
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    let ack = |id: &str, outcome: proto::AckOutcome| proto::AckRequest {
        directive_id: id.to_owned(),
        outcome: outcome.into(),
        error: if matches!(
            outcome,
            proto::AckOutcome::Failed | proto::AckOutcome::Rejected
        ) {
            "no".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let progress = proto::AckRequest {
        progress: Some(50),
        progress_message: "halfway".into(),
        ..ack(&ids[0], proto::AckOutcome::InProgress)
    };
    for request in [
        progress,
        ack(&ids[0], proto::AckOutcome::Completed),
        ack(&ids[1], proto::AckOutcome::Failed),
        ack(&ids[2], proto::AckOutcome::Rejected),
    ] {
        spokes.ack(authed(request, &alpha)).await.unwrap();
    }
    drop(stream);
    let point = proto::MetricPoint {
        domain: "statistics".into(),
        name: "orders_processed".into(),
        value: 3.0,
        time: Some(pbjson_types::Timestamp {
            seconds: chrono::Utc::now().timestamp(),
            nanos: 0,
        }),
        ..Default::default()
    };
    let batch = proto::PushMetricsRequest {
        batch_id: "batch-1".into(),
        points: vec![point],
    };
    spokes
        .push_metrics(authed(tokio_stream::iter([batch]), &alpha))
        .await
        .unwrap();
    // alpha registers again with other labels: an update.
    spokes
        .register(authed(
            proto::RegisterRequest {
                name: "alpha".into(),
                labels: [("zone".to_owned(), "b".to_owned())].into(),
                capabilities: vec![proto::Capability {
                    directive_type: "job".into(),
                    version: "1".into(),
                }],
                max_in_flight: 64,
                ..Default::default()
            },
            &alpha,
        ))
        .await
        .unwrap();
    admin
        .rotate_spoke_key(authed(
            proto::RotateSpokeKeyRequest {
                spoke_name: "beta".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap();
    admin
        .revoke_spoke(authed(
            proto::RevokeSpokeRequest {
                spoke_name: "beta".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap();
}

/// The output lines of `tests/nats/consumer.py` for `count` messages, or
/// `None` (printed) without `HUB_TEST_NATS_PYTHON`.
fn python_consumer(nats: &Nats, count: usize) -> Option<String> {
    let Some(python) = std::env::var_os("HUB_TEST_NATS_PYTHON") else {
        eprintln!("skipped the nats-py consumer: HUB_TEST_NATS_PYTHON is not set");
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nats/consumer.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--server", &nats.url(), "--count", &count.to_string()])
        .output()
        .expect("run the nats-py consumer");
    assert!(
        out.status.success(),
        "{} {}: {}\n{}",
        python.to_string_lossy(),
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn every_event_arrives_once_in_order_as_a_cloud_event() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let nats = Nats::start(bin, root.path()).await;
    let hub = Hub::start(
        &root.path().join("hub"),
        root.path().join("hub.log"),
        &nats,
        &[],
    )
    .await;
    let js = nats.jetstream().await;

    lifecycle(&hub).await;
    let events = stream_holds_exactly(&js, &hub).await;
    let received = check_stream(&js, &events).await;

    let kinds: std::collections::BTreeSet<String> = events.iter().map(kind).collect();
    for wanted in [
        "spoke.registered",
        "spoke.updated",
        "spoke.key_rotated",
        "spoke.revoked",
        "directive.created",
        "directive.delivered",
        "directive.progress",
        "directive.completed",
        "directive.failed",
        "directive.rejected",
        "directive.cancelled",
        "metrics.received",
    ] {
        assert!(kinds.contains(wanted), "no {wanted} among {kinds:?}");
    }
    // The stream the hub made: file storage, every subject under the prefix.
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let config = &stream.info().await.unwrap().config;
    assert_eq!(config.subjects, vec![format!("{PREFIX}.>")]);
    assert_eq!(config.storage, stream::StorageType::File);
    assert_eq!(hub.metric("hub_events_nats_connected").await, 1.0);
    eventually("the metrics show everything published", || async {
        let published = hub.metric("hub_events_nats_published_sequence").await;
        let lag = hub.metric("hub_events_nats_lag").await;
        if published >= events.len() as f64 && lag == 0.0 {
            Ok(())
        } else {
            Err(format!("published {published}, lag {lag}"))
        }
    })
    .await;
    assert_eq!(hub.metric("hub_events_nats_skipped_total").await, 0.0);

    // A consumer with only NATS tooling sees the same.
    if let Some(lines) = python_consumer(&nats, events.len()) {
        let expected: String = received
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}\n",
                    r.envelope["id"].as_str().unwrap(),
                    r.subject,
                    r.envelope["type"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(lines, expected, "what nats-py read");
        eprintln!("nats-py read the same {} messages", events.len());
    }
}

#[tokio::test]
async fn a_nats_outage_is_caught_up_with_no_gap_and_no_duplicate() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(bin, root.path()).await;
    let hub = Hub::start(
        &root.path().join("hub"),
        root.path().join("hub.log"),
        &nats,
        &[],
    )
    .await;
    let mut admin = hub.admin().await;
    register(&mut hub.spokes().await, "worker").await;
    for n in 0..10 {
        create(&mut admin, "worker", n).await;
    }
    let before = stream_holds_exactly(&nats.jetstream().await, &hub)
        .await
        .len();

    nats.kill();
    // Calls go on while NATS is away, and the hub says it is away.
    for n in 10..40 {
        create(&mut admin, "worker", n).await;
    }
    eventually("the metric says not connected", || async {
        match hub.metric("hub_events_nats_connected").await {
            0.0 => Ok(()),
            v => Err(format!("hub_events_nats_connected {v}")),
        }
    })
    .await;
    assert!(hub.metric("hub_events_nats_lag").await > 0.0);
    assert!(hub.metric("hub_events_nats_published_sequence").await < 40.0);
    for n in 40..50 {
        create(&mut admin, "worker", n).await;
    }

    nats.restart().await;
    let js = nats.jetstream().await;
    let events = stream_holds_exactly(&js, &hub).await;
    assert!(events.len() >= before + 40, "{} events", events.len());
    check_stream(&js, &events).await;
    eventually("the metrics show it caught up", || async {
        let connected = hub.metric("hub_events_nats_connected").await;
        let lag = hub.metric("hub_events_nats_lag").await;
        let published = hub.metric("hub_events_nats_published_sequence").await;
        if connected == 1.0 && lag == 0.0 && published >= events.len() as f64 {
            Ok(())
        } else {
            Err(format!(
                "connected {connected}, lag {lag}, published {published}"
            ))
        }
    })
    .await;
}

#[tokio::test]
async fn a_hub_killed_mid_publish_leaves_every_event_once_in_the_stream() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let nats = Nats::start(bin, root.path()).await;
    let data = root.path().join("hub");
    let hub = Hub::start(&data, root.path().join("hub.log"), &nats, &[]).await;
    let js = nats.jetstream().await;
    register(&mut hub.spokes().await, "worker").await;

    // Creates as fast as four callers make them, until the hub dies.
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..4 {
        let mut admin = hub.admin().await;
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let items = (0..10)
                    .map(|i| create_request("worker", caller * 1_000_000 + n + i))
                    .collect();
                let request = proto::CreateDirectivesRequest {
                    items,
                    ..Default::default()
                };
                if admin
                    .create_directives(authed(request, ADMIN))
                    .await
                    .is_err()
                {
                    break;
                }
                n += 10;
            }
        }));
    }
    let at_kill = eventually("the stream fills while creates go on", || async {
        let mut stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
        let messages = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .messages;
        if messages >= 300 {
            Ok(messages)
        } else {
            Err(format!("{messages} messages"))
        }
    })
    .await;
    hub.kill(); // SIGKILL, creates and publishing in full swing
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }

    let hub = Hub::start(&data, root.path().join("hub-again.log"), &nats, &[]).await;
    let mut admin = hub.admin().await;
    for n in 0..5 {
        create(&mut admin, "worker", n).await;
    }
    let events = stream_holds_exactly(&js, &hub).await;
    check_stream(&js, &events).await;
    let resumed = hub
        .logged()
        .contains("the stream holds events past the stored mark");
    eprintln!(
        "{at_kill} messages in the stream just before the kill, {} events in the end; \
         the restarted hub {} its stored mark",
        events.len(),
        if resumed {
            "found the stream ahead of"
        } else {
            "resumed from"
        }
    );
}

#[tokio::test]
async fn without_the_stream_and_create_stream_off_nothing_is_published_until_it_exists() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let nats = Nats::start(bin, root.path()).await;
    let js = nats.jetstream().await;
    // Anything published on the subjects shows here, stream or not.
    let watcher = async_nats::connect(nats.url()).await.unwrap();
    let mut seen = watcher.subscribe(format!("{PREFIX}.>")).await.unwrap();
    watcher.flush().await.unwrap();
    let hub = Hub::start(
        &root.path().join("hub"),
        root.path().join("hub.log"),
        &nats,
        &["--events-nats-create-stream", "off"],
    )
    .await;

    // Calls work.
    let mut admin = hub.admin().await;
    register(&mut hub.spokes().await, "worker").await;
    for n in 0..5 {
        create(&mut admin, "worker", n).await;
    }
    eventually("the hub says it cannot find the stream", || async {
        let log = hub.logged();
        if log.contains("publishing events to NATS failed") && log.contains(STREAM) {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    assert_eq!(hub.metric("hub_events_nats_connected").await, 0.0);
    assert_eq!(hub.metric("hub_events_nats_published_sequence").await, 0.0);
    assert!(
        js.get_stream(STREAM).await.is_err(),
        "the hub made the stream"
    );
    let early =
        std::iter::from_fn(|| futures_util::FutureExt::now_or_never(seen.next()).flatten()).count();
    assert_eq!(early, 0, "published while there was no stream");

    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    for n in 5..10 {
        create(&mut admin, "worker", n).await;
    }
    let events = stream_holds_exactly(&js, &hub).await;
    check_stream(&js, &events).await;
    eventually("the metrics show it connected and caught up", || async {
        let connected = hub.metric("hub_events_nats_connected").await;
        let lag = hub.metric("hub_events_nats_lag").await;
        if connected == 1.0 && lag == 0.0 {
            Ok(())
        } else {
            Err(format!("connected {connected}, lag {lag}"))
        }
    })
    .await;
    // Each event went out once, none before the stream was there.
    let mut ids = Vec::new();
    while ids.len() < events.len() {
        let message = tokio::time::timeout(PATIENCE, seen.next())
            .await
            .expect("every event on the subjects")
            .unwrap();
        let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
        ids.push(envelope["id"].as_str().unwrap().parse::<u64>().unwrap());
    }
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn the_lag_counts_the_events_not_yet_published_while_nats_is_unusable() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let nats = Nats::start(bin, root.path()).await;
    let hub = Hub::start(
        &root.path().join("hub"),
        root.path().join("hub.log"),
        &nats,
        &["--events-nats-create-stream", "off"],
    )
    .await;
    let mut admin = hub.admin().await;
    register(&mut hub.spokes().await, "worker").await;
    for n in 0..5 {
        create(&mut admin, "worker", n).await;
    }
    let stored = replay(&hub).await.len();
    eventually("the lag is every stored event", || async {
        let lag = hub.metric("hub_events_nats_lag").await;
        if lag == stored as f64 {
            Ok(())
        } else {
            Err(format!(
                "hub_events_nats_lag {lag} with {stored} events stored, none published"
            ))
        }
    })
    .await;
}

#[tokio::test]
async fn nats_restarted_after_the_duplicate_window_passed_is_published_to_again() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(bin, root.path()).await;
    // The stream as the hub would make it, with a short duplicate window
    // (the hub's is 2 minutes) so that the test need not idle that long.
    nats.jetstream()
        .await
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{PREFIX}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let hub = Hub::start(
        &root.path().join("hub"),
        root.path().join("hub.log"),
        &nats,
        &[],
    )
    .await;
    let mut admin = hub.admin().await;
    register(&mut hub.spokes().await, "worker").await;
    for n in 0..5 {
        create(&mut admin, "worker", n).await;
    }
    stream_holds_exactly(&nats.jetstream().await, &hub).await;
    // The hub idles past the window; then NATS restarts (an upgrade, a
    // reboot) and the hub has new events.
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.kill();
    nats.restart().await;
    for n in 5..10 {
        create(&mut admin, "worker", n).await;
    }
    let js = nats.jetstream().await;
    let events = stream_holds_exactly(&js, &hub).await;
    check_stream(&js, &events).await;
}

/// Events retention removed while NATS was away are never published, and
/// the hub says so: the skipped counter counts them, and publishing goes
/// on with the events after them.
#[tokio::test]
async fn events_removed_by_retention_before_publishing_are_counted_not_hidden() {
    let bin = nats_server_or_skip!();
    let root = tempfile::tempdir().unwrap();
    // Its port is known, and nothing answers there yet.
    let mut nats = Nats::start(bin, root.path()).await;
    nats.kill();
    let data = root.path().join("hub");
    let retention = ["--event-retention", "1s"];
    let hub = Hub::start(&data, root.path().join("hub.log"), &nats, &retention).await;
    register(&mut hub.spokes().await, "worker").await;
    let mut admin = hub.admin().await;
    for n in 0..3 {
        create(&mut admin, "worker", n).await;
    }
    let made = replay(&hub).await.len();
    assert!(made >= 4, "{made} events");
    // Older than the retention by the next start, whose first purge
    // removes them before NATS is back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hub.kill();
    let hub = Hub::start(&data, root.path().join("hub.log"), &nats, &retention).await;
    eventually("retention removed the unpublished events", || async {
        let left = replay(&hub).await.len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} events left"))
        }
    })
    .await;
    nats.restart().await;
    eventually("the skipped events are counted", || async {
        let skipped = hub.metric("hub_events_nats_skipped_total").await;
        let connected = hub.metric("hub_events_nats_connected").await;
        if skipped == made as f64 && connected == 1.0 {
            Ok(())
        } else {
            Err(format!("skipped {skipped}, connected {connected}"))
        }
    })
    .await;
    assert!(
        hub.logged()
            .contains("removed by retention before they were published")
    );
    // What comes after them is published, numbered on from them.
    create(&mut hub.admin().await, "worker", 9).await;
    let js = nats.jetstream().await;
    let first = consume(&js, 1).await.remove(0);
    assert_eq!(
        first.msg_id.as_deref(),
        Some((made as u64 + 1).to_string().as_str())
    );
    assert_eq!(first.envelope["type"], "hub.v1.directive.created");
}

/// Two replicas on PostgreSQL (with `HUB_TEST_POSTGRES_URL`): only the
/// leader publishes, and when it is killed the standby that takes over
/// goes on from the stored mark: every event once, in order.
#[tokio::test]
async fn with_replicas_the_leader_publishes_and_a_new_leader_goes_on() {
    let bin = nats_server_or_skip!();
    let Some(database) = postgres_test_database("nats") else {
        eprintln!("skipped: HUB_TEST_POSTGRES_URL is not set");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let nats = Nats::start(bin, root.path()).await;
    let on_db = ["--database-url", database.as_str()];
    let a = Hub::start(
        &root.path().join("a"),
        root.path().join("a.log"),
        &nats,
        &on_db,
    )
    .await;
    let b = Hub::start(
        &root.path().join("b"),
        root.path().join("b.log"),
        &nats,
        &on_db,
    )
    .await;
    let readiness = |hub: &Hub| {
        let addr = hub.http.parse().unwrap();
        async move { http_get(addr, "/readyz").await.map(|(_, body)| body) }
    };
    assert_eq!(readiness(&a).await.as_deref(), Some("ready\n"));
    // Work through the standby and the leader alike.
    register(&mut b.spokes().await, "worker").await;
    for n in 0..3 {
        create(&mut b.admin().await, "worker", n).await;
        create(&mut a.admin().await, "worker", 10 + n).await;
    }
    let js = nats.jetstream().await;
    let before = stream_holds_exactly(&js, &b).await;
    check_stream(&js, &before).await;
    assert!(
        !b.logged().contains("publishing events to NATS JetStream"),
        "a standby published"
    );

    a.kill();
    eventually("the standby leads", || async {
        match readiness(&b).await.as_deref() {
            Some("ready\n") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for n in 0..3 {
        create(&mut b.admin().await, "worker", 20 + n).await;
    }
    let after = stream_holds_exactly(&js, &b).await;
    assert!(
        after.len() >= before.len() + 3,
        "{} then {}",
        before.len(),
        after.len()
    );
    check_stream(&js, &after).await;
}
