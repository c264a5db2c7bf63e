//! A shared bandwidth limit. Each caller reserves the next free slot of virtual time for its
//! bytes, in arrival order, then sleeps until its slot starts; so every part of every
//! concurrent download waits its turn and downloads share the limit fairly.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so paused-time tests and real sleeps agree.
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec: bytes_per_sec.max(1) as f64, next_free: Mutex::new(Instant::now()) }
    }

    /// How long the caller must wait before moving `bytes`.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        start - now
    }

    pub async fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_each_other_at_the_rate() {
        let l = RateLimiter::new(1_000_000);
        let t = Instant::now();
        assert_eq!(l.reserve(500_000, t), Duration::ZERO);
        assert_eq!(l.reserve(500_000, t), Duration::from_millis(500));
        assert_eq!(l.reserve(1, t), Duration::from_secs(1));
        // Idle time is not banked: after a pause the next caller starts now.
        assert_eq!(l.reserve(1, t + Duration::from_secs(10)), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn throughput_is_capped() {
        let l = std::sync::Arc::new(RateLimiter::new(10 << 20));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    l.acquire(1 << 20).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 40 MiB at 10 MiB/s: the last slot starts at 3.9 s.
        let took = start.elapsed().as_secs_f64();
        assert!((3.8..4.1).contains(&took), "{took}");
    }
}
