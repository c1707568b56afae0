//! The durable directive cycle, driven the same way on every system: a
//! producer creates directives round-robin over the spokes whenever one of
//! the `window` slots is free; each spoke acks what it receives; a
//! directive's cycle ends when its ack is confirmed, which frees its slot.
//!
//! Each system plugs in a [`Producer`] and consumers that call
//! [`Tracker::complete`]; [`drive`] measures. Every payload carries its
//! sequence number (`seq`), so a spoke can complete a directive even if it
//! arrives before the create call returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use hub_proto::v1 as pb;
use pbjson_types::Struct;
use tokio::sync::{Notify, Semaphore};

use crate::contract::{self, AckPath, Admin, CreatePath, Fleet, FleetSpec, Handler, Spoke, Target};
use crate::proc::Pid;

/// The size of one cycle run.
#[derive(Debug, Clone, Copy)]
pub struct CycleSpec {
    /// Spokes, each with its own connection.
    pub spokes: usize,
    /// Directives in the run.
    pub directives: usize,
    /// Directives in flight at once, overall.
    pub window: usize,
    /// How long the whole run (and its setup) may take.
    pub timeout: Duration,
}

impl CycleSpec {
    /// The in-flight window each spoke is granted: never below W/S, so it
    /// never binds before the overall window does (the hub's default of 32
    /// at least; its cap is 256).
    pub fn spoke_window(&self) -> u32 {
        self.window.div_ceil(self.spokes.max(1)).clamp(32, 256) as u32
    }
}

/// One directive to create: its sequence number and its spoke.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    /// Sequence number, in the payload.
    pub seq: u64,
    /// Index of the target spoke.
    pub spoke: usize,
}

/// How a system creates directives.
pub trait Producer: Send + Sync + 'static {
    /// Most items one `create` may carry; [`drive`] hands over every free
    /// slot up to this, never waiting for a batch to fill.
    fn max_batch(&self) -> usize {
        1
    }

    /// Creates the items; returns when the system confirmed them.
    fn create(&self, items: Vec<Item>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The JSON payload of directive `seq` (about 100 bytes).
pub fn payload(seq: u64) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "doc": "invoices/2026-11",
        "mode": "full",
        "pad": "0123456789abcdefghijklmnopqrstuvwxyz",
    })
}

