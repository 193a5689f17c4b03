//! Compiles the Envoy SDS proto subset in `proto/` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs only cargo: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "envoy/service/secret/v3/sds.proto",
            "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The client (for tests and the benchmark) is generic over any gRPC transport: the daemon itself
        // never dials out over gRPC, so it does not build tonic's transport (or the router under it).
        .build_transport(false)
        // Our own google.protobuf.Any, so that `bytes` fields below apply to it too.
        .compile_well_known_types(true)
        // `Bytes` for every bytes field: an encoded Secret inside an Any is shared by reference count.
        .bytes(".")
        // Small per-stream buffers: see src/sds/codec.rs.
        .codec_path("crate::sds::codec::SdsCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
