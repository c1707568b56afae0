//! Message-size limits: tonic answers an oversized request with OUT_OF_RANGE,
//! while the contract (and gRPC's own guidance) says RESOURCE_EXHAUSTED. This
//! layer rewrites that one status on trailers-only responses, which is how
//! unary calls fail before reaching the service; streaming calls map it
//! where they read their messages.

use http::{HeaderValue, Response};
use tonic::{Code, Status};

const TOO_LARGE: &str = "message length too large";

/// Whether `status` is tonic's "message too large" decode error.
pub fn is_too_large(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains(TOO_LARGE)
}

/// Maps tonic's size error to RESOURCE_EXHAUSTED; other statuses unchanged.
pub fn map_status(status: Status) -> Status {
    if is_too_large(&status) {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// Rewrites a trailers-only OUT_OF_RANGE size error to RESOURCE_EXHAUSTED.
pub fn map_response<B>(mut res: Response<B>) -> Response<B> {
    let headers = res.headers_mut();
    let is_out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if is_out_of_range {
        let too_large = headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains(TOO_LARGE));
        if too_large {
            headers.insert("grpc-status", HeaderValue::from_static("8"));
        }
    }
    res
}
