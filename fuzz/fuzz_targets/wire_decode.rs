//! The `wire_decode` fuzz target: [`fuzz_props::wire_decode`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::wire_decode(data));
