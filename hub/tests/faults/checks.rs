//! The end checks both fault tests share: wait until the hub and the spokes
//! are quiet, then compare what the operator created, what the hub stored
//! (directives, completion events, metric points), what each spoke
//! recorded locally, and every handler run. Every check runs and every
//! failure is listed, each with the directive, spoke and times needed to
//! tell which component and which window broke.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use proto::DirectiveState;
use tonic::transport::Channel;

use crate::fleet::{self, Fleet, Run, Stopped};
use crate::load::{Load, LoadLog, Outcome};
use crate::view::{
    HubView, clock, completions, directives, is_final, json_of, local_state, ms, points, state_name,
};

/// At most this many lines per kind of failure.
const SHOWN: usize = 15;

/// The outcome of the checks.
pub struct Verdict {
    pub summary: String,
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn note(mut self, line: String) -> Self {
        self.summary.push_str(&format!("\n  {line}"));
        self
    }
}

/// Failures of one kind, capped at [`SHOWN`] lines.
pub struct Kind<'a> {
    out: &'a mut Vec<String>,
    title: &'static str,
    count: usize,
}

impl<'a> Kind<'a> {
    pub fn new(out: &'a mut Vec<String>, title: &'static str) -> Self {
        Self {
            out,
            title,
            count: 0,
        }
    }

    pub fn fail(&mut self, line: String) {
        self.count += 1;
        if self.count <= SHOWN {
            self.out.push(format!("[{}] {line}", self.title));
        }
    }
}

impl Drop for Kind<'_> {
    fn drop(&mut self) {
        if self.count > SHOWN {
            let more = self.count - SHOWN;
            self.out
                .push(format!("[{}] ... and {more} more", self.title));
        }
    }
}

/// Stops the load and the tickers, waits until every directive is final
/// on the hub and every spoke pushed its buffer, then checks everything.
pub async fn settle_and_check(hub_url: &str, mut fleet: Fleet, load: Load, seed: u64) -> Verdict {
    let load = load.finish().await;
    fleet.stop_ticking().await;
    let mut failures = Vec::new();
    let mut admin = wait_quiet(hub_url, &mut failures).await;
    let dirs: Vec<&Path> = fleet.spokes.iter().map(|s| s.state_dir.as_path()).collect();
    wait_settled(&dirs, &mut failures).await;
    let journal = fleet.journal.clone();
    let stopped = fleet.flush_and_stop(&mut failures).await;
    let view = HubView {
        directives: directives(&mut admin).await,
        completions: completions(&mut admin).await,
    };
    let mut stored = HashMap::new();
    for spoke in &stopped {
        stored.insert(spoke.name.clone(), points(&mut admin, &spoke.name).await);
    }
    let journal = journal.lock().unwrap();

    check_directives(&view, &journal, &mut failures);
    check_creates(&view, &load, stopped.len(), &mut failures);
    check_runs(&view, &journal, &mut failures);
    check_local(&view, &stopped, &mut failures);
    check_points(&stored, &journal.runs, &stopped, &mut failures);

    let points: usize = stored.values().map(Vec::len).sum();
    let summary = format!(
        "seed {seed}: {} directives from {} creates ({} keyed retries, {} idempotent replays), \
         {} handler runs, {} redeliveries answered from the record, {points} metric points",
        view.directives.len(),
        load.creates.len(),
        load.retries,
        load.replays,
        journal.runs.len(),
        journal.redelivered,
    );
    Verdict { summary, failures }
}

/// Connects to the hub as the operator and waits up to 60 s until every
/// directive is final; names the ones that are not. Answers the client.
pub async fn wait_quiet(hub_url: &str, failures: &mut Vec<String>) -> AdminServiceClient<Channel> {
    let channel = Channel::from_shared(hub_url.to_owned())
        .unwrap()
        .connect()
        .await
        .expect("reach the hub after the faults");
    let mut admin = AdminServiceClient::new(channel);
    let quiet = fleet::try_eventually(Duration::from_secs(60), || {
        let mut admin = admin.clone();
        async move {
            let all = directives(&mut admin).await;
            all.iter().all(|d| is_final(d.state)).then_some(())
        }
    })
    .await;
    if quiet.is_none() {
        let mut kind = Kind::new(failures, "not final 60 s after the faults");
        for d in directives(&mut admin)
            .await
            .iter()
            .filter(|d| !is_final(d.state))
        {
            kind.fail(format!(
                "directive {} for {} is {} (attempt {})",
                d.id,
                d.spoke_name,
                state_name(d.state),
                d.attempt
            ));
        }
    }
    admin
}

