//! The shared in-process hub (`hub::testing::TestHub`: 127.0.0.1, a fresh
//! SQLite file, restarts on the same port and data dir), in plaintext or
//! over TLS with a CA made for the test, plus spoke clients and small
//! helpers.

use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use spoke_client::{Client, ClientBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Status};

pub use hub::testing::{ADMIN_TOKEN, ENROLLMENT_TOKEN};

/// The shared test hub, with helpers for the client's tests.
pub struct TestHub {
    inner: hub::testing::TestHub,
    /// The CA (PEM) of the hub's certificate, when it serves TLS.
    pub ca: Option<String>,
}

impl Deref for TestHub {
    type Target = hub::testing::TestHub;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for TestHub {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl TestHub {
    /// A hub with default settings on a fresh data directory.
    pub async fn start() -> Self {
        Self {
            inner: hub::testing::TestHub::start().await,
            ca: None,
        }
    }

    /// A hub with `settings` on a fresh data directory.
    pub async fn start_with(settings: Settings) -> Self {
        Self {
            inner: hub::testing::TestHub::start_with(settings).await,
            ca: None,
        }
    }

    /// A hub serving TLS with a certificate for 127.0.0.1 and localhost,
    /// signed by a fresh CA ([`TestHub::ca`]).
    pub async fn start_tls() -> Self {
        let pki = Pki::new();
        let settings = Settings {
            tls: Some(pki.identity()),
            ..Settings::default()
        };
        Self {
            inner: hub::testing::TestHub::start_with(settings).await,
            ca: Some(pki.ca),
        }
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        let mut endpoint = Channel::from_shared(self.url()).unwrap();
        if let Some(ca) = &self.ca {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint.connect().await.expect("connect to hub");
        AdminServiceClient::new(channel)
    }

    pub async fn create(&self, req: proto::CreateDirectiveRequest) -> proto::Directive {
        self.admin()
            .await
            .create_directive(authed(req))
            .await
            .expect("create directive")
            .into_inner()
            .directives
            .remove(0)
    }

    /// Creates a directive of `kind` for the spoke named `name`.
    pub async fn send(
        &self,
        name: &str,
        kind: &str,
        payload: serde_json::Value,
    ) -> proto::Directive {
        self.create(create_for(name, kind, payload)).await
    }

    pub async fn directive(&self, id: &str) -> proto::Directive {
        let req = proto::GetDirectiveRequest {
            directive_id: id.into(),
        };
        self.admin()
            .await
            .get_directive(authed(req))
            .await
            .expect("get directive")
            .into_inner()
            .directive
            .unwrap()
    }

    /// Waits until directive `id` is final on the hub, and returns it.
    pub async fn final_state(&self, id: &str) -> proto::Directive {
        eventually(&format!("directive {id} final"), || async {
            let d = self.directive(id).await;
            let fin = [
                proto::DirectiveState::Completed,
                proto::DirectiveState::Failed,
                proto::DirectiveState::Rejected,
                proto::DirectiveState::Cancelled,
            ];
            fin.iter().any(|s| *s as i32 == d.state).then_some(d)
        })
        .await
    }

    pub async fn points(&self, spoke: &str) -> Vec<proto::StoredMetricPoint> {
        let req = proto::QueryMetricsRequest {
            spoke_name: spoke.into(),
            page_size: 1000,
            ..Default::default()
        };
        match self.admin().await.query_metrics(authed(req)).await {
            Ok(res) => res.into_inner().points,
            // Not registered yet: no points either.
            Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
            Err(status) => panic!("query metrics: {status}"),
        }
    }

    /// Whether the hub knows the spoke `name` and holds its stream.
    pub async fn connected(&self, name: &str) -> bool {
        let req = proto::GetSpokeRequest {
            spoke_name: name.into(),
            ..Default::default()
        };
        match self.admin().await.get_spoke(authed(req)).await {
            Ok(res) => res.into_inner().spoke.is_some_and(|s| s.connected),
            Err(_) => false,
        }
    }

    /// Waits until the spoke `name` is registered and streaming.
    pub async fn wait_connected(&self, name: &str) {
        eventually(&format!("spoke {name} streaming"), || async {
            self.connected(name).await.then_some(())
        })
        .await;
    }

    pub async fn cancel(&self, id: &str, reason: &str) -> Result<proto::Directive, Status> {
        let req = proto::CancelDirectiveRequest {
            directive_id: id.into(),
            reason: reason.into(),
        };
        let res = self.admin().await.cancel_directive(authed(req)).await?;
        Ok(res.into_inner().directive.unwrap_or_default())
    }

    /// How many `hub.v1.SpokeService/<method>` calls the hub's `/metrics`
    /// counts, whatever their code (a stream counts when it opens).
    pub async fn rpc_count(&self, method: &str) -> u64 {
        let mut http = tokio::net::TcpStream::connect(self.http_addr)
            .await
            .expect("reach the hub's HTTP port");
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http_addr
        );
        http.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        http.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let series =
            format!("hub_rpc_duration_seconds_count{{method=\"hub.v1.SpokeService/{method}\",");
        response
            .lines()
            .filter(|line| line.starts_with(&series))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// How many DIRECTIVE_COMPLETED events the hub logged, per directive.
    pub async fn completions(&self) -> HashMap<String, u32> {
        let req = proto::WatchEventsRequest {
            types: vec![proto::EventType::DirectiveCompleted.into()],
            stop_after_replay: true,
            ..Default::default()
        };
        let mut events = self
            .admin()
            .await
            .watch_events(authed(req))
            .await
            .expect("WatchEvents")
            .into_inner();
        let mut count = HashMap::new();
        while let Some(msg) = events.message().await.expect("the event stream") {
            let event = msg.event.expect("an event");
            *count.entry(event.directive_id).or_default() += 1;
        }
        count
    }

    pub async fn revoke(&self, name: &str) -> Result<(), Status> {
        let req = proto::RevokeSpokeRequest {
            spoke_name: name.into(),
            ..Default::default()
        };
        self.admin().await.revoke_spoke(authed(req)).await.map(drop)
    }
}

pub use hub::testing::TestPki as Pki;

/// Adds `authorization: Bearer <admin token>`.
pub fn authed<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    req
}

pub fn create_for(
    name: &str,
    kind: &str,
    payload: serde_json::Value,
) -> proto::CreateDirectiveRequest {
    proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::SpokeName(name.into())),
        }),
        r#type: kind.into(),
        payload: Some(serde_json::from_value(payload).expect("a JSON object")),
        ..Default::default()
    }
}

