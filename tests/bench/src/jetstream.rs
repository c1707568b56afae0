//! The cycle on NATS JetStream, the peer for the hub's `normal` class: one
//! stream with file storage, a subject per spoke, and one durable pull
//! consumer per spoke with explicit acks. The producer publishes and awaits
//! JetStream's publish ack; each spoke, on its own connection, receives and
//! acks every message with a double ack (confirmed by the server); a
//! directive's cycle ends when its double ack returns. The NATS server is
//! run.sh's; each run makes its own stream and deletes it afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::task::JoinSet;

use crate::cycle::{self, CycleResult, CycleSpec, Item, Producer, ServerCpu, Tracker};
use crate::proc::Pid;

/// A NATS server (with JetStream on) to measure.
#[derive(Debug, Clone, Copy)]
pub struct NatsPeer {
    /// Its address.
    pub addr: SocketAddr,
    /// Its process, for CPU readings.
    pub pid: Option<u32>,
}

async fn context(peer: &NatsPeer) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(peer.addr.to_string())
        .await
        .context("connecting to NATS")?;
    Ok(jetstream::new(client))
}

/// Runs the cycle on JetStream.
pub async fn cycle(peer: NatsPeer, spec: CycleSpec) -> anyhow::Result<CycleResult> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = format!(
        "{}_{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let js = context(&peer).await?;
    let name = format!("BENCH_{run}");
    let prefix = format!("bench.{run}");
    create_stream(&js, &name, &prefix).await?;

    let tracker = Tracker::new(spec.directives, spec.window);
    let mut consumers = JoinSet::new();
    let setup = async {
        for i in 0..spec.spokes {
            // Each spoke's consumer works over its own connection.
            let spoke_js = context(&peer).await?;
            let config = consumer::pull::Config {
                durable_name: Some(format!("c{i}")),
                filter_subject: format!("{prefix}.{i}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            };
            let consumer = spoke_js
                .create_consumer_on_stream(config, &name)
                .await
                .map_err(|e| anyhow!("creating consumer c{i}: {e}"))?;
            let tracker = tracker.clone();
            consumers.spawn(async move {
                if let Err(e) = consume(consumer, &tracker).await {
                    tracker.fail(format!("NATS consumer c{i}: {e:#}"));
                }
            });
        }
        anyhow::Ok(())
    };
    let result = match setup.await {
        Ok(()) => {
            let producer = Arc::new(NatsProducer {
                js: js.clone(),
                prefix,
            });
            let pid = ServerCpu::process(peer.pid.map(|p| Pid(Some(p))));
            cycle::drive(producer, tracker, spec.spokes, pid, spec.timeout).await
        }
        Err(e) => Err(e),
    };
    consumers.abort_all();
    let _ = js.delete_stream(&name).await;
    result
}

/// Creates the stream, retrying while JetStream is still starting.
async fn create_stream(js: &jetstream::Context, name: &str, prefix: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}.*")],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("creating stream {name}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn consume(
    consumer: consumer::Consumer<consumer::pull::Config>,
    tracker: &Arc<Tracker>,
) -> anyhow::Result<()> {
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow!("pulling: {e}"))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow!("receiving: {e}"))?;
        let Some(seq) = cycle::seq_of_json(&message.payload) else {
            tracker.fail("a message has no seq".into());
            continue;
        };
        let tracker = tracker.clone();
        tokio::spawn(async move {
            match message.double_ack().await {
                Ok(()) => tracker.complete(seq),
                Err(e) => tracker.fail(format!("double ack: {e}")),
            }
        });
    }
    Ok(())
}

struct NatsProducer {
    js: jetstream::Context,
    prefix: String,
}

impl Producer for NatsProducer {
    async fn create(&self, items: Vec<Item>) -> anyhow::Result<()> {
        for item in items {
            let payload = serde_json::to_vec(&cycle::payload(item.seq))?;
            let subject = format!("{}.{}", self.prefix, item.spoke);
            self.js
                .publish(subject, payload.into())
                .await
                .map_err(|e| anyhow!("publish: {e}"))?
                .await
                .map_err(|e| anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }
}
