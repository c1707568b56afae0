//! Replicas on PostgreSQL: one hub leads the database and decides; every
//! other hub on it stands by and forwards each gRPC call to the leader, so
//! any replica answers any call, and the first standby to take the leader
//! lock when the leader goes serves in its place (see `store::postgres`
//! for the lock and the epoch that fences a replaced leader).
//!
//! A standby ([`Follower`]) serves its gRPC port with the same TLS,
//! connection caps and HTTP/2 settings as a leader. It answers health and
//! reflection itself and forwards `hub.v1.SpokeService` and
//! `hub.v1.AdminService` calls whole (headers, streamed bodies, trailers)
//! to the URL the leader wrote when it took the lead, over a few HTTP/2
//! connections, each carrying at most [`STREAMS_PER_CONNECTION`] calls at
//! once. It adds the caller's address and the database's replica secret
//! to each call; the leader's [`ForwardedPeerLayer`] takes the address as
//! the caller's when the secret matches, so per-address throttles count
//! callers, not replicas. With no leader (between one's death and the
//! next one's start) a call is answered UNAVAILABLE, which clients retry.
//! A standby's HTTP port answers `/healthz`, and `/readyz` while a leader
//! serves; the admin page is the leader's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use hub_proto::v1::admin_service_server::SERVICE_NAME as ADMIN_SERVICE;
use hub_proto::v1::spoke_service_server::SERVICE_NAME as SPOKE_SERVICE;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;
use tonic::transport::{Channel, Endpoint, Server};
use tower::ServiceExt;

use crate::guard::Guard;
use crate::guard::activity::{MarkUsedLayer, grpc_peer};
use crate::guard::conn::GuardedListener;
use crate::server::RunError;
use crate::settings::Settings;
use crate::shutdown::{self, Trigger};
use crate::store::{Leader, Store};

/// The header that carries the caller's address on a forwarded call.
const FORWARDED_FOR: &str = "hub-forwarded-for";
/// The header that carries the replica secret on a forwarded call.
const REPLICA_SECRET: &str = "hub-replica-secret";

/// Calls a standby puts on one connection to the leader at most; past
/// it, another connection is opened (the leader allows a connection
/// `--max-concurrent-streams`, 256 by default).
pub const STREAMS_PER_CONNECTION: usize = 200;

/// How often a standby reads who leads.
const LEADER_POLL: Duration = Duration::from_secs(1);

/// How long a standby that takes the lead lets forwarded calls finish.
const HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// The leader's side: a forwarded call carrying the replica secret is
/// taken as made by the address it names (the per-address throttles then
/// count the caller, not the standby that forwarded it). Without the
/// secret the headers are dropped and change nothing.
#[derive(Debug, Clone)]
pub struct ForwardedPeerLayer(pub Option<Arc<str>>);

impl<S> tower::Layer<S> for ForwardedPeerLayer {
    type Service = ForwardedPeer<S>;

    fn layer(&self, inner: S) -> ForwardedPeer<S> {
        ForwardedPeer {
            inner,
            secret: self.0.clone(),
        }
    }
}

/// See [`ForwardedPeerLayer`].
#[derive(Debug, Clone)]
pub struct ForwardedPeer<S> {
    inner: S,
    secret: Option<Arc<str>>,
}

impl<S, B> tower::Service<http::Request<B>> for ForwardedPeer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        let headers = req.headers_mut();
        let secret = headers.remove(REPLICA_SECRET);
        let forwarded = headers.remove(FORWARDED_FOR);
        let trusted = match (&self.secret, &secret) {
            (Some(mine), Some(theirs)) => mine.as_bytes().ct_eq(theirs.as_bytes()).into(),
            _ => false,
        };
        let peer = forwarded
            .filter(|_| trusted)
            .and_then(|v| v.to_str().ok()?.parse::<SocketAddr>().ok());
        if let Some(peer) = peer {
            let local = req
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::local_addr);
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(peer),
            });
        }
        self.inner.call(req)
    }
}

/// The leader a standby forwards to, with its connections.
struct Upstream {
    leader: Leader,
    endpoint: Endpoint,
    /// Connections, each with the calls it carries now.
    channels: Mutex<Vec<(Channel, Arc<AtomicUsize>)>>,
}

