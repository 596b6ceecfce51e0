//! One token (or one DPoP proof), as cheaply as a process can get it (feature `oneshot`): a blocking
//! HTTP/1.1 request to the daemon's plain HTTP API (`GET /v1/token`, `GET /v1/proof`) on a Unix socket, with
//! nothing but the standard library's socket: no async runtime, no HTTP/2 handshake. `credbroker token` and
//! `credbroker proof` use it, as kubectl's exec plugin and scripts run them once per command; a program that
//! asks often keeps a [`crate::Client`].
//!
//! The daemon judges it as any caller (the kernel's view of this process), and its errors are the same
//! [`Error`]s a [`crate::Client`] returns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::{Error, Proof, ProofRequest, Token, TokenRequest};

/// Largest answer read (a token is at most 16 KiB; the JSON around it small).
const MAX_ANSWER: u64 = 256 * 1024;

/// A token for `request` from the daemon at `socket`, within `timeout`.
///
/// ```no_run
/// # fn demo() -> Result<(), credbroker_client::Error> {
/// use credbroker_client::{TokenRequest, discover_socket};
/// use std::time::Duration;
///
/// let token = credbroker_client::oneshot::token(
///     &discover_socket(),
///     &TokenRequest::new(["scim:read"]),
///     Duration::from_secs(30),
/// )?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// As [`crate::Client::get_token`]: [`Error::Connect`] or [`Error::SocketPermission`] when the socket cannot
/// be reached, [`Error::Timeout`] past `timeout`, and the daemon's refusals with their codes.
pub fn token(socket: &Path, request: &TokenRequest, timeout: Duration) -> Result<Token, Error> {
    let json = get(socket, &format!("/v1/token?{}", query(request)), timeout)?;
    Ok(token_of(&json))
}

/// A DPoP proof for `request` from the daemon at `socket`, within `timeout`: what
/// [`crate::Client::proof`] answers, over one HTTP/1.1 request.
///
/// # Errors
/// As [`token`]; as [`crate::Client::proof`] for a URL outside the caller's targets or a client that does
/// not bind its tokens.
pub fn proof(socket: &Path, request: &ProofRequest, timeout: Duration) -> Result<Proof, Error> {
    let mut query = query(&request.token);
    push_param(&mut query, "method", &request.method);
    push_param(&mut query, "url", &request.url);
    if let Some(nonce) = &request.nonce {
        push_param(&mut query, "nonce", nonce);
    }
    let json = get(socket, &format!("/v1/proof?{query}"), timeout)?;
    Ok(proof_of(&json))
}

/// `/v1/token`'s answer.
fn token_of(json: &serde_json::Value) -> Token {
    Token {
        access_token: SecretString::from(text(json, "access_token")),
        token_type: text(json, "token_type"),
        expires_at: expires_at(json),
        scopes: scopes(json),
        client: text(json, "client"),
    }
}

/// `/v1/proof`'s answer.
fn proof_of(json: &serde_json::Value) -> Proof {
    Proof {
        authorization: SecretString::from(text(json, "authorization")),
        dpop: SecretString::from(text(json, "dpop")),
        expires_at: expires_at(json),
        scopes: scopes(json),
        client: text(json, "client"),
    }
}

/// The query of a token request: each scope, the client, `min_ttl` as gRPC sends it.
fn query(request: &TokenRequest) -> String {
    let mut query = String::new();
    for scope in &request.scopes {
        push_param(&mut query, "scope", scope);
    }
    if let Some(client) = &request.client {
        push_param(&mut query, "client", client);
    }
    if request.min_ttl.is_some() {
        push_param(
            &mut query,
            "min_ttl",
            &request.min_ttl_seconds().to_string(),
        );
    }
    query
}

/// `GET target`: the answer's JSON, or the daemon's error.
fn get(socket: &Path, target: &str, timeout: Duration) -> Result<serde_json::Value, Error> {
    // A connection the daemon closed before answering (an instance stopping behind the systemd socket while
    // its successor starts) is tried once more, as the gRPC client does.
    match ask(socket, target, timeout)? {
        Some(answer) => parse(&answer),
        None => match ask(socket, target, timeout)? {
            Some(answer) => parse(&answer),
            None => Err(Error::Unavailable(
                "credbrokerd closed the connection without answering, twice".to_owned(),
            )),
        },
    }
}

/// One request: the answer, or `None` when the daemon closed the connection without one.
fn ask(socket: &Path, target: &str, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
    let mut stream = UnixStream::connect(socket).map_err(|e| crate::connect_error(socket, &e))?;
    let io = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Error::Timeout(format!("no answer from credbrokerd within {timeout:?}"))
        } else {
            Error::Unavailable(format!("the connection to credbrokerd failed: {e}"))
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nCredbroker-Request: true\r\n\
         Connection: close\r\n\r\n"
    );
    let closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    };
    match stream.write_all(head.as_bytes()) {
        Err(e) if closed(&e) => return Ok(None),
        other => other.map_err(io)?,
    }
    // (Room for a usual answer at once: one read instead of a dozen growing ones.)
    let mut answer = Vec::with_capacity(16 * 1024);
    match (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer) {
        Err(e) if closed(&e) && answer.is_empty() => return Ok(None),
        other => other.map_err(io)?,
    };
    Ok((!answer.is_empty()).then_some(answer))
}

