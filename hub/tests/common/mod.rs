//! What the hub's binary-level tests share (`mod common;` in each; the
//! fault suite includes it by path): authorized requests, channels, free
//! ports, and a plain HTTP GET for the hub's HTTP port.
#![allow(dead_code)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// `msg` with `Bearer <token>` in its authorization metadata.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A connected channel to `url` (`http://host:port`).
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `N` distinct loopback ports free right now (each held until all are
/// picked, so none is picked twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A plain HTTP/1.1 GET that reads the answer to the end (the hub closes
/// the connection, as asked): the status code and body, or `None` on any
/// failure.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let answer = String::from_utf8(answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Every event the hub at `url` stored, by WatchEvents' replay (each
/// message within 20 s).
pub async fn replay_events(url: &str, admin_token: &str) -> Vec<hub_proto::v1::Event> {
    use hub_proto::v1 as proto;
    let mut stream = proto::admin_service_client::AdminServiceClient::new(channel(url).await)
        .watch_events(authed(
            proto::WatchEventsRequest {
                stop_after_replay: true,
                ..Default::default()
            },
            admin_token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let bound = std::time::Duration::from_secs(20);
    while let Some(msg) = tokio::time::timeout(bound, stream.message())
        .await
        .expect("events in time")
        .unwrap()
    {
        events.push(msg.event.expect("an event"));
    }
    events
}

/// A fresh database named `hub_<what>_<id>` on the PostgreSQL server at
/// `HUB_TEST_POSTGRES_URL` (made with `psql`), as a URL; `None` when the
/// variable is not set.
pub fn postgres_test_database(what: &str) -> Option<String> {
    let server = std::env::var("HUB_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())?;
    let name = format!("hub_{what}_{}", uuid::Uuid::now_v7().simple());
    let out = std::process::Command::new("psql")
        .arg(&server)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = server.rsplit_once('/').expect("a URL naming a database");
    Some(format!("{base}/{name}"))
}

/// How long any condition may take to come true (a bound against a hang,
/// not a timing requirement).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` until it answers `Ok`, for at most [`PATIENCE`]; panics
/// with its last answer otherwise.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if start.elapsed() > PATIENCE => {
                panic!("{what}: not within {PATIENCE:?}; last: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
