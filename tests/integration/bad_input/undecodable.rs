//! Bytes that are not the request's protobuf message, sent the way a broken
//! or hostile client would: framed as gRPC by a codec that sends raw bytes,
//! and not framed at all. Each is INVALID_ARGUMENT (tonic itself says
//! INTERNAL, which would blame the hub) and changes nothing.

use hub_proto::v1 as proto;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::{self, uri::PathAndQuery};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::snapshot;
use crate::support::*;

/// Sends each message's bytes as they are and gives back the reply's bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Not a protobuf message: a varint that never ends.
const GARBAGE: &[u8] = &[0xff; 12];

/// An AckRequest whose `directive_id` (field 1, a string) is not UTF-8.
const NOT_UTF8_ID: &[u8] = &[0x0a, 0x02, 0xff, 0xfe];

fn path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(method).unwrap()
}

async fn unary(
    channel: &Channel,
    method: &str,
    token: &str,
    body: &[u8],
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let req = authed(body.to_vec(), token);
    grpc.unary(req, path(method), Raw)
        .await
        .map(|r| r.into_inner())
}

/// A unary call whose body is not even gRPC-framed; the status is read
/// from the trailers-only reply's headers.
async fn unframed(channel: &Channel, method: &str, token: &str, body: &str) -> Option<String> {
    use tonic::codegen::Service;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://hub{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(body.to_owned()))
        .unwrap();
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let res = channel.call(req).await.unwrap();
    let status = res.headers().get("grpc-status")?;
    Some(status.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_and_change_nothing() {
    let hub = TestHub::start().await;
    let spoke = hub.register("alice", &["t"], &[]).await;
    let sent = hub.send("alice", "t", serde_json::json!({})).await;
    let before = snapshot(&hub).await;
    let channel = hub.channel().await;

    // Unary calls, on both services.
    assert_code(
        unary(
            &channel,
            "/hub.v1.SpokeService/Register",
            ENROLLMENT_TOKEN,
            GARBAGE,
        )
        .await,
        Code::InvalidArgument,
        "decode",
    );
    assert_code(
        unary(
            &channel,
            "/hub.v1.AdminService/CreateDirective",
            ADMIN_TOKEN,
            GARBAGE,
        )
        .await,
        Code::InvalidArgument,
        "decode",
    );
    // A string field that is not UTF-8: the message names the field.
    assert_code(
        unary(
            &channel,
            "/hub.v1.SpokeService/Ack",
            &spoke.key,
            NOT_UTF8_ID,
        )
        .await,
        Code::InvalidArgument,
        "directive_id",
    );
    // The unary request of a server stream.
    assert_code(
        unary(
            &channel,
            "/hub.v1.SpokeService/WatchDirectives",
            &spoke.key,
            GARBAGE,
        )
        .await,
        Code::InvalidArgument,
        "decode",
    );
    // Not a gRPC frame at all ('g' is no compression flag), and a body that
    // ends inside a frame's header.
    for body in ["garbage", "\0\0"] {
        let status = unframed(
            &channel,
            "/hub.v1.SpokeService/Register",
            ENROLLMENT_TOKEN,
            body,
        )
        .await;
        assert_eq!(status.as_deref(), Some("3"), "body {body:?}");
    }

    // Client streaming: PushMetrics.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let batches = tokio_stream::iter(vec![GARBAGE.to_vec()]);
    let pushed = grpc
        .client_streaming(
            authed(batches, &spoke.key),
            path("/hub.v1.SpokeService/PushMetrics"),
            Raw,
        )
        .await;
    assert_code(pushed, Code::InvalidArgument, "decode");

    // Bidirectional streaming: AckStream ends with the status.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let acks = tokio_stream::iter(vec![NOT_UTF8_ID.to_vec()]);
    let answers = grpc
        .streaming(
            authed(acks, &spoke.key),
            path("/hub.v1.SpokeService/AckStream"),
            Raw,
        )
        .await;
    let ended = match answers {
        Ok(res) => res.into_inner().message().await,
        Err(status) => Err(status),
    };
    assert_code(ended, Code::InvalidArgument, "directive_id");

    let after = snapshot(&hub).await;
    assert_eq!(before, after, "nothing changed");
    let directive = hub.directive(&sent.id).await;
    assert_eq!(directive.state, proto::DirectiveState::Pending as i32);
}