/// `&name=value`, the value percent-encoded (RFC 3986: only unreserved characters stay).
fn push_param(query: &mut String, name: &str, value: &str) {
    if !query.is_empty() {
        query.push('&');
    }
    query.push_str(name);
    query.push('=');
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            query.push(b as char);
        } else {
            query.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The daemon's answer: its JSON, or its error.
fn parse(answer: &[u8]) -> Result<serde_json::Value, Error> {
    let bad = |what: &str| Error::Unavailable(format!("credbrokerd's answer is {what}"));
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("incomplete"))?;
    let (head, body) = (&answer[..split], &answer[split + 4..]);
    let status: u16 = std::str::from_utf8(head)
        .ok()
        .and_then(|h| h.split(' ').nth(1)?.parse().ok())
        .ok_or_else(|| bad("not HTTP"))?;
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad("not JSON"))?;
    if status != 200 {
        let code = code(&text(&json, "error"));
        return Err(Error::from(tonic::Status::new(
            code,
            text(&json, "message"),
        )));
    }
    Ok(json)
}

/// A string member of an answer (empty when missing).
fn text(json: &serde_json::Value, key: &str) -> String {
    json[key].as_str().unwrap_or_default().to_owned()
}

/// The token's expiry: `expires_at`, or `expires_in` from now.
fn expires_at(json: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(&text(json, "expires_at")).unwrap_or_else(|_| {
        SystemTime::now() + Duration::from_secs(json["expires_in"].as_u64().unwrap_or(0))
    })
}

/// The scopes granted.
fn scopes(json: &serde_json::Value) -> Vec<String> {
    json["scopes"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The gRPC code the HTTP API names in `error` (the daemon's `error::code_name`, read back).
fn code(name: &str) -> tonic::Code {
    use tonic::Code as C;
    match name {
        "cancelled" => C::Cancelled,
        "invalid_argument" => C::InvalidArgument,
        "deadline_exceeded" => C::DeadlineExceeded,
        "not_found" => C::NotFound,
        "already_exists" => C::AlreadyExists,
        "permission_denied" => C::PermissionDenied,
        "resource_exhausted" => C::ResourceExhausted,
        "failed_precondition" => C::FailedPrecondition,
        "aborted" => C::Aborted,
        "out_of_range" => C::OutOfRange,
        "unimplemented" => C::Unimplemented,
        "internal" => C::Internal,
        "unavailable" => C::Unavailable,
        "data_loss" => C::DataLoss,
        "unauthenticated" => C::Unauthenticated,
        _ => C::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn answers_become_tokens_or_the_same_errors_as_over_grpc() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"access_token\":\"t\",\"token_type\":\"Bearer\",\"expires_at\":\"2030-01-01T00:00:00Z\",\"expires_in\":5,\"scopes\":[\"a\",\"b\"],\"client\":\"idp\"}";
        let t = token_of(&parse(ok).unwrap());
        assert_eq!(
            (t.token_type(), t.client(), t.scopes()),
            ("Bearer", "idp", &["a".to_owned(), "b".to_owned()][..])
        );
        assert_eq!(
            humantime::format_rfc3339_seconds(t.expires_at()).to_string(),
            "2030-01-01T00:00:00Z"
        );
        let denied =
            b"HTTP/1.1 403 Forbidden\r\n\r\n{\"error\":\"permission_denied\",\"message\":\"no\"}";
        let e = parse(denied).unwrap_err();
        assert!(e.is_denied() && e.to_string() == "denied: no", "{e}");
        let retry = b"HTTP/1.1 503 x\r\n\r\n{\"error\":\"unavailable\",\"message\":\"idp down\"}";
        assert!(parse(retry).unwrap_err().is_retryable());
        let operator =
            b"HTTP/1.1 400 x\r\n\r\n{\"error\":\"failed_precondition\",\"message\":\"m\"}";
        assert!(parse(operator).unwrap_err().needs_operator());
        assert!(parse(b"garbage").is_err());
        let proof = b"HTTP/1.1 200 OK\r\n\r\n{\"authorization\":\"DPoP t\",\"dpop\":\"p\",\"expires_at\":\"2030-01-01T00:00:00Z\",\"expires_in\":5,\"scopes\":[\"a\"],\"client\":\"idp\"}";
        let p = proof_of(&parse(proof).unwrap());
        assert_eq!(
            (
                p.authorization().expose_secret(),
                p.dpop().expose_secret(),
                p.client(),
                p.scopes()
            ),
            ("DPoP t", "p", "idp", &["a".to_owned()][..])
        );
    }

    #[test]
    fn parameters_are_percent_encoded() {
        let mut q = String::new();
        push_param(&mut q, "scope", "api://app/.default");
        push_param(&mut q, "scope", "a+b c");
        assert_eq!(q, "scope=api%3A%2F%2Fapp%2F.default&scope=a%2Bb%20c");
    }
}
