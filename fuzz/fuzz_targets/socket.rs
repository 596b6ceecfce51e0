//! Raw connection bytes through the daemon's real stack: `credbroker_daemon::run` serving connections handed
//! over in memory (one end of a socket pair each: no path, no accept, the kernel's peer credentials intact),
//! through the identity handshake, protocol detection, HTTP/1.1 through hyper and the HTTP API, HTTP/2 through
//! the vendored h2, tonic, the authority handling and the gRPC service, with a stand-in token endpoint on
//! 127.0.0.1 that the daemon fetched one token from before fuzzing starts. Each input is one connection:
//! written, then ended (a half-close; for HTTP/2 a GOAWAY frame, so that its streams are answered), its answer
//! read (bounded in size and time).
//!
//! Property: a request to the HTTP API without the guard header (`Credbroker-Request: true`) is never
//! answered with the token, over HTTP/1.1 or HTTP/2 (where gRPC's GetToken may hand it out).
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use credbroker_daemon::config::Config;
use credbroker_daemon::secret::SecretEnv;
use credbroker_daemon::serve::notify::Notifier;
use credbroker_daemon::serve::server::Incoming;
use credbroker_daemon::{Options, Signal};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "fuzz-access-token-7c1d9e";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A client's GOAWAY frame (RFC 9113 §6.8): last stream 0, NO_ERROR.
const GOAWAY: &[u8] = &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Hands connections to a daemon serving for the whole run.
fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let (connections, mut handed) = tokio::sync::mpsc::channel::<UnixStream>(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let idp = idp().await;
                let uid = credbroker_daemon::sys::euid();
                let config = format!(
                    "version = 1\n[clients.idp]\ntoken_url = \"http://{idp}/token\"\n\
                     allow_http = true\nclient_id = \"broker\"\nclient_secret = {{ env = \"S\" }}\n\
                     [[policy]]\nname = \"me\"\nmatch = {{ uid = {uid} }}\nclient = \"idp\"\nscopes = [\"*\"]\n"
                );
                let env = SecretEnv {
                    credentials_dir: None,
                    var: &|_| Some("secret".to_owned()),
                    offline: None,
                };
                let config = Config::parse(&config, &env).unwrap();
                // Each connection, registered with this runtime, goes to the daemon.
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    while let Some(io) = handed.recv().await {
                        let io = io.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(io));
                        if tx.send(io.unwrap()).await.is_err() {
                            return;
                        }
                    }
                });
                let options = Options {
                    reload_config: std::sync::Arc::new(|| Err(credbroker_daemon::config::ConfigErrors {
                        path: None,
                        errors: Vec::new(),
                    })),
                    notifier: Notifier::new(None),
                    watchdog: None,
                    grace: Duration::from_secs(1),
                    nofile: 1024,
                };
                let signals = tokio_stream::pending::<Signal>();
                if let Err(e) = credbroker_daemon::run(config, Incoming::Connected(rx), signals, options).await {
                    eprintln!("the daemon stopped: {e:#}");
                    std::process::exit(1);
                }
            });
        });
        let daemon = Daemon { connections };
        // One token fetched and cached: what a request without the guard must never get.
        let answer = daemon.exchange(
            b"GET /v1/token?scope=fuzz:read HTTP/1.1\r\nHost: x\r\nCredbroker-Request: true\r\nConnection: close\r\n\r\n",
        );
        eprintln!("socket target: warm-up answer: {}", String::from_utf8_lossy(&answer));
        assert!(String::from_utf8_lossy(&answer).contains(TOKEN), "no token to protect: {answer:?}");
        daemon
    })
}

struct Daemon {
    connections: tokio::sync::mpsc::Sender<UnixStream>,
}

/// A token endpoint that always issues the same token.
async fn idp() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let body = format!(
                        "{{\"access_token\":\"{TOKEN}\",\"token_type\":\"Bearer\",\"expires_in\":36000}}"
                    );
                    let mut r =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

impl Daemon {
    /// Writes `input` on a new connection, says it is done (a half-close, or HTTP/2's GOAWAY), and reads the
    /// answer (at most 64 KiB, 2 s).
    fn exchange(&self, input: &[u8]) -> Vec<u8> {
        let (mut s, theirs) = UnixStream::pair().unwrap();
        self.connections.blocking_send(theirs).unwrap();
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(input);
        let mut answer = Vec::new();
        if input.starts_with(H2_PREFACE) {
            // HTTP/2 answers a half-closed connection by closing it, its streams unanswered; a GOAWAY says
            // "no more streams" instead, so the daemon answers those it has and then closes. A stream left
            // waiting for its body (or a frame cut short) would hold the connection open: after 25 ms without
            // a byte, half-close it after all. (An answer slower than that is missed, never made up.)
            let _ = s.write_all(GOAWAY);
            let _ = s.set_read_timeout(Some(Duration::from_millis(25)));
            let mut buf = [0u8; 16 * 1024];
            while answer.len() < 64 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) => return answer,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let limit = (64 * 1024u64).saturating_sub(answer.len() as u64);
        let _ = s.take(limit).read_to_end(&mut answer);
        answer
    }
}

/// HPACK's Huffman code (RFC 7541 Appendix B) of `credbroker-request` and of the token, less the last byte
/// (whose padding bits may vary): an HTTP/2 request can carry either coded that way. Computed with Python's
/// `hpack` 4.0 (`HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(...)`, checked by decoding).
const GUARD_HUFFMAN: &[u8] = &[
    0x25, 0x85, 0x92, 0x3b, 0x0f, 0xd4, 0xb6, 0x2d, 0x61, 0x7b, 0x5a, 0x54,
];
const TOKEN_HUFFMAN: &[u8] = &[
    0x96, 0xdf, 0x7e, 0xd6, 0x19, 0x08, 0x54, 0x21, 0x64, 0x9f, 0xa9, 0x6a, 0x59, 0xd2, 0x06, 0x47,
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let answer = daemon().exchange(data);
    let is_h2 = data.starts_with(H2_PREFACE);
    // Whether any request of the input may carry the guard header: its name in plain text (any case), or
    // Huffman-coded in an HTTP/2 header block (a name the dynamic table repeats was sent once that way).
    let guarded = data
        .windows(b"credbroker-request".len())
        .any(|w| w.eq_ignore_ascii_case(b"credbroker-request"))
        || (is_h2 && contains(data, GUARD_HUFFMAN));
    // An input that holds the token itself may see it echoed (a 404 names the path it did not find).
    let holds_token = contains(data, TOKEN.as_bytes()) || (is_h2 && contains(data, TOKEN_HUFFMAN));
    if guarded || holds_token {
        return;
    }
    if is_h2 {
        // gRPC's GetToken hands the token out without the guard (the guard is for the HTTP API, which
        // browsers and fetchers can be tricked into calling): there it is a protobuf string, right after its
        // length (24, 0x18). The HTTP API's JSON over HTTP/2 would put a quote there.
        for (at, w) in answer.windows(TOKEN.len()).enumerate() {
            if w == TOKEN.as_bytes() {
                assert!(
                    at > 0 && answer[at - 1] == TOKEN.len() as u8,
                    "an HTTP/2 request without the guard header got the token from the HTTP API"
                );
            }
        }
    } else {
        assert!(
            !contains(&answer, TOKEN.as_bytes()),
            "a request without the guard header got the token"
        );
    }
});
