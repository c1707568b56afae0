//! Generates the `hub.v1` types and gRPC stubs from `proto/`.
//!
//! Uses the pure-Rust `protox` compiler so building needs no system `protoc`,
//! and writes the file descriptor set to `OUT_DIR` for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/hub/v1/types.proto",
        "proto/hub/v1/spoke.proto",
        "proto/hub/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = fds.encode_to_vec();
    std::fs::write(out_dir.join("hub_descriptor.bin"), &descriptor)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    // proto3 JSON mapping (camelCase names, enum names, RFC 3339 times) for
    // `--json` output and for anything that speaks JSON to the hub.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .build(&[".hub.v1"])?;
    Ok(())
}
