//! Several `hub serve` processes sharing one PostgreSQL database. Each
//! binds its gRPC and HTTP ports at start; one leads and serves, the
//! others stand by and forward every SpokeService and AdminService call
//! to it, and take over the moment its database session ends (the leader
//! lock is a PostgreSQL advisory lock). A leader that finds itself
//! deposed stands by again in the same process: no replica exits by
//! itself. An open port therefore says nothing about who leads; the HTTP
//! port's `/readyz` does: "ready\n" from the leader, "ready: a standby;
//! ..." (200) from a standby while a leader serves, and "no hub leads the
//! database now" (503) from a standby while none does.
//!
//! [`TestDatabase`] is a fresh database on the server at
//! `HUB_TEST_POSTGRES_URL`, made with `psql`. [`Replicas`] starts the hubs
//! on it, kills the leader (or a standby) and starts it again at once,
//! and counts what it saw. A [`Watch`] task meanwhile asks every
//! replica's `/readyz` ten times a second: no round may find two leaders,
//! since two replicas leading at once could each hand out the same
//! directive. The end checks (`finish`) add what the replicas' `/readyz`,
//! logs and exits say.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::task::JoinHandle;

use crate::checks::Verdict;
use crate::hub_bin::{HubProcess, readyz};
use crate::view::clock;

/// Replicas per test.
const REPLICAS: [&str; 3] = ["hub-a", "hub-b", "hub-c"];
/// How long the replicas get to elect a leader at start, and a standby to
/// take over from a killed leader (a bound against a hang, not a timing
/// requirement).
const TAKEOVER_BOUND: Duration = Duration::from_secs(60);
/// How long a replica that does not lead gets to answer `/readyz` as a
/// standby.
const STANDBY_BOUND: Duration = Duration::from_secs(30);

