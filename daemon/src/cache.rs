//! Tokens already issued, keyed by (client, sorted scope set), shared by every caller allowed that key.
//!
//! Each key has a slot with the current token and a fetch lock: concurrent misses for one key make one IdP
//! request (the first caller fetches, the others wait for it and then find the fresh token), and misses for
//! different keys never wait on each other. The map is bounded: when full, expired entries go first, then the
//! one closest to expiry.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::scope::ScopeSet;
use crate::upstream::Issued;

/// Default bound on cached (client, scope set) entries.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// What a token is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The client's name.
    pub client: Arc<str>,
    /// The requested scopes.
    pub scopes: ScopeSet,
}

/// A short, non-reversible name for a token, for logs: the first 48 bits of its SHA-256, in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 6]);

impl Fingerprint {
    /// Fingerprints a token.
    pub fn of(token: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut fp = [0; 6];
        fp.copy_from_slice(&digest.as_ref()[..6]);
        Self(fp)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A token in the cache.
pub struct CachedToken {
    /// The access token.
    pub access_token: SecretString,
    /// `token_type`, as issued.
    pub token_type: String,
    /// The scopes granted.
    pub granted: ScopeSet,
    /// Its whole lifetime.
    pub lifetime: Duration,
    /// When it expires.
    pub expires_at: Instant,
    /// Its fingerprint, for the audit log.
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("access_token", &"[redacted]")
            .field("fingerprint", &self.fingerprint)
            .field("granted", &self.granted)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl From<Issued> for CachedToken {
    fn from(t: Issued) -> Self {
        Self {
            fingerprint: Fingerprint::of(t.access_token.expose_secret()),
            expires_at: t.received_at + t.lifetime,
            access_token: t.access_token,
            token_type: t.token_type,
            granted: t.granted,
            lifetime: t.lifetime,
        }
    }
}

impl CachedToken {
    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// The expiry as wall-clock time, for the wire.
    pub fn expires_at_wall(&self, now: Instant) -> SystemTime {
        SystemTime::now() + self.remaining(now)
    }
}

/// How long a handed-out token must stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinTtl {
    /// The caller asked for this much.
    Explicit(Duration),
    /// The caller said 0: the daemon default, capped at half the token's lifetime.
    Default(Duration),
}

impl MinTtl {
    /// The time a token of `lifetime` must have left.
    pub fn required(self, lifetime: Duration) -> Duration {
        match self {
            Self::Explicit(d) => d,
            Self::Default(d) => d.min(lifetime / 2),
        }
    }

    /// Whether even a brand-new token of `lifetime` could not satisfy this.
    pub fn unsatisfiable(self, lifetime: Duration) -> bool {
        self.required(lifetime) >= lifetime
    }
}

/// Whether a token came from the cache or from the IdP just now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Served from the cache.
    Cache,
    /// Fetched from the IdP for this request.
    Idp,
}

impl Source {
    /// `"cache"` or `"idp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Idp => "idp",
        }
    }
}

#[derive(Default)]
struct Slot {
    token: RwLock<Option<Arc<CachedToken>>>,
    fetching: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The current token if it satisfies `min_ttl` (or never could, so fetching again would not help).
    fn current(&self, min_ttl: MinTtl, now: Instant) -> Option<Arc<CachedToken>> {
        let token = self.token.read().unwrap_or_else(|e| e.into_inner());
        token
            .as_ref()
            .filter(|t| {
                t.remaining(now) > min_ttl.required(t.lifetime)
                    || (t.remaining(now) > Duration::ZERO && min_ttl.unsatisfiable(t.lifetime))
            })
            .cloned()
    }

    fn expires_at(&self) -> Option<Instant> {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.expires_at)
    }
}

/// The token cache.
pub struct TokenCache {
    slots: Mutex<HashMap<CacheKey, Arc<Slot>>>,
    max_entries: usize,
}

