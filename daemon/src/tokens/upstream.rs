//! The IdP side: one OAuth 2.0 client-credentials request (RFC 6749 §4.4) and its response.
//!
//! Requests are form-encoded POSTs with `client_secret_basic` (RFC 6749 §2.3.1 encoding by default, raw when
//! configured), `client_secret_post`, or `private_key_jwt` (RFC 7523). A client configured with an `issuer`
//! finds its token endpoint by OpenID Connect Discovery or RFC 8414, once. Responses are parsed strictly when they claim success and leniently
//! when they do not: an HTML page or an empty 403 still gives the operator a status and whatever text is safe
//! to show. Bodies are capped at [`MAX_RESPONSE_LEN`], every request at the client's `timeout`, and redirects
//! are never followed (a redirect would carry the credentials somewhere else).
//!
//! # Security
//! The secret is exposed only while the request is built; the Basic header is marked sensitive. Nothing the
//! IdP says is shown to callers except the OAuth error code; the description goes to the log, with the
//! client secret scrubbed from it in case a server echoes it.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::policy::scope::ScopeSet;
use crate::secret::{Secret, SecretSource};
use crate::tokens::client::{
    AssertionAudience, BasicEncoding, ClientAuth, ClientConfig, endpoint_url,
};
use crate::tokens::dpop::DpopKey;
use crate::tokens::jwt::{self, PrivateKey};

/// The credential one request authenticates with, as read for it (its file read again if it changed).
enum Credential {
    Secret(std::sync::Arc<Secret>),
    Key(
        std::sync::Arc<PrivateKey>,
        Option<std::sync::Arc<jwt::Certificate>>,
    ),
    Assertion(std::sync::Arc<crate::tokens::assertion::Assertion>),
}

/// Largest token response accepted, in bytes.
pub const MAX_RESPONSE_LEN: usize = 64 * 1024;
/// Longest access token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest lifetime believed; longer `expires_in` values are clamped to it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// A token as the IdP issued it.
pub struct Issued {
    /// The access token.
    pub access_token: SecretString,
    /// `token_type`, as issued.
    pub token_type: String,
    /// `expires_in`, or the client's `default_ttl` when absent.
    pub lifetime: Duration,
    /// When the response arrived: the token expires `lifetime` after this.
    pub received_at: Instant,
    /// The scopes granted: the response's `scope`, else the requested set.
    pub granted: ScopeSet,
    /// Which credential authenticated the request (its source, for the audit log).
    pub credential: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("lifetime", &self.lifetime)
            .field("granted", &self.granted)
            .finish()
    }
}

/// Why no token came back. `Display` is safe to show to callers and logs: no secret, no token, no IdP prose.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting or talking to the endpoint failed.
    #[error("could not reach the token endpoint: {0}")]
    Network(String),
    /// No complete answer within the client's timeout.
    #[error("the token endpoint did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// HTTP 5xx.
    #[error("the token endpoint failed with HTTP {status}")]
    Server {
        /// The status code.
        status: u16,
        /// `Retry-After`, if given (a 503 may carry one).
        retry_after: Option<Duration>,
    },
    /// HTTP 429.
    #[error("the token endpoint is rate limiting the broker (HTTP 429)")]
    RateLimited {
        /// `Retry-After`, if given.
        retry_after: Option<Duration>,
    },
    /// HTTP 4xx (other than 429): the IdP refused the broker's credentials, the scope or the request.
    #[error("the IdP refused the request: {} (HTTP {status})", code.as_deref().unwrap_or("no OAuth error code"))]
    Rejected {
        /// The status code.
        status: u16,
        /// The OAuth `error`, sanitised.
        code: Option<String>,
        /// `error_description` (or the start of a non-JSON body), sanitised: for the log only.
        description: Option<String>,
    },
    /// A 2xx answer that is not a valid token response, or any other status.
    #[error("the token endpoint's answer is not a valid token response: {0}")]
    InvalidResponse(String),
    /// The IdP granted scopes that were not requested.
    #[error("the IdP granted scopes that were not requested ({}); refusing the token", .extra.join(" "))]
    ScopeTooWide {
        /// The scopes beyond the request.
        extra: Vec<String>,
    },
    /// Discovery found no usable token endpoint.
    #[error("discovery failed: {0}")]
    Discovery(String),
    /// The client assertion could not be made.
    #[error("cannot make the client assertion: {0}")]
    Assertion(String),
    /// A client with `dpop = true` got a token that is not bound to its key.
    #[error(
        "the IdP issued a {token_type:?} token, not a DPoP-bound one, to a client with dpop = true: it is \
         not handed out; enable DPoP for this client at the IdP, or set dpop = false"
    )]
    NotBound {
        /// The `token_type` it issued (sanitised).
        token_type: String,
    },
}

impl UpstreamError {
    /// The bytes this error holds beyond its struct, for the cache's byte bound.
    pub fn weight(&self) -> usize {
        let text = match self {
            Self::Network(s)
            | Self::InvalidResponse(s)
            | Self::Discovery(s)
            | Self::Assertion(s) => s.len(),
            Self::NotBound { token_type } => token_type.len(),
            Self::Rejected {
                code, description, ..
            } => code.as_ref().map_or(0, String::len) + description.as_ref().map_or(0, String::len),
            Self::ScopeTooWide { extra } => extra.iter().map(|e| e.len() + 24).sum(),
            Self::Timeout(_) | Self::Server { .. } | Self::RateLimited { .. } => 0,
        };
        std::mem::size_of::<Self>() + text
    }

