//! The shutdown signal handlers find in request extensions.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

/// Tells a handler that its server began a graceful stop, and until when it may run.
///
/// Every request carries one in its extensions (`req.extensions().get::<ShutdownSignal>()`).
/// Long-lived responses (server-sent events, WebSockets after an upgrade) should watch it and end
/// themselves: the server waits for them until the stop deadline, then closes their sockets.
/// Upgraded connections count in the drain for as long as the upgraded I/O object is alive.
///
/// Cloning is one reference-count increment: each connection makes one signal and every
/// request on it gets a clone.
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    // Shared per connection, so that the per-request clone touches neither the server's stop
    // channel (two counts shared by every connection) nor another connection's cache line.
    rx: Arc<watch::Receiver<Option<Instant>>>,
}

impl ShutdownSignal {
    pub(crate) fn new(rx: watch::Receiver<Option<Instant>>) -> Self {
        ShutdownSignal { rx: Arc::new(rx) }
    }

    /// True once the stop began.
    pub fn is_triggered(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// The hard deadline of the stop, once it began.
    pub fn deadline(&self) -> Option<Instant> {
        *self.rx.borrow()
    }

    /// Completes when the stop begins (at once if it already has), giving the deadline.
    /// If the server is dropped without a stop, this completes at the drop with no deadline.
    pub async fn triggered(&self) -> Option<Instant> {
        let mut rx = watch::Receiver::clone(&self.rx);
        match rx.wait_for(Option::is_some).await {
            Ok(deadline) => *deadline,
            Err(_) => None,
        }
    }
}
