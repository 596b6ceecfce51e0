//! The fleet simulation (`credbroker-bench --fleet`): H hosts × K keys, each host a real `TokenCache` with the
//! daemon's own fetcher (`Retrying`: retry policy and retry budget), refreshers and renewal coordination, all
//! against one simulated IdP, on tokio's paused clock: no real time passes and nothing touches the network.
//!
//! Hosts start at random times over the first ten minutes, and each key's first token lives a random 35% to
//! 135% of the lifetime, so renewals are spread evenly from the start (the steady state of a fleet that has
//! run for long); each key is asked for by a caller every minute (so every token is in use and renewed ahead). At `OUTAGE_AT` the IdP
//! fails for D seconds — 503, or 429 with `Retry-After: 60`, or no answer until the client's 10 s timeout — and
//! then answers again. The IdP's requests are counted per second of simulated time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credbroker_daemon::policy::scope::ScopeSet;
use credbroker_daemon::tokens::cache::{CacheConfig, CacheKey, FetchFuture, MinTtl, TokenCache};
use credbroker_daemon::tokens::retry::{
    Attempt, RETRY_RATIO, RetryPolicy, Retrying, random_fraction,
};
use credbroker_daemon::tokens::upstream::{Issued, UpstreamError};
use tokio::time::Instant;

/// When the outage starts: two hours in, the fleet in its steady state.
const OUTAGE_AT: Duration = Duration::from_secs(2 * 3600);
/// How long the simulation goes on after the outage ends.
const AFTER: Duration = Duration::from_secs(45 * 60);
/// How often each key is asked for.
const CALL_EVERY: Duration = Duration::from_secs(60);
/// The IdP's answer time when it is up.
const LATENCY: Duration = Duration::from_millis(50);
/// Rates are averaged over windows this long.
const WINDOW: usize = 30;

/// How the IdP fails during the outage.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outage {
    /// HTTP 503.
    Unavailable,
    /// HTTP 429 with `Retry-After: 60`.
    RateLimited,
    /// No answer: the request times out after the client's timeout (10 s).
    Timeout,
}

impl Outage {
    /// Its name in the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Unavailable => "503",
            Self::RateLimited => "429 + Retry-After: 60",
            Self::Timeout => "timeout (10 s)",
        }
    }
}

/// The simulated IdP: counts requests per second since the start.
struct SimIdp {
    start: Instant,
    outage: (Duration, Duration),
    kind: Outage,
    lifetime: Duration,
    per_second: Arc<Mutex<Vec<u32>>>,
    issued: AtomicU64,
}

/// One host's handle on the simulated IdP, and the keys it was issued a token for.
struct Host(Arc<SimIdp>, Mutex<std::collections::HashSet<ScopeSet>>);

impl Attempt for Host {
    fn attempt(&self, key: &CacheKey) -> FetchFuture {
        let idp = self.0.clone();
        let granted = key.scopes.clone();
        // A key's first token lives a random 35% to 135% of the lifetime, so the fleet's renewals are spread
        // over the renewal period from the start, as in a fleet that has run for long (the steady state).
        let lifetime = if self.1.lock().unwrap().insert(key.scopes.clone()) {
            idp.lifetime.mul_f64(0.35 + random_fraction())
        } else {
            idp.lifetime
        };
        Box::pin(async move {
            let at = idp.start.elapsed();
            {
                let mut counts = idp.per_second.lock().unwrap();
                let s = at.as_secs() as usize;
                if counts.len() <= s {
                    counts.resize(s + 1, 0);
                }
                counts[s] += 1;
            }
            if at >= idp.outage.0 && at < idp.outage.1 {
                return Err(match idp.kind {
                    Outage::Unavailable => {
                        tokio::time::sleep(LATENCY).await;
                        UpstreamError::Server {
                            status: 503,
                            retry_after: None,
                        }
                    }
                    Outage::RateLimited => {
                        tokio::time::sleep(LATENCY).await;
                        UpstreamError::RateLimited {
                            retry_after: Some(Duration::from_secs(60)),
                        }
                    }
                    Outage::Timeout => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        UpstreamError::Timeout(Duration::from_secs(10))
                    }
                });
            }
            tokio::time::sleep(LATENCY).await;
            let n = idp.issued.fetch_add(1, Ordering::Relaxed);
            Ok(Issued {
                access_token: secrecy::SecretString::from(format!("t{n}")),
                token_type: "Bearer".into(),
                lifetime,
                received_at: Instant::now(),
                granted,
                credential: None,
            })
        })
    }
}

/// What the fleet did.
pub(crate) struct Report {
    /// IdP requests per second in the 30 minutes before the outage.
    pub(crate) steady: f64,
    /// The highest rate during the outage, per second over 30-second windows.
    pub(crate) outage_peak: f64,
    /// The highest rate in the first minute after the outage, per second over 30-second windows.
    pub(crate) recovery_peak: f64,
    /// The highest rate in the 30 minutes after the outage, per second over 30-second windows.
    pub(crate) after_peak: f64,
    /// Callers that failed while they held a valid cached token (one that still met the min TTL).
    pub(crate) failed_with_valid_token: u64,
    /// Callers that failed with no valid token.
    pub(crate) failed_without: u64,
    /// Wall time the simulation took.
    pub(crate) wall: std::time::Duration,
}

