//! The `config_httpserver` fuzz target: [`fuzz_props::config_httpserver`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::config_httpserver(data));
