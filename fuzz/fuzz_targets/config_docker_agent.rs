//! The `config_docker_agent` fuzz target: [`fuzz_props::config_docker_agent`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::config_docker_agent(data));