/// Reads `seq` back from a JSON payload.
pub fn seq_of_json(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Start and end times of every directive of a run, and the window.
pub struct Tracker {
    base: Instant,
    /// Nanoseconds since `base` + 1 when the create started; 0: not yet.
    started: Vec<AtomicU64>,
    /// Nanoseconds from create to confirmed ack; 0: not yet.
    latency: Vec<AtomicU64>,
    done: AtomicUsize,
    last_done: AtomicU64,
    slots: Semaphore,
    changed: Notify,
    failure: Mutex<Option<String>>,
}

impl Tracker {
    /// A tracker for `directives` with `window` slots.
    pub fn new(directives: usize, window: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            base: Instant::now(),
            started: (0..directives).map(|_| AtomicU64::new(0)).collect(),
            latency: (0..directives).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicUsize::new(0),
            last_done: AtomicU64::new(0),
            slots: Semaphore::new(window),
            changed: Notify::new(),
            failure: Mutex::new(None),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The ack of `seq` was confirmed. Repeats (redeliveries) count once.
    pub fn complete(&self, seq: u64) {
        let Some(started) = self.started.get(seq as usize) else {
            return;
        };
        let started = started.load(Ordering::Acquire);
        if started == 0 {
            self.fail(format!("directive {seq} acked before its create started"));
            return;
        }
        let now = self.now_ns();
        let latency = now.saturating_sub(started - 1).max(1);
        if self.latency[seq as usize]
            .compare_exchange(0, latency, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.last_done.fetch_max(now, Ordering::AcqRel);
            self.slots.add_permits(1);
            if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.started.len() {
                self.changed.notify_waiters();
            }
        }
    }

    /// Something went wrong: the run stops with this error.
    pub fn fail(&self, message: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(message);
        self.changed.notify_waiters();
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What one cycle run measured.
#[derive(Debug, Clone)]
pub struct CycleResult {
    /// Directives completed.
    pub directives: usize,
    /// From the first create to the last confirmed ack.
    pub elapsed: Duration,
    /// Directive latencies (create start to ack confirmed), sorted.
    pub latencies: Vec<Duration>,
    /// Server CPU over the run (the server process and its database), if
    /// the server's process is known.
    pub server_cpu: Option<Duration>,
    /// Of which the database's (a PostgreSQL cluster's processes), if any.
    pub database_cpu: Option<Duration>,
    /// The load generator's CPU over the run.
    pub loadgen_cpu: Duration,
}

impl CycleResult {
    /// The figures for the report.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let n = self.directives as f64;
        let mut m = BTreeMap::new();
        m.insert("directives".into(), n);
        m.insert("elapsed_s".into(), self.elapsed.as_secs_f64());
        m.insert("throughput_per_s".into(), n / self.elapsed.as_secs_f64());
        for (name, p) in [("p50_ms", 0.50), ("p99_ms", 0.99), ("max_ms", 1.0)] {
            m.insert(
                name.into(),
                percentile(&self.latencies, p).as_secs_f64() * 1e3,
            );
        }
        if let Some(cpu) = self.server_cpu {
            m.insert("server_cpu_us".into(), cpu.as_secs_f64() * 1e6 / n);
        }
        if let Some(cpu) = self.database_cpu {
            m.insert("database_cpu_us".into(), cpu.as_secs_f64() * 1e6 / n);
        }
        m.insert(
            "loadgen_cpu_us".into(),
            self.loadgen_cpu.as_secs_f64() * 1e6 / n,
        );
        m
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The processes whose CPU time is the server side of a run.
#[derive(Debug, Clone, Default)]
pub struct ServerCpu {
    /// The server's processes (the hub, its replicas, the floor, Redis,
    /// NATS), as far as they are known.
    pub processes: Vec<Pid>,
    /// A PostgreSQL postmaster: its whole process tree (backends,
    /// WAL writer, checkpointer, ...) is the database's share.
    pub database: Option<Pid>,
}

impl ServerCpu {
    /// Just this process, if known.
    pub fn process(pid: Option<Pid>) -> ServerCpu {
        ServerCpu {
            processes: pid.into_iter().collect(),
            database: None,
        }
    }

    /// (processes, database) CPU so far.
    fn read(&self) -> anyhow::Result<(Option<Duration>, Option<Duration>)> {
        let processes = if self.processes.is_empty() {
            None
        } else {
            Some(
                self.processes
                    .iter()
                    .map(|p| p.cpu())
                    .sum::<anyhow::Result<Duration>>()?,
            )
        };
        Ok((processes, self.database.map(Pid::tree_cpu).transpose()?))
    }
}

/// Runs the closed loop: creates `tracker`'s directives round-robin over
/// `spokes` through `producer` and waits until every one is acked. Throughput
/// counts the whole run, ramp-up included (no warm-up is excluded); CPU is
/// read before the first create and after the last ack.
pub async fn drive<P: Producer>(
    producer: Arc<P>,
    tracker: Arc<Tracker>,
    spokes: usize,
    server: ServerCpu,
    timeout: Duration,
) -> anyhow::Result<CycleResult> {
    let total = tracker.started.len();
    let server_before = server.read()?;
    let loadgen_cpu = Pid::SELF.cpu()?;
    let start = tracker.now_ns();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut next = 0;
    while next < total {
        let permit = tokio::time::timeout_at(deadline, tracker.slots.acquire())
            .await
            .ok()
            .and_then(Result::ok);
        let Some(permit) = permit else {
            bail!("no free slot within {timeout:?} ({next} of {total} created)");
        };
        permit.forget();
        if let Some(e) = tracker.failure() {
            bail!("{e}");
        }
        let mut items = Vec::new();
        loop {
            let seq = next as u64;
            tracker.started[next].store(tracker.now_ns() + 1, Ordering::Release);
            items.push(Item {
                seq,
                spoke: next % spokes,
            });
            next += 1;
            if items.len() >= producer.max_batch() || next >= total {
                break;
            }
            match tracker.slots.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        }
        let (producer, tracker) = (producer.clone(), tracker.clone());
        tokio::spawn(async move {
            if let Err(e) = producer.create(items).await {
                tracker.fail(format!("create: {e:#}"));
            }
        });
    }
    loop {
        let changed = tracker.changed.notified();
        if let Some(e) = tracker.failure() {
            bail!("{e}");
        }
        let done = tracker.done.load(Ordering::Acquire);
        if done == total {
            break;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            bail!(
                "{} of {total} directives not acked within {timeout:?}",
                total - done
            );
        }
    }
    let server_after = server.read()?;
    let spent =
        |before: Option<Duration>, after: Option<Duration>| Some(after?.saturating_sub(before?));
    let process_cpu = spent(server_before.0, server_after.0);
    let database_cpu = spent(server_before.1, server_after.1);
    let server_cpu = match (process_cpu, database_cpu) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or_default() + b.unwrap_or_default()),
    };
    let loadgen_cpu = Pid::SELF.cpu()?.saturating_sub(loadgen_cpu);
    let end = tracker.last_done.load(Ordering::Acquire);
    let mut latencies: Vec<Duration> = tracker
        .latency
        .iter()
        .map(|l| Duration::from_nanos(l.load(Ordering::Acquire)))
        .collect();
    latencies.sort_unstable();
    Ok(CycleResult {
        directives: total,
        elapsed: Duration::from_nanos(end.saturating_sub(start).max(1)),
        latencies,
        server_cpu,
        database_cpu,
        loadgen_cpu,
    })
}

/// The gRPC paths a hub.v1 cycle uses.
#[derive(Debug, Clone, Copy)]
pub struct Paths {
    /// How spokes ack.
    pub ack: AckPath,
    /// How the producer creates.
    pub create: CreatePath,
}

/// The cycle on a hub.v1 server (the hub, its replicas, or the floor) at
/// `target`; `cpu` is its side's processes.
pub async fn hub_v1(
    target: &Target,
    cpu: ServerCpu,
    spec: CycleSpec,
    paths: Paths,
) -> anyhow::Result<CycleResult> {
    let tracker = Tracker::new(spec.directives, spec.window);
    let handler = Arc::new(AckOnReceipt {
        tracker: tracker.clone(),
        result: contract::to_struct(serde_json::json!({"ok": true})),
    });
    let (fleet, _) = Fleet::connect(
        FleetSpec {
            target,
            prefix: "cycle",
            count: spec.spokes,
            window: spec.spoke_window(),
            concurrency: 64,
            ack_path: paths.ack,
            timeout: spec.timeout,
        },
        handler,
    )
    .await?;
    let producer = Arc::new(HubV1Producer {
        admin: Admin::connect(target, spec.window, paths.create).await?,
        names: fleet.spokes.iter().map(|s| s.name.clone()).collect(),
    });
    let result = drive(producer, tracker, spec.spokes, cpu, spec.timeout).await;
    drop(fleet);
    result
}

struct AckOnReceipt {
    tracker: Arc<Tracker>,
    result: Struct,
}

impl Handler for AckOnReceipt {
    fn directive(&self, spoke: &Arc<Spoke>, directive: pb::Directive, _epoch: u64) {
        let Some(seq) = contract::number(directive.payload.as_ref(), "seq") else {
            self.tracker
                .fail(format!("directive {} has no seq", directive.id));
            return;
        };
        let (spoke, tracker, result) = (spoke.clone(), self.tracker.clone(), self.result.clone());
        tokio::spawn(async move {
            match spoke.complete(directive.id, result).await {
                Ok(()) => tracker.complete(seq as u64),
                Err(s) => tracker.fail(format!("spoke {}: Ack: {s}", spoke.name)),
            }
        });
    }
}

struct HubV1Producer {
    admin: Admin,
    names: Vec<String>,
}

impl Producer for HubV1Producer {
    fn max_batch(&self) -> usize {
        match self.admin.create_path {
            CreatePath::Single => 1,
            CreatePath::Batch => contract::MAX_CREATE_BATCH,
        }
    }

    async fn create(&self, items: Vec<Item>) -> anyhow::Result<()> {
        match self.admin.create_path {
            CreatePath::Batch => {
                let items = items
                    .into_iter()
                    .map(|item| {
                        let payload = contract::to_struct(payload(item.seq));
                        (self.names[item.spoke].clone(), payload)
                    })
                    .collect();
                self.admin.create_batch(items).await?;
            }
            CreatePath::Single => {
                for item in items {
                    let target =
                        pb::directive_target::Target::SpokeName(self.names[item.spoke].clone());
                    let payload = contract::to_struct(payload(item.seq));
                    self.admin.create(target, payload, None).await?;
                }
            }
        }
        Ok(())
    }
}
