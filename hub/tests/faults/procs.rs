//! Spokes as child processes, for the loop that kills spokes as well as
//! the hub: a spoke killed with SIGKILL must come back from its state
//! directory without running a finished directive again and without
//! losing or doubling a point its handler recorded.
//!
//! A child is this test binary run again on the ignored test
//! `spoke_process` (see `main.rs`), told what to be by environment
//! variables. It runs one spoke-client spoke with the same `job` handler as
//! `fleet`, but its journal is a file in the run directory, appended and
//! synced before the handler does anything else, so a run is on record
//! even if the process dies a moment later. Every start of a child is an
//! incarnation with a number unique in the test; a run's number is
//! `incarnation << 32 | count`, unique too, and small enough to travel
//! through a JSON number exactly. Closing the child's stdin asks it to stop
//! gracefully: it stops ticking, pushes its buffer, shuts down and writes an
//! `exit` line with its final status.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use spoke_client::{Backoff, Client, Context};

use crate::fleet::{DOMAIN, Run, eventually};
use crate::hub_bin::ENROLLMENT_TOKEN;

/// The name of the ignored test that is the child's body.
pub const CHILD_TEST: &str = "spoke_process";

const ENV_NAME: &str = "FAULT_SPOKE_NAME";
const ENV_URL: &str = "FAULT_SPOKE_URL";
const ENV_STATE: &str = "FAULT_SPOKE_STATE_DIR";
const ENV_JOURNAL: &str = "FAULT_SPOKE_JOURNAL";
const ENV_INCARNATION: &str = "FAULT_SPOKE_INCARNATION";

/// How a child ended, from its `exit` line.
#[derive(Debug, Clone)]
pub struct Exit {
    pub incarnation: u32,
    pub ticks: u64,
    pub dropped: u64,
    pub rejected: u64,
    /// `ok`, or how `run()` failed.
    pub ended: String,
}

/// What one spoke's journal holds over all its incarnations.
#[derive(Debug, Default)]
pub struct SpokeJournal {
    /// Every run, in start order.
    pub runs: Vec<Run>,
    /// The incarnation each run started in, by run number.
    pub incarnation_of: HashMap<u64, u32>,
    pub exits: Vec<Exit>,
}

/// One spoke and its current process.
pub struct SpokeProc {
    pub name: String,
    pub state_dir: PathBuf,
    journal: PathBuf,
    logs: PathBuf,
    url: String,
    child: Option<(Child, ChildStdin)>,
}

/// The spokes of one test, and the incarnation counter they share.
pub struct SpokeProcs {
    pub spokes: Vec<SpokeProc>,
    incarnations: u32,
    pub kills: u32,
}

