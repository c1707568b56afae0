//! The Rust library every spoke uses to talk to the hub.
//!
//! Its behaviour lands with the spoke-client issue; for now it re-exports the
//! generated `hub.v1` contract so spokes can already depend on one crate.
#![forbid(unsafe_code)]

pub use hub_proto as proto;
