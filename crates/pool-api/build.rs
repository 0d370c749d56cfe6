//! Compiles the protocol schema when the `proto` feature is on. protox parses the `.proto`
//! in pure Rust, so no `protoc` is needed on the build machine.

fn main() {
    #[cfg(feature = "proto")]
    compile_schema();
}

#[cfg(feature = "proto")]
fn compile_schema() {
    const SCHEMA: &str = "proto/agentpool/v1/agent.proto";
    println!("cargo:rerun-if-changed={SCHEMA}");
    let descriptors =
        protox::compile([SCHEMA], ["proto"]).unwrap_or_else(|e| panic!("cannot compile {SCHEMA}: {e}"));
    prost_build::Config::new()
        // `bytes` fields become `Bytes`: bodies travel without copies.
        .bytes(["."])
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate code for {SCHEMA}: {e}"));
}