    /// The request's outcome as a bounded label (metrics, `credbroker status`): the OAuth error when it is one
    /// of RFC 6749 §5.2's codes (`other` when it is not), else the status class (`4xx`, `429`, `5xx`), or
    /// what went wrong without one (`timeout`, `network`, `invalid_response`, `scope_too_wide`, `discovery`,
    /// `assertion`).
    pub fn outcome(&self) -> &'static str {
        const RFC6749: [&str; 6] = [
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
        ];
        match self {
            Self::Network(_) => "network",
            Self::Timeout(_) => "timeout",
            Self::Server { .. } => "5xx",
            Self::RateLimited { .. } => "429",
            Self::Rejected { code: Some(c), .. } => {
                RFC6749.into_iter().find(|k| k == c).unwrap_or("other")
            }
            Self::Rejected { .. } => "4xx",
            Self::InvalidResponse(_) => "invalid_response",
            Self::ScopeTooWide { .. } => "scope_too_wide",
            Self::Discovery(_) => "discovery",
            Self::Assertion(_) => "assertion",
            Self::NotBound { .. } => "not_dpop_bound",
        }
    }

    /// Whether the IdP refused the client's authentication (`invalid_client`, `unauthorized_client`, or a
    /// 401): then another of the client's secrets may work.
    pub fn is_client_auth_rejection(&self) -> bool {
        matches!(self, Self::Rejected { status: 401, .. })
            || matches!(self, Self::Rejected { code: Some(c), .. } if c == "invalid_client" || c == "unauthorized_client")
    }

    /// The IdP's `Retry-After`, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Server { retry_after, .. } | Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again later may succeed (network trouble, 5xx, 429, timeouts, and a DPoP nonce the IdP
    /// still wanted after the one retry with it).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Network(_) | Self::Timeout(_) | Self::Server { .. } | Self::RateLimited { .. }
        ) || matches!(self, Self::Rejected { code: Some(c), .. } if c == "use_dpop_nonce")
    }
}

/// The HTTP client for all token endpoints, and the token endpoints found by discovery.
#[derive(Clone, Debug)]
pub struct Upstream {
    http: reqwest::Client,
    /// HTTP clients of the clients with their own TLS roots (`ca_certificates`), by client name; made on
    /// first use, forgotten on reload.
    with_roots:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>>,
    /// Issuer -> token endpoint.
    discovered: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Url>>>,
    /// The DPoP key of each client with `dpop = true`, and the latest nonce its IdP gave.
    dpop: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Dpop>>>,
}

/// A client's DPoP state.
#[derive(Debug, Clone)]
struct Dpop {
    key: std::sync::Arc<DpopKey>,
    /// The latest `DPoP-Nonce` the token endpoint sent.
    nonce: Option<String>,
}

/// An issuer identifier as a string, without the trailing slash a URL parser adds to a bare host.
pub fn issuer_id(issuer: &Url) -> &str {
    let s = issuer.as_str();
    if issuer.path() == "/" {
        s.trim_end_matches('/')
    } else {
        s
    }
}

