//! The audit trail: one structured event per GetToken decision, under the `credbroker::audit` target so it
//! can be routed apart from operational logs.
//!
//! Denials and failures are logged every time up to a per-uid rate ([`DENIALS_PER_MINUTE`], in bursts of
//! [`DENIAL_BURST`]); beyond it they are counted, and a `deny-suppressed` event says how many were not logged.
//! A grant is logged the first time a connection receives a given token; repeats are counted per connection
//! and summed up in one event when the connection closes, so a caller asking thousands of times a second
//! neither floods the journal nor slows the hot path.
//!
//! Every event is bounded (about 1 KiB): what a caller sent, and its executable and unit, appear as an
//! escaped prefix with counts ([`crate::text`]).
//!
//! # Security
//! Events name tokens by [`Fingerprint`] only.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::identity::peer::Caller;
use crate::policy::scope::ScopeSet;
use crate::text::{ClipList, clip, cut};
use crate::tokens::cache::{Fingerprint, Source};
use crate::tokens::ratelimit::{Rate, RateLimiter};

/// Denials logged per uid and minute, beyond the burst.
pub const DENIALS_PER_MINUTE: u32 = 120;
/// Denials logged at once per uid before the rate applies.
pub const DENIAL_BURST: u32 = 20;
/// Longest `reason` logged.
const MAX_REASON: usize = 600;
/// The uid under which denials of callers without a known identity are counted.
const UNKNOWN_UID: u32 = u32::MAX;

/// The tracing target of audit events.
pub const TARGET: &str = "credbroker::audit";

fn exe(caller: &Caller) -> String {
    let exe = caller
        .exe
        .as_ref()
        .map(|e| e.to_string_lossy())
        .unwrap_or_default();
    clip(&exe).to_string()
}

fn unit(caller: &Caller) -> String {
    clip(caller.unit.as_deref().unwrap_or("")).to_string()
}

/// Logs denials up to a per-uid rate and counts the rest.
pub struct Denials {
    rate: RateLimiter,
    suppressed: Mutex<HashMap<u32, u64>>,
}

impl Default for Denials {
    fn default() -> Self {
        Self {
            rate: RateLimiter::new(Rate {
                per_minute: DENIALS_PER_MINUTE,
                burst: DENIAL_BURST,
            }),
            suppressed: Mutex::new(HashMap::new()),
        }
    }
}

impl Denials {
    /// A refused request, logged unless its uid is over its rate. `requested` is what the caller sent (it
    /// may not be a valid scope set), so it is logged escaped and clipped: a caller cannot forge log lines
    /// or make long ones. Executables and units are escaped and clipped too.
    pub fn denied(
        &self,
        caller: Option<&Caller>,
        client: &str,
        requested: &[String],
        reason: &dyn std::fmt::Display,
    ) {
        let uid = caller.map_or(UNKNOWN_UID, |c| c.uid);
        if self.rate.try_acquire(uid, Instant::now()).is_err() {
            *self.lock().entry(uid).or_insert(0) += 1;
            return;
        }
        if let Some(n) = self.lock().remove(&uid) {
            suppressed(uid, n);
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

    /// Logs, for every uid, how many denials were not logged since its last logged one.
    pub fn flush(&self) {
        let counts = std::mem::take(&mut *self.lock());
        for (uid, n) in counts {
            suppressed(uid, n);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.suppressed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn suppressed(uid: u32, count: u64) {
    if uid == UNKNOWN_UID {
        tracing::warn!(target: TARGET, event = "deny-suppressed", count, "denials of unidentified callers not logged (over the rate)");
    } else {
        tracing::warn!(target: TARGET, event = "deny-suppressed", uid, count, "denials of this uid not logged (over the rate)");
    }
}

/// An admin call, allowed or refused.
pub fn admin(caller: &Caller, call: &'static str, allowed: bool) {
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

/// An allowed request that got no token because the IdP failed.
pub fn failed(caller: &Caller, client: &str, requested: &ScopeSet, reason: &dyn std::fmt::Display) {
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

/// Per-connection grant bookkeeping: logs a token's first hand-out, counts the rest.
#[derive(Default)]
pub struct GrantLog {
    seen: Mutex<Option<Seen>>,
}

struct Seen {
    caller: String,
    repeats: HashMap<Fingerprint, (String, u64)>,
}

impl GrantLog {
    /// Records a grant: logged if this connection has not received this token before, counted otherwise.
    pub fn record(&self, grant: &Grant<'_>) {
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let seen = seen.get_or_insert_with(|| Seen {
                caller: grant.caller.to_string(),
                repeats: HashMap::new(),
            });
            match seen.repeats.get_mut(&grant.fingerprint) {
                Some((_, n)) => {
                    *n += 1;
                    false
                }
                None => {
                    seen.repeats
                        .insert(grant.fingerprint, (grant.client.to_owned(), 0));
                    true
                }
            }
        };
        if first {
            granted(grant);
        }
    }
}

impl Drop for GrantLog {
    fn drop(&mut self) {
        let Some(seen) = self
            .seen
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        for (fp, (client, n)) in seen.repeats.into_iter().filter(|(_, (_, n))| *n > 0) {
            tracing::info!(
                target: TARGET,
                event = "grant-repeats",
                caller = %seen.caller,
                client = %client,
                token = %fp,
                count = n,
                "token handed out again on this connection"
            );
        }
    }
}
