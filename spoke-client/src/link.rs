//! The current connection to a hub, shared by everything that calls it:
//! acks, progress reports, heartbeats and metric pushes. The reconnect loop
//! publishes a fresh authenticated client on each connect and clears it when
//! the stream ends; callers never wait for a connection, they get
//! [`Error::NotConnected`] and rely on the retry rules of their own kind.

use std::sync::Arc;
use std::time::Duration;

use hub_proto::v1 as proto;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::error::{Error, Result};

/// A SpokeService client that sends `authorization: Bearer <secret>`.
pub(crate) type Rpc = SpokeServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds the bearer secret (enrollment token or spoke key) to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// A bearer for `secret`; refused if it cannot be a header value.
    pub fn new(secret: &str) -> Result<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {secret}")
            .parse()
            .map_err(|_| Error::config("enrollment_token", "not a valid header value"))?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A client for `channel` authenticated with `secret`.
pub(crate) fn rpc(channel: Channel, secret: &str) -> Result<Rpc> {
    Ok(SpokeServiceClient::with_interceptor(
        channel,
        Bearer::new(secret)?,
    ))
}

/// The current connection, if any; cheap to clone.
#[derive(Clone)]
pub(crate) struct Link {
    current: Arc<watch::Sender<Option<Rpc>>>,
    timeout: Duration,
}

impl Link {
    /// No connection yet; unary calls time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            current: Arc::new(watch::Sender::new(None)),
            timeout,
        }
    }

    /// Publishes (or clears) the connection.
    pub fn set(&self, rpc: Option<Rpc>) {
        self.current.send_replace(rpc);
    }

    /// The connection, if any.
    pub fn current(&self) -> Option<Rpc> {
        self.current.borrow().clone()
    }

    /// Notified whenever the connection is published or cleared.
    pub fn subscribe(&self) -> watch::Receiver<Option<Rpc>> {
        self.current.subscribe()
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.timeout);
        req
    }

    fn connected(&self) -> Result<Rpc> {
        self.current().ok_or(Error::NotConnected)
    }

    /// Sends an ack.
    pub async fn ack(&self, ack: proto::AckRequest) -> Result<proto::AckResponse> {
        let mut rpc = self.connected()?;
        Ok(rpc.ack(self.request(ack)).await?.into_inner())
    }

    /// Sends a heartbeat; answers the next interval.
    pub async fn heartbeat(
        &self,
        beat: proto::HeartbeatRequest,
    ) -> Result<proto::HeartbeatResponse, Status> {
        let mut rpc = self
            .current()
            .ok_or_else(|| Status::unavailable("not connected"))?;
        Ok(rpc.heartbeat(self.request(beat)).await?.into_inner())
    }

    /// Pushes one metric batch in its own PushMetrics call.
    pub async fn push(&self, batch: proto::PushMetricsRequest) -> Result<proto::BatchResult> {
        let mut rpc = self.connected()?;
        let id = batch.batch_id.clone();
        let call = self.request(futures_util::stream::iter([batch]));
        let reply = rpc.push_metrics(call).await?.into_inner();
        reply
            .batches
            .into_iter()
            .find(|b| b.batch_id == id)
            .ok_or_else(|| {
                Error::Status(Box::new(Status::internal(
                    "the hub's reply lacks the batch",
                )))
            })
    }
}
