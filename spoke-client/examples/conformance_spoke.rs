//! A spoke on the spoke-client library with the command-line contract of the
//! conformance scenario (`tests/conformance/scenario.py`), the same as the
//! Python and Node example spokes (`examples/python-spoke/spoke.py`,
//! `examples/node-spoke/spoke.js`): it declares and handles the `echo` and
//! `sum` directive types, pushes one demo metric batch and resends it once,
//! and reports what it does as JSON lines in `--events-file`.
//! `tests/polyglot.sh` runs the scenario against it; `cargo build --workspace
//! --all-targets` builds it into `target/debug/examples/conformance_spoke`.
//! Against a local hub (`cargo run -p hub -- serve`):
//!
//! ```sh
//! cargo run -p spoke-client --example conformance_spoke
//! cargo run -p hub -- send sum --to rust-spoke --payload '{"numbers": [1, 2]}'
//! ```
//!
//! The library does the rest: registration (the key is kept in the library's
//! SQLite state in `--state-dir`), the directive stream with reconnection
//! and backoff, heartbeats at the hub's interval, a stream silent for three
//! keepalive intervals given up, deduplication of redeliveries from the
//! local record, and acks. The events file comes from the library's
//! observer ([`ClientBuilder::on_event`]), which is told of each
//! registration, each outcome once it is recorded and before it is acked
//! (where `--crash-before-ack` exits), and each redelivery answered from the
//! record; the demo batch goes out with [`Client::push_batch`], which takes
//! the caller's batch id. Exit status: 0 on SIGTERM or SIGINT and after
//! `--exit-after N`; 2 when the hub refuses the spoke (a wrong enrollment
//! token at once; a refused key, which the client waits to be replaced, when
//! stopped meanwhile) or the options are wrong; 3 for `--crash-before-ack`.
//!
//! [`ClientBuilder::on_event`]: spoke_client::ClientBuilder::on_event

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{Value, json};
use spoke_client::{Backoff, Client, Context, Event, Point};
use tokio::sync::Notify;

/// The version this spoke reports to the hub.
const VERSION: &str = "rust-spoke/0.1.0";
/// How often the metric pusher looks at the client's status.
const POLL: Duration = Duration::from_millis(20);

/// A hub spoke on the Rust spoke-client: handles `echo` and `sum` directives.
#[derive(Parser)]
struct Args {
    /// The hub's gRPC address (host:port, or http://host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    hub: String,
    /// The spoke's unique name.
    #[arg(long, default_value = "rust-spoke")]
    name: String,
    /// Where the key, the directive records and the demo batch are kept
    /// (default: target/spoke-state/NAME).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The hub's enrollment token, needed only until the spoke has a key.
    #[arg(long, default_value = "hub-data/enrollment.token")]
    enrollment_token_file: PathBuf,
    /// Exit 0 after handling N new directives (0: never).
    #[arg(long, default_value_t = 0, value_name = "N")]
    exit_after: u32,
    /// First reconnect delay.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    backoff_base: f64,
    /// Append one JSON line per registration, directive handled or answered
    /// again, and metric push.
    #[arg(long, value_name = "PATH")]
    events_file: Option<PathBuf>,
    /// For tests: exit 3 right after recording the first new outcome,
    /// before acking it, as a crash would.
    #[arg(long)]
    crash_before_ack: bool,
}

// --- the work: one function per directive type ---------------------------------

/// `echo`: the result is the payload.
async fn echo(payload: Value, _ctx: Context) -> Result<Value, String> {
    Ok(payload)
}

/// `sum`: `{"numbers": [1, 2.5]}` -> `{"sum": 3.5}`; anything else FAILS.
/// The payload is taken as raw JSON: a typed payload that does not
/// deserialize would be REJECTED by the library, and a bad `sum` must FAIL.
async fn sum(payload: Value, _ctx: Context) -> Result<Value, String> {
    let numbers = payload
        .get("numbers")
        .and_then(Value::as_array)
        .and_then(|list| list.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
        .ok_or("sum: payload.numbers must be a list of numbers")?;
    Ok(json!({"sum": numbers.iter().sum::<f64>()}))
}

// --- the events file --------------------------------------------------------------

/// `--events-file`: one JSON object per line, each written with one append.
struct Events {
    path: Option<PathBuf>,
    lock: Mutex<()>,
}

impl Events {
    fn report(&self, event: &str, fields: Value) {
        let Some(path) = &self.path else { return };
        let mut record = json!({ "event": event });
        if let (Some(record), Value::Object(fields)) = (record.as_object_mut(), fields) {
            record.extend(fields);
        }
        let line = format!("{record}\n");
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not write the events file");
        }
    }
}

// --- the demo metric batch --------------------------------------------------------

const DEMO_POINTS: [(&str, &str, f64, &str); 3] = [
    ("statistics", "orders_processed", 42.0, "1"),
    ("statistics", "queue_depth", 7.0, "1"),
    ("compensation", "payout_total", 1234.5, "EUR"),
];

/// The demo batch: made once per state directory and kept (same id, same
/// time) in `metrics-batch.json` until it is sent, then never sent again.
#[derive(serde::Serialize, serde::Deserialize)]
struct DemoBatch {
    batch_id: String,
    time_ns: u64,
}

impl DemoBatch {
    fn pending(state_dir: &Path) -> std::io::Result<Option<Self>> {
        let path = state_dir.join("metrics-batch.json");
        if let Ok(text) = fs::read_to_string(&path) {
            return serde_json::from_str(&text).map(Some).map_err(Into::into);
        }
        if state_dir.join("metrics-batch.sent").exists() {
            return Ok(None);
        }
        let time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let batch = Self {
            batch_id: uuid::Uuid::now_v7().to_string(),
            time_ns,
        };
        fs::write(&path, serde_json::to_string(&batch)?)?;
        Ok(Some(batch))
    }