impl Upstream {
    /// A connection with room for one more call, and its count (raised).
    fn channel(&self) -> (Channel, Arc<AtomicUsize>) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = channels
            .iter()
            .find(|(_, open)| open.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION)
            .cloned();
        let (channel, open) = slot.unwrap_or_else(|| {
            let slot = (self.endpoint.connect_lazy(), Arc::new(AtomicUsize::new(0)));
            channels.push(slot.clone());
            slot
        });
        open.fetch_add(1, Ordering::Relaxed);
        (channel, open)
    }
}

/// Forwards every call it is given to the leader (see the module's doc).
#[derive(Clone)]
pub struct Forward {
    upstream: watch::Receiver<Option<Arc<Upstream>>>,
    /// Poked when the leader could not be reached: read who leads now.
    stale: Arc<Notify>,
}

impl Forward {
    async fn forward(self, mut req: http::Request<Body>) -> http::Response<Body> {
        let unavailable = |why: &str| tonic::Status::unavailable(why.to_owned()).into_http();
        let Some(upstream) = self.upstream.borrow().clone() else {
            return unavailable("no hub replica leads the database now; retry shortly");
        };
        if req.headers().contains_key(REPLICA_SECRET) {
            // Forwarded by another standby, which thinks this one leads:
            // never passed on again.
            return unavailable("this hub replica does not lead; retry shortly");
        }
        let peer = grpc_peer(req.extensions());
        let headers = req.headers_mut();
        headers.remove(FORWARDED_FOR);
        if let Some(peer) = peer.and_then(|p| http::HeaderValue::from_str(&p.to_string()).ok()) {
            headers.insert(FORWARDED_FOR, peer);
        }
        if let Ok(secret) = http::HeaderValue::from_str(&upstream.leader.secret) {
            headers.insert(REPLICA_SECRET, secret);
        }
        let (channel, open) = upstream.channel();
        match channel.oneshot(req).await {
            Ok(response) => response.map(|body| {
                Body::new(Counted {
                    body,
                    open,
                    broken: false,
                })
            }),
            Err(e) => {
                open.fetch_sub(1, Ordering::Relaxed);
                self.stale.notify_one();
                tracing::warn!(error = %crate::error::causes(&e), "forwarding a call to the leading hub failed");
                unavailable("the leading hub replica cannot be reached; retry shortly")
            }
        }
    }
}

