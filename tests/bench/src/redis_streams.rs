//! The cycle on Redis Streams, the peer for the hub's durability classes:
//! AOF with `appendfsync always` (like the hub's `full`) or `everysec` (like
//! `normal`). One stream per spoke with a consumer group; the producer
//! XADDs; each spoke, on its own connection, XREADGROUP BLOCKs and then
//! XACKs every entry it got (pipelined); a directive's cycle ends when its
//! XACK returns. The Redis server is run.sh's; this sets its fsync policy
//! with CONFIG SET and empties it before each run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, Value, cmd};
use tokio::task::JoinSet;

use crate::cycle::{self, CycleResult, CycleSpec, Item, Producer, ServerCpu, Tracker};
use crate::proc::Pid;

/// Entries one XREADGROUP may return.
const READ_COUNT: usize = 256;

/// AOF fsync policy.
#[derive(Debug, Clone, Copy)]
pub enum Fsync {
    /// fsync before answering each write (batched per event-loop turn).
    Always,
    /// fsync once a second in the background.
    Everysec,
}

/// A Redis server to measure.
#[derive(Debug, Clone, Copy)]
pub struct RedisPeer {
    /// Its address.
    pub addr: SocketAddr,
    /// Its process, for CPU readings.
    pub pid: Option<u32>,
}

impl RedisPeer {
    fn client(&self) -> anyhow::Result<Client> {
        let info = format!("redis://{}/", self.addr)
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        Ok(Client::open(info)?)
    }
}

async fn connect(client: &Client) -> anyhow::Result<MultiplexedConnection> {
    // No response timeout: a BLOCKing read or an fsync may take long.
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to Redis")
}

/// Runs the cycle on Redis with `fsync`.
pub async fn cycle(peer: RedisPeer, fsync: Fsync, spec: CycleSpec) -> anyhow::Result<CycleResult> {
    let client = peer.client()?;
    let mut admin = connect(&client).await?;
    let policy = match fsync {
        Fsync::Always => "always",
        Fsync::Everysec => "everysec",
    };
    let _: () = cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg(policy)
        .query_async(&mut admin)
        .await
        .context("CONFIG SET appendfsync")?;
    let _: () = cmd("FLUSHALL").query_async(&mut admin).await?;
    let keys: Vec<String> = (0..spec.spokes).map(|i| format!("bench:{i}")).collect();
    let mut groups = redis::pipe();
    for key in &keys {
        groups
            .cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .ignore();
    }
    let _: () = groups
        .query_async(&mut admin)
        .await
        .context("XGROUP CREATE")?;

    let tracker = Tracker::new(spec.directives, spec.window);
    let mut consumers = JoinSet::new();
    for key in &keys {
        let conn = connect(&client).await?;
        let (key, tracker) = (key.clone(), tracker.clone());
        consumers.spawn(async move {
            if let Err(e) = consume(conn, &key, &tracker).await {
                tracker.fail(format!("Redis consumer {key}: {e:#}"));
            }
        });
    }
    let producer = Arc::new(RedisProducer { conn: admin, keys });
    let pid = ServerCpu::process(peer.pid.map(|p| Pid(Some(p))));
    let result = cycle::drive(producer, tracker, spec.spokes, pid, spec.timeout).await;
    consumers.abort_all();
    result
}

async fn consume(
    mut conn: MultiplexedConnection,
    key: &str,
    tracker: &Tracker,
) -> anyhow::Result<()> {
    loop {
        let reply: Value = cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut conn)
            .await
            .context("XREADGROUP")?;
        let entries = entries(reply);
        let acks = entries.into_iter().map(|(id, seq)| {
            let mut conn = conn.clone();
            async move {
                let _: i64 = cmd("XACK")
                    .arg(key)
                    .arg("g")
                    .arg(&id)
                    .query_async(&mut conn)
                    .await
                    .context("XACK")?;
                match seq {
                    Some(seq) => tracker.complete(seq),
                    None => tracker.fail(format!("entry {id} has no seq")),
                }
                anyhow::Ok(())
            }
        });
        for ack in futures_util::future::join_all(acks).await {
            ack?;
        }
    }
}

/// The (id, seq) of each entry of an XREADGROUP reply on one stream
/// (`[[key, [[id, [field, value, ...]], ...]]]`, or nil after BLOCK).
fn entries(reply: Value) -> Vec<(String, Option<u64>)> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            continue;
        };
        let Some(Value::Array(items)) = parts.pop() else {
            continue;
        };
        for item in items {
            let Value::Array(mut item) = item else {
                continue;
            };
            let fields = item.pop();
            let Some(id) = item.pop().and_then(|v| text(&v)) else {
                continue;
            };
            let seq = match fields {
                Some(Value::Array(fields)) => fields.chunks(2).find_map(|kv| match kv {
                    [k, Value::BulkString(v)] if text(k).as_deref() == Some("p") => {
                        cycle::seq_of_json(v)
                    }
                    _ => None,
                }),
                _ => None,
            };
            out.push((id, seq));
        }
    }
    out
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

struct RedisProducer {
    conn: MultiplexedConnection,
    keys: Vec<String>,
}

impl Producer for RedisProducer {
    async fn create(&self, items: Vec<Item>) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        for item in items {
            let payload = serde_json::to_vec(&cycle::payload(item.seq))?;
            let _: String = cmd("XADD")
                .arg(&self.keys[item.spoke])
                .arg("*")
                .arg("p")
                .arg(payload)
                .query_async(&mut conn)
                .await
                .context("XADD")?;
        }
        Ok(())
    }
}
