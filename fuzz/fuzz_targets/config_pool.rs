//! The `config_pool` fuzz target: [`fuzz_props::config_pool`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::config_pool(data));