/// A forwarded response's body: the call holds its room on the
/// connection until the body is dropped.
struct Counted {
    body: Body,
    open: Arc<AtomicUsize>,
    /// The leader's side failed; its status was sent.
    broken: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl http_body::Body for Counted {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.broken {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            // The leader went away mid-call: the caller gets a status it
            // retries, in trailers, rather than a reset stream.
            Poll::Ready(Some(Err(e))) => {
                self.broken = true;
                tracing::debug!(error = %e, "a forwarded call's leader went away");
                let mut trailers = http::HeaderMap::new();
                trailers.insert(
                    "grpc-status",
                    http::HeaderValue::from(tonic::Code::Unavailable as i32),
                );
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static(
                        "the leading hub replica went away; retry shortly",
                    ),
                );
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.broken || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// [`Forward`] under one service's name (tonic routes by it).
#[derive(Clone)]
pub struct ForwardService<const ADMIN: bool>(Forward);

impl NamedService for ForwardService<false> {
    const NAME: &'static str = SPOKE_SERVICE;
}

impl NamedService for ForwardService<true> {
    const NAME: &'static str = ADMIN_SERVICE;
}

impl<const ADMIN: bool> tower::Service<http::Request<Body>> for ForwardService<ADMIN> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let forward = self.0.clone();
        Box::pin(async move { Ok(forward.forward(req).await) })
    }
}

/// A standby's servers, until it takes the lead.
pub struct Follower {
    trigger: Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl Follower {
    /// Serves `grpc` and `http` as a standby of the leader `store` names.
    pub fn start(
        grpc: TcpListener,
        http: TcpListener,
        store: Store,
        settings: &Settings,
    ) -> Result<Self, RunError> {
        let (grpc_tls, http_tls) = crate::tls::for_ports(settings)?;
        let mut builder = Server::builder();
        if let Some(tls) = grpc_tls {
            builder = builder.tls_config(tls)?;
        }
        let (trigger, shutdown) = shutdown::channel();
        let guard = Arc::new(Guard::new(&settings.guard));
        let (upstream_tx, upstream) = watch::channel(None);
        let client_tls = settings
            .tls
            .as_ref()
            .map(|identity| identity.client_config(settings.tls_client_auth.is_some()));
        let stale = Arc::new(Notify::new());
        let watching = tokio::spawn(watch_leader(
            store,
            client_tls,
            upstream_tx,
            stale.clone(),
            shutdown.clone(),
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        let forward = Forward {
            upstream: upstream.clone(),
            stale,
        };
        let forward_for_http = forward.clone();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hub_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let mut grpc_shutdown = shutdown.clone();
        let grpc_server = builder
            .max_concurrent_streams(settings.max_concurrent_streams)
            .http2_keepalive_interval(Some(settings.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout))
            .layer(MarkUsedLayer(guard.grpc.clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(ForwardService::<false>(forward.clone()))
            .add_service(ForwardService::<true>(forward))
            .serve_with_incoming_shutdown(guard.grpc.clone().incoming(grpc), async move {
                grpc_shutdown.wait().await;
            });
        let serving = tokio::spawn(async move {
            // Health follows whether a leader serves.
            let mut upstream = upstream;
            loop {
                let status = match upstream.borrow_and_update().is_some() {
                    true => tonic_health::ServingStatus::Serving,
                    false => tonic_health::ServingStatus::NotServing,
                };
                // The whole server and each service, as a leader answers.
                for service in ["", SPOKE_SERVICE, ADMIN_SERVICE] {
                    health.set_service_status(service, status).await;
                }
                if upstream.changed().await.is_err() {
                    return;
                }
            }
        });

        let http = GuardedListener::new(http, guard.http.clone());
        let router = standby_router(forward_for_http);
        let http_task = match http_tls {
            Some(acceptor) => crate::server::serve_http(
                crate::tls::TlsListener::new(http, acceptor),
                router,
                shutdown.clone(),
            ),
            None => crate::server::serve_http(http, router, shutdown.clone()),
        };
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = grpc_server.await {
                tracing::error!(error = %e, "the standby's gRPC server failed");
            }
        });
        let http_task = tokio::spawn(async move {
            if let Ok(Err(e)) = http_task.await {
                tracing::error!(error = %e, "the standby's HTTP server failed");
            }
        });
        Ok(Self {
            trigger,
            tasks: vec![watching, serving, grpc_task, http_task],
        })
    }

    /// Stops serving: forwarded calls get [`HANDOVER_GRACE`] to end (their
    /// clients retry them on the new leader), then their connections close.
    pub async fn stop(self) {
        self.trigger.fire();
        let mut tasks = self.tasks;
        let all = futures_util::future::join_all(tasks.iter_mut());
        if tokio::time::timeout(HANDOVER_GRACE, all).await.is_err() {
            for task in &tasks {
                task.abort();
            }
        }
    }
}

/// Follows who leads: a new leader (or none) is sent on `upstream`. It
/// reads who leads when a hub takes the lead (a notification), when a
/// forwarded call could not reach the leader (`stale`), and every
/// [`LEADER_POLL`] (a leader that died is seen by its lock let go).
async fn watch_leader(
    store: Store,
    tls: Option<tonic::transport::ClientTlsConfig>,
    upstream: watch::Sender<Option<Arc<Upstream>>>,
    stale: Arc<Notify>,
    mut shutdown: shutdown::Shutdown,
) {
    let mut current: Option<Leader> = None;
    let mut changes = None;
    loop {
        if changes.is_none() {
            changes = match store.leader_changes().await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(error = %e, "standby: cannot listen for new leaders; reading who leads every {LEADER_POLL:?}");
                    None
                }
            };
        }
        match store.leader().await {
            Ok(leader) if leader != current => {
                let next = leader.as_ref().and_then(|l| upstream_of(l, tls.clone()));
                match &next {
                    Some(up) => {
                        tracing::info!(leader = %up.endpoint.uri(), epoch = up.leader.epoch, "standby: forwarding calls to the leading hub");
                    }
                    None => tracing::info!("standby: no hub leads the database now"),
                }
                upstream.send_replace(next);
                current = leader;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "standby: cannot read who leads");
            }
        }
        let changed = async {
            match changes.as_mut() {
                Some(changes) => changes.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            heard = changed => {
                if let Err(e) = heard {
                    tracing::warn!(error = %e, "standby: listening for new leaders failed; listening again");
                    changes = None;
                }
            }
            () = stale.notified() => {}
            () = tokio::time::sleep(LEADER_POLL) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// The connections to `leader`; `None` when it names no usable URL.
fn upstream_of(
    leader: &Leader,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Option<Arc<Upstream>> {
    let url = leader.url.as_ref()?;
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::error!(url, error = %e, "the leading hub's URL cannot be used");
            return None;
        }
    };
    let endpoint = endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let endpoint = match tls {
        Some(tls) => match endpoint.tls_config(tls) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                tracing::error!(url, error = %e, "no TLS to the leading hub");
                return None;
            }
        },
        None => endpoint,
    };
    Some(Arc::new(Upstream {
        leader: leader.clone(),
        endpoint,
        channels: Mutex::default(),
    }))
}

/// A standby's HTTP routes: `/healthz` (the process answers), `/readyz`
/// (a leader serves, so calls here are forwarded), and a pointer to the
/// leader for anything else.
fn standby_router(forward: Forward) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let leader = forward.upstream.borrow().clone();
                async move {
                    match leader.as_ref().and_then(|up| Some((up.leader.url.clone()?, up.leader.epoch))) {
                        Some((url, epoch)) => (
                            StatusCode::OK,
                            format!("ready: a standby; calls are forwarded to the leading hub at {url} (epoch {epoch})\n"),
                        ),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no hub leads the database now\n".to_owned(),
                        ),
                    }
                }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "this hub replica stands by: it forwards gRPC calls to the leading replica, \
                 whose HTTP port serves the admin page and /metrics\n",
            )
        })
        .layer(axum::middleware::map_response(crate::console::security_headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the service behind the layer sees: the caller's address and
    /// whether the replica headers were left in.
    async fn seen(
        secret: Option<&str>,
        headers: &[(&'static str, &str)],
    ) -> (Option<SocketAddr>, bool) {
        let service = tower::service_fn(|req: http::Request<()>| async move {
            let peer = grpc_peer(req.extensions());
            let leftover = req.headers().contains_key(REPLICA_SECRET)
                || req.headers().contains_key(FORWARDED_FOR);
            Ok::<_, Infallible>((peer, leftover))
        });
        let layer = ForwardedPeerLayer(secret.map(Arc::from));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: Some("127.0.0.1:50051".parse().unwrap()),
            remote_addr: Some("10.0.0.2:40000".parse().unwrap()),
        });
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        tower::Layer::layer(&layer, service)
            .oneshot(req)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_forwarded_address_counts_only_with_the_replica_secret() {
        let standby: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let caller: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let forwarded = [
            (FORWARDED_FOR, "192.0.2.7:5555"),
            (REPLICA_SECRET, "s3cret"),
        ];
        assert_eq!(
            seen(Some("s3cret"), &forwarded).await,
            (Some(caller), false)
        );
        // A wrong secret, or a leader with none (SQLite), changes nothing;
        // the headers never reach the services.
        let wrong = [(FORWARDED_FOR, "192.0.2.7:5555"), (REPLICA_SECRET, "guess")];
        assert_eq!(seen(Some("s3cret"), &wrong).await, (Some(standby), false));
        assert_eq!(seen(None, &forwarded).await, (Some(standby), false));
        // A caller naming an address without the secret changes nothing.
        let spoofed = [(FORWARDED_FOR, "192.0.2.7:5555")];
        assert_eq!(seen(Some("s3cret"), &spoofed).await, (Some(standby), false));
        // An unreadable address is ignored.
        let garbled = [
            (FORWARDED_FOR, "not an address"),
            (REPLICA_SECRET, "s3cret"),
        ];
        assert_eq!(seen(Some("s3cret"), &garbled).await, (Some(standby), false));
    }
}
