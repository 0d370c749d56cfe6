//! What the gateway's tests share: free ports and waiting for a started gateway to be ready.
#![allow(dead_code)] // each test file uses part of it

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free loopback port (bound and released: good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True if the admin listener at `admin` answers `/readyz` with 200.
pub async fn is_ready(admin: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(admin).await else { return false };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    raw.starts_with(b"HTTP/1.1 200")
}

/// Waits until the gateway's admin listener says ready; panics after 30 s.
pub async fn wait_ready(admin: &str) {
    for _ in 0..300 {
        if is_ready(admin).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway was not ready within 30 s");
}
