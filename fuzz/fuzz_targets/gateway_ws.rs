//! The `gateway_ws` fuzz target: [`fuzz_props::gateway_ws`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::gateway_ws(data));
