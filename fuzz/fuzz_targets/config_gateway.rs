//! The `config_gateway` fuzz target: [`fuzz_props::config_gateway`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::config_gateway(data));
