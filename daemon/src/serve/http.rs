//! Plain HTTP on the same socket, for callers that would rather not generate gRPC stubs: a shell script with
//! `curl --unix-socket`, a Python exporter with `httpx`. The shape users know from cloud metadata servers and
//! Vault Agent: a small local API behind a header that guards against request forgery (SSRF).
//!
//! - `GET /v1/token?scope=S&scope=S2&client=C&min_ttl=SECONDS`: the JSON of `credbroker token --format json`.
//! - `GET /v1/whoami`: the JSON of `credbroker whoami --format json`.
//! - `GET /v1/proof?scope=S&client=C&method=M&url=U&nonce=N`: `{"authorization", "dpop"}`, the two headers of
//!   a request to an API with a DPoP-bound token (the JSON of `credbroker proof --format json`), and the
//!   token's `expires_at`, `expires_in`, `scopes` and `client` as `/v1/token` gives them.
//!
//! Every request must carry `Credbroker-Request: true`; none may have a body. Errors are JSON
//! `{"error": "<gRPC status name, lowercase>", "message": "…"}` with the HTTP status of [`http_status`]. The
//! same identity, policy, audit and limits apply as for gRPC: the calls go through [`Broker`] with the
//! connection's identity. Served over HTTP/1.1 (detected per connection) and over HTTP/2 (the `v1` routes
//! beside the gRPC services).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use credbroker_proto::pb;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tonic::Code;
use tonic::body::Body;

use crate::error::code_name;
use crate::serve::conn::Connection;
use crate::serve::service::Broker;

/// The header every request must carry, with the value `true`.
pub const GUARD: &str = "credbroker-request";

/// Largest request head (request line and headers) accepted over HTTP/1.1: room for the largest valid
/// request, 64 scopes of 256 bytes percent-encoded (about 50 KiB).
pub const MAX_HEAD: usize = 56 * 1024;

/// The HTTP API: a [`tower::Service`] for the `/v1/` routes.
#[derive(Clone)]
pub struct HttpApi {
    broker: Arc<Broker>,
}

impl HttpApi {
    /// The API over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

impl tonic::server::NamedService for HttpApi {
    /// tonic routes `/v1/*` here.
    const NAME: &'static str = "v1";
}

impl<B> tower::Service<Request<B>> for HttpApi
where
    B: http_body::Body + Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let broker = self.broker.clone();
        let has_body = !request.body().is_end_stream();
        let (parts, _body) = request.into_parts();
        Box::pin(async move { Ok(handle(&broker, &parts, has_body).await) })
    }
}

