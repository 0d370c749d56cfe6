//! The `config_idlewatch` fuzz target: [`fuzz_props::config_idlewatch`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::config_idlewatch(data));
