//! Renewals through an IdP outage, per client, so that a fleet of brokers does not flatten a recovering IdP.
//!
//! A token is renewed ahead of expiry by one attempt (a *first attempt*). When it fails, the key waits:
//!
//! - **Backoff that grows with the outage.** The key's next try comes after a full-jitter exponential backoff
//!   ([`backoff`]): from [`BASE`] doubling up to a quarter of the token's remaining life, at most [`CAP`], and
//!   never before the IdP's `Retry-After`. As the token nears expiry the pauses shrink with it, so there are
//!   always tries left to renew in time once the IdP is back.
//! - **A retry budget.** While the client is failing, a try is made only if the client's budget has a retry:
//!   each first attempt earns [`RETRY_RATIO`](crate::tokens::retry::RETRY_RATIO) of one, and the budget starts
//!   empty when the failures start. Otherwise the key waits for its next scheduled try. Only a token about to
//!   expire ([`LAST_RESORT`]) tries without a retry. So retries stay a small fraction of the renewals that fall
//!   due anyway.
//! - **Recovery without a herd.** When an attempt succeeds again, the waiting keys are given slots in order of
//!   expiry, the soonest first, spaced by the client's own steady renewal interval (times [`SPREAD`]): the
//!   window grows with the number waiting, and no host renews faster than it does in steady state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// First backoff step after a failed renewal.
pub const BASE: Duration = Duration::from_secs(2);
/// Largest pause between tries.
pub const CAP: Duration = Duration::from_secs(300);
/// A token with less than this left tries without a retry from the budget.
pub const LAST_RESORT: Duration = Duration::from_secs(180);
/// Recovery slots are this many steady renewal intervals apart.
pub const SPREAD: f64 = 1.5;
/// Most retries a failing client's budget holds.
const MAX_EARNED: f64 = 2.0;

/// The pause before try `n` (1 for the first retry) of a renewal whose token has `remaining` left: uniform in
/// `[0, min(BASE·2^(n-1), remaining/4, CAP)]`, `random` in `[0, 1)`.
pub fn backoff(n: u32, remaining: Duration, random: f64) -> Duration {
    let grown = BASE.saturating_mul(1 << n.saturating_sub(1).min(20));
    grown
        .min(remaining / 4)
        .min(CAP)
        .mul_f64(random.clamp(0.0, 1.0))
}

#[derive(Default)]
struct State {
    /// Since the last attempt for this client failed (transiently): the IdP is down or overloaded.
    failing: bool,
    /// Retries earned since the failures started.
    earned: f64,
    /// `Retry-After`: no try before this.
    not_before: Option<Instant>,
    /// Keys whose renewal failed, by their token's expiry.
    waiting: BTreeMap<(Instant, u64), ()>,
    /// After a recovery, when each waiting key renews.
    slots: HashMap<u64, Instant>,
}

/// One client's renewals.
pub struct ClientRenewals {
    ratio: f64,
    state: Mutex<State>,
    /// Bumped at each recovery, to wake the waiting keys.
    recovered: watch::Sender<u64>,
}

