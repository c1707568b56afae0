//! The fault suite: the real `hub` binary under load from in-process
//! spoke-client spokes while it is killed with SIGKILL and restarted
//! (`kill_loop`; `spoke_kill_loop` kills spoke processes as well), or while a fault-injecting TCP proxy delays, drops,
//! resets and half-opens the spokes' and operators' connections
//! (`proxy_faults`), or while three hub replicas share one PostgreSQL
//! database and the leader (now and then a standby) is killed again and
//! again (`replicas`, only when `HUB_TEST_POSTGRES_URL` names a server).
//! All end with the same checks (`checks`): every directive COMPLETED,
//! none created twice, no handler run twice or after a recorded
//! completion, every metric point stored exactly once.
//!
//! It lives with the hub because it needs the hub binary
//! (`CARGO_BIN_EXE_hub` is only given to the tests of the package that
//! builds it); spoke-client is a dev-dependency of the hub for it, which
//! adds no cycle (spoke-client itself depends only on hub-proto).
//!
//! Knobs, both optional: `FAULT_SUITE_SECS` (how long faults are injected,
//! default 60; 40 for the replicas) and `FAULT_SUITE_SEED` (replays a run:
//! the seed picks the kill intervals, the proxy's fate for each connection and the workload;
//! every run prints its seed). What is asserted does not depend on either.
//! A failed run keeps its directory (hub logs, spoke states, spoke-client
//! log) under `target/tmp/faults/` and names it in the failure.
#![cfg(unix)]

mod checks;
#[path = "../common/mod.rs"]
mod common;
mod fleet;
mod hub_bin;
mod load;
mod proc_checks;
mod procs;
mod proxy;
mod replicas;
mod view;

use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use checks::Verdict;
use fleet::Fleet;
use hub_bin::HubProcess;
use load::Load;
use procs::SpokeProcs;
use proxy::FaultProxy;
use replicas::{Replicas, TestDatabase};

/// Spokes per test.
const SPOKES: usize = 5;

/// How long faults are injected: `FAULT_SUITE_SECS`, default 60.
fn fault_time() -> Duration {
    fault_time_or(60)
}

/// `FAULT_SUITE_SECS`, or `default` seconds.
fn fault_time_or(default: u64) -> Duration {
    let secs = std::env::var("FAULT_SUITE_SECS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .expect("FAULT_SUITE_SECS: a whole number of seconds")
        })
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// `FAULT_SUITE_SEED`, or a fresh one; printed either way.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("FAULT_SUITE_SEED")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .expect("FAULT_SUITE_SEED: an unsigned integer")
        })
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: FAULT_SUITE_SEED={seed}");
    seed
}

/// The run's directory under the cargo target dir: removed when the run
/// passes, kept (and named in the failure) when it fails.
struct RunDir(Option<tempfile::TempDir>);

impl RunDir {
    fn new(test: &str, seed: u64) -> Self {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
        std::fs::create_dir_all(&root).unwrap();
        fleet::log_spoke_clients(&root);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{test}-{seed}-"))
            .tempdir_in(root)
            .unwrap();
        Self(Some(dir))
    }

    fn path(&self) -> PathBuf {
        self.0
            .as_ref()
            .expect("kept until the end")
            .path()
            .to_owned()
    }

    /// Passes, or keeps the directory and fails with the verdict.
    fn conclude(mut self, verdict: Verdict) {
        if verdict.failures.is_empty() {
            eprintln!("{}", verdict.summary);
            return;
        }
        let kept = self.0.take().expect("concluded once").keep();
        panic!(
            "{}\n{} failure(s):\n{}\nrun directory kept: {} (spoke-client log: {})",
            verdict.summary,
            verdict.failures.len(),
            verdict.failures.join("\n"),
            kept.display(),
            fleet::spoke_client_log().display(),
        );
    }
}

/// A run that panics before its verdict keeps its directory too.
impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("run directory kept: {}", dir.keep().display());
        }
    }
}

/// The hub killed with SIGKILL every 2–4 s (seeded) and restarted on the
/// same data directory and port, while spokes run directives and push
/// metrics and an operator creates directives (retrying keyed creates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_again_and_again_loses_and_repeats_nothing() {
    let seed = seed("kill_loop");
    let mut rng = StdRng::seed_from_u64(seed);
    let run = RunDir::new("kill", seed);
    let mut hub = HubProcess::start(&run.path(), &[], "full").await;
    let fleet = Fleet::start("kill", SPOKES, &hub.url(), &run.path()).await;
    let load = Load::start(&hub.url(), fleet.names(), seed);

    let until = tokio::time::Instant::now() + fault_time();
    let mut kills = 0;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2000..=4000))).await;
        hub.kill();
        kills += 1;
        // Either durability setting must survive a killed process.
        let sync = if rng.random_bool(0.5) {
            "full"
        } else {
            "normal"
        };
        hub.start_again(sync).await;
    }
    let verdict = checks::settle_and_check(&hub.url(), fleet, load, seed).await;
    let verdict = verdict.note(format!("{kills} kills of the hub"));
    drop(hub);
    run.conclude(verdict);
}

