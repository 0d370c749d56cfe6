//! Generates the gRPC service code for `agentpool.v1.AgentService` from the one schema in
//! `pool-api`, with tonic's prost code generator fed by protox descriptors (no `protoc`). The
//! messages are not generated again: `extern_path` points them at `pool_api::proto`. The
//! encoded descriptor set is written next to the code for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() {
    const SCHEMA: &str = "../pool-api/proto/agentpool/v1/agent.proto";
    println!("cargo:rerun-if-changed={SCHEMA}");
    let descriptors = protox::compile(["agentpool/v1/agent.proto"], ["../pool-api/proto"])
        .unwrap_or_else(|e| panic!("cannot compile {SCHEMA}: {e}"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("agentpool_v1_descriptor.bin"), descriptors.encode_to_vec())
        .unwrap_or_else(|e| panic!("cannot write the descriptor set: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .extern_path(".agentpool.v1", "::pool_api::proto")
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate the service code for {SCHEMA}: {e}"));
}
