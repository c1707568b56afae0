//! The `hub.v1` contract: message types, the `SpokeService` and
//! `AdminService` clients and servers, and the file descriptor set that the
//! hub serves through gRPC reflection.
#![forbid(unsafe_code)]

pub mod json;
pub mod rules;

/// Package `hub.v1`, generated from `proto/hub/v1/*.proto`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/hub.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/hub.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the whole `hub.v1` contract, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hub_descriptor.bin"));
