//! The governor: what every call on the socket costs its user, whatever the service (broker, admin,
//! reflection, health, the HTTP API, and any added later) and whatever the stream kind.
//!
//! It is one layer in front of every service, so a new surface is bounded by default:
//!
//! - **Calls in flight.** A call takes a slot of its user's budget (its uid's, and the shared budget of callers
//!   no policy matches when it is one of them, see [`crate::serve::limits`]) before its service sees it, and
//!   gives it back only when its reply has ended, not when the reply starts: a streaming reply counts for as
//!   long as it streams. Over budget, a call waits, unread.
//! - **Request bytes.** A call's request body, all its messages together, is at most [`MAX_REQUEST_BODY`];
//!   beyond, the call fails. (Each service also bounds one message, at
//!   [`crate::serve::server::MAX_MESSAGE_LEN`].)
//! - **Reply bytes waiting for the peer.** A connection may have at most [`REPLY_BUDGET`] bytes of replies
//!   handed to HTTP/2 (or HTTP/1.1) and not yet written to its socket. A reply is handed over in pieces of at
//!   most [`REPLY_PIECE`]; a piece waits, in its service, until the peer has read enough. A peer that gives
//!   no flow-control window, or never reads, makes the daemon hold at most that much per connection, plus
//!   one piece per call.
//!
//! So what one user can make the daemon hold is bounded by its connections and calls, and the bounds do
//! not depend on which service it calls.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use crate::serve::conn::{Call, Connection};

/// Most request bytes one call may send, all its messages together.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Most reply bytes of one connection handed to the protocol layer and not yet written to the socket.
pub const REPLY_BUDGET: usize = 64 * 1024;
/// Largest piece of a reply handed over at once.
pub const REPLY_PIECE: usize = 16 * 1024;

/// One connection's reply bytes in flight, and the replies waiting for room.
#[derive(Default)]
pub struct ReplyBudget {
    /// Bytes handed over and not yet written.
    pending: AtomicUsize,
    /// Replies waiting for room (at most one per stream: their wakers are deduplicated).
    waiting: Mutex<Vec<Waker>>,
    /// `waiting.len()`, read without the lock on the write path.
    waiters: AtomicUsize,
}

impl ReplyBudget {
    /// Takes room for `n` bytes if the connection is under its budget; otherwise registers `cx` to be woken
    /// when bytes are written.
    fn poll_take(&self, n: usize, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending.load(Ordering::Acquire) < REPLY_BUDGET {
            self.pending.fetch_add(n, Ordering::AcqRel);
            return Poll::Ready(());
        }
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
                self.waiters.store(waiting.len(), Ordering::Release);
            }
        }
        // Bytes may have been written between the check and the registration.
        if self.pending.load(Ordering::Acquire) < REPLY_BUDGET {
            self.pending.fetch_add(n, Ordering::AcqRel);
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// `n` reply bytes were written to the socket.
    pub fn written(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
        if self.waiters.load(Ordering::Acquire) > 0 {
            let woken = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                self.waiters.store(0, Ordering::Release);
                std::mem::take(&mut *waiting)
            };
            for w in woken {
                w.wake();
            }
        }
    }

    /// Reply bytes handed over and not yet written.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// Counts the reply bytes in what a connection writes: for HTTP/2, the payload of DATA frames (so control
/// frames the peer provokes, such as PING acknowledgements, free no room); for HTTP/1.1, every byte.
pub struct WriteMeter {
    /// `None` for HTTP/1.1.
    h2: Option<FrameCursor>,
}

/// Where the writer is in the HTTP/2 frame sequence.
#[derive(Default)]
struct FrameCursor {
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    data: bool,
}

impl WriteMeter {
    /// A meter for an HTTP/2 connection (frames from its first byte) or an HTTP/1.1 one.
    pub fn new(http2: bool) -> Self {
        Self {
            h2: http2.then(FrameCursor::default),
        }
    }

