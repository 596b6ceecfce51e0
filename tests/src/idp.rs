//! A stand-in OAuth 2.0 token endpoint for tests and the quick start. **Not an identity provider**: it issues
//! opaque tokens for a fixed set of clients, like Asgardeo's `/oauth2/token`, and can be told to misbehave
//! in each way real IdPs and proxies do.
//!
//! It speaks the client-credentials grant over plain HTTP/1.1 on 127.0.0.1: `client_secret_basic` (with the
//! RFC 6749 §2.3.1 form-decoding of id and secret) or `client_secret_post` (never both), per-client allowed
//! scopes (`invalid_scope` otherwise), UUID access tokens, `expires_in`, `Cache-Control: no-store`. It
//! records every request so tests can see exactly what the broker sent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A client registered with the stand-in.
#[derive(Clone, Debug)]
pub struct Registration {
    /// `client_id`.
    pub id: String,
    /// `client_secret`.
    pub secret: String,
    /// Scopes this client may get.
    pub scopes: Vec<String>,
}

/// How the endpoint misbehaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Answer with this 5xx status and an HTML page.
    Status(u16),
    /// 429 with this `Retry-After` value.
    RateLimited(String),
    /// Wait this long before answering.
    Slow(Duration),
    /// 200 with an HTML page.
    HtmlOk,
    /// 403 with an empty body.
    EmptyForbidden,
    /// Omit `expires_in`.
    NoExpiresIn,
    /// Grant this scope on top of the requested ones.
    WiderScope(String),
    /// Answer `expires_in` as a string.
    ExpiresInString,
    /// Answer `invalid_client` with a description that echoes the secret the broker sent (a sloppy server).
    EchoSecret,
    /// Issue plain Bearer tokens even to requests with a DPoP proof (a server that ignores DPoP).
    IgnoreDpop,
}

/// One request the endpoint received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The client id, however it authenticated (empty if it did not).
    pub client_id: String,
    /// `"basic"`, `"post"`, `"assertion"`, `"both"` or `"none"`.
    pub auth: &'static str,
    /// The `scope` parameter.
    pub scope: String,
    /// All form parameters except the secret.
    pub params: Vec<(String, String)>,
    /// The token issued, if any.
    pub token: Option<String>,
    /// When the token issued expires.
    pub valid_until: Option<std::time::Instant>,
    /// The request carried a valid DPoP proof: the thumbprint of its key (the token is bound to it when one
    /// was issued) and the nonce it carried.
    pub dpop: Option<(String, Option<String>)>,
}

struct State {
    clients: Mutex<HashMap<String, Registration>>,
    fault: Mutex<Fault>,
    /// The next this-many requests fail with `fail_status`, whatever the fault.
    fail_next: Mutex<(usize, u16)>,
    arrivals: AtomicUsize,
    expires_in: AtomicU64,
    requests: Mutex<Vec<Recorded>>,
    /// The token endpoint's URL, as proofs must name it (`htu`).
    token_url: Mutex<String>,
    /// The nonce proofs must carry, once required.
    dpop_nonce: Mutex<Option<String>>,
    /// Proof `jti`s seen.
    seen_jti: Mutex<std::collections::HashSet<String>>,
    /// The refresh token the refresh-token grant accepts, once enabled, and the scopes discovery lists.
    refresh_token: Mutex<Option<(String, Vec<String>)>>,
}

/// A running stand-in endpoint.
pub struct StandInIdp {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    https: bool,
}

impl Drop for StandInIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandInIdp {
    /// Starts on `127.0.0.1:port` (0 for any free port) with these clients.
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub async fn start(port: u16, clients: Vec<Registration>) -> Self {
        Self::start_with(port, clients, None).await
    }

