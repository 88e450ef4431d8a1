//! Reconnection delays: exponential backoff with full jitter (AWS's "full jitter": a uniform draw between
//! zero and the capped exponential), so a fleet of phones that lost the coordinator at the same moment does
//! not come back at the same moment. Sans-IO: it computes delays; the caller sleeps.

use std::time::Duration;

use rand::{Rng, SeedableRng};

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: rand::rngs::StdRng,
}

impl Backoff {
    /// Delays drawn from `[0, min(max, base·2^attempt)]`, seeded (jitter needs no secrecy).
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// A uniform draw in `[0, max_ms]` from the same jitter source, without counting an attempt (to spread
    /// a fleet's return after a coordinator named the time to come back).
    pub fn jitter_ms(&mut self, max_ms: u64) -> u64 {
        self.rng.random_range(0..=max_ms)
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .checked_mul(1u32 << self.attempt.min(31))
            .map_or(self.max, |d| d.min(self.max));
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    /// Attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let mut caps = Vec::new();
        for i in 0..12u32 {
            let d = b.next_delay();
            let cap = Duration::from_millis(100 * (1u64 << i)).min(Duration::from_secs(5));
            assert!(d <= cap, "attempt {i}: {d:?} > {cap:?}");
            caps.push(d);
        }
        // Jitter: the draws are not all equal to their caps and late ones are not all tiny.
        assert!(
            caps.iter().any(|d| *d < Duration::from_millis(100))
                || caps[8..].iter().any(|d| *d > Duration::from_secs(1))
        );
        let late: Duration = caps[8..].iter().sum();
        assert!(
            late > Duration::from_secs(2),
            "late delays should approach the cap: {late:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Same seed, same schedule; different seed, different schedule.
        let run = |seed| {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), seed);
            (0..6).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
