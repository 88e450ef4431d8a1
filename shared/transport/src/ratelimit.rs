//! Token buckets for the enrolment endpoint: one per source address and one global, so neither a single
//! host nor a crowd can hammer enrolment (token guessing, handshake floods). Sans-IO with an explicit `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, per_second: f64, now: Instant) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: per_second.max(0.0),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token if one is available at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-address and global enrolment limits.
#[derive(Debug)]
pub struct EnrolmentLimiter {
    global: TokenBucket,
    per_host: HashMap<IpAddr, TokenBucket>,
    host_burst: u32,
    host_rate: f64,
    max_hosts: usize,
}

impl EnrolmentLimiter {
    /// `host_burst` attempts per address refilled at `host_rate`/s; `global_burst` in all at `global_rate`/s.
    pub fn new(
        host_burst: u32,
        host_rate: f64,
        global_burst: u32,
        global_rate: f64,
        now: Instant,
    ) -> Self {
        Self {
            global: TokenBucket::new(global_burst, global_rate, now),
            per_host: HashMap::new(),
            host_burst,
            host_rate,
            max_hosts: 100_000,
        }
    }

    /// Whether an enrolment attempt from `ip` at `now` may proceed.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.per_host.len() >= self.max_hosts {
            // Forget hosts whose buckets have refilled; bounded memory under address-spraying floods.
            let full_after =
                Duration::from_secs_f64(f64::from(self.host_burst) / self.host_rate.max(1e-9));
            self.per_host
                .retain(|_, b| now.saturating_duration_since(b.last) < full_after);
            if self.per_host.len() >= self.max_hosts {
                return false;
            }
        }
        let (burst, rate) = (self.host_burst, self.host_rate);
        let host = self
            .per_host
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(burst, rate, now));
        // Check the host first so one noisy host does not drain the global bucket.
        host.try_take(now) && self.global.try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_over_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 1.0, t0);
        assert!(b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        assert!(b.try_take(t0 + Duration::from_millis(1000)));
        assert!(b.try_take(t0 + Duration::from_secs(100)));
        assert!(b.try_take(t0 + Duration::from_secs(100)));
        assert!(
            !b.try_take(t0 + Duration::from_secs(100)),
            "burst caps the refill"
        );
    }

    #[test]
    fn one_host_cannot_exhaust_the_others() {
        let t0 = Instant::now();
        let mut l = EnrolmentLimiter::new(3, 0.1, 100, 10.0, t0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..50).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 3);
        assert!(l.allow(b, t0));
    }
}
