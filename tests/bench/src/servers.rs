//! The servers the load generator starts itself, each in its own process so
//! its CPU and memory can be read from `/proc`: the hub binary (with a fresh
//! data dir in a temp dir, `HUB_SYNC` set, and a fresh PostgreSQL database
//! when it runs on one) and the floor (this binary's
//! `floor` subcommand), and several hub processes on one PostgreSQL database
//! ([`Replicas`]). Ports are picked free on 127.0.0.1 and kept across a
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// The hub binary at this path, on SQLite in its data dir or on the
    /// PostgreSQL database at `database_url`.
    Hub {
        bin: PathBuf,
        sync: Sync,
        database_url: Option<String>,
    },
    /// The floor, from this binary.
    Floor,
}

/// The tokens a server takes.
#[derive(Debug, Clone)]
struct Tokens {
    admin: String,
    enrollment: String,
}

impl Tokens {
    fn random() -> Tokens {
        let token = |what: &str| format!("bench-{what}-{:032x}", rand::random::<u128>());
        Tokens {
            admin: token("admin"),
            enrollment: token("enroll"),
        }
    }
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
        Server::start_with(kind, window, Tokens::random()).await
    }

    /// [`Server::start`] with these tokens (replicas of one hub share them).
    async fn start_with(kind: Kind, window: u32, tokens: Tokens) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("hub-bench-")
            .tempdir()
            .context("creating a temp dir")?;
        remember_dir(dir.path());
        let grpc = free_port()?;
        let target = Target {
            addrs: vec![grpc],
            admin_token: tokens.admin,
            enrollment_token: tokens.enrollment,
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
            Kind::Hub {
                bin,
                sync,
                database_url,
            } => {
                let mut cmd = Command::new(bin);
                // Only what this run says: no HUB_* of the caller's.
                for (key, _) in std::env::vars_os() {
                    if key.to_string_lossy().starts_with("HUB_") || key == "DATABASE_URL" {
                        cmd.env_remove(key);
                    }
                }
                cmd.env("HUB_SYNC", sync.as_str()).arg("serve");
                cmd.arg("--data-dir").arg(self.dir.path().join("data"));
                if let Some(url) = database_url {
                    cmd.arg("--database-url").arg(url);
                }
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

    /// Waits until the HTTP port's `/readyz` answers 200 with a body that
    /// `expected` accepts (what a replica says it is), and fails with the
    /// last answer if it does not within [`READY_TIMEOUT`].
    async fn wait_readyz(&mut self, expected: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answer = self.readyz().await;
            if let Some((200, body)) = &answer
                && expected(body)
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                forget_child(child.id());
                self.child = None;
                bail!(
                    "the server exited ({status}); its log ends:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "/readyz did not say what was expected within {READY_TIMEOUT:?} \
                     (last answer: {answer:?}); the server's log ends:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /readyz` on the HTTP port: the status code and the body, or
    /// `None` if it did not answer.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let get = async {
            let mut stream = tokio::net::TcpStream::connect(self.http).await.ok()?;
            let request = format!(
                "GET /readyz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.http
            );
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            let response = String::from_utf8(response).ok()?;
            let (head, body) = response.split_once("\r\n\r\n")?;
            let status = head.split(' ').nth(1)?.parse().ok()?;
            Some((status, body.to_owned()))
        };
        tokio::time::timeout(Duration::from_secs(5), get)
            .await
            .ok()
            .flatten()
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

/// The leader's `/readyz` body.
const LEADER_READY: &str = "ready\n";

/// Several `hub serve` processes on one PostgreSQL database, each with its
/// own data dir and ports and the same tokens: the first leads (its
/// `/readyz` says exactly "ready"), the others stand by and forward every
/// gRPC call to it. Dropping them kills the standbys first, then the
/// leader (so no standby takes over and loads the state for nothing).
pub struct Replicas {
    /// The leader first.
    servers: Vec<Server>,
}

impl Replicas {
    /// Starts `count` replicas of the hub `kind` (on PostgreSQL): the first
    /// alone, until its `/readyz` says it leads, then the others, each until
    /// its `/readyz` says it stands by for that leader.
    pub async fn start(kind: Kind, window: u32, count: usize) -> anyhow::Result<Replicas> {
        let tokens = Tokens::random();
        let mut servers = Vec::with_capacity(count);
        let mut leader = Server::start_with(kind.clone(), window, tokens.clone()).await?;
        leader
            .wait_readyz(|body| body == LEADER_READY)
            .await
            .context("the first replica does not lead")?;
        let standby = format!(
            "ready: a standby; calls are forwarded to the leading hub at http://{} (epoch ",
            leader.grpc
        );
        servers.push(leader);
        for i in 1..count {
            let mut server = Server::start_with(kind.clone(), window, tokens.clone()).await?;
            server
                .wait_readyz(|body| body.starts_with(&standby))
                .await
                .with_context(|| format!("replica {i} does not stand by for the first"))?;
            servers.push(server);
        }
        Ok(Replicas { servers })
    }

    /// Every replica's address (the leader's first) and the tokens.
    pub fn target(&self) -> Target {
        let mut target = self.servers[0].target().clone();
        target.addrs = self.servers.iter().map(|s| s.grpc).collect();
        target
    }

    /// The replicas' processes, for `/proc` readings.
    pub fn pids(&self) -> Vec<Pid> {
        self.servers.iter().map(Server::pid).collect()
    }

    /// Fails unless the first replica still leads (a run whose leader
    /// moved did not measure what it says).
    pub async fn check_leader(&self) -> anyhow::Result<()> {
        match self.servers[0].readyz().await {
            Some((200, body)) if body == LEADER_READY => Ok(()),
            answer => bail!("the first replica no longer leads (its /readyz: {answer:?})"),
        }
    }

    /// The last lines of each replica's output, on one line, for error
    /// messages.
    pub fn log_tail(&self) -> String {
        let tail = |server: &Server| {
            let text = server.log_tail();
            let lines: Vec<&str> = text.lines().rev().take(3).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
        };
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("replica {i}: {}", tail(s)))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        while let Some(server) = self.servers.pop() {
            drop(server);
        }
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
