//! Assembles the running hub: the gRPC server (spoke and admin services,
//! health, reflection; TLS when `Settings::tls` is set, client certificates
//! when `Settings::tls_client_auth` is), the HTTP server (TLS with
//! `Settings::http_tls`), the background timers, and the shutdown drain.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use hub_proto::v1::admin_service_server::AdminServiceServer;
use hub_proto::v1::spoke_service_server::SpokeServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tower::util::MapResponseLayer;

use crate::api::admin::AdminApi;
use crate::api::spoke::SpokeApi;
use crate::api::{Caller, Hub};
use crate::auth::TokenHash;
use crate::guard::activity::{BusyLayer, MarkUsedLayer};
use crate::guard::conn::GuardedListener;
use crate::ledger::{self, Ledger};
use crate::replica::ForwardedPeerLayer;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry::RpcTimerLayer;
use crate::tls::{TlsError, TlsListener};
use crate::{limits, shutdown, timers};

/// The secrets a hub checks callers against.
pub struct Secrets {
    /// Guards AdminService.
    pub admin_token: TokenHash,
    /// Lets new spokes register.
    pub enrollment_token: TokenHash,
}

/// Errors that stop a running hub.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// The committer's thread could not be started.
    #[error("starting the committer thread: {0}")]
    Committer(#[source] std::io::Error),
    /// The ledger could not be read from the store.
    #[error("loading the hub's state from the database: {0}")]
    Load(#[from] crate::Error),
    /// The TLS settings cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Another hub leads the database now; this one stopped serving.
    #[error("deposed: {0}")]
    Deposed(String),
}

/// Serves the hub on already-bound listeners until `signal` completes, then
/// drains: streams end, in-flight calls finish within the grace period, the
/// database is closed.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    store: Store,
    mut settings: Settings,
    secrets: Secrets,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // First, so that an unusable identity returns before any task starts.
    let (grpc_tls, http_tls) = crate::tls::for_ports(&settings)?;
    let mut grpc_builder = Server::builder();
    if let Some(tls) = grpc_tls {
        grpc_builder = grpc_builder.tls_config(tls)?;
    }
    // Webhooks must not point back at this hub.
    for port in [grpc.local_addr()?.port(), http.local_addr()?.port()] {
        settings.webhook.own_ports.push(port);
    }
    let (trigger, shutdown) = shutdown::channel();
    let grace = settings.shutdown_grace;
    // Standbys wait in `main`, before they bind their ports; this returns
    // at once there.
    store.lead().await?;
    let ledger = Ledger::load(store.clone(), Default::default()).await?;
    // Calls standbys forward carry their caller's address under it.
    let replica_secret = store
        .leader()
        .await?
        .map(|leader| std::sync::Arc::<str>::from(leader.secret));
    let writer = store.writer()?;
    let committer = ledger::spawn_committer(ledger.clone(), writer).map_err(RunError::Committer)?;
    let _closes_the_ledger = CloseOnDrop(ledger.clone());
    let hub = Hub::new(
        ledger.clone(),
        settings.clone(),
        secrets.admin_token,
        secrets.enrollment_token,
        shutdown.clone(),
    );

    let background = [
        tokio::spawn(timers::run_delivery_timer(hub.clone())),
        tokio::spawn(timers::run_health_sweeper(hub.clone())),
        tokio::spawn(timers::run_retention(hub.clone())),
        tokio::spawn(timers::run_checkpointer(hub.clone())),
        tokio::spawn(crate::nats::run_publisher(hub.clone())),
        tokio::spawn(crate::webhook::run_dispatcher(hub.clone())),
        tokio::spawn(hub.guard().clone().run_maintenance(shutdown.clone())),
    ];

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SpokeServiceServer<SpokeApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hub_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hub_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let max = settings.max_message_bytes;
    let spoke_service = SpokeServiceServer::new(SpokeApi::new(hub.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin_hub = hub.clone();
    let admin_service = AdminServiceServer::new(AdminApi::new(hub.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin_service = InterceptedService::new(admin_service, move |req: tonic::Request<()>| {
        admin_hub.authenticate_admin(Caller::of(&req))?;
        Ok(req)
    });

    let mut grpc_shutdown = shutdown.clone();
    let grpc_server = grpc_builder
        .max_concurrent_streams(settings.max_concurrent_streams)
        .http2_keepalive_interval(Some(settings.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout))
        .layer(MarkUsedLayer(hub.guard().grpc.clone()))
        .layer(ForwardedPeerLayer(replica_secret))
        .layer(RpcTimerLayer(hub.telemetry().clone()))
        .layer(MapResponseLayer::new(limits::map_response))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(spoke_service)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(hub.guard().grpc.clone().incoming(grpc), async move {
            grpc_shutdown.wait().await;
        });

    // Capped, with idle connections closed (see `guard::conn`).
    let http = GuardedListener::new(http, hub.guard().http.clone());
    let router = crate::http::router(hub.clone())
        .layer(BusyLayer::new(hub.guard().http.clone(), |ext| {
            ext.get::<ConnectInfo<SocketAddr>>().map(|info| info.0)
        }));
    let http_task = match http_tls {
        Some(acceptor) => serve_http(TlsListener::new(http, acceptor), router, shutdown.clone()),
        None => serve_http(http, router, shutdown.clone()),
    };
    let grpc_task = tokio::spawn(grpc_server);

    let mut watcher = shutdown.clone();
    let mut deposed = None;
    tokio::select! {
        () = signal => tracing::info!("shutdown requested; draining"),
        () = watcher.wait() => {}
        why = store.deposed() => {
            tracing::error!(%why, "deposed: this hub stops serving; its calls go to the hub that leads now");
            deposed = Some(why);
        }
    }
    health
        .set_not_serving::<SpokeServiceServer<SpokeApi>>()
        .await;
    health
        .set_not_serving::<AdminServiceServer<AdminApi>>()
        .await;
    trigger.fire();

    let drained = tokio::time::timeout(grace, async {
        let grpc = grpc_task.await;
        let http = http_task.await;
        for task in background {
            rethrow(task.await);
        }
        (grpc, http)
    })
    .await;
    let result = match drained {
        Ok((grpc, http)) => {
            rethrow(grpc)?;
            rethrow(http)?;
            Ok(())
        }
        Err(_) => {
            tracing::warn!(grace = ?grace, "calls still running after the grace period; stopping anyway");
            Ok(())
        }
    };
    // What the ledger decided and did not commit yet (deliveries, heartbeats)
    // is written before the database closes.
    ledger.close();
    committer.join().await;
    store.close().await;
    match deposed {
        Some(why) => Err(RunError::Deposed(why)),
        None => result,
    }
}

/// Asks the committer to write what is left and stop when [`run`] ends,
/// also when its future is dropped before the end (a test hub dropped
/// without being stopped): the committer's thread would otherwise go on,
/// holding the database's connections.
struct CloseOnDrop(Ledger);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Serves the HTTP routes on `listener` until `shutdown`; handlers see
/// the peer's address (the sign-in throttle counts per address).
pub(crate) fn serve_http<L>(
    listener: L,
    router: axum::Router,
    mut shutdown: shutdown::Shutdown,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    // axum gives connect info for any listener wrapped in `tap_io`.
    let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let server =
        axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await });
    tokio::spawn(server.into_future())
}

/// Re-raises a panic of a server task; passes its result on.
fn rethrow<T>(joined: Result<T, tokio::task::JoinError>) -> T {
    match joined {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("server task cancelled: {e}"),
    }
}
