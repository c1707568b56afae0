//! The real `hub` binary as a child process on a fixed port and data
//! directory, so that a SIGKILL and a start again look to clients like the
//! same hub coming back. Started the way `tests/kill.rs` starts it; each
//! start logs to its own file in the data directory.
//!
//! A replica (`HubProcess::replica`) is one of several hubs sharing a
//! PostgreSQL database. Every replica binds its ports, but only the one
//! that leads serves; a standby forwards calls to it. So a replica is
//! started with `spawn` and asked what it is with `readyz` (its HTTP
//! port's `/readyz`), not with `start_again`, which waits for a port.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

pub use crate::common::free_ports;
use crate::common::http_get;

pub const ADMIN_TOKEN: &str = "admin-token-for-the-fault-suite-0123";
pub const ENROLLMENT_TOKEN: &str = "enrollment-token-for-the-fault-suite";

/// A hub process; killed (SIGKILL) and reaped when dropped.
pub struct HubProcess {
    dir: PathBuf,
    port: u16,
    /// The HTTP port, or 0 for any free one at each start.
    http_port: u16,
    /// Flags added to every start.
    extra: Vec<String>,
    child: Option<Child>,
    /// How the last process ended on its own (not by `kill`).
    exited: Option<ExitStatus>,
    starts: u32,
}

impl HubProcess {
    /// Starts the hub in `<run>/hub` on a port free right now.
    pub async fn start(run: &Path, extra: &[&str], sync: &str) -> Self {
        // The port is kept for every later start; the hub binds with
        // SO_REUSEADDR, so the killed process's connections do not block it.
        let [port] = free_ports();
        let mut hub = Self::new(run.join("hub"), port, 0, extra);
        hub.start_again(sync).await;
        hub
    }

    /// A replica in `<run>/<name>` on gRPC and HTTP ports free right now,
    /// kept for every start; not started yet (see [`spawn`](Self::spawn)).
    pub fn replica(run: &Path, name: &str, extra: &[&str]) -> Self {
        let [port, http_port] = free_ports();
        Self::new(run.join(name), port, http_port, extra)
    }

    fn new(dir: PathBuf, port: u16, http_port: u16, extra: &[&str]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            port,
            http_port,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            exited: None,
            starts: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The data directory's name (`hub`, or the replica's name).
    pub fn name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// The log of the latest start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("hub-{:03}.log", self.starts))
    }

    /// The log of every start so far, in order.
    pub fn all_logs(&self) -> Vec<PathBuf> {
        (1..=self.starts)
            .map(|start| self.dir.join(format!("hub-{start:03}.log")))
            .collect()
    }

    /// What the latest start has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the latest start is still running; once it is not, its exit
    /// status is in [`exited`](Self::exited).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait().unwrap() {
            None => true,
            Some(status) => {
                self.exited = Some(status);
                self.child = None;
                false
            }
        }
    }

    /// How the latest start ended by itself, if it did.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// Starts the binary again on the same port and data directory, with
    /// `--sync <sync>`; returns once it accepts gRPC connections.
    pub async fn start_again(&mut self, sync: &str) {
        self.spawn(sync);
        if !self.wait_serving(Duration::from_secs(20)).await {
            match self.exited {
                Some(status) => panic!("the hub exited at start ({status}):\n{}", self.log()),
                None => panic!(
                    "the hub did not accept connections within 20 s: see {:?}",
                    self.log_path()
                ),
            }
        }
    }

    /// Starts the binary on the same ports and data directory, with
    /// `--sync <sync>`, and returns at once: a replica may be a standby.
    pub fn spawn(&mut self, sync: &str) {
        assert!(self.child.is_none(), "kill the running hub first");
        self.starts += 1;
        self.exited = None;
        let _ = std::fs::remove_file(self.dir.join("grpc.addr"));
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("serve")
            .arg("--listen")
            .arg(self.addr().to_string())
            .arg("--http-listen")
            .arg(SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port)).to_string())
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
    }

    /// Waits up to `timeout` until the running process has written
    /// `grpc.addr` and accepts gRPC connections. False when it did not in
    /// time or exited (see [`exited`](Self::exited)).
    async fn wait_serving(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return false;
            }
            if self.is_serving().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `grpc.addr` is written and the gRPC port takes connections.
    async fn is_serving(&self) -> bool {
        self.dir.join("grpc.addr").exists()
            && Channel::from_shared(self.url())
                .unwrap()
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .is_ok()
    }

    /// The HTTP port's address (a replica's; a hub started with
    /// [`start`](Self::start) takes any free HTTP port).
    pub fn http_addr(&self) -> SocketAddr {
        assert_ne!(self.http_port, 0, "a replica's HTTP port");
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port))
    }

    /// `GET /readyz` on the HTTP port: the status code and body, or `None`
    /// when no answer came within a second.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        readyz(self.http_addr()).await
    }
}

/// `GET /readyz` on the HTTP port at `addr`: the status code and body, or
/// `None` when no answer came within a second.
pub async fn readyz(addr: SocketAddr) -> Option<(u16, String)> {
    let get = http_get(addr, "/readyz");
    tokio::time::timeout(Duration::from_secs(1), get)
        .await
        .ok()
        .flatten()
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
