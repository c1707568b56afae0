//! How the services tell a connection (see [`super::conn`]) about its
//! requests, finding it by the request's peer address (the servers put it
//! in every request's extensions): on the gRPC port a request marks its
//! connection as used, which ends its idle deadline; on the HTTP port a
//! connection is busy from each request's arrival until its response body
//! has been sent, and idle otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tonic::transport::server::TcpConnectInfo;

use super::conn::{ConnLimit, ConnState};

/// The peer of a gRPC request (plain or TLS).
pub(crate) fn grpc_peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::TlsConnectInfo;
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

/// The gRPC port's: marks each request's connection as used, which ends
/// its idle deadline (a spoke's connection may then stay quiet for long).
#[derive(Debug, Clone)]
pub struct MarkUsedLayer(pub ConnLimit);

impl<S> tower::Layer<S> for MarkUsedLayer {
    type Service = MarkUsed<S>;

    fn layer(&self, inner: S) -> MarkUsed<S> {
        MarkUsed {
            inner,
            limit: self.0.clone(),
        }
    }
}

/// See [`MarkUsedLayer`].
#[derive(Debug, Clone)]
pub struct MarkUsed<S> {
    inner: S,
    limit: ConnLimit,
}

impl<S, B> tower::Service<http::Request<B>> for MarkUsed<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(state) = grpc_peer(req.extensions()).and_then(|p| self.limit.state_of(p)) {
            state.used.store(true, Ordering::Release);
        }
        self.inner.call(req)
    }
}

/// Where a request came from, read from its extensions.
pub type PeerOf = fn(&http::Extensions) -> Option<SocketAddr>;

/// The HTTP port's: a connection counts as busy from each request's
/// arrival until its response body has been sent, and as idle otherwise.
#[derive(Debug, Clone)]
pub struct BusyLayer {
    limit: ConnLimit,
    peer_of: PeerOf,
}

impl BusyLayer {
    /// For the connections of `limit`, finding a request's peer with
    /// `peer_of`.
    pub fn new(limit: ConnLimit, peer_of: PeerOf) -> Self {
        Self { limit, peer_of }
    }
}

impl<S> tower::Layer<S> for BusyLayer {
    type Service = BusyService<S>;

    fn layer(&self, inner: S) -> BusyService<S> {
        BusyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`BusyLayer`].
#[derive(Debug, Clone)]
pub struct BusyService<S> {
    inner: S,
    layer: BusyLayer,
}

/// A request being served: its connection counts as busy until dropped.
#[derive(Debug)]
pub(super) struct Busy(Arc<ConnState>);

impl Busy {
    pub(super) fn start(state: Arc<ConnState>) -> Self {
        state.used.store(true, Ordering::Release);
        state.active.fetch_add(1, Ordering::AcqRel);
        Self(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        let ms = u64::try_from(state.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        state.idle_since_ms.store(ms, Ordering::Release);
        state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for BusyService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<BusyBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let busy = (self.layer.peer_of)(req.extensions())
            .and_then(|peer| self.layer.limit.state_of(peer))
            .map(Busy::start);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|inner| BusyBody { inner, busy }))
        })
    }
}

/// A response body that keeps its connection busy until it has been sent
/// (or dropped): a long response is not idle time.
#[derive(Debug)]
pub struct BusyBody<B> {
    inner: B,
    busy: Option<Busy>,
}

impl<B> http_body::Body for BusyBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            self.busy = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
