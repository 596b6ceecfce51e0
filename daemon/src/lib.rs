//! credbrokerd: holds OAuth 2.0 client secrets and hands least-privilege access tokens to local processes
//! over a Unix socket, deciding by the caller identity the kernel reports.
//!
//! The major components, in the order a request meets them:
//!
//! - [`server`]: binds the socket, accepts connections with their peer credentials, serves gRPC.
//! - [`peer`] and [`conn`]: the caller's identity from the kernel (`SO_PEERCRED`, `SO_PEERPIDFD`, `/proc`),
//!   resolved once per connection and checked on every call.
//! - [`service`]: the `credbroker.v1.TokenBroker` service, GetToken and WhoAmI.
//! - [`scope`] and [`policy`]: scope validation and the per-caller policies (deny by default).
//! - [`cache`]: tokens per (client, scope set): single flight, refresh ahead, remembered failures, bounded.
//! - [`ratelimit`]: each caller uid's rate of requests that need a new token.
//! - [`upstream`] and [`retry`]: the client-credentials request to the IdP, the parsing of its answer, and
//!   retries with backoff through transient trouble.
//! - [`audit`]: the structured audit trail of every decision.
//! - [`error`]: request errors and their mapping to gRPC status codes.
//!
//! Around them: [`config`] (the TOML file, validated with every error reported at once), [`secret`] (client
//! secrets, never printed), [`notify`] (`sd_notify`), and [`sys`] (the few raw system calls, the only
//! `unsafe` code).

pub mod audit;
pub mod cache;
pub mod config;
pub mod conn;
pub mod error;
pub mod notify;
pub mod peer;
pub mod policy;
pub mod ratelimit;
pub mod retry;
pub mod scope;
pub mod secret;
pub mod server;
pub mod service;
pub mod sys;
pub mod upstream;

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

pub use config::Config;

/// Serves `config` on `listener` until `shutdown` completes.
///
/// # Errors
/// When the HTTP client for the IdPs cannot be built, or the gRPC server fails.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let upstream = upstream::Upstream::new()?;
    let broker = Arc::new(service::Broker::new(
        Arc::new(config),
        upstream,
        Path::new("/proc"),
    ));
    server::serve(listener, broker, shutdown).await?;
    Ok(())
}
