//! The `docker-agent` program (being written).
fn main() {}