/// Where [`manual_clock`] starts, in Unix milliseconds.
pub const MANUAL_CLOCK_MS: i64 = 1_800_000_000_000;

/// Hub settings with a clock the test moves (`settings().clock.advance`):
/// ack deadlines pass when the test says so.
pub fn manual_clock() -> Settings {
    Settings {
        clock: hub::Clock::manual(MANUAL_CLOCK_MS),
        ..Settings::default()
    }
}

/// A Struct as JSON, whole numbers without a fraction.
pub fn json(s: &Option<pbjson_types::Struct>) -> serde_json::Value {
    hub::wire::value_of_struct(s.as_ref().expect("a struct"))
}

/// A spoke client for `endpoint` keeping its state in `dir`, with short
/// shutdown grace and no interval flushes unless a test sets them.
pub fn spoke(name: &str, endpoint: &str, dir: &Path) -> ClientBuilder {
    Client::builder(name)
        .endpoint(endpoint)
        .enrollment_token(ENROLLMENT_TOKEN)
        .state_dir(dir)
        .shutdown_grace(Duration::from_secs(5))
        .flush_interval(Duration::from_secs(3600))
}

/// Runs `client` in a task; the handle answers what `run` returned.
pub fn run(client: &Client) -> JoinHandle<spoke_client::Result<()>> {
    let client = client.clone();
    tokio::spawn(async move { client.run().await })
}

/// Waits until the client has an open stream.
pub async fn connected(client: &Client) {
    eventually("the spoke to connect", || async {
        client.status().connected.then_some(())
    })
    .await;
}

/// Polls `probe` until it answers `Some`; fails the test after 30 s. The
/// bound only turns a hang into a failure: nothing asserts on time.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The local status of directive `id` in a state directory, read straight
/// from the spoke's SQLite file.
pub async fn local_status(state_dir: &Path, id: &str) -> Option<String> {
    let url = format!("sqlite://{}?mode=ro", state_dir.join("spoke.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the spoke's state");
    let status = sqlx::query_scalar("SELECT status FROM directives WHERE id = $1")
        .bind(id)
        .fetch_optional(&pool)
        .await
        .expect("read the spoke's state");
    pool.close().await;
    status
}