/// What went wrong, as the API reports it.
#[derive(Debug)]
struct Failure {
    code: Code,
    message: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

async fn handle(broker: &Broker, parts: &http::request::Parts, has_body: bool) -> Response<Body> {
    let result = route(broker, parts, has_body).await;
    match result {
        Ok(json) => respond(StatusCode::OK, json, None),
        Err(f) => {
            let status = http_status(f.code);
            let body = serde_json::json!({ "error": code_name(f.code), "message": f.message });
            let mut r = respond(status, body, f.retry_after);
            if status == StatusCode::METHOD_NOT_ALLOWED {
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            r
        }
    }
}

async fn route(
    broker: &Broker,
    parts: &http::request::Parts,
    has_body: bool,
) -> Result<serde_json::Value, Failure> {
    let path = parts.uri.path();
    if !["/v1/token", "/v1/whoami", "/v1/proof"].contains(&path) {
        return Err(Failure::new(
            Code::NotFound,
            format!(
                "no such route {:?}: use GET /v1/token, /v1/whoami or /v1/proof",
                crate::text::clip(path).to_string()
            ),
        ));
    }
    if parts.method != Method::GET {
        return Err(Failure::new(
            Code::Unimplemented,
            format!("{} is not allowed here: use GET", parts.method),
        ));
    }
    let guarded = parts
        .headers
        .get(GUARD)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if !guarded {
        return Err(Failure::new(
            Code::InvalidArgument,
            "every request must carry the header `Credbroker-Request: true` (it keeps other programs from \
             being tricked into fetching a token)",
        ));
    }
    if has_body {
        return Err(Failure::new(
            Code::InvalidArgument,
            "no request body is accepted",
        ));
    }
    let conn = parts
        .extensions
        .get::<Arc<Connection>>()
        .cloned()
        .ok_or_else(|| Failure::new(Code::Unauthenticated, "not a Unix socket peer"))?;
    if path == "/v1/whoami" {
        if parts.uri.query().is_some_and(|q| !q.is_empty()) {
            return Err(Failure::new(
                Code::InvalidArgument,
                "/v1/whoami takes no parameters",
            ));
        }
        let mut request = tonic::Request::new(pb::WhoAmIRequest {});
        request.extensions_mut().insert(conn);
        let me = broker.whoami(request).await.map_err(failure)?;
        return Ok(whoami_json(&me));
    }
    let proof = path == "/v1/proof";
    let query = parse_query(parts.uri.query().unwrap_or(""), proof)?;
    if proof {
        let mut request = tonic::Request::new(query);
        request.extensions_mut().insert(conn);
        let p = broker.proof(request).await.map_err(failure)?;
        let (expires_at, expires_in) = expiry(p.expires_at);
        return Ok(serde_json::json!({
            "authorization": p.authorization,
            "dpop": p.dpop,
            "expires_at": expires_at,
            "expires_in": expires_in,
            "scopes": p.scopes,
            "client": p.client,
        }));
    }
    let mut request = tonic::Request::new(pb::GetTokenRequest {
        scopes: query.scopes,
        client: query.client,
        min_ttl_seconds: query.min_ttl_seconds,
    });
    request.extensions_mut().insert(conn);
    let token = broker.token(request).await.map_err(failure)?;
    Ok(token_json(&token))
}

fn failure(e: crate::error::Error) -> Failure {
    let retry_after = e.retry_after();
    let status = tonic::Status::from(e);
    Failure {
        code: status.code(),
        message: status.message().to_owned(),
        retry_after,
    }
}

/// `scope` (repeated; `%20` separates scopes inside one value), `client`, `min_ttl` (seconds), and for a proof
/// `method`, `url` and `nonce`. Percent-decoded as RFC 3986 says: `+` is a literal plus, a valid scope
/// character.
fn parse_query(query: &str, proof: bool) -> Result<pb::ProofRequest, Failure> {
    let bad = |m: String| Failure::new(Code::InvalidArgument, m);
    let mut request = pb::ProofRequest::default();
    let mut seen: Vec<&str> = Vec::new();
    let known: &[&str] = if proof {
        &["client", "min_ttl", "method", "url", "nonce"]
    } else {
        &["client", "min_ttl"]
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| {
            bad(format!(
                "parameter {:?} is not valid percent-encoded UTF-8",
                crate::text::clip(key).to_string()
            ))
        })?;
        if key == "scope" {
            request.scopes.extend(
                value
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
            // Bounded here as in gRPC: the scope rules then say what is wrong.
            if request.scopes.len() > crate::policy::scope::MAX_SCOPES + 1 {
                break;
            }
            continue;
        }
        let Some(&key) = known.iter().find(|k| **k == key) else {
            return Err(bad(format!(
                "unknown parameter {:?}: use scope, {}",
                crate::text::clip(key).to_string(),
                known.join(", ")
            )));
        };
        if seen.contains(&key) {
            return Err(bad(format!("{key} is given more than once")));
        }
        seen.push(key);
        match key {
            "client" => request.client = value,
            "min_ttl" => {
                request.min_ttl_seconds = value
                    .parse()
                    .map_err(|_| bad("min_ttl must be a whole number of seconds".to_owned()))?;
            }
            "method" => request.method = value,
            "url" => request.url = value,
            _ => request.nonce = value,
        }
    }
    Ok(request)
}

/// RFC 3986 percent-decoding (`+` stays a plus); `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The JSON of `credbroker token --format json`.
fn token_json(t: &pb::GetTokenResponse) -> serde_json::Value {
    let (expires_at, expires_in) = expiry(t.expires_at);
    serde_json::json!({
        "access_token": t.access_token,
        "token_type": t.token_type,
        "expires_at": expires_at,
        "expires_in": expires_in,
        "scopes": t.scopes,
        "client": t.client,
    })
}

/// A token's expiry as the JSON answers give it: RFC 3339 (seconds), and seconds from now.
fn expiry(at: Option<prost_types::Timestamp>) -> (String, u64) {
    let at = at
        .and_then(|ts| SystemTime::try_from(ts).ok())
        .unwrap_or_else(SystemTime::now);
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    (
        humantime::format_rfc3339_seconds(at).to_string(),
        left.as_secs(),
    )
}

/// The JSON of `credbroker whoami --format json`.
fn whoami_json(me: &pb::WhoAmIResponse) -> serde_json::Value {
    let c = me.caller.clone().unwrap_or_default();
    let grants: serde_json::Map<String, serde_json::Value> = me
        .grants
        .iter()
        .map(|g| (g.client.clone(), serde_json::json!(g.scopes)))
        .collect();
    serde_json::json!({
        "uid": c.uid, "gid": c.gid, "pid": c.pid, "user": c.user, "groups": c.groups,
        "exe": c.exe, "unit": c.unit, "grants": grants,
    })
}

fn respond(
    status: StatusCode,
    json: serde_json::Value,
    retry_after: Option<Duration>,
) -> Response<Body> {
    let body = http_body_util::Full::new(bytes::Bytes::from(json.to_string() + "\n"));
    let mut r = Response::new(Body::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(wait) = retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    r
}

/// The HTTP status of a gRPC status code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unimplemented => StatusCode::METHOD_NOT_ALLOWED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_as_rfc_3986_says() {
        let r = parse_query("scope=a%3Ab+c&scope=d%20e&client=idp&min_ttl=90", false).unwrap();
        assert_eq!(r.scopes, ["a:b+c", "d", "e"]);
        assert_eq!(r.client, "idp");
        assert_eq!(r.min_ttl_seconds, 90);
        assert!(parse_query("scope=%zz", false).is_err());
        assert!(parse_query("scope=%ff", false).is_err(), "not UTF-8");
        assert!(parse_query("scope=a&color=red", false).is_err());
        assert!(parse_query("client=a&client=b", false).is_err());
        assert!(parse_query("min_ttl=soon", false).is_err());
        // A proof's request: method, URL and nonce, each once; a token request takes none of them.
        let p = parse_query(
            "scope=a&method=GET&url=https%3A%2F%2Fapi.example%2Fv1%3Fq%3D1&nonce=n-1",
            true,
        )
        .unwrap();
        assert_eq!(
            (p.method.as_str(), p.url.as_str(), p.nonce.as_str()),
            ("GET", "https://api.example/v1?q=1", "n-1")
        );
        assert!(parse_query("scope=a&url=x&url=y", true).is_err());
        assert!(parse_query("scope=a&method=GET", false).is_err());
    }

    #[test]
    fn every_grpc_status_has_its_http_status() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
        assert_eq!(code_name(Code::PermissionDenied), "permission_denied");
    }
}
