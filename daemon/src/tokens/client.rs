//! A client registration at an IdP, as the broker uses it: where its token endpoint is, how it authenticates
//! there, what it sends with every request. The config builds these; nothing here reads the config.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Url;

use crate::policy::target::is_loopback;
use crate::secret::{Rotating, Secret, SecretSource};
use crate::tokens::assertion::Assertion;
use crate::tokens::jwt::{Alg, Certificate, PrivateKey};

/// How the broker authenticates to the token endpoint. Every credential is read again when its file changes.
#[derive(Debug)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic (RFC 6749 §2.3.1).
    Basic {
        /// The client secret (or secrets, tried in order).
        secrets: Secrets,
        /// How id and secret are encoded.
        encoding: BasicEncoding,
    },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post {
        /// The client secret (or secrets, tried in order).
        secrets: Secrets,
    },
    /// `private_key_jwt`: a client assertion the broker signs (RFC 7523).
    PrivateKeyJwt {
        /// The signing key.
        key: Rotating<PrivateKey>,
        /// `kid` for the assertion's header.
        key_id: Option<String>,
        /// The assertion's `aud`.
        audience: AssertionAudience,
        /// The key's certificate: its thumbprints go in the header.
        certificate: Option<Rotating<Certificate>>,
        /// `signing_alg`, if set; else the key's default ([`PrivateKey::default_alg`]).
        signing_alg: Option<Alg>,
        /// `certificate_sha1`: add the SHA-1 thumbprint `x5t`.
        certificate_sha1: bool,
    },
    /// `client_assertion`: a federated client assertion another issuer minted, sent as it is (RFC 7523).
    ClientAssertion {
        /// The assertion.
        assertion: Rotating<Assertion>,
    },
}

impl ClientAuth {
    /// The `auth_method` name.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "client_secret_basic",
            Self::Post { .. } => "client_secret_post",
            Self::PrivateKeyJwt { .. } => "private_key_jwt",
            Self::ClientAssertion { .. } => "client_assertion",
        }
    }

    /// Where its credentials come from, in the order they are tried.
    pub fn sources(&self) -> Vec<&SecretSource> {
        match self {
            Self::Basic { secrets, .. } | Self::Post { secrets } => {
                secrets.list.iter().map(Rotating::source).collect()
            }
            Self::PrivateKeyJwt {
                key, certificate, ..
            } => std::iter::once(key.source())
                .chain(certificate.as_ref().map(Rotating::source))
                .collect(),
            Self::ClientAssertion { assertion } => vec![assertion.source()],
        }
    }
}

/// A client's secrets: one, or several tried in order when the IdP rejects one, so that an old and a new
/// secret both work while the IdP accepts both. The one that worked last is tried first.
#[derive(Debug)]
pub struct Secrets {
    list: Vec<Rotating<Secret>>,
    active: AtomicUsize,
}

impl Secrets {
    /// The secrets, tried in this order (at least one).
    pub fn new(list: Vec<Rotating<Secret>>) -> Self {
        assert!(!list.is_empty(), "a client has at least one secret");
        Self {
            list,
            active: AtomicUsize::new(0),
        }
    }

    /// The secrets in the order to try them now: the one that worked last first, then the others in order.
    pub fn in_turn(&self) -> impl Iterator<Item = (usize, &Rotating<Secret>)> {
        let first = self.active.load(Ordering::Relaxed);
        std::iter::once(first)
            .chain((0..self.list.len()).filter(move |&i| i != first))
            .map(|i| (i, &self.list[i]))
    }

