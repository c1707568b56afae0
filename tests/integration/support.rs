//! The shared in-process hub (`hub::testing::TestHub`, started on
//! 127.0.0.1 with a fresh SQLite file) plus clients and small helpers for
//! these tests.

use std::ops::{Deref, DerefMut};

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub use hub::testing::{ADMIN_TOKEN, ENROLLMENT_TOKEN, authed};

/// The shared test hub, with helpers for these tests.
pub struct TestHub(hub::testing::TestHub);

impl Deref for TestHub {
    type Target = hub::testing::TestHub;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for TestHub {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl TestHub {
    /// A hub with default settings on a fresh data directory.
    pub async fn start() -> Self {
        Self(hub::testing::TestHub::start().await)
    }

    /// A hub with `settings` on a fresh data directory.
    pub async fn start_with(settings: Settings) -> Self {
        Self(hub::testing::TestHub::start_with(settings).await)
    }

    /// A hub on a manual clock (starting in 2027), and that clock.
    pub async fn start_manual(settings: Settings) -> (Self, hub::Clock) {
        let clock = hub::Clock::manual(1_800_000_000_000);
        let hub = Self::start_with(Settings {
            clock: clock.clone(),
            ..settings
        })
        .await;
        (hub, clock)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to hub")
    }

    pub async fn spoke_client(&self) -> SpokeServiceClient<Channel> {
        SpokeServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    /// Registers a spoke handling `types`, returning its id and key.
    pub async fn register(&self, name: &str, types: &[&str], labels: &[(&str, &str)]) -> Spoke {
        self.register_with_window(name, types, labels, 0).await
    }

    /// Registers a spoke asking for an in-flight window of `window` (0: the
    /// hub's default).
    pub async fn register_with_window(
        &self,
        name: &str,
        types: &[&str],
        labels: &[(&str, &str)],
        window: u32,
    ) -> Spoke {
        let req = proto::RegisterRequest {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capabilities: types
                .iter()
                .map(|t| proto::Capability {
                    directive_type: t.to_string(),
                    version: "1".into(),
                })
                .collect(),
            version: "1.0.0".into(),
            max_in_flight: window,
            ..Default::default()
        };
        let res = self
            .spoke_client()
            .await
            .register(authed(req, ENROLLMENT_TOKEN))
            .await
            .expect("register")
            .into_inner();
        let spoke = res.spoke.unwrap();
        assert!(!res.spoke_key.is_empty(), "a new spoke gets a key");
        Spoke {
            id: spoke.id,
            name: spoke.name,
            key: res.spoke_key,
            client: self.spoke_client().await,
        }
    }

    /// Creates a directive of `kind` for the spoke named `name`.
    pub async fn send(
        &self,
        name: &str,
        kind: &str,
        payload: serde_json::Value,
    ) -> proto::Directive {
        self.create(create_for(name, kind, payload))
            .await
            .directives
            .remove(0)
    }

    pub async fn create(
        &self,
        req: proto::CreateDirectiveRequest,
    ) -> proto::CreateDirectiveResponse {
        self.admin()
            .await
            .create_directive(authed(req, ADMIN_TOKEN))
            .await
            .expect("create directive")
            .into_inner()
    }

    pub async fn directive(&self, id: &str) -> proto::Directive {
        let req = proto::GetDirectiveRequest {
            directive_id: id.into(),
        };
        self.admin()
            .await
            .get_directive(authed(req, ADMIN_TOKEN))
            .await
            .expect("get directive")
            .into_inner()
            .directive
            .unwrap()
    }

    pub async fn spoke(&self, name: &str) -> proto::Spoke {
        let req = proto::GetSpokeRequest {
            spoke_name: name.into(),
            ..Default::default()
        };
        self.admin()
            .await
            .get_spoke(authed(req, ADMIN_TOKEN))
            .await
            .expect("get spoke")
            .into_inner()
            .spoke
            .unwrap()
    }

    /// Every directive, newest first (all pages).
    pub async fn all_directives(&self) -> Vec<proto::Directive> {
        let mut admin = self.admin().await;
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = proto::ListDirectivesRequest {
                page_token: token,
                page_size: 1000,
                ..Default::default()
            };
            let page = admin
                .list_directives(authed(req, ADMIN_TOKEN))
                .await
                .unwrap()
                .into_inner();
            out.extend(page.directives);
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    pub async fn points(&self, req: proto::QueryMetricsRequest) -> Vec<proto::StoredMetricPoint> {
        self.admin()
            .await
            .query_metrics(authed(req, ADMIN_TOKEN))
            .await
            .expect("query metrics")
            .into_inner()
            .points
    }
}

/// A registered spoke with its own client.
pub struct Spoke {
    pub id: String,
    pub name: String,
    pub key: String,
    pub client: SpokeServiceClient<Channel>,
}

impl Spoke {
    pub fn req<T>(&self, msg: T) -> Request<T> {
        authed(msg, &self.key)
    }

    pub async fn watch(&mut self) -> tonic::Streaming<proto::WatchDirectivesResponse> {
        let req = self.req(proto::WatchDirectivesRequest {});
        self.client
            .watch_directives(req)
            .await
            .expect("watch")
            .into_inner()
    }

    pub async fn ack(
        &mut self,
        id: &str,
        outcome: proto::AckOutcome,
        result: serde_json::Value,
    ) -> Result<proto::AckResponse, Status> {
        let req = proto::AckRequest {
            directive_id: id.into(),
            outcome: outcome.into(),
            result: Some(json_struct(result)),
            error: if matches!(
                outcome,
                proto::AckOutcome::Failed | proto::AckOutcome::Rejected
            ) {
                "it broke".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        let req = self.req(req);
        self.client.ack(req).await.map(|r| r.into_inner())
    }
}

pub fn json_struct(value: serde_json::Value) -> pbjson_types::Struct {
    serde_json::from_value(value).expect("a JSON object")
}

/// A Struct as JSON, whole numbers without a fraction (as the hub stores it).
pub fn struct_json(s: &pbjson_types::Struct) -> serde_json::Value {
    hub::wire::value_of_struct(s)
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
        payload: Some(json_struct(payload)),
        ..Default::default()
    }
}

/// The next directive on a stream, skipping keepalives; panics after 10 s.
pub async fn next_directive(
    stream: &mut tonic::Streaming<proto::WatchDirectivesResponse>,
) -> proto::Directive {
    use proto::watch_directives_response::Message;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("a directive within 10 s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(Message::Directive(d)) = msg.message {
            return d;
        }
    }
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "status: {status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} should mention {needle:?}",
                status.message()
            );
        }
    }
}

/// The next message of any kind on a stream; panics after 10 s.
pub async fn next_message(
    stream: &mut tonic::Streaming<proto::WatchDirectivesResponse>,
) -> Result<proto::watch_directives_response::Message, Status> {
    use proto::watch_directives_response::Message;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("a message within 10 s")?;
        match msg.and_then(|m| m.message) {
            Some(Message::Keepalive(_)) => continue,
            Some(other) => return Ok(other),
            None => return Err(Status::cancelled("stream ended")),
        }
    }
}

/// Polls `check` until it returns `Some`, for at most 10 s; for effects of
/// background work (timers) that the test cannot await directly.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until the directive reaches `state`.
pub async fn wait_state(hub: &TestHub, id: &str, state: proto::DirectiveState) -> proto::Directive {
    eventually(&format!("{id} to be {state:?}"), || async {
        let d = hub.directive(id).await;
        (d.state == state as i32).then_some(d)
    })
    .await
}

/// A plain HTTP/1.1 request to the hub's HTTP port; returns the whole
/// response (status line, headers, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}
