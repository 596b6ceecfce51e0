//! What one local user may hold of the daemon: connections and in-flight calls, counted per uid, with every
//! caller that no policy matches sharing one small budget.
//!
//! Every local user holds the other end of the socket, so nothing a single uid does may exhaust what others
//! need. Each connection counts against its kernel uid's budget; a connection whose caller no policy matches
//! (or whose identity could not be established) counts against the shared *unmatched* budget as well, so a
//! user who spreads over many uids (a subordinate uid range mapped through a user namespace, say) gains
//! nothing by it. Calls in flight are counted the same way: a call over its user's budget waits (holding only
//! its HTTP/2 stream, whose buffered bytes the connection's flow-control window bounds) until one of that
//! user's calls finishes, so the request bytes decoded at once for one user are at most
//! calls × [`crate::serve::server::MAX_MESSAGE_LEN`], and only that user waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

/// The limits, from the config and the process's file descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, all users together (from `RLIMIT_NOFILE`).
    pub max_connections: usize,
    /// Connections one uid may hold at once (`daemon.max_connections_per_uid`).
    pub per_uid_connections: usize,
    /// Connections all callers that no policy matches may hold at once, together.
    pub unmatched_connections: usize,
    /// Calls one uid may have in flight at once, over all its connections; likewise for the unmatched budget.
    pub per_uid_calls: usize,
    /// How long a new connection may take to send its protocol preface.
    pub handshake_timeout: Duration,
    /// How long a new connection may take to start its first call: 10 s, or the idle timeout if shorter.
    pub first_call_timeout: Duration,
    /// How long a connection may stay open with no call in flight (`daemon.idle_timeout`).
    pub idle_timeout: Duration,
}

/// Descriptors a connection costs: its socket, the peer's pidfd, and the duplicate its idle watchdog holds.
pub const FDS_PER_CONNECTION: u64 = 3;

/// Descriptors kept for everything but connections: the IdP's connections, config and secret files, the
/// runtime's own.
pub const RESERVED_FDS: u64 = 256;

impl Limits {
    /// Limits for a process allowed `nofile` open descriptors: each connection costs [`FDS_PER_CONNECTION`].
    pub fn new(nofile: u64, per_uid_connections: usize, idle_timeout: Duration) -> Self {
        let max_connections =
            usize::try_from(nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION)
                .unwrap_or(usize::MAX)
                .max(8);
        Self {
            max_connections,
            per_uid_connections: per_uid_connections.min(max_connections),
            unmatched_connections: UNMATCHED_CONNECTIONS.min(max_connections),
            per_uid_calls: PER_UID_CALLS,
            handshake_timeout: Duration::from_secs(5),
            first_call_timeout: idle_timeout.min(Duration::from_secs(10)),
            idle_timeout,
        }
    }
}

/// Default `daemon.max_connections_per_uid`.
pub const PER_UID_CONNECTIONS: usize = 64;
/// Connections shared by every caller that no policy matches.
pub const UNMATCHED_CONNECTIONS: usize = 64;
/// Calls in flight per uid (and for the unmatched budget).
pub const PER_UID_CALLS: usize = 64;
/// Default `daemon.idle_timeout`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Whose budget something counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// A kernel uid.
    Uid(u32),
    /// Every caller that no policy matches, together.
    Unmatched,
}

struct Usage {
    connections: usize,
    /// Calls in flight: shared by the bucket's connections.
    calls: Arc<Semaphore>,
}

/// Connections and calls in use, per bucket. Entries exist only while something is counted, so the table
/// holds at most one entry per open connection.
pub struct Budgets {
    limits: Limits,
    usage: Mutex<HashMap<Bucket, Usage>>,
}

/// One counted connection; dropping it gives the slot back.
pub struct Permit {
    budgets: Arc<Budgets>,
    bucket: Bucket,
    /// The bucket's calls in flight.
    calls: Arc<Semaphore>,
}

