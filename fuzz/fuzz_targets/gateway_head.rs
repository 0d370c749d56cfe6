//! The `gateway_head` fuzz target: [`fuzz_props::gateway_head`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::gateway_head(data));
