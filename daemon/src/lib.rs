//! credbrokerd: holds OAuth 2.0 client secrets and hands least-privilege access tokens to local processes
//! over a Unix socket, deciding by the caller identity the kernel reports.
//!
//! The daemon is grouped by concern, in the order a request meets them:
//!
//! - [`serve`]: the socket and its connections, what one user may hold of them, the gRPC service and the plain
//!   HTTP API, systemd notifications.
//! - [`identity`]: the caller's identity from the kernel (`SO_PEERCRED`, `SO_PEERPIDFD`, `/proc`), settled at
//!   accept and checked on every call.
//! - [`policy`]: scope validation and the per-caller policies (deny by default).
//! - [`tokens`]: the IdP clients, the client-credentials request and its retries, the token cache (single
//!   flight, refresh ahead, bounded), each uid's rate of new tokens.
//! - [`config`]: the TOML file, validated with every error reported at once; it builds the types of the other
//!   groups, which never read it.
//!
//! Shared by them: [`audit`] (the structured audit trail), [`telemetry`] (the metrics), [`error`] (request
//! errors and their one mapping to gRPC status codes), [`secret`] (secrets, never printed), [`path_trust`] (who
//! controls a credential file's path, so the daemon reads nothing for a user that the user could not),
//! [`text`] (bounded, escaped log text) and [`sys`]
//! (the few raw system calls, the only `unsafe` code).

pub mod audit;
pub mod config;
pub mod error;
pub mod identity;
pub mod path_trust;
pub mod policy;
pub mod secret;
pub mod serve;
pub mod sys;
pub mod telemetry;
pub mod text;
pub mod tokens;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use credbroker_proto::TokenBrokerServer;
use tokio_stream::{Stream, StreamExt};

pub use config::Config;
use config::ConfigErrors;
use identity::peer;
use serve::notify::Notifier;
use serve::{limits, server, service};
use tokens::upstream;

/// What the daemon is told from outside while it runs (by signals, in `credbrokerd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Re-read the config and secrets (SIGHUP).
    Reload,
    /// Stop accepting, finish in-flight calls, exit (SIGTERM, SIGINT); the name is logged.
    Shutdown(&'static str),
}

/// How the daemon runs.
pub struct Options {
    /// Loads the config again, for reloads.
    pub reload_config: Arc<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>,
    /// Readiness and status notifications (`sd_notify`).
    pub notifier: Notifier,
    /// Send `WATCHDOG=1` this often.
    pub watchdog: Option<Duration>,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub grace: Duration,
    /// The process's open file limit (`RLIMIT_NOFILE`, as raised at start): it sets how many connections
    /// are served at once.
    pub nofile: u64,
}

/// Serves `config` on `incoming`'s connections (the listening socket, or connected sockets handed over, see
/// [`server::Incoming`]), reloading on [`Signal::Reload`], until [`Signal::Shutdown`] (or the end of
/// `signals`); then drains in-flight calls for at most `options.grace`.
///
/// # Errors
/// When the HTTP client for the IdPs cannot be built, or the gRPC server fails.
pub async fn run(
    config: Config,
    incoming: impl Into<server::Incoming>,
    signals: impl Stream<Item = Signal>,
    options: Options,
) -> anyhow::Result<()> {
    let upstream = upstream::Upstream::new()?;
    if config.policies.match_exe() && !peer::can_read_other_users_exe() {
        tracing::warn!(
            "policies match on `exe`, but without CAP_SYS_PTRACE credbrokerd cannot read the executable of \
             callers running as other users, so those policies only match its own user's processes; \
             see the README (systemd drop-in credbroker-exe-matching.conf)"
        );
    }
    warn_unseen_exes(&config);
    let summary = summary(&config);
    let metrics_listener = match config.daemon.metrics {
        None => None,
        Some(addr) => Some(serve::metrics::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen for metrics on {addr} (daemon.metrics): {e}")
        })?),
    };
    let limits = limits::Limits::new(
        options.nofile,
        config.daemon.max_connections_per_uid,
        config.daemon.idle_timeout,
    );
    tracing::info!(
        max_connections = limits.max_connections,
        per_uid = limits.per_uid_connections,
        unmatched = limits.unmatched_connections,
        calls_per_uid = limits.per_uid_calls,
        "connection limits"
    );
    let broker = Arc::new(service::Broker::new(
        Arc::new(config),
        upstream,
        Path::new("/proc"),
    )?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TokenBrokerServer<service::Broker>>()
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reloader = Arc::new(Reloader {
        load: options.reload_config.clone(),
        notifier: options.notifier.clone(),
    });
    let budgets = limits::Budgets::new(limits);
    let admin = serve::admin::AdminService::new(broker.clone(), reloader.clone(), budgets.clone());
    let _metrics = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        }
        AbortOnDrop(tokio::spawn(serve::metrics::serve(
            listener,
            broker.clone(),
            budgets.clone(),
        )))
    });
    let mut server = tokio::spawn(server::serve(
        incoming.into(),
        broker.clone(),
        admin,
        budgets,
        health_service,
        async {
            let _ = stopped.await;
        },
    ));
    let notifier = &options.notifier;
    notify(notifier, &format!("READY=1\nSTATUS={summary}"));
    let _watchdog = options.watchdog.map(|every| {
        let notifier = notifier.clone();
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "systemd watchdog enabled"
        );
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notify(&notifier, "WATCHDOG=1");
            }
        }))
    });
    // Now and then, say how many lines went unlogged (over their budget), and how often tokens were handed
    // out again.
    let _log_summaries = {
        let broker = broker.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                broker.audit.flush(false);
            }
        }))
    };
    tokio::pin!(signals);
    let reason = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(Signal::Reload) => {
                    let _ = reloader.reload(&broker);
                }
                Some(Signal::Shutdown(name)) => break name,
                None => break "end of signals",
            },
            result = &mut server => return result?,
        }
    };
    tracing::info!(
        "{reason}: shutting down; draining in-flight calls for up to {}",
        humantime::format_duration(options.grace)
    );
    notify(notifier, "STOPPING=1\nSTATUS=shutting down");
    health
        .set_not_serving::<TokenBrokerServer<service::Broker>>()
        .await;
    let _ = stop.send(());
    tokio::select! {
        result = &mut server => result??,
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!("calls still in flight after the grace period; exiting anyway");
            server.abort();
        }
    }
    broker.audit.flush(true);
    Ok(())
}

