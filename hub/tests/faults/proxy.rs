//! A fault-injecting TCP proxy in front of the hub. While faulty, each new
//! connection gets a fate drawn from the seed and its connection number
//! alone (so a seed replays the same sequence of fates): its bytes may be
//! delayed, and after a random time (0–4 s) it is dropped (FIN both ways),
//! reset (RST both ways: `SO_LINGER` 0), or left half-open (one direction
//! stops being forwarded, nothing is closed); a lucky one stays healthy
//! for 2–8 s before it is dropped. While calm, connections are relayed
//! untouched. The small proxy of spoke-client's tests holds back
//! replies on command; this one is random and broader.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The longest a connection lives in faulty mode, so a half-open one that
/// neither end gives up on is closed in the end.
const MAX_LIFETIME: Duration = Duration::from_secs(20);

/// What happens to one connection.
#[derive(Debug, Clone, Copy)]
struct Fate {
    /// Each chunk waits up to this long before it is forwarded.
    max_delay: Option<Duration>,
    /// Seeds the delays of each chunk.
    delay_seed: u64,
    /// When the end comes, and which.
    end: Option<(Duration, End)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    /// Both sockets closed in order (FIN).
    Drop,
    /// Both sockets reset (RST).
    Reset,
    /// Stop forwarding the spoke's bytes to the hub; the hub's still flow.
    HalfOpenUp,
    /// Stop forwarding the hub's bytes to the spoke; the spoke's still flow.
    HalfOpenDown,
}

impl Fate {
    /// The fate of connection `n` under `seed`.
    fn draw(seed: u64, n: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let max_delay = rng
            .random_bool(0.3)
            .then(|| Duration::from_millis(rng.random_range(10..=300)));
        let after = Duration::from_millis(rng.random_range(0..=4000));
        let end = match rng.random_range(0..100) {
            // Healthy for a while, then closed in order, as a load
            // balancer recycles connections: every connection ends, so
            // the faults keep coming.
            0..30 => (
                Duration::from_millis(rng.random_range(2000..=8000)),
                End::Drop,
            ),
            30..50 => (after, End::Drop),
            50..75 => (after, End::Reset),
            75..88 => (after, End::HalfOpenUp),
            _ => (after, End::HalfOpenDown),
        };
        Self {
            max_delay,
            delay_seed: rng.random(),
            end: Some(end),
        }
    }

    fn name(&self) -> String {
        let end = match self.end {
            None => "clean",
            Some((after, End::Drop)) if after >= Duration::from_secs(2) => "drop after 2 s or more",
            Some((_, End::Drop)) => "drop",
            Some((_, End::Reset)) => "reset",
            Some((_, End::HalfOpenUp)) => "half-open (spoke to hub)",
            Some((_, End::HalfOpenDown)) => "half-open (hub to spoke)",
        };
        match self.max_delay {
            Some(_) => format!("delayed, {end}"),
            None => end.to_owned(),
        }
    }
}

/// The proxy; dropping it stops accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    faulty: Arc<watch::Sender<bool>>,
    cuts: Arc<watch::Sender<u64>>,
    fates: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a fresh port, relaying to `upstream`; starts calm.
    pub async fn start(upstream: SocketAddr, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faulty = Arc::new(watch::Sender::new(false));
        let cuts = Arc::new(watch::Sender::new(0));
        let fates = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (faulty, cuts, fates) = (faulty.clone(), cuts.clone(), fates.clone());
            async move {
                let count = AtomicU64::new(0);
                while let Ok((spoke, _)) = listener.accept().await {
                    let fate = if *faulty.borrow() {
                        let fate = Fate::draw(seed, count.fetch_add(1, Ordering::SeqCst));
                        fates.lock().unwrap().push(fate.name());
                        Some(fate)
                    } else {
                        None
                    };
                    tokio::spawn(relay(spoke, upstream, fate, cuts.subscribe()));
                }
            }
        });
        Self {
            addr,
            faulty,
            cuts,
            fates,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Faulty: new connections get a fate. Calm: they are relayed as is
    /// (connections opened while faulty keep their fate until cut).
    pub fn set_faulty(&self, faulty: bool) {
        self.faulty.send_replace(faulty);
    }

    /// Closes every open connection.
    pub fn cut_all(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// How many connections got each fate.
    pub fn fates(&self) -> String {
        let fates = self.fates.lock().unwrap();
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for fate in fates.iter() {
            *counts.entry(fate).or_default() += 1;
        }
        format!("{} faulty connections: {counts:?}", fates.len())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn relay(
    mut spoke: TcpStream,
    upstream: SocketAddr,
    fate: Option<Fate>,
    mut cuts: watch::Receiver<u64>,
) {
    cuts.borrow_and_update();
    let Ok(mut hub) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = spoke.set_nodelay(true);
    let _ = hub.set_nodelay(true);
    let fate = fate.unwrap_or(Fate {
        max_delay: None,
        delay_seed: 0,
        end: None,
    });
    // Each direction's delays come from the fate, so they replay too.
    let delays = |salt: u64| {
        let max = fate.max_delay;
        let mut rng = StdRng::seed_from_u64(fate.delay_seed ^ salt);
        move || max.map(|max| rng.random_range(Duration::ZERO..=max))
    };
    let (up_frozen, up_thawed) = watch::channel(false);
    let (down_frozen, down_thawed) = watch::channel(false);
    let end = {
        let (spoke_in, spoke_out) = spoke.split();
        let (hub_in, hub_out) = hub.split();
        let lifetime = if fate.end.is_some() || fate.max_delay.is_some() {
            MAX_LIFETIME
        } else {
            Duration::MAX
        };
        tokio::select! {
            () = pump(spoke_in, hub_out, delays(1), up_thawed) => None,
            () = pump(hub_in, spoke_out, delays(2), down_thawed) => None,
            _ = cuts.changed() => None,
            () = sleep_at_most(lifetime) => None,
            end = async {
                let Some((after, end)) = fate.end else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(after).await;
                match end {
                    End::Drop | End::Reset => Some(end),
                    End::HalfOpenUp | End::HalfOpenDown => {
                        let frozen = if end == End::HalfOpenUp { &up_frozen } else { &down_frozen };
                        frozen.send_replace(true);
                        // Stays open until one end gives up, a cut or the
                        // lifetime.
                        std::future::pending().await
                    }
                }
            } => end,
        }
    };
    match end {
        Some(End::Reset) => {
            let _ = spoke.set_zero_linger();
            let _ = hub.set_zero_linger();
        }
        Some(End::Drop) => {
            let _ = spoke.shutdown().await;
            let _ = hub.shutdown().await;
        }
        _ => {}
    }
}

async fn sleep_at_most(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Forwards `from` to `to`, each chunk after `delay()`, until either side
/// ends; once `frozen` turns true it forwards nothing more and reads
/// nothing more, and stays pending.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut delay: impl FnMut() -> Option<Duration>,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            _ = frozen.wait_for(|f| *f) => None,
            read = from.read(&mut buf) => Some(read),
        };
        let n = match read {
            None => return std::future::pending().await,
            Some(Ok(0) | Err(_)) => return,
            Some(Ok(n)) => n,
        };
        if let Some(d) = delay() {
            tokio::time::sleep(d).await;
        }
        let now_frozen = *frozen.borrow();
        if now_frozen {
            return std::future::pending().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
