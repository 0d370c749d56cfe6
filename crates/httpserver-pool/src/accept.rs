//! What to do after a failed `accept(2)`: pure policy, driven by the accept loop.
//!
//! Errors that belong to one connection (reset or aborted before it was accepted, interrupted)
//! are retried at once. Everything else, above all running out of file descriptors
//! (EMFILE/ENFILE) or kernel memory, would fail again immediately, so the loop sleeps with an
//! exponential backoff (10 ms doubling to 1 s) that resets on the next success. It never spins.

use std::io;
use std::time::Duration;

const FIRST: Duration = Duration::from_millis(10);
const MAX: Duration = Duration::from_secs(1);

/// Backoff state of one accept loop.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// A connection was accepted.
    pub(crate) fn reset(&mut self) {
        self.next = None;
    }

    /// An accept failed: how long to pause before the next one (`None`: retry at once).
    pub(crate) fn on_error(&mut self, e: &io::Error) -> Option<Duration> {
        if per_connection(e) {
            return None;
        }
        let delay = self.next.unwrap_or(FIRST);
        self.next = Some((delay * 2).min(MAX));
        Some(delay)
    }
}

fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;

    #[test]
    fn fd_exhaustion_backs_off_exponentially_up_to_one_second() {
        let mut b = AcceptBackoff::default();
        let delays: Vec<_> = (0..10)
            .map(|i| b.on_error(&io::Error::from_raw_os_error(if i % 2 == 0 { EMFILE } else { ENFILE })))
            .collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.unwrap().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }

    #[test]
    fn a_success_resets_the_backoff() {
        let mut b = AcceptBackoff::default();
        b.on_error(&io::Error::from_raw_os_error(EMFILE));
        b.on_error(&io::Error::from_raw_os_error(EMFILE));
        b.reset();
        assert_eq!(b.on_error(&io::Error::from_raw_os_error(EMFILE)), Some(FIRST));
    }

    #[test]
    fn errors_of_one_connection_are_retried_at_once() {
        let mut b = AcceptBackoff::default();
        assert_eq!(b.on_error(&io::Error::from(io::ErrorKind::ConnectionAborted)), None);
        assert_eq!(b.on_error(&io::Error::from(io::ErrorKind::Interrupted)), None);
    }
}
