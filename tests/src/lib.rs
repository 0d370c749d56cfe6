//! Cross-crate integration tests of the agentpool workspace. The tests live in `tests/`; this
//! library is empty. Run them with `cargo xtask itest` (they also run in `cargo xtask ci`).
