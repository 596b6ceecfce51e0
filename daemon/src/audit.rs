//! The audit trail: one structured event per GetToken decision and per admin call, under the
//! `credbroker::audit` target so it can be routed apart from operational logs.
//!
//! Every line a caller can cause (denials, failures including rate-limited calls, refused and allowed admin
//! calls, grants) goes through one line budget ([`LogBudget`]): per uid for a caller some policy matches and
//! the user database names, and one shared budget for every other caller. Beyond its budget
//! ([`LOG_LINES_PER_MINUTE`], in bursts of [`LOG_BURST`]) a line is counted instead, and one `suppressed`
//! event per budget says how many of each kind were not logged (at the budget's next logged line, or within
//! 30 s). Callers without a name in the user database are pooled because that is what a range of uids that
//! acts together looks like: a user's subordinate uids (`/etc/subuid`, 65,536 by default) have no names on
//! the host, so one user spreading over them gains nothing.
//!
//! A grant is logged the first time a uid receives a given token; repeats are counted per (uid, token), not
//! per connection, and summed up in a `grant-repeats` event when the token expires or every 10 minutes, so
//! neither a caller asking thousands of times a second nor one that reconnects for every call floods the
//! journal or slows the hot path.
//!
//! Every event is bounded (about 1.5 KiB): what a caller sent, and its executable and unit, appear as an
//! escaped prefix with counts ([`crate::text`]). So one budget writes at most about
//! `(LOG_BURST + LOG_LINES_PER_MINUTE) × 1.5 KiB` in its first minute and `LOG_LINES_PER_MINUTE × 1.5 KiB`
//! (60 KiB) a minute after that.
//!
//! # Security
//! Events name tokens by [`Fingerprint`] only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::identity::peer::Caller;
use crate::policy::scope::ScopeSet;
use crate::text::{ClipList, clip, cut};
use crate::tokens::cache::{Fingerprint, Source};
use crate::tokens::ratelimit::{Rate, RateLimiter};

/// Lines a budget may log a minute, beyond its burst.
pub const LOG_LINES_PER_MINUTE: u32 = 40;
/// Lines a budget may log at once before the rate applies.
pub const LOG_BURST: u32 = 20;
/// Longest `reason` logged.
const MAX_REASON: usize = 600;
/// How the shared budget is keyed in the limiter (no uid can be `u32::MAX`: it is `(uid_t) -1`).
const POOLED: u32 = u32::MAX;
/// Grants tracked for deduplication; beyond, a grant is logged (within its budget) every time.
const MAX_TRACKED_GRANTS: usize = 16 * 1024;
/// How often the repeats of a token still in use are summed up.
const REPEATS_EVERY: Duration = Duration::from_secs(600);

/// The tracing target of audit events.
pub const TARGET: &str = "credbroker::audit";

/// Whose line budget a line counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogKey {
    /// A uid that some policy matches and the user database names.
    Uid(u32),
    /// Every other caller, together (and callers the daemon could not identify).
    Pooled,
}

impl LogKey {
    /// The budget of `caller`, given whether some policy matches it.
    pub fn of(caller: &Caller, matched: bool) -> Self {
        if matched && caller.user.is_some() {
            Self::Uid(caller.uid)
        } else {
            Self::Pooled
        }
    }

    fn limiter_key(self) -> u32 {
        match self {
            Self::Uid(uid) => uid,
            Self::Pooled => POOLED,
        }
    }
}

/// What kind of line was suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Kind {
    /// A refused request.
    Deny,
    /// An allowed request that got no token (IdP failure, rate limit).
    Error,
    /// An admin call.
    Admin,
    /// A token handed out.
    Grant,
    /// Repeats of a grant, summed up.
    Repeats,
}

const KINDS: [&str; 5] = ["deny", "error", "admin", "grant", "grant-repeats"];

/// One line budget per [`LogKey`], with counts of what each did not log.
pub struct LogBudget {
    rate: RateLimiter,
    suppressed: Mutex<HashMap<LogKey, [u64; 5]>>,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new(Rate {
            per_minute: LOG_LINES_PER_MINUTE,
            burst: LOG_BURST,
        })
    }
}