impl Upstream {
    /// Builds the client: rustls (ring) with the system's roots, no redirects, no proxy from the environment.
    ///
    /// # Errors
    /// When the TLS set-up fails (e.g. no usable root certificates).
    pub fn new() -> Result<Self, reqwest::Error> {
        // Ignore the error: it only says a provider was installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            http: Self::builder().build()?,
            with_roots: Default::default(),
            discovered: Default::default(),
            dpop: Default::default(),
        })
    }

    /// Gives each client with `dpop = true` a key: a new one for a client that had none or is in `renew`
    /// (its tokens were dropped), the same one otherwise (its cached tokens stay usable). Keys of other
    /// clients are dropped (zeroized).
    ///
    /// # Errors
    /// When a key cannot be made.
    pub fn prepare_dpop<'a>(
        &self,
        clients: impl Iterator<Item = &'a ClientConfig>,
        renew: &[String],
    ) -> Result<(), crate::tokens::dpop::DpopError> {
        let mut dpop = self.dpop.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = std::collections::HashMap::new();
        for client in clients.filter(|c| c.dpop) {
            let state = match dpop.remove(&client.name) {
                Some(state) if !renew.contains(&client.name) => state,
                _ => Dpop {
                    key: std::sync::Arc::new(DpopKey::generate()?),
                    nonce: None,
                },
            };
            kept.insert(client.name.clone(), state);
        }
        *dpop = kept;
        Ok(())
    }

    /// The DPoP key of client `name`, if it has `dpop = true`.
    pub fn dpop_key(&self, name: &str) -> Option<std::sync::Arc<DpopKey>> {
        self.dpop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|d| d.key.clone())
    }

    fn dpop_nonce(&self, name: &str) -> Option<String> {
        self.dpop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .and_then(|d| d.nonce.clone())
    }

    fn remember_nonce(&self, name: &str, nonce: String) {
        if let Some(d) = self
            .dpop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            d.nonce = Some(nonce);
        }
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(false)
            .pool_idle_timeout(Duration::from_secs(60))
    }

    /// The HTTP client for `client`: the shared one, or one that also trusts (or only trusts) the client's
    /// `ca_certificates`, for its token endpoint and its discovery.
    fn http_for(&self, client: &ClientConfig) -> Result<reqwest::Client, UpstreamError> {
        let Some(roots) = &client.tls_roots else {
            return Ok(self.http.clone());
        };
        let mut made = self.with_roots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(http) = made.get(&client.name) {
            return Ok(http.clone());
        }
        let certs = roots
            .certificates
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| UpstreamError::Network(format!("cannot use {}: {e}", roots.source)))?;
        let builder = if roots.system_roots {
            Self::builder().tls_certs_merge(certs)
        } else {
            Self::builder().tls_certs_only(certs)
        };
        let http = builder.build().map_err(|e| {
            UpstreamError::Network(format!("cannot set up TLS with {}: {e}", roots.source))
        })?;
        made.insert(client.name.clone(), http.clone());
        Ok(http)
    }

    /// The token endpoint discovered for `issuer`, if discovery has run.
    pub fn discovered(&self, issuer: &Url) -> Option<Url> {
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(issuer_id(issuer))
            .cloned()
    }

    /// Forgets discovered endpoints and the HTTP clients made for custom roots (on reload).
    pub fn forget_discovered(&self) {
        self.with_roots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The client's token endpoint: configured, or discovered from its issuer (once).
    ///
    /// # Errors
    /// [`UpstreamError`] when discovery fails.
    pub async fn token_endpoint(&self, client: &ClientConfig) -> Result<Url, UpstreamError> {
        if let Some(url) = &client.token_url {
            return Ok(url.clone());
        }
        let Some(issuer) = &client.issuer else {
            return Err(UpstreamError::Discovery(
                "neither token_url nor issuer is configured".to_owned(),
            ));
        };
        let id = issuer_id(issuer).to_owned();
        if let Some(url) = self
            .discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(url.clone());
        }
        let url = self
            .discover(
                &self.http_for(client)?,
                issuer,
                client.allow_http,
                client.timeout,
            )
            .await?;
        tracing::info!(client = %client.name, issuer = %id, token_endpoint = %url, "token endpoint discovered");
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, url.clone());
        Ok(url)
    }

    /// OpenID Connect Discovery (`<issuer>/.well-known/openid-configuration`), then RFC 8414
    /// (`/.well-known/oauth-authorization-server<issuer path>`); the document's `issuer` must be the
    /// configured one.
    async fn discover(
        &self,
        http: &reqwest::Client,
        issuer: &Url,
        allow_http: bool,
        timeout: Duration,
    ) -> Result<Url, UpstreamError> {
        let id = issuer_id(issuer);
        let mut rfc8414 = issuer.clone();
        rfc8414.set_path(&format!(
            "/.well-known/oauth-authorization-server{}",
            issuer.path().trim_end_matches('/')
        ));
        let candidates = [
            format!("{id}/.well-known/openid-configuration"),
            rfc8414.to_string(),
        ];
        for url in &candidates {
            let response = http
                .get(url)
                .header(ACCEPT, "application/json")
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| transport_error(&e, timeout))?;
            match response.status().as_u16() {
                200..=299 => {}
                404 => continue,
                429 => return Err(UpstreamError::RateLimited { retry_after: None }),
                s @ 500..=599 => {
                    return Err(UpstreamError::Server {
                        status: s,
                        retry_after: None,
                    });
                }
                s => return Err(UpstreamError::Discovery(format!("{url} answered HTTP {s}"))),
            }
            let body = read_capped(response, timeout).await?;
            return discovery_document(&body, url, id, allow_http);
        }
        Err(UpstreamError::Discovery(format!(
            "no metadata at {} or {} (HTTP 404)",
            candidates[0], candidates[1]
        )))
    }

    /// Requests a token with exactly `scopes` by the client-credentials grant.
    ///
    /// # Errors
    /// [`UpstreamError`]: see its variants.
    pub async fn fetch(
        &self,
        client: &ClientConfig,
        scopes: &ScopeSet,
    ) -> Result<Issued, UpstreamError> {
        let token_url = self.token_endpoint(client).await?;
        let credential_error = |source: &SecretSource, e: String| {
            tracing::warn!(client = %client.name, %source, error = %e, "cannot use the client's credential");
            UpstreamError::Assertion(e)
        };
        let (secrets, single) = match &client.auth {
            ClientAuth::Basic { secrets, .. } | ClientAuth::Post { secrets } => {
                (Some(secrets), None)
            }
            ClientAuth::PrivateKeyJwt {
                key, certificate, ..
            } => (
                None,
                Some(Credential::Key(
                    key.current()
                        .map_err(|e| credential_error(key.source(), e))?,
                    certificate
                        .as_ref()
                        .map(|c| c.current().map_err(|e| credential_error(c.source(), e)))
                        .transpose()?,
                )),
            ),
            ClientAuth::ClientAssertion { assertion } => (
                None,
                Some(Credential::Assertion(
                    assertion
                        .current()
                        .map_err(|e| credential_error(assertion.source(), e))?,
                )),
            ),
        };
        let Some(secrets) = secrets else {
            let credential = single.expect("one credential when not secrets");
            return self.send(client, scopes, &token_url, &credential).await;
        };
        // Secrets in turn: the next when the IdP rejects the client's authentication, before anything is
        // remembered as a refusal; the one that works is tried first from then on.
        let mut last = None;
        for (i, rotating) in secrets.in_turn() {
            let secret = match rotating.current() {
                Ok(s) => s,
                Err(e) => {
                    last = Some(credential_error(rotating.source(), e));
                    continue;
                }
            };
            match self
                .send(client, scopes, &token_url, &Credential::Secret(secret))
                .await
            {
                Err(e) if e.is_client_auth_rejection() && secrets.len() > 1 => {
                    tracing::warn!(client = %client.name, source = %rotating.source(), error = %e, "the IdP rejected this client secret; trying the next");
                    last = Some(e);
                }
                Ok(issued) => {
                    secrets.worked(i);
                    return Ok(issued);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one secret was tried"))
    }

    /// One token request, authenticated with `credential`. For a client with `dpop = true`, with a DPoP
    /// proof; when the IdP asks for a nonce (`use_dpop_nonce` with a `DPoP-Nonce` header), once more with it.
    async fn send(
        &self,
        client: &ClientConfig,
        scopes: &ScopeSet,
        token_url: &Url,
        credential: &Credential,
    ) -> Result<Issued, UpstreamError> {
        let mut nonce_tried = false;
        loop {
            let (result, nonce) = self.send_once(client, scopes, token_url, credential).await;
            let fresh = nonce.is_some();
            if let Some(nonce) = nonce {
                self.remember_nonce(&client.name, nonce);
            }
            match result {
                Err(UpstreamError::Rejected { code: Some(c), .. })
                    if client.dpop && c == "use_dpop_nonce" && fresh && !nonce_tried =>
                {
                    nonce_tried = true;
                }
                other => return other,
            }
        }
    }

    /// [`Self::send`]'s one request: its outcome, and the `DPoP-Nonce` the answer carried.
    async fn send_once(
        &self,
        client: &ClientConfig,
        scopes: &ScopeSet,
        token_url: &Url,
        credential: &Credential,
    ) -> (Result<Issued, UpstreamError>, Option<String>) {
        let token_url = token_url.clone();
        // Everything secret this request carries, in every form a server might echo: scrubbed from its
        // error text before any of it is logged.
        let mut sensitive: Vec<Zeroizing<String>> = Vec::new();
        let body = match form_body(client, scopes, &token_url, credential, &mut sensitive) {
            Ok(body) => body,
            Err(e) => return (Err(e), None),
        };
        let http = match self.http_for(client) {
            Ok(http) => http,
            Err(e) => return (Err(e), None),
        };
        let htu = crate::policy::target::htu(&token_url);
        let mut request = http
            .post(token_url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .timeout(client.timeout);
        if let (ClientAuth::Basic { encoding, .. }, Credential::Secret(secret)) =
            (&client.auth, credential)
        {
            let (header, encoded) = basic_header(&client.client_id, secret.expose(), *encoding);
            sensitive.push(encoded);
            request = request.header(AUTHORIZATION, header);
        }
        if client.dpop {
            let Some(key) = self.dpop_key(&client.name) else {
                return (
                    Err(UpstreamError::Assertion(
                        "no DPoP key for this client".to_owned(),
                    )),
                    None,
                );
            };
            let nonce = self.dpop_nonce(&client.name);
            match key.proof("POST", &htu, None, nonce.as_deref(), SystemTime::now()) {
                Ok(proof) => request = request.header("DPoP", proof),
                Err(e) => return (Err(UpstreamError::Assertion(e.to_string())), None),
            }
        }
        let request = request.body(body.as_bytes().to_vec());

        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return (Err(transport_error(&e, client.timeout)), None),
        };
        let received_at = Instant::now();
        let status = response.status().as_u16();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let (retry_after, content_type) = (header(RETRY_AFTER), header(CONTENT_TYPE));
        let nonce = header(reqwest::header::HeaderName::from_static("dpop-nonce"))
            .filter(|n| crate::tokens::dpop::valid_nonce(n));
        let body = match read_capped(response, client.timeout).await {
            Ok(b) => b,
            Err(e) => return (Err(e), nonce),
        };
        let answer = Answer {
            status,
            retry_after: retry_after.as_deref(),
            content_type: content_type.as_deref().unwrap_or(""),
            body: &body,
        };
        let result = answer
            .interpret(client, scopes, received_at, SystemTime::now(), &sensitive)
            .map(|mut issued| {
                issued.credential = Some(
                    match credential {
                        Credential::Secret(s) => s.source().to_string(),
                        Credential::Key(k, _) => k.source().to_string(),
                        Credential::Assertion(a) => a.source().to_string(),
                    }
                    .into(),
                );
                issued
            });
        (result, nonce)
    }
}

/// An IdP's answer to a token request, as received.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    /// The HTTP status.
    pub status: u16,
    /// `Retry-After`, as sent.
    pub retry_after: Option<&'a str>,
    /// `Content-Type`, as sent.
    pub content_type: &'a str,
    /// The body (at most [`MAX_RESPONSE_LEN`] bytes).
    pub body: &'a [u8],
}

impl Answer<'_> {
    /// What the answer means: a token for `scopes` (received at `received_at`), or why not. The error's text
    /// holds nothing of `sensitive` (the credentials the request carried), in case the IdP echoed them.
    ///
    /// # Errors
    /// [`UpstreamError`] for every answer that is not a valid token response.
    pub fn interpret(
        &self,
        client: &ClientConfig,
        scopes: &ScopeSet,
        received_at: Instant,
        now: SystemTime,
        sensitive: &[Zeroizing<String>],
    ) -> Result<Issued, UpstreamError> {
        let retry_after = self.retry_after.and_then(|v| parse_retry_after(v, now));
        match self.status {
            200..=299 => parse_token(
                self.body,
                self.content_type,
                client,
                scopes,
                received_at,
                sensitive,
            ),
            429 => Err(UpstreamError::RateLimited { retry_after }),
            s @ 500..=599 => Err(UpstreamError::Server {
                status: s,
                retry_after,
            }),
            s @ 400..=499 => {
                let (code, description) = parse_error(self.body);
                let code = code.and_then(|c| clean(&c, sensitive, 64));
                let description = description.and_then(|d| clean(&d, sensitive, 256));
                Err(UpstreamError::Rejected {
                    status: s,
                    code,
                    description,
                })
            }
            s => Err(UpstreamError::InvalidResponse(format!(
                "unexpected HTTP status {s}"
            ))),
        }
    }
}

