//! Compile the Open Inference Protocol's gRPC definition (`proto/grpc_predict_v2.proto`) into
//! Rust: protox parses it (no protoc needed), tonic-prost-build writes the messages and the
//! server trait.

fn main() {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    let descriptors = match protox::compile(["grpc_predict_v2.proto"], ["proto"]) {
        Ok(d) => d,
        Err(e) => panic!("proto/grpc_predict_v2.proto: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)
    {
        panic!("generating the gRPC code: {e}");
    }
}