    /// Remembers that secret `i` worked.
    pub fn worked(&self, i: usize) {
        self.active.store(i, Ordering::Relaxed);
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Never: there is at least one.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Which `aud` a client assertion carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssertionAudience {
    /// The token endpoint's URL (OpenID Connect Core §9; the default).
    TokenEndpoint,
    /// The issuer identifier (RFC 7523bis, RFC 9126 §2).
    Issuer,
    /// This value.
    Literal(String),
}

/// How Basic credentials are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicEncoding {
    /// `application/x-www-form-urlencoded` id and secret, as RFC 6749 §2.3.1 says (the default).
    Form,
    /// Raw id and secret, for servers that do not decode.
    Raw,
}

/// `[clients.NAME]`.
#[derive(Debug)]
pub struct ClientConfig {
    /// The table's name.
    pub name: String,
    /// The token endpoint, if configured.
    pub token_url: Option<Url>,
    /// The issuer, if configured: discovery finds the token endpoint when `token_url` is not set.
    pub issuer: Option<Url>,
    /// Plain http to non-loopback hosts is allowed (for discovered endpoints too).
    pub allow_http: bool,
    /// The OAuth client id.
    pub client_id: String,
    /// How to authenticate (its `Debug` is redacted).
    pub auth: ClientAuth,
    /// Sent with every token request (`audience`, `resource`…).
    pub extra_params: Vec<(String, String)>,
    /// Lifetime assumed when the IdP omits `expires_in`.
    pub default_ttl: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// TLS roots of its own (`ca_certificates`), if any.
    pub tls_roots: Option<TlsRoots>,
    /// Its tokens are bound to a DPoP key the daemon holds (RFC 9449).
    pub dpop: bool,
}

/// A client's own TLS roots: a private CA's certificates, trusted beside the system's roots or instead of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRoots {
    /// The CA certificates, DER.
    pub certificates: Vec<Vec<u8>>,
    /// Whether the system's roots are trusted too (`system_roots`, default true).
    pub system_roots: bool,
    /// Where they came from.
    pub source: SecretSource,
}

impl TlsRoots {
    /// Every certificate of a PEM bundle (at least one).
    ///
    /// # Errors
    /// When the bundle holds no certificate, or one that cannot be a trust anchor.
    pub fn parse(pem: Secret, system_roots: bool) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let source = pem.source().clone();
        let mut certificates = Vec::new();
        for (i, der) in
            rustls_pki_types::CertificateDer::pem_slice_iter(pem.expose().as_bytes()).enumerate()
        {
            let der = der.map_err(|e| format!("{source}: certificate {}: {e}", i + 1))?;
            webpki::anchor_from_trusted_cert(&der).map_err(|e| {
                format!(
                    "{source}: certificate {} is not a usable CA certificate: {e:?}",
                    i + 1
                )
            })?;
            certificates.push(der.as_ref().to_vec());
        }
        if certificates.is_empty() {
            return Err(format!(
                "{source} holds no certificate (-----BEGIN CERTIFICATE-----)"
            ));
        }
        Ok(Self {
            certificates,
            system_roots,
            source,
        })
    }
}

impl ClientConfig {
    /// Whether tokens fetched under `other` are what this client would fetch: the same endpoint, client id,
    /// parameters and binding (a reload then keeps them). Credentials do not matter: a token was valid when issued,
    /// and dropping it revokes nothing.
    pub fn same_upstream(&self, other: &ClientConfig) -> bool {
        self.token_url == other.token_url
            && self.issuer == other.issuer
            && self.client_id == other.client_id
            && self.extra_params == other.extra_params
            && self.dpop == other.dpop
    }
}

/// Parses a token endpoint or issuer URL: https, or plain http with `allow_http` only. Loopback is no
/// exception: any local user may bind a free loopback port and would then receive the client's secret.
pub fn endpoint_url(s: &str, allow_http: bool) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use client_id and client_secret".to_owned());
    }
    if url.fragment().is_some() {
        return Err("must not have a #fragment".to_owned());
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if allow_http => Ok(url),
        "http" if is_loopback(&url) => Err(format!(
            "{s:?} is plain http: any local user who binds that port first receives the client's \
             credentials; use https, or set allow_http = true if the endpoint is yours (a local test IdP)"
        )),
        "http" => Err(format!(
            "{s:?} is plain http to another host: the client's credentials would cross the network in \
             clear; use https (or set allow_http = true if you really mean it)"
        )),
        other => Err(format!("unsupported scheme {other:?}; use https")),
    }
}
