//! The audit trail: one structured event per GetToken decision, under the `credbroker::audit` target so it
//! can be routed apart from operational logs.
//!
//! Denials and failures are logged every time. A grant is logged the first time a connection receives a
//! given token; repeats are counted per connection and summed up in one event when the connection closes,
//! so a caller asking thousands of times a second neither floods the journal nor slows the hot path.
//!
//! # Security
//! Events name tokens by [`Fingerprint`] only.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::cache::{Fingerprint, Source};
use crate::peer::Caller;
use crate::scope::ScopeSet;

/// The tracing target of audit events.
pub const TARGET: &str = "credbroker::audit";

fn exe(caller: &Caller) -> String {
    caller
        .exe
        .as_ref()
        .map(|e| e.display().to_string())
        .unwrap_or_default()
}

/// A refused request. `requested` is what the caller sent (it may not be a valid scope set), so it is logged
/// quoted and escaped: a caller cannot forge log lines with newlines. Executables and units are quoted too.
pub fn denied(
    caller: Option<&Caller>,
    client: &str,
    requested: &[String],
    reason: &dyn std::fmt::Display,
) {
    let requested = requested.join(" ");
    match caller {
        Some(c) => tracing::warn!(
            target: TARGET,
            event = "deny",
            uid = c.uid,
            user = c.user.as_deref().unwrap_or(""),
            pid = c.pid,
            exe = exe(c).as_str(),
            unit = c.unit.as_deref().unwrap_or(""),
            client,
            requested = requested.as_str(),
            reason = %reason,
            "token denied"
        ),
        None => {
            tracing::warn!(target: TARGET, event = "deny", client, requested = requested.as_str(), reason = %reason, "token denied")
        }
    }
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
        unit = caller.unit.as_deref().unwrap_or(""),
        client,
        requested = %requested,
        reason = %reason,
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
}

fn granted(g: &Grant<'_>) {
    tracing::info!(
        target: TARGET,
        event = "grant",
        uid = g.caller.uid,
        user = g.caller.user.as_deref().unwrap_or(""),
        pid = g.caller.pid,
        exe = exe(g.caller).as_str(),
        unit = g.caller.unit.as_deref().unwrap_or(""),
        client = g.client,
        requested = %g.requested,
        granted = %g.granted,
        policies = %g.policies.join(","),
        source = g.source.as_str(),
        token = %g.fingerprint,
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
