//! The `acl` fuzz target: [`fuzz_props::acl`] on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::acl(data));
