//! A client registration at an IdP, as the broker uses it: where its token endpoint is, how it authenticates
//! there, what it sends with every request. The config builds these; nothing here reads the config.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;

use crate::secret::Secret;
use crate::tokens::jwt::PrivateKey;

/// How the broker authenticates to the token endpoint.
#[derive(Debug)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic (RFC 6749 §2.3.1).
    Basic {
        /// The client secret.
        secret: Secret,
        /// How id and secret are encoded.
        encoding: BasicEncoding,
    },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post {
        /// The client secret.
        secret: Secret,
    },
    /// `private_key_jwt`: a signed client assertion (RFC 7523).
    PrivateKeyJwt {
        /// The signing key.
        key: PrivateKey,
        /// `kid` for the assertion's header.
        key_id: Option<String>,
        /// The assertion's `aud`.
        audience: AssertionAudience,
    },
}

impl ClientAuth {
    /// The `auth_method` name.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "client_secret_basic",
            Self::Post { .. } => "client_secret_post",
            Self::PrivateKeyJwt { .. } => "private_key_jwt",
        }
    }

    /// The client secret, for the methods that have one.
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            Self::Basic { secret, .. } | Self::Post { secret } => Some(secret),
            Self::PrivateKeyJwt { .. } => None,
        }
    }

    fn same_as(&self, other: &ClientAuth) -> bool {
        match (self, other) {
            (
                Self::Basic {
                    secret: a,
                    encoding: x,
                },
                Self::Basic {
                    secret: b,
                    encoding: y,
                },
            ) => a.expose() == b.expose() && x == y,
            (Self::Post { secret: a }, Self::Post { secret: b }) => a.expose() == b.expose(),
            (
                Self::PrivateKeyJwt {
                    key: a,
                    key_id: i,
                    audience: x,
                },
                Self::PrivateKeyJwt {
                    key: b,
                    key_id: j,
                    audience: y,
                },
            ) => a.same_as(b) && i == j && x == y,
            _ => false,
        }
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
}

impl ClientConfig {
    /// Whether `other` talks to the same endpoint with the same credentials and parameters, so tokens
    /// fetched under one are valid under the other (a reload keeps them).
    pub fn same_upstream(&self, other: &ClientConfig) -> bool {
        self.token_url == other.token_url
            && self.issuer == other.issuer
            && self.allow_http == other.allow_http
            && self.client_id == other.client_id
            && self.auth.same_as(&other.auth)
            && self.extra_params == other.extra_params
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

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}
