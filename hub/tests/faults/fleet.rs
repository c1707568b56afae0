//! The spokes: spoke-client clients in this process, each with its own
//! state directory, one `job` handler that writes every run into a shared
//! journal (and records a metric point numbered by the run), and a ticker
//! that records uniquely numbered points outside any handler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;
use spoke_client::{Backoff, Client, Context, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::hub_bin::ENROLLMENT_TOKEN;

/// The metric domain of every point the spokes record.
pub const DOMAIN: &str = "faults";

/// One start of a handler.
#[derive(Debug, Clone)]
pub struct Run {
    pub spoke: String,
    pub directive: String,
    pub attempt: u32,
    /// Unique across the test: the label of the run's metric point and the
    /// `run` field of its result.
    pub number: u64,
    pub started: SystemTime,
    pub ended: Option<SystemTime>,
}

/// What the spokes did, as their handlers and observers saw it.
#[derive(Default)]
pub struct Journal {
    pub runs: Vec<Run>,
    /// (directive, when): each `Event::Finished`, i.e. an outcome recorded
    /// in the spoke's state directory.
    pub finished: Vec<(String, SystemTime)>,
    /// Redeliveries answered from the record without running.
    pub redelivered: u64,
}

type Shared = Arc<Mutex<Journal>>;

fn start_run(journal: &Shared, spoke: &str, ctx: &Context) -> u64 {
    let mut j = journal.lock().unwrap();
    let number = j.runs.len() as u64;
    j.runs.push(Run {
        spoke: spoke.to_owned(),
        directive: ctx.id().to_owned(),
        attempt: ctx.attempt(),
        number,
        started: SystemTime::now(),
        ended: None,
    });
    number
}

fn end_run(journal: &Shared, number: u64) {
    journal.lock().unwrap().runs[number as usize].ended = Some(SystemTime::now());
}

#[derive(serde::Deserialize)]
struct Job {
    n: u64,
    sleep_ms: u64,
}

/// One spoke.
pub struct Spoke {
    pub name: String,
    pub client: Client,
    pub state_dir: PathBuf,
    running: JoinHandle<spoke_client::Result<()>>,
    /// Tick points recorded so far, numbered 0..ticks.
    ticks: Arc<AtomicU64>,
}

/// A spoke after shutdown.
pub struct Stopped {
    pub name: String,
    pub state_dir: PathBuf,
    pub status: spoke_client::Status,
    pub ticks: u64,
    pub ended: Result<(), String>,
}

/// The spokes of one test.
pub struct Fleet {
    pub spokes: Vec<Spoke>,
    pub journal: Shared,
    stop_ticking: watch::Sender<bool>,
    tickers: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Builds and runs `count` spokes named `<prefix>-<i>` against
    /// `endpoint`, and waits until each holds a directive stream.
    pub async fn start(prefix: &str, count: usize, endpoint: &str, run: &Path) -> Self {
        Self::start_with_endpoints(prefix, count, &[endpoint.to_owned()], run).await
    }

    /// Like [`start`](Self::start), each spoke configured with all of
    /// `endpoints` (spoke-client fails over between them), spoke `i`'s
    /// list rotated left by `i`: the spokes start on different hubs.
    pub async fn start_with_endpoints(
        prefix: &str,
        count: usize,
        endpoints: &[String],
        run: &Path,
    ) -> Self {
        let journal = Shared::default();
        let (stop_ticking, _) = watch::channel(false);
        let mut spokes = Vec::new();
        let mut tickers = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let state_dir = run.join("spokes").join(&name);
            let mut rotated = endpoints.to_vec();
            rotated.rotate_left(i % endpoints.len());
            let client = build(&name, &rotated, &state_dir, &journal).await;
            let running = tokio::spawn({
                let client = client.clone();
                async move { client.run().await }
            });
            let ticks = Arc::new(AtomicU64::new(0));
            tickers.push(tokio::spawn(tick(
                client.clone(),
                ticks.clone(),
                stop_ticking.subscribe(),
            )));
            spokes.push(Spoke {
                name,
                client,
                state_dir,
                running,
                ticks,
            });
        }
        for spoke in &spokes {
            eventually(&format!("{} to connect", spoke.name), || async {
                spoke.client.status().connected.then_some(())
            })
            .await;
        }
        Self {
            spokes,
            journal,
            stop_ticking,
            tickers,
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.spokes.iter().map(|s| s.name.clone()).collect()
    }

    /// Stops recording tick points.
    pub async fn stop_ticking(&mut self) {
        self.stop_ticking.send_replace(true);
        for ticker in self.tickers.drain(..) {
            ticker.await.unwrap();
        }
    }

    /// Waits until every spoke's buffer is empty (pushing it), then shuts
    /// every spoke down. Failures name what did not settle.
    pub async fn flush_and_stop(self, failures: &mut Vec<String>) -> Vec<Stopped> {
        for spoke in &self.spokes {
            let flushed = try_eventually(Duration::from_secs(30), || async {
                let pushed = spoke.client.flush().await.is_ok();
                (pushed && spoke.client.status().buffered_points == 0).then_some(())
            })
            .await;
            if flushed.is_none() {
                failures.push(format!(
                    "{}: its metric buffer did not empty within 30 s after the faults: {:?}",
                    spoke.name,
                    spoke.client.status()
                ));
            }
        }
        let mut stopped = Vec::new();
        for spoke in self.spokes {
            spoke.client.shutdown();
            let ended = match spoke.running.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the client's task: {e}")),
            };
            stopped.push(Stopped {
                status: spoke.client.status(),
                name: spoke.name,
                state_dir: spoke.state_dir,
                ticks: spoke.ticks.load(Ordering::SeqCst),
                ended,
            });
        }
        stopped
    }
}