    /// Starts on any free port of 127.0.0.1, serving HTTPS with `cert_chain` (PEM, the server's certificate
    /// first) and `key` (PKCS#8 PEM).
    ///
    /// # Panics
    /// If the certificate or key cannot be used.
    pub async fn start_tls(clients: Vec<Registration>, cert_chain: &str, key: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM certificates");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("PEM key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("a usable certificate and key");
        Self::start_with(
            0,
            clients,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(
        port: u16,
        clients: Vec<Registration>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the stand-in IdP");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            clients: Mutex::new(clients.into_iter().map(|c| (c.id.clone(), c)).collect()),
            fault: Mutex::new(Fault::None),
            fail_next: Mutex::new((0, 503)),
            arrivals: AtomicUsize::new(0),
            expires_in: AtomicU64::new(3600),
            requests: Mutex::new(Vec::new()),
            token_url: Mutex::new(String::new()),
            dpop_nonce: Mutex::new(None),
            seen_jti: Mutex::default(),
            refresh_token: Mutex::new(None),
        });
        let https = tls.is_some();
        *state.token_url.lock().unwrap() = format!(
            "{}://{addr}/oauth2/token",
            if https { "https" } else { "http" }
        );
        let task = tokio::spawn(serve(listener, state.clone(), tls));
        Self {
            addr,
            state,
            task,
            https,
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/oauth2/token", self.addr)
    }

    /// Changes how the endpoint behaves from the next request on.
    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Rotates a client's secret: from now on only `secret` is accepted.
    pub fn set_secret(&self, id: &str, secret: &str) {
        if let Some(reg) = self.state.clients.lock().unwrap().get_mut(id) {
            reg.secret = secret.to_owned();
        }
    }

    /// Makes the next `n` requests fail with HTTP `status`, then behave as the fault says.
    pub fn fail_next(&self, n: usize, status: u16) {
        *self.state.fail_next.lock().unwrap() = (n, status);
    }

    /// From now on, a DPoP proof must carry `nonce`: one without it is answered `use_dpop_nonce` with a
    /// `DPoP-Nonce: nonce` header, as servers that require nonces do.
    pub fn require_dpop_nonce(&self, nonce: &str) {
        *self.state.dpop_nonce.lock().unwrap() = Some(nonce.to_owned());
    }

    /// From now on, also the refresh-token grant, for `token` (it is answered with new access tokens and the
    /// same refresh token), and OpenID Connect discovery at `/.well-known/openid-configuration`, listing
    /// `scopes`: what a peer client that keeps refresh tokens (oidc-agent) needs to be set up against the
    /// stand-in.
    pub fn allow_refresh_token(&self, token: &str, scopes: &[&str]) {
        let scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        *self.state.refresh_token.lock().unwrap() = Some((token.to_owned(), scopes));
    }

    /// The issuer the discovery document names: the endpoint's origin.
    pub fn issuer(&self) -> String {
        self.token_url().replace("/oauth2/token", "")
    }

    /// The key a token is bound to (its `cnf.jkt`), if it is active and was issued DPoP-bound.
    pub fn binding(&self, token: &str) -> Option<String> {
        binding(&self.state, token)
    }

    /// [`StandInIdp::binding`] as a function a resource server can keep (what introspection would tell it).
    pub fn bindings(&self) -> crate::dpop::Binding {
        let state = self.state.clone();
        Arc::new(move |token: &str| binding(&state, token))
    }

    /// Sets the `expires_in` of the next tokens.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Number of token requests answered.
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Number of token requests that have arrived, answered or not.
    pub fn arrival_count(&self) -> usize {
        self.state.arrivals.load(Ordering::SeqCst)
    }

    /// The requests received, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Whether `token` was issued here and has not expired: what a resource server would check.
    pub fn is_valid(&self, token: &str) -> bool {
        is_valid(&self.state, token)
    }

    /// Its RFC 7662 introspection endpoint (`POST token=…` → `{"active": bool}`), for stand-in resource
    /// servers.
    pub fn introspection_url(&self) -> String {
        self.token_url()
            .replace("/oauth2/token", "/oauth2/introspect")
    }

    /// Every token issued, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.token)
            .collect()
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(tls) => {
                    // A client that does not trust the certificate hangs up in the handshake.
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("pragma", "no-cache")
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Resp {
    let body = serde_json::json!({ "error": code, "error_description": description }).to_string();
    let mut r = respond(status, "application/json", body);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            "www-authenticate",
            "Basic realm=\"stand-in\"".parse().unwrap(),
        );
    }
    r
}

fn form_decode(s: &str) -> Option<String> {
    // RFC 6749 §2.3.1: the id and secret inside Basic are application/x-www-form-urlencoded.
    let pair = format!("v={s}");
    form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
}

fn basic_credentials(req: &Request<Incoming>) -> Option<Option<(String, String)>> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let Some(b64) = value.strip_prefix("Basic ") else {
        return Some(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok();
    let text = decoded.and_then(|d| String::from_utf8(d).ok());
    Some(text.and_then(|t| {
        let (id, secret) = t.split_once(':')?;
        Some((form_decode(id)?, form_decode(secret)?))
    }))
}

/// The thumbprint of the key `token` is bound to, if it is active and bound.
fn binding(state: &State, token: &str) -> Option<String> {
    if !is_valid(state, token) {
        return None;
    }
    state
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.token.as_deref() == Some(token))
        .and_then(|r| r.dpop.as_ref().map(|(jkt, _)| jkt.clone()))
}

/// Whether `token` was issued and has not expired.
fn is_valid(state: &State, token: &str) -> bool {
    state.requests.lock().unwrap().iter().any(|r| {
        r.token.as_deref() == Some(token)
            && r.valid_until
                .is_some_and(|until| until > std::time::Instant::now())
    })
}

/// RFC 7662 token introspection, as a resource server would ask: `{"active": true}` for a token issued here
/// and not expired. Not counted among the token requests.
async fn introspect(req: Request<Incoming>, state: Arc<State>) -> Resp {
    let Ok(body) = Limited::new(req.into_body(), 64 * 1024).collect().await else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "body too large");
    };
    let body = body.to_bytes();
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let mut answer = serde_json::json!({ "active": is_valid(&state, &token) });
    if let Some(jkt) = binding(&state, &token) {
        answer["cnf"] = serde_json::json!({ "jkt": jkt });
    }
    respond(StatusCode::OK, "application/json", answer.to_string())
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Resp, Infallible> {
    if req.method() == hyper::Method::POST && req.uri().path() == "/oauth2/introspect" {
        return Ok(introspect(req, state).await);
    }
    let discovery = (req.method() == hyper::Method::GET
        && req.uri().path() == "/.well-known/openid-configuration")
        .then(|| state.refresh_token.lock().unwrap().clone())
        .flatten();
    if let Some((_, scopes)) = discovery {
        let token_url = state.token_url.lock().unwrap().clone();
        let issuer = token_url.replace("/oauth2/token", "");
        let doc = serde_json::json!({
            "issuer": issuer,
            "token_endpoint": token_url,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "jwks_uri": format!("{issuer}/jwks"),
            "grant_types_supported": ["client_credentials", "refresh_token"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": scopes,
        });
        return Ok(respond(StatusCode::OK, "application/json", doc.to_string()));
    }
    state.arrivals.fetch_add(1, Ordering::SeqCst);
    if req.method() != hyper::Method::POST || req.uri().path() != "/oauth2/token" {
        return Ok(respond(StatusCode::NOT_FOUND, "text/plain", "not found"));
    }
    let form_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let basic = basic_credentials(&req);
    let dpop = req
        .headers()
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(body) = Limited::new(req.into_body(), 64 * 1024).collect().await else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body too large",
        ));
    };
    let body = body.to_bytes();
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let post = match (param("client_id"), param("client_secret")) {
        (Some(id), Some(secret)) => Some((id, secret)),
        _ => None,
    };
    // A client assertion (RFC 7523) counts as the client's credential: the stand-in accepts it when it equals
    // the registration's `secret` (set it with `set_secret`), as if it had verified the JWT.
    let assertion = match (
        param("client_id"),
        param("client_assertion_type").as_deref(),
        param("client_assertion"),
    ) {
        (Some(id), Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), Some(a)) => {
            Some((id, a))
        }
        _ => None,
    };
    let (auth, creds) = match (&basic, &post, &assertion) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => ("both", None),
        (Some(b), None, None) => ("basic", b.clone()),
        (None, Some(p), None) => ("post", Some(p.clone())),
        (None, None, Some(a)) => ("assertion", Some(a.clone())),
        (None, None, None) => ("none", None),
    };
    let mut record = Recorded {
        client_id: creds.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
        auth,
        scope: param("scope").unwrap_or_default(),
        params: params
            .iter()
            .filter(|(k, _)| k != "client_secret")
            .cloned()
            .collect(),
        token: None,
        valid_until: None,
        dpop: None,
    };
    let fault = {
        let mut next = state.fail_next.lock().unwrap();
        if next.0 > 0 {
            next.0 -= 1;
            Fault::Status(next.1)
        } else {
            state.fault.lock().unwrap().clone()
        }
    };
    let response = decide(
        &state,
        &fault,
        form_type,
        &params,
        (auth, creds),
        dpop.as_deref(),
        &mut record,
    )
    .await;
    state.requests.lock().unwrap().push(record);
    Ok(response)
}

