//! Webhook delivery end to end: the real `hub` binary (SQLite, its own
//! data dir and ports per test) POSTs directives to a local HTTPS receiver
//! (`tests/webhook/receiver.py`, with a certificate for `localhost` signed
//! by a CA made here and given to the hub with `--webhook-ca`). The
//! receiver checks each signature with the reference Standard Webhooks
//! library (PyPI `standardwebhooks`), answers as each test tells it (an
//! outcome, an empty 200, HTTP 500, or no answer at all) and records every
//! request; the tests compare that record with what the hub's API shows.
//!
//! The receiver's python is `HUB_TEST_NATS_PYTHON` (`tests/run.sh` sets it
//! to its virtualenv's, which has `standardwebhooks`), else
//! `target/test-tools/bin/python`; without either the tests say so and pass
//! (all but the SSRF guard's, which needs no receiver).
#![cfg(unix)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use proto::watch_directives_response::Message;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use common::{PATIENCE, authed, channel, eventually, free_ports, http_get, replay_events};

const ADMIN: &str = "admin-token-for-webhook-tests-0123";
const ENROLL: &str = "enrollment-token-for-webhook-tests";
/// Acks are never due during a test: an unacked delivery is not sent again.
const LONG_ACK_DEADLINE: i64 = 600;

// ------------------------------------------------------------------ python