impl TokenCache {
    /// An empty cache holding at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A token for `key` that satisfies `min_ttl`: the cached one, or one `fetch` gets (one fetch per key at a
    /// time; callers that waited on it take its result).
    ///
    /// # Errors
    /// `fetch`'s error; nothing is cached then.
    pub async fn get<F, Fut, E>(
        &self,
        key: CacheKey,
        min_ttl: MinTtl,
        fetch: F,
    ) -> Result<(Arc<CachedToken>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, E>>,
    {
        let slot = self.slot(key);
        if let Some(t) = slot.current(min_ttl, Instant::now()) {
            return Ok((t, Source::Cache));
        }
        let _fetching = slot.fetching.lock().await;
        // Whoever held the lock before us may have fetched what we need.
        if let Some(t) = slot.current(min_ttl, Instant::now()) {
            return Ok((t, Source::Cache));
        }
        let token = Arc::new(CachedToken::from(fetch().await?));
        *slot.token.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok((token, Source::Idp))
    }

    fn slot(&self, key: CacheKey) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&key) {
            return slot.clone();
        }
        if slots.len() >= self.max_entries {
            let now = Instant::now();
            // Idle entries whose token is gone or expired (an entry being fetched is held by its fetcher).
            slots
                .retain(|_, s| Arc::strong_count(s) > 1 || s.expires_at().is_some_and(|e| e > now));
            if slots.len() >= self.max_entries {
                let victim = slots
                    .iter()
                    .min_by_key(|(_, s)| s.expires_at())
                    .map(|(k, _)| k.clone());
                if let Some(k) = victim {
                    slots.remove(&k);
                }
            }
        }
        slots.entry(key).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(client: &str, scopes: &[&str]) -> CacheKey {
        CacheKey {
            client: client.into(),
            scopes: ScopeSet::parse(scopes).unwrap(),
        }
    }

    fn issued(token: &str, lifetime: u64) -> Issued {
        Issued {
            access_token: SecretString::from(token.to_owned()),
            token_type: "Bearer".into(),
            lifetime: Duration::from_secs(lifetime),
            received_at: Instant::now(),
            granted: ScopeSet::parse(&["a"]).unwrap(),
            assumed_lifetime: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hits_until_min_ttl_then_refetches() {
        let cache = TokenCache::new(10);
        let fetches = AtomicUsize::new(0);
        let get = |min| {
            cache.get(key("c", &["a"]), min, || async {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(issued(&format!("t{n}"), 3600))
            })
        };
        let (t, s) = get(MinTtl::Default(Duration::from_secs(60))).await.unwrap();
        assert_eq!((t.access_token.expose_secret(), s), ("t0", Source::Idp));
        let (t, s) = get(MinTtl::Default(Duration::from_secs(60))).await.unwrap();
        assert_eq!((t.access_token.expose_secret(), s), ("t0", Source::Cache));
        tokio::time::advance(Duration::from_secs(3500)).await;
        // 100 s left: fine for the default, not for a caller that needs 200 s.
        assert_eq!(
            get(MinTtl::Default(Duration::from_secs(60)))
                .await
                .unwrap()
                .1,
            Source::Cache
        );
        let (t, s) = get(MinTtl::Explicit(Duration::from_secs(200)))
            .await
            .unwrap();
        assert_eq!((t.access_token.expose_secret(), s), ("t1", Source::Idp));
    }

    #[tokio::test(start_paused = true)]
    async fn default_min_ttl_is_at_most_half_the_lifetime() {
        assert_eq!(
            MinTtl::Default(Duration::from_secs(60)).required(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        let cache = TokenCache::new(10);
        let k = key("c", &["a"]);
        let short = || async { Ok::<_, ()>(issued("short", 30)) };
        assert_eq!(
            cache
                .get(k.clone(), MinTtl::Default(Duration::from_secs(60)), short)
                .await
                .unwrap()
                .1,
            Source::Idp
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            cache
                .get(k, MinTtl::Default(Duration::from_secs(60)), short)
                .await
                .unwrap()
                .1,
            Source::Cache
        );
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_fetch() {
        let cache = Arc::new(TokenCache::new(10));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, fetches, mut rx) = (cache.clone(), fetches.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(
                        key("c", &["a"]),
                        MinTtl::Default(Duration::from_secs(60)),
                        || async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            rx.wait_for(|go| *go).await.unwrap();
                            Ok::<_, ()>(issued("shared", 3600))
                        },
                    )
                    .await
                    .unwrap()
                    .0
                    .fingerprint
            }));
        }
        tokio::task::yield_now().await;
        tx.send(true).unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Fingerprint::of("shared"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_entries() {
        let cache = TokenCache::new(3);
        for i in 0..10 {
            let scope = format!("s{i}");
            cache
                .get(
                    key("c", &[&scope]),
                    MinTtl::Default(Duration::from_secs(1)),
                    || async { Ok::<_, ()>(issued("t", 100 + i)) },
                )
                .await
                .unwrap();
            assert!(cache.len() <= 3);
        }
    }

    #[test]
    fn fingerprints_are_short_hex_and_not_the_token() {
        let fp = Fingerprint::of("secret-token").to_string();
        assert_eq!(fp.len(), 12);
        assert!(!fp.contains("secret"));
    }
}
