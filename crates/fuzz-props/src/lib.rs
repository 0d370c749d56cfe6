//! The properties the fuzz targets in `fuzz/` check, one function per target, each taking the
//! fuzzer's raw bytes and panicking when a property fails (libFuzzer records a panic as a
//! crash). The same functions replay the committed corpora (`fuzz/corpus/<target>/`) as ordinary
//! tests on the stable toolchain (`tests/corpora.rs`), so `cargo test` checks every input a
//! fuzzing run found interesting without a fuzzer.
//!
//! Every target checks that nothing panics; beyond that:
//!
//! | target | what else it checks |
//! | --- | --- |
//! | `wire_decode` | `pool_api::wire`'s fast decoders agree with prost and the conversion |
//! | `uds_frames` | transport-uds's decoders: the read buffer never grows past what the frame limit allows, a frame over the limit is refused before it is buffered, frames come out whole |
//! | `grpc_messages` | transport-grpc's codecs agree with prost; every message the schema decodes converts, and what converts converts back to the same value |
//! | `acl` | docker-agent: a path the normaliser accepts reaches, on the engine, exactly the endpoint of the rule that allowed it — never one a built-in profile leaves out |
//! | `config_*` | each configuration parser: a parsed configuration validates without panicking and reads back the same after being written as TOML |
//! | `gateway_head` | the gateway's routing and upstream headers: whole-segment prefixes, no hop-by-hop header forwarded, every other header kept |
//! | `gateway_ws` | the gateway's WebSocket frame parser: the buffer never grows past the frame limit, frames re-encode to themselves |

mod acl;
mod config;
mod gateway;
mod transport;

pub use acl::acl;
pub use config::{config_docker_agent, config_gateway, config_httpserver, config_idlewatch, config_pool};
pub use gateway::{gateway_head, gateway_ws};
pub use transport::{grpc_messages, uds_frames, wire_decode};

/// A target's property: panics on an input that breaks it.
pub type Property = fn(&[u8]);

/// Every target: its name (the directory of its corpus, the binary `cargo xtask fuzz` builds)
/// and its property.
pub const TARGETS: &[(&str, Property)] = &[
    ("wire_decode", wire_decode),
    ("uds_frames", uds_frames),
    ("grpc_messages", grpc_messages),
    ("acl", acl),
    ("config_pool", config_pool),
    ("config_httpserver", config_httpserver),
    ("config_idlewatch", config_idlewatch),
    ("config_gateway", config_gateway),
    ("config_docker_agent", config_docker_agent),
    ("gateway_head", gateway_head),
    ("gateway_ws", gateway_ws),
];

/// The property of the target named `name`.
pub fn target(name: &str) -> Option<Property> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