/// Spokes and the operator reach the hub through a proxy that gives each
/// new connection a seeded fate: maybe delayed bytes, and after a random
/// time a drop, a reset or a half-open connection (or, for the lucky ones,
/// a few healthy seconds before an orderly close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_connections_lose_and_repeat_nothing() {
    let seed = seed("proxy_faults");
    let run = RunDir::new("proxy", seed);
    // A half-open connection is noticed by the hub's HTTP/2 keepalive (the
    // spoke's pings have a fixed 20 s + 10 s) and by the spoke's missed
    // stream keepalives (three of the hub's interval).
    let hub = HubProcess::start(
        &run.path(),
        &[
            "--http2-keepalive-interval",
            "2s",
            "--http2-keepalive-timeout",
            "2s",
        ],
        "normal",
    )
    .await;
    let proxy = FaultProxy::start(hub.addr(), seed).await;
    // Enrollment happens before the faults, so every spoke is known when
    // the load starts. (A lost first Register reply no longer strands a
    // spoke: it retries with the key it proposed; spoke-client's
    // `enrollment` tests cover that.)
    let fleet = Fleet::start("proxy", SPOKES, &proxy.url(), &run.path()).await;
    let load = Load::start(&proxy.url(), fleet.names(), seed);

    proxy.set_faulty(true);
    // The connections opened while calm end now, so every one is faulty.
    proxy.cut_all();
    tokio::time::sleep(fault_time()).await;
    proxy.set_faulty(false);
    proxy.cut_all();

    // The checks read the hub directly, past the proxy.
    let verdict = checks::settle_and_check(&hub.url(), fleet, load, seed).await;
    let verdict = verdict.note(proxy.fates());
    drop(proxy);
    drop(hub);
    run.conclude(verdict);
}

/// The hub killed every 2–4 s and, in between, a spoke process every
/// 6–8 s (each restarted at once on its state directory), while directives
/// flow. A spoke may run a directive again only if the run it lost recorded
/// no outcome; the checks (`proc_checks`) hold it to that, and to every
/// point of a finished run stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_spokes_killed_again_and_again_run_nothing_finished_twice() {
    let seed = seed("spoke_kill_loop");
    let mut rng = StdRng::seed_from_u64(seed);
    let run = RunDir::new("spoke-kill", seed);
    let mut hub = HubProcess::start(&run.path(), &[], "normal").await;
    let mut spokes = SpokeProcs::start("procs", SPOKES, &hub.url(), &run.path()).await;
    let load = Load::start(&hub.url(), spokes.names(), seed);

    let start = tokio::time::Instant::now();
    let until = start + fault_time();
    let mut next_hub = start + Duration::from_millis(rng.random_range(2000..=4000));
    let mut next_spoke = start + Duration::from_millis(rng.random_range(6000..=8000));
    let mut hub_kills = 0;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep_until(next_hub.min(next_spoke)).await;
        let now = tokio::time::Instant::now();
        if now >= next_spoke {
            spokes.kill_and_restart(rng.random_range(0..SPOKES));
            next_spoke = now + Duration::from_millis(rng.random_range(6000..=8000));
        }
        if now >= next_hub {
            hub.kill();
            hub_kills += 1;
            hub.start_again("normal").await;
            next_hub =
                tokio::time::Instant::now() + Duration::from_millis(rng.random_range(2000..=4000));
        }
    }
    let verdict = proc_checks::settle_and_check(&hub.url(), spokes, load, seed).await;
    let verdict = verdict.note(format!("{hub_kills} kills of the hub"));
    drop(hub);
    run.conclude(verdict);
}

/// Three hubs share a fresh PostgreSQL database: one leads, two stand by
/// and forward calls to it. Every 3–6 s (seeded) after the previous kill
/// settled, the leader, or in one round of three (seeded) a standby, is
/// killed with SIGKILL and started again at once, while spokes configured
/// with all three endpoints (each list rotated, so most spokes start on a
/// standby) run directives and push metrics and an operator, knowing all
/// three URLs, creates directives. Besides the usual checks: never two
/// replicas answering `/readyz` as the leader at once; at the end one
/// leader, the others standing by, and no replica that exited by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fail_over_and_lose_and_repeat_nothing() {
    let Some(server) = replicas::postgres_server() else {
        eprintln!("skipped: HUB_TEST_POSTGRES_URL is not set");
        return;
    };
    let seed = seed("replicas");
    let mut rng = StdRng::seed_from_u64(seed);
    let run = RunDir::new("replicas", seed);
    let database = TestDatabase::create(&server);
    let mut replicas = Replicas::start(&run.path(), database.url()).await;
    let urls = replicas.urls();
    let fleet = Fleet::start_with_endpoints("replicas", SPOKES, &urls, &run.path()).await;
    let load = Load::start_with_urls(&urls, fleet.names(), seed);

    let until = tokio::time::Instant::now() + fault_time_or(40);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(3000..=6000))).await;
        let sync = if rng.random_bool(0.5) {
            "full"
        } else {
            "normal"
        };
        let killed = if rng.random_ratio(1, 3) {
            replicas.kill_standby(&mut rng, sync).await
        } else {
            replicas.kill_leader(sync).await
        };
        if !killed {
            break;
        }
    }
    let (url_switches, refused_resends) = (load.url_switches(), load.refused_resends());
    let Some(leader) = replicas.leader_url().await else {
        let verdict = Verdict {
            summary: format!("seed {seed}"),
            failures: vec!["[replicas] no replica leads after the faults".into()],
        };
        run.conclude(replicas.finish(verdict).await);
        return;
    };
    let verdict = checks::settle_and_check(&leader, fleet, load, seed).await;
    let verdict = verdict.note(format!(
        "the operator moved to another replica's URL {url_switches} times, and sent an \
         unkeyed create again after a refused connection {refused_resends} times"
    ));
    let verdict = replicas.finish(verdict).await;
    if verdict.failures.is_empty() {
        database.drop_database();
    }
    run.conclude(verdict);
}

/// Not a test of its own: the body of a spoke process that
/// `hub_and_spokes_killed_again_and_again_run_nothing_finished_twice`
/// starts (this binary run again with `--ignored --exact spoke_process`).
#[test]
#[ignore = "the body of a spoke process of the spoke kill loop"]
fn spoke_process() {
    procs::child_main();
}
