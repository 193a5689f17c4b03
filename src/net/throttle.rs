//! Throttling for log lines that a misbehaving client could otherwise repeat at will.
//!
//! A refused connection, a stream over quota or a failing `accept` can happen thousands of times a second;
//! logging each would turn one bad client into a disk-filling, log-drowning problem. A [`Throttle`] lets one
//! line through per interval and says how many were held back in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per interval. Lock-free; share it by reference.
#[derive(Debug)]
pub struct Throttle {
    start: Instant,
    interval_ms: u64,
    /// Milliseconds after `start` when the next line may go out (0: at once).
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle {
            start: Instant::now(),
            interval_ms: interval.as_millis().max(1) as u64,
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` being how many were held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        // Pretend the interval passed.
        t.next.store(0, Ordering::Relaxed);
        assert_eq!(t.allow(), Some(2));
    }
}
