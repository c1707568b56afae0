//! Statuses tonic gives for requests it could not read, mapped to what the
//! contract says. tonic answers an oversized request with OUT_OF_RANGE,
//! while the contract (and gRPC's own guidance) says RESOURCE_EXHAUSTED; and
//! it answers bytes that are not the request's protobuf message (or not
//! gRPC frames at all) with INTERNAL, which blames the hub for the caller's
//! bad input: the contract says INVALID_ARGUMENT.
//!
//! [`map_response`] rewrites these on trailers-only responses, which is how
//! unary calls (and the request of a server stream) fail before reaching
//! the service; streaming calls map them with [`map_status`] where they
//! read their messages.

use http::{HeaderValue, Response};
use tonic::{Code, Status};

const TOO_LARGE: &str = "message length too large";

/// How tonic (and prost under it) begin the INTERNAL messages of a request
/// it could not read: an undecodable message (prost, which names the field
/// when a nested value is bad, e.g. `AckRequest.directive_id: invalid
/// string value`), a bad frame header, a body that ends inside a frame, an
/// empty unary body.
const UNREADABLE: [&str; 4] = [
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// Whether `status` is tonic's "message too large" decode error.
pub fn is_too_large(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains(TOO_LARGE)
}

/// Whether `status` is tonic's error for a request it could not decode.
pub fn is_undecodable(status: &Status) -> bool {
    status.code() == Code::Internal
        && UNREADABLE
            .iter()
            .any(|prefix| status.message().starts_with(prefix))
}

/// Maps tonic's size error to RESOURCE_EXHAUSTED and its decode errors to
/// INVALID_ARGUMENT; other statuses unchanged.
pub fn map_status(status: Status) -> Status {
    if is_too_large(&status) {
        Status::resource_exhausted(status.message().to_owned())
    } else if is_undecodable(&status) {
        Status::invalid_argument(status.message().to_owned())
    } else {
        status
    }
}

/// Rewrites the code of a trailers-only response as [`map_status`] would.
pub fn map_response<B>(mut res: Response<B>) -> Response<B> {
    // Only OUT_OF_RANGE (11) and INTERNAL (13) may change; a successful
    // response carries no grpc-status in its headers at all.
    let candidate = res
        .headers()
        .get("grpc-status")
        .is_some_and(|v| matches!(v.as_bytes(), b"11" | b"13"));
    if !candidate {
        return res;
    }
    // tonic keeps the status it answered with as an extension (message
    // not yet percent-encoded); the headers are read only without one.
    let status = match res.extensions().get::<Status>() {
        Some(status) => status.clone(),
        None => match Status::from_header_map(res.headers()) {
            Some(status) => status,
            None => return res,
        },
    };
    let code = status.code();
    let mapped = map_status(status);
    if mapped.code() != code {
        res.headers_mut()
            .insert("grpc-status", HeaderValue::from(mapped.code() as i32));
        if let Some(kept) = res.extensions_mut().get_mut::<Status>() {
            *kept = mapped;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_only(status: &Status) -> Response<()> {
        status.clone().into_http()
    }

    fn code_of(res: &Response<()>) -> Code {
        Status::from_header_map(res.headers()).unwrap().code()
    }

    #[test]
    fn tonic_read_errors_get_the_contract_codes() {
        let cases = [
            (
                Status::internal("failed to decode Protobuf message: invalid varint"),
                Code::InvalidArgument,
            ),
            (
                Status::internal(
                    "protocol error: received message with invalid compression flag: 103 (valid flags are 0 and 1), while sending request",
                ),
                Code::InvalidArgument,
            ),
            (
                Status::internal("Unexpected EOF decoding stream."),
                Code::InvalidArgument,
            ),
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
                ),
                Code::ResourceExhausted,
            ),
            // The hub's own errors are left alone.
            (Status::internal("internal error"), Code::Internal),
            (Status::out_of_range("after_sequence"), Code::OutOfRange),
            (Status::not_found("x"), Code::NotFound),
        ];
        for (status, want) in cases {
            let res = map_response(trailers_only(&status));
            assert_eq!(code_of(&res), want, "{status:?}");
            let mapped = map_status(status.clone());
            assert_eq!(mapped.code(), want, "{status:?}");
            assert_eq!(mapped.message(), status.message());
        }
        // Without tonic's extension, the headers are read.
        let mut bare = trailers_only(&Status::internal("Unexpected EOF decoding stream."));
        bare.extensions_mut().clear();
        assert_eq!(code_of(&map_response(bare)), Code::InvalidArgument);
        let ok = map_response(Response::new(()));
        assert!(ok.headers().get("grpc-status").is_none());
    }
}