async fn build(name: &str, endpoints: &[String], state_dir: &Path, journal: &Shared) -> Client {
    let spoke = name.to_owned();
    let runs = journal.clone();
    let observed = journal.clone();
    endpoints
        .iter()
        .fold(Client::builder(name), |builder, url| builder.endpoint(url))
        .enrollment_token(ENROLLMENT_TOKEN)
        .state_dir(state_dir)
        // Back quickly when the hub returns; the defaults (1 s growing to
        // 120 s) would spend the test waiting.
        .backoff(
            Backoff::new(Duration::from_millis(100), 2.0, 0.2, Duration::from_secs(1)).unwrap(),
        )
        .call_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(2))
        .flush_interval(Duration::from_millis(500))
        .flush_at_points(50)
        .shutdown_grace(Duration::from_secs(5))
        .on_event(move |event| {
            let mut j = observed.lock().unwrap();
            match event {
                Event::Finished { id, .. } => j.finished.push((id.clone(), SystemTime::now())),
                Event::Redelivered { .. } => j.redelivered += 1,
                _ => {}
            }
        })
        .handler("job", "1", move |job: Job, ctx: Context| {
            let (runs, spoke) = (runs.clone(), spoke.clone());
            async move {
                let number = start_run(&runs, &spoke, &ctx);
                let label = number.to_string();
                ctx.record(DOMAIN, "run", number as f64, &[("run", &label)]);
                tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
                end_run(&runs, number);
                Ok::<_, String>(json!({"n": job.n, "run": number}))
            }
        })
        .build()
        .await
        .expect("build a spoke")
}

/// Records tick points 0, 1, 2, … every 200 ms until told to stop.
async fn tick(client: Client, ticks: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let seq = ticks.load(Ordering::SeqCst);
        client.record(DOMAIN, "tick", seq as f64, &[("seq", &seq.to_string())]);
        ticks.store(seq + 1, Ordering::SeqCst);
    }
}

/// The spoke-client log every test of this process writes into.
pub fn spoke_client_log() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults/spoke-client.log")
}

/// Sends spoke-client's log (debug: every redelivery and how it was
/// answered) to [`spoke_client_log`], once per process.
pub fn log_spoke_clients(root: &Path) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let file = std::fs::File::create(root.join("spoke-client.log")).unwrap();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("spoke_client=debug")
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init();
    });
}

/// Polls `probe` until it answers `Some`, for at most `bound`.
pub async fn try_eventually<T, F, Fut>(bound: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Like [`try_eventually`] with 30 s, failing the test on a hang.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    try_eventually(Duration::from_secs(30), probe)
        .await
        .unwrap_or_else(|| panic!("gave up waiting for {what}"))
}

/// Runs per directive, in start order.
pub fn runs_by_directive(runs: &[Run]) -> HashMap<&str, Vec<&Run>> {
    let mut by = HashMap::<&str, Vec<&Run>>::new();
    for run in runs {
        by.entry(run.directive.as_str()).or_default().push(run);
    }
    by
}
