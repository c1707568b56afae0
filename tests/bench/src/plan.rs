//! `hub-bench run`: which scenarios on which targets, with what sizes; runs
//! each pair in turn (a fresh hub or floor process for each), prints the
//! table, writes the JSON, and says whether anything failed or was lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::contract::{AckPath, CreatePath};
use crate::cycle::{self, CycleSpec, Paths, ServerCpu};
use crate::fleet::{self, FleetRun};
use crate::flood::{self, FloodRun};
use crate::jetstream::{self, NatsPeer};
use crate::pg_queue::{self, Listen, QueueSpec};
use crate::postgres::Cluster;
use crate::proc::Pid;
use crate::redis_streams::{self, Fsync, RedisPeer};
use crate::report::{self, Record};
use crate::servers::{Kind, Replicas, Server, Sync};

/// A scenario (its sizes are flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The cycle at --cycle-spokes / --cycle-directives / --cycle-window.
    Cycle,
    /// The cycle at --large-spokes / --large-directives / --large-window.
    CycleLarge,
    /// The cycle with one directive in flight (--light-*).
    Light,
    /// --idle-small idle streaming spokes: RSS per spoke.
    Idle,
    /// --idle-large spokes: RSS per spoke, register + connect time, fan-out,
    /// and (hub) the reconnect storm.
    Fleet,
    /// One spoke floods heartbeats from --flood-loops loops; another's
    /// heartbeat latency with and without (hub.v1 targets).
    Flood,
}

impl Scenario {
    /// The name on the command line and in the JSON.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// What a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetName {
    /// The hub with HUB_SYNC=full.
    HubFull,
    /// The hub with HUB_SYNC=normal.
    HubNormal,
    /// The in-memory floor of the contract.
    Floor,
    /// Redis Streams, AOF appendfsync always.
    RedisAlways,
    /// Redis Streams, AOF appendfsync everysec.
    RedisEverysec,
    /// NATS JetStream, file storage.
    Nats,
    /// The hub with HUB_SYNC=full on PostgreSQL (--postgres): its writer
    /// commits with synchronous_commit=on. Cycle scenarios only.
    HubPg,
    /// Three replicas of the hub with HUB_SYNC=full on one PostgreSQL
    /// database (--postgres): one leads, two stand by and forward; spokes
    /// and creates go round robin over the three. Cycle scenarios only.
    #[value(name = "hub-pg-3")]
    HubPg3,
    /// A plain PostgreSQL job queue (SKIP LOCKED, LISTEN/NOTIFY) on the
    /// same cluster, synchronous_commit=on. Cycle scenarios only.
    PgQueue,
}

/// Hub processes of [`TargetName::HubPg3`].
pub const REPLICAS: usize = 3;

impl TargetName {
    /// The name on the command line and in the JSON.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The column header.
    pub fn label(self) -> &'static str {
        match self {
            TargetName::HubFull => "hub full",
            TargetName::HubNormal => "hub normal",
            TargetName::Floor => "floor",
            TargetName::RedisAlways => "Redis always",
            TargetName::RedisEverysec => "Redis everysec",
            TargetName::Nats => "NATS",
            TargetName::HubPg => "hub PG",
            TargetName::HubPg3 => "hub PG ×3",
            TargetName::PgQueue => "PG queue",
        }
    }

    fn speaks_hub_v1(self) -> bool {
        matches!(
            self,
            TargetName::HubFull
                | TargetName::HubNormal
                | TargetName::Floor
                | TargetName::HubPg
                | TargetName::HubPg3
        )
    }

    fn on_postgres(self) -> bool {
        matches!(
            self,
            TargetName::HubPg | TargetName::HubPg3 | TargetName::PgQueue
        )
    }
}

