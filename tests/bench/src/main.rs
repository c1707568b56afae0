//! `hub-bench`: the benchmark of the hub. `hub-bench floor` serves the floor
//! (the `hub.v1` contract in memory, no storage); `hub-bench run` starts the
//! hub and the floor itself, measures them and Redis Streams, NATS
//! JetStream and a PostgreSQL job queue (run by `run.sh`) through the same
//! scenarios, and prints one table. See README.md beside this crate.
//!
//! - `plan`: the command line of `run`, which scenario on which target.
//! - `servers`: the hub and floor processes (ports, data dir, kill, restart),
//!   and replicas of the hub on one PostgreSQL database.
//! - `contract`: spokes, fleets and the admin client of `hub.v1`.
//! - `cycle`: the closed-loop directive cycle and its measurements, and its
//!   `hub.v1` producer and spokes.
//! - `redis_streams`, `jetstream`, `pg_queue`: the same cycle on the peers.
//! - `postgres`: the PostgreSQL cluster (a database per run, its settings).
//! - `fleet`: idle capacity, fan-out and the reconnect storm.
//! - `flood`: one spoke flooding heartbeats, another's latency measured.
//! - `floor`: the in-memory server.
//! - `proc`: CPU time, RSS and limits from `/proc`.
//! - `report`: the table and the JSON.
#![forbid(unsafe_code)]

mod contract;
mod cycle;
mod fleet;
mod flood;
mod floor;
mod jetstream;
mod pg_queue;
mod plan;
mod postgres;
mod proc;
mod redis_streams;
mod report;
mod servers;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The benchmark of the hub against the floor of its contract and its peers.
#[derive(Debug, Parser)]
#[command(name = "hub-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the floor: the hub.v1 contract in memory, no storage.
    Floor(floor::FloorArgs),
    /// Run the scenarios and print the table.
    Run(Box<plan::RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hub-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Floor(args) => floor::serve(args).await.map(|()| true),
            Command::Run(args) => {
                // Drop does not run on a signal: kill the servers here.
                tokio::spawn(async {
                    stop_signal().await;
                    servers::kill_all();
                    eprintln!("hub-bench: interrupted");
                    std::process::exit(130);
                });
                plan::run(*args).await
            }
        }
    });
    // Leftover spoke tasks must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hub-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
