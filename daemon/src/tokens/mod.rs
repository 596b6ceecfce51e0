//! Tokens and the IdP: the clients the broker is registered as ([`client`]), the client-credentials request and
//! the parsing of its answer ([`upstream`]), `private_key_jwt` assertions ([`jwt`]), federated client assertions
//! ([`assertion`]), retries through transient
//! trouble within a retry budget ([`retry`]), the cache with its single flight and refresh ahead ([`cache`]),
//! renewals through an IdP outage ([`renewal`]), and each uid's rate of new tokens ([`ratelimit`]).

pub mod assertion;
pub mod cache;
pub mod client;
pub mod dpop;
pub mod jwt;
pub mod ratelimit;
pub mod renewal;
pub mod retry;
pub mod upstream;
