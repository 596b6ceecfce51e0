//! The daemon's request errors and their one mapping to gRPC status codes (DESIGN.md's table).
//!
//! Messages are stable and safe to show to the caller: they say what was refused and what to do, never a
//! secret, a token, or the IdP's own prose (that goes to the log).

use std::time::Duration;

use tonic::{Code, Status};

use crate::identity::peer::PeerError;
use crate::policy::Refusal;
use crate::policy::scope::ScopeError;
use crate::tokens::cache::CacheError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's identity could not be established.
    #[error("cannot identify the caller: {0}")]
    Unauthenticated(#[source] PeerError),
    /// The scopes are malformed.
    #[error("invalid scopes: {0}")]
    Scopes(#[source] ScopeError),
    /// Another malformed request field.
    #[error("{0}")]
    InvalidRequest(String),
    /// The policy refused the request (or it named no usable client).
    #[error("{0}")]
    Refused(#[source] Refusal),
    /// No token: the IdP failed or refused, or the caller is over its rate of new tokens.
    #[error("client {client:?}: {source}")]
    Token {
        /// The client.
        client: String,
        /// What went wrong.
        #[source]
        source: CacheError,
    },
    /// The IdP's tokens live shorter than the caller's `min_ttl_seconds`.
    #[error(
        "client {client:?} issues tokens valid for {}s, less than the requested min_ttl_seconds={}",
        .lifetime.as_secs(), .min_ttl.as_secs()
    )]
    LifetimeTooShort {
        /// The client.
        client: String,
        /// The lifetime the IdP grants.
        lifetime: Duration,
        /// What the caller asked for.
        min_ttl: Duration,
    },
}

impl Error {
    /// How long the caller should wait before trying again, when known: the rate limit's wait, or the IdP's
    /// `Retry-After` behind an `UNAVAILABLE`.
    pub fn retry_after(&self) -> Option<Duration> {
        use crate::tokens::upstream::UpstreamError as U;
        match self {
            Error::Token {
                source: CacheError::RateLimited { retry_in },
                ..
            } => Some(*retry_in),
            Error::Token { source, .. } => match source.upstream() {
                Some(U::Server { retry_after, .. } | U::RateLimited { retry_after }) => {
                    *retry_after
                }
                _ => None,
            },
            _ => None,
        }
    }
}

impl Error {
    /// The gRPC status code this error is answered with (the HTTP API maps it on to an HTTP status).
    pub fn code(&self) -> Code {
        match self {
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Scopes(_) | Error::InvalidRequest(_) | Error::LifetimeTooShort { .. } => {
                Code::InvalidArgument
            }
            Error::Refused(r) if r.is_denial() => Code::PermissionDenied,
            Error::Refused(_) => Code::InvalidArgument,
            Error::Token {
                source: CacheError::RateLimited { .. },
                ..
            } => Code::ResourceExhausted,
            Error::Token {
                source: CacheError::Abandoned,
                ..
            } => Code::Unavailable,
            Error::Token { source, .. } if source.upstream().is_some_and(|u| u.is_transient()) => {
                Code::Unavailable
            }
            Error::Token { .. } => Code::FailedPrecondition,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        let message = match code {
            Code::Unavailable => format!("{e}; no valid cached token; worth retrying"),
            Code::FailedPrecondition => {
                format!("{e}; an operator must fix the client's IdP registration or configuration")
            }
            _ => e.to_string(),
        };
        Status::new(code, message)
    }
}

/// A gRPC status code's name in lowercase: the HTTP API's `error` field and the metrics' `outcome` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
