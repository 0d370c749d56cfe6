//! What to do after a failed `accept(2)`: pure policy, driven by the accept loop.
//!
//! Errors that belong to one connection (reset or aborted before it was accepted, interrupted)
//! are retried at once. Everything else, above all running out of file descriptors
//! (EMFILE/ENFILE) or kernel memory, would fail again immediately, so the loop sleeps with an
//! exponential backoff (10 ms doubling to 1 s) that resets on the next success. It never spins.
//!
//! The delays come from [`backon`]'s `ExponentialBuilder` (factor 2, no attempt limit), the
//! back-off the rest of the workspace uses. There is no jitter: jitter spreads many clients of
//! one shared server apart, while these loops wait for their own process's file descriptors,
//! and a few of them retrying in step costs a few failed `accept` calls, no more. backon grows delays in `f32` seconds, so a grown delay can differ from
//! the exact power of two by well under a microsecond, far below the millisecond resolution of
//! tokio's timer that sleeps them.

use std::io;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

const FIRST: Duration = Duration::from_millis(10);
const MAX: Duration = Duration::from_secs(1);

const DELAYS: ExponentialBuilder =
    ExponentialBuilder::new().with_min_delay(FIRST).with_max_delay(MAX).with_factor(2.0).without_max_times();

/// Backoff state of one accept loop.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    /// The delays since the last success; `None` until an accept fails, so that a success, which
    /// comes with every connection, costs no more than a store.
    delays: Option<ExponentialBackoff>,
}

impl AcceptBackoff {
    /// A connection was accepted.
    pub(crate) fn reset(&mut self) {
        self.delays = None;
    }

    /// An accept failed: how long to pause before the next one (`None`: retry at once).
    pub(crate) fn on_error(&mut self, e: &io::Error) -> Option<Duration> {
        if per_connection(e) {
            return None;
        }
        // Without an attempt limit, backon's sequence never ends; MAX is the fallback all the same.
        Some(self.delays.get_or_insert_with(|| DELAYS.build()).next().unwrap_or(MAX))
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
        let want = [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000].map(Duration::from_millis);
        assert_eq!(delays.len(), want.len());
        for (got, want) in delays.iter().zip(want) {
            // backon grows delays in f32 seconds; compare to the microsecond.
            let got = got.expect("an fd error pauses the loop");
            assert!(got.abs_diff(want) < Duration::from_micros(1), "{got:?} is not {want:?}");
        }
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
