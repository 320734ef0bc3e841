//! The one backoff of vppd: exponential, capped, with jitter, so that many
//! retrying tasks do not fall into step.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `initial` up to `max`, each spread by ±`jitter`
/// (a fraction), until [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: 0.3,
            current: initial,
        }
    }

    /// Without jitter: the delays are exactly initial, 2 x initial, ... max.
    pub fn exact(mut self) -> Backoff {
        self.jitter = 0.0;
        self
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        if self.jitter <= 0.0 {
            return base;
        }
        let spread = rand::rng().random_range(-self.jitter..=self.jitter);
        base.mul_f64(1.0 + spread).min(self.max)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
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