impl ClientRenewals {
    fn new(ratio: f64) -> Self {
        Self {
            ratio,
            state: Mutex::default(),
            recovered: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the client is failing.
    pub fn is_failing(&self) -> bool {
        self.lock().failing
    }

    /// When the next try may be made (`Retry-After`), if that is later than now.
    pub fn not_before(&self, now: Instant) -> Option<Instant> {
        self.lock().not_before.filter(|t| *t > now)
    }

    /// A first attempt (a renewal falling due, or a fetch a caller waits for): earns a fraction of a retry
    /// while the client is failing.
    pub fn first_attempt(&self) {
        let mut st = self.lock();
        if st.failing {
            st.earned = (st.earned + self.ratio).min(MAX_EARNED);
        }
    }

    /// Takes a retry from the budget, if there is one.
    pub fn take_retry(&self) -> bool {
        let mut st = self.lock();
        if !st.failing {
            return true;
        }
        if st.earned >= 1.0 - 1e-9 {
            st.earned = (st.earned - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// An attempt failed transiently: the client is failing (its budget starts empty) and, with a
    /// `Retry-After`, not tried again before it.
    pub fn failed(&self, retry_after: Option<Duration>, now: Instant) {
        let mut st = self.lock();
        if !st.failing {
            st.failing = true;
            st.earned = 0.0;
            st.slots.clear();
        }
        if let Some(after) = retry_after {
            let until = now + after;
            st.not_before = Some(st.not_before.map_or(until, |t| t.max(until)));
        }
    }

    /// An attempt succeeded (or the IdP answered): if the client was failing, the waiting keys get their
    /// recovery slots, soonest expiry first, `interval` apart from a random phase in the first interval (so
    /// hosts that learn of the recovery together do not renew together), each leaving its token a quarter of
    /// its remaining life, and at least [`LAST_RESORT`], to retry in; then they are woken.
    pub fn succeeded(&self, interval: Duration, now: Instant) {
        self.recovered_at(interval, crate::tokens::retry::random_fraction(), now);
    }

    fn recovered_at(&self, interval: Duration, phase: f64, now: Instant) {
        let mut st = self.lock();
        if !st.failing {
            return;
        }
        st.failing = false;
        st.not_before = None;
        let slots: Vec<(u64, Instant)> = st
            .waiting
            .keys()
            .enumerate()
            .map(|(i, (expires, id))| {
                let turn = now + interval.mul_f64(i as f64 + phase);
                let remaining = expires.saturating_duration_since(now);
                let latest = now + remaining.saturating_sub((remaining / 4).max(LAST_RESORT));
                (*id, turn.min(latest))
            })
            .collect();
        st.slots = slots.into_iter().collect();
        drop(st);
        self.recovered.send_modify(|n| *n += 1);
    }

    /// Key `id`, whose token expires at `expires`, waits to renew.
    pub fn wait(&self, id: u64, expires: Instant) {
        self.lock().waiting.insert((expires, id), ());
    }

    /// Key `id` no longer waits (renewed, replaced or gone).
    pub fn done(&self, id: u64, expires: Instant) {
        let mut st = self.lock();
        st.waiting.remove(&(expires, id));
        st.slots.remove(&id);
    }

    /// The recovery slot of key `id`, if it has one.
    pub fn slot(&self, id: u64) -> Option<Instant> {
        self.lock().slots.get(&id).copied()
    }

    /// Keys waiting.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Changes at each recovery.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.recovered.subscribe()
    }
}

/// Every client's renewals.
pub struct Renewals {
    ratio: f64,
    clients: Mutex<HashMap<Arc<str>, Arc<ClientRenewals>>>,
}

impl Renewals {
    /// Renewals whose budgets earn `ratio` of a retry per first attempt.
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio,
            clients: Mutex::default(),
        }
    }

    /// The renewals of `client`.
    pub fn client(&self, client: &Arc<str>) -> Arc<ClientRenewals> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(client.clone())
            .or_insert_with(|| Arc::new(ClientRenewals::new(self.ratio)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_from_seconds_to_a_quarter_of_the_remaining_life() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            backoff(1, hour, 0.999_999),
            Duration::from_secs(2).mul_f64(0.999_999)
        );
        assert_eq!(backoff(4, hour, 0.5), Duration::from_secs(8));
        assert_eq!(backoff(20, hour, 0.5), CAP / 2);
        // Near expiry, pauses shrink with what is left.
        assert_eq!(
            backoff(20, Duration::from_secs(120), 0.5),
            Duration::from_secs(15)
        );
        assert_eq!(backoff(3, hour, 0.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_earned_from_first_attempts_while_failing_and_recovery_is_spread() {
        let c = ClientRenewals::new(0.1);
        assert!(c.take_retry(), "a healthy client is not throttled");
        let now = Instant::now();
        c.failed(Some(Duration::from_secs(30)), now);
        assert!(!c.take_retry(), "the budget starts empty");
        for _ in 0..10 {
            c.first_attempt();
        }
        assert!(c.take_retry());
        assert!(!c.take_retry());
        assert_eq!(c.not_before(now), Some(now + Duration::from_secs(30)));
        // Three keys wait; the one expiring first renews first, each leaving time to retry before its expiry.
        let at = |s| now + Duration::from_secs(s);
        c.wait(1, at(3000));
        c.wait(2, at(600));
        c.wait(3, at(2000));
        let woken = c.subscribe();
        c.recovered_at(Duration::from_secs(200), 0.0, now);
        assert!(woken.has_changed().unwrap());
        assert_eq!(c.slot(2), Some(now));
        assert_eq!(c.slot(3), Some(at(200)));
        assert_eq!(c.slot(1), Some(at(400)));
        c.wait(4, at(500));
        c.failed(None, now);
        c.recovered_at(Duration::from_secs(200), 0.0, now);
        assert_eq!(c.slot(4), Some(now), "soonest expiry first");
        assert_eq!(c.slot(2), Some(at(200)));
        assert!(!c.is_failing());
    }
}