/// Options of `hub-bench run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The hub binary (needed for the hub targets).
    #[arg(long)]
    pub hub_bin: Option<PathBuf>,
    /// Targets, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub targets: Vec<TargetName>,
    /// Scenarios, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Vec<Scenario>,
    /// A running Redis server (the Redis targets need it).
    #[arg(long)]
    pub redis: Option<SocketAddr>,
    /// Its process id, for its CPU time.
    #[arg(long)]
    pub redis_pid: Option<u32>,
    /// A running NATS server with JetStream (the NATS target needs it).
    #[arg(long)]
    pub nats: Option<SocketAddr>,
    /// Its process id, for its CPU time.
    #[arg(long)]
    pub nats_pid: Option<u32>,
    /// A running PostgreSQL cluster, as a superuser's URL (the PostgreSQL
    /// targets need it; each run makes a database of its own there).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Its postmaster's process id, for the CPU time of the whole cluster.
    #[arg(long)]
    pub postgres_pid: Option<u32>,
    /// Connections the PostgreSQL queue's producer inserts on (at most the
    /// window): a connection runs one INSERT at a time.
    #[arg(long, default_value_t = 64)]
    pub pg_producers: usize,
    /// How the PostgreSQL queue's workers wait for jobs.
    #[arg(long, value_enum, default_value_t = Listen::Shared)]
    pub pg_listen: Listen,
    /// Spokes of `cycle`.
    #[arg(long, default_value_t = 100)]
    pub cycle_spokes: usize,
    /// Directives of `cycle`.
    #[arg(long, default_value_t = 20_000)]
    pub cycle_directives: usize,
    /// Directives in flight in `cycle`.
    #[arg(long, default_value_t = 256)]
    pub cycle_window: usize,
    /// Spokes of `cycle-large`.
    #[arg(long, default_value_t = 1000)]
    pub large_spokes: usize,
    /// Directives of `cycle-large`.
    #[arg(long, default_value_t = 50_000)]
    pub large_directives: usize,
    /// Directives in flight in `cycle-large`.
    #[arg(long, default_value_t = 512)]
    pub large_window: usize,
    /// Spokes of `light` (one directive in flight).
    #[arg(long, default_value_t = 100)]
    pub light_spokes: usize,
    /// Directives of `light`.
    #[arg(long, default_value_t = 2000)]
    pub light_directives: usize,
    /// Spokes of `idle`.
    #[arg(long, default_value_t = 1000)]
    pub idle_small: usize,
    /// Spokes of `fleet`.
    #[arg(long, default_value_t = 10_000)]
    pub idle_large: usize,
    /// Spokes connecting and registering at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Concurrent heartbeat loops of the flooding spoke in `flood`.
    #[arg(long, default_value_t = 64)]
    pub flood_loops: usize,
    /// Seconds each phase of `flood` (quiet, flooded) measures.
    #[arg(long, default_value_t = 15)]
    pub flood_secs: u64,
    /// How long any one step may take, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// How hub.v1 spokes ack.
    #[arg(long, value_enum, default_value_t = AckPath::Unary)]
    pub ack_path: AckPath,
    /// How the hub.v1 producer creates.
    #[arg(long, value_enum, default_value_t = CreatePath::Single)]
    pub create_path: CreatePath,
    /// Write the raw results here as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the plan; `Ok(false)` when a run failed or lost a directive.
pub async fn run(mut args: RunArgs) -> anyhow::Result<bool> {
    if args.targets.is_empty() {
        args.targets = TargetName::value_variants().to_vec();
    }
    if args.scenarios.is_empty() {
        args.scenarios = Scenario::value_variants().to_vec();
    }
    for size in [
        args.cycle_spokes,
        args.large_spokes,
        args.light_spokes,
        args.idle_small,
        args.idle_large,
    ] {
        if size == 0 {
            bail!("every spoke count must be at least 1");
        }
    }
    let most = [args.cycle_spokes, args.large_spokes, args.light_spokes]
        .into_iter()
        .chain(
            args.scenarios
                .contains(&Scenario::Idle)
                .then_some(args.idle_small),
        )
        .chain(
            args.scenarios
                .contains(&Scenario::Fleet)
                .then_some(args.idle_large),
        )
        .max()
        .unwrap_or(0);
    crate::proc::check_open_files(most as u64 + 256)?;
    let argv: Vec<String> = std::env::args().collect();
    let mut postgres = None;
    if let Some(cluster) = cluster(&args)
        && args.targets.iter().any(|t| t.on_postgres())
    {
        let settings = cluster.describe().await?;
        eprintln!("PostgreSQL: {settings}");
        postgres = Some(settings);
    }
    let mut records = Vec::new();
    for &scenario in &args.scenarios {
        for &target in &args.targets {
            if !applies(scenario, target) {
                continue;
            }
            if let Some(why) = missing(&args, target) {
                eprintln!("skipping {} on {}: {why}", scenario.name(), target.label());
                continue;
            }
            let label = label(&args, scenario);
            eprintln!("running {label} on {} ...", target.label());
            let (metrics, error) = match run_one(&args, scenario, target).await {
                Ok(m) => (m, None),
                Err(e) => (Default::default(), Some(format!("{e:#}"))),
            };
            let record = Record {
                scenario,
                label,
                target,
                metrics,
                error,
            };
            summarize(&record);
            records.push(record);
        }
    }
    println!("{}", report::table(&records));
    if let Some(path) = &args.out {
        let json = serde_json::to_string_pretty(&report::json(&records, &argv, postgres))?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("raw results: {}", path.display());
    }
    let failed = records.iter().filter(|r| r.error.is_some()).count();
    let lost: f64 = records.iter().map(Record::lost).sum();
    if failed > 0 || lost > 0.0 {
        eprintln!("FAILED: {failed} run(s) with an error, {lost} directive(s) lost");
        return Ok(false);
    }
    Ok(true)
}

