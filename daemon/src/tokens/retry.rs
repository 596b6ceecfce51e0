//! Retrying token requests through IdP trouble: capped exponential backoff with full jitter for transient
//! failures (network errors, timeouts, 5xx, 429 with its `Retry-After`), no retry for 4xx, a total time
//! budget so a request that needs a new token fails in seconds, not minutes, and a retry budget per client
//! ([`RetryBudget`]) so retries stay a small fraction of first attempts, however many keys fail at once.
//!
//! Only fetches a caller waits for are retried here ([`Retrying`]); a renewal makes one attempt, and its
//! refresher schedules the next try ([`crate::tokens::renewal`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::scope::ScopeSet;
use crate::tokens::cache::{CacheKey, FetchFuture, FetchKind, Fetcher};
use crate::tokens::upstream::{Issued, UpstreamError};

/// Default fraction of first attempts that may be retried (`daemon.retry_budget`).
pub const RETRY_RATIO: f64 = 0.1;
/// Retries a client's budget holds at most, and at start: a lone failure is retried at once.
pub const RETRY_BURST: f64 = 2.0;

/// A client's retry budget, in the spirit of gRPC retry throttling: each first attempt earns `ratio` of a
/// retry, up to [`RETRY_BURST`]; each retry spends one. While it is spent, failures are not retried at once.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    tokens: Mutex<f64>,
}

impl RetryBudget {
    /// A full budget earning `ratio` per first attempt.
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio,
            tokens: Mutex::new(RETRY_BURST),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, f64> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a first attempt.
    pub fn first_attempt(&self) {
        let mut t = self.lock();
        *t = (*t + self.ratio).min(RETRY_BURST);
    }

    /// Takes one retry, if the budget has one.
    pub fn try_retry(&self) -> bool {
        let mut t = self.lock();
        if *t >= 1.0 - 1e-9 {
            *t = (*t - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Retries left.
    pub fn tokens(&self) -> f64 {
        *self.lock()
    }
}

/// One attempt at a token for a key: one request to the IdP.
pub trait Attempt: Send + Sync + 'static {
    /// Makes the attempt.
    fn attempt(&self, key: &CacheKey) -> FetchFuture;
}

/// The cache's [`Fetcher`] over an [`Attempt`]: a fetch a caller waits for is retried by [`with_retries`]
/// while its client's [`RetryBudget`] allows; a renewal makes one attempt.
pub struct Retrying<A> {
    attempt: Arc<A>,
    policy: RetryPolicy,
    ratio: f64,
    budgets: Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>,
}

impl<A: Attempt> Retrying<A> {
    /// Retries `attempt` under `policy`, with budgets earning `ratio` per first attempt.
    pub fn new(attempt: A, policy: RetryPolicy, ratio: f64) -> Self {
        Self {
            attempt: Arc::new(attempt),
            policy,
            ratio,
            budgets: Mutex::default(),
        }
    }

    /// The retry budget of `client`.
    pub fn budget(&self, client: &Arc<str>) -> Arc<RetryBudget> {
        self.budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(client.clone())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.ratio)))
            .clone()
    }
}

impl<A: Attempt> Fetcher for Retrying<A> {
    fn fetch(&self, key: &CacheKey, kind: FetchKind) -> FetchFuture {
        let budget = self.budget(&key.client);
        let (attempt, policy, key) = (self.attempt.clone(), self.policy, key.clone());
        Box::pin(async move {
            budget.first_attempt();
            match kind {
                FetchKind::Renewal => attempt.attempt(&key).await,
                FetchKind::Caller => {
                    with_retries(
                        &policy,
                        &key.client,
                        &key.scopes,
                        || budget.try_retry(),
                        || attempt.attempt(&key),
                    )
                    .await
                }
            }
        })
    }
}

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
    may_retry: impl Fn() -> bool,
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
        if !may_retry() {
            tracing::warn!(client, scopes = %scopes, error = %error, "not retrying: the client's retry budget is spent (retries are limited to a fraction of first attempts)");
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
        let r = with_retries(
            &RetryPolicy::default(),
            "c",
            &scopes(),
            || true,
            || {
                calls.set(calls.get() + 1);
                let next = failures.borrow_mut().pop_front();
                async move { next.map_or_else(|| Ok(issued()), Err) }
            },
        )
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
        let r = with_retries(
            &policy,
            "c",
            &scopes(),
            || true,
            || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(issued())
            },
        )
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

    #[test]
    fn the_budget_earns_a_fraction_of_first_attempts_and_starts_with_two_retries() {
        let b = RetryBudget::new(0.1);
        assert!(b.try_retry() && b.try_retry());
        assert!(!b.try_retry(), "spent");
        for _ in 0..9 {
            b.first_attempt();
        }
        assert!(!b.try_retry(), "0.9 of a retry");
        b.first_attempt();
        assert!(b.try_retry(), "ten first attempts earn one retry");
        for _ in 0..100 {
            b.first_attempt();
        }
        assert!((b.tokens() - RETRY_BURST).abs() < 1e-9, "capped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_retries() {
        let calls = Cell::new(0);
        let r = with_retries(
            &RetryPolicy::default(),
            "c",
            &scopes(),
            || false,
            || {
                calls.set(calls.get() + 1);
                async { Err(server(503)) }
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
    }
}
