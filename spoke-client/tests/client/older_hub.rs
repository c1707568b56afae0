//! "An older hub": the real hub behind a gRPC front that answers
//! UNIMPLEMENTED for `SpokeService/AckStream`, as a hub built before that
//! method does, and forwards every other SpokeService call unchanged. On
//! request it also refuses unary acks with FAILED_PRECONDITION, as a hub
//! that did not take a late final ack did, without forwarding them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::net::TcpListener;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

/// The method the front refuses.
const ACK_STREAM: &str = "/hub.v1.SpokeService/AckStream";
/// The method it refuses while told to.
const ACK: &str = "/hub.v1.SpokeService/Ack";

/// The front; dropping it stops serving.
pub struct OlderHub {
    pub addr: SocketAddr,
    refused: Arc<AtomicUsize>,
    refusing_acks: Arc<AtomicBool>,
    refused_acks: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl OlderHub {
    /// Serves on a fresh port, forwarding to the hub at `upstream` (a URL).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(AtomicUsize::new(0));
        let refusing_acks = Arc::new(AtomicBool::new(false));
        let refused_acks = Arc::new(AtomicUsize::new(0));
        let front = Front {
            upstream: Channel::from_shared(upstream.to_owned())
                .unwrap()
                .connect_lazy(),
            refused: refused.clone(),
            refusing_acks: refusing_acks.clone(),
            refused_acks: refused_acks.clone(),
        };
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(front)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .expect("the front serves");
        });
        Self {
            addr,
            refused,
            refusing_acks,
            refused_acks,
            task,
        }
    }

    /// From now on (`true`) or no longer, answer every `Ack` with
    /// FAILED_PRECONDITION; the hub behind never sees them.
    pub fn refuse_acks(&self, refuse: bool) {
        self.refusing_acks.store(refuse, Ordering::SeqCst);
    }

    /// How many `Ack` calls it refused.
    pub fn refused_acks(&self) -> usize {
        self.refused_acks.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many AckStream calls it answered UNIMPLEMENTED.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for OlderHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Front {
    upstream: Channel,
    refused: Arc<AtomicUsize>,
    refusing_acks: Arc<AtomicBool>,
    refused_acks: Arc<AtomicUsize>,
}

impl NamedService for Front {
    const NAME: &'static str = "hub.v1.SpokeService";
}

impl Service<http::Request<Body>> for Front {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == ACK_STREAM {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        if req.uri().path() == ACK && self.refusing_acks.load(Ordering::SeqCst) {
            self.refused_acks.fetch_add(1, Ordering::SeqCst);
            let late = Status::failed_precondition(
                "directive is PENDING: it is not delivered to this spoke right now",
            );
            return Box::pin(async move { Ok(late.into_http()) });
        }
        let mut upstream = self.upstream.clone();
        Box::pin(async move {
            let forwarded = async {
                std::future::poll_fn(|cx| upstream.poll_ready(cx)).await?;
                upstream.call(req).await
            };
            Ok(forwarded
                .await
                .unwrap_or_else(|e| Status::unavailable(format!("hub: {e}")).into_http()))
        })
    }
}
