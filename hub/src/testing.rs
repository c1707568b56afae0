//! Test support (cargo feature `testing`): the real hub in this process on
//! 127.0.0.1 with a fresh SQLite file, the one harness the workspace's
//! integration tests share. Listeners are bound before the server task
//! starts, so clients can connect at once; stopping re-raises a panic of the
//! server task; a restart keeps the port and the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::TokenHash;
use crate::{RunError, Secrets, Settings, Store};

/// The admin token of every test hub.
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
/// The enrollment token of every test hub.
pub const ENROLLMENT_TOKEN: &str = "enrollment-token-for-tests-012345";

/// A hub running in this process.
pub struct TestHub {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The HTTP address (health, metrics, admin page).
    pub http_addr: SocketAddr,
    dir: PathBuf,
    settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
    tmp: Option<tempfile::TempDir>,
}

/// Binds `addr` (port 0: any), allowing a port the previous hub just left.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind the hub's port");
    socket.listen(1024).expect("listen")
}

impl TestHub {
    /// A hub with default settings on a fresh data directory.
    pub async fn start() -> Self {
        Self::start_with(Settings::default()).await
    }

    /// A hub with `settings` on a fresh data directory.
    pub async fn start_with(settings: Settings) -> Self {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let any = "127.0.0.1:0".parse().expect("an address");
        let mut hub = Self::start_in(tmp.path(), settings, any).await;
        hub.tmp = Some(tmp);
        hub
    }

    async fn start_in(dir: &Path, settings: Settings, addr: SocketAddr) -> Self {
        let url = format!("sqlite://{}", dir.join("hub.db").display());
        let store = Store::open(&url, crate::store::Durability::Full)
            .await
            .expect("open the store");
        let grpc = bind(addr);
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let addr = grpc.local_addr().expect("gRPC address");
        let http_addr = http.local_addr().expect("HTTP address");
        let (stop, stopped) = oneshot::channel::<()>();
        let secrets = Secrets {
            admin_token: TokenHash::new(ADMIN_TOKEN),
            enrollment_token: TokenHash::new(ENROLLMENT_TOKEN),
        };
        let task = tokio::spawn(crate::run(
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
            http_addr,
            dir: dir.to_path_buf(),
            settings,
            stop: Some(stop),
            task: Some(task),
            tmp: None,
        }
    }

    /// The hub's data directory (its database is `hub.db` there).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The settings the hub runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The hub's gRPC URL (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        let scheme = if self.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Shuts the hub down gracefully and waits for it; re-raises a panic of
    /// the server task.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(result) => result.expect("hub::run returned an error"),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("the hub task failed: {e}"),
            }
        }
    }

    /// Starts a stopped hub again on the same port and data directory.
    pub async fn start_again(&mut self) {
        self.start_again_on(self.addr, self.settings.clone()).await;
    }

    /// Starts a stopped hub again on the same data directory, at `addr`
    /// (another address plays a hub that moved; port 0: any free port) and
    /// with `settings`.
    pub async fn start_again_on(&mut self, addr: SocketAddr, settings: Settings) {
        assert!(self.task.is_none(), "stop the hub first");
        let tmp = self.tmp.take();
        let dir = self.dir.clone();
        *self = Self::start_in(&dir, settings, addr).await;
        self.tmp = tmp;
    }

    /// Starts a stopped hub again on the same port and data directory with
    /// other `settings` (an operator changed its limits).
    pub async fn start_again_with(&mut self, settings: Settings) {
        self.settings = settings;
        self.start_again().await;
    }

    /// Stops the hub and starts it again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("an ASCII token"),
    );
    req
}

/// A CA made for one test, and a server certificate it signed for
/// 127.0.0.1 and localhost (all PEM). Nothing is written to disk.
pub struct TestPki {
    /// The CA certificate clients should trust.
    pub ca: String,
    /// The hub's certificate.
    pub cert: String,
    /// The hub's private key.
    pub key: String,
}

impl TestPki {
    /// A fresh CA and server certificate.
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "hub test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a CA key"))
            .expect("a self-signed CA");
        let key = KeyPair::generate().expect("a server key");
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server certificate parameters");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf
            .signed_by(&key, &ca)
            .expect("a signed server certificate");
        Self {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// The hub's identity, for `Settings::tls`.
    pub fn identity(&self) -> crate::TlsIdentity {
        crate::TlsIdentity::from_pem(self.cert.clone(), self.key.clone()).expect("a valid identity")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
