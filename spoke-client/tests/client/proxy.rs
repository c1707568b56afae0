//! A TCP proxy in front of the hub that can hold back the hub's replies
//! and cut every connection: how a test makes a call reach the hub while
//! its answer never reaches the spoke.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; dropping it stops accepting.
pub struct Proxy {
    pub addr: SocketAddr,
    /// True while the hub's bytes are held back.
    stalled: Arc<watch::Sender<bool>>,
    /// Bumped to cut every open connection.
    cuts: Arc<watch::Sender<u64>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a fresh port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(watch::Sender::new(false));
        let cuts = Arc::new(watch::Sender::new(0));
        let (s, c) = (stalled.clone(), cuts.clone());
        let accept = tokio::spawn(async move {
            while let Ok((spoke, _)) = listener.accept().await {
                let Ok(hub) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(relay(spoke, hub, s.subscribe(), c.subscribe()));
            }
        });
        Self {
            addr,
            stalled,
            cuts,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, hold back everything the hub sends.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Closes every open connection (dropping what was held back); new ones
    /// are relayed normally.
    pub fn cut(&self) {
        // Cut first: a held reply released by the unstall sees the cut and
        // is dropped, never delivered.
        self.cuts.send_modify(|n| *n += 1);
        self.stalled.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(
    spoke: TcpStream,
    hub: TcpStream,
    stalled: watch::Receiver<bool>,
    mut cuts: watch::Receiver<u64>,
) {
    let generation = *cuts.borrow_and_update();
    let gate = Gate {
        stalled,
        cuts: cuts.clone(),
        generation,
    };
    let (spoke_in, spoke_out) = spoke.into_split();
    let (hub_in, hub_out) = hub.into_split();
    tokio::select! {
        () = pump(spoke_in, hub_out, None) => {}
        () = pump(hub_in, spoke_out, Some(gate)) => {}
        _ = cuts.changed() => {}
    }
}

/// Holds the hub's bytes while stalled; never lets them through after a cut.
struct Gate {
    stalled: watch::Receiver<bool>,
    cuts: watch::Receiver<u64>,
    generation: u64,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: Option<Gate>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(gate) = gate.as_mut()
            && (gate.stalled.wait_for(|stalled| !stalled).await.is_err()
                || *gate.cuts.borrow() != gate.generation)
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
