//! Tokens already issued, keyed by (client, sorted scope set), shared by every caller allowed that key, and
//! their lifecycle.
//!
//! - **Hits** take a read lock on one of [`SHARDS`] map shards and the key's own token lock: nothing shared
//!   across keys is written on the hot path.
//! - **Single flight**: a miss starts one fetch per key in its own task; concurrent misses wait for it. A
//!   caller that gives up (deadline, disconnect) stops waiting; the fetch goes on for the others.
//! - **Refresh ahead**: every stored token gets a refresher task. At a jittered point between 65% and 75% of
//!   its usable lifetime (at most its lifetime, less the default min TTL) it refetches the token if the key
//!   was asked for since the token arrived, so callers keep getting the cached token and never wait on the
//!   IdP. A token nobody uses is not refreshed;
//!   its entry is removed when it expires.
//! - **Failures**: a non-transient IdP error (4xx) is remembered for [`CacheConfig::error_ttl`], so a
//!   misconfigured client cannot hammer the IdP. A failed renewal keeps the valid cached token and tries again
//!   as its client's renewals allow ([`crate::tokens::renewal`]: backoff, retry budget, recovery order).
//! - **Bounded**: at most [`CacheConfig::max_entries`] keys and [`CacheConfig::max_bytes`] bytes (estimated
//!   per entry, remembered refusals included); when over, idle entries go, those without a token first, then
//!   the soonest to expire, found in O(log n) through an ordered index. A request stopped by the rate limit
//!   leaves no entry behind.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::policy::scope::ScopeSet;
use crate::telemetry::{Lookup, metrics};
use crate::tokens::renewal::{self, Renewals};
use crate::tokens::retry::random_fraction;
use crate::tokens::upstream::{Issued, UpstreamError};

/// Number of map shards.
pub const SHARDS: usize = 16;

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
    /// When the IdP's answer arrived.
    pub issued_at: Instant,
    /// When it expires.
    pub expires_at: Instant,
    /// When its refresher refetches it (if it is in use).
    pub refresh_at: Instant,
    /// Its fingerprint, for the audit log.
    pub fingerprint: Fingerprint,
    /// The credential that authenticated its request, for the audit log.
    pub credential: Option<Arc<str>>,
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

impl CachedToken {
    /// Caches an issued token. Its refresh point is drawn in `[refresh_from, refresh_by]` of its *usable*
    /// lifetime: the time until it no longer satisfies the daemon's default min TTL. For long-lived tokens that
    /// is about 65–75% of the lifetime; for short ones, earlier, so callers never wait for the renewal.
    pub fn new(t: Issued, config: &CacheConfig) -> Self {
        let span = config.refresh_by - config.refresh_from;
        let fraction = config.refresh_from + span * random_fraction();
        let usable = t.lifetime - MinTtl::Default(config.default_min_ttl).required(t.lifetime);
        Self {
            fingerprint: Fingerprint::of(t.access_token.expose_secret()),
            issued_at: t.received_at,
            expires_at: t.received_at + t.lifetime,
            refresh_at: t.received_at + usable.mul_f64(fraction),
            access_token: t.access_token,
            token_type: t.token_type,
            granted: t.granted,
            lifetime: t.lifetime,
            credential: t.credential,
        }
    }

    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// The expiry as wall-clock time, for the wire.
    pub fn expires_at_wall(&self, now: Instant) -> SystemTime {
        SystemTime::now() + self.remaining(now)
    }

    fn satisfies(&self, min_ttl: MinTtl, now: Instant) -> bool {
        let left = self.remaining(now);
        left >= min_ttl.required(self.lifetime)
            || (!left.is_zero() && min_ttl.unsatisfiable(self.lifetime))
    }
}

/// One cache entry, as `credbroker status` shows it.
#[derive(Clone, Debug)]
pub struct EntryStatus {
    /// The client.
    pub client: Arc<str>,
    /// The requested scope set.
    pub scopes: ScopeSet,
    /// The cached token, if any.
    pub token: Option<TokenStatus>,
    /// Requests served from the cached token.
    pub hits: u64,
    /// The last request for this key.
    pub last_used: Instant,
    /// Whether a fetch is under way.
    pub fetching: bool,
    /// A remembered IdP refusal.
    pub refused: Option<String>,
}

/// What `credbroker status` shows of a cached token: never the token.
#[derive(Clone, Debug)]
pub struct TokenStatus {
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// The scopes granted.
    pub granted: ScopeSet,
    /// When it expires.
    pub expires_at: Instant,
    /// When it is renewed, if still in use.
    pub renews_at: Instant,
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

    /// Whether even a brand-new token of `lifetime` could not satisfy this (fetching again would not help).
    pub fn unsatisfiable(self, lifetime: Duration) -> bool {
        self.required(lifetime) >= lifetime
    }
}

/// Whether a token came from the cache or from the IdP for this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Served from the cache.
    Cache,
    /// Fetched from the IdP while this request waited.
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

/// The cache's knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheConfig {
    /// Most keys held.
    pub max_entries: usize,
    /// Most bytes held, as estimated per entry (keys, tokens, remembered refusals).
    pub max_bytes: usize,
    /// Earliest refresh point, as a fraction of the lifetime.
    pub refresh_from: f64,
    /// Latest refresh point, as a fraction of the lifetime.
    pub refresh_by: f64,
    /// How long a non-transient IdP error is remembered for its key.
    pub error_ttl: Duration,
    /// The daemon's default min TTL: refreshes happen before a token stops satisfying it.
    pub default_min_ttl: Duration,
    /// Retries earned per first attempt while a client is failing (`daemon.retry_budget`).
    pub retry_ratio: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 64 << 20,
            refresh_from: 0.65,
            refresh_by: 0.75,
            error_ttl: Duration::from_secs(10),
            default_min_ttl: Duration::from_secs(60),
            retry_ratio: crate::tokens::retry::RETRY_RATIO,
        }
    }
}

/// A fetch of a new token for a key (from the IdP, retries included).
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<Issued, UpstreamError>> + Send>>;

/// Why a token is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchKind {
    /// A caller waits for it (no usable token): transient failures are retried at once, within the client's
    /// retry budget.
    Caller,
    /// A renewal ahead of expiry: one attempt; the refresher schedules the next.
    Renewal,
}