impl Permit {
    /// The semaphore that counts the bucket's calls in flight.
    pub fn calls(&self) -> Arc<Semaphore> {
        self.calls.clone()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut usage = self.budgets.lock();
        if let Some(u) = usage.get_mut(&self.bucket) {
            u.connections -= 1;
            if u.connections == 0 {
                usage.remove(&self.bucket);
            }
        }
    }
}

impl Budgets {
    /// Empty budgets under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            usage: Mutex::new(HashMap::new()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bucket, Usage>> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection slot in `bucket`, if it has room.
    pub fn connection(self: &Arc<Self>, bucket: Bucket) -> Option<Permit> {
        let cap = match bucket {
            Bucket::Uid(_) => self.limits.per_uid_connections,
            Bucket::Unmatched => self.limits.unmatched_connections,
        };
        let mut usage = self.lock();
        let u = usage.entry(bucket).or_insert_with(|| Usage {
            connections: 0,
            calls: Arc::new(Semaphore::new(self.limits.per_uid_calls)),
        });
        if u.connections >= cap {
            return None;
        }
        u.connections += 1;
        Some(Permit {
            budgets: self.clone(),
            bucket,
            calls: u.calls.clone(),
        })
    }

    /// Every bucket in use: its connections and calls in flight.
    pub fn usage(&self) -> Vec<(Bucket, usize, usize)> {
        let per_bucket = self.limits.per_uid_calls;
        self.lock()
            .iter()
            .map(|(b, u)| {
                (
                    *b,
                    u.connections,
                    per_bucket.saturating_sub(u.calls.available_permits()),
                )
            })
            .collect()
    }

    /// Connections counted in `bucket` now.
    pub fn connections(&self, bucket: Bucket) -> usize {
        self.lock().get(&bucket).map_or(0, |u| u.connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_comes_from_the_descriptor_limit() {
        let l = Limits::new(1024, 64, IDLE_TIMEOUT);
        assert_eq!(l.max_connections, (1024 - 256) / 3);
        // A tiny limit still serves a few connections, and no uid may hold more than all of them.
        let tiny = Limits::new(100, 64, IDLE_TIMEOUT);
        assert_eq!(tiny.max_connections, 8, "never fewer than 8");
        assert_eq!(tiny.max_connections, 8);
        assert_eq!(tiny.per_uid_connections, 8);
    }

    #[test]
    fn each_uid_and_the_unmatched_share_have_their_own_budget() {
        let mut limits = Limits::new(1 << 20, 2, IDLE_TIMEOUT);
        limits.unmatched_connections = 1;
        let b = Budgets::new(limits);
        let first = b.connection(Bucket::Uid(1000)).unwrap();
        let _second = b.connection(Bucket::Uid(1000)).unwrap();
        assert!(b.connection(Bucket::Uid(1000)).is_none());
        assert!(b.connection(Bucket::Uid(1001)).is_some());
        let _u = b.connection(Bucket::Unmatched).unwrap();
        assert!(b.connection(Bucket::Unmatched).is_none());
        drop(first);
        assert_eq!(b.connections(Bucket::Uid(1000)), 1);
        assert!(b.connection(Bucket::Uid(1000)).is_some());
    }

    #[test]
    fn connections_of_a_uid_share_its_calls_and_empty_buckets_are_forgotten() {
        let b = Budgets::new(Limits::new(1 << 20, 2, IDLE_TIMEOUT));
        let (one, two) = (
            b.connection(Bucket::Uid(7)).unwrap(),
            b.connection(Bucket::Uid(7)).unwrap(),
        );
        assert!(Arc::ptr_eq(&one.calls(), &two.calls()));
        let other = b.connection(Bucket::Uid(8)).unwrap();
        assert!(!Arc::ptr_eq(&one.calls(), &other.calls()));
        drop((one, two, other));
        for uid in 0..1000 {
            assert!(b.connection(Bucket::Uid(uid)).is_some());
        }
        assert!(b.usage.lock().unwrap().is_empty());
    }
}
