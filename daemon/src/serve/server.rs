//! The Unix socket: binding it safely, accepting connections with their peer credentials, and serving the
//! gRPC service until shutdown.
//!
//! Every peer may be hostile, so each connection is bounded before any of its bytes is read: the global
//! connection budget, then its uid's ([`crate::serve::limits`]); then its identity is settled (pidfd pinned,
//! executable and unit read) and, if no policy matches it, it also takes a slot of the small budget shared
//! by all such callers; then it must send the HTTP/2 preface within [`Limits::handshake_timeout`]. Served
//! connections are closed when idle, each call counts against its user's budget of calls in flight, and
//! HTTP/2 windows, header lists and messages are kept small, so what one user can make the daemon buffer is
//! bounded.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credbroker_proto::TokenBrokerServer;
use std::sync::atomic::{AtomicU64, Ordering};

use std::convert::Infallible;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::audit::LogKey;
use crate::identity::peer::{FileId, Late, PeerCred, PeerError, Settled};
use crate::serve::conn::{Connection, Identity};
use crate::serve::governor::{Governed, GovernorLayer, WriteMeter};
use crate::serve::limits::{Bucket, Budgets, Limits, Permit};
use crate::serve::service::Broker;
use crate::sys;

/// Largest gRPC message accepted from a caller: the largest valid request (64 scopes of 256 bytes, a client
/// name, a min TTL) is about 16.7 KiB.
pub const MAX_MESSAGE_LEN: usize = 20 * 1024;
/// Largest gRPC message sent (a reflection answer is the largest).
pub const MAX_RESPONSE_LEN: usize = 64 * 1024;
/// Most concurrent calls on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// HTTP/2 flow-control window of each stream: room for the largest request.
pub const STREAM_WINDOW: u32 = 32 * 1024;
/// HTTP/2 flow-control window of each connection.
pub const CONNECTION_WINDOW: u32 = 64 * 1024;
/// Largest HTTP/2 header list accepted (HPACK-decoded).
pub const MAX_HEADER_LIST: u32 = 8 * 1024;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process is serving on the path.
    #[error("{0} is in use by a running process (another credbrokerd?)")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Others could add, rename or remove entries in the socket's directory.
    #[error(
        "{path} (owner uid {uid}, mode {mode:04o}) must belong to root or the daemon's user and be writable \
         by its owner only: others could swap the socket for a link or, even where the directory is sticky \
         (like /tmp), bind the socket's name first; use a directory of the daemon's own, such as \
         /run/credbroker"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Binds the daemon's socket at `path` with permission bits `mode` and, if given, group `gid`.