fn applies(scenario: Scenario, target: TargetName) -> bool {
    match scenario {
        Scenario::Cycle | Scenario::CycleLarge | Scenario::Light => true,
        // The PostgreSQL pair is about the durable cycle.
        Scenario::Idle | Scenario::Fleet | Scenario::Flood => {
            target.speaks_hub_v1() && !target.on_postgres()
        }
    }
}

fn cluster(args: &RunArgs) -> Option<Cluster> {
    args.postgres.clone().map(|url| Cluster {
        url,
        pid: args.postgres_pid,
    })
}

fn missing(args: &RunArgs, target: TargetName) -> Option<&'static str> {
    match target {
        TargetName::HubFull | TargetName::HubNormal if args.hub_bin.is_none() => {
            Some("no --hub-bin")
        }
        TargetName::RedisAlways | TargetName::RedisEverysec if args.redis.is_none() => {
            Some("no --redis")
        }
        TargetName::Nats if args.nats.is_none() => Some("no --nats"),
        TargetName::HubPg | TargetName::HubPg3 if args.hub_bin.is_none() => Some("no --hub-bin"),
        TargetName::HubPg | TargetName::HubPg3 | TargetName::PgQueue if args.postgres.is_none() => {
            Some("no --postgres")
        }
        _ => None,
    }
}

fn label(args: &RunArgs, scenario: Scenario) -> String {
    match scenario {
        Scenario::Cycle => format!(
            "cycle: {} spokes, {} directives, W={}",
            args.cycle_spokes, args.cycle_directives, args.cycle_window
        ),
        Scenario::CycleLarge => format!(
            "cycle: {} spokes, {} directives, W={}",
            args.large_spokes, args.large_directives, args.large_window
        ),
        Scenario::Light => format!(
            "light load: {} spokes, {} directives, W=1",
            args.light_spokes, args.light_directives
        ),
        Scenario::Idle => format!("{} idle spokes", args.idle_small),
        Scenario::Fleet => format!("{} spokes: idle, fan-out, storm", args.idle_large),
        Scenario::Flood => format!(
            "flood: {} heartbeat loops of one spoke vs another's heartbeats",
            args.flood_loops
        ),
    }
}

fn cycle_spec(args: &RunArgs, scenario: Scenario) -> CycleSpec {
    let (spokes, directives, window) = match scenario {
        Scenario::CycleLarge => (args.large_spokes, args.large_directives, args.large_window),
        Scenario::Light => (args.light_spokes, args.light_directives, 1),
        _ => (args.cycle_spokes, args.cycle_directives, args.cycle_window),
    };
    CycleSpec {
        spokes,
        directives,
        window: window.max(1),
        timeout: Duration::from_secs(args.timeout_secs),
    }
}

async fn run_one(
    args: &RunArgs,
    scenario: Scenario,
    target: TargetName,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    if matches!(target, TargetName::HubPg | TargetName::HubPg3) {
        let cluster = cluster(args).context("no --postgres")?;
        let bin = args.hub_bin.clone().context("no --hub-bin")?;
        let database = cluster.fresh_database("hub").await?;
        let kind = Kind::Hub {
            bin,
            sync: Sync::Full,
            database_url: Some(database.url().to_owned()),
        };
        let result = if target == TargetName::HubPg {
            on_server(args, scenario, target, kind, cluster.postmaster()).await
        } else {
            on_replicas(args, scenario, kind, cluster.postmaster()).await
        };
        // After the hubs are gone (dropped above).
        let dropped = database.drop().await;
        let result = result?;
        dropped?;
        return Ok(result);
    }
    if let Some(kind) = server_kind(args, target) {
        return on_server(args, scenario, target, kind, None).await;
    }
    let spec = cycle_spec(args, scenario);
    let result = match target {
        TargetName::RedisAlways | TargetName::RedisEverysec => {
            let peer = RedisPeer {
                addr: args.redis.context("no --redis")?,
                pid: args.redis_pid,
            };
            let fsync = if target == TargetName::RedisAlways {
                Fsync::Always
            } else {
                Fsync::Everysec
            };
            redis_streams::cycle(peer, fsync, spec).await?
        }
        TargetName::Nats => {
            let peer = NatsPeer {
                addr: args.nats.context("no --nats")?,
                pid: args.nats_pid,
            };
            jetstream::cycle(peer, spec).await?
        }
        TargetName::PgQueue => {
            let cluster = cluster(args).context("no --postgres")?;
            let queue = QueueSpec {
                producers: args.pg_producers,
                listen: args.pg_listen,
            };
            pg_queue::cycle(&cluster, spec, queue).await?
        }
        _ => unreachable!("hub.v1 targets are handled above"),
    };
    Ok(result.metrics())
}

