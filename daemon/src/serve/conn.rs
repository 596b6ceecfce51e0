//! One accepted connection: the identity the kernel reported for its peer (settled at accept, before any byte
//! of the connection is read), the budgets it counts against (connections, calls, reply bytes, log lines),
//! and when it was last active.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::audit::LogKey;
use crate::identity::peer::{Caller, PeerCred, PeerError};
use crate::serve::governor::ReplyBudget;

/// A peer's identity as settled at accept.
pub struct Identity {
    /// What the kernel reported, with the pinned pidfd.
    pub cred: Arc<PeerCred>,
    /// What `/proc` and NSS added.
    pub caller: Arc<Caller>,
}

/// Per-connection state, shared by every call on the connection.
pub struct Connection {
    identity: Result<Identity, String>,
    /// The budgets calls count against: the uid's, and the unmatched share's when no policy matched (at most
    /// two).
    calls: Vec<Arc<Semaphore>>,
    activity: Activity,
    /// Reply bytes handed to the protocol layer and not yet written.
    replies: ReplyBudget,
    /// The line budget of what its calls log.
    log_key: LogKey,
}

/// When a connection was last busy.
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` when the last call ended (or the connection opened).
    last: AtomicU64,
    in_flight: AtomicUsize,
    called: AtomicBool,
}

/// A call in flight: counted against the connection's budgets until dropped.
pub struct Call {
    conn: Arc<Connection>,
    /// The uid's slot, and the unmatched budget's when no policy matched.
    _permits: [Option<OwnedSemaphorePermit>; 2],
}

impl Drop for Call {
    fn drop(&mut self) {
        let a = &self.conn.activity;
        a.last.store(a.millis(Instant::now()), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.opened).as_millis()).unwrap_or(u64::MAX)
    }
}

impl Connection {
    /// State for a connection whose peer was identified (or could not be), counting its calls against
    /// each of `calls`.
    pub fn new(
        identity: Result<Identity, PeerError>,
        calls: Vec<Arc<Semaphore>>,
        log_key: LogKey,
    ) -> Self {
        Self {
            identity: identity.map_err(|e| e.to_string()),
            calls,
            activity: Activity {
                opened: Instant::now(),
                last: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                called: AtomicBool::new(false),
            },
            replies: ReplyBudget::default(),
            log_key,
        }
    }

    /// The line budget of what its calls log.
    pub fn log_key(&self) -> LogKey {
        self.log_key
    }

    /// The connection's reply bytes in flight (see [`crate::serve::governor`]).
    pub fn replies(&self) -> &ReplyBudget {
        &self.replies
    }

    fn identity(&self) -> Result<&Identity, PeerError> {
        self.identity
            .as_ref()
            .map_err(|e| PeerError::Credentials(std::io::Error::other(e.clone())))
    }

    /// The caller, checked for this call: the process that connected is still alive (a `poll` of its pidfd).
    ///
    /// # Errors
    /// [`PeerError`] when the identity could not be established at accept, or no longer holds.
    pub fn caller(&self) -> Result<Arc<Caller>, PeerError> {
        let id = self.identity()?;
        id.cred.ensure_alive()?;
        Ok(id.caller.clone())
    }

    /// Checks that the process that connected still runs the executable it ran at accept: for decisions that
    /// depend on it (policies that match `exe`).
    ///
    /// # Errors
    /// [`PeerError::ExeChanged`] and the like.
    pub fn check_exe(&self, proc_root: &Path) -> Result<(), PeerError> {
        let id = self.identity()?;
        id.cred.check_exe(&id.caller, proc_root)
    }

    /// Starts a call, waiting while the connection's user has as many calls in flight as allowed. The
    /// connection counts as busy from the moment the call arrives.
    pub async fn start_call(self: &Arc<Self>) -> Call {
        let a = &self.activity;
        a.in_flight.fetch_add(1, Ordering::Acquire);
        a.called.store(true, Ordering::Relaxed);
        let mut call = Call {
            conn: self.clone(),
            _permits: [None, None],
        };
        for (slot, calls) in call._permits.iter_mut().zip(&self.calls) {
            // The semaphores are never closed.
            *slot = calls.clone().acquire_owned().await.ok();
        }
        call
    }

    /// When the connection should be closed for want of activity, as of now: `None` while a call is in
    /// flight. A connection that never started a call has `first_call` from its opening; afterwards,
    /// `idle` from the end of its last call.
    pub fn idle_deadline(&self, first_call: Duration, idle: Duration) -> Option<Instant> {
        let a = &self.activity;
        if a.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = a.opened + Duration::from_millis(a.last.load(Ordering::Relaxed));
        Some(if a.called.load(Ordering::Relaxed) {
            last + idle
        } else {
            a.opened + first_call
        })
    }
}