///
/// A missing parent directory is created (mode 0755). The directory must belong to root or the daemon's
/// user and be writable by its owner only, so nobody else can swap the socket's path for a link between the
/// bind and the `lchown`, nor take the socket's name first (a sticky directory such as `/tmp` would let
/// any user bind it before the daemon starts). The mode is set atomically by the umask at bind (call this before
/// other threads start). A stale socket left by a previous run is replaced; a socket someone is still
/// serving, or a file that is not a socket, is not.
///
/// # Errors
/// [`BindError`].
pub fn bind(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, BoundSocket), BindError> {
    let io_err = |what, source| BindError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_err("cannot create the directory of", e))?;
    check_socket_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path)
                    .map_err(|e| io_err("cannot remove the stale socket", e))?,
            }
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", e)),
    }
    let listener = sys::bind_with_mode(path, mode).map_err(|e| io_err("cannot bind", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(|e| io_err("cannot set the group of", e))?;
    }
    let id = std::fs::symlink_metadata(path)
        .map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
        .map_err(|e| io_err("cannot inspect", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("cannot configure", e))?;
    Ok((
        listener,
        BoundSocket {
            path: path.to_owned(),
            id,
        },
    ))
}

/// Refuses a socket directory that someone other than root and the daemon's user could add entries to.
fn check_socket_dir(dir: &Path) -> Result<(), BindError> {
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|source| BindError::Io {
            what: "cannot open the socket directory",
            path: dir.to_owned(),
            source,
        })?;
    let meta = handle.metadata().map_err(|source| BindError::Io {
        what: "cannot inspect the socket directory",
        path: dir.to_owned(),
        source,
    })?;
    let mode = meta.mode();
    if (meta.uid() != 0 && meta.uid() != sys::euid()) || mode & 0o022 != 0 {
        return Err(BindError::UnsafeDirectory {
            path: dir.to_owned(),
            uid: meta.uid(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// The socket file this process bound: removed at exit only if it is still that very file, so an old
/// instance that is still draining never removes the socket of the instance that replaced it.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    id: FileId,
}

impl BoundSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the path still names the file this process bound; says whether it did.
    ///
    /// # Errors
    /// `unlink(2)`'s error.
    pub fn remove(&self) -> io::Result<bool> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.id.dev && m.ino() == self.id.ino => {
                std::fs::remove_file(&self.path)?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted connection with its per-connection state, handed to tonic.
///
/// It replays the preface the daemon read to check the protocol. Its watchdog closes it once it has been
/// idle longer than allowed; dropping the stream stops the watchdog.
struct PeerStream {
    io: UnixStream,
    /// The first bytes, read to tell the protocol, and how many of them have been replayed.
    head: ([u8; H2_PREFACE.len()], usize, usize),
    conn: Arc<Connection>,
    /// Counts the reply bytes written, for the connection's reply budget.
    meter: WriteMeter,
    _watchdog: AbortOnDrop,
    _permits: Vec<Permit>,
    _global: OwnedSemaphorePermit,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shuts the connection down (both ways, so the server's reads end) once it is idle past its deadline: no
/// call for [`Limits::first_call_timeout`] after it opened, or none in flight for [`Limits::idle_timeout`].
/// A task of its own, so the serving path pays nothing for it. `socket` is a duplicate of the connection's
/// descriptor.
async fn watchdog(conn: std::sync::Weak<Connection>, socket: std::os::fd::OwnedFd, limits: Limits) {
    let mut at = Instant::now() + limits.first_call_timeout;
    loop {
        tokio::time::sleep_until(at).await;
        let Some(conn) = conn.upgrade() else {
            return;
        };
        let now = Instant::now();
        match conn.idle_deadline(limits.first_call_timeout, limits.idle_timeout) {
            Some(deadline) if deadline <= now => {
                tracing::debug!("closing a connection idle for too long");
                let _ =
                    std::os::unix::net::UnixStream::from(socket).shutdown(std::net::Shutdown::Both);
                return;
            }
            Some(deadline) => at = deadline,
            None => at = now + limits.idle_timeout,
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Arc<Connection>;

    fn connect_info(&self) -> Arc<Connection> {
        self.conn.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let (head, len, replayed) = &mut this.head;
        if *replayed < *len {
            let n = buf.remaining().min(*len - *replayed);
            buf.put_slice(&head[*replayed..*replayed + n]);
            *replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl PeerStream {
    /// Gives the connection's reply budget back the reply bytes among `written`.
    fn written<'a>(&mut self, written: impl Iterator<Item = &'a [u8]>) {
        let replies: usize = written.map(|b| self.meter.reply_bytes(b)).sum();
        self.conn.replies().written(replies);
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.written(std::iter::once(&buf[..n]));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        self.written(bufs.iter().map_while(|b| {
            let take = left.min(b.len());
            left -= take;
            (take > 0).then(|| &b[..take])
        }));
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Why a connection was closed before it was served; each is counted and logged at powers of two, so a
/// flood of connections cannot flood the log.
#[derive(Clone, Copy)]
enum Refused {
    /// Over [`Limits::max_connections`].
    Global,
    /// Over the uid's [`Limits::per_uid_connections`].
    Uid,
    /// Over the shared [`Limits::unmatched_connections`].
    Unmatched,
    /// No first bytes (HTTP/2 preface or an HTTP/1.1 request) within [`Limits::handshake_timeout`], or no
    /// peer credentials.
    Handshake,
}

/// Counts refused connections.
#[derive(Default)]
struct RefusedLog([AtomicU64; 4]);

impl RefusedLog {
    fn count(&self, why: Refused, limits: &Limits, uid: Option<u32>) {
        if !matches!(why, Refused::Handshake) {
            crate::telemetry::metrics().connection_refused();
        }
        let n = self.0[why as usize].fetch_add(1, Ordering::Relaxed) + 1;
        if !n.is_power_of_two() {
            return;
        }
        let uid = uid.map_or_else(|| "?".to_owned(), |u| u.to_string());
        match why {
            Refused::Global => tracing::warn!(
                refused = n,
                "too many connections ({}); closing new ones",
                limits.max_connections
            ),
            Refused::Uid => tracing::warn!(
                refused = n,
                uid,
                "uid holds too many connections ({}); closing its new ones",
                limits.per_uid_connections
            ),
            Refused::Unmatched => tracing::warn!(
                refused = n,
                uid,
                "callers that no policy matches hold too many connections ({}); closing new ones",
                limits.unmatched_connections
            ),
            Refused::Handshake => tracing::info!(
                refused = n,
                uid,
                "connection closed before it was served: no peer credentials, or no first bytes within {}",
                humantime::format_duration(limits.handshake_timeout)
            ),
        }
    }
}

/// Where the daemon's connections come from.
pub enum Incoming {
    /// Its listening socket (the socket systemd passed, or the one it bound).
    Listener(UnixListener),
    /// Connected sockets handed over one at a time, such as one end of [`UnixStream::pair`]: a connection in
    /// memory, with no path and no `accept`, whose peer credentials the kernel still gives. The fuzzer feeds
    /// raw bytes through the whole stack this way. Ends when the sender is dropped.
    Connected(mpsc::Receiver<UnixStream>),
}

impl From<UnixListener> for Incoming {
    fn from(listener: UnixListener) -> Self {
        Self::Listener(listener)
    }
}

impl Incoming {
    /// The next connection, or `None` when no more will come; with whether the daemon found no connection
    /// waiting before this one came (so it was accepted as soon as it arrived).
    async fn next(&mut self) -> Option<(io::Result<UnixStream>, bool)> {
        match self {
            Self::Listener(listener) => {
                let mut waited = false;
                let accepted = std::future::poll_fn(|cx| {
                    let p = listener.poll_accept(cx);
                    waited |= p.is_pending();
                    p
                })
                .await;
                Some((accepted.map(|(io, _)| io), waited))
            }
            Self::Connected(rx) => rx.recv().await.map(|io| (Ok(io), true)),
        }
    }
}

/// Connections accepted back to back (the queue never empty in between) after which a peer's executable is
/// no longer judged: the process may have called `exec` between its `connect(2)` and the daemon's look.
pub const EXE_QUEUE_BOUND: usize = 16;
/// Time after the first of such a run of connections beyond which the same holds.
pub const EXE_LAG_BOUND: Duration = Duration::from_millis(2);

/// Tells how far behind the queue the daemon is when it accepts a connection.
#[derive(Default)]
struct Backlog {
    /// Connections accepted since the queue was last found empty, and when the first of them was.
    run: usize,
    since: Option<Instant>,
}

impl Backlog {
    /// Counts a connection accepted now (`waited`: the queue was empty before it); `Some` when it came too
    /// late for its executable to be judged.
    fn accepted(&mut self, waited: bool) -> Option<Late> {
        let now = Instant::now();
        if waited || self.since.is_none() {
            self.run = 0;
            self.since = Some(now);
        }
        let behind = self.run;
        self.run += 1;
        let after = now.saturating_duration_since(self.since.unwrap_or(now));
        (behind > EXE_QUEUE_BOUND || after > EXE_LAG_BOUND).then_some(Late { behind, after })
    }
}

/// What the accept loop and the handshakes share.
struct Acceptor {
    broker: Arc<Broker>,
    /// Turns true at shutdown: HTTP/1.1 connections then finish their request and close.
    stop: tokio::sync::watch::Receiver<bool>,
    budgets: Arc<Budgets>,
    global: Arc<Semaphore>,
    refused: RefusedLog,
}

/// Accepts connections until the receiver goes away, spawning a bounded handshake for each. Accept errors
/// (such as running out of file descriptors) are logged and retried after a pause instead of spinning.
async fn accept_loop(
    mut incoming: Incoming,
    acceptor: Arc<Acceptor>,
    tx: mpsc::Sender<Result<PeerStream, io::Error>>,
) {
    let limits = *acceptor.budgets.limits();
    let proc_root = acceptor.broker.proc_root();
    let mut backlog = Backlog::default();
    loop {
        let accepted = tokio::select! {
            a = incoming.next() => a,
            () = tx.closed() => return,
        };
        let (io, waited) = match accepted {
            None => return,
            Some((Ok(io), waited)) => (io, waited),
            Some((Err(e), _)) => {
                tracing::warn!(error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over a limit: close at once rather than leave callers queued in the backlog, where a connection
        // could wait for as long as someone else holds the slots.
        let Ok(global) = acceptor.global.clone().try_acquire_owned() else {
            acceptor.refused.count(Refused::Global, &limits, None);
            continue;
        };
        let uid = match io.peer_cred() {
            Ok(c) => c.uid(),
            Err(_) => {
                acceptor.refused.count(Refused::Handshake, &limits, None);
                continue;
            }
        };
        let late = backlog.accepted(waited);
        let Some(uid_permit) = acceptor.budgets.connection(Bucket::Uid(uid)) else {
            acceptor.refused.count(Refused::Uid, &limits, Some(uid));
            continue;
        };
        // Before anything else: pin the process and read its executable, so a process that `exec`s after
        // connecting has as little time as can be to pass for what it became.
        let settled = PeerCred::from_stream(&io).map(|cred| {
            let settled = cred.settle_exe(&proc_root, late);
            (cred, settled)
        });
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + limits.handshake_timeout;
            let handshake = handshake(io, settled, uid, &acceptor, vec![uid_permit], global);
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok((stream, Protocol::Http2))) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Ok((stream, Protocol::Http1))) => {
                    let api = crate::serve::http::HttpApi::new(acceptor.broker.clone());
                    serve_http1(stream, api, limits, acceptor.stop.clone()).await;
                }
                Ok(Err(why)) => acceptor.refused.count(why, &limits, Some(uid)),
                Err(_) => acceptor
                    .refused
                    .count(Refused::Handshake, &limits, Some(uid)),
            }
        });
    }
}

/// Completes a new connection's identity (its executable was settled at accept), counts it against its
/// budgets and reads its HTTP/2 preface.
async fn handshake(
    mut io: UnixStream,
    settled: Result<(PeerCred, Settled), PeerError>,
    uid: u32,
    acceptor: &Acceptor,
    mut permits: Vec<Permit>,
    global: OwnedSemaphorePermit,
) -> Result<(PeerStream, Protocol), Refused> {
    let identity = match settled {
        Ok((cred, settled)) => {
            let (cred, proc_root) = (Arc::new(cred), acceptor.broker.proc_root());
            let c = cred.clone();
            match tokio::task::spawn_blocking(move || c.identify(&proc_root, settled)).await {
                Ok(Ok(caller)) => Ok(Identity {
                    cred,
                    caller: Arc::new(caller),
                }),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(PeerError::Credentials(io::Error::other(e))),
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &identity {
        tracing::debug!(uid, error = %e, "connection without a usable identity; its calls will be refused");
    }
    let matched = identity
        .as_ref()
        .is_ok_and(|id| acceptor.broker.is_known(&id.caller));
    if !matched {
        permits.push(
            acceptor
                .budgets
                .connection(Bucket::Unmatched)
                .ok_or(Refused::Unmatched)?,
        );
    }
    // The protocol, from the first bytes: the HTTP/2 preface, else HTTP/1.1 (which hyper then parses).
    let mut head = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let protocol = loop {
        let n = io
            .read(&mut head[len..])
            .await
            .map_err(|_| Refused::Handshake)?;
        if n == 0 {
            return Err(Refused::Handshake);
        }
        len += n;
        if head[..len] != H2_PREFACE[..len] {
            break Protocol::Http1;
        }
        if len == H2_PREFACE.len() {
            break Protocol::Http2;
        }
    };
    let limits = *acceptor.budgets.limits();
    let calls = permits.iter().map(Permit::calls).collect();
    let log_key = match &identity {
        Ok(id) => LogKey::of(&id.caller, matched),
        Err(_) => LogKey::Pooled,
    };
    let conn = Arc::new(Connection::new(identity, calls, log_key));
    let socket = io
        .as_fd()
        .try_clone_to_owned()
        .map_err(|_| Refused::Handshake)?;
    let watchdog = tokio::spawn(watchdog(Arc::downgrade(&conn), socket, limits));
    let stream = PeerStream {
        io,
        head: (head, len, 0),
        conn,
        meter: WriteMeter::new(protocol == Protocol::Http2),
        _watchdog: AbortOnDrop(watchdog),
        _permits: permits,
        _global: global,
    };
    Ok((stream, protocol))
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// HTTP/2: gRPC, and the HTTP API's routes.
    Http2,
    /// HTTP/1.1: the HTTP API.
    Http1,
}

/// Most requests served on one HTTP/1.1 connection; the last one's answer says `Connection: close`.
pub const MAX_HTTP1_REQUESTS: usize = 1000;

/// Serves the HTTP API on an HTTP/1.1 connection: request heads up to [`crate::serve::http::MAX_HEAD`], read within
/// [`Limits::handshake_timeout`]; no request bodies; keep-alive for at most [`MAX_HTTP1_REQUESTS`] requests
/// (and while the connection is not idle); each request counted like a gRPC call.
async fn serve_http1(
    stream: PeerStream,
    api: crate::serve::http::HttpApi,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::AtomicUsize;
    let conn = stream.conn.clone();
    let served = Arc::new(AtomicUsize::new(0));
    let limited = Governed::new(api);
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(tonic::body::Body::new);
            request.extensions_mut().insert(conn.clone());
            let mut limited = limited.clone();
            let last = served.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_HTTP1_REQUESTS;
            async move {
                let mut response = tower::Service::call(&mut limited, request).await?;
                if last {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(crate::serve::http::MAX_HEAD)
        // A client may send its request and shut its side down (`nc -N`, some proxies): it still gets its answer.
        .half_close(true)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        r = connection.as_mut() => r,
        () = stopped => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP/1.1 connection ended with an error");
    }
}

/// The gRPC server settings the daemon serves with: at most [`MAX_STREAMS_PER_CONNECTION`] concurrent calls
/// per connection, small HTTP/2 flow-control windows ([`STREAM_WINDOW`], [`CONNECTION_WINDOW`]) and header
/// lists ([`MAX_HEADER_LIST`]) so a connection buffers little, HTTP/2 keep-alives, and a 120 s bound on any
/// call. (The benchmark's floor server uses the same.)
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .timeout(Duration::from_secs(120))
}

/// Serves `broker`, gRPC health (`grpc.health.v1.Health`, reported through `health`) and server reflection
/// on `incoming`'s connections, counting connections and calls in `budgets`, until `shutdown` completes, then
/// stops accepting and lets in-flight calls finish.
///
/// # Errors
/// tonic's transport error, or a reflection set-up error.
pub async fn serve(
    incoming: Incoming,
    broker: Arc<Broker>,
    admin: crate::serve::admin::AdminService,
    budgets: Arc<Budgets>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Reflection in both versions: grpcurl asks v1 first; Python's grpcio-reflection and older tools know only
    // v1alpha.
    let reflection = crate::serve::reflection::Reflection::new(crate::serve::reflection::index()?);
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let acceptor = Arc::new(Acceptor {
        stop,
        global: Arc::new(Semaphore::new(budgets.limits().max_connections)),
        budgets,
        broker: broker.clone(),
        refused: RefusedLog::default(),
    });
    let acceptor = tokio::spawn(accept_loop(incoming, acceptor, tx));
    let http_api = crate::serve::http::HttpApi::new(broker.clone());
    let service = TokenBrokerServer::from_arc(broker)
        .max_decoding_message_size(MAX_MESSAGE_LEN)
        .max_encoding_message_size(MAX_RESPONSE_LEN);
    let result = builder()
        .layer(GovernorLayer)
        .add_service(service)
        .add_service(health)
        .add_service(crate::serve::reflection::v1::server(reflection.clone()))
        .add_service(crate::serve::reflection::v1alpha::server(reflection))
        .add_service(http_api)
        .add_service(
            credbroker_proto::admin::admin_server::AdminServer::new(admin)
                .max_decoding_message_size(MAX_MESSAGE_LEN),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    acceptor.abort();
    Ok(result?)
}
