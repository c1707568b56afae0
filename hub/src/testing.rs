//! Test support (cargo feature `testing`): the real hub in this process on
//! 127.0.0.1 with a fresh database, the one harness the workspace's
//! integration tests share. Listeners are bound before the server task
//! starts, so clients can connect at once; stopping re-raises a panic of the
//! server task; a restart keeps the port, the data directory and the
//! database.
//!
//! The database is a fresh SQLite file in the data directory, or, when the
//! environment says `HUB_TEST_DATABASE=postgres`, a fresh database on the
//! PostgreSQL server at `HUB_TEST_POSTGRES_URL` (`tests/run.sh` runs the
//! suites both ways). This module is test support, not the hub: it is the
//! one place of the library that reads the environment.

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
    database_url: String,
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
        let url = test_database(tmp.path()).await;
        let mut hub = Self::start_in(tmp.path(), url, settings, any).await;
        hub.tmp = Some(tmp);
        hub
    }

    async fn start_in(dir: &Path, url: String, settings: Settings, addr: SocketAddr) -> Self {
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
            database_url: url,
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

    /// The hub's database (an `sqlite:` or a `postgres:` URL).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Cuts the hub's PostgreSQL database off (every session on it ends and
    /// no new one is let in: to the hub, the database is gone), or lets it
    /// back. Panics on SQLite, which cannot go away.
    pub async fn set_database_reachable(&self, reachable: bool) {
        assert!(on_postgres(), "a PostgreSQL matter: skip it on SQLite");
        let server = std::env::var("HUB_TEST_POSTGRES_URL").expect("HUB_TEST_POSTGRES_URL");
        crate::store::set_postgres_database_reachable_for_test(
            &server,
            &self.database_url,
            reachable,
        )
        .await
        .expect("change whether the test database takes connections");
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
        let url = self.database_url.clone();
        *self = Self::start_in(&dir, url, settings, addr).await;
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

/// Whether the test hubs run on PostgreSQL (`HUB_TEST_DATABASE=postgres`)
/// rather than SQLite.
pub fn on_postgres() -> bool {
    match std::env::var("HUB_TEST_DATABASE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("HUB_TEST_DATABASE={other}: expected sqlite or postgres"),
    }
}

/// For a test about SQLite itself: on PostgreSQL, says it is skipped and
/// why, and returns `true` (the test returns at once).
pub fn skip_on_postgres(why: &str) -> bool {
    let skip = on_postgres();
    if skip {
        eprintln!("skipped on PostgreSQL: {why}");
    }
    skip
}

/// A fresh database for a test: `hub.db` in `dir`, or a new database on
/// the PostgreSQL server at `HUB_TEST_POSTGRES_URL` (see the module's doc).
pub async fn test_database(dir: &Path) -> String {
    if !on_postgres() {
        return format!("sqlite://{}", dir.join("hub.db").display());
    }
    let server = std::env::var("HUB_TEST_POSTGRES_URL").expect(
        "HUB_TEST_DATABASE=postgres needs HUB_TEST_POSTGRES_URL \
         (source tests/lib/postgres.sh; pg_start)",
    );
    crate::store::create_postgres_database_for_test(&server)
        .await
        .expect("create a test database on HUB_TEST_POSTGRES_URL")
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