    /// The reply bytes among `written`, the next bytes written to the socket.
    pub fn reply_bytes(&mut self, mut written: &[u8]) -> usize {
        let Some(f) = &mut self.h2 else {
            return written.len();
        };
        let mut data = 0;
        while !written.is_empty() {
            if f.remaining == 0 && f.header_len < 9 {
                let take = (9 - f.header_len).min(written.len());
                f.header[f.header_len..f.header_len + take].copy_from_slice(&written[..take]);
                f.header_len += take;
                written = &written[take..];
                if f.header_len == 9 {
                    f.remaining = usize::from(f.header[0]) << 16
                        | usize::from(f.header[1]) << 8
                        | usize::from(f.header[2]);
                    f.data = f.header[3] == 0;
                    f.header_len = if f.remaining == 0 { 0 } else { 9 };
                }
                continue;
            }
            let take = f.remaining.min(written.len());
            if f.data {
                data += take;
            }
            f.remaining -= take;
            written = &written[take..];
            if f.remaining == 0 {
                f.header_len = 0;
            }
        }
        data
    }
}

/// Puts every call under the governor (see the module docs).
#[derive(Clone)]
pub struct Governed<S> {
    inner: S,
}

impl<S> Governed<S> {
    /// `inner` under the governor.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// The [`tower::Layer`] of [`Governed`].
#[derive(Clone, Copy, Default)]
pub struct GovernorLayer;

impl<S> tower::Layer<S> for GovernorLayer {
    type Service = Governed<S>;

    fn layer(&self, inner: S) -> Governed<S> {
        Governed { inner }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for Governed<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Reply>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let conn = request.extensions().get::<Arc<Connection>>().cloned();
        let request = request.map(|body| {
            tonic::body::Body::new(http_body_util::Limited::new(body, MAX_REQUEST_BODY))
        });
        // Ready now (poll_ready said so); the call itself runs once a slot is free.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        Box::pin(async move {
            let call = match &conn {
                Some(conn) => Some(conn.start_call().await),
                None => None,
            };
            let response = inner.call(request).await?;
            Ok(response.map(|body| Reply {
                inner: tonic::body::Body::new(body),
                held: None,
                conn,
                call,
            }))
        })
    }
}

/// A reply under the governor: handed over in pieces as the connection's [`ReplyBudget`] allows, holding
/// its call's slot until it ends (or is dropped).
pub struct Reply {
    inner: tonic::body::Body,
    /// What is left of the last data frame taken from `inner`.
    held: Option<Bytes>,
    conn: Option<Arc<Connection>>,
    call: Option<Call>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            if let Some(held) = &mut this.held {
                let n = held.len().min(REPLY_PIECE);
                if let Some(conn) = &this.conn {
                    std::task::ready!(conn.replies().poll_take(n, cx));
                }
                let piece = held.split_to(n);
                if !held.has_remaining() {
                    this.held = None;
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => this.held = Some(data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.call = None;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref().map_or(0, |h| h.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn only_data_payload_counts_however_the_writes_are_cut() {
        let mut bytes = frame(4, &[0; 6]); // SETTINGS
        bytes.extend(frame(1, &[7; 40])); // HEADERS
        bytes.extend(frame(0, &[1; 1000])); // DATA
        bytes.extend(frame(6, &[0; 8])); // PING ack
        bytes.extend(frame(0, &[])); // empty DATA
        bytes.extend(frame(0, &[2; 300])); // DATA
        for cut in [1, 2, 5, 9, 10, 64, 1000, bytes.len()] {
            let mut meter = WriteMeter::new(true);
            let counted: usize = bytes.chunks(cut).map(|c| meter.reply_bytes(c)).sum();
            assert_eq!(counted, 1300, "writes of {cut} bytes");
        }
        assert_eq!(WriteMeter::new(false).reply_bytes(&bytes), bytes.len());
    }

    #[test]
    fn a_connection_over_its_budget_waits_until_bytes_are_written() {
        struct Counter(AtomicUsize);
        impl std::task::Wake for Counter {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let budget = ReplyBudget::default();
        let woken = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..REPLY_BUDGET / REPLY_PIECE {
            assert!(budget.poll_take(REPLY_PIECE, &mut cx).is_ready());
        }
        assert!(budget.poll_take(REPLY_PIECE, &mut cx).is_pending());
        assert!(budget.poll_take(REPLY_PIECE, &mut cx).is_pending());
        assert_eq!(
            budget.waiting.lock().unwrap().len(),
            1,
            "one waker per waiter"
        );
        budget.written(1);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
        assert!(budget.waiting.lock().unwrap().is_empty());
        assert!(budget.poll_take(REPLY_PIECE, &mut cx).is_ready());
        assert_eq!(budget.pending(), REPLY_BUDGET + REPLY_PIECE - 1);
        budget.written(usize::MAX);
        assert_eq!(budget.pending(), 0);
    }
}