/// The server the test databases are made on, from
/// `HUB_TEST_POSTGRES_URL`; `None` when it is not set.
pub fn postgres_server() -> Option<String> {
    std::env::var("HUB_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// A database of the test's own on the PostgreSQL server.
pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// `CREATE DATABASE hub_faults_<random>` on `server` (with psql).
    pub fn create(server: &str) -> Self {
        let name = format!("hub_faults_{:016x}", rand::rng().random::<u64>());
        psql(server, &format!("CREATE DATABASE {name}"));
        Self {
            server: server.to_owned(),
            url: with_database(server, &name),
            name,
        }
    }

    /// The URL of this database: the server's with the name replaced.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database (the replicas must be gone).
    pub fn drop_database(self) {
        psql(
            &self.server,
            &format!("DROP DATABASE {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(server: &str, sql: &str) {
    let out = Command::new("psql")
        .arg(server)
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql (the PostgreSQL client) for HUB_TEST_POSTGRES_URL");
    assert!(
        out.status.success(),
        "psql {sql:?} on HUB_TEST_POSTGRES_URL failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `url` naming `database` instead of its own (the query, if any, kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// What a replica's `/readyz` says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// 200 "ready\n": it leads and serves.
    Leader,
    /// 200 and the standby's answer: it forwards calls to a leader.
    Standby,
    /// 503 and the standby's answer: it sees no leader now.
    NoLeader,
    /// No answer within a second, or another one.
    Unknown,
}

/// The leader's `/readyz` body.
const LEADER_READY: &str = "ready\n";
/// How a standby's `/readyz` body starts while a leader serves (200);
/// the rest may name the leader.
const STANDBY_READY: &str = "ready: a standby; calls are forwarded to the leading hub";
/// A standby's `/readyz` body while no hub leads (503).
const NO_LEADER: &str = "no hub leads the database now\n";

impl Role {
    fn of(answer: &Option<(u16, String)>) -> Self {
        match answer {
            Some((200, body)) if body == LEADER_READY => Self::Leader,
            Some((200, body)) if body.starts_with(STANDBY_READY) => Self::Standby,
            Some((503, body)) if body == NO_LEADER => Self::NoLeader,
            _ => Self::Unknown,
        }
    }
}

/// The replicas of one test and what happened to them.
pub struct Replicas {
    hubs: Vec<HubProcess>,
    watch: Watch,
    leader_kills: u32,
    standby_kills: u32,
    /// Leader kills after which a replica led again.
    failovers: u32,
    /// Failovers that a replica other than the killed one took.
    taken_by_another: u32,
    /// From each leader kill until a replica led again.
    takeovers: Vec<Duration>,
    failures: Vec<String>,
}

impl Replicas {
    /// Starts every replica at once on `database_url` and waits until one
    /// leads and each other one answers `/readyz` as a standby. Panics
    /// (with the logs) when that does not happen.
    pub async fn start(run: &Path, database_url: &str) -> Self {
        let extra = ["--database-url", database_url];
        let mut hubs: Vec<HubProcess> = REPLICAS
            .iter()
            .map(|name| HubProcess::replica(run, name, &extra))
            .collect();
        for hub in &mut hubs {
            hub.spawn("normal");
        }
        let watch = Watch::start(
            hubs.iter()
                .map(|hub| (hub.name(), hub.http_addr()))
                .collect(),
        );
        let mut replicas = Self {
            hubs,
            watch,
            leader_kills: 0,
            standby_kills: 0,
            failovers: 0,
            taken_by_another: 0,
            takeovers: Vec::new(),
            failures: Vec::new(),
        };
        // No restarts here: a replica that exits at start is the failure.
        let Some(leader) = replicas.wait_for_leader(false).await else {
            panic!(
                "no replica led within {TAKEOVER_BOUND:?} of the start:\n{}",
                replicas.logs()
            );
        };
        for i in (0..REPLICAS.len()).filter(|i| *i != leader) {
            if !replicas.wait_standby(i).await {
                panic!(
                    "{} leads; {} did not answer /readyz as a standby within {STANDBY_BOUND:?} \
                     (running: {}, /readyz: {:?}):\n{}",
                    replicas.hubs[leader].name(),
                    replicas.hubs[i].name(),
                    replicas.hubs[i].is_running(),
                    replicas.hubs[i].readyz().await,
                    replicas.logs()
                );
            }
        }
        eprintln!(
            "replicas: {} leads, the others stand by",
            replicas.hubs[leader].name()
        );
        replicas
    }

    /// Every replica's gRPC URL, for the spokes and the operator.
    pub fn urls(&self) -> Vec<String> {
        self.hubs.iter().map(HubProcess::url).collect()
    }

    /// Each replica's `/readyz` answer now, asked one after the other.
    async fn answers(&self) -> Vec<Option<(u16, String)>> {
        let mut answers = Vec::new();
        for hub in &self.hubs {
            answers.push(hub.readyz().await);
        }
        answers
    }

    /// The replicas whose `/readyz` says they lead now.
    async fn leaders(&self) -> Vec<usize> {
        let answers = self.answers().await;
        (0..answers.len())
            .filter(|i| Role::of(&answers[*i]) == Role::Leader)
            .collect()
    }

    /// Waits until a replica leads; with `restart`, starts again any
    /// replica that exits meanwhile (a failure, see `restart_exited`).
    /// `None` after [`TAKEOVER_BOUND`], or once no replica runs.
    async fn wait_for_leader(&mut self, restart: bool) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_BOUND;
        loop {
            if restart {
                self.restart_exited();
            }
            if let Some(&i) = self.leaders().await.first() {
                return Some(i);
            }
            let none_runs = self.hubs.iter_mut().all(|hub| !hub.is_running());
            if none_runs || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until replica `i` answers `/readyz` as a standby of a leader
    /// (true), or it exits or [`STANDBY_BOUND`] passes (false).
    async fn wait_standby(&mut self, i: usize) -> bool {
        let deadline = tokio::time::Instant::now() + STANDBY_BOUND;
        loop {
            if Role::of(&self.hubs[i].readyz().await) == Role::Standby {
                return true;
            }
            if !self.hubs[i].is_running() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Notes as a failure every replica whose process exited by itself (no
    /// replica should: a deposed leader stands by again in its process),
    /// and starts it again so that the run goes on.
    fn restart_exited(&mut self) {
        for hub in &mut self.hubs {
            if hub.is_running() {
                continue;
            }
            let status = hub
                .exited()
                .map_or_else(|| "not running".to_owned(), |s| s.to_string());
            self.failures.push(format!(
                "[replicas] {} exited by itself ({status}); its log ends:\n{}",
                hub.name(),
                last_lines(&hub.log(), 8)
            ));
            hub.spawn("normal");
        }
    }

    /// Kills (SIGKILL) the replica that leads and starts it again at once,
    /// then waits until a replica leads again. False when none did within
    /// [`TAKEOVER_BOUND`] (a failure, named in `finish`).
    pub async fn kill_leader(&mut self, sync: &str) -> bool {
        self.restart_exited();
        let Some(&leader) = self.leaders().await.first() else {
            self.failures.push(format!(
                "[replicas] no replica led at {} when the leader was to be killed",
                clock(std::time::SystemTime::now())
            ));
            return false;
        };
        let killed_at = Instant::now();
        self.watch.killing();
        self.hubs[leader].kill();
        self.watch.killing();
        self.leader_kills += 1;
        self.hubs[leader].spawn(sync);
        match self.wait_for_leader(true).await {
            Some(next) => {
                self.failovers += 1;
                self.takeovers.push(killed_at.elapsed());
                if next != leader {
                    self.taken_by_another += 1;
                }
                true
            }
            None => {
                self.failures.push(format!(
                    "[replicas] no replica led within {TAKEOVER_BOUND:?} after the leader {} was \
                     killed (leader kill {}):\n{}",
                    self.hubs[leader].name(),
                    self.leader_kills,
                    self.logs()
                ));
                false
            }
        }
    }

    /// Kills (SIGKILL) a standby picked with `rng` among the replicas that
    /// answer `/readyz` as one, starts it again at once, and waits until it
    /// stands by again. The leader must lead on, untouched. False when no
    /// replica led or stood by within the bounds (failures, named in
    /// `finish`).
    pub async fn kill_standby(&mut self, rng: &mut impl Rng, sync: &str) -> bool {
        self.restart_exited();
        let Some(leader) = self.wait_for_leader(true).await else {
            self.failures.push(format!(
                "[replicas] no replica led within {TAKEOVER_BOUND:?} when a standby was to be \
                 killed:\n{}",
                self.logs()
            ));
            return false;
        };
        let deadline = tokio::time::Instant::now() + STANDBY_BOUND;
        let standbys = loop {
            let answers = self.answers().await;
            let standbys: Vec<usize> = (0..answers.len())
                .filter(|i| Role::of(&answers[*i]) == Role::Standby)
                .collect();
            if !standbys.is_empty() || tokio::time::Instant::now() >= deadline {
                break standbys;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if standbys.is_empty() {
            self.failures.push(format!(
                "[replicas] {} leads, and no replica answered /readyz as a standby within \
                 {STANDBY_BOUND:?}:\n{}",
                self.hubs[leader].name(),
                self.logs()
            ));
            return false;
        }
        let victim = standbys[rng.random_range(0..standbys.len())];
        self.watch.killing();
        self.hubs[victim].kill();
        self.watch.killing();
        self.standby_kills += 1;
        self.hubs[victim].spawn(sync);
        if !self.wait_standby(victim).await {
            self.failures.push(format!(
                "[replicas] the standby {} did not stand by again within {STANDBY_BOUND:?} after \
                 it was killed (running: {}, /readyz: {:?}):\n{}",
                self.hubs[victim].name(),
                self.hubs[victim].is_running(),
                self.hubs[victim].readyz().await,
                self.logs()
            ));
            return false;
        }
        match self.wait_for_leader(true).await {
            Some(now) if now == leader => true,
            Some(now) => {
                self.failures.push(format!(
                    "[replicas] the leader changed from {} to {} when the standby {} was \
                     killed:\n{}",
                    self.hubs[leader].name(),
                    self.hubs[now].name(),
                    self.hubs[victim].name(),
                    self.logs()
                ));
                true
            }
            None => {
                self.failures.push(format!(
                    "[replicas] no replica led within {TAKEOVER_BOUND:?} after the standby {} \
                     was killed:\n{}",
                    self.hubs[victim].name(),
                    self.logs()
                ));
                false
            }
        }
    }

    /// The URL of the replica that leads once the faults are over.
    pub async fn leader_url(&mut self) -> Option<String> {
        let leader = self.wait_for_leader(true).await?;
        Some(self.hubs[leader].url())
    }

    /// Stops the watch and adds the replicas' own checks to `verdict`: no
    /// round of knocks found two leaders; at the end exactly one replica
    /// leads and every other one runs and answers `/readyz` as a standby;
    /// every start of a replica logged "hub listening"; no replica exited
    /// by itself.
    pub async fn finish(mut self, mut verdict: Verdict) -> Verdict {
        let knocks = self.watch.stop().await;
        let mut failures = std::mem::take(&mut self.failures);
        for overlap in knocks.overlaps.iter().take(15) {
            failures.push(format!("[replicas] {overlap}"));
        }
        if knocks.overlaps.len() > 15 {
            failures.push(format!(
                "[replicas] ... and {} more rounds of knocks that found several leaders",
                knocks.overlaps.len() - 15
            ));
        }
        // The end: long after the last kill, so each replica has had its
        // time to settle; judged on the last look once the bound passes.
        let deadline = tokio::time::Instant::now() + STANDBY_BOUND;
        let answers = loop {
            let answers = self.answers().await;
            let roles: Vec<Role> = answers.iter().map(Role::of).collect();
            let leaders = roles.iter().filter(|r| **r == Role::Leader).count();
            let standbys = roles.iter().filter(|r| **r == Role::Standby).count();
            let settled = leaders == 1 && leaders + standbys == roles.len();
            if settled || tokio::time::Instant::now() >= deadline {
                break answers;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let leaders: Vec<String> = (0..answers.len())
            .filter(|i| Role::of(&answers[*i]) == Role::Leader)
            .map(|i| self.hubs[i].name())
            .collect();
        // The leader's gRPC address, when exactly one leads: a standby
        // whose answer names where it forwards must name it.
        let leader = (leaders.len() == 1)
            .then(|| (0..answers.len()).find(|i| Role::of(&answers[*i]) == Role::Leader))
            .flatten()
            .map(|i| self.hubs[i].addr());
        if leaders.len() != 1 {
            failures.push(format!(
                "[replicas] at the end {} replicas lead ({leaders:?}), not exactly one",
                leaders.len()
            ));
        }
        for (i, answer) in answers.iter().enumerate() {
            let hub = &mut self.hubs[i];
            if !hub.is_running() {
                let status = hub
                    .exited()
                    .map_or_else(|| "not running".to_owned(), |s| s.to_string());
                failures.push(format!(
                    "[replicas] {} exited by itself ({status}); its log ends:\n{}",
                    hub.name(),
                    last_lines(&hub.log(), 8)
                ));
            } else if !matches!(Role::of(answer), Role::Leader | Role::Standby) {
                failures.push(format!(
                    "[replicas] at the end {} answers /readyz {answer:?}, neither as the leader \
                     nor as a standby; its log ends:\n{}",
                    hub.name(),
                    last_lines(&hub.log(), 8)
                ));
            } else if let (Some(leader), Some((_, body))) = (leader, answer)
                && body.contains("http")
                && !body.contains(&leader.to_string())
            {
                failures.push(format!(
                    "[replicas] at the end {} answers /readyz {body:?}: it does not name the \
                     leader's address {leader}",
                    hub.name()
                ));
            }
        }
        let (mut leads, mut deposed) = (0, 0);
        for hub in &self.hubs {
            for log in hub.all_logs() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if !text.contains("hub listening") {
                    failures.push(format!(
                        "[replicas] {} does not say \"hub listening\"",
                        log.display()
                    ));
                }
                leads += text
                    .lines()
                    .filter(|l| l.contains("leading: this hub serves"))
                    .count();
                deposed += text.lines().filter(|l| l.contains("deposed")).count();
            }
        }
        let mut takeovers = self.takeovers.clone();
        takeovers.sort();
        let median = takeovers
            .get(takeovers.len() / 2)
            .copied()
            .unwrap_or_default();
        let longest = takeovers.last().copied().unwrap_or_default();
        verdict.failures.extend(failures);
        verdict
            .note(format!(
                "{} kills of the leader, {} failovers ({} to another replica; from the kill until \
                 a replica led: median {median:.1?}, longest {longest:.1?}); {} kills of a standby",
                self.leader_kills, self.failovers, self.taken_by_another, self.standby_kills
            ))
            .note(format!(
                "the logs say \"leading\" {leads} times and \"deposed\" {deposed} times; {} rounds \
                 of /readyz knocks ({} not judged: a replica was killed meanwhile)",
                knocks.rounds, knocks.unjudged
            ))
    }

    /// Every replica's latest log, for a failure message.
    fn logs(&self) -> String {
        self.hubs
            .iter()
            .map(|hub| {
                format!(
                    "--- {} ({}):\n{}",
                    hub.name(),
                    hub.log_path().display(),
                    last_lines(&hub.log(), 12)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the watch saw.
#[derive(Default)]
struct Knocks {
    rounds: u64,
    /// Rounds during which the test killed a replica.
    unjudged: u64,
    /// Each judged round that found more than one leader.
    overlaps: Vec<String>,
}

/// A task that asks every replica's `/readyz` in rounds, one replica
/// after the other, a round every 100 ms, and notes each round in which
/// more than one replica answered as the leader: two leaders at once
/// could each hand out the same directive. The replicas are asked one
/// after the other, so a round during which the test killed a replica
/// (the old leader answered before the kill, the new one after) proves
/// nothing and is not judged.
struct Watch {
    knocks: Arc<Mutex<Knocks>>,
    /// Bumped before and after each kill.
    kills: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Watch {
    fn start(replicas: Vec<(String, SocketAddr)>) -> Self {
        let knocks = Arc::new(Mutex::new(Knocks::default()));
        let kills = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let knocks = knocks.clone();
            let kills = kills.clone();
            async move {
                loop {
                    let kills_before = kills.load(Ordering::SeqCst);
                    let mut leaders = Vec::new();
                    for (name, addr) in &replicas {
                        if Role::of(&readyz(*addr).await) == Role::Leader {
                            leaders.push(name.clone());
                        }
                    }
                    {
                        let mut k = knocks.lock().unwrap();
                        k.rounds += 1;
                        if kills.load(Ordering::SeqCst) != kills_before {
                            k.unjudged += 1;
                        } else if leaders.len() > 1 {
                            let at = clock(std::time::SystemTime::now());
                            k.overlaps.push(format!(
                                "in the round of /readyz knocks ending at {at}, {leaders:?} all \
                                 answered as the leader"
                            ));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self {
            knocks,
            kills,
            task,
        }
    }

    /// The test is about to kill a replica, or just did: a round of knocks
    /// that saw this happen is not judged.
    fn killing(&self) {
        self.kills.fetch_add(1, Ordering::SeqCst);
    }

    async fn stop(&mut self) -> Knocks {
        self.task.abort();
        let _ = (&mut self.task).await;
        std::mem::take(&mut *self.knocks.lock().unwrap())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_database_url_names_the_test_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t"),
            "postgres://postgres@127.0.0.1:5432/t"
        );
        assert_eq!(
            with_database("postgresql://u:p@h:1/db?sslmode=disable", "t"),
            "postgresql://u:p@h:1/t?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t"), "postgres://h:1/t");
    }
}