/// The token endpoint a discovery document at `url` names, if it is the document of issuer `issuer_id`
/// and the endpoint is usable (`https`, or `http` with `allow_http`).
///
/// # Errors
/// [`UpstreamError::Discovery`], in the daemon's own words (what the document says goes to the log only).
pub fn discovery_document(
    body: &[u8],
    url: &str,
    issuer_id: &str,
    allow_http: bool,
) -> Result<Url, UpstreamError> {
    #[derive(Deserialize)]
    struct Metadata {
        issuer: Option<String>,
        token_endpoint: Option<String>,
    }
    let doc: Metadata = serde_json::from_slice(body)
        .map_err(|_| UpstreamError::Discovery(format!("{url} is not a JSON metadata document")))?;
    let found = doc.issuer.unwrap_or_default();
    if found.trim_end_matches('/') != issuer_id.trim_end_matches('/') {
        tracing::warn!(
            metadata = %url,
            issuer = ?found.chars().take(200).collect::<String>(),
            configured = %issuer_id,
            "discovery: the metadata names another issuer"
        );
        return Err(UpstreamError::Discovery(format!(
            "{url} names another issuer than the configured {issuer_id:?} (details in the daemon log)"
        )));
    }
    let endpoint = doc
        .token_endpoint
        .ok_or_else(|| UpstreamError::Discovery(format!("{url} has no token_endpoint")))?;
    endpoint_url(&endpoint, allow_http).map_err(|e| {
        tracing::warn!(metadata = %url, "discovery: unusable token_endpoint: {e}");
        UpstreamError::Discovery(format!(
            "the token_endpoint in {url} is not usable (not https?); details in the daemon log"
        ))
    })
}

