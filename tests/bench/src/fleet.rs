//! Many connected spokes on one server (the hub or the floor):
//!
//! - idle capacity: the server's RSS before any spoke and after every
//!   stream is open, per spoke; and the time to register and connect them;
//! - fan-out: one CreateDirective to all spokes, time until the last spoke
//!   has it (and until every ack is confirmed);
//! - reconnect storm (hub only): one directive per spoke, delivered and held
//!   unacked; the server is killed with SIGKILL and restarted on the same
//!   ports and data dir; every spoke reconnects on its own. Time until
//!   every stream is back, and every held directive must be delivered again
//!   and acked: the ones that are not are lost.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use hub_proto::v1 as pb;
use pb::directive_target::Target;
use pbjson_types::Struct;
use tokio::sync::Notify;

use crate::contract::{self, AckPath, Admin, CreatePath, Fleet, FleetSpec, Handler, Spoke};
use crate::servers::Server;

/// Held storm directives must not be redelivered before the kill.
const STORM_ACK_DEADLINE: Duration = Duration::from_secs(3600);

/// Creates in flight while sending the storm's directives.
const STORM_CREATE_CONCURRENCY: usize = 64;

/// What to do with the fleet.
#[derive(Debug, Clone, Copy)]
pub struct FleetRun {
    /// Spokes.
    pub count: usize,
    /// At most this many registering at once.
    pub concurrency: usize,
    /// Send one directive to all spokes.
    pub fanout: bool,
    /// Kill and restart the server (the hub: it must keep its directives).
    pub storm: bool,
    /// How long each step may take.
    pub timeout: Duration,
    /// How spokes ack.
    pub ack_path: AckPath,
}

/// The figures (`lost` among them); an error only if a step could not run.
pub async fn run(server: &mut Server, spec: FleetRun) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let phases = Arc::new(Phases::new(spec.count));
    let rss_before = server.pid().rss_kib()?;
    let (fleet, connect) = Fleet::connect(
        FleetSpec {
            target: server.target(),
            prefix: "idle",
            count: spec.count,
            window: 32,
            concurrency: spec.concurrency,
            ack_path: spec.ack_path,
            timeout: spec.timeout,
        },
        Arc::new(phases.clone()),
    )
    .await?;
    let rss_after = server.pid().rss_kib()?;
    m.insert("spokes".into(), spec.count as f64);
    m.insert("connect_s".into(), connect.as_secs_f64());
    m.insert("rss_before_kib".into(), rss_before as f64);
    m.insert("rss_after_kib".into(), rss_after as f64);
    m.insert(
        "rss_per_spoke_kib".into(),
        rss_after.saturating_sub(rss_before) as f64 / spec.count as f64,
    );
    let mut lost = 0;
    if spec.fanout || spec.storm {
        let admin = Admin::connect(
            server.target(),
            STORM_CREATE_CONCURRENCY,
            CreatePath::Single,
        )
        .await?;
        if spec.fanout {
            lost += fanout(&admin, &phases, spec, &mut m).await?;
        }
        if spec.storm {
            lost += storm(server, &fleet, &admin, &phases, spec, &mut m).await?;
        }
    }
    m.insert("lost".into(), lost as f64);
    Ok(m)
}

async fn fanout(
    admin: &Admin,
    phases: &Phases,
    spec: FleetRun,
    m: &mut BTreeMap<String, f64>,
) -> anyhow::Result<usize> {
    let payload = contract::to_struct(serde_json::json!({"phase": "fanout"}));
    let start = Instant::now();
    let reply = admin.create(Target::AllSpokes(true), payload, None).await?;
    let created = start.elapsed();
    if reply.directives.len() != spec.count {
        bail!(
            "the fan-out made {} directives for {} spokes",
            reply.directives.len(),
            spec.count
        );
    }
    m.insert("fanout_create_s".into(), created.as_secs_f64());
    let received = phases.fanout_received.wait(spec.count, spec.timeout).await;
    if let Some(last) = phases.fanout_received.last() {
        m.insert("fanout_s".into(), last.duration_since(start).as_secs_f64());
    }
    phases.fanout_acked.wait(spec.count, spec.timeout).await;
    if let Some(last) = phases.fanout_acked.last() {
        m.insert(
            "fanout_acked_s".into(),
            last.duration_since(start).as_secs_f64(),
        );
    }
    Ok(spec.count - received)
}