/// Gets new tokens for the cache.
pub trait Fetcher: Send + Sync + 'static {
    /// Starts fetching a token for `key`.
    fn fetch(&self, key: &CacheKey, kind: FetchKind) -> FetchFuture;
}

/// Why the cache has no token for a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The fetch this request waited for failed.
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
    /// The IdP refused this key moments ago; not asked again yet.
    #[error("{error} (remembered from {}s ago; not retried for {}s)", .age.as_secs(), .retry_in.as_secs().max(1))]
    Remembered {
        /// The IdP's refusal.
        error: Arc<UpstreamError>,
        /// How long ago it happened.
        age: Duration,
        /// When the key will be tried again.
        retry_in: Duration,
    },
    /// The caller is over its rate of new tokens.
    #[error("too many new tokens requested; retry in {}s (cached tokens are still served)", .retry_in.as_secs().max(1))]
    RateLimited {
        /// Until a new token may be requested.
        retry_in: Duration,
    },
    /// The fetch task went away without an answer (shutdown).
    #[error("the token fetch was abandoned (shutting down?)")]
    Abandoned,
}

impl CacheError {
    /// The IdP error behind this, if any.
    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Self::Upstream(e) | Self::Remembered { error: e, .. } => Some(e),
            Self::RateLimited { .. } | Self::Abandoned => None,
        }
    }
}

type FetchResult = Result<Arc<CachedToken>, Arc<UpstreamError>>;

#[derive(Default)]
struct SlotState {
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    failure: Option<(Instant, Arc<UpstreamError>)>,
}

struct Slot {
    key: CacheKey,
    /// Unique in the cache: names the slot in its client's renewal queue.
    id: u64,
    token: RwLock<Option<Arc<CachedToken>>>,
    state: Mutex<SlotState>,
    /// Milliseconds since the cache's epoch at the last request for this key.
    last_used: AtomicU64,
    /// Requests served from the cached token.
    hits: AtomicU64,
    /// Whether the last renewal ahead of expiry failed (and no fetch has succeeded since).
    renewal_failing: std::sync::atomic::AtomicBool,
    refresher: Mutex<Option<JoinHandle<()>>>,
    /// Its place in the eviction order, and the bytes it is counted for.
    place: Mutex<Place>,
}

/// Where a slot stands in [`Inner::order`], and what it weighs.
#[derive(Clone, Copy)]
struct Place {
    order: Order,
    bytes: usize,
}

/// Eviction order: entries without a token first, then by expiry; the sequence number keeps keys unique.
type Order = (Option<Instant>, u64);

/// Bytes an entry takes beyond its strings: the map entry, the slot, its locks and the token's struct.
const ENTRY_OVERHEAD: usize = 640;

fn scope_bytes(scopes: &ScopeSet) -> usize {
    scopes.iter().map(|s| s.len() + 24).sum::<usize>() + 16
}

impl Slot {
    /// The bytes this entry takes, as estimated: its key (held twice: in the map and in the slot), its token
    /// and a remembered IdP refusal.
    fn weight(&self) -> usize {
        let key = self.key.client.len() + scope_bytes(&self.key.scopes);
        let token = self.token().map_or(0, |t| {
            t.access_token.expose_secret().len() + t.token_type.len() + scope_bytes(&t.granted)
        });
        let failure = self.state().failure.as_ref().map_or(0, |(_, e)| e.weight());
        ENTRY_OVERHEAD + 2 * key + token + failure
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(task) = self
            .refresher
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Slot {
    fn token(&self) -> Option<Arc<CachedToken>> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn usable(&self, min_ttl: MinTtl, now: Instant) -> Option<Arc<CachedToken>> {
        let token = self.token.read().unwrap_or_else(|e| e.into_inner());
        token
            .as_ref()
            .filter(|t| t.satisfies(min_ttl, now))
            .cloned()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request served from the cached token.
    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        metrics().lookup(Lookup::Hit);
        if self.renewal_failing.load(Ordering::Relaxed) {
            metrics().stale_serve();
        }
    }
}

struct Inner {
    shards: Vec<RwLock<HashMap<CacheKey, Arc<Slot>>>>,
    /// Entries across all shards.
    entries: std::sync::atomic::AtomicUsize,
    /// Their estimated bytes.
    bytes: std::sync::atomic::AtomicUsize,
    /// Fetches under way (shared with the fetch tasks, which hold no strong reference to the cache).
    fetching: Arc<std::sync::atomic::AtomicUsize>,
    /// Every entry in eviction order. Never locked while a shard lock is held, nor the other way round.
    order: Mutex<BTreeMap<Order, CacheKey>>,
    /// Next sequence number for [`Order`].
    seq: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    fetcher: Arc<dyn Fetcher>,
    /// Read on inserts and fetches only; a reload may change it.
    config: Mutex<CacheConfig>,
    /// Renewals through IdP outages, per client.
    renewals: Renewals,
    epoch: Instant,
}

/// The token cache. Dropping it cancels its refreshers.
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl TokenCache {
    /// An empty cache that gets new tokens from `fetcher`.
    pub fn new(fetcher: Arc<dyn Fetcher>, config: CacheConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
                entries: std::sync::atomic::AtomicUsize::new(0),
                bytes: std::sync::atomic::AtomicUsize::new(0),
                fetching: Arc::default(),
                order: Mutex::new(BTreeMap::new()),
                seq: AtomicU64::new(0),
                hasher: std::collections::hash_map::RandomState::new(),
                fetcher,
                renewals: Renewals::new(config.retry_ratio),
                config: Mutex::new(config),
                epoch: Instant::now(),
            }),
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the cache's entries take, as estimated per entry.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Fetches from the IdP under way.
    pub fn fetches_in_flight(&self) -> usize {
        self.inner.fetching.load(Ordering::Relaxed)
    }

    /// Every entry, as `credbroker status` shows it: the token's fingerprint, never the token. Cheap per entry
    /// (the scope sets are shared, not copied); each shard is read-locked in turn, never two at once.
    pub fn entries(&self) -> Vec<EntryStatus> {
        let inner = &self.inner;
        let mut out = Vec::with_capacity(inner.entries.load(Ordering::Relaxed));
        for shard in &inner.shards {
            let slots: Vec<Arc<Slot>> = shard
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for slot in slots {
                let (fetching, refused) = {
                    let st = slot.state();
                    (
                        st.inflight.is_some(),
                        st.failure.as_ref().map(|(_, e)| e.to_string()),
                    )
                };
                out.push(EntryStatus {
                    client: slot.key.client.clone(),
                    scopes: slot.key.scopes.clone(),
                    token: slot.token().map(|t| TokenStatus {
                        fingerprint: t.fingerprint,
                        granted: t.granted.clone(),
                        expires_at: t.expires_at,
                        renews_at: t.refresh_at,
                    }),
                    hits: slot.hits.load(Ordering::Relaxed),
                    last_used: inner.epoch
                        + Duration::from_millis(slot.last_used.load(Ordering::Relaxed)),
                    fetching,
                    refused,
                });
            }
        }
        out
    }

    /// Drops every entry whose client `keep` rejects (their refreshers stop); returns how many went.
    pub fn retain_clients(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut dropped = Vec::new();
        for shard in &self.inner.shards {
            let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|k, s| {
                keep(&k.client) || {
                    dropped.push(s.clone());
                    false
                }
            });
        }
        for slot in &dropped {
            self.inner.unlink(slot);
        }
        dropped.len()
    }