/// The form body: the grant, the scope, the client's extra parameters, and the credentials that go in the
/// body (`client_secret_post`) or the client assertion (`private_key_jwt`).
fn form_body(
    client: &ClientConfig,
    scopes: &ScopeSet,
    token_url: &Url,
    credential: &Credential,
    sensitive: &mut Vec<Zeroizing<String>>,
) -> Result<Zeroizing<String>, UpstreamError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    form.append_pair("scope", &scopes.joined());
    for (k, v) in &client.extra_params {
        form.append_pair(k, v);
    }
    match (&client.auth, credential) {
        (ClientAuth::Basic { .. }, Credential::Secret(secret)) => {
            sensitive.push(Zeroizing::new(secret.expose().to_owned()));
            sensitive.push(form_encode(secret.expose()));
        }
        (ClientAuth::Post { .. }, Credential::Secret(secret)) => {
            form.append_pair("client_id", &client.client_id);
            form.append_pair("client_secret", secret.expose());
            sensitive.push(Zeroizing::new(secret.expose().to_owned()));
            sensitive.push(form_encode(secret.expose()));
        }
        (ClientAuth::ClientAssertion { .. }, Credential::Assertion(assertion)) => {
            let jwt = assertion
                .usable(SystemTime::now())
                .map_err(UpstreamError::Assertion)?;
            form.append_pair("client_id", &client.client_id);
            form.append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            );
            form.append_pair("client_assertion", jwt);
            sensitive.push(Zeroizing::new(jwt.to_owned()));
            sensitive.push(form_encode(jwt));
        }
        (
            ClientAuth::PrivateKeyJwt {
                key_id,
                audience,
                signing_alg,
                certificate_sha1,
                ..
            },
            Credential::Key(key, certificate),
        ) => {
            let audience = match audience {
                AssertionAudience::TokenEndpoint => token_url.as_str(),
                AssertionAudience::Issuer => client.issuer.as_ref().map_or("", issuer_id),
                AssertionAudience::Literal(aud) => aud.as_str(),
            };
            let assertion = jwt::client_assertion(
                &client.client_id,
                audience,
                key,
                jwt::Signing {
                    alg: signing_alg.unwrap_or_else(|| key.default_alg(certificate.is_some())),
                    key_id: key_id.as_deref(),
                    certificate: certificate.as_deref(),
                    sha1_thumbprint: *certificate_sha1,
                },
                SystemTime::now(),
            )
            .map_err(|e| UpstreamError::Assertion(e.to_string()))?;
            form.append_pair("client_id", &client.client_id);
            form.append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            );
            form.append_pair("client_assertion", &assertion);
            sensitive.push(form_encode(&assertion));
            sensitive.push(assertion);
        }
        _ => unreachable!("each auth method is given its own kind of credential"),
    }
    Ok(Zeroizing::new(form.finish()))
}

