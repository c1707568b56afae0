//! Connections: a cap per port and a deadline for the first request.
//!
//! Each accepted socket takes a slot of its port's [`ConnLimit`]; with none
//! free it is closed at once (a refused connection costs nothing, while
//! running out of file descriptors stops `accept` for everyone), and the
//! refusals are logged in aggregate. An admitted socket becomes a
//! [`Guarded`] stream that fails its reads once it has been open for the
//! idle timeout without a request having reached the services: that bounds
//! the TLS handshake, the HTTP/2 preface and the request headers together,
//! so a socket that never completes a request cannot hold a slot. On the
//! HTTP port (`every_request`) the same timeout also closes a keep-alive
//! connection idle between requests; gRPC connections, once they carried a
//! request, are left to HTTP/2 keepalive pings (a spoke's stream may be
//! quiet for long).
//!
//! The services tell a connection about its requests through the layers
//! of [`super::activity`].

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::Tally;

/// How long accepting pauses after an error that is not one connection's
/// own (e.g. out of file descriptors), instead of spinning on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The connection cap and idle rule of one port; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnLimit {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
    every_request: bool,
    open: Mutex<HashMap<SocketAddr, Arc<ConnState>>>,
    refused: Tally,
    accept_errors: Tally,
}

/// What the services tell a connection's stream about its use (through
/// the layers of [`super::activity`]).
#[derive(Debug)]
pub(super) struct ConnState {
    pub(super) opened: Instant,
    /// Requests being served.
    pub(super) active: AtomicU32,
    /// A request has reached the services.
    pub(super) used: AtomicBool,
    /// When the last request finished, ms after `opened`.
    pub(super) idle_since_ms: AtomicU64,
}

impl ConnState {
    /// When the connection's idle time runs out; `None` while a request
    /// is being served.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }
}

impl ConnLimit {
    /// The gRPC port's: `max` connections; each must deliver its first
    /// request within `idle_timeout`.
    pub fn grpc(max: usize, idle_timeout: Duration) -> Self {
        Self::new(max, idle_timeout, false)
    }

    /// The HTTP port's: `max` connections, none idle (no request being
    /// served) for longer than `idle_timeout`.
    pub fn http(max: usize, idle_timeout: Duration) -> Self {
        Self::new(max, idle_timeout, true)
    }