fn notify(notifier: &Notifier, state: &str) {
    if let Err(e) = notifier.notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Warns about `exe` paths the daemon cannot stat: the policies naming them match nobody.
fn warn_unseen_exes(config: &Config) {
    for (path, e) in config.policies.unseen_exes() {
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "a policy names an executable the daemon cannot see (missing, or hidden by ProtectHome= or \
             PrivateTmp=); it matches no caller"
        );
    }
}

/// The `STATUS=` line for a config.
fn summary(config: &Config) -> String {
    let (clients, policies) = (config.clients.len(), config.policies.policies().len());
    format!(
        "serving {clients} client{}, {policies} polic{}",
        if clients == 1 { "" } else { "s" },
        if policies == 1 { "y" } else { "ies" }
    )
}

/// Reloads the config: what SIGHUP and the admin API's Reload do.
pub struct Reloader {
    /// Loads the config again.
    pub load: Arc<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>,
    /// Tells systemd about it.
    pub notifier: Notifier,
}

/// What a successful reload did.
pub struct ReloadOutcome {
    /// The `STATUS=` summary of the new config.
    pub summary: String,
    /// The changes.
    pub changes: service::Reloaded,
}

impl Reloader {
    /// Loads the config and applies it to `broker`, logging and notifying systemd either way.
    ///
    /// # Errors
    /// Every config error; the running config then keeps serving.
    pub fn reload(&self, broker: &service::Broker) -> Result<ReloadOutcome, ConfigErrors> {
        notify(&self.notifier, "RELOADING=1\nSTATUS=reloading");
        match (self.load)() {
            Ok(config) => {
                warn_unseen_exes(&config);
                for w in config.warnings() {
                    tracing::warn!(key = %w.key, "{}", w.message);
                }
                let summary = summary(&config);
                let changes = broker.reload(config);
                telemetry::metrics().reload(true);
                tracing::info!(
                    clients_changed = %changes.clients_changed.join(","),
                    tokens_dropped = changes.tokens_dropped,
                    "config reloaded: {summary}"
                );
                for setting in &changes.need_restart {
                    tracing::warn!("{setting} changed: takes effect after a restart");
                }
                notify(&self.notifier, &format!("READY=1\nSTATUS={summary}"));
                Ok(ReloadOutcome { summary, changes })
            }
            Err(errors) => {
                telemetry::metrics().reload(false);
                for e in &errors.errors {
                    tracing::error!(key = %e.key, "{}", e.message);
                }
                tracing::error!(
                    "config reload refused ({} errors); still serving the previous config",
                    errors.errors.len()
                );
                notify(
                    &self.notifier,
                    "READY=1\nSTATUS=reload refused; serving the previous config",
                );
                Err(errors)
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection handed over in memory (one end of a socket pair, no path, no accept) is served by the
    /// whole stack, and its caller is who the kernel says: this process.
    #[tokio::test]
    async fn connections_handed_over_in_memory_are_served_with_the_kernels_identity() {
        let uid = sys::euid();
        let text = format!(
            "version = 1\n[clients.idp]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"x\"\n\
             client_secret = {{ env = \"S\" }}\n[[policy]]\nname = \"me\"\nmatch = {{ uid = {uid} }}\n\
             client = \"idp\"\nscopes = [\"a\"]\n"
        );
        let config = Config::parse(
            &text,
            &secret::SecretEnv {
                credentials_dir: None,
                var: &|_| Some("s".to_owned()),
                offline: None,
            },
        )
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let options = Options {
            reload_config: Arc::new(|| {
                Err(ConfigErrors {
                    path: None,
                    errors: Vec::new(),
                })
            }),
            notifier: Notifier::new(None),
            watchdog: None,
            grace: Duration::from_secs(1),
            nofile: 1024,
        };
        let daemon = tokio::spawn(run(
            config,
            server::Incoming::Connected(rx),
            tokio_stream::pending(),
            options,
        ));
        let (mut ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        tx.send(theirs).await.unwrap();
        ours.write_all(
            b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nCredbroker-Request: true\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), ours.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("\"uid\":{uid}")), "{answer}");
        assert!(
            answer.contains(&format!("\"pid\":{}", std::process::id())),
            "{answer}"
        );
        daemon.abort();
    }
}