/// The Basic `Authorization` header, and its base64 credentials (to scrub from echoes).
fn basic_header(
    client_id: &str,
    secret: &str,
    encoding: BasicEncoding,
) -> (HeaderValue, Zeroizing<String>) {
    let pair: Zeroizing<String> = Zeroizing::new(match encoding {
        BasicEncoding::Form => format!(
            "{}:{}",
            form_encode(client_id).as_str(),
            form_encode(secret).as_str()
        ),
        BasicEncoding::Raw => format!("{client_id}:{secret}"),
    });
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
    let value = Zeroizing::new(format!("Basic {}", encoded.as_str()));
    let mut header = HeaderValue::from_str(&value).expect("base64 is a valid header value");
    header.set_sensitive(true);
    (header, encoded)
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1, Appendix B).
fn form_encode(s: &str) -> Zeroizing<String> {
    Zeroizing::new(form_urlencoded::byte_serialize(s.as_bytes()).collect())
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> UpstreamError {
    if e.is_timeout() {
        return UpstreamError::Timeout(timeout);
    }
    // The innermost cause says what happened ("connection refused", "dns error", a TLS alert); reqwest's own
    // text carries only the URL, which is no secret.
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    UpstreamError::Network(cause.to_string())
}

async fn read_capped(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, UpstreamError> {
    let mut body = Zeroizing::new(Vec::new());
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_LEN {
                    return Err(UpstreamError::InvalidResponse(format!(
                        "the body is larger than {MAX_RESPONSE_LEN} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(transport_error(&e, timeout)),
        }
    }
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<SecretString>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

/// Extra granted scopes named in a [`UpstreamError::ScopeTooWide`].
const MAX_EXTRA_SHOWN: usize = 8;

fn parse_token(
    body: &[u8],
    content_type: &str,
    client: &ClientConfig,
    requested: &ScopeSet,
    received_at: Instant,
    sensitive: &[Zeroizing<String>],
) -> Result<Issued, UpstreamError> {
    let raw: RawToken = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message may quote a value: report where it broke, not what was there.
        let what = if body.first().is_some_and(|b| *b == b'<') || content_type.contains("html") {
            "an HTML page, not JSON".to_owned()
        } else {
            format!(
                "not a JSON token response ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            )
        };
        UpstreamError::InvalidResponse(format!(
            "{what} (content-type {})",
            media_type(content_type)
        ))
    })?;
    let access_token = raw
        .access_token
        .ok_or_else(|| UpstreamError::InvalidResponse("no access_token".to_owned()))?;
    let token = access_token.expose_secret();
    if token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || !token.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(UpstreamError::InvalidResponse(format!(
            "access_token must be 1 to {MAX_TOKEN_LEN} printable ASCII characters"
        )));
    }
    let token_type = match raw.token_type {
        Some(t) if !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()) => t,
        Some(_) => {
            return Err(UpstreamError::InvalidResponse(
                "token_type is not a token type".to_owned(),
            ));
        }
        None => return Err(UpstreamError::InvalidResponse("no token_type".to_owned())),
    };
    if client.dpop && !token_type.eq_ignore_ascii_case("DPoP") {
        return Err(UpstreamError::NotBound {
            token_type: scrub(&token_type, sensitive),
        });
    }
    let lifetime = match raw.expires_in {
        None | Some(serde_json::Value::Null) => {
            tracing::debug!(
                client = %client.name,
                default_ttl_s = client.default_ttl.as_secs(),
                "no expires_in in the token response; assuming the client's default_ttl"
            );
            client.default_ttl
        }
        Some(v) => parse_expires_in(&v)?,
    };
    let granted = match raw.scope.as_deref().map(str::trim) {
        None | Some("") => requested.clone(),
        Some(s) => ScopeSet::parse_delimited(s).ok_or_else(|| {
            UpstreamError::InvalidResponse("scope is not a list of scope-tokens".to_owned())
        })?,
    };
    let extra: Vec<String> = granted.difference(requested).map(str::to_owned).collect();
    if !extra.is_empty() {
        // The IdP's words reach the caller: at most a few, short, and never a credential the request carried.
        let (total, shown) = (extra.len(), extra.len().min(MAX_EXTRA_SHOWN));
        let mut extra: Vec<String> = extra[..shown]
            .iter()
            .map(|s| crate::text::cut(&scrub(s, sensitive), 64))
            .collect();
        if total > shown {
            extra.push(format!("and {} more", total - shown));
        }
        return Err(UpstreamError::ScopeTooWide { extra });
    }
    Ok(Issued {
        access_token,
        token_type,
        lifetime,
        received_at,
        granted,
        credential: None,
    })
}

/// `expires_in`: a positive number of seconds, as a JSON number or a numeric string.
fn parse_expires_in(v: &serde_json::Value) -> Result<Duration, UpstreamError> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match secs {
        Some(s) if s.is_finite() && s >= 1.0 => {
            Ok(Duration::from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64())))
        }
        Some(_) => Err(UpstreamError::InvalidResponse(
            "expires_in is not a positive number of seconds".to_owned(),
        )),
        None => Err(UpstreamError::InvalidResponse(
            "expires_in is not a number".to_owned(),
        )),
    }
}

