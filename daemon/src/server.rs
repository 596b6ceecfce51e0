//! The Unix socket: binding it safely, accepting connections with their peer credentials, and serving the
//! gRPC service until shutdown.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credbroker_proto::TokenBrokerServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::conn::Connection;
use crate::peer::PeerCred;
use crate::service::Broker;

/// Largest gRPC message accepted from a caller.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Most connections open at once; further connections are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most concurrent calls on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process is serving on the path.
    #[error("{0} is in use by a running process (another credbrokerd?)")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
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
/// A missing parent directory is created (mode 0755). A stale socket left by a previous run is replaced; a
/// socket someone is still serving, or a file that is not a socket, is not.
///
/// # Errors
/// [`BindError`].
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, BindError> {
    let io_err = |what, source| BindError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| io_err("cannot create the directory of", e))?;
    }
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
    let listener = UnixListener::bind(path).map_err(|e| io_err("cannot bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("cannot set the mode of", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| io_err("cannot set the group of", e))?;
    }
    Ok(listener)
}

/// An accepted connection with its per-connection state, handed to tonic.
struct PeerStream {
    io: UnixStream,
    conn: Arc<Connection>,
    _permit: OwnedSemaphorePermit,
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections, reading each peer's credentials, until the receiver goes away. Accept errors (such as
/// running out of file descriptors) are logged and retried after a pause instead of spinning.
async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Result<PeerStream, io::Error>>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        match accepted {
            Ok((io, _)) => {
                // Over the limit: close at once rather than leave callers queued in the backlog, where a
                // connection could wait for as long as someone else holds the slots.
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            refused,
                            "too many connections ({MAX_CONNECTIONS}); closing new ones"
                        );
                    }
                    drop(io);
                    continue;
                };
                let peer = PeerCred::from_stream(&io);
                if let Err(e) = &peer {
                    tracing::warn!(error = %e, "connection without usable peer credentials; its calls will be refused");
                }
                let stream = PeerStream {
                    io,
                    conn: Arc::new(Connection::new(peer)),
                    _permit: permit,
                };
                if tx.send(Ok(stream)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The gRPC server settings the daemon serves with: at most [`MAX_STREAMS_PER_CONNECTION`] concurrent calls
/// per connection, HTTP/2 keep-alives, a 120 s bound on any call. (The benchmark's floor server uses the same.)
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .timeout(Duration::from_secs(120))
}

/// Serves `broker`, gRPC health (`grpc.health.v1.Health`, reported through `health`) and server reflection
/// on `listener` until `shutdown` completes, then stops accepting and lets in-flight calls finish.
///
/// # Errors
/// tonic's transport error, or a reflection set-up error.
pub async fn serve(
    listener: UnixListener,
    broker: Arc<Broker>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(credbroker_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio::spawn(accept_loop(listener, tx));
    let service = TokenBrokerServer::from_arc(broker)
        .max_decoding_message_size(MAX_MESSAGE_LEN)
        .max_encoding_message_size(MAX_MESSAGE_LEN);
    let result = builder()
        .add_service(service)
        .add_service(health)
        .add_service(reflection)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    acceptor.abort();
    Ok(result?)
}
