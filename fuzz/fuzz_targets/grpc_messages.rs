//! The `grpc_messages` fuzz target: [`fuzz_props::grpc_messages`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::grpc_messages(data));