    fn new(max: usize, idle_timeout: Duration, every_request: bool) -> Self {
        let (refused, accept_errors) = if every_request {
            (
                "HTTP port: connections refused at --max-http-connections",
                "HTTP port: accepting connections failed",
            )
        } else {
            (
                "gRPC port: connections refused at --max-grpc-connections",
                "gRPC port: accepting connections failed",
            )
        };
        Self {
            inner: Arc::new(Inner {
                max,
                slots: Arc::new(Semaphore::new(max)),
                idle_timeout,
                every_request,
                open: Mutex::new(HashMap::new()),
                refused: Tally::new(refused),
                accept_errors: Tally::new(accept_errors),
            }),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.max - self.inner.slots.available_permits()
    }

    /// A guarded stream for `tcp`, or `None` (and `tcp` closed) when every
    /// slot is taken.
    pub fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Guarded<TcpStream>> {
        let Ok(permit) = self.inner.slots.clone().try_acquire_owned() else {
            drop(tcp);
            self.inner
                .refused
                .add(format_args!("{} ({} open)", peer.ip(), self.inner.max));
            return None;
        };
        // Directives and answers go out at once instead of waiting for the
        // peer's delayed ACK (~40 ms each on Linux).
        let _ = tcp.set_nodelay(true);
        let state = Arc::new(ConnState {
            opened: Instant::now(),
            active: AtomicU32::new(0),
            used: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        });
        self.lock_open().insert(peer, state.clone());
        let deadline = Box::pin(tokio::time::sleep(self.inner.idle_timeout));
        Some(Guarded {
            io: tcp,
            state: state.clone(),
            deadline: Some(deadline),
            idle_timeout: self.inner.idle_timeout,
            every_request: self.inner.every_request,
            _slot: Slot {
                limit: self.inner.clone(),
                peer,
                state,
                _permit: permit,
            },
        })
    }

    /// Accepts on `listener` until a connection is admitted.
    pub async fn accept(&self, listener: &TcpListener) -> (Guarded<TcpStream>, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    if let Some(conn) = self.admit(tcp, peer) {
                        return (conn, peer);
                    }
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    self.inner.accept_errors.add(e);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    /// The admitted connections of `listener`, for tonic.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> impl futures_util::Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
        futures_util::stream::unfold((self, listener), |(limit, listener)| async move {
            let (conn, _) = limit.accept(&listener).await;
            Some((Ok(conn), (limit, listener)))
        })
    }

    /// Logs refusals a quiet spell left unlogged.
    pub fn maintain(&self) {
        self.inner.refused.flush();
        self.inner.accept_errors.flush();
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ConnState>>> {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn state_of(&self, peer: SocketAddr) -> Option<Arc<ConnState>> {
        self.lock_open().get(&peer).cloned()
    }
}

/// Errors of one connection (it went away before it was accepted), not
/// of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// An admitted connection's slot: frees it and forgets the connection
/// when dropped.
#[derive(Debug)]
struct Slot {
    limit: Arc<Inner>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        // Only this connection's entry: a new one from the same address
        // may already be in.
        if open
            .get(&self.peer)
            .is_some_and(|s| Arc::ptr_eq(s, &self.state))
        {
            open.remove(&self.peer);
        }
    }
}

/// An admitted connection: its reads fail once its idle time ran out.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    state: Arc<ConnState>,
    deadline: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    every_request: bool,
    _slot: Slot,
}

impl<IO> Guarded<IO> {
    /// The connection's stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// `Err` once the connection has been idle for the whole timeout; the
    /// deadline's timer is registered with `cx`, so the connection's task
    /// wakes to close it even if the peer sends nothing.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.every_request && self.state.used.load(Ordering::Acquire) {
            self.deadline = None;
        }
        let Some(sleep) = self.deadline.as_mut() else {
            return Ok(());
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.state.idle_deadline(self.idle_timeout) {
                None => sleep.as_mut().reset(now + self.idle_timeout),
                Some(at) if at > now => sleep.as_mut().reset(at),
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the idle connection timeout",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_idle(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The TCP connection's addresses, as tonic's own `TcpIncoming` gives them
/// (so `Request::remote_addr` and `peer_certs` work as usual).
impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

/// The HTTP port's listener: accepts through the port's [`ConnLimit`].
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    limit: ConnLimit,
}

impl GuardedListener {
    /// Accepts on `listener` within `limit`.
    pub fn new(listener: TcpListener, limit: ConnLimit) -> Self {
        Self { listener, limit }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.limit.accept(&self.listener).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::activity::Busy;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(
        limit: &ConnLimit,
        listener: &TcpListener,
    ) -> (TcpStream, Option<Guarded<TcpStream>>) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        (client, limit.admit(tcp, peer))
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_slots_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = ConnLimit::grpc(2, Duration::from_secs(60));
        let (_c1, g1) = pair(&limit, &listener).await;
        let (_c2, g2) = pair(&limit, &listener).await;
        assert!(g1.is_some() && g2.is_some());
        let (mut c3, g3) = pair(&limit, &listener).await;
        assert!(g3.is_none());
        let mut buf = [0u8; 1];
        assert_eq!(c3.read(&mut buf).await.unwrap(), 0, "closed by the hub");
        assert_eq!(limit.open(), 2);
        drop(g1);
        assert_eq!(limit.open(), 1);
        let (_c4, g4) = pair(&limit, &listener).await;
        assert!(g4.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_connection_fails_its_reads_after_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = ConnLimit::grpc(4, Duration::from_secs(10));
        let (mut client, guarded) = pair(&limit, &listener).await;
        let mut guarded = guarded.unwrap();
        client.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        // Bytes alone are not a request: the read still fails in time.
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
        let start = Instant::now();
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_grpc_connection_has_no_idle_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = ConnLimit::grpc(4, Duration::from_secs(10));
        let (mut client, guarded) = pair(&limit, &listener).await;
        let mut guarded = guarded.unwrap();
        guarded.state.used.store(true, Ordering::Release);
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            guarded.read(&mut buf).await.map(|n| buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"late").await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"late");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_connection_is_closed_when_idle_between_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = ConnLimit::http(4, Duration::from_secs(10));
        let (_client, guarded) = pair(&limit, &listener).await;
        let mut guarded = guarded.unwrap();
        // A request (and its response body) for 30 s, then idle.
        let busy = Busy::start(guarded.state.clone());
        let request = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(busy);
        });
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        request.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(40) && waited <= Duration::from_secs(41),
            "{waited:?}"
        );
    }
}
