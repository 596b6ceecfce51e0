//! Retrying token requests through IdP trouble: capped exponential backoff with full jitter for transient
//! failures (network errors, timeouts, 5xx, 429 with its `Retry-After`), no retry for 4xx, and a total
//! budget so a request that needs a new token fails in seconds, not minutes.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::scope::ScopeSet;
use crate::tokens::upstream::{Issued, UpstreamError};

/// How a token request is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled each time (full jitter: a uniform delay in `[0, backoff]`).
    pub base: Duration,
    /// Largest backoff.
    pub cap: Duration,
    /// Longest `Retry-After` honoured; a server asking for more is treated as down.
    pub max_retry_after: Duration,
    /// Total time for all attempts and the waits between them.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            budget: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first retry) after `error`; `None` when the error must
    /// not be retried or the server asks for more than [`RetryPolicy::max_retry_after`].
    pub fn delay(&self, retry: u32, error: &UpstreamError, random: f64) -> Option<Duration> {
        if !error.is_transient() {
            return None;
        }
        if let UpstreamError::RateLimited {
            retry_after: Some(after),
        }
        | UpstreamError::Server {
            retry_after: Some(after),
            ..
        } = error
        {
            return (*after <= self.max_retry_after).then_some(*after);
        }
        let backoff = self.base.saturating_mul(1 << retry.min(16)).min(self.cap);
        Some(backoff.mul_f64(random.clamp(0.0, 1.0)))
    }
}

/// A uniform random number in `[0, 1)` from the system's CSPRNG (used only off the hot path).
pub fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `attempt` until it succeeds, fails for good, runs out of attempts, or the budget is spent.
///
/// # Errors
/// The last attempt's error; [`UpstreamError::Timeout`] when the budget ran out mid-attempt.
pub async fn with_retries<F, Fut>(
    policy: &RetryPolicy,
    client: &str,
    scopes: &ScopeSet,
    mut attempt: F,
) -> Result<Issued, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Issued, UpstreamError>>,
{
    let deadline = Instant::now() + policy.budget;
    let mut retry = 0;
    loop {
        let result = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(r) => r,
            Err(_) => return Err(UpstreamError::Timeout(policy.budget)),
        };
        let error = match result {
            Ok(issued) => return Ok(issued),
            Err(e) => e,
        };
        if retry + 1 >= policy.max_attempts {
            return Err(error);
        }
        let Some(delay) = policy.delay(retry, &error, random_fraction()) else {
            return Err(error);
        };
        if Instant::now() + delay >= deadline {
            tracing::warn!(client, scopes = %scopes, error = %error, "giving up: no time left to retry within {}", humantime::format_duration(policy.budget));
            return Err(error);
        }
        retry += 1;
        tracing::warn!(
            client,
            scopes = %scopes,
            error = %error,
            retry,
            delay_ms = delay.as_millis() as u64,
            "token request failed; retrying after a backoff"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::cell::Cell;

    fn issued() -> Issued {
        Issued {
            access_token: SecretString::from("t".to_owned()),
            token_type: "Bearer".into(),
            lifetime: Duration::from_secs(60),
            received_at: Instant::now(),
            granted: ScopeSet::parse(&["a"]).unwrap(),
            credential: None,
        }
    }

    fn scopes() -> ScopeSet {
        ScopeSet::parse(&["a"]).unwrap()
    }

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let p = RetryPolicy::default();
        let e = UpstreamError::Server {
            status: 503,
            retry_after: None,
        };
        assert_eq!(p.delay(0, &e, 1.0), Some(Duration::from_millis(200)));
        assert_eq!(p.delay(2, &e, 1.0), Some(Duration::from_millis(800)));
        assert_eq!(p.delay(10, &e, 1.0), Some(Duration::from_secs(5)));
        assert_eq!(p.delay(3, &e, 0.5), Some(Duration::from_millis(800)));
        assert_eq!(p.delay(0, &e, 0.0), Some(Duration::ZERO));
        let rejected = UpstreamError::Rejected {
            status: 400,
            code: Some("invalid_scope".into()),
            description: None,
        };
        assert_eq!(p.delay(0, &rejected, 1.0), None);
        let later = |s| UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(s)),
        };
        assert_eq!(p.delay(0, &later(7), 0.1), Some(Duration::from_secs(7)));
        let unavailable = UpstreamError::Server {
            status: 503,
            retry_after: Some(Duration::from_secs(4)),
        };
        assert_eq!(p.delay(0, &unavailable, 0.1), Some(Duration::from_secs(4)));
        assert_eq!(p.delay(0, &later(3600), 0.1), None);
    }

    #[test]
    fn random_fractions_are_in_range_and_vary() {
        let xs: Vec<f64> = (0..32).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|x| *x != xs[0]));
    }

    /// Runs `with_retries` against attempts that fail with `failures`, in order, then succeed; returns the
    /// result, the number of attempts and the (paused) time it took.
    async fn scripted(
        failures: Vec<UpstreamError>,
    ) -> (Result<Issued, UpstreamError>, usize, Duration) {
        let failures = std::cell::RefCell::new(std::collections::VecDeque::from(failures));
        let calls = Cell::new(0);
        let start = Instant::now();
        let r = with_retries(&RetryPolicy::default(), "c", &scopes(), || {
            calls.set(calls.get() + 1);
            let next = failures.borrow_mut().pop_front();
            async move { next.map_or_else(|| Ok(issued()), Err) }
        })
        .await;
        (r, calls.get(), start.elapsed())
    }

    fn server(status: u16) -> UpstreamError {
        UpstreamError::Server {
            status,
            retry_after: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_then_succeed() {
        let (r, calls, took) = scripted(vec![server(502), server(503)]).await;
        assert!(r.is_ok());
        assert_eq!(calls, 3);
        // Two backoffs of at most 200 ms and 400 ms.
        assert!(took <= Duration::from_millis(600), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let (r, calls, took) = scripted(vec![UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        }])
        .await;
        assert!(r.is_ok());
        assert_eq!((calls, took), (2, Duration::from_secs(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_are_not_retried() {
        let rejected = UpstreamError::Rejected {
            status: 401,
            code: Some("invalid_client".into()),
            description: None,
        };
        let (r, calls, _) = scripted(vec![rejected]).await;
        assert!(matches!(
            r,
            Err(UpstreamError::Rejected { status: 401, .. })
        ));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_idp_fails_within_the_budget() {
        let start = Instant::now();
        let policy = RetryPolicy::default();
        let r = with_retries(&policy, "c", &scopes(), || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(issued())
        })
        .await;
        assert!(matches!(r, Err(UpstreamError::Timeout(_))));
        assert_eq!(start.elapsed(), policy.budget);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let refused = || UpstreamError::Network("connection refused".into());
        let (r, calls, _) = scripted((0..10).map(|_| refused()).collect()).await;
        assert!(matches!(r, Err(UpstreamError::Network(_))));
        assert_eq!(calls, 4);
    }
}