/// The OAuth `error` and `error_description` of an error body: JSON, form-encoded, or the start of any text.
fn parse_error(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct RawError {
        error: Option<String>,
        error_description: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<RawError>(body) {
        return (e.error, e.error_description);
    }
    let text = String::from_utf8_lossy(body);
    if text.contains("error=") && !text.contains('<') {
        let mut code = None;
        let mut description = None;
        for (k, v) in form_urlencoded::parse(text.as_bytes()) {
            match k.as_ref() {
                "error" => code = Some(v.into_owned()),
                "error_description" => description = Some(v.into_owned()),
                _ => {}
            }
        }
        return (code, description);
    }
    (None, (!text.is_empty()).then(|| text.into_owned()))
}

/// A `Content-Type` as shown in a message: one of the media types IdPs and the proxies before them send,
/// else `another type`. Never the header as sent: it reaches callers' error messages, so it must not be able
/// to carry anything else there (an echoed secret, say, or kilobytes of text).
fn media_type(content_type: &str) -> &'static str {
    const KNOWN: [&str; 8] = [
        "application/json",
        "application/problem+json",
        "application/jwt",
        "application/x-www-form-urlencoded",
        "application/xml",
        "text/html",
        "text/plain",
        "text/xml",
    ];
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media.is_empty() {
        return "none";
    }
    KNOWN
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(media))
        .unwrap_or("another type")
}

/// What an IdP said, fit for a log line: every credential the request carried replaced, printable ASCII
/// only, at most `max` characters. Scrubbed before cleaning (cleaning would mangle a secret with spaces or
/// non-ASCII characters, so it would no longer be found) and after (cleaning drops characters, which can join
/// the pieces of a secret the IdP split with them), then cut.
fn clean(s: &str, sensitive: &[Zeroizing<String>], max: usize) -> Option<String> {
    let cleaned = scrub(&sanitize(&scrub(s, sensitive)), sensitive);
    let cut: String = cleaned.chars().take(max).collect();
    (!cut.is_empty()).then_some(cut)
}

/// Keeps printable ASCII, collapsing whitespace.
fn sanitize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect()
}

/// Replaces every occurrence of each sensitive string in `text`.
fn scrub(text: &str, sensitive: &[Zeroizing<String>]) -> String {
    let mut out = text.to_owned();
    for needle in sensitive.iter().filter(|n| !n.is_empty()) {
        if out.contains(needle.as_str()) {
            out = out.replace(needle.as_str(), "[redacted]");
        }
    }
    out
}

