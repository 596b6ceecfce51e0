//! A token bucket per caller uid for requests that need a new token from the IdP, so one local process
//! cannot flood the IdP. Cache hits never touch it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The rate: `per_minute` new tokens a minute, in bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Sustained new tokens per minute.
    pub per_minute: u32,
    /// Bucket size.
    pub burst: u32,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            per_minute: 60,
            burst: 20,
        }
    }
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused since the bucket was made.
    rejected: u64,
}

/// One uid's bucket, for `credbroker status`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketStatus {
    /// The caller's uid.
    pub uid: u32,
    /// New tokens it may ask for now.
    pub tokens: f64,
    /// Requests refused since its bucket was made (a full bucket is forgotten when many uids have one).
    pub rejected: u64,
}

/// Token buckets per uid.
pub struct RateLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

/// Buckets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 4096;

impl RateLimiter {
    /// A limiter at `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Every uid's bucket at `now`, by uid.
    pub fn buckets(&self, now: Instant) -> Vec<BucketStatus> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<BucketStatus> = buckets
            .iter()
            .map(|(&uid, b)| BucketStatus {
                uid,
                tokens: self.refill(*b, now),
                rejected: b.rejected,
            })
            .collect();
        out.sort_by_key(|b| b.uid);
        out
    }

    fn refill(&self, b: Bucket, now: Instant) -> f64 {
        let per_sec = f64::from(self.rate.per_minute) / 60.0;
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec)
            .min(f64::from(self.rate.burst))
    }

    /// Takes one token from `uid`'s bucket; `Err` with the wait until one is available when it is empty.
    ///
    /// # Errors
    /// The time until the next token.
    pub fn try_acquire(&self, uid: u32, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&uid) {
            let burst = f64::from(self.rate.burst);
            buckets.retain(|_, b| self.refill(*b, now) < burst);
        }
        let full = Bucket {
            tokens: f64::from(self.rate.burst),
            at: now,
            rejected: 0,
        };
        let b = buckets.entry(uid).or_insert(full);
        let tokens = self.refill(*b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
                rejected: b.rejected,
            };
            Ok(())
        } else {
            *b = Bucket {
                tokens,
                at: now,
                rejected: b.rejected + 1,
            };
            let per_sec = f64::from(self.rate.per_minute) / 60.0;
            Err(Duration::from_secs_f64((1.0 - tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_the_sustained_rate_per_uid() {
        let l = RateLimiter::new(Rate {
            per_minute: 60,
            burst: 3,
        });
        let now = Instant::now();
        for _ in 0..3 {
            assert!(l.try_acquire(1000, now).is_ok());
        }
        let wait = l.try_acquire(1000, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(l.buckets(now)[0].rejected, 1);
        // Another uid is not affected.
        assert!(l.try_acquire(1001, now).is_ok());
        // One per second comes back.
        assert!(
            l.try_acquire(1000, now + Duration::from_millis(1000))
                .is_ok()
        );
        assert!(
            l.try_acquire(1000, now + Duration::from_millis(1000))
                .is_err()
        );
        // Never more than the burst after a long pause.
        let later = now + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.try_acquire(1000, later).is_ok());
        }
        assert!(l.try_acquire(1000, later).is_err());
    }
}