impl SpokeProcs {
    /// Starts `count` spoke processes named `<prefix>-<i>` against `url`
    /// and waits until each has held a directive stream.
    pub async fn start(prefix: &str, count: usize, url: &str, run: &Path) -> Self {
        let mut procs = Self {
            spokes: Vec::new(),
            incarnations: 0,
            kills: 0,
        };
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let logs = run.join("spoke-logs");
            std::fs::create_dir_all(&logs).unwrap();
            procs.spokes.push(SpokeProc {
                state_dir: run.join("spokes").join(&name),
                journal: logs.join(format!("{name}.journal")),
                logs,
                url: url.to_owned(),
                name,
                child: None,
            });
            procs.spawn(i);
        }
        for spoke in &procs.spokes {
            eventually(&format!("{} to connect", spoke.name), || async {
                let text = std::fs::read_to_string(&spoke.journal).unwrap_or_default();
                text.lines().any(|l| l.starts_with("ready ")).then_some(())
            })
            .await;
        }
        procs
    }

    pub fn names(&self) -> Vec<String> {
        self.spokes.iter().map(|s| s.name.clone()).collect()
    }

    fn spawn(&mut self, i: usize) {
        self.incarnations += 1;
        let incarnation = self.incarnations;
        let spoke = &mut self.spokes[i];
        assert!(spoke.child.is_none(), "kill the running process first");
        let log = File::create(
            spoke
                .logs
                .join(format!("{}-{incarnation:03}.log", spoke.name)),
        )
        .unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
            .env(ENV_NAME, &spoke.name)
            .env(ENV_URL, &spoke.url)
            .env(ENV_STATE, &spoke.state_dir)
            .env(ENV_JOURNAL, &spoke.journal)
            .env(ENV_INCARNATION, incarnation.to_string())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start a spoke process");
        let stdin = child.stdin.take().unwrap();
        spoke.child = Some((child, stdin));
    }

    /// SIGKILL to spoke `i`, and a new process for it at once.
    pub fn kill_and_restart(&mut self, i: usize) {
        if let Some((mut child, _stdin)) = self.spokes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kills += 1;
        self.spawn(i);
    }

    /// Asks every process to stop gracefully and waits for each; a child
    /// that does not exit within 60 s is killed and named in `failures`.
    pub async fn stop(mut self, failures: &mut Vec<String>) -> Vec<(SpokeProc, SpokeJournal)> {
        for spoke in &mut self.spokes {
            if let Some((mut child, stdin)) = spoke.child.take() {
                drop(stdin);
                let exited = crate::fleet::try_eventually(Duration::from_secs(60), || {
                    let status = child.try_wait().unwrap();
                    async move { status }
                })
                .await;
                match exited {
                    Some(status) if status.success() => {}
                    Some(status) => failures.push(format!(
                        "[spoke process] {} exited with {status}",
                        spoke.name
                    )),
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        failures.push(format!(
                            "[spoke process] {} did not stop within 60 s",
                            spoke.name
                        ));
                    }
                }
            }
        }
        std::mem::take(&mut self.spokes)
            .into_iter()
            .map(|spoke| {
                let journal = read_journal(&spoke.name, &spoke.journal);
                (spoke, journal)
            })
            .collect()
    }
}

impl Drop for SpokeProcs {
    fn drop(&mut self) {
        for spoke in &mut self.spokes {
            if let Some((mut child, _)) = spoke.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn from_ms(ms: &str) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.parse().expect("a time in the journal"))
}

/// Parses a journal. A line cut short by a SIGKILL (the last one of a
/// killed incarnation, never a synced `start`) is skipped.
pub fn read_journal(spoke: &str, path: &Path) -> SpokeJournal {
    let mut journal = SpokeJournal::default();
    let mut index = HashMap::<u64, usize>::new();
    let file = File::open(path).expect("the spoke's journal");
    for line in std::io::BufReader::new(file).lines() {
        let line = line.unwrap_or_default();
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["start", incarnation, number, directive, attempt, at] => {
                let number: u64 = number.parse().unwrap();
                index.insert(number, journal.runs.len());
                journal
                    .incarnation_of
                    .insert(number, incarnation.parse().unwrap());
                journal.runs.push(Run {
                    spoke: spoke.to_owned(),
                    directive: (*directive).to_owned(),
                    attempt: attempt.parse().unwrap(),
                    number,
                    started: from_ms(at),
                    ended: None,
                });
            }
            ["end", number, at] => {
                if let Some(i) = number.parse().ok().and_then(|n: u64| index.get(&n)) {
                    journal.runs[*i].ended = Some(from_ms(at));
                }
            }
            ["exit", incarnation, ticks, dropped, rejected, ended @ ..] => {
                journal.exits.push(Exit {
                    incarnation: incarnation.parse().unwrap(),
                    ticks: ticks.parse().unwrap(),
                    dropped: dropped.parse().unwrap(),
                    rejected: rejected.parse().unwrap(),
                    ended: ended.join(" "),
                });
            }
            _ => {}
        }
    }
    journal
}

/// The journal as the child writes it: appended, `start` lines synced.
struct JournalFile(Mutex<File>);