impl LogBudget {
    /// Budgets of `rate` lines.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate: RateLimiter::new(rate),
            suppressed: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` may log a line of `kind` now; if not, the line is counted. Before a line is allowed,
    /// what its budget suppressed so far is summed up.
    pub fn allow(&self, key: LogKey, kind: Kind) -> bool {
        if self
            .rate
            .try_acquire(key.limiter_key(), Instant::now())
            .is_err()
        {
            self.lock().entry(key).or_default()[kind as usize] += 1;
            crate::telemetry::metrics().log_line_suppressed(KINDS[kind as usize]);
            return false;
        }
        if let Some(counts) = self.lock().remove(&key) {
            suppressed(key, &counts);
        }
        true
    }

    /// Sums up, for every budget, what it did not log since its last summary.
    pub fn flush(&self) {
        let counts = std::mem::take(&mut *self.lock());
        for (key, counts) in counts {
            suppressed(key, &counts);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LogKey, [u64; 5]>> {
        self.suppressed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn suppressed(key: LogKey, counts: &[u64; 5]) {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return;
    }
    let by_kind = KINDS
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    match key {
        LogKey::Uid(uid) => tracing::warn!(
            target: TARGET,
            event = "suppressed",
            uid,
            count = total,
            kinds = by_kind.as_str(),
            "lines of this uid not logged (over its log budget)"
        ),
        LogKey::Pooled => tracing::warn!(
            target: TARGET,
            event = "suppressed",
            pooled = true,
            count = total,
            kinds = by_kind.as_str(),
            "lines of callers no policy matches or the user database does not name, not logged (over \
             their shared log budget)"
        ),
    }
}

/// The caller's executable for a log field: clipped, and marked when it is not what it seems (a path in
/// another mount namespace, or read too late to be judged).
fn exe(caller: &Caller) -> String {
    let exe = caller
        .exe
        .as_ref()
        .map(|e| e.to_string_lossy())
        .unwrap_or_default();
    match &caller.exe_note {
        Some(note) => format!("{} ({note})", clip(&exe)),
        None => clip(&exe).to_string(),
    }
}

fn unit(caller: &Caller) -> String {
    clip(caller.unit.as_deref().unwrap_or("")).to_string()
}

/// The audit trail of a running daemon: its line budgets and the grants it has logged.
#[derive(Default)]
pub struct Audit {
    budget: LogBudget,
    grants: Mutex<HashMap<(u32, Fingerprint), Tracked>>,
    /// (uid, token, target origin) of proofs logged, until the token expires.
    proofs: Mutex<HashMap<(u32, Fingerprint, String), Instant>>,
}

/// A grant already logged: what its repeats are counted under.
struct Tracked {
    key: LogKey,
    client: String,
    user: String,
    repeats: u64,
    expires: Instant,
    summed: Instant,
}

impl Audit {
    /// A refused request. `requested` is what the caller sent (it may not be a valid scope set), so it is
    /// logged escaped and clipped: a caller cannot forge log lines or make long ones. Executables and units
    /// are escaped and clipped too.
    pub fn denied(
        &self,
        key: LogKey,
        caller: Option<&Caller>,
        client: &str,
        requested: &[String],
        reason: &dyn std::fmt::Display,
    ) {
        if !self.budget.allow(key, Kind::Deny) {
            return;
        }
        let (client, requested) = (clip(client).to_string(), ClipList(requested).to_string());
        let reason = cut(&reason.to_string(), MAX_REASON);
        match caller {
            Some(c) => tracing::warn!(
                target: TARGET,
                event = "deny",
                uid = c.uid,
                user = c.user.as_deref().unwrap_or(""),
                pid = c.pid,
                exe = exe(c).as_str(),
                unit = unit(c).as_str(),
                client = client.as_str(),
                requested = requested.as_str(),
                reason = %reason,
                "token denied"
            ),
            None => {
                tracing::warn!(target: TARGET, event = "deny", client = client.as_str(), requested = requested.as_str(), reason = %reason, "token denied")
            }
        }
    }

    /// An allowed request that got no token: the IdP failed, or the caller's rate of new tokens was spent.
    pub fn failed(
        &self,
        key: LogKey,
        caller: &Caller,
        client: &str,
        requested: &ScopeSet,
        reason: &dyn std::fmt::Display,
    ) {
        if !self.budget.allow(key, Kind::Error) {
            return;
        }
        tracing::warn!(
            target: TARGET,
            event = "error",
            uid = caller.uid,
            user = caller.user.as_deref().unwrap_or(""),
            pid = caller.pid,
            exe = exe(caller).as_str(),
            unit = unit(caller).as_str(),
            client,
            requested = %requested,
            reason = %cut(&reason.to_string(), MAX_REASON),
            "token not issued"
        );
    }

    /// An admin call, allowed or refused.
    pub fn admin(&self, key: LogKey, caller: &Caller, call: &'static str, allowed: bool) {
        if !self.budget.allow(key, Kind::Admin) {
            return;
        }
        tracing::info!(
            target: TARGET,
            event = "admin",
            call,
            allowed,
            uid = caller.uid,
            user = caller.user.as_deref().unwrap_or(""),
            pid = caller.pid,
            exe = exe(caller).as_str(),
            "admin call"
        );
    }

    /// A token handed out: logged the first time its uid receives it, counted afterwards.
    pub fn granted(&self, key: LogKey, grant: &Grant<'_>) {
        let now = Instant::now();
        let first = {
            let mut grants = self.lock_grants();
            match grants.get_mut(&(grant.caller.uid, grant.fingerprint)) {
                Some(t) => {
                    t.repeats += 1;
                    false
                }
                None => {
                    if grants.len() < MAX_TRACKED_GRANTS {
                        grants.insert(
                            (grant.caller.uid, grant.fingerprint),
                            Tracked {
                                key,
                                client: grant.client.to_owned(),
                                user: grant.caller.user.clone().unwrap_or_default(),
                                repeats: 0,
                                expires: grant.expires,
                                summed: now,
                            },
                        );
                    }
                    true
                }
            }
        };
        if first && self.budget.allow(key, Kind::Grant) {
            granted(grant);
        }
    }

    /// A DPoP proof handed out: logged the first time its uid gets one for a given token and target origin
    /// (scheme, host and port), as grants are (the proofs metric counts every one). Past the tracking cap,
    /// logged every time, within the uid's log budget.
    pub fn proof(
        &self,
        key: LogKey,
        caller: &Caller,
        client: &str,
        token: Fingerprint,
        url: &url::Url,
        expires: Instant,
    ) {
        let origin = url.origin().ascii_serialization();
        let first = {
            let mut proofs = self.proofs.lock().unwrap_or_else(|e| e.into_inner());
            let tracked = (caller.uid, token, origin);
            let first = !proofs.contains_key(&tracked);
            if first && proofs.len() < MAX_TRACKED_GRANTS {
                proofs.insert(tracked.clone(), expires);
            }
            first.then_some(tracked.2)
        };
        let Some(origin) = first else {
            return;
        };
        if self.budget.allow(key, Kind::Grant) {
            tracing::info!(
                target: TARGET,
                event = "proof",
                uid = caller.uid,
                user = caller.user.as_deref().unwrap_or(""),
                pid = caller.pid,
                exe = exe(caller).as_str(),
                client,
                token = %token,
                target = clip(&origin).to_string().as_str(),
                "DPoP proofs given for this token and target"
            );
        }
    }

    /// Sums up what the budgets suppressed, and the repeats of grants whose token expired or that were last
    /// summed up [`REPEATS_EVERY`] ago (forgetting the expired ones); with `all` (at shutdown), every
    /// repeat.
    pub fn flush(&self, all: bool) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.lock_grants().retain(|&(uid, fp), t| {
            let expired = t.expires <= now;
            if t.repeats > 0 && (all || expired || now.duration_since(t.summed) >= REPEATS_EVERY) {
                due.push((t.key, uid, t.user.clone(), t.client.clone(), fp, t.repeats));
                t.repeats = 0;
                t.summed = now;
            }
            !expired
        });
        self.proofs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now);
        for (key, uid, user, client, fp, count) in due {
            if self.budget.allow(key, Kind::Repeats) {
                tracing::info!(
                    target: TARGET,
                    event = "grant-repeats",
                    uid,
                    user = user.as_str(),
                    client = client.as_str(),
                    token = %fp,
                    count,
                    "token handed out again to this uid"
                );
            }
        }
        self.budget.flush();
    }

    fn lock_grants(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, Fingerprint), Tracked>> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A token handed out.
pub struct Grant<'a> {
    /// Who got it.
    pub caller: &'a Caller,
    /// From which client.
    pub client: &'a str,
    /// What was asked for.
    pub requested: &'a ScopeSet,
    /// What the token carries.
    pub granted: &'a ScopeSet,
    /// The policies that allowed it.
    pub policies: &'a [String],
    /// Cache or IdP.
    pub source: Source,
    /// The token's fingerprint.
    pub fingerprint: Fingerprint,
    /// When the token expires.
    pub expires: Instant,
    /// The client credential its request was authenticated with (its source: a file, a credential, a
    /// variable).
    pub credential: Option<&'a str>,
}

fn granted(g: &Grant<'_>) {
    tracing::info!(
        target: TARGET,
        event = "grant",
        uid = g.caller.uid,
        user = g.caller.user.as_deref().unwrap_or(""),
        pid = g.caller.pid,
        exe = exe(g.caller).as_str(),
        unit = unit(g.caller).as_str(),
        client = g.client,
        requested = %g.requested,
        granted = %g.granted,
        policies = %g.policies.join(","),
        source = g.source.as_str(),
        token = %g.fingerprint,
        credential = g.credential.unwrap_or(""),
        "token granted"
    );
}