/// `Retry-After` in either form (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_follows_rfc6749_appendix_b() {
        assert_eq!(form_encode("a b+c%d:é").as_str(), "a+b%2Bc%25d%3A%C3%A9");
        assert_eq!(form_encode("Az09*-._").as_str(), "Az09*-._");
    }

    #[test]
    fn expires_in_as_number_or_string() {
        assert_eq!(
            parse_expires_in(&serde_json::json!(3600)).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_expires_in(&serde_json::json!("120")).unwrap(),
            Duration::from_secs(120)
        );
        assert!(parse_expires_in(&serde_json::json!(0)).is_err());
        assert!(parse_expires_in(&serde_json::json!("soon")).is_err());
        assert_eq!(
            parse_expires_in(&serde_json::json!(1e12)).unwrap(),
            MAX_LIFETIME
        );
    }

    #[test]
    fn error_bodies_are_parsed_leniently() {
        let (c, d) = parse_error(br#"{"error":"invalid_scope","error_description":"nope"}"#);
        assert_eq!(
            (c.as_deref(), d.as_deref()),
            (Some("invalid_scope"), Some("nope"))
        );
        let (c, _) = parse_error(b"error=invalid_client&error_description=bad+secret");
        assert_eq!(c.as_deref(), Some("invalid_client"));
        let (c, d) = parse_error(b"<html><body>Forbidden</body></html>");
        assert_eq!(c, None);
        assert!(d.unwrap().contains("Forbidden"));
        assert_eq!(parse_error(b""), (None, None));
    }

    #[test]
    fn secrets_are_scrubbed_before_descriptions_are_cleaned_and_cut() {
        let secret = "p@ss  wörd";
        let sensitive = [Zeroizing::new(secret.to_owned()), form_encode(secret)];
        let clean = |text: &str| clean(text, &sensitive, 256).unwrap();
        assert_eq!(clean("bad secret 'p@ss  wörd'"), "bad secret '[redacted]'");
        assert_eq!(clean("got p%40ss++w%C3%B6rd"), "got [redacted]");
        // Past the 256 characters kept, and with whitespace and non-ASCII the cleaning would mangle.
        let long = format!("{} {secret}", "x".repeat(250));
        let out = clean(&long);
        assert!(!out.contains("p@ss") && !out.contains("w rd"), "{out}");
        let (_, header) = basic_header("id", secret, BasicEncoding::Form);
        let sensitive = [header];
        assert!(
            !scrub(
                &format!("echo: Basic {}", sensitive[0].as_str()),
                &sensitive
            )
            .contains(sensitive[0].as_str())
        );
    }

    fn test_client() -> ClientConfig {
        let offline = |_: &crate::secret::SecretSource| Some("s".to_owned());
        let env = crate::secret::SecretEnv {
            credentials_dir: None,
            var: &|_| None,
            offline: Some(&offline),
        };
        let secret = crate::secret::Rotating::load(
            crate::secret::SecretSource::Env("S".into()),
            crate::secret::FileKind::Secret,
            &env,
            Ok,
        )
        .unwrap();
        ClientConfig {
            name: "idp".into(),
            token_url: Some("https://idp.example/token".parse().unwrap()),
            issuer: None,
            allow_http: false,
            client_id: "broker".into(),
            auth: ClientAuth::Basic {
                secrets: crate::tokens::client::Secrets::new(vec![secret]),
                encoding: BasicEncoding::Form,
            },
            extra_params: Vec::new(),
            default_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            tls_roots: None,
            dpop: false,
        }
    }

    /// Found by the `idp_response` fuzz target: the extra scopes of a too-wide grant reach the caller, so they
    /// are few, short, and never the credential the request carried.
    #[test]
    fn extra_granted_scopes_are_bounded_and_scrubbed() {
        let client = test_client();
        let scopes = ScopeSet::parse(&["a"]).unwrap();
        let secret = "s3cr3t-the-idp-must-not-echo";
        let granted: Vec<String> = std::iter::once(secret.to_owned())
            .chain((0..50).map(|i| format!("x{i}{}", "y".repeat(200))))
            .collect();
        let body = serde_json::json!({
            "access_token": "t", "token_type": "Bearer", "expires_in": 60, "scope": format!("a {}", granted.join(" ")),
        })
        .to_string();
        let e = Answer {
            status: 200,
            retry_after: None,
            content_type: "application/json",
            body: body.as_bytes(),
        }
        .interpret(
            &client,
            &scopes,
            Instant::now(),
            SystemTime::now(),
            &[Zeroizing::new(secret.to_owned())],
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, UpstreamError::ScopeTooWide { .. }));
        assert!(
            !text.contains(secret) && text.contains("and 43 more"),
            "{text}"
        );
        assert!(text.len() < 1024, "{} bytes", text.len());
    }

    /// Found by the `idp_response` fuzz target: a 200 answer that is not JSON quoted its `Content-Type` whole in
    /// the caller's error; a secret echoed there reached the caller.
    #[test]
    fn an_odd_content_type_is_not_quoted_to_callers() {
        let client = test_client();
        let scopes = ScopeSet::parse(&["a"]).unwrap();
        let interpret = |content_type: &str| {
            Answer {
                status: 200,
                retry_after: None,
                content_type,
                body: b"oops",
            }
            .interpret(&client, &scopes, Instant::now(), SystemTime::now(), &[])
            .unwrap_err()
            .to_string()
        };
        let e = interpret("application/x s3cr3t-the-idp-must-not-echo");
        assert!(
            !e.contains("s3cr3t") && e.contains("content-type another type"),
            "{e}"
        );
        let e = interpret("s3cr3t-the-idp-must-not-echo/json");
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(interpret("text/plain; charset=utf-8").contains("content-type text/plain"));
        assert!(interpret(&"a/b".repeat(1000)).len() < 200);
    }

    /// Found by the `idp_response` fuzz target: an IdP that echoes the secret split by bytes the cleaning
    /// drops (invalid UTF-8 here) must not get it into the log once they are dropped.
    #[test]
    fn a_secret_joined_by_cleaning_is_scrubbed_too() {
        let secret = "s3cr3t-the-idp-must-not-echo";
        let sensitive = [Zeroizing::new(secret.to_owned())];
        let body = b"{\"e\xabrror\": \"Client authentication failed for s3cr3t-the-idp-must-\xff\xff\xffnot-echo\"}";
        let answer = Answer {
            status: 401,
            retry_after: None,
            content_type: "application/json",
            body,
        };
        let client = test_client();
        let scopes = ScopeSet::parse(&["a"]).unwrap();
        let e = answer
            .interpret(
                &client,
                &scopes,
                Instant::now(),
                SystemTime::now(),
                &sensitive,
            )
            .unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn retry_after_in_both_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("later", now), None);
    }
}