/// The python with `standardwebhooks`, or why there is none.
fn receiver_python() -> Result<PathBuf, String> {
    let importable = |python: &Path| {
        Command::new(python)
            .args(["-c", "import standardwebhooks"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(python) = std::env::var_os("HUB_TEST_NATS_PYTHON").filter(|p| !p.is_empty()) {
        // Named on purpose (tests/run.sh): it must work, not skip.
        let python = PathBuf::from(python);
        assert!(
            importable(&python),
            "HUB_TEST_NATS_PYTHON={} cannot import standardwebhooks \
             (pip install standardwebhooks==1.1.0)",
            python.display()
        );
        return Ok(python);
    }
    let python = workspace_root().join("target/test-tools/bin/python");
    if !python.is_file() {
        return Err(format!(
            "no {} (tests/run.sh makes it) and HUB_TEST_NATS_PYTHON is not set",
            python.display()
        ));
    }
    if !importable(&python) {
        return Err(format!(
            "{} cannot import standardwebhooks (pip install standardwebhooks==1.1.0)",
            python.display()
        ));
    }
    Ok(python)
}

/// The receiver's python, or a printed reason to skip the test.
macro_rules! python_or_skip {
    () => {
        match receiver_python() {
            Ok(python) => python,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the hub crate is inside the workspace")
        .to_owned()
}

// --------------------------------------------------------------------- PKI

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1,
/// written as PEM files into a directory.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "webhook test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("receiver.pem"),
            key: dir.join("receiver-key.pem"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }
}

// ---------------------------------------------------------------- receiver

/// `tests/webhook/receiver.py`, serving HTTPS on 127.0.0.1; SIGKILLed when
/// dropped.
struct Receiver {
    child: Child,
    port: u16,
    control: PathBuf,
    record: PathBuf,
    log: PathBuf,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    n: u64,
    /// When it arrived (Unix seconds).
    at: f64,
    headers: BTreeMap<String, String>,
    body: String,
    /// Per secret label: whether `standardwebhooks` verified the request.
    verified: BTreeMap<String, bool>,
    high_water: u64,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header: {self:?}"))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn directive_id(&self) -> String {
        self.header("webhook-id").to_owned()
    }

    fn attempt(&self) -> u32 {
        self.header("hub-attempt").parse().unwrap()
    }

    fn verified_with(&self, label: &str) -> bool {
        *self
            .verified
            .get(label)
            .unwrap_or_else(|| panic!("not checked with {label}: {self:?}"))
    }
}

impl Receiver {
    async fn start(python: &Path, dir: &Path, pki: &Pki) -> Self {
        let port_file = dir.join("receiver.port");
        let control = dir.join("control.json");
        let record = dir.join("record.jsonl");
        let log = dir.join("receiver.log");
        let child = Command::new(python)
            .arg(workspace_root().join("tests/webhook/receiver.py"))
            .arg("--cert")
            .arg(&pki.cert)
            .arg("--key")
            .arg(&pki.key)
            .arg("--control")
            .arg(&control)
            .arg("--record")
            .arg(&record)
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the receiver");
        let mut receiver = Self {
            child,
            port: 0,
            control,
            record,
            log,
        };
        let start = Instant::now();
        receiver.port = loop {
            if let Ok(Some(status)) = receiver.child.try_wait() {
                panic!(
                    "the receiver exited ({status}):\n{}",
                    std::fs::read_to_string(&receiver.log).unwrap_or_default()
                );
            }
            let port = std::fs::read_to_string(&port_file).unwrap_or_default();
            if let Ok(port) = port.trim().parse::<u16>() {
                break port;
            }
            assert!(start.elapsed() < PATIENCE, "the receiver never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        receiver
    }

    /// The URL a spoke registers; `localhost`, as the certificate says.
    fn url(&self) -> String {
        format!("https://localhost:{}/hook", self.port)
    }

    /// Tells the receiver how to answer from now on (see receiver.py).
    fn answer(&self, control: Value) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, control.to_string()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    fn lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        // Only whole lines: one may be half-written.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every request so far, in the order they arrived.
    fn requests(&self) -> Vec<Seen> {
        let mut seen: Vec<Seen> = self
            .lines()
            .into_iter()
            .filter(|l| l["kind"] == "request")
            .map(|l| Seen {
                n: l["n"].as_u64().unwrap(),
                at: l["at"].as_f64().unwrap(),
                headers: serde_json::from_value(l["headers"].clone()).unwrap(),
                body: l["body"].as_str().unwrap().to_owned(),
                verified: serde_json::from_value(l["verified"].clone()).unwrap(),
                high_water: l["high_water"].as_u64().unwrap(),
            })
            .collect();
        seen.sort_by_key(|s| s.n);
        seen
    }

    /// How each request that ended did ("answered 500", "client closed").
    fn ends(&self) -> BTreeMap<u64, String> {
        self.lines()
            .into_iter()
            .filter(|l| l["kind"] == "end")
            .map(|l| {
                let how = l["how"].as_str().unwrap().to_owned();
                (l["n"].as_u64().unwrap(), how)
            })
            .collect()
    }

    /// Requests that arrived and have not ended.
    fn outstanding(&self) -> Vec<Seen> {
        let ends = self.ends();
        self.requests()
            .into_iter()
            .filter(|s| !ends.contains_key(&s.n))
            .collect()
    }

    /// Waits until at least `n` requests arrived; answers all so far.
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        eventually(&format!("{n} requests at the receiver"), || async {
            let seen = self.requests();
            if seen.len() >= n {
                Ok(seen)
            } else {
                Err(format!("{} so far", seen.len()))
            }
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- receiver log:\n{}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default())
            );
        }
    }
}

/// What the receiver answers: an outcome, an empty 200, a status, a hang.
fn completed(result: Value) -> Value {
    json!({"status": 200, "body": {"outcome": "COMPLETED", "result": result}})
}

fn empty_200() -> Value {
    json!({"status": 200, "body": null})
}

fn status(code: u16) -> Value {
    json!({"status": code, "body": null})
}

fn hang() -> Value {
    json!({"hang": true})
}

// --------------------------------------------------------------------- hub

/// The real hub binary on SQLite; SIGKILLed and reaped when dropped.
struct Hub {
    child: Option<Child>,
    data: PathBuf,
    args: Vec<String>,
    grpc: String,
    grpc_port: u16,
    http: SocketAddr,
    log: PathBuf,
}

impl Hub {
    /// `hub serve` on `data`, trusting `ca` for webhooks; `extra` are more
    /// flags.
    async fn start(data: &Path, ca: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec!["--webhook-ca".into(), ca.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut hub = Self {
            child: None,
            data: data.to_owned(),
            args,
            grpc: String::new(),
            grpc_port: 0,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: data.join("hub.log"),
        };
        hub.spawn().await;
        hub
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        std::fs::create_dir_all(&self.data).unwrap();
        let addr_file = self.data.join("grpc.addr");
        let _ = std::fs::remove_file(&addr_file);
        let [http_port] = free_ports();
        self.http = SocketAddr::from(([127, 0, 0, 1], http_port));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hub"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--http-listen", &self.http.to_string()])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--admin-token", ADMIN, "--enrollment-token", ENROLL])
            .args(&self.args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the hub binary");
        self.child = Some(child);
        let start = Instant::now();
        let addr = loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the hub exited ({status}):\n{}", tail(&self.logged()));
            }
            let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
            let addr = addr.trim().to_owned();
            let connected = !addr.is_empty()
                && Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .is_ok();
            if connected {
                break addr;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the hub did not serve gRPC within {PATIENCE:?}:\n{}",
                tail(&self.logged())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.grpc_port = addr.parse::<SocketAddr>().unwrap().port();
        self.grpc = format!("http://{addr}");
    }

    /// SIGKILL, keeping the data dir.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL, then the same flags on the same data dir (new ports).
    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(channel(&self.grpc).await)
    }

    async fn spokes(&self) -> SpokeServiceClient<Channel> {
        SpokeServiceClient::new(channel(&self.grpc).await)
    }

    /// The sample `series` (name and labels as printed) on `/metrics`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(self.http, "/metrics").await?;
        body.lines().find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Registers spoke `name` with a webhook at `url`: its id, key and
    /// webhook secret.
    async fn register_webhook(&self, name: &str, url: &str, max_in_flight: u32) -> Registered {
        let res = self
            .spokes()
            .await
            .register(authed(registration(name, url, max_in_flight), ENROLL))
            .await
            .unwrap_or_else(|e| panic!("register {name} with {url}: {e}"))
            .into_inner();
        Registered {
            id: res.spoke.unwrap().id,
            key: res.spoke_key,
            secret: res.webhook_secret,
        }
    }

    async fn create(&self, req: proto::CreateDirectiveRequest) -> proto::Directive {
        self.admin()
            .await
            .create_directive(authed(req, ADMIN))
            .await
            .unwrap()
            .into_inner()
            .directives
            .remove(0)
    }

    async fn directive(&self, id: &str) -> proto::Directive {
        self.admin()
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

    /// Waits until directive `id` is in `state`; answers it.
    async fn wait_state(&self, id: &str, state: proto::DirectiveState) -> proto::Directive {
        eventually(
            &format!("directive {id} {}", state.as_str_name()),
            || async {
                let d = self.directive(id).await;
                if d.state == state as i32 {
                    Ok(d)
                } else {
                    Err(format!("{d:?}"))
                }
            },
        )
        .await
    }

    /// The ids of spoke `name`'s directives in `state`.
    async fn ids_in(&self, name: &str, state: proto::DirectiveState) -> HashSet<String> {
        self.admin()
            .await
            .list_directives(authed(
                proto::ListDirectivesRequest {
                    spoke_name: name.into(),
                    state: state as i32,
                    page_size: 100,
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner()
            .directives
            .into_iter()
            .map(|d| d.id)
            .collect()
    }

    async fn spoke(&self, name: &str) -> proto::Spoke {
        self.admin()
            .await
            .get_spoke(authed(
                proto::GetSpokeRequest {
                    spoke_name: name.into(),
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner()
            .spoke
            .unwrap()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- hub log:\n{}", tail(&self.logged()));
        }
    }
}

struct Registered {
    id: String,
    key: String,
    secret: String,
}

fn registration(name: &str, url: &str, max_in_flight: u32) -> proto::RegisterRequest {
    proto::RegisterRequest {
        name: name.into(),
        capabilities: vec![proto::Capability {
            directive_type: "job".into(),
            version: "1".into(),
        }],
        max_in_flight,
        webhook_url: url.into(),
        ..Default::default()
    }
}

/// A "job" for spoke `name` with `payload`, never due for an ack.
fn job(name: &str, payload: Value, max_attempts: u32) -> proto::CreateDirectiveRequest {
    proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::SpokeName(name.into())),
        }),
        r#type: "job".into(),
        payload: hub_proto::json::from_json(payload),
        max_attempts,
        ack_deadline: Some(pbjson_types::Duration {
            seconds: LONG_ACK_DEADLINE,
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn ack(hub: &Hub, key: &str, id: &str) {
    hub.spokes()
        .await
        .ack(authed(
            proto::AckRequest {
                directive_id: id.into(),
                outcome: proto::AckOutcome::Completed as i32,
                ..Default::default()
            },
            key,
        ))
        .await
        .unwrap_or_else(|e| panic!("ack {id}: {e}"));
}

fn result_of(d: &proto::Directive) -> Value {
    hub_proto::json::to_json(d.result.as_ref().expect("a result"))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A test's directory, CA, receiver and hub (flags `extra`).
async fn setup(python: &Path, extra: &[&str]) -> (tempfile::TempDir, Receiver, Hub) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let receiver = Receiver::start(python, dir.path(), &pki).await;
    let hub = Hub::start(&dir.path().join("hub"), &pki.ca, extra).await;
    (dir, receiver, hub)
}

// ------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_post_carries_the_directive_and_its_answer_completes_it() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    let key = spoke
        .secret
        .strip_prefix("whsec_")
        .unwrap_or_else(|| panic!("a whsec_ secret: {:?}", spoke.secret));
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    assert_eq!(key.len(), 32, "32 random bytes");
    receiver.answer(json!({
        "secrets": {"given": spoke.secret, "other": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        "then": completed(json!({"lines": 3, "ok": true})),
    }));

    let payload =
        json!({"doc": "a-1", "n": 7, "ratio": 0.5, "tags": ["x", "y"], "deep": {"k": null}});
    let created = hub.create(job("edge-1", payload.clone(), 5)).await;
    let done = hub
        .wait_state(&created.id, proto::DirectiveState::Completed)
        .await;
    assert_eq!(result_of(&done), json!({"lines": 3, "ok": true}));
    assert_eq!(done.attempt, 1);

    let seen = receiver.requests();
    assert_eq!(seen.len(), 1, "exactly one POST: {seen:?}");
    let post = &seen[0];
    assert!(post.verified_with("given"), "standardwebhooks: {post:?}");
    assert!(
        !post.verified_with("other"),
        "a wrong secret fails: {post:?}"
    );
    assert_eq!(post.directive_id(), created.id);
    assert_eq!(post.header("hub-directive-id"), created.id);
    assert_eq!(post.attempt(), 1);
    assert_eq!(post.header("content-type"), "application/json");
    let body = post.json();
    assert_eq!(body["id"], created.id.as_str());
    assert_eq!(body["spokeId"], spoke.id.as_str());
    assert_eq!(body["spokeName"], "edge-1");
    assert_eq!(body["type"], "job");
    assert_eq!(body["payload"], payload, "the payload as created");
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["maxAttempts"], 5);

    let shown = hub.spoke("edge-1").await;
    assert_eq!(
        shown.delivery_mode,
        proto::DeliveryMode::Webhook as i32,
        "{shown:?}"
    );
    assert_eq!(shown.webhook_url, receiver.url());
    // PollDirectives is for spokes without a webhook.
    let poll = hub
        .spokes()
        .await
        .poll_directives(authed(proto::PollDirectivesRequest::default(), &spoke.key))
        .await
        .unwrap_err();
    assert_eq!(poll.code(), Code::FailedPrecondition, "{poll:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500_is_retried_until_an_answer_completes_it() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({
        "secrets": {"given": spoke.secret},
        "first": [status(500), status(500)],
        "then": completed(json!({"third": true})),
    }));

    let created = hub.create(job("edge-1", json!({"n": 1}), 5)).await;
    let done = hub
        .wait_state(&created.id, proto::DirectiveState::Completed)
        .await;
    assert_eq!(done.attempt, 3);
    assert_eq!(result_of(&done), json!({"third": true}));

    let seen = receiver.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let attempts: Vec<u32> = seen.iter().map(Seen::attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    for post in &seen {
        assert_eq!(post.directive_id(), created.id, "the same webhook-id");
        assert!(post.verified_with("given"), "{post:?}");
        assert_eq!(post.json()["attempt"], post.attempt());
    }

    let last = eventually("GetSpoke shows the delivery", || async {
        let spoke = hub.spoke("edge-1").await;
        match spoke.last_webhook {
            Some(w) if w.result == "delivered" => Ok(w),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        (last.directive_id.as_str(), last.attempt, last.http_status),
        (created.id.as_str(), 3, 200)
    );
    eventually("/metrics counts 2 errors and 1 delivery", || async {
        let errors = hub
            .metric(r#"hub_webhook_attempts_total{result="http_error"}"#)
            .await;
        let delivered = hub
            .metric(r#"hub_webhook_attempts_total{result="delivered"}"#)
            .await;
        if (errors, delivered) == (Some(2.0), Some(1.0)) {
            Ok(())
        } else {
            Err(format!("http_error {errors:?}, delivered {delivered:?}"))
        }
    })
    .await;

    // The log of it: two requeues saying why, then one webhook delivery.
    let events: Vec<proto::Event> = replay_events(&hub.grpc, ADMIN)
        .await
        .into_iter()
        .filter(|e| e.directive_id == created.id)
        .collect();
    let details = |t: proto::EventType| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e.r#type == t as i32)
            .map(|e| hub_proto::json::to_json(e.details.as_ref().unwrap()))
            .collect()
    };
    let requeued = details(proto::EventType::DirectiveRequeued);
    assert_eq!(requeued.len(), 2, "{events:?}");
    for r in &requeued {
        assert_eq!(r["reason"], "webhook: HTTP 500", "{r}");
    }
    assert_eq!(
        details(proto::EventType::DirectiveDelivered),
        [json!({"attempt": 3, "via": "webhook"})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_within_the_timeout_is_retried() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &["--webhook-timeout", "1s"]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({
        "secrets": {"given": spoke.secret},
        "first": [hang()],
        "then": completed(json!({"late": false})),
    }));

    let created = hub.create(job("edge-1", json!({"n": 1}), 5)).await;
    let done = hub
        .wait_state(&created.id, proto::DirectiveState::Completed)
        .await;
    assert_eq!(done.attempt, 2);
    assert_eq!(result_of(&done), json!({"late": false}));
    let seen = receiver.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen.iter().map(Seen::attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(seen.iter().all(|s| s.verified_with("given")), "{seen:?}");
    // The hub gave up on the first: it closed the connection.
    eventually("the first request's connection closed", || async {
        match receiver.ends().get(&0) {
            Some(how) if how == "client closed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("/metrics counts the timeout", || async {
        match hub
            .metric(r#"hub_webhook_attempts_total{result="timeout"}"#)
            .await
        {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_used_up_fail_the_directive() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({"secrets": {"given": spoke.secret}, "then": status(500)}));

    let created = hub.create(job("edge-1", json!({"n": 1}), 2)).await;
    let failed = hub
        .wait_state(&created.id, proto::DirectiveState::Failed)
        .await;
    assert!(
        failed
            .error
            .contains("webhook delivery failed 2 times; last: HTTP 500"),
        "{failed:?}"
    );
    let seen = receiver.requests();
    assert_eq!(seen.len(), 2, "exactly two POSTs: {seen:?}");
    assert_eq!(seen.iter().map(Seen::attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(seen.iter().all(|s| s.verified_with("given")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_bounds_what_is_posted_until_an_ack() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 2).await;
    // Received, not done: each stays DELIVERED until the spoke acks.
    receiver.answer(json!({"secrets": {"given": spoke.secret}, "then": empty_200()}));

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(hub.create(job("edge-1", json!({"n": n}), 5)).await.id);
    }
    use proto::DirectiveState::{Delivered, Pending};
    let window = |delivered: HashSet<String>, pending: HashSet<String>| {
        (delivered.len() == 2 && pending.len() == 3).then_some((delivered, pending))
    };
    let (delivered, _) = eventually("2 DELIVERED, 3 PENDING", || async {
        let delivered = hub.ids_in("edge-1", Delivered).await;
        let pending = hub.ids_in("edge-1", Pending).await;
        let shown = format!("{delivered:?} / {pending:?}");
        window(delivered, pending).ok_or(shown)
    })
    .await;
    // Oldest first.
    assert_eq!(delivered, ids[..2].iter().cloned().collect());
    // A grace period: still only two posted, three waiting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = receiver.requests();
    assert_eq!(seen.len(), 2, "the window is 2: {seen:?}");
    let posted: HashSet<String> = seen.iter().map(Seen::directive_id).collect();
    assert_eq!(posted, delivered);
    assert_eq!(hub.ids_in("edge-1", Pending).await.len(), 3);

    ack(&hub, &spoke.key, &ids[0]).await;
    let seen = receiver.wait_for(3).await;
    assert_eq!(seen[2].directive_id(), ids[2], "the oldest waiting one");
    let (delivered, pending) = eventually("2 DELIVERED, 2 PENDING", || async {
        let delivered = hub.ids_in("edge-1", Delivered).await;
        let pending = hub.ids_in("edge-1", Pending).await;
        if delivered.len() == 2 && pending.len() == 2 {
            Ok((delivered, pending))
        } else {
            Err(format!("{delivered:?} / {pending:?}"))
        }
    })
    .await;
    assert_eq!(delivered, [ids[1].clone(), ids[2].clone()].into());
    assert_eq!(pending, ids[3..].iter().cloned().collect());
    let seen = receiver.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.high_water <= 2), "{seen:?}");
    assert!(seen.iter().all(|s| s.verified_with("given")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_expiry() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({"secrets": {"given": spoke.secret}, "then": status(500)}));

    // Retries 1 s, 2 s, 4 s (±20 %) after each failure: attempts at about
    // 0, 1 and 3 s come before the expiry, a fourth (5.6 s at the earliest)
    // would come after it.
    let expires_ms = ((now_s() + 5.5) * 1000.0) as i64;
    let mut req = job("edge-1", json!({"n": 1}), 10);
    req.expires_at = Some(pbjson_types::Timestamp {
        seconds: expires_ms.div_euclid(1000),
        nanos: (expires_ms.rem_euclid(1000) * 1_000_000) as i32,
    });
    let created = hub.create(req).await;
    let expired = hub
        .wait_state(&created.id, proto::DirectiveState::Expired)
        .await;
    let expires_at = expires_ms as f64 / 1000.0;
    // Past where a fourth attempt (at most 8.4 s after the first) would be.
    while now_s() < expires_at + 4.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = receiver.requests();
    assert!(seen.len() >= 2, "retried before the expiry: {seen:?}");
    assert!(seen.len() < 10, "{seen:?}");
    for post in &seen {
        assert!(post.verified_with("given"), "{post:?}");
        let sent: f64 = post.header("webhook-timestamp").parse().unwrap();
        assert!(
            sent <= expires_at && post.at < expires_at,
            "a POST after the expiry at {expires_at}: {post:?}"
        );
    }
    assert_eq!(expired.state, proto::DirectiveState::Expired as i32);
    assert_eq!(
        hub.directive(&created.id).await.attempt as usize,
        seen.len(),
        "every counted attempt reached the receiver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_does_not_slow_a_streaming_spoke() {
    let python = python_or_skip!();
    let flags = [
        "--webhook-timeout",
        "120s",
        "--webhook-concurrency",
        "4",
        "--webhook-spoke-concurrency",
        "2",
    ];
    let (_dir, receiver, hub) = setup(&python, &flags).await;
    receiver.answer(json!({"then": hang()}));
    // Two webhook spokes whose endpoint never answers take every one of the
    // hub's four webhook request slots.
    for name in ["hook-a", "hook-b"] {
        hub.register_webhook(name, &receiver.url(), 32).await;
        for n in 0..10 {
            hub.create(job(name, json!({"n": n}), 5)).await;
        }
    }
    eventually("4 requests hang at the receiver", || async {
        let out = receiver.outstanding().len();
        if out == 4 {
            Ok(())
        } else {
            Err(format!("{out} outstanding"))
        }
    })
    .await;

    // A streaming spoke goes on as usual.
    let streamer = hub
        .spokes()
        .await
        .register(authed(
            proto::RegisterRequest {
                name: "streamer".into(),
                capabilities: vec![proto::Capability {
                    directive_type: "job".into(),
                    version: "1".into(),
                }],
                ..Default::default()
            },
            ENROLL,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut stream = hub
        .spokes()
        .await
        .watch_directives(authed(
            proto::WatchDirectivesRequest {},
            &streamer.spoke_key,
        ))
        .await
        .unwrap()
        .into_inner();
    for n in 0..3 {
        let created = hub.create(job("streamer", json!({"n": n}), 5)).await;
        let got = loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the directive arrives on the stream in time")
                .expect("the stream stays open")
                .expect("the stream stays open");
            if let Some(Message::Directive(d)) = msg.message {
                break d;
            }
        };
        assert_eq!(got.id, created.id);
        ack(&hub, &streamer.spoke_key, &got.id).await;
        hub.wait_state(&created.id, proto::DirectiveState::Completed)
            .await;
    }

    // All the while the webhook requests hung, within the hub's bounds.
    let seen = receiver.requests();
    assert_eq!(receiver.outstanding().len(), 4, "{seen:?}");
    assert_eq!(seen.len(), 4, "no more than the 4 slots: {seen:?}");
    assert!(seen.iter().all(|s| s.high_water <= 4), "{seen:?}");
    for name in ["hook-a", "hook-b"] {
        let ids = hub.ids_in(name, proto::DirectiveState::Pending).await;
        let posted = seen.iter().filter(|s| ids.contains(&s.directive_id()));
        assert_eq!(posted.count(), 2, "two at a time to {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssrf_guard_refuses_metadata_plain_http_and_the_hubs_own_ports() {
    // No receiver needed: the hub refuses these at registration.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hub = Hub::start(&dir.path().join("hub"), &pki.ca, &[]).await;
    let refused = [
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "http://example.com/hook".to_owned(),
        format!("http://127.0.0.1:{}/", hub.grpc_port),
        format!("https://localhost:{}/", hub.http.port()),
    ];
    for (i, url) in refused.iter().enumerate() {
        let err = hub
            .spokes()
            .await
            .register(authed(registration(&format!("s{i}"), url, 8), ENROLL))
            .await
            .expect_err(url);
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
        assert!(err.message().contains("webhook_url"), "{url}: {err:?}");
    }
    let spokes = hub
        .admin()
        .await
        .list_spokes(authed(proto::ListSpokesRequest::default(), ADMIN))
        .await
        .unwrap()
        .into_inner()
        .spokes;
    assert!(spokes.is_empty(), "nothing registered: {spokes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_delivery_delivers_after_a_restart() {
    let python = python_or_skip!();
    let (_dir, receiver, mut hub) = setup(&python, &["--webhook-timeout", "120s"]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({
        "secrets": {"given": spoke.secret},
        "first": [hang()],
        "then": completed(json!({"after": "restart"})),
    }));
    let created = hub.create(job("edge-1", json!({"n": 1}), 5)).await;
    let first = receiver.wait_for(1).await;
    assert_eq!(first[0].directive_id(), created.id);

    hub.kill();
    eventually("the killed hub's connection closes", || async {
        match receiver.ends().get(&0) {
            Some(how) if how == "client closed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    hub.restart().await;

    let done = hub
        .wait_state(&created.id, proto::DirectiveState::Completed)
        .await;
    assert!(
        done.attempt >= 2,
        "the attempt out at the kill counted: {done:?}"
    );
    assert_eq!(result_of(&done), json!({"after": "restart"}));
    let seen = receiver.requests();
    assert!(seen.len() >= 2, "{seen:?}");
    for post in &seen {
        assert_eq!(post.directive_id(), created.id);
        assert!(post.verified_with("given"), "the secret survives: {post:?}");
    }
    let attempts: Vec<u32> = seen.iter().map(Seen::attempt).collect();
    let distinct: HashSet<u32> = attempts.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        attempts.len(),
        "each attempt once: {attempts:?}"
    );
    assert_eq!(*attempts.last().unwrap(), done.attempt);
    let all = hub
        .ids_in("edge-1", proto::DirectiveState::Unspecified)
        .await;
    assert_eq!(all, [created.id.clone()].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_brings_a_new_secret_and_the_old_one_stops_signing() {
    let python = python_or_skip!();
    let (_dir, receiver, hub) = setup(&python, &[]).await;
    let spoke = hub.register_webhook("edge-1", &receiver.url(), 8).await;
    receiver.answer(json!({
        "secrets": {"old": spoke.secret},
        "then": completed(json!({})),
    }));
    let before = hub.create(job("edge-1", json!({"n": 1}), 5)).await;
    hub.wait_state(&before.id, proto::DirectiveState::Completed)
        .await;

    let rotated = hub
        .admin()
        .await
        .rotate_spoke_key(authed(
            proto::RotateSpokeKeyRequest {
                spoke_name: "edge-1".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        rotated.webhook_secret.starts_with("whsec_"),
        "{:?}",
        rotated.webhook_secret
    );
    assert_ne!(rotated.webhook_secret, spoke.secret);
    receiver.answer(json!({
        "secrets": {"old": spoke.secret, "new": rotated.webhook_secret},
        "then": completed(json!({})),
    }));
    let after = hub.create(job("edge-1", json!({"n": 2}), 5)).await;
    hub.wait_state(&after.id, proto::DirectiveState::Completed)
        .await;

    let seen = receiver.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].directive_id(), before.id);
    assert!(seen[0].verified_with("old"), "{:?}", seen[0]);
    assert_eq!(seen[1].directive_id(), after.id);
    assert!(seen[1].verified_with("new"), "{:?}", seen[1]);
    assert!(!seen[1].verified_with("old"), "{:?}", seen[1]);
}
