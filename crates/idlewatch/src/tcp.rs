//! The TCP helper: a new connection is held until the workload is ready, then spliced to it;
//! the open stream counts as activity for its whole life, both directions included.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional};
use tokio::net::TcpStream;

use crate::error::WakeError;
use crate::watcher::IdleWatcher;

/// Serves one inbound connection: counts it as activity, wakes the workload (bounded by the
/// wake time-out), connects to `upstream` (`host:port`) and copies bytes both ways until either
/// side closes. Returns the bytes copied (inbound → upstream, upstream → inbound).
///
/// A failed wake is an [`io::Error`] of kind [`TimedOut`](io::ErrorKind::TimedOut) (for
/// [`WakeError::Timeout`]) or [`Other`](io::ErrorKind::Other), with the [`WakeError`] as its
/// source; the inbound stream is then dropped (closed) without a byte sent.
pub async fn splice<S>(watcher: &IdleWatcher, mut inbound: S, upstream: &str) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _activity = watcher.activity();
    if !watcher.is_ready() {
        watcher.wake().await.map_err(|error| {
            let kind = match error {
                WakeError::Timeout { .. } => io::ErrorKind::TimedOut,
                _ => io::ErrorKind::Other,
            };
            io::Error::new(kind, error)
        })?;
    }
    let mut outbound = TcpStream::connect(upstream).await?;
    copy_bidirectional(&mut inbound, &mut outbound).await
}