impl JournalFile {
    fn open(path: &Path) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the journal");
        Self(Mutex::new(file))
    }

    fn write(&self, line: &str, sync: bool) {
        let mut file = self.0.lock().unwrap();
        file.write_all(format!("{line}\n").as_bytes()).unwrap();
        if sync {
            file.sync_data().unwrap();
        }
    }
}

#[derive(serde::Deserialize)]
struct Job {
    n: u64,
    sleep_ms: u64,
}

/// The child's body: runs one spoke until its stdin closes. Does nothing
/// when the environment does not describe a spoke (a plain
/// `cargo test -- --ignored`).
pub fn child_main() {
    let Ok(name) = std::env::var(ENV_NAME) else {
        eprintln!("{CHILD_TEST}: the body of a spoke process of the fault suite; nothing to do");
        return;
    };
    let var = |key: &str| std::env::var(key).unwrap_or_else(|_| panic!("{key} is set"));
    let incarnation: u32 = var(ENV_INCARNATION).parse().unwrap();
    let journal = Arc::new(JournalFile::open(Path::new(&var(ENV_JOURNAL))));
    let _ = tracing_subscriber::fmt()
        .with_env_filter("spoke_client=debug")
        .with_ansi(false)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let client = build(&name, &var(ENV_URL), &var(ENV_STATE), incarnation, &journal).await;
        let running = tokio::spawn({
            let client = client.clone();
            async move { client.run().await }
        });
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            // Stdin closes when the test asks to stop (or dies).
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop_tx.send_replace(true);
        });
        eventually("the spoke to connect", || async {
            client.status().connected.then_some(())
        })
        .await;
        journal.write(&format!("ready {incarnation}"), true);
        // Tick points, labelled `<incarnation>-<seq>`, until told to stop.
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let seq = format!("{incarnation}-{ticks}");
            client.record(DOMAIN, "tick", ticks as f64, &[("seq", &seq)]);
            ticks += 1;
        }
        let _ = crate::fleet::try_eventually(Duration::from_secs(30), || async {
            let pushed = client.flush().await.is_ok();
            (pushed && client.status().buffered_points == 0).then_some(())
        })
        .await;
        client.shutdown();
        let ended = match running.await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e.to_string().replace('\n', " "),
            Err(e) => format!("the client's task: {e}"),
        };
        let status = client.status();
        journal.write(
            &format!(
                "exit {incarnation} {ticks} {} {} {ended}",
                status.dropped_points, status.rejected_points
            ),
            true,
        );
    });
}

async fn build(
    name: &str,
    url: &str,
    state_dir: &str,
    incarnation: u32,
    journal: &Arc<JournalFile>,
) -> Client {
    let journal = journal.clone();
    let count = Arc::new(AtomicU64::new(0));
    Client::builder(name)
        .endpoint(url)
        .enrollment_token(ENROLLMENT_TOKEN)
        .state_dir(state_dir)
        .backoff(
            Backoff::new(Duration::from_millis(100), 2.0, 0.2, Duration::from_secs(1)).unwrap(),
        )
        .call_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(2))
        .flush_interval(Duration::from_millis(500))
        .flush_at_points(50)
        .shutdown_grace(Duration::from_secs(5))
        .handler("job", "1", move |job: Job, ctx: Context| {
            let journal = journal.clone();
            let number = (u64::from(incarnation) << 32) | count.fetch_add(1, Ordering::SeqCst);
            async move {
                // On record before anything the run does.
                journal.write(
                    &format!(
                        "start {incarnation} {number} {} {} {}",
                        ctx.id(),
                        ctx.attempt(),
                        unix_ms(SystemTime::now())
                    ),
                    true,
                );
                let label = number.to_string();
                ctx.record(DOMAIN, "run", number as f64, &[("run", &label)]);
                tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
                journal.write(
                    &format!("end {number} {}", unix_ms(SystemTime::now())),
                    false,
                );
                Ok::<_, String>(json!({"n": job.n, "run": number}))
            }
        })
        .build()
        .await
        .expect("build a spoke")
}
