//! Accepting connections without spinning.
//!
//! `accept` fails for two kinds of reason. Some concern only the connection being accepted (the client
//! reset it while it waited in the backlog): the next one may be fine, so try again at once. Others concern
//! the process or the system (`EMFILE`/`ENFILE`: out of file descriptors; `ENOBUFS`/`ENOMEM`): the same
//! call will fail again immediately, and retrying in a loop burns a core while the backlog waits. Those back
//! off, 5 ms doubling to 1 s (as Go's `net/http` does), and are logged at most once per ten seconds.

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::net::throttle::Throttle;

const FIRST: Duration = Duration::from_millis(5);
const MOST: Duration = Duration::from_secs(1);

/// Whether an accept error concerns only the connection that was being accepted.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(code) if code == nix::libc::EPROTO || code == nix::libc::EPERM)
}

/// The backoff state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Option<Duration>,
    log: Throttle,
}

impl AcceptBackoff {
    /// For the listener `what` ("SDS", "admin", "HTTP-01"), named in the log.
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            delay: None,
            log: Throttle::default(),
        }
    }

    /// A connection was accepted: failures start over from the shortest delay.
    pub fn accepted(&mut self) {
        self.delay = None;
    }

    /// `accept` failed with `e`: returns at once for a per-connection error, otherwise after the next
    /// backoff delay (or when `shutdown` is cancelled).
    pub async fn failed(&mut self, e: &io::Error, shutdown: &CancellationToken) {
        if per_connection(e) {
            return;
        }
        let delay = self.delay.map_or(FIRST, |d| (d * 2).min(MOST));
        self.delay = Some(delay);
        if let Some(held_back) = self.log.allow() {
            tracing::warn!(
                listener = self.what,
                error = %e,
                retry_in = ?delay,
                held_back,
                "accepting connections failed; backing off (raise the open-files limit if this says \"Too many open files\")"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn process_errors_back_off_and_connection_errors_do_not() {
        let token = CancellationToken::new();
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let start = tokio::time::Instant::now();
        b.failed(&io::Error::from(io::ErrorKind::ConnectionAborted), &token)
            .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            b.failed(&emfile, &token).await;
        }
        // 5+10+20+...+640 ms, then 1 s each: far from a spin, bounded per attempt.
        assert_eq!(b.delay, Some(MOST));
        assert!(
            start.elapsed() >= Duration::from_millis(2_275),
            "{:?}",
            start.elapsed()
        );
        b.accepted();
        let t = tokio::time::Instant::now();
        b.failed(&emfile, &token).await;
        assert_eq!(t.elapsed(), FIRST);
    }
}
