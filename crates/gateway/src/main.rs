//! `gateway`: the reference reverse proxy of agentpool (see the library's docs:
//! [`gateway::main_from_args`] is the whole program).

fn main() -> std::process::ExitCode {
    gateway::main_from_args(std::env::args_os())
}