    /// Drops the entries of `client` (every client if empty) whose scope set holds every one of `scopes`
    /// (any set if none); returns how many went. A fetch under way for a dropped entry still answers the
    /// callers waiting on it, but its token is not cached: the entry is no longer in the map.
    pub fn flush(&self, client: &str, scopes: &[String]) -> usize {
        let mut dropped = Vec::new();
        for shard in &self.inner.shards {
            let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|k, s| {
                let hit = (client.is_empty() || *k.client == *client)
                    && scopes
                        .iter()
                        .all(|want| k.scopes.iter().any(|have| have == want));
                if hit {
                    dropped.push(s.clone());
                }
                !hit
            });
        }
        for slot in &dropped {
            self.inner.unlink(slot);
        }
        dropped.len()
    }

    /// Applies new limits: the bounds on entries and bytes (enforced from the next insert) and the default
    /// min TTL that sets refresh points (from the next token stored).
    pub fn reconfigure(&self, max_entries: usize, max_bytes: usize, default_min_ttl: Duration) {
        let mut config = self.inner.config.lock().unwrap_or_else(|e| e.into_inner());
        config.max_entries = max_entries;
        config.max_bytes = max_bytes;
        config.default_min_ttl = default_min_ttl;
    }

    /// A token for `key` that satisfies `min_ttl`: the cached one, or a new one. A new fetch is started only
    /// if `admit` allows it (the caller's rate limit); joining a fetch already under way is free.
    ///
    /// # Errors
    /// [`CacheError`].
    pub async fn get(
        &self,
        key: &CacheKey,
        min_ttl: MinTtl,
        admit: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(Arc<CachedToken>, Source), CacheError> {
        let inner = &self.inner;
        let now = Instant::now();
        // A request the rate limit stops leaves nothing behind: a new entry is made only once admitted.
        let mut admit = Some(admit);
        let slot = match inner.existing(key) {
            Some(slot) => slot,
            None => {
                (admit.take().expect("not taken yet"))()
                    .map_err(|retry_in| CacheError::RateLimited { retry_in })?;
                inner.insert(key, now)
            }
        };
        slot.last_used.store(inner.millis(now), Ordering::Relaxed);
        if let Some(t) = slot.usable(min_ttl, now) {
            slot.hit();
            return Ok((t, Source::Cache));
        }
        let mut rx = {
            let mut st = slot.state();
            if let Some(t) = slot.usable(min_ttl, now) {
                slot.hit();
                return Ok((t, Source::Cache));
            }
            if let Some((at, error)) = &st.failure {
                let age = now.saturating_duration_since(*at);
                let error_ttl = inner.config().error_ttl;
                if age < error_ttl {
                    metrics().lookup(Lookup::Remembered);
                    return Err(CacheError::Remembered {
                        error: error.clone(),
                        age,
                        retry_in: error_ttl - age,
                    });
                }
                st.failure = None;
            }
            match &st.inflight {
                Some(rx) => {
                    metrics().lookup(Lookup::Joined);
                    rx.clone()
                }
                None => {
                    if let Some(admit) = admit.take() {
                        admit().map_err(|retry_in| CacheError::RateLimited { retry_in })?;
                    }
                    metrics().lookup(Lookup::Miss);
                    inner.start_fetch(&slot, &mut st, FetchKind::Caller, true)
                }
            }
        };
        drop(slot);
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| CacheError::Abandoned)?
            .clone()
            .ok_or(CacheError::Abandoned)?;
        result
            .map(|t| (t, Source::Idp))
            .map_err(CacheError::Upstream)
    }
}

