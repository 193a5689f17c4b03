//! When to renew and when to retry.
//!
//! Renewal follows Let's Encrypt's guidance rather than a fixed "30 days before": the CA's ARI window when it
//! offers one; otherwise when a third of the lifetime remains (half, for certificates valid under 10 days),
//! less a little jitter so that a fleet does not renew in lock-step. The jitter (and the point chosen in an
//! ARI window) is drawn from the certificate itself, not from a random source: a fleet's certificates are
//! spread as before, while one certificate's plan stays put however often it is computed, so that the
//! daemon, its stored state and `acme-sds status` read offline all name the same instant. That works for 90-day, 45-day and 6-day
//! certificates alike. Retries after failures grow (doubling from `retry_initial`, capped at `retry_max`,
//! jittered) and never come sooner than a CA's Retry-After.

use std::time::Duration;

use rand::Rng;
use time::OffsetDateTime;

/// A number in [0, 1] drawn from `seed` (a certificate's serial or DER): the same seed, the same number.
fn fraction(seed: &[u8]) -> f64 {
    let d = ring::digest::digest(&ring::digest::SHA256, seed);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b) as f64 / u64::MAX as f64
}

/// The lifetime rule: renew when 1/3 of the lifetime remains (1/2 under 10 days), minus up to 5% jitter
/// drawn from `seed` (the certificate's serial).
pub fn lifetime_renewal(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    seed: &[u8],
) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    if lifetime <= time::Duration::ZERO {
        return OffsetDateTime::now_utc();
    }
    let remaining = if lifetime < time::Duration::days(10) {
        lifetime / 2_i32
    } else {
        lifetime / 3_i32
    };
    let jitter_max = (lifetime / 20_i32).whole_milliseconds().max(0) as f64;
    let jitter = (jitter_max * fraction(seed)) as i64;
    whole_second(not_after - remaining - time::Duration::milliseconds(jitter))
}

/// A plan to the second, as it is stored.
fn whole_second(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// An instant in an ARI suggested window, drawn from `seed` (the certificate's DER).
pub fn in_window(start: OffsetDateTime, end: OffsetDateTime, seed: &[u8]) -> OffsetDateTime {
    let span = (end - start).whole_milliseconds();
    if span <= 0 {
        return start;
    }
    whole_second(start + time::Duration::milliseconds((span as f64 * fraction(seed)) as i64))
}

/// The delay before retry number `failures` (1-based).
pub fn retry_delay(
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp.min(20)).min(max);
    // Full jitter over the upper half: between 50% and 100% of the base delay.
    let ms = base.as_millis().max(1) as u64;
    let jittered = Duration::from_millis(rand::rng().random_range(ms / 2..=ms).max(1));
    let floor = Duration::from_secs(1);
    jittered.max(retry_after.unwrap_or_default()).max(floor)
}

/// "in 3 days", "in 5 hours", "in 42 seconds".
pub fn describe_in(d: time::Duration) -> String {
    if d.whole_days() >= 2 {
        format!("in {} days", d.whole_days())
    } else if d.whole_hours() >= 2 {
        format!("in {} hours", d.whole_hours())
    } else if d.whole_minutes() >= 2 {
        format!("in {} minutes", d.whole_minutes())
    } else {
        format!("in {} seconds", d.whole_seconds().max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(days)
    }

    #[test]
    fn renews_with_a_third_left_for_long_and_half_for_short_lifetimes() {
        for (lifetime_days, left_days) in [(90, 30.0), (45, 15.0)] {
            let r = lifetime_renewal(at(0), at(lifetime_days), b"01:02");
            let left = (at(lifetime_days) - r).as_seconds_f64() / 86400.0;
            let jitter = lifetime_days as f64 / 20.0;
            assert!(
                left >= left_days && left <= left_days + jitter,
                "{lifetime_days}: {left}"
            );
        }
        // 6-day certificate: half its life.
        let r = lifetime_renewal(at(0), at(6), b"01:02");
        let left = (at(6) - r).as_seconds_f64() / 86400.0;
        assert!((3.0..=3.3).contains(&left), "{left}");
    }

    #[test]
    fn retries_grow_are_capped_and_honour_retry_after() {
        let i = Duration::from_secs(60);
        let m = Duration::from_secs(3600);
        let d1 = retry_delay(1, i, m, None);
        assert!(d1 >= Duration::from_secs(30) && d1 <= i);
        let d3 = retry_delay(3, i, m, None);
        assert!(d3 >= Duration::from_secs(120) && d3 <= Duration::from_secs(240));
        let d20 = retry_delay(20, i, m, None);
        assert!(d20 <= m && d20 >= m / 2);
        let ra = retry_delay(1, i, m, Some(Duration::from_secs(7200)));
        assert_eq!(ra, Duration::from_secs(7200));
        assert!(retry_delay(1, Duration::from_millis(1), m, None) >= Duration::from_secs(1));
    }

    #[test]
    fn window_pick_stays_inside() {
        let p = in_window(at(1), at(2), b"cert");
        assert!(p >= at(1) && p <= at(2));
    }

    #[test]
    fn one_certificate_one_plan_and_a_fleet_spread() {
        let plan = |serial: &str| lifetime_renewal(at(0), at(90), serial.as_bytes());
        assert_eq!(
            plan("0a:0b"),
            plan("0a:0b"),
            "computed again, the same instant"
        );
        let spread: std::collections::HashSet<OffsetDateTime> =
            (0..50).map(|i| plan(&format!("{i:02x}"))).collect();
        assert!(spread.len() > 45, "a fleet does not renew in lock-step");
    }
}