async fn storm(
    server: &mut Server,
    fleet: &Fleet,
    admin: &Admin,
    phases: &Arc<Phases>,
    spec: FleetRun,
    m: &mut BTreeMap<String, f64>,
) -> anyhow::Result<usize> {
    // One directive per spoke, each delivered and held without an ack.
    let start = Instant::now();
    let mut creates = futures_util::stream::iter(fleet.spokes.iter())
        .map(|spoke| {
            let payload = contract::to_struct(serde_json::json!({"phase": "storm"}));
            let target = Target::SpokeName(spoke.name.clone());
            admin.create(target, payload, Some(STORM_ACK_DEADLINE))
        })
        .buffer_unordered(STORM_CREATE_CONCURRENCY);
    let mut created = 0;
    while let Some(reply) = creates.next().await {
        let reply = reply?;
        created += reply.directives.len();
        let mut open = phases.storm_open.lock().unwrap_or_else(|e| e.into_inner());
        open.extend(reply.directives.into_iter().map(|d| d.id));
    }
    drop(creates);
    m.insert("storm_directives".into(), created as f64);
    m.insert("storm_create_s".into(), start.elapsed().as_secs_f64());
    let held = phases.storm_received.wait(spec.count, spec.timeout).await;
    if held < spec.count {
        bail!(
            "only {held} of {} storm directives delivered before the kill",
            spec.count
        );
    }

    // From now on a spoke acks storm directives on a stream opened after the
    // restart.
    let epoch = fleet.streams.begin_epoch();
    phases.storm_epoch.store(epoch, Ordering::Release);
    server.kill();
    let restart = Instant::now();
    server.restart().await?;
    m.insert("storm_ready_s".into(), restart.elapsed().as_secs_f64());
    fleet.streams.wait_open(spec.count, spec.timeout).await?;
    m.insert("storm_reconnect_s".into(), restart.elapsed().as_secs_f64());
    phases.storm_acked.wait(created, spec.timeout).await;
    if let Some(last) = phases.storm_acked.last() {
        m.insert(
            "storm_recovered_s".into(),
            last.duration_since(restart).as_secs_f64(),
        );
    }
    let lost = phases
        .storm_open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    Ok(lost)
}

/// A count to wait for, with the time of its last step.
#[derive(Default)]
struct Counter {
    count: AtomicUsize,
    last: Mutex<Option<Instant>>,
    changed: Notify,
}

impl Counter {
    fn add(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.count.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the count reaches `target` or `timeout` passes; returns
    /// the count.
    async fn wait(&self, target: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            let count = self.count.load(Ordering::Acquire);
            if count >= target || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.count.load(Ordering::Acquire);
            }
        }
    }
}

/// What the spokes saw of the fan-out and the storm.
struct Phases {
    result: Struct,
    fanout_seen: Vec<AtomicBool>,
    fanout_received: Counter,
    fanout_acked: Counter,
    storm_seen: Vec<AtomicBool>,
    storm_received: Counter,
    /// Storm directives are acked on streams of this epoch and later (0: hold).
    storm_epoch: AtomicU64,
    /// Storm directives created and not acked yet.
    storm_open: Mutex<HashSet<String>>,
    storm_acked: Counter,
}

impl Phases {
    fn new(count: usize) -> Self {
        Phases {
            result: contract::to_struct(serde_json::json!({"ok": true})),
            fanout_seen: (0..count).map(|_| AtomicBool::new(false)).collect(),
            fanout_received: Counter::default(),
            fanout_acked: Counter::default(),
            storm_seen: (0..count).map(|_| AtomicBool::new(false)).collect(),
            storm_received: Counter::default(),
            storm_epoch: AtomicU64::new(0),
            storm_open: Mutex::new(HashSet::new()),
            storm_acked: Counter::default(),
        }
    }
}

impl Handler for Arc<Phases> {
    fn directive(&self, spoke: &Arc<Spoke>, directive: pb::Directive, epoch: u64) {
        let phase = contract::text(directive.payload.as_ref(), "phase").unwrap_or_default();
        let first = |seen: &[AtomicBool]| !seen[spoke.index].swap(true, Ordering::AcqRel);
        match phase {
            "fanout" => {
                if first(&self.fanout_seen) {
                    self.fanout_received.add();
                }
                let (phases, spoke) = (self.clone(), spoke.clone());
                tokio::spawn(async move {
                    if spoke
                        .complete(directive.id, phases.result.clone())
                        .await
                        .is_ok()
                    {
                        phases.fanout_acked.add();
                    }
                });
            }
            "storm" => {
                if first(&self.storm_seen) {
                    self.storm_received.add();
                }
                let armed = self.storm_epoch.load(Ordering::Acquire);
                if armed == 0 || epoch < armed {
                    return;
                }
                let (phases, spoke) = (self.clone(), spoke.clone());
                tokio::spawn(async move {
                    let id = directive.id.clone();
                    if spoke
                        .complete(directive.id, phases.result.clone())
                        .await
                        .is_ok()
                    {
                        let removed = phases
                            .storm_open
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        if removed {
                            phases.storm_acked.add();
                        }
                    }
                });
            }
            _ => {}
        }
    }
}