async fn decide(
    state: &State,
    fault: &Fault,
    form_type: bool,
    params: &[(String, String)],
    (auth, creds): (&str, Option<(String, String)>),
    dpop: Option<&str>,
    record: &mut Recorded,
) -> Resp {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match fault {
        Fault::Status(s) => {
            let status = StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return respond(
                status,
                "text/html",
                "<html><body><h1>Bad Gateway</h1></body></html>",
            );
        }
        Fault::RateLimited(after) => {
            let mut r = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "slow down",
            );
            r.headers_mut()
                .insert("retry-after", after.parse().unwrap());
            return r;
        }
        Fault::Slow(d) => tokio::time::sleep(*d).await,
        Fault::HtmlOk => {
            return respond(
                StatusCode::OK,
                "text/html",
                "<html><body>Sign in</body></html>",
            );
        }
        Fault::EmptyForbidden => return respond(StatusCode::FORBIDDEN, "text/plain", ""),
        _ => {}
    }
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected a form body",
        );
    }
    // The refresh-token grant, only when a test enabled it (to set up a peer such as oidc-agent, which keeps a
    // refresh token): the token given must be the one enabled.
    let refresh = param("grant_type").as_deref() == Some("refresh_token");
    if refresh {
        let enabled = state.refresh_token.lock().unwrap().clone().map(|(t, _)| t);
        if enabled.is_none() || enabled != param("refresh_token") {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "unknown refresh token",
            );
        }
    } else if param("grant_type").as_deref() != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials",
        );
    }
    if auth == "both" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client authentication by two methods",
        );
    }
    let Some((id, secret)) = creds else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    };
    if *fault == Fault::EchoSecret {
        let description = format!("client authentication failed for secret '{secret}'");
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &description);
    }
    let reg = state
        .clients
        .lock()
        .unwrap()
        .get(&id)
        .filter(|r| r.secret == secret)
        .cloned();
    let Some(reg) = reg else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    };
    let all = reg.scopes.join(" ");
    let asked = if refresh && record.scope.is_empty() {
        all.as_str()
    } else {
        record.scope.as_str()
    };
    let requested: Vec<&str> = asked.split(' ').filter(|s| !s.is_empty()).collect();
    if let Some(bad) = requested
        .iter()
        .find(|s| !reg.scopes.iter().any(|a| a == *s))
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("scope {bad} is not allowed"),
        );
    }
    // DPoP (RFC 9449 §5): a valid proof for this endpoint, with the nonce when one is required, binds the
    // token to its key.
    let mut token_type = "Bearer";
    if let Some(proof) = dpop.filter(|_| *fault != Fault::IgnoreDpop) {
        let htu = state.token_url.lock().unwrap().clone();
        let checked = match crate::dpop::check(proof, "POST", &htu, None, None) {
            Ok(c) => c,
            Err(why) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_dpop_proof", &why),
        };
        record.dpop = Some((checked.jkt.clone(), checked.nonce.clone()));
        let required = state.dpop_nonce.lock().unwrap().clone();
        if let Some(nonce) = required
            && checked.nonce.as_deref() != Some(nonce.as_str())
        {
            let mut r = oauth_error(
                StatusCode::BAD_REQUEST,
                "use_dpop_nonce",
                "Authorization server requires nonce in DPoP proof",
            );
            r.headers_mut().insert(
                "dpop-nonce",
                nonce.parse().expect("a nonce is a header value"),
            );
            return r;
        }
        if !state.seen_jti.lock().unwrap().insert(checked.jti) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_dpop_proof",
                "the proof's jti was used before",
            );
        }
        token_type = "DPoP";
    }
    let token = uuid::Uuid::new_v4().to_string();
    record.token = Some(token.clone());
    let mut granted = requested.join(" ");
    if let Fault::WiderScope(extra) = fault {
        granted = format!("{granted} {extra}");
    }
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    record.valid_until =
        Some(std::time::Instant::now() + std::time::Duration::from_secs(expires_in));
    let mut body = serde_json::json!({
        "access_token": token,
        "token_type": token_type,
        "expires_in": expires_in,
        "scope": granted,
    });
    if refresh {
        body["refresh_token"] = serde_json::json!(param("refresh_token"));
    }
    match fault {
        Fault::NoExpiresIn => {
            body.as_object_mut().unwrap().remove("expires_in");
        }
        Fault::ExpiresInString => body["expires_in"] = serde_json::json!(expires_in.to_string()),
        _ => {}
    }
    respond(StatusCode::OK, "application/json", body.to_string())
}
