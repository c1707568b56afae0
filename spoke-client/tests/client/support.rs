//! Starts the real hub in process on 127.0.0.1 with a fresh SQLite file
//! (listeners bound before the server task starts; a panic of the server
//! task is re-raised on stop), in plaintext or over TLS with a CA made for
//! the test, restarts it on the same port and data dir, and gives tests
//! spoke clients and small helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub::auth::TokenHash;
use hub::{Settings, TlsIdentity};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use spoke_client::{Client, ClientBuilder};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Status};

pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
pub const ENROLLMENT_TOKEN: &str = "enrollment-token-for-tests-012345";

/// A hub running in this process.
pub struct TestHub {
    pub addr: SocketAddr,
    /// The CA (PEM) of the hub's certificate, when it serves TLS.
    pub ca: Option<String>,
    dir: PathBuf,
    settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), hub::RunError>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Binds `addr` (port 0: any), allowing a port the previous hub just left.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).expect("bind the hub's port");
    socket.listen(1024).unwrap()
}

impl TestHub {
    /// A hub with default settings on a fresh data directory.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut hub = Self::start_in(
            tmp.path(),
            Settings::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        hub._tmp = Some(tmp);
        hub
    }

    /// A hub serving TLS with a certificate for 127.0.0.1 and localhost,
    /// signed by a fresh CA ([`TestHub::ca`]).
    pub async fn start_tls() -> Self {
        let pki = Pki::new();
        let settings = Settings {
            tls: Some(TlsIdentity::from_pem(pki.cert, pki.key).expect("a valid identity")),
            ..Settings::default()
        };
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut hub = Self::start_in(tmp.path(), settings, "127.0.0.1:0".parse().unwrap()).await;
        hub._tmp = Some(tmp);
        hub.ca = Some(pki.ca);
        hub
    }

    async fn start_in(dir: &Path, settings: Settings, addr: SocketAddr) -> Self {
        let url = format!("sqlite://{}", dir.join("hub.db").display());
        let store = hub::Store::open(&url).await.expect("open store");
        let grpc = bind(addr);
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let secrets = hub::Secrets {
            admin_token: TokenHash::new(ADMIN_TOKEN),
            enrollment_token: TokenHash::new(ENROLLMENT_TOKEN),
        };
        let task = tokio::spawn(hub::run(
            grpc,
            http,
            store,
            settings.clone(),
            secrets,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            ca: None,
            dir: dir.to_path_buf(),
            settings,
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Shuts the hub down gracefully and waits for it; re-raises a panic of
    /// the server task.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(result) => result.expect("hub run returned an error"),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("hub task failed: {e}"),
            }
        }
    }

    /// Starts a stopped hub again on the same port and data directory.
    pub async fn start_again(&mut self) {
        assert!(self.task.is_none(), "stop the hub first");
        let tmp = self._tmp.take();
        let ca = self.ca.take();
        let dir = self.dir.clone();
        *self = Self::start_in(&dir, self.settings.clone(), self.addr).await;
        self._tmp = tmp;
        self.ca = ca;
    }

    /// Stops the hub and starts it again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
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

    pub async fn revoke(&self, name: &str) -> Result<(), Status> {
        let req = proto::RevokeSpokeRequest {
            spoke_name: name.into(),
            ..Default::default()
        };
        self.admin().await.revoke_spoke(authed(req)).await.map(drop)
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A fresh CA, and a server certificate it signed for 127.0.0.1 and
/// localhost (all PEM); made at test time, never stored.
pub struct Pki {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "spoke-client test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &ca).unwrap();
        Self {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

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