    fn sent(state_dir: &Path) -> std::io::Result<()> {
        fs::write(state_dir.join("metrics-batch.sent"), "")?;
        fs::remove_file(state_dir.join("metrics-batch.json"))
    }

    fn points(&self) -> Vec<Point> {
        let time = UNIX_EPOCH + Duration::from_nanos(self.time_ns);
        DEMO_POINTS
            .iter()
            .map(|(domain, name, value, unit)| {
                Point::new(*domain, *name, *value)
                    .unit(*unit)
                    .label("lang", "rust")
                    .at(time)
            })
            .collect()
    }
}

/// Pushes the demo batch, then resends it once (the hub answers DUPLICATE
/// and stores it once), on the first connection that lets both through.
async fn push_demo_batch(client: Client, state_dir: PathBuf, events: Arc<Events>) {
    let batch = match DemoBatch::pending(&state_dir) {
        Ok(Some(batch)) => batch,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot keep the demo metric batch; not pushing it");
            return;
        }
    };
    loop {
        while !client.status().connected {
            tokio::time::sleep(POLL).await;
        }
        let mut pushed = Ok(());
        for attempt in ["sent", "resent"] {
            match client.push_batch(&batch.batch_id, batch.points()).await {
                Ok(result) => {
                    let status = result.status().as_str_name();
                    tracing::info!(batch_id = %result.batch_id, attempt, status, points = result.accepted_points, "metric batch pushed");
                    events.report(
                        "metrics",
                        json!({
                            "batch_id": result.batch_id,
                            "status": status,
                            "accepted_points": result.accepted_points,
                        }),
                    );
                }
                Err(e) => {
                    pushed = Err(e);
                    break;
                }
            }
        }
        match pushed {
            Ok(()) => {
                if let Err(e) = DemoBatch::sent(&state_dir) {
                    tracing::warn!(error = %e, "could not mark the demo batch sent");
                }
                return;
            }
            // Resent later with the same id: the hub stores it once.
            Err(e) => {
                tracing::warn!(error = %e, "metric push failed; retrying on the next connection")
            }
        }
        while client.status().connected {
            tokio::time::sleep(POLL).await;
        }
    }
}

// --- main --------------------------------------------------------------------------

/// SIGTERM, SIGINT or `done`, whichever comes first.
async fn stopped(done: Arc<Notify>) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = terminate => tracing::info!("stopped by SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("stopped by SIGINT"),
        () = done.notified() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| Path::new("target/spoke-state").join(&args.name));
    let endpoint = if args.hub.contains("://") {
        args.hub.clone()
    } else {
        format!("http://{}", args.hub)
    };
    let base = Duration::try_from_secs_f64(args.backoff_base)
        .map_err(|e| anyhow::anyhow!("--backoff-base: {e}"))?;
    let backoff = Backoff::new(base, 1.6, 0.2, Duration::from_secs(120).max(base))?;
    let events = Arc::new(Events {
        path: args.events_file.clone(),
        lock: Mutex::new(()),
    });

    let handled = AtomicU32::new(0);
    let done = Arc::new(Notify::new());
    let observer = {
        let (events, done) = (events.clone(), done.clone());
        let (crash_before_ack, exit_after) = (args.crash_before_ack, args.exit_after);
        move |event: &Event| match event {
            Event::Registered { spoke_id, new, .. } => {
                events.report("registered", json!({ "spoke_id": spoke_id, "new": new }));
            }
            // Told once the outcome is recorded in the state directory,
            // before the ack is sent.
            Event::Finished {
                id,
                directive_type,
                outcome,
                ..
            } => {
                tracing::info!(directive_id = %id, r#type = %directive_type, outcome, "directive handled");
                events.report(
                    "handled",
                    json!({
                        "directive_id": id,
                        "type": directive_type,
                        "outcome": format!("ACK_OUTCOME_{outcome}"),
                    }),
                );
                if crash_before_ack {
                    tracing::warn!(directive_id = %id, "--crash-before-ack: dying before acking");
                    std::process::exit(3);
                }
                // The ack is sent before the graceful shutdown completes.
                if handled.fetch_add(1, Ordering::SeqCst) + 1 == exit_after {
                    tracing::info!(handled = exit_after, "--exit-after reached; exiting");
                    done.notify_one();
                }
            }
            Event::Redelivered { id, .. } => {
                events.report("reacked", json!({ "directive_id": id }));
            }
            _ => {}
        }
    };

    let mut builder = Client::builder(&args.name)
        .endpoint(endpoint)
        .label("lang", "rust")
        .version(VERSION)
        .state_dir(&state_dir)
        .backoff(backoff)
        .shutdown_grace(Duration::from_secs(3))
        .handler("echo", "1", echo)
        .handler("sum", "1", sum)
        .on_event(observer);
    // Needed only on the first start; later the stored key is used.
    if let Ok(token) = fs::read_to_string(&args.enrollment_token_file) {
        builder = builder.enrollment_token(token);
    }
    let client = builder.build().await?;

    tokio::spawn(push_demo_batch(client.clone(), state_dir, events));
    tracing::info!(name = %args.name, hub = %args.hub, "spoke running");
    match client.run_until(stopped(done)).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %e, "the hub refused this spoke");
            Ok(ExitCode::from(2))
        }
    }
}
