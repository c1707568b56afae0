//! One spoke floods the server while another goes about its business: the
//! `flood` scenario (hub and floor).
//!
//! An observer spoke sends a Heartbeat every `interval` (well within any
//! sane per-spoke limit) and records each one's latency, first for
//! `phase` on a quiet server, then for `phase` while a flooder spoke runs
//! `loops` concurrent Heartbeat loops on its own connection, each sending
//! the next call as soon as the previous one is answered and ignoring any
//! retry-after hint (as an attacker or a runaway client would). The figure
//! that matters is the observer's p99 during the flood divided by its p99
//! without (SPEC: one flooding spoke moves another's p99 by at most 10 %).
//! The floor has no rate limits: its ratio shows what an unlimited flood
//! does on this machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;
use tonic::Code;

use crate::contract::{AckPath, Spoke};
use crate::servers::Server;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct FloodRun {
    /// Concurrent Heartbeat loops of the flooding spoke.
    pub loops: usize,
    /// How long each phase (quiet, flooded) measures.
    pub phase: Duration,
    /// The observer's pace.
    pub interval: Duration,
}

/// What the flooder's calls were answered.
#[derive(Default)]
struct Answers {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

/// The figures of one run.
pub async fn run(server: &Server, spec: FloodRun) -> anyhow::Result<BTreeMap<String, f64>> {
    let target = server.target();
    let observer = Spoke::register(target, 0, "observer".into(), 32, AckPath::Unary).await?;
    let flooder = Arc::new(Spoke::register(target, 1, "flooder".into(), 32, AckPath::Unary).await?);

    let quiet = measure(&observer, spec).await.context("quiet phase")?;

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Answers::default());
    let mut loops = JoinSet::new();
    for _ in 0..spec.loops.max(1) {
        let (flooder, stop, answers) = (flooder.clone(), stop.clone(), answers.clone());
        loops.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let counter = match flooder.heartbeat().await {
                    Ok(()) => &answers.ok,
                    Err(s) if s.code() == Code::ResourceExhausted => &answers.refused,
                    Err(_) => &answers.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Let the flood reach its pace (and the limiter its steady state).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = snapshot(&answers);
    let started = Instant::now();
    let flooded = measure(&observer, spec).await.context("flooded phase");
    let elapsed = started.elapsed().as_secs_f64();
    let after = snapshot(&answers);
    stop.store(true, Ordering::Relaxed);
    while loops.join_next().await.is_some() {}
    let flooded = flooded?;

    let mut m = BTreeMap::new();
    let (q50, q99) = (percentile_ms(&quiet, 0.50), percentile_ms(&quiet, 0.99));
    let (f50, f99) = (percentile_ms(&flooded, 0.50), percentile_ms(&flooded, 0.99));
    m.insert("quiet_p50_ms".into(), q50);
    m.insert("quiet_p99_ms".into(), q99);
    m.insert("flood_p50_ms".into(), f50);
    m.insert("flood_p99_ms".into(), f99);
    if q99 > 0.0 {
        m.insert("p99_ratio".into(), f99 / q99);
    }
    if q50 > 0.0 {
        m.insert("p50_ratio".into(), f50 / q50);
    }
    m.insert("samples".into(), flooded.len().min(quiet.len()) as f64);
    let rate = |i: usize| (after[i] - before[i]) as f64 / elapsed;
    m.insert("flood_accepted_per_s".into(), rate(0));
    m.insert("flood_refused_per_s".into(), rate(1));
    m.insert("flood_other_per_s".into(), rate(2));
    Ok(m)
}

fn snapshot(a: &Answers) -> [u64; 3] {
    [
        a.ok.load(Ordering::Relaxed),
        a.refused.load(Ordering::Relaxed),
        a.other.load(Ordering::Relaxed),
    ]
}

/// The observer's heartbeat latencies over one phase; any error fails the
/// run (a well-behaved spoke must never be refused).
async fn measure(observer: &Spoke, spec: FloodRun) -> anyhow::Result<Vec<Duration>> {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + spec.phase;
    let mut out = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let start = Instant::now();
        observer
            .heartbeat()
            .await
            .with_context(|| format!("observer heartbeat #{}", out.len() + 1))?;
        out.push(start.elapsed());
    }
    Ok(out)
}

fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}
