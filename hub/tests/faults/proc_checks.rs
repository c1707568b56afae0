//! The end checks of the loop that kills spokes too. A killed spoke may
//! legitimately run a directive again (the run it lost recorded no
//! outcome), so "one run each" of `checks` becomes the rules a spoke
//! promises across processes:
//! - the run whose result the hub holds is the last run of that directive:
//!   nothing started it again after its outcome was recorded, in the same
//!   process or a later one, and no process ran it twice;
//! - that run's metric point is stored exactly once, and a run that
//!   recorded no outcome left no point behind (its points commit with its
//!   outcome, or never);
//! - no tick point is stored twice, and every tick of a process that
//!   stopped gracefully is stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use hub_proto::v1 as proto;
use proto::DirectiveState;

use crate::checks::{Kind, Verdict, check_creates, check_directives, wait_quiet, wait_settled};
use crate::fleet::{self, Journal};
use crate::load::Load;
use crate::procs::{SpokeJournal, SpokeProcs};
use crate::view::{HubView, completions, directives, json_of, local_state, points, state_name};

/// Stops the load, waits until the hub and every spoke are quiet, stops
/// the spoke processes gracefully, then checks everything.
pub async fn settle_and_check(hub_url: &str, procs: SpokeProcs, load: Load, seed: u64) -> Verdict {
    let load = load.finish().await;
    let mut failures = Vec::new();
    let mut admin = wait_quiet(hub_url, &mut failures).await;
    let dirs: Vec<&Path> = procs.spokes.iter().map(|s| s.state_dir.as_path()).collect();
    wait_settled(&dirs, &mut failures).await;
    let kills = procs.kills;
    let stopped = procs.stop(&mut failures).await;
    let view = HubView {
        directives: directives(&mut admin).await,
        completions: completions(&mut admin).await,
    };
    let mut journal = Journal::default();
    for (_, j) in &stopped {
        journal.runs.extend(j.runs.iter().cloned());
    }
    check_directives(&view, &journal, &mut failures);
    check_creates(&view, &load, stopped.len(), &mut failures);
    let mut stored_total = 0;
    for (spoke, j) in &stopped {
        let stored = points(&mut admin, &spoke.name).await;
        stored_total += stored.len();
        check_runs(&spoke.name, &view, j, &mut failures);
        check_points(&spoke.name, &view, j, &stored, &mut failures);
        check_exit(&spoke.name, j, &mut failures);
        let mut kind = Kind::new(&mut failures, "spoke state");
        let local = local_state(&spoke.state_dir);
        for d in view
            .directives
            .iter()
            .filter(|d| d.spoke_name == spoke.name)
        {
            match local.get(&d.id) {
                Some(l) if l.status == "ACKED" => {}
                Some(l) => kind.fail(format!(
                    "{}: directive {} is {} locally (hub: {}) {:?}",
                    spoke.name,
                    d.id,
                    l.status,
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
    let reruns = journal.runs.len().saturating_sub(view.directives.len());
    let summary = format!(
        "seed {seed}: {} directives from {} creates ({} keyed retries), {} handler runs \
         ({reruns} more than directives: runs a SIGKILL cut short), {kills} kills of a spoke, \
         {stored_total} metric points",
        view.directives.len(),
        load.creates.len(),
        load.retries,
        journal.runs.len(),
    );
    Verdict { summary, failures }
}

/// The run number in a COMPLETED directive's result.
fn result_run(d: &proto::Directive) -> Option<u64> {
    (d.state == DirectiveState::Completed as i32)
        .then(|| json_of(d.result.as_ref())["run"].as_u64())
        .flatten()
}

/// The run the hub holds the result of is the directive's last run, and
/// no process ran a directive twice.
fn check_runs(spoke: &str, view: &HubView, j: &SpokeJournal, failures: &mut Vec<String>) {
    let mut kind = Kind::new(failures, "handler runs");
    let runs = fleet::runs_by_directive(&j.runs);
    for d in view.directives.iter().filter(|d| d.spoke_name == spoke) {
        let (Some(result), Some(rs)) = (result_run(d), runs.get(d.id.as_str())) else {
            continue;
        };
        let Some(at) = rs.iter().position(|r| r.number == result) else {
            continue; // check_directives names a result from no run
        };
        for later in &rs[at + 1..] {
            kind.fail(format!(
                "{spoke}: directive {} ran again (run {} attempt {}, process {}) after run {} \
                 (process {}) recorded the outcome the hub holds",
                d.id,
                later.number,
                later.attempt,
                j.incarnation_of[&later.number],
                result,
                j.incarnation_of[&result],
            ));
        }
    }
    for (id, rs) in &runs {
        let mut seen = HashSet::new();
        for r in rs {
            if !seen.insert(j.incarnation_of[&r.number]) {
                kind.fail(format!(
                    "{spoke}: directive {id} ran twice in process {} (run {})",
                    j.incarnation_of[&r.number], r.number
                ));
            }
        }
    }
}

/// The point of the run that recorded the outcome is stored once, the
/// point of a run cut short never; ticks are never doubled, and those of a
/// gracefully stopped process all arrive.
fn check_points(
    spoke: &str,
    view: &HubView,
    j: &SpokeJournal,
    stored: &[proto::MetricPoint],
    failures: &mut Vec<String>,
) {
    let mut kind = Kind::new(failures, "metric points");
    let finished: HashSet<u64> = view
        .directives
        .iter()
        .filter(|d| d.spoke_name == spoke)
        .filter_map(result_run)
        .collect();
    let mut counts = BTreeMap::<(String, String), usize>::new();
    for p in stored {
        let label = if p.name == "tick" { "seq" } else { "run" };
        let id = p.labels.get(label).cloned().unwrap_or_default();
        *counts.entry((p.name.clone(), id)).or_default() += 1;
    }
    let count = |name: &str, id: String| counts.get(&(name.to_owned(), id)).copied();
    for run in &j.runs {
        let got = count("run", run.number.to_string()).unwrap_or(0);
        let want = usize::from(finished.contains(&run.number));
        if got != want {
            kind.fail(format!(
                "{spoke}: point of run {} (directive {}, {}) stored {got} times, expected {want}",
                run.number,
                run.directive,
                if want == 1 {
                    "its outcome is the hub's"
                } else {
                    "cut short, no outcome"
                },
            ));
        }
    }
    let runs: HashSet<String> = j.runs.iter().map(|r| r.number.to_string()).collect();
    for ((name, id), n) in &counts {
        match name.as_str() {
            "tick" if *n > 1 => kind.fail(format!("{spoke}: tick {id} stored {n} times")),
            "tick" => {}
            _ if runs.contains(id) => {}
            _ => kind.fail(format!("{spoke}: point {name} {id} it never recorded")),
        }
    }
    for exit in &j.exits {
        for seq in 0..exit.ticks {
            let id = format!("{}-{seq}", exit.incarnation);
            if count("tick", id.clone()).is_none() {
                kind.fail(format!(
                    "{spoke}: tick {id} of a process that stopped gracefully is missing"
                ));
            }
        }
    }
}

/// The last process stopped gracefully, dropping and refusing nothing.
fn check_exit(spoke: &str, j: &SpokeJournal, failures: &mut Vec<String>) {
    let mut kind = Kind::new(failures, "spoke process");
    let by_incarnation: HashMap<u32, _> = j.exits.iter().map(|e| (e.incarnation, e)).collect();
    let Some(last) = by_incarnation.keys().max() else {
        kind.fail(format!("{spoke}: no process wrote an exit line"));
        return;
    };
    let exit = by_incarnation[last];
    if exit.ended != "ok" || exit.dropped != 0 || exit.rejected != 0 {
        kind.fail(format!(
            "{spoke}: process {last} ended with {:?}, {} points dropped, {} rejected",
            exit.ended, exit.dropped, exit.rejected
        ));
    }
}