impl Inner {
    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &CacheKey) -> &RwLock<HashMap<CacheKey, Arc<Slot>>> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h as usize) % SHARDS]
    }

    fn config(&self) -> CacheConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn existing(&self, key: &CacheKey) -> Option<Arc<Slot>> {
        self.shard(key)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The entry for `key`, made if missing; then, while the cache is over its bounds, the entries first in
    /// eviction order go.
    fn insert(&self, key: &CacheKey, now: Instant) -> Arc<Slot> {
        let order = (None, self.seq.fetch_add(1, Ordering::Relaxed));
        let slot = {
            let mut map = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = map.get(key) {
                return slot.clone();
            }
            let slot = Arc::new(Slot {
                key: key.clone(),
                id: order.1,
                token: RwLock::new(None),
                state: Mutex::new(SlotState::default()),
                last_used: AtomicU64::new(self.millis(now)),
                hits: AtomicU64::new(0),
                renewal_failing: std::sync::atomic::AtomicBool::new(false),
                refresher: Mutex::new(None),
                place: Mutex::new(Place { order, bytes: 0 }),
            });
            map.insert(key.clone(), slot.clone());
            slot
        };
        self.lock_order().insert(order, key.clone());
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.reweigh(&slot, None);
        slot
    }

    fn lock_order(&self) -> std::sync::MutexGuard<'_, BTreeMap<Order, CacheKey>> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `slot` at its current weight and, given `expires`, moves it to that place in the eviction
    /// order; then evicts while over the bounds.
    fn reweigh(&self, slot: &Slot, expires: Option<Instant>) {
        let bytes = slot.weight();
        let (old, new) = {
            let mut place = slot.place.lock().unwrap_or_else(|e| e.into_inner());
            let old = *place;
            place.bytes = bytes;
            if let Some(at) = expires {
                place.order.0 = Some(at);
            }
            (old, *place)
        };
        if old.order != new.order {
            let mut order = self.lock_order();
            // Only if it is still listed: a slot already unlinked stays out.
            if order.remove(&old.order).is_some() {
                order.insert(new.order, slot.key.clone());
            }
        }
        self.bytes.fetch_add(new.bytes, Ordering::Relaxed);
        self.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
        self.evict_while_over();
    }

    /// Forgets a slot just removed from its shard.
    fn unlink(&self, slot: &Slot) {
        let place = *slot.place.lock().unwrap_or_else(|e| e.into_inner());
        if self.lock_order().remove(&place.order).is_some() {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(place.bytes, Ordering::Relaxed);
        }
    }

    fn over(&self) -> bool {
        let c = self.config();
        self.entries.load(Ordering::Relaxed) > c.max_entries.max(1)
            || self.bytes.load(Ordering::Relaxed) > c.max_bytes
    }

    /// Evicts idle entries (no caller holds them, no fetch under way) in eviction order while the cache is
    /// over a bound: those without a token first, then the soonest to expire. Amortized O(log n): busy
    /// entries at the front are skipped, and there are at most as many as calls in flight.
    fn evict_while_over(&self) {
        let idle = |s: &Arc<Slot>| Arc::strong_count(s) == 1 && s.state().inflight.is_none();
        let mut after: Option<Order> = None;
        while self.over() {
            let next = {
                let order = self.lock_order();
                let mut range = match after {
                    None => order.range(..),
                    Some(a) => {
                        order.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    }
                };
                range.next().map(|(o, k)| (*o, k.clone()))
            };
            let Some((at, key)) = next else {
                return;
            };
            after = Some(at);
            let removed = {
                let mut map = self.shard(&key).write().unwrap_or_else(|e| e.into_inner());
                let evictable = map.get(&key).is_some_and(|s| {
                    idle(s) && s.place.lock().unwrap_or_else(|e| e.into_inner()).order == at
                });
                if evictable { map.remove(&key) } else { None }
            };
            if let Some(slot) = removed {
                self.unlink(&slot);
            }
        }
    }

    /// Starts the one fetch for `slot`; its result goes to every receiver of the returned channel.
    /// `first` says whether it is a first attempt (a caller's, or a renewal falling due) rather than a
    /// renewal's retry: first attempts earn the client's retry budget.
    fn start_fetch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        st: &mut SlotState,
        kind: FetchKind,
        first: bool,
    ) -> watch::Receiver<Option<FetchResult>> {
        let (tx, rx) = watch::channel(None);
        st.inflight = Some(rx.clone());
        if first {
            self.renewals.client(&slot.key.client).first_attempt();
        }
        let fetch = self.fetcher.fetch(&slot.key, kind);
        let (inner, weak) = (Arc::downgrade(self), Arc::downgrade(slot));
        // Counted until the fetch task ends, however it ends.
        struct Fetching(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Fetching {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.fetching.fetch_add(1, Ordering::Relaxed);
        let fetching = Fetching(self.fetching.clone());
        tokio::spawn(async move {
            let _fetching = fetching;
            // Should the fetch panic, its slot must not stay "in flight" forever.
            struct Unstick(Weak<Slot>);
            impl Drop for Unstick {
                fn drop(&mut self) {
                    if let Some(slot) = self.0.upgrade() {
                        slot.state().inflight = None;
                    }
                }
            }
            let unstick = Unstick(weak.clone());
            let result = fetch.await;
            std::mem::forget(unstick);
            let result = match (inner.upgrade(), weak.upgrade()) {
                (Some(inner), Some(slot)) => inner.complete(&slot, result),
                _ => result
                    .map(|t| Arc::new(CachedToken::new(t, &CacheConfig::default())))
                    .map_err(Arc::new),
            };
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Stores a fetch's outcome in its slot.
    fn complete(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        result: Result<Issued, UpstreamError>,
    ) -> FetchResult {
        self.observe(slot, &result);
        let mut st = slot.state();
        st.inflight = None;
        match result {
            Ok(mut issued) => {
                // The usual case, the requested set granted: keep one copy of it.
                if issued.granted == slot.key.scopes {
                    issued.granted = slot.key.scopes.clone();
                }
                let token = Arc::new(CachedToken::new(issued, &self.config()));
                let previous = slot
                    .token
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(token.clone());
                st.failure = None;
                drop(st);
                slot.renewal_failing.store(false, Ordering::Relaxed);
                self.reweigh(slot, Some(token.expires_at));
                tracing::info!(
                    client = %slot.key.client,
                    scopes = %slot.key.scopes,
                    token = %token.fingerprint,
                    lifetime_s = token.lifetime.as_secs(),
                    refresh_in_s = token.refresh_at.saturating_duration_since(token.issued_at).as_secs(),
                    "{}",
                    if previous.is_some() { "token renewed" } else { "token fetched" }
                );
                self.ensure_refresher(slot);
                Ok(token)
            }
            Err(e) => {
                let e = Arc::new(e);
                if !e.is_transient() {
                    st.failure = Some((Instant::now(), e.clone()));
                    drop(st);
                    self.reweigh(slot, None);
                }
                Err(e)
            }
        }
    }

    /// Tells the client's renewals how the IdP answered: a transient failure means it is failing; any answer
    /// that is not one (a token, or a refusal) means it is back.
    fn observe(&self, slot: &Slot, result: &Result<Issued, UpstreamError>) {
        let client = self.renewals.client(&slot.key.client);
        let now = Instant::now();
        match result {
            Err(e) if e.is_transient() => client.failed(e.retry_after(), now),
            _ if client.is_failing() => {
                let lifetime = match result {
                    Ok(issued) => issued.lifetime,
                    Err(_) => slot
                        .token()
                        .map_or(Duration::from_secs(300), |t| t.lifetime),
                };
                client.succeeded(self.recovery_interval(&slot.key.client, lifetime), now);
            }
            _ => {}
        }
    }

    /// The spacing of a client's renewals after a recovery: its steady renewal interval (a token of
    /// `lifetime` is renewed about every 70% of its usable life, and the client has this many entries), times
    /// [`renewal::SPREAD`].
    fn recovery_interval(&self, client: &str, lifetime: Duration) -> Duration {
        let entries: usize = self
            .shards
            .iter()
            .map(|s| {
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .filter(|k| *k.client == *client)
                    .count()
            })
            .sum();
        let usable = lifetime - MinTtl::Default(self.config().default_min_ttl).required(lifetime);
        usable
            .mul_f64(0.7 * renewal::SPREAD)
            .div_f64(entries.max(1) as f64)
    }

    fn ensure_refresher(self: &Arc<Self>, slot: &Arc<Slot>) {
        let mut task = slot.refresher.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            *task = Some(tokio::spawn(refresher(
                Arc::downgrade(self),
                Arc::downgrade(slot),
            )));
        }
    }

    /// Removes `slot` if it is still the key's entry and still holds `token` (expired) and no fetch.
    fn remove_expired(&self, slot: &Arc<Slot>, token: &Arc<CachedToken>) {
        let mut map = self
            .shard(&slot.key)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let same = map.get(&slot.key).is_some_and(|s| Arc::ptr_eq(s, slot));
        let unchanged = slot.token().is_some_and(|t| Arc::ptr_eq(&t, token));
        if same && unchanged && slot.state().inflight.is_none() {
            map.remove(&slot.key);
            drop(map);
            self.unlink(slot);
            tracing::debug!(client = %slot.key.client, scopes = %slot.key.scopes, token = %token.fingerprint, "expired token dropped");
        }
    }
}

/// Keeps one slot's token fresh while it is in use, and removes it once it expires unused.
async fn refresher(inner: Weak<Inner>, slot: Weak<Slot>) {
    loop {
        let Some(token) = slot.upgrade().and_then(|s| s.token()) else {
            return;
        };
        tokio::time::sleep_until(token.refresh_at).await;
        let (Some(inner_s), Some(slot_s)) = (inner.upgrade(), slot.upgrade()) else {
            return;
        };
        if !slot_s.token().is_some_and(|t| Arc::ptr_eq(&t, &token)) {
            // Replaced by a fetch a caller triggered: follow the new token.
            continue;
        }
        if Instant::now() >= token.expires_at {
            inner_s.remove_expired(&slot_s, &token);
            return;
        }
        // In use: asked for after it arrived (the request that caused the fetch asked before).
        let in_use = slot_s.last_used.load(Ordering::Relaxed) > inner_s.millis(token.issued_at);
        if !in_use {
            tracing::debug!(client = %slot_s.key.client, scopes = %slot_s.key.scopes, token = %token.fingerprint, "token not in use: not refreshing it");
            drop((inner_s, slot_s));
            tokio::time::sleep_until(token.expires_at).await;
            let (Some(inner_s), Some(slot_s)) = (inner.upgrade(), slot.upgrade()) else {
                return;
            };
            if slot_s.token().is_some_and(|t| Arc::ptr_eq(&t, &token)) {
                inner_s.remove_expired(&slot_s, &token);
                return;
            }
            // A caller fetched a new token meanwhile: look after that one.
            continue;
        }
        drop((inner_s, slot_s));
        if renew(&inner, &slot, &token).await.is_none() {
            return;
        }
    }
}

/// Renews `token` of `slot`: a first attempt, then, while it fails, tries after a growing, jittered backoff,
/// within the client's retry budget, and in the client's recovery order once the IdP answers again
/// ([`crate::tokens::renewal`]). Returns when the slot has a new token (`Some`), or is gone (`None`).
async fn renew(inner: &Weak<Inner>, slot: &Weak<Slot>, token: &Arc<CachedToken>) -> Option<()> {
    let (client, id, mut recovered) = {
        let (inner_s, slot_s) = (inner.upgrade()?, slot.upgrade()?);
        let client = inner_s.renewals.client(&slot_s.key.client);
        let recovered = client.subscribe();
        (client, slot_s.id, recovered)
    };
    // The IdP asked for a pause (`Retry-After`): a renewal falling due waits for it too, jittered.
    if let Some(until) = client.not_before(Instant::now()) {
        let jitter = renewal::BASE.mul_f64(random_fraction());
        tokio::time::sleep_until(until + jitter).await;
    }
    let mut n = 0u32;
    loop {
        let rx = {
            let (inner_s, slot_s) = (inner.upgrade()?, slot.upgrade()?);
            if !slot_s.token().is_some_and(|t| Arc::ptr_eq(&t, token)) {
                client.done(id, token.expires_at);
                return Some(());
            }
            let mut st = slot_s.state();
            match &st.inflight {
                Some(rx) => rx.clone(),
                None => {
                    metrics().renewal();
                    tracing::debug!(client = %slot_s.key.client, scopes = %slot_s.key.scopes, token = %token.fingerprint, attempt = n + 1, "renewing ahead of expiry");
                    inner_s.start_fetch(&slot_s, &mut st, FetchKind::Renewal, n == 0)
                }
            }
        };
        let outcome = wait_fetch(rx).await?;
        match outcome {
            Ok(_) => {
                client.done(id, token.expires_at);
                return Some(());
            }
            Err(e) => {
                let slot_s = slot.upgrade();
                // Failing before counted: whoever sees the count then sees stale serves counted.
                if let Some(slot_s) = &slot_s {
                    slot_s.renewal_failing.store(true, Ordering::Relaxed);
                }
                metrics().renewal_failed();
                let slot_s = slot_s?;
                tracing::warn!(
                    client = %slot_s.key.client,
                    scopes = %slot_s.key.scopes,
                    error = %e,
                    left_s = token.remaining(Instant::now()).as_secs(),
                    "renewal failed; the cached token is served until it expires"
                );
                if n == 0 {
                    client.wait(id, token.expires_at);
                }
            }
        }
        // The next try: after a backoff; while the client is failing, only with a retry from its budget (or
        // for a token about to expire); after a recovery, in the key's turn.
        loop {
            n += 1;
            let remaining = token.remaining(Instant::now());
            let mut pause = renewal::backoff(n, remaining, random_fraction());
            if let Some(until) = client.not_before(Instant::now()) {
                pause = pause.max(until - Instant::now());
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = recovered.changed() => {}
            }
            let (inner_s, slot_s) = (inner.upgrade()?, slot.upgrade()?);
            if !slot_s.token().is_some_and(|t| Arc::ptr_eq(&t, token)) {
                client.done(id, token.expires_at);
                return Some(());
            }
            if Instant::now() >= token.expires_at {
                client.done(id, token.expires_at);
                inner_s.remove_expired(&slot_s, token);
                return None;
            }
            drop((inner_s, slot_s));
            if !client.is_failing() {
                if let Some(turn) = client.slot(id) {
                    tokio::time::sleep_until(turn).await;
                }
                break;
            }
            if token.remaining(Instant::now()) < renewal::LAST_RESORT || client.take_retry() {
                break;
            }
        }
    }
}

/// The outcome of a fetch; `None` if it went away without one.
async fn wait_fetch(mut rx: watch::Receiver<Option<FetchResult>>) -> Option<FetchResult> {
    rx.wait_for(Option::is_some).await.ok()?.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fetcher that records when it was called and answers as told.
    struct Fake {
        calls: AtomicUsize,
        at: Mutex<Vec<Instant>>,
        /// The first scope of each fetch, in order.
        keys: Mutex<Vec<String>>,
        lifetime: Duration,
        delay: Duration,
        fail: Mutex<Option<fn() -> UpstreamError>>,
        gate: watch::Receiver<bool>,
    }

    impl Fake {
        fn new(lifetime: u64) -> (Arc<Self>, watch::Sender<bool>) {
            let (tx, gate) = watch::channel(true);
            let fake = Arc::new(Self {
                calls: AtomicUsize::new(0),
                at: Mutex::new(Vec::new()),
                keys: Mutex::new(Vec::new()),
                lifetime: Duration::from_secs(lifetime),
                delay: Duration::ZERO,
                fail: Mutex::new(None),
                gate,
            });
            (fake, tx)
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Fetcher for Fake {
        fn fetch(&self, key: &CacheKey, _: FetchKind) -> FetchFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.at.lock().unwrap().push(Instant::now());
            self.keys
                .lock()
                .unwrap()
                .push(key.scopes.iter().next().unwrap_or("").to_owned());
            let (lifetime, delay, mut gate) = (self.lifetime, self.delay, self.gate.clone());
            let fail = *self.fail.lock().unwrap();
            let scopes = key.scopes.clone();
            Box::pin(async move {
                gate.wait_for(|open| *open).await.unwrap();
                tokio::time::sleep(delay).await;
                if let Some(f) = fail {
                    return Err(f());
                }
                Ok(Issued {
                    access_token: SecretString::from(format!("token-{n}")),
                    token_type: "Bearer".into(),
                    lifetime,
                    received_at: Instant::now(),
                    granted: scopes,
                    credential: None,
                })
            })
        }
    }

    fn key(scopes: &[&str]) -> CacheKey {
        CacheKey {
            client: "idp".into(),
            scopes: ScopeSet::parse(scopes).unwrap(),
        }
    }

    const DEFAULT: MinTtl = MinTtl::Default(Duration::from_secs(60));

    fn open() -> Result<(), Duration> {
        Ok(())
    }

    fn token_of(r: &(Arc<CachedToken>, Source)) -> &str {
        r.0.access_token.expose_secret()
    }

    /// Lets spawned tasks run up to the current (paused) instant.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hits_until_min_ttl_then_refetches() {
        let (fake, _gate) = Fake::new(3600);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        let r = cache.get(&k, DEFAULT, open).await.unwrap();
        assert_eq!((token_of(&r), r.1), ("token-0", Source::Idp));
        let r = cache.get(&k, DEFAULT, open).await.unwrap();
        assert_eq!((token_of(&r), r.1), ("token-0", Source::Cache));
        // 400 s left: enough by default, not for a caller that needs 500 s.
        tokio::time::advance(Duration::from_secs(3200)).await;
        let r = cache
            .get(&k, MinTtl::Explicit(Duration::from_secs(500)), open)
            .await
            .unwrap();
        assert_eq!(r.1, Source::Idp);
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn default_min_ttl_is_at_most_half_the_lifetime() {
        assert_eq!(
            DEFAULT.required(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        let (fake, _gate) = Fake::new(30);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        cache.get(&k, DEFAULT, open).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(cache.get(&k, DEFAULT, open).await.unwrap().1, Source::Cache);
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_cold_callers_makes_one_fetch_and_other_keys_do_not_wait() {
        let (fake, gate) = Fake::new(3600);
        gate.send(false).unwrap();
        let cache = Arc::new(TokenCache::new(fake.clone(), CacheConfig::default()));
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key(&["a"]), DEFAULT, open)
                    .await
                    .unwrap()
                    .0
                    .fingerprint
            }));
        }
        settle().await;
        assert_eq!(fake.calls(), 1);
        // Key "a" is stuck at the IdP; key "b" must not wait for it — but its own fetch is gated too, so
        // check it is under way independently.
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(&["b"]), DEFAULT, open).await.unwrap() }
        });
        settle().await;
        assert_eq!(
            fake.calls(),
            2,
            "key b started its own fetch while a's was pending"
        );
        gate.send(true).unwrap();
        let first = tasks.remove(0).await.unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap(), first);
        }
        b.await.unwrap();
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_does_not_cancel_the_shared_fetch() {
        let (fake, gate) = Fake::new(3600);
        gate.send(false).unwrap();
        let cache = Arc::new(TokenCache::new(fake.clone(), CacheConfig::default()));
        let impatient = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(&["a"]), DEFAULT, open).await }
        });
        let patient = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(&["a"]), DEFAULT, open).await }
        });
        settle().await;
        impatient.abort();
        settle().await;
        gate.send(true).unwrap();
        assert_eq!(token_of(&patient.await.unwrap().unwrap()), "token-0");
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_in_use_is_refreshed_ahead_of_expiry_and_callers_never_wait() {
        let (fake, _gate) = Fake::new(100);
        // An IdP that takes 5 s per request.
        let fake = Arc::new(Fake {
            delay: Duration::from_secs(5),
            ..Arc::into_inner(fake).unwrap()
        });
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        let start = Instant::now();
        cache.get(&k, DEFAULT, open).await.unwrap();
        let issued = Instant::now();
        assert_eq!(issued - start, Duration::from_secs(5));
        // Keep using it every second, as a busy caller would; every call is a hit and takes no time.
        for _ in 0..150 {
            tokio::time::advance(Duration::from_secs(1)).await;
            settle().await;
            let before = Instant::now();
            let r = cache.get(&k, DEFAULT, open).await.unwrap();
            assert_eq!(r.1, Source::Cache);
            assert_eq!(Instant::now(), before, "a hit never waits");
            assert!(r.0.remaining(before) >= Duration::from_secs(50));
        }
        // 150 s of use of a 100 s token whose usable life is 50 s (the default min TTL is capped at half):
        // refreshed several times, each between 65% and 75% of those 50 s (plus the 1 s step of this test's
        // clock).
        let at = fake.at.lock().unwrap().clone();
        assert!(at.len() >= 3, "{at:?}");
        let first_refresh = at[1] - issued;
        assert!(
            first_refresh >= Duration::from_millis(32_500)
                && first_refresh <= Duration::from_millis(38_500),
            "{first_refresh:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_points_are_jittered() {
        let (fake, _gate) = Fake::new(1000);
        let cache = Arc::new(TokenCache::new(fake.clone(), CacheConfig::default()));
        let keys: Vec<CacheKey> = (0..20).map(|i| key(&[&format!("s{i}")])).collect();
        let start = Instant::now();
        for k in &keys {
            cache.get(k, DEFAULT, open).await.unwrap();
        }
        for _ in 0..800 {
            tokio::time::advance(Duration::from_secs(1)).await;
            settle().await;
            for k in &keys {
                cache.get(k, DEFAULT, open).await.unwrap();
            }
        }
        let at = fake.at.lock().unwrap().clone();
        // Usable life: 1000 s less the 60 s default min TTL; refreshes between 65% and 75% of that (611 to
        // 705 s), seen at the next 1 s step of this test's clock.
        let refreshes: Vec<Duration> = at[20..40].iter().map(|t| *t - start).collect();
        assert!(
            refreshes
                .iter()
                .all(|d| *d >= Duration::from_secs(611) && *d <= Duration::from_secs(706)),
            "{refreshes:?}"
        );
        let distinct: std::collections::HashSet<_> = refreshes.iter().collect();
        assert!(distinct.len() > 3, "refreshes in lockstep: {refreshes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_nobody_uses_is_not_refreshed_and_leaves_at_expiry() {
        let (fake, _gate) = Fake::new(100);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        cache.get(&key(&["a"]), DEFAULT, open).await.unwrap();
        assert_eq!(cache.len(), 1);
        tokio::time::advance(Duration::from_secs(99)).await;
        settle().await;
        assert_eq!(fake.calls(), 1);
        assert_eq!(cache.len(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(cache.len(), 0);
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_serving_the_valid_token() {
        let (fake, _gate) = Fake::new(100);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        cache.get(&k, DEFAULT, open).await.unwrap();
        *fake.fail.lock().unwrap() = Some(|| UpstreamError::Server {
            status: 503,
            retry_after: None,
        });
        for _ in 0..9 {
            tokio::time::advance(Duration::from_secs(10)).await;
            settle().await;
            let r = cache
                .get(&k, MinTtl::Explicit(Duration::from_secs(1)), open)
                .await
                .unwrap();
            assert_eq!((token_of(&r), r.1), ("token-0", Source::Cache));
        }
        assert!(fake.calls() >= 2, "the refresher kept trying");
    }

    /// Ten keys fetched a minute apart; the IdP fails from before their renewals until after the last one
    /// failed; then a new key's fetch finds it back.
    #[tokio::test(start_paused = true)]
    async fn an_outage_costs_few_retries_and_recovery_renews_soonest_expiry_first_spread_out() {
        let (fake, _gate) = Fake::new(3600);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let keys: Vec<CacheKey> = (0..10).map(|i| key(&[&format!("k{i}")])).collect();
        for k in &keys {
            cache.get(k, DEFAULT, open).await.unwrap();
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        // In use: each asked for again after its token arrived.
        for k in &keys {
            cache.get(k, DEFAULT, open).await.unwrap();
        }
        *fake.fail.lock().unwrap() = Some(|| UpstreamError::Server {
            status: 503,
            retry_after: None,
        });
        // Every renewal point passes (at most 75% of 3540 s after each token arrived: by 3195 s).
        let start = Instant::now() - Duration::from_secs(600);
        while start.elapsed() < Duration::from_secs(3200) {
            tokio::time::advance(Duration::from_secs(5)).await;
            settle().await;
        }
        // Each key tried once; retries only from the budget its first attempts earned (10 × 0.1 = 1).
        let during = fake.calls() - 10;
        assert!(
            (10..=11).contains(&during),
            "{during} IdP requests during the outage"
        );

        // The IdP is back; a new key's fetch finds out.
        *fake.fail.lock().unwrap() = None;
        cache.get(&key(&["new"]), DEFAULT, open).await.unwrap();
        let recovered = fake.calls();
        while start.elapsed() < Duration::from_secs(4300) {
            tokio::time::advance(Duration::from_secs(5)).await;
            settle().await;
        }
        let keys_after: Vec<String> = fake.keys.lock().unwrap()[recovered..].to_vec();
        let at_after: Vec<Instant> = fake.at.lock().unwrap()[recovered..].to_vec();
        let order: Vec<&str> = keys_after.iter().map(String::as_str).collect();
        assert_eq!(
            order,
            ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"],
            "one renewal each, soonest expiry first"
        );
        for (i, pair) in at_after.windows(2).enumerate() {
            assert!(
                pair[1] - pair[0] >= Duration::from_secs(30),
                "renewals {i} and {} {:?} apart",
                i + 1,
                pair[1] - pair[0]
            );
        }
        // Every key renewed before its token expired (key i's expires 3600 + 60 i s after the start).
        for (i, at) in at_after.iter().enumerate() {
            assert!(
                at.duration_since(start) < Duration::from_secs(3600 + 60 * i as u64),
                "k{i} renewed at {:?}",
                at.duration_since(start)
            );
        }
        for k in &keys {
            let (t, source) = cache.get(k, DEFAULT, open).await.unwrap();
            assert_eq!(source, Source::Cache);
            assert!(t.remaining(Instant::now()) > Duration::from_secs(1800));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_are_remembered_briefly() {
        let (fake, _gate) = Fake::new(100);
        *fake.fail.lock().unwrap() = Some(|| UpstreamError::Rejected {
            status: 400,
            code: Some("invalid_scope".into()),
            description: None,
        });
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        assert!(matches!(
            cache.get(&k, DEFAULT, open).await,
            Err(CacheError::Upstream(_))
        ));
        tokio::time::advance(Duration::from_secs(5)).await;
        let e = cache.get(&k, DEFAULT, open).await.unwrap_err();
        assert!(matches!(e, CacheError::Remembered { .. }), "{e}");
        assert!(e.to_string().contains("invalid_scope"), "{e}");
        assert_eq!(fake.calls(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(matches!(
            cache.get(&k, DEFAULT, open).await,
            Err(CacheError::Upstream(_))
        ));
        assert_eq!(fake.calls(), 2);
        // Transient errors are not remembered.
        *fake.fail.lock().unwrap() = Some(|| UpstreamError::Server {
            status: 503,
            retry_after: None,
        });
        let k2 = key(&["b"]);
        assert!(cache.get(&k2, DEFAULT, open).await.is_err());
        assert!(matches!(
            cache.get(&k2, DEFAULT, open).await,
            Err(CacheError::Upstream(_))
        ));
        assert_eq!(fake.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn only_new_fetches_are_rate_limited() {
        let (fake, _gate) = Fake::new(3600);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        cache.get(&k, DEFAULT, open).await.unwrap();
        let refuse = || Err(Duration::from_secs(3));
        assert_eq!(
            cache.get(&k, DEFAULT, refuse).await.unwrap().1,
            Source::Cache
        );
        let e = cache.get(&key(&["b"]), DEFAULT, refuse).await.unwrap_err();
        assert!(
            matches!(e, CacheError::RateLimited { retry_in } if retry_in == Duration::from_secs(3))
        );
        assert_eq!(fake.calls(), 1);
        // A refused request left nothing behind: thousands of them do not grow the cache.
        let (entries, bytes) = (cache.len(), cache.bytes());
        for i in 0..5000 {
            let _ = cache.get(&key(&[&format!("x{i}")]), DEFAULT, refuse).await;
        }
        assert_eq!((cache.len(), cache.bytes()), (entries, bytes));
    }

    #[tokio::test(start_paused = true)]
    async fn flush_drops_the_entries_of_a_client_holding_the_given_scopes() {
        let (fake, _gate) = Fake::new(3600);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        for scopes in [&["a"][..], &["a", "b"], &["b"]] {
            cache.get(&key(scopes), DEFAULT, open).await.unwrap();
        }
        assert_eq!(cache.flush("other", &[]), 0);
        assert_eq!(cache.flush("idp", &["a".to_owned()]), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.flush("", &[]), 1);
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        // The next request asks the IdP again.
        let before = fake.calls();
        cache.get(&key(&["a"]), DEFAULT, open).await.unwrap();
        assert_eq!(fake.calls(), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_bytes_counting_remembered_refusals() {
        let (fake, _gate) = Fake::new(3600);
        let max_bytes = 64 * 1024;
        let cache = TokenCache::new(
            fake.clone(),
            CacheConfig {
                max_bytes,
                ..CacheConfig::default()
            },
        );
        // The largest scope sets allowed: 64 scopes of 256 bytes.
        let big = |i: usize| -> Vec<String> {
            (0..64)
                .map(|j| format!("{i:04}{j:02}{}", "s".repeat(250)))
                .collect()
        };
        for i in 0..40 {
            let scopes = big(i);
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            cache.get(&key(&scopes), DEFAULT, open).await.unwrap();
            assert!(cache.bytes() <= max_bytes, "{} bytes", cache.bytes());
        }
        assert!(
            !cache.is_empty() && cache.len() < 40,
            "{} entries",
            cache.len()
        );
        // Remembered refusals count too.
        *fake.fail.lock().unwrap() = Some(|| UpstreamError::Rejected {
            status: 400,
            code: Some("invalid_scope".into()),
            description: Some("d".repeat(8000)),
        });
        for i in 100..140 {
            let _ = cache.get(&key(&[&format!("r{i}")]), DEFAULT, open).await;
            assert!(cache.bytes() <= max_bytes, "{} bytes", cache.bytes());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_entries_across_shards_dropping_the_soonest_to_expire() {
        let (fake, _gate) = Fake::new(3600);
        let cache = TokenCache::new(
            fake.clone(),
            CacheConfig {
                max_entries: 3,
                ..CacheConfig::default()
            },
        );
        for i in 0..50 {
            cache
                .get(&key(&[&format!("s{i}")]), DEFAULT, open)
                .await
                .unwrap();
            assert!(cache.len() <= 3, "{} entries", cache.len());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // The newest three remain: the others expired soonest.
        assert_eq!(cache.inner.lock_order().len(), 3);
        let before = fake.calls();
        for i in 47..50 {
            assert_eq!(
                cache
                    .get(&key(&[&format!("s{i}")]), DEFAULT, open)
                    .await
                    .unwrap()
                    .1,
                Source::Cache
            );
        }
        assert_eq!(fake.calls(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_fetched_while_its_predecessor_idled_is_still_renewed() {
        let (fake, _gate) = Fake::new(1000);
        let cache = TokenCache::new(fake.clone(), CacheConfig::default());
        let k = key(&["a"]);
        cache.get(&k, DEFAULT, open).await.unwrap();
        // Unused: its refresher decides not to renew and waits for expiry (usable life 940 s, renewal ~650 s).
        tokio::time::advance(Duration::from_secs(900)).await;
        settle().await;
        assert_eq!(fake.calls(), 1);
        // A caller that needs more than is left fetches a new token meanwhile, and keeps using it.
        let r = cache
            .get(&k, MinTtl::Explicit(Duration::from_secs(200)), open)
            .await
            .unwrap();
        assert_eq!(r.1, Source::Idp);
        for _ in 0..800 {
            tokio::time::advance(Duration::from_secs(1)).await;
            settle().await;
            cache.get(&k, DEFAULT, open).await.unwrap();
        }
        assert!(
            fake.calls() >= 3,
            "the new token was never renewed ahead: {} fetches",
            fake.calls()
        );
    }

    #[test]
    fn fingerprints_are_short_hex_and_not_the_token() {
        let fp = Fingerprint::of("secret-token").to_string();
        assert_eq!(fp.len(), 12);
        assert!(!fp.contains("secret"));
    }
}
