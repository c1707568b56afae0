//! An example spoke: handles `sync_doc` and `ai_task` directives and records
//! metrics about them. Against a local hub (`cargo run -p hub -- serve` in
//! the repository root):
//!
//! ```sh
//! cargo run -p spoke-client --example demo_spoke
//! cargo run -p hub -- send sync_doc --to demo-spoke --payload '{"doc": "invoices/2026-11", "pages": 12}'
//! cargo run -p hub -- send ai_task --to demo-spoke --payload '{"prompt": "summarise", "steps": 3}'
//! ```
//!
//! The first start registers with the enrollment token in
//! `hub-data/enrollment.token`; the key it gets is kept in `--state-dir` and
//! reused. Ctrl-C shuts down gracefully.
//!
//! With `--status-page target/demo-spoke-status.html` it also writes its
//! "hub status" widget (`Status::to_html`) into a small page every 10 s, as
//! a spoke would embed it in its own admin page; open the file in a browser.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde::Deserialize;
use spoke_client::{Client, Context, Point};

/// An example spoke for the hub.
#[derive(Parser)]
struct Args {
    /// Hub endpoint; repeat for failover.
    #[arg(long = "hub", default_value = "http://127.0.0.1:50051")]
    hubs: Vec<String>,
    /// The spoke's name.
    #[arg(long, default_value = "demo-spoke")]
    name: String,
    /// The hub's enrollment token (first start only).
    #[arg(long, default_value = "hub-data/enrollment.token")]
    token_file: PathBuf,
    /// Where the spoke keeps its key, directives and metric buffer.
    #[arg(long, default_value = "target/demo-spoke-state")]
    state_dir: PathBuf,
    /// Write a page showing the hub status here every 10 s.
    #[arg(long)]
    status_page: Option<PathBuf>,
}

/// Payload of `sync_doc`.
#[derive(Deserialize)]
struct SyncDoc {
    doc: String,
    #[serde(default = "one")]
    pages: u32,
}

fn one() -> u32 {
    1
}

/// Payload of `ai_task`.
#[derive(Deserialize)]
struct AiTask {
    prompt: String,
    #[serde(default = "one")]
    steps: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,spoke_client=info".into()),
        )
        .init();
    let args = Args::parse();

    let mut builder = Client::builder(&args.name)
        .label("kind", "demo")
        .version(env!("CARGO_PKG_VERSION"))
        .state_dir(&args.state_dir)
        .concurrency(4);
    for hub in &args.hubs {
        builder = builder.endpoint(hub);
    }
    // Needed only on the first start; later the stored key is used.
    if let Ok(token) = std::fs::read_to_string(&args.token_file) {
        builder = builder.enrollment_token(token);
    }
    let client = builder
        .handler("sync_doc", "1", sync_doc)
        .handler("ai_task", "1", ai_task)
        .build()
        .await
        .context("starting the spoke client")?;

    // A gauge (and the status page, if asked for) every 10 s, whatever the
    // hub is doing.
    let gauges = client.clone();
    let status_page = args.status_page.clone();
    tokio::spawn(async move {
        loop {
            let s = gauges.status();
            gauges.record(
                "statistics",
                "buffered_points",
                s.buffered_points as f64,
                &[],
            );
            if let Some(path) = &status_page {
                // The snippet escapes everything it shows; the page around
                // it is the application's own.
                let page = format!(
                    "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">\
                     <meta http-equiv=\"refresh\" content=\"10\">\
                     <title>Demo spoke</title><h1>Demo spoke</h1>{}</html>",
                    s.to_html()
                );
                if let Err(e) = tokio::fs::write(path, page).await {
                    tracing::warn!(path = %path.display(), error = %e, "writing the status page");
                }
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });

    tracing::info!(name = %args.name, hubs = ?args.hubs, "demo spoke running; Ctrl-C to stop");
    client
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the spoke stopped")?;
    let s = client.status();
    tracing::info!(
        buffered = s.buffered_points,
        dropped = s.dropped_points,
        "stopped"
    );
    Ok(())
}

async fn sync_doc(job: SyncDoc, ctx: Context) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    for page in 1..=job.pages {
        if ctx.is_cancelled() {
            return Err(format!(
                "cancelled after {} of {} pages",
                page - 1,
                job.pages
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctx.progress(page * 100 / job.pages, format!("page {page}/{}", job.pages))
            .await
            .ok();
    }
    ctx.record_point(
        Point::new("statistics", "pages_synced", f64::from(job.pages)).label("doc", &job.doc),
    );
    ctx.record_point(
        Point::new(
            "statistics",
            "sync_duration",
            started.elapsed().as_secs_f64() * 1000.0,
        )
        .unit("ms"),
    );
    tracing::info!(directive = %ctx.id(), doc = %job.doc, attempt = ctx.attempt(), "synced");
    Ok(serde_json::json!({"doc": job.doc, "pages_synced": job.pages}))
}

async fn ai_task(job: AiTask, ctx: Context) -> Result<serde_json::Value, String> {
    if job.prompt.trim().is_empty() {
        return Err("empty prompt".into());
    }
    for step in 1..=job.steps {
        tokio::select! {
            () = ctx.cancelled() => return Err(format!("cancelled at step {step}")),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    ctx.record(
        "compensation",
        "ai_cost",
        0.02 * f64::from(job.steps),
        &[("model", "demo")],
    );
    Ok(serde_json::json!({"answer": format!("{} ({} steps)", job.prompt, job.steps)}))
}
