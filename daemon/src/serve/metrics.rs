//! The Prometheus endpoint: `GET /metrics` on `daemon.metrics` (off by default), in the text format 0.0.4.
//!
//! A TCP listener sees no peer uid, so it gets its own small bounds: at most [`MAX_CONNECTIONS`] at once,
//! [`HEADER_TIMEOUT`] to send a request head of at most [`MAX_HEAD`] bytes, one request per connection, and
//! [`CONNECTION_TIMEOUT`] for the whole exchange. When every slot is taken, a new connection takes the slot of
//! the oldest one that is not asking anything (its request not read, and no bytes of it waiting to be): a
//! scraper sends its request at once, so connections that sit silent, or trickle a head, cannot keep it out,
//! however fast they are reopened. Only when every slot is
//! serving a request is a new connection closed at accept. It serves nothing but the metrics, which hold no
//! token, secret, scope or uid.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::serve::limits::{Bucket, Budgets};
use crate::serve::service::Broker;
use crate::telemetry::{self, Levels};

/// Connections held at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time to send the request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for the whole connection.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head read.
pub const MAX_HEAD: usize = 16 * 1024;

/// Listens on `addr`.
///
/// # Errors
/// When the address cannot be bound (in use, not local, ...).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A connection holding a slot.
struct Slot {
    id: u64,
    /// Set once its request head has been read.
    asked: Arc<AtomicBool>,
    /// The connection's socket (a duplicate descriptor), to see whether it has sent bytes not yet read.
    peer: std::net::TcpStream,
    task: tokio::task::AbortHandle,
}

impl Slot {
    /// Whether the connection is asking for something: its request has been read, or bytes of it wait to
    /// be (a scraper writes its request as soon as it has connected).
    fn asking(&self) -> bool {
        self.asked.load(Ordering::Acquire)
            || matches!(self.peer.peek(&mut [0u8; 1]), Ok(n) if n > 0)
    }
}

/// The slots, oldest connection first.
type Slots = Arc<Mutex<VecDeque<Slot>>>;

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, budgets: Arc<Budgets>) {
    let slots: Slots = Arc::default();
    for id in 0u64.. {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A duplicate of the socket, non-blocking like the original, to peek at.
        let Ok(peer) = stream
            .into_std()
            .and_then(|s| Ok((s.try_clone()?, s)))
            .and_then(|(peer, s)| Ok((peer, tokio::net::TcpStream::from_std(s)?)))
        else {
            continue;
        };
        let (peer, stream) = peer;
        let mut held = slots.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= MAX_CONNECTIONS {
            // The oldest connection that is not asking gives its slot up; if all are, the new one is closed
            // at once, unread.
            match held.iter().position(|s| !s.asking()) {
                Some(i) => {
                    if let Some(evicted) = held.remove(i) {
                        evicted.task.abort();
                    }
                }
                None => continue,
            }
        }
        let asked = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(scrape(
            stream,
            broker.clone(),
            budgets.clone(),
            asked.clone(),
            (slots.clone(), id),
        ));
        // Still under the lock: the task cannot end and look for its slot before it is there.
        held.push_back(Slot {
            id,
            asked,
            peer,
            task: task.abort_handle(),
        });
    }
}

/// Serves one connection, then frees its slot.
async fn scrape(
    stream: tokio::net::TcpStream,
    broker: Arc<Broker>,
    budgets: Arc<Budgets>,
    asked: Arc<AtomicBool>,
    (slots, id): (Slots, u64),
) {
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        asked.store(true, Ordering::Release);
        let response = respond(&request, &broker, &budgets);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
    slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| s.id != id);
}

fn respond(
    request: &Request<hyper::body::Incoming>,
    broker: &Broker,
    budgets: &Budgets,
) -> Response<Full<Bytes>> {
    let (status, body, content_type) = if request.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".to_owned(),
            "text/plain; charset=utf-8",
        )
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".to_owned(),
            "text/plain; charset=utf-8",
        )
    } else {
        let cache = broker.cache();
        let levels = Levels {
            cache_entries: cache.len(),
            cache_bytes: cache.bytes(),
            connections: budgets
                .usage()
                .iter()
                .filter(|(b, ..)| matches!(b, Bucket::Uid(_)))
                .map(|(_, n, _)| n)
                .sum(),
            fetches_in_flight: cache.fetches_in_flight(),
        };
        (
            StatusCode::OK,
            telemetry::metrics().render(levels),
            telemetry::CONTENT_TYPE,
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(
        if request.method() == Method::HEAD {
            String::new()
        } else {
            body
        },
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
