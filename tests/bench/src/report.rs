//! The results: every figure of every (scenario, target) run as JSON for a
//! later comparison, and one markdown table with the hub against the floor
//! and against the peer of each durability class (on PostgreSQL: the hub,
//! alone and as three replicas, against a plain job queue on the same
//! cluster).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::plan::{REPLICAS, Scenario, TargetName};

/// The figures of one scenario on one target.
#[derive(Debug, Clone)]
pub struct Record {
    /// The scenario run.
    pub scenario: Scenario,
    /// Its label with sizes.
    pub label: String,
    /// What it ran against.
    pub target: TargetName,
    /// Figures by name (see README.md).
    pub metrics: BTreeMap<String, f64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

impl Record {
    /// Directives lost (0 when the run has no such count).
    pub fn lost(&self) -> f64 {
        self.metrics.get("lost").copied().unwrap_or(0.0)
    }
}

/// One figure shown as a row.
struct Row {
    metric: &'static str,
    label: &'static str,
    ratio: bool,
}

const fn row(metric: &'static str, label: &'static str) -> Row {
    Row {
        metric,
        label,
        ratio: true,
    }
}

fn rows(scenario: Scenario) -> Vec<Row> {
    let cycle = [
        row("throughput_per_s", "directives/s"),
        row("p50_ms", "p50 ms"),
        row("p99_ms", "p99 ms"),
        row("server_cpu_us", "server CPU µs/directive"),
        row("database_cpu_us", "of which PostgreSQL CPU µs/directive"),
        row("loadgen_cpu_us", "load-gen CPU µs/directive"),
    ];
    match scenario {
        Scenario::Cycle | Scenario::CycleLarge | Scenario::Light => cycle.into(),
        Scenario::Idle => vec![
            row("rss_per_spoke_kib", "server RSS KiB per idle spoke"),
            row("connect_s", "register + connect s"),
        ],
        Scenario::Fleet => vec![
            row("rss_per_spoke_kib", "server RSS KiB per idle spoke"),
            row("connect_s", "register + connect s"),
            row("fanout_s", "fan-out: last spoke has it, s"),
            row("fanout_acked_s", "fan-out: every ack confirmed, s"),
            row("storm_reconnect_s", "storm: restart → every stream back, s"),
            row(
                "storm_recovered_s",
                "storm: restart → every held directive acked, s",
            ),
            Row {
                metric: "lost",
                label: "lost directives",
                ratio: false,
            },
        ],
        Scenario::Flood => vec![
            row("quiet_p50_ms", "heartbeat p50 ms, no flood"),
            row("quiet_p99_ms", "heartbeat p99 ms, no flood"),
            row("flood_p50_ms", "heartbeat p50 ms, flooded"),
            row("flood_p99_ms", "heartbeat p99 ms, flooded"),
            Row {
                metric: "p99_ratio",
                label: "p99 flooded ÷ no flood (target ≤ 1.1)",
                ratio: false,
            },
            Row {
                metric: "flood_accepted_per_s",
                label: "flooder's calls accepted/s",
                ratio: false,
            },
            Row {
                metric: "flood_refused_per_s",
                label: "flooder's calls refused/s",
                ratio: false,
            },
        ],
    }
}

/// Column order, then the ratios: (label, numerator, denominator).
const COLUMNS: [TargetName; 9] = [
    TargetName::HubFull,
    TargetName::HubNormal,
    TargetName::Floor,
    TargetName::RedisAlways,
    TargetName::RedisEverysec,
    TargetName::Nats,
    TargetName::HubPg,
    TargetName::HubPg3,
    TargetName::PgQueue,
];
const RATIOS: [(&str, TargetName, TargetName); 8] = [
    ("full ÷ floor", TargetName::HubFull, TargetName::Floor),
    ("normal ÷ floor", TargetName::HubNormal, TargetName::Floor),
    (
        "full ÷ Redis always",
        TargetName::HubFull,
        TargetName::RedisAlways,
    ),
    (
        "normal ÷ Redis everysec",
        TargetName::HubNormal,
        TargetName::RedisEverysec,
    ),
    ("normal ÷ NATS", TargetName::HubNormal, TargetName::Nats),
    ("hub PG ÷ PG queue", TargetName::HubPg, TargetName::PgQueue),
    (
        "hub PG ×3 ÷ PG queue",
        TargetName::HubPg3,
        TargetName::PgQueue,
    ),
    ("hub PG ×3 ÷ hub PG", TargetName::HubPg3, TargetName::HubPg),
];

/// The markdown table of `records` (in the order their scenarios ran):
/// a column per target that ran, and the ratios whose two targets ran.
pub fn table(records: &[Record]) -> String {
    let mut out = String::new();
    let ran = |t: TargetName| records.iter().any(|r| r.target == t);
    let columns: Vec<TargetName> = COLUMNS.into_iter().filter(|&t| ran(t)).collect();
    let ratios: Vec<(&str, TargetName, TargetName)> = RATIOS
        .into_iter()
        .filter(|&(_, a, b)| ran(a) && ran(b))
        .collect();
    let header: Vec<&str> = ["scenario", "figure"]
        .into_iter()
        .chain(columns.iter().map(|t| t.label()))
        .chain(ratios.iter().map(|r| r.0))
        .collect();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    let mut labels: Vec<(Scenario, &str)> = Vec::new();
    for r in records {
        if !labels.iter().any(|(s, _)| *s == r.scenario) {
            labels.push((r.scenario, &r.label));
        }
    }
    let find = |scenario: Scenario, target: TargetName| {
        records
            .iter()
            .find(|r| r.scenario == scenario && r.target == target)
    };
    for (scenario, label) in labels {
        for row in rows(scenario) {
            let value = |t: TargetName| {
                find(scenario, t)
                    .and_then(|r| r.metrics.get(row.metric))
                    .copied()
            };
            let mut cells = vec![label.to_owned(), row.label.to_owned()];
            for &t in &columns {
                cells.push(match find(scenario, t) {
                    None => String::new(),
                    Some(r) if r.error.is_some() && !r.metrics.contains_key(row.metric) => {
                        "error".into()
                    }
                    Some(_) => value(t).map(number).unwrap_or_default(),
                });
            }
            for &(_, a, b) in &ratios {
                cells.push(match (row.ratio, value(a), value(b)) {
                    (true, Some(a), Some(b)) if b > 0.0 => format!("{}×", ratio(a / b)),
                    _ => String::new(),
                });
            }
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
    }
    if ran(TargetName::HubPg3) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into());
        let _ = writeln!(
            out,
            "\nhub PG ×3: {REPLICAS} hub processes on one database, one leading; spokes \
             and creates go round robin over the three, so two thirds reach the \
             leader through a standby. This machine has {cores} cores: the {REPLICAS} \
             hubs share them with PostgreSQL and the load generator, so the column \
             shows what forwarding costs, not what scaling out gains."
        );
    }
    let errors: Vec<&Record> = records.iter().filter(|r| r.error.is_some()).collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nErrors:");
        for r in errors {
            let _ = writeln!(
                out,
                "- {} on {}: {}",
                r.label,
                r.target.label(),
                r.error
                    .as_deref()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default()
            );
        }
    }
    out
}

/// A figure for the table: 3 significant digits, thousands grouped.
fn number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The raw results, for a later session to compare; `postgres` is the
/// cluster's version and durability settings, if the PostgreSQL targets ran.
pub fn json(records: &[Record], args: &[String], postgres: Option<String>) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())),
    });
    json!({
        "generated_at_unix": now,
        "machine": machine,
        "args": args,
        "postgres": postgres,
        "records": records.iter().map(|r| json!({
            "scenario": r.scenario.name(),
            "label": r.label,
            "target": r.target.name(),
            "metrics": r.metrics,
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}
