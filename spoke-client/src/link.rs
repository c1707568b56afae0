//! The current connection to a hub, shared by everything that calls it:
//! acks, progress reports, heartbeats and metric pushes. The reconnect loop
//! publishes a fresh authenticated client on each connect, with the ack
//! stream of that connection (`acks`), and clears it when the stream ends;
//! callers never wait for a connection, they get [`Error::NotConnected`]
//! and rely on the retry rules of their own kind.

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

use crate::acks::{Acks, Answer};
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

/// One connection: its authenticated client and its ack stream.
#[derive(Clone)]
pub(crate) struct Connection {
    rpc: Rpc,
    acks: Acks,
}

/// The current connection, if any; cheap to clone.
#[derive(Clone)]
pub(crate) struct Link {
    current: Arc<watch::Sender<Option<Connection>>>,
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

    /// Publishes a new connection, with an ack stream of its own.
    pub fn connect(&self, rpc: Rpc) {
        let acks = Acks::spawn(rpc.clone(), self.timeout);
        self.current.send_replace(Some(Connection { rpc, acks }));
    }

    /// Clears the connection; its ack stream ends once the acks sent on it
    /// are answered.
    pub fn disconnect(&self) {
        self.current.send_replace(None);
    }

    /// The connection's client, if any.
    pub fn current(&self) -> Option<Rpc> {
        self.current.borrow().as_ref().map(|c| c.rpc.clone())
    }

    /// Notified whenever the connection is published or cleared.
    pub fn subscribe(&self) -> watch::Receiver<Option<Connection>> {
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

    /// Sends an ack on the connection's ack stream, or with unary `Ack` to
    /// a hub without one; answers what unary `Ack` would.
    pub async fn ack(&self, ack: proto::AckRequest) -> Result<proto::AckResponse> {
        let conn = self.current.borrow().clone().ok_or(Error::NotConnected)?;
        let ack = match tokio::time::timeout(self.timeout, conn.acks.send(ack)).await {
            Ok(Answer::Hub(answer)) => return answer,
            Ok(Answer::Unary(ack)) => ack,
            Err(_) => {
                let late = format!("the hub did not answer the ack within {:?}", self.timeout);
                return Err(Status::deadline_exceeded(late).into());
            }
        };
        let mut rpc = conn.rpc;
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
