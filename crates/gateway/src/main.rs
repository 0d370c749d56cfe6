//! `gateway`: the reference reverse proxy of agentpool (see the library's docs:
//! [`gateway::main_from_args`] is the whole program).

/// mimalloc rather than the system allocator: a proxy allocates and frees small buffers and
/// header maps on every request, and glibc's malloc was ~9 % of the gateway's CPU time under
/// load (`perf`, see the README's numbers).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gateway::main_from_args(std::env::args_os())
}
