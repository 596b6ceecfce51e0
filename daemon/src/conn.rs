//! One accepted connection: the peer credentials the kernel captured at `connect(2)`, the identity derived
//! from them (resolved once, on the first call), and the connection's grant bookkeeping.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::OnceCell;

use crate::audit::GrantLog;
use crate::peer::{Caller, PeerCred, PeerError};

/// Per-connection state, shared by every call on the connection.
pub struct Connection {
    peer: Result<Arc<PeerCred>, String>,
    caller: OnceCell<Arc<Caller>>,
    /// Grants made on this connection, for the audit log.
    pub grants: GrantLog,
}

impl Connection {
    /// State for a connection whose peer credentials were (or could not be) read.
    pub fn new(peer: Result<PeerCred, PeerError>) -> Self {
        Self {
            peer: peer.map(Arc::new).map_err(|e| e.to_string()),
            caller: OnceCell::new(),
            grants: GrantLog::default(),
        }
    }

    /// The caller, checked alive for this call.
    ///
    /// The first call reads `/proc` and NSS (off the async workers); later calls only check, through the
    /// pidfd, that the process that connected is still there, so a recycled pid is never trusted.
    ///
    /// # Errors
    /// [`PeerError`] when the peer's credentials were unreadable, it is not visible, or it has exited.
    pub async fn caller(&self, proc_root: &Arc<Path>) -> Result<Arc<Caller>, PeerError> {
        let peer = self
            .peer
            .as_ref()
            .map_err(|e| PeerError::Credentials(std::io::Error::other(e.clone())))?;
        let caller = self
            .caller
            .get_or_try_init(|| {
                let (peer, proc_root) = (peer.clone(), proc_root.clone());
                async move {
                    tokio::task::spawn_blocking(move || peer.identify(&proc_root).map(Arc::new))
                        .await
                        .map_err(|e| PeerError::Credentials(std::io::Error::other(e)))?
                }
            })
            .await?;
        peer.ensure_alive()?;
        Ok(caller.clone())
    }
}
