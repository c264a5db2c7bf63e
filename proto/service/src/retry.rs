//! The one retry delay of every Hearth retry loop (the controller stream, part reads,
//! listings, API server writes): capped exponential steps with "equal jitter".

use std::time::Duration;

/// The capped exponential step before retry number `attempt` (0 for the first), no jitter.
pub fn step(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// The delay before retry number `attempt`: half of [`step`] plus a random part of the
/// other half.
pub fn jittered(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let half = step(initial, max, attempt) / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Exponential backoff with "equal jitter": each delay is half the capped exponential step
/// plus a random part of the other half, so a fleet of agents that lost the controller at
/// the same moment does not come back at the same moment.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The capped exponential step for the current attempt, before jitter.
    pub fn step(&self) -> Duration {
        step(self.initial, self.max, self.attempt)
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = jittered(self.initial, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut steps = Vec::new();
        for _ in 0..8 {
            let step = b.step();
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} outside [{:?}, {step:?}]", step / 2);
            steps.push(step.as_millis());
        }
        assert_eq!(steps, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut delays = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            delays.insert(b.next_delay().as_micros());
        }
        assert!(delays.len() > 40, "only {} distinct delays", delays.len());
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
