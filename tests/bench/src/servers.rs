//! The servers the load generator starts itself, each in its own process so
//! its CPU and memory can be read from `/proc`: the hub binary (with a fresh
//! data dir in a temp dir, `HUB_SYNC` set) and the floor (this binary's
//! `floor` subcommand). Ports are picked free on 127.0.0.1 and kept across a
//! restart. Every child is killed when its `Server` is dropped, and on
//! SIGINT/SIGTERM of the load generator (`kill_all`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::contract::{self, Target};
use crate::proc::Pid;

/// How long a server may take to answer gRPC after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The hub's durability setting (`HUB_SYNC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync every commit.
    Full,
    /// Survive a killed process, not a power loss.
    Normal,
}

impl Sync {
    fn as_str(self) -> &'static str {
        match self {
            Sync::Full => "full",
            Sync::Normal => "normal",
        }
    }
}

/// Which server to start.
#[derive(Debug, Clone)]
pub enum Kind {
    /// The hub binary at this path.
    Hub { bin: PathBuf, sync: Sync },
    /// The floor, from this binary.
    Floor,
}

/// A running server process and what a client needs to reach it.
pub struct Server {
    kind: Kind,
    window: u32,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    target: Target,
}

impl Server {
    /// Starts a server that grants each spoke an in-flight window of
    /// `window` (default and maximum), and waits until it answers gRPC.
    pub async fn start(kind: Kind, window: u32) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("hub-bench-")
            .tempdir()
            .context("creating a temp dir")?;
        remember_dir(dir.path());
        let token = |what: &str| format!("bench-{what}-{:032x}", rand::random::<u128>());
        let grpc = free_port()?;
        let target = Target {
            addr: grpc,
            admin_token: token("admin"),
            enrollment_token: token("enroll"),
        };
        let mut server = Server {
            kind,
            window,
            grpc,
            http: free_port()?,
            dir,
            child: None,
            target,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// Address and tokens for clients.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The server process, for `/proc` readings.
    pub fn pid(&self) -> Pid {
        Pid(self.child.as_ref().map(Child::id))
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            forget_child(child.id());
        }
    }

    /// Starts the process again on the same ports and data dir (after
    /// `kill`) and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("server.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let window = self.window.to_string();
        let mut cmd = match &self.kind {
            Kind::Hub { bin, sync } => {
                let mut cmd = Command::new(bin);
                // Only what this run says: no HUB_* of the caller's.
                for (key, _) in std::env::vars_os() {
                    if key.to_string_lossy().starts_with("HUB_") || key == "DATABASE_URL" {
                        cmd.env_remove(key);
                    }
                }
                cmd.env("HUB_SYNC", sync.as_str()).arg("serve");
                cmd.arg("--data-dir").arg(self.dir.path().join("data"));
                cmd.arg("--http-listen").arg(self.http.to_string());
                // The fleet registers 10,000 spokes in seconds: this measures
                // registration, not the enrollment limit. Every other limit
                // keeps its default (the `flood` scenario measures them).
                cmd.args(["--enrollments-per-minute", "100000000"]);
                cmd.args(["--enrollment-burst", "100000"]);
                cmd
            }
            Kind::Floor => {
                let mut cmd = Command::new(std::env::current_exe().context("locating hub-bench")?);
                cmd.arg("floor");
                cmd
            }
        };
        cmd.arg("--listen")
            .arg(self.grpc.to_string())
            .arg("--admin-token")
            .arg(&self.target.admin_token)
            .arg("--enrollment-token")
            .arg(&self.target.enrollment_token)
            .args(["--default-in-flight", &window, "--max-in-flight", &window])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        remember_child(child.id());
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                forget_child(child.id());
                self.child = None;
                bail!(
                    "the server exited during startup ({status}); its log ends:\n{}",
                    self.log_tail()
                );
            }
            if contract::answers(self.grpc).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not answer gRPC within {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the server's output, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("server.log")) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        forget_dir(self.dir.path());
    }
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn remember_dir(path: &Path) {
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_owned());
}

fn forget_dir(path: &Path) {
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

fn remember_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

fn forget_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// Kills every server still running and removes their temp dirs (on a
/// signal, when `Drop` will not run).
pub fn kill_all() {
    for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
    for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