/// Outcomes whose ack reply a fault swallowed are acked again after the
/// spoke reconnects: waits up to 30 s until every record in the spokes'
/// state directories is ACKED or CLOSED.
pub async fn wait_settled(state_dirs: &[&Path], failures: &mut Vec<String>) {
    let settled = fleet::try_eventually(Duration::from_secs(30), || async {
        let unsettled = state_dirs.iter().any(|dir| {
            local_state(dir)
                .values()
                .any(|l| l.status != "ACKED" && l.status != "CLOSED")
        });
        (!unsettled).then_some(())
    })
    .await;
    if settled.is_none() {
        failures.push(
            "[spoke state] some outcomes were still unacked 30 s after the hub was quiet".into(),
        );
    }
}

/// Every directive COMPLETED, exactly once, with the result of one run.
pub fn check_directives(view: &HubView, journal: &fleet::Journal, failures: &mut Vec<String>) {
    let runs = fleet::runs_by_directive(&journal.runs);
    let mut state = Kind::new(failures, "not COMPLETED");
    for d in &view.directives {
        if d.state != DirectiveState::Completed as i32 {
            state.fail(format!(
                "directive {} for {} (n={}) ended {} after {} attempts: {:?}",
                d.id,
                d.spoke_name,
                json_of(d.payload.as_ref())["n"],
                state_name(d.state),
                d.attempt,
                d.error
            ));
        }
    }
    drop(state);
    let mut result = Kind::new(failures, "result not from a run");
    for d in view
        .directives
        .iter()
        .filter(|d| d.state == DirectiveState::Completed as i32)
    {
        let got = json_of(d.result.as_ref());
        let n = &json_of(d.payload.as_ref())["n"];
        let from_a_run = runs.get(d.id.as_str()).is_some_and(|rs| {
            rs.iter().any(|r| {
                r.spoke == d.spoke_name && got == serde_json::json!({"n": n, "run": r.number})
            })
        });
        if !from_a_run {
            result.fail(format!("directive {} (n={n}) COMPLETED with {got}", d.id));
        }
    }
    drop(result);
    let mut events = Kind::new(failures, "completion events");
    for d in view
        .directives
        .iter()
        .filter(|d| d.state == DirectiveState::Completed as i32)
    {
        let count = view.completions.get(&d.id).map_or(0, Vec::len);
        if count != 1 {
            events.fail(format!(
                "directive {} has {count} DIRECTIVE_COMPLETED events",
                d.id
            ));
        }
    }
}

/// Nothing created twice, nothing the operator was told about missing.
pub fn check_creates(view: &HubView, load: &LoadLog, spokes: usize, failures: &mut Vec<String>) {
    let mut by_n = HashMap::<u64, Vec<&proto::Directive>>::new();
    let mut by_key = BTreeMap::<(&str, &str), usize>::new();
    let mut kind = Kind::new(failures, "created twice or lost");
    for d in &view.directives {
        match json_of(d.payload.as_ref())["n"].as_u64() {
            Some(n) => by_n.entry(n).or_default().push(d),
            None => kind.fail(format!("directive {} has no n in its payload", d.id)),
        }
        if !d.idempotency_key.is_empty() {
            *by_key
                .entry((&d.idempotency_key, &d.spoke_name))
                .or_default() += 1;
        }
    }
    for ((key, spoke), count) in &by_key {
        if *count != 1 {
            kind.fail(format!(
                "idempotency key {key}: {count} directives for {spoke}"
            ));
        }
    }
    let known: std::collections::HashSet<u64> = load.creates.iter().map(|c| c.n).collect();
    for (n, ds) in &by_n {
        if !known.contains(n) {
            kind.fail(format!(
                "n={n}: {} directives the operator never asked for",
                ds.len()
            ));
        }
    }
    for c in &load.creates {
        let held: Vec<&str> = by_n
            .get(&c.n)
            .map(|ds| ds.iter().map(|d| d.id.as_str()).collect())
            .unwrap_or_default();
        let per_create = if c.target.is_some() { 1 } else { spokes };
        let what = format!(
            "n={} ({}, key {:?})",
            c.n,
            c.target.as_deref().unwrap_or("every spoke"),
            c.key
        );
        match &c.outcome {
            Outcome::Created(ids) => {
                let mut ids = ids.clone();
                ids.sort();
                let mut held = held.clone();
                held.sort_unstable();
                if ids.len() != per_create || ids != held {
                    kind.fail(format!("{what}: answered {ids:?}, the hub holds {held:?}"));
                }
            }
            Outcome::Unknown if held.len() > per_create => {
                kind.fail(format!("{what}: an unanswered create made {held:?}"));
            }
            Outcome::Unknown => {}
            Outcome::GaveUp(status) => {
                kind.fail(format!("{what}: still failing at the end: {status}"))
            }
            Outcome::Refused(status) => kind.fail(format!("{what}: the hub refused it: {status}")),
        }
    }
}

