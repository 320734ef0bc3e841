//! The one backoff of vppd: exponential, capped, with jitter, so that many
//! retrying tasks do not fall into step.
//!
//! Built on the `backoff` crate, confined to this module: it is unmaintained
//! (RUSTSEC-2025-0012) but small and correct for what we use (the delay
//! sequence, not its retry loops), and replacing it is one file's work.

use std::time::Duration;

use backoff::backoff::Backoff as _;

/// Delays that double from `initial` up to `max`, each spread by ±`jitter`
/// (a fraction) and never above `max`, until [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    max: Duration,
    inner: backoff::ExponentialBackoff,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_jitter(initial, max, 0.3)
    }

    fn with_jitter(initial: Duration, max: Duration, jitter: f64) -> Backoff {
        let mut inner = backoff::ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: jitter,
            multiplier: 2.0,
            max_interval: max,
            // Callers decide when to give up; the sequence never ends.
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        inner.reset();
        Backoff { max, inner }
    }

    /// Without jitter: the delays are exactly initial, 2 x initial, ... max.
    pub fn exact(self) -> Backoff {
        Backoff::with_jitter(self.inner.initial_interval, self.max, 0.0)
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        // With no elapsed-time limit the crate always answers Some.
        self.inner.next_backoff().unwrap_or(self.max).min(self.max)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(10)).exact();
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_its_spread_and_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_millis(1500));
        for expected in [1000.0, 1500.0, 1500.0] {
            let d = b.next_delay().as_millis() as f64;
            assert!(d >= expected * 0.7 && d <= 1500.0, "{d}");
        }
    }
}
