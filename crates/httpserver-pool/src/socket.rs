//! Creating listening sockets with the configured options (socket2), and per-connection options.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::SocketOptions;

/// Creates, configures, binds and listens. Returns only once the kernel accepts connections.
pub(crate) fn bind_socket(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(opts.reuse_address)?;
    #[cfg(unix)]
    socket.set_reuse_port(opts.reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(opts.backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Options applied to every accepted connection.
pub(crate) fn configure_stream(stream: &tokio::net::TcpStream, opts: &SocketOptions) -> io::Result<()> {
    stream.set_nodelay(opts.nodelay)
}

/// Closes a connection with a TCP reset (`SO_LINGER` 0): the client learns at once that it was
/// refused, and no TIME_WAIT is left behind on the server for it.
pub(crate) fn reset(stream: tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER on a refused connection");
    }
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn reuse_address_is_set_as_configured() {
        for on in [true, false] {
            let opts = SocketOptions { reuse_address: on, ..SocketOptions::default() };
            assert_eq!(bind_socket(loopback(), &opts).unwrap().reuse_address().unwrap(), on);
        }
    }

    #[cfg(unix)]
    #[test]
    fn reuse_port_is_set_as_configured() {
        for on in [true, false] {
            let opts = SocketOptions { reuse_port: on, ..SocketOptions::default() };
            assert_eq!(bind_socket(loopback(), &opts).unwrap().reuse_port().unwrap(), on);
        }
    }

    #[tokio::test]
    async fn nodelay_is_applied_to_accepted_connections() {
        for on in [true, false] {
            let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
            let (accepted, _client) = tokio::join!(listener.accept(), client);
            let (stream, _) = accepted.unwrap();
            configure_stream(&stream, &SocketOptions { nodelay: on, ..SocketOptions::default() }).unwrap();
            assert_eq!(stream.nodelay().unwrap(), on);
        }
    }

    #[tokio::test]
    async fn the_backlog_bounds_the_queue_of_unaccepted_connections() {
        // Linux queues backlog + 1 connections that nobody accepts; further SYNs are dropped,
        // so a connect to a backlog-1 listener that never accepts stalls while a large backlog
        // takes them all.
        async fn connected(backlog: u32) -> usize {
            let socket =
                bind_socket(loopback(), &SocketOptions { backlog, ..SocketOptions::default() }).unwrap();
            let addr = socket.local_addr().unwrap().as_socket().unwrap();
            let mut ok = 0;
            let mut keep = Vec::new();
            for _ in 0..8 {
                let attempt = tokio::net::TcpStream::connect(addr);
                if let Ok(Ok(s)) = tokio::time::timeout(std::time::Duration::from_millis(300), attempt).await
                {
                    ok += 1;
                    keep.push(s);
                }
            }
            ok
        }
        assert_eq!(connected(64).await, 8);
        assert!(connected(1).await < 8);
    }
}
