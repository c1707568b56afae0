//! The real `hub` binary as a child process on a fixed port and data
//! directory, so that a SIGKILL and a start again look to clients like the
//! same hub coming back. Started the way `tests/kill.rs` starts it; each
//! start logs to its own file in the data directory.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "admin-token-for-the-fault-suite-0123";
pub const ENROLLMENT_TOKEN: &str = "enrollment-token-for-the-fault-suite";

/// A hub process; killed (SIGKILL) and reaped when dropped.
pub struct HubProcess {
    dir: PathBuf,
    port: u16,
    /// Flags added to every start.
    extra: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl HubProcess {
    /// Starts the hub in `<run>/hub` on a port free right now.
    pub async fn start(run: &Path, extra: &[&str], sync: &str) -> Self {
        let dir = run.join("hub");
        std::fs::create_dir_all(&dir).unwrap();
        // The port is kept for every later start; the hub binds with
        // SO_REUSEADDR, so the killed process's connections do not block it.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut hub = Self {
            dir,
            port,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            starts: 0,
        };
        hub.start_again(sync).await;
        hub
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary again on the same port and data directory, with
    /// `--sync <sync>`; returns once it accepts gRPC connections.
    pub async fn start_again(&mut self, sync: &str) {
        assert!(self.child.is_none(), "kill the running hub first");
        self.starts += 1;
        let addr_file = self.dir.join("grpc.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log_path = self.dir.join(format!("hub-{:03}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("serve")
            .arg("--listen")
            .arg(self.addr().to_string())
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--admin-token", ADMIN_TOKEN])
            .args(["--enrollment-token", ENROLLMENT_TOKEN])
            .args(["--sync", sync])
            // Quick redelivery of what a lost connection swallowed, and
            // quick notice of a dead stream on the spoke's side.
            .args(["--keepalive-interval", "1s", "--ack-deadline", "5s"])
            .args(["--heartbeat-interval", "2s"])
            .args(&self.extra)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the hub binary");
        self.child = Some(child);
        for _ in 0..1000 {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the hub exited at start ({status}):\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if addr_file.exists()
                && let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await
            {
                drop(channel);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the hub did not accept connections within 20 s: see {log_path:?}");
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