/// No directive's handler ran twice (the spokes never restart, every run
/// succeeds: one run each is the only right count). Each extra run is
/// described against the earlier run's end, the outcome the spoke recorded
/// and the completion the hub recorded.
fn check_runs(view: &HubView, journal: &fleet::Journal, failures: &mut Vec<String>) {
    let runs = fleet::runs_by_directive(&journal.runs);
    let mut finished = HashMap::<&str, SystemTime>::new();
    for (id, at) in &journal.finished {
        finished.entry(id.as_str()).or_insert(*at);
    }
    let on_hub: HashMap<&str, &proto::Directive> =
        view.directives.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut kind = Kind::new(failures, "handler runs");
    for d in &view.directives {
        if d.state == DirectiveState::Completed as i32 && !runs.contains_key(d.id.as_str()) {
            kind.fail(format!("directive {} COMPLETED but never ran", d.id));
        }
    }
    for (id, rs) in &runs {
        if !on_hub.contains_key(id) {
            kind.fail(format!(
                "directive {id} ran on {} but the hub does not hold it",
                rs[0].spoke
            ));
        }
        for pair in rs.windows(2) {
            kind.fail(describe_rerun(
                pair[0],
                pair[1],
                finished.get(id),
                view.completions.get(*id),
            ));
        }
    }
}

fn describe_rerun(
    first: &Run,
    again: &Run,
    finished: Option<&SystemTime>,
    completed: Option<&Vec<SystemTime>>,
) -> String {
    let mut why = Vec::new();
    match first.ended {
        Some(end) if again.started >= end => why.push(format!(
            "{} ms after the earlier run returned ({})",
            ms(end, again.started),
            clock(end)
        )),
        _ => why.push("while the earlier run was still running".to_owned()),
    }
    if let Some(at) = finished {
        why.push(format!(
            "{:+} ms from the outcome recorded locally ({})",
            ms(*at, again.started),
            clock(*at)
        ));
    }
    if let Some(at) = completed.and_then(|c| c.first()) {
        why.push(format!(
            "{:+} ms from the hub's COMPLETED ({})",
            ms(*at, again.started),
            clock(*at)
        ));
    }
    format!(
        "directive {} ran again on {} (run {} attempt {} at {}, after run {} attempt {}): started {}",
        first.directive,
        again.spoke,
        again.number,
        again.attempt,
        clock(again.started),
        first.number,
        first.attempt,
        why.join(", ")
    )
}

/// Each spoke's record: every directive of its own ACKED, run once; the
/// client itself ended cleanly and dropped nothing.
fn check_local(view: &HubView, stopped: &[Stopped], failures: &mut Vec<String>) {
    let mut kind = Kind::new(failures, "spoke state");
    for spoke in stopped {
        if let Err(e) = &spoke.ended {
            kind.fail(format!("{}: run() ended with {e}", spoke.name));
        }
        let s = &spoke.status;
        if s.dropped_points != 0 || s.rejected_points != 0 {
            kind.fail(format!(
                "{}: {} points dropped, {} rejected",
                spoke.name, s.dropped_points, s.rejected_points
            ));
        }
        let local = local_state(&spoke.state_dir);
        for d in view
            .directives
            .iter()
            .filter(|d| d.spoke_name == spoke.name)
        {
            match local.get(&d.id) {
                Some(l) if l.status == "ACKED" && l.runs == 1 => {}
                Some(l) => kind.fail(format!(
                    "{}: directive {} is {} locally after {} recorded runs (hub: {}) {:?}",
                    spoke.name,
                    d.id,
                    l.status,
                    l.runs,
                    state_name(d.state),
                    l.note
                )),
                None => kind.fail(format!(
                    "{}: directive {} never recorded locally",
                    spoke.name, d.id
                )),
            }
        }
    }
}

/// Every point a spoke recorded is stored exactly once: ticks 0..n, and
/// one point per handler run.
fn check_points(
    stored: &HashMap<String, Vec<proto::MetricPoint>>,
    runs: &[Run],
    stopped: &[Stopped],
    failures: &mut Vec<String>,
) {
    let mut kind = Kind::new(failures, "metric points");
    for spoke in stopped {
        let mut expected = BTreeMap::<(String, String), usize>::new();
        for seq in 0..spoke.ticks {
            expected.insert(("tick".into(), seq.to_string()), 0);
        }
        for run in runs.iter().filter(|r| r.spoke == spoke.name) {
            expected.insert(("run".into(), run.number.to_string()), 0);
        }
        let mut unexpected = 0;
        for p in &stored[&spoke.name] {
            let label = if p.name == "tick" { "seq" } else { "run" };
            let id = (
                p.name.clone(),
                p.labels.get(label).cloned().unwrap_or_default(),
            );
            match expected.get_mut(&id) {
                Some(count) => *count += 1,
                None => unexpected += 1,
            }
        }
        if unexpected > 0 {
            kind.fail(format!(
                "{}: {unexpected} points it never recorded",
                spoke.name
            ));
        }
        for ((name, number), count) in expected.iter().filter(|(_, c)| **c != 1) {
            kind.fail(format!(
                "{}: point {name} {number} stored {count} times",
                spoke.name
            ));
        }
    }
}