fn window_peak(counts: &[u32], from: Duration, to: Duration) -> f64 {
    let (from, to) = (
        from.as_secs() as usize,
        (to.as_secs() as usize).min(counts.len()),
    );
    (from..to.saturating_sub(WINDOW - 1))
        .map(|s| {
            counts[s..s + WINDOW]
                .iter()
                .map(|&c| u64::from(c))
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0) as f64
        / WINDOW as f64
}

/// Runs `hosts` × `keys` with `lifetime` tokens through an outage of `outage` seconds of kind `kind`.
///
/// # Errors
/// When the runtime cannot be built.
pub(crate) fn simulate(
    hosts: usize,
    keys: usize,
    lifetime: Duration,
    outage: Duration,
    kind: Outage,
) -> anyhow::Result<Report> {
    let wall = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    rt.block_on(async move {
        let idp = Arc::new(SimIdp {
            start: Instant::now(),
            outage: (OUTAGE_AT, OUTAGE_AT + outage),
            kind,
            lifetime,
            per_second: Arc::default(),
            issued: AtomicU64::new(0),
        });
        let end = OUTAGE_AT + outage + AFTER;
        let failed_valid = Arc::new(AtomicU64::new(0));
        let failed_without = Arc::new(AtomicU64::new(0));
        let mut callers = tokio::task::JoinSet::new();
        let mut caches = Vec::with_capacity(hosts);
        for _ in 0..hosts {
            let fetcher = Retrying::new(
                Host(idp.clone(), Mutex::default()),
                RetryPolicy::default(),
                RETRY_RATIO,
            );
            let cache = Arc::new(TokenCache::new(Arc::new(fetcher), CacheConfig::default()));
            caches.push(cache.clone());
            // Hosts come up at random times over the first ten minutes.
            let boot = Duration::from_secs(600).mul_f64(random_fraction());
            for k in 0..keys {
                let key = CacheKey {
                    client: "idp".into(),
                    scopes: ScopeSet::parse(&[format!("scope:{k}")])?,
                };
                let (cache, failed_valid, failed_without) =
                    (cache.clone(), failed_valid.clone(), failed_without.clone());
                let start = idp.start;
                callers.spawn(async move {
                    let first = boot + CALL_EVERY.mul_f64(random_fraction());
                    tokio::time::sleep_until(start + first).await;
                    let mut valid_until: Option<Instant> = None;
                    let min_ttl = Duration::from_secs(60);
                    while start.elapsed() < end {
                        match cache.get(&key, MinTtl::Default(min_ttl), || Ok(())).await {
                            Ok((t, _)) => valid_until = Some(t.expires_at),
                            Err(_) => {
                                let had = valid_until.is_some_and(|u| {
                                    u.saturating_duration_since(Instant::now()) >= min_ttl
                                });
                                if had { &failed_valid } else { &failed_without }
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(CALL_EVERY).await;
                    }
                });
            }
        }
        while let Some(r) = callers.join_next().await {
            r?;
        }
        drop(caches);
        let counts = idp.per_second.lock().unwrap().clone();
        if std::env::var_os("FLEET_TRACE").is_some() {
            let from = (OUTAGE_AT.as_secs() as usize).saturating_sub(600);
            for m in (from..counts.len()).step_by(60) {
                let n: u32 = counts[m..(m + 60).min(counts.len())].iter().sum();
                eprintln!("t={:>5}s {:>6.1}/s", m, f64::from(n) / 60.0);
            }
        }
        let steady_from = OUTAGE_AT - Duration::from_secs(1800);
        let steady: u64 = counts[steady_from.as_secs() as usize..OUTAGE_AT.as_secs() as usize]
            .iter()
            .map(|&c| u64::from(c))
            .sum();
        let recovered = OUTAGE_AT + outage;
        Ok(Report {
            steady: steady as f64 / 1800.0,
            outage_peak: window_peak(&counts, OUTAGE_AT, recovered),
            recovery_peak: window_peak(&counts, recovered, recovered + Duration::from_secs(60)),
            after_peak: window_peak(&counts, recovered, recovered + Duration::from_secs(1800)),
            failed_with_valid_token: failed_valid.load(Ordering::Relaxed),
            failed_without: failed_without.load(Ordering::Relaxed),
            wall: wall.elapsed(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smaller fleet (noisier rates): the outage adds little, and no caller with a valid token fails.
    #[test]
    fn a_fleet_rides_out_an_outage_without_a_storm() {
        let r = simulate(
            200,
            20,
            Duration::from_secs(3600),
            Duration::from_secs(600),
            Outage::Unavailable,
        )
        .unwrap();
        assert_eq!(r.failed_with_valid_token, 0);
        assert!(
            r.outage_peak <= 2.0 * r.steady,
            "outage peak {} vs steady {}",
            r.outage_peak,
            r.steady
        );
        assert!(
            r.after_peak <= 3.0 * r.steady,
            "after {} vs steady {}",
            r.after_peak,
            r.steady
        );
    }
}
