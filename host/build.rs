//! Compile the gRPC definitions in `proto/` into Rust: the Open Inference Protocol's
//! (`grpc_predict_v2.proto`) and TorchServe's (`torchserve_inference.proto`,
//! `torchserve_management.proto`, with the `google/rpc/status.proto` they use). protox parses
//! them (no protoc needed), tonic-prost-build writes the messages and the server traits.

const PROTOS: [&str; 4] = [
    "grpc_predict_v2.proto",
    "torchserve_inference.proto",
    "torchserve_management.proto",
    "google/rpc/status.proto",
];

fn main() {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let descriptors = match protox::compile(PROTOS, ["proto"]) {
        Ok(d) => d,
        Err(e) => panic!("proto/: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)
    {
        panic!("generating the gRPC code: {e}");
    }
}