/// A scenario on a server this process starts (the hub or the floor);
/// `database` is the postmaster of the hub's PostgreSQL, if it has one.
async fn on_server(
    args: &RunArgs,
    scenario: Scenario,
    target: TargetName,
    kind: Kind,
    database: Option<Pid>,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let paths = Paths {
        ack: args.ack_path,
        create: args.create_path,
    };
    let (window, fleet_run) = match scenario {
        Scenario::Idle | Scenario::Fleet => {
            let count = if scenario == Scenario::Idle {
                args.idle_small
            } else {
                args.idle_large
            };
            let run = FleetRun {
                count,
                concurrency: args.connect_concurrency,
                fanout: scenario == Scenario::Fleet,
                storm: scenario == Scenario::Fleet && target != TargetName::Floor,
                timeout,
                ack_path: args.ack_path,
            };
            (32, Some(run))
        }
        _ => (cycle_spec(args, scenario).spoke_window(), None),
    };
    let mut server = Server::start(kind, window).await?;
    let result = match fleet_run {
        Some(run) => fleet::run(&mut server, run).await,
        None if scenario == Scenario::Flood => {
            let run = FloodRun {
                loops: args.flood_loops,
                phase: Duration::from_secs(args.flood_secs.max(1)),
                interval: Duration::from_millis(25),
            };
            flood::run(&server, run).await
        }
        None => {
            let cpu = ServerCpu {
                processes: vec![server.pid()],
                database,
            };
            let spec = cycle_spec(args, scenario);
            cycle::hub_v1(server.target(), cpu, spec, paths)
                .await
                .map(|r| r.metrics())
        }
    };
    result.map_err(|e| {
        let tail = server.log_tail();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("server log ends: {}", tail.join(" / ")))
    })
}

/// A cycle scenario on [`REPLICAS`] hub processes of `kind` (on one
/// PostgreSQL database, whose postmaster is `database`): the first leads,
/// spoke `i` and admin connection `i` go to replica `i mod 3`, so two
/// thirds of the calls reach the leader through a standby.
async fn on_replicas(
    args: &RunArgs,
    scenario: Scenario,
    kind: Kind,
    database: Option<Pid>,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let spec = cycle_spec(args, scenario);
    let paths = Paths {
        ack: args.ack_path,
        create: args.create_path,
    };
    let replicas = Replicas::start(kind, spec.spoke_window(), REPLICAS).await?;
    let cpu = ServerCpu {
        processes: replicas.pids(),
        database,
    };
    let result = match cycle::hub_v1(&replicas.target(), cpu, spec, paths).await {
        Ok(r) => replicas.check_leader().await.map(|()| r.metrics()),
        Err(e) => Err(e),
    };
    result.map_err(|e| e.context(format!("replica logs end: {}", replicas.log_tail())))
}

fn server_kind(args: &RunArgs, target: TargetName) -> Option<Kind> {
    let hub = |sync| {
        args.hub_bin.clone().map(|bin| Kind::Hub {
            bin,
            sync,
            database_url: None,
        })
    };
    match target {
        TargetName::HubFull => hub(Sync::Full),
        TargetName::HubNormal => hub(Sync::Normal),
        TargetName::Floor => Some(Kind::Floor),
        _ => None,
    }
}

fn summarize(record: &Record) {
    if let Some(e) = &record.error {
        eprintln!("  error: {e}");
        return;
    }
    let figures: Vec<String> = record
        .metrics
        .iter()
        .map(|(k, v)| format!("{k}={v:.3}"))
        .collect();
    eprintln!("  {}", figures.join(" "));
}
