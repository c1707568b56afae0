//! The client handle: build it, register handlers, `run` it, record metrics
//! from anywhere, read its status, shut it down.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{ClientBuilder, Config};
use crate::directives::Directives;
use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::event::Observer;
use crate::flush::{FlushReport, FlushRequest, Flusher};
use crate::handler::BoxHandler;
use crate::keys::{self, Keys};
use crate::link::Link;
use crate::metrics::{Buffer, Limits, Point};
use crate::reconnect::Machine;
use crate::session::{Connector, Shared};
use crate::status::{KeyState, SpokeStatus, Status, Tracker};
use crate::store::Store;
use crate::wire::now_ms;

/// The longest status message the hub takes.
const MAX_STATUS_MESSAGE: usize = 1024;

/// Settled directive records older than this are forgotten at start.
const KEEP_SETTLED: Duration = Duration::from_secs(7 * 24 * 3600);

/// A spoke's connection to the hub; cheap to clone, every clone is the same
/// client.
///
/// ```no_run
/// use spoke_client::{Client, Context};
///
/// #[tokio::main]
/// async fn main() -> Result<(), spoke_client::Error> {
///     let client = Client::builder("billing")
///         .endpoint("http://127.0.0.1:50051")
///         .enrollment_token(std::fs::read_to_string("hub-data/enrollment.token").unwrap())
///         .state_dir("./billing-state")
///         .handler("ping", "1", |_: serde_json::Value, _ctx: Context| async {
///             Ok::<_, String>(serde_json::json!({"pong": true}))
///         })
///         .build()
///         .await?;
///     client.record("statistics", "started", 1.0, &[]);
///     client.run_until(async { tokio::signal::ctrl_c().await.unwrap() }).await
/// }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    buffer: Buffer,
    wanted: Arc<Notify>,
    flush_tx: mpsc::Sender<FlushRequest>,
    flush_rx: Mutex<Option<mpsc::Receiver<FlushRequest>>>,
    running: AtomicBool,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.inner.shared.config.name)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring the spoke named `name` (1 to 63 of `[a-z0-9_.-]`).
    pub fn builder(name: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(name)
    }

    pub(crate) async fn start(
        config: Config,
        handlers: BTreeMap<String, BoxHandler>,
        capabilities: Vec<(String, String)>,
        observer: Option<Observer>,
    ) -> Result<Self> {
        let dir = config.state_dir.clone().expect("validated");
        let store = Store::open(&dir).await?;
        // A key the operator left in the state directory comes first: it may
        // be all a spoke without an enrollment token has.
        let keys = Keys::new(&dir);
        keys.take_file(&store, &config.name).await?;
        let registration = store.registration().await?;
        if let Some(reg) = &registration {
            if reg.name != config.name {
                return Err(Error::config(
                    "state_dir",
                    format!(
                        "{} belongs to spoke {:?}, not {:?}",
                        dir.display(),
                        reg.name,
                        config.name
                    ),
                ));
            }
        } else if config.enrollment_token.is_none() {
            return Err(Error::config(
                "enrollment_token",
                "required on the first start: the state directory holds no key yet",
            ));
        }
        let status = Tracker::default();
        let endpoints = Endpoints::new(
            config.endpoints.clone(),
            config.endpoint_fallback_after,
            status.clone(),
        );
        endpoints.load(&store).await?;
        let link = Link::new(config.call_timeout);
        let wanted = Arc::new(Notify::new());
        let limits = Limits {
            max_points: config.max_buffered_points,
            flush_at: config.flush_at_points,
        };
        let buffer = Buffer::spawn(store.clone(), status.clone(), limits, wanted.clone());
        let directives = Directives::new(
            handlers,
            store.clone(),
            link.clone(),
            buffer.clone(),
            status.clone(),
            config.concurrency,
            observer.clone(),
        );
        let (flush_tx, flush_rx) = mpsc::channel(16);
        let shared = Shared {
            config: Arc::new(config),
            capabilities: Arc::new(capabilities),
            store,
            link,
            status,
            directives,
            hub_max_batch: Arc::new(AtomicU32::new(0)),
            registration: Arc::new(Mutex::new(registration)),
            observer,
            beat_now: Arc::new(Notify::new()),
            endpoints,
            keys,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                buffer,
                wanted,
                flush_tx,
                flush_rx: Mutex::new(Some(flush_rx)),
                running: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// Testing only (see `ClientBuilder::pause_before_outcome`).
    pub(crate) fn pause_before_outcome(&self, pause: crate::directives::Pause) {
        self.inner.shared.directives.pause_before_outcome(pause);
    }

    /// Runs the spoke until [`Client::shutdown`] is called or a fatal error
    /// (a refused registration or enrollment token) stops it: registration,
    /// the directive stream with reconnection and failover, heartbeats,
    /// handlers and metric flushing. On shutdown it stops taking directives,
    /// lets running handlers finish within the grace period (then cancels
    /// them), flushes metrics one last time and closes the stream. Call it
    /// once.
    ///
    /// A spoke key the hub refuses (revoked, or replaced by `hub
    /// rotate-key`) does not end `run`: the client stops connecting,
    /// [`Status::key`] says [`KeyState::Refused`] with the hub's message,
    /// and it waits for a new key ([`Client::install_key`], or the `new-key`
    /// file: see [`keys`](crate::keys)), then connects at once. Shut down
    /// while waiting, `run` returns [`Error::Unauthenticated`].
    pub async fn run(&self) -> Result<()> {
        let requests = self
            .inner
            .flush_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| Error::config("run", "a client runs once"))?;
        self.inner.running.store(true, Ordering::SeqCst);
        let result = self.serve(requests).await;
        self.inner.running.store(false, Ordering::SeqCst);
        result
    }

    /// Like [`Client::run`], and shuts down gracefully when `signal`
    /// completes (e.g. on Ctrl-C).
    pub async fn run_until(&self, signal: impl Future<Output = ()>) -> Result<()> {
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return result,
            () = signal => self.shutdown(),
        }
        run.await
    }

    async fn serve(&self, requests: mpsc::Receiver<FlushRequest>) -> Result<()> {
        let shared = &self.inner.shared;
        let config = &shared.config;
        let before = now_ms() - KEEP_SETTLED.as_millis() as i64;
        shared.store.prune_directives(before).await?;

        let stop_flushing = CancellationToken::new();
        let flusher = Flusher {
            buffer: self.inner.buffer.clone(),
            link: shared.link.clone(),
            status: shared.status.clone(),
            max_batch: config.max_batch_points,
            hub_max_batch: shared.hub_max_batch.clone(),
            interval: config.flush_interval,
            wanted: self.inner.wanted.clone(),
            grace: config.shutdown_grace,
        };
        let flushing = tokio::spawn(flusher.run(requests, stop_flushing.clone()));

        let machine = Machine::new(
            Connector {
                shared: shared.clone(),
                tried: 0,
            },
            shared.endpoints.clone(),
            config.backoff.clone(),
            shared.status.clone(),
        );
        // Dropping the machine ends the directive stream: no new work is
        // taken, while acks and the last flush still use the connection.
        let outcome = tokio::select! {
            fatal = machine.run() => Err(fatal),
            () = self.inner.shutdown.cancelled() => match shared.status.snapshot().key {
                // Stopped while waiting for a new key: the spoke was not
                // working, and the caller should hear why.
                KeyState::Refused { message } => Err(Error::Unauthenticated { message }),
                _ => Ok(()),
            },
        };
        let grace = if outcome.is_ok() {
            config.shutdown_grace
        } else {
            Duration::ZERO
        };
        shared.directives.drain(grace).await;
        stop_flushing.cancel();
        if let Err(e) = flushing.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        shared.link.disconnect();
        shared.status.update(|s| s.connected = false);
        outcome
    }

    /// Asks [`Client::run`] to shut down gracefully; returns at once.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Records a metric point measured now, with labels. Never waits: the
    /// point goes to the local buffer (on disk normally within milliseconds,
    /// see [`metrics`](crate::metrics)) and is flushed in the background. In
    /// a handler, prefer [`Context::record`](crate::Context::record): its
    /// points are kept with the run's outcome.
    ///
    /// ```no_run
    /// # fn demo(client: spoke_client::Client) {
    /// client.record("statistics", "orders_processed", 17.0, &[("shop", "eu")]);
    /// # }
    /// ```
    pub fn record(&self, domain: &str, name: &str, value: f64, labels: &[(&str, &str)]) {
        self.record_at(domain, name, value, labels, SystemTime::now());
    }

    /// Like [`Client::record`], measured at `time`.
    pub fn record_at(
        &self,
        domain: &str,
        name: &str,
        value: f64,
        labels: &[(&str, &str)],
        time: SystemTime,
    ) {
        let mut point = Point::new(domain, name, value).at(time);
        for (k, v) in labels {
            point = point.label(*k, *v);
        }
        self.record_point(point);
    }

    /// Records a [`Point`] (with a unit, labels, a time).
    pub fn record_point(&self, point: Point) {
        self.inner.buffer.record(point);
    }

    /// Pushes every buffered point now and reports what the hub accepted.
    /// Fails with [`Error::NotConnected`] when no hub is reachable (the
    /// points stay buffered) and [`Error::NotRunning`] outside
    /// [`Client::run`].
    pub async fn flush(&self) -> Result<FlushReport> {
        if !self.inner.running.load(Ordering::SeqCst) {
            return Err(Error::NotRunning);
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .flush_tx
            .send(FlushRequest { reply })
            .await
            .map_err(|_| Error::NotRunning)?;
        answer.await.map_err(|_| Error::NotRunning)?
    }

    /// Pushes `points` now as one batch with the caller's `batch_id`,
    /// bypassing the local buffer, and answers the hub's result for it:
    /// `ACCEPTED`, or `DUPLICATE` when the hub already stored a batch with
    /// this id (it then stores nothing, and reports the points it holds from
    /// the first time). For a spoke that keeps its own outbox: nothing is
    /// kept here, so after a failure resend the same batch with the same id
    /// — the hub counts it once. Fails with [`Error::NotConnected`] when no
    /// hub is reachable right now (e.g. outside [`Client::run`]).
    ///
    /// ```no_run
    /// # async fn demo(client: spoke_client::Client) -> Result<(), spoke_client::Error> {
    /// use spoke_client::Point;
    ///
    /// let points = vec![Point::new("statistics", "orders_processed", 42.0)];
    /// let result = client.push_batch("orders-2026-11-23", points).await?;
    /// println!("{:?}: {} points stored", result.status(), result.accepted_points);
    /// # Ok(()) }
    /// ```
    pub async fn push_batch(
        &self,
        batch_id: impl Into<String>,
        points: Vec<Point>,
    ) -> Result<hub_proto::v1::BatchResult> {
        let request = hub_proto::v1::PushMetricsRequest {
            batch_id: batch_id.into(),
            points: points.into_iter().map(Point::into_proto).collect(),
        };
        self.inner.shared.link.push(request).await
    }

    /// What the client is doing now.
    pub fn status(&self) -> Status {
        self.inner.shared.status.snapshot()
    }

    /// Installs a new key for this spoke, as `hub rotate-key NAME` printed
    /// it: kept in the state directory at once (it replaces the old key for
    /// good), used by the next connection, and a client waiting after the
    /// hub refused its key connects with it at once. A connection open now
    /// keeps going (the rotation ends it anyway). Works whether or not
    /// [`Client::run`] is running. The other way to hand over a key, without
    /// code, is the `new-key` file in the state directory (see
    /// [`keys`](crate::keys)). Fails with [`Error::Config`] (field `key`)
    /// for a string that cannot be a key.
    ///
    /// ```no_run
    /// # async fn demo(client: spoke_client::Client) -> Result<(), spoke_client::Error> {
    /// // The operator ran `hub rotate-key billing` and passed the key on.
    /// let key = std::fs::read_to_string("/run/secrets/billing-key").unwrap();
    /// client.install_key(key).await?;
    /// # Ok(()) }
    /// ```
    pub async fn install_key(&self, key: impl Into<String>) -> Result<()> {
        keys::install(&self.inner.shared, &key.into()).await
    }

    /// Sets the status every heartbeat reports (OK until set), with a
    /// message saying why (at most 1 024 characters are sent; `""` for
    /// none). Operators see both in `GetSpoke`, `hub spokes` and the admin
    /// page. Connected, the client sends a heartbeat at once; otherwise the
    /// first heartbeat of the next connection carries it.
    ///
    /// ```no_run
    /// # fn demo(client: spoke_client::Client) {
    /// use spoke_client::SpokeStatus;
    ///
    /// client.set_status(SpokeStatus::Error, "the billing database is unreachable");
    /// # }
    /// ```
    pub fn set_status(&self, status: SpokeStatus, message: impl Into<String>) {
        let message: String = message.into().chars().take(MAX_STATUS_MESSAGE).collect();
        let shared = &self.inner.shared;
        shared.status.update(|s| {
            s.spoke_status = status;
            s.status_message = message;
        });
        shared.beat_now.notify_one();
    }
}
