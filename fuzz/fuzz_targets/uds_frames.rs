//! The `uds_frames` fuzz target: [`fuzz_props::uds_frames`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::uds_frames(data));
