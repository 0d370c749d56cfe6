//! The gateway, built from the gateway crate's library exactly as its own binary is, so the
//! cross-crate tests can start it as a separate process (`CARGO_BIN_EXE_itest-gateway`).

fn main() -> std::process::ExitCode {
    gateway::main_from_args(std::env::args_os())
}
