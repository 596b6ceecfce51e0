//! The `credbroker.v1.TokenBroker` service: GetToken and WhoAmI.
//!
//! GetToken: identify the caller (kernel credentials of the connection, pidfd-checked on every call), validate
//! the request, decide by policy, then serve from the cache or fetch from the IdP, and audit the outcome.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use credbroker_proto::pb;
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::config::{Config, Origin};
use crate::error::Error;
use crate::identity::peer::{Caller, PeerError};
use crate::policy::scope::ScopeSet;
use crate::policy::target;
use crate::serve::conn::Connection;
use crate::telemetry;
use crate::tokens::cache::{CacheConfig, CacheKey, FetchFuture, MinTtl, TokenCache};
use crate::tokens::client::ClientConfig;
use crate::tokens::dpop;
use crate::tokens::ratelimit::RateLimiter;
use crate::tokens::retry::{Attempt, RetryPolicy, Retrying};
use crate::tokens::upstream::{Issued, Upstream, UpstreamError};

/// Longest `min_ttl_seconds` accepted.
pub const MAX_MIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest client name accepted in a request.
pub const MAX_CLIENT_NAME: usize = 64;

type Clients = std::collections::BTreeMap<String, Arc<ClientConfig>>;

/// How a client's IdP has been answering, for `credbroker status`.
#[derive(Clone, Debug, Default)]
pub struct IdpHealth {
    /// When it last issued a token.
    pub last_success: Option<SystemTime>,
    /// When it last failed, with the outcome code (as the metrics label it) and the error.
    pub last_failure: Option<(SystemTime, &'static str, String)>,
    /// Token requests sent since start.
    pub requests: u64,
    /// Those that failed.
    pub failures: u64,
}

type Health = Arc<Mutex<BTreeMap<String, IdpHealth>>>;

/// Records one token request to `client`'s IdP: in its [`IdpHealth`] and the metrics. A request still
/// unanswered when dropped (the retry budget ran out) counts as a timeout.
struct Recording {
    health: Health,
    client: Arc<ClientConfig>,
    started: Instant,
    done: bool,
}

impl Recording {
    fn finish(mut self, result: &Result<Issued, UpstreamError>) {
        self.done = true;
        match result {
            Ok(_) => self.record("2xx", None),
            Err(e) => self.record(e.outcome(), Some(e.to_string())),
        }
    }

    fn record(&self, outcome: &'static str, error: Option<String>) {
        telemetry::metrics().idp_request(&self.client.name, outcome, self.started.elapsed());
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let h = health.entry(self.client.name.clone()).or_default();
        h.requests += 1;
        match error {
            None => h.last_success = Some(SystemTime::now()),
            Some(e) => {
                h.failures += 1;
                h.last_failure = Some((SystemTime::now(), outcome, e));
            }
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            let e = UpstreamError::Timeout(self.started.elapsed());
            self.record(e.outcome(), Some(e.to_string()));
        }
    }
}

/// One token request to a configured client's IdP; [`Retrying`] decides about retries.
struct IdpAttempt {
    /// The current clients: replaced on reload.
    clients: Arc<RwLock<Clients>>,
    upstream: Upstream,
    health: Health,
}

impl Attempt for IdpAttempt {
    fn attempt(&self, key: &CacheKey) -> FetchFuture {
        let client = read(&self.clients).get(&*key.client).cloned();
        let (upstream, scopes, health) = (
            self.upstream.clone(),
            key.scopes.clone(),
            self.health.clone(),
        );
        Box::pin(async move {
            let Some(client) = client else {
                return Err(UpstreamError::InvalidResponse(
                    "the client is no longer configured".to_owned(),
                ));
            };
            let recording = Recording {
                health,
                client: client.clone(),
                started: Instant::now(),
                done: false,
            };
            let result = upstream.fetch(&client, &scopes).await;
            recording.finish(&result);
            if let Err(e) = &result {
                log_upstream_failure(&client.name, &scopes, e);
            }
            result
        })
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The part of the broker a reload replaces at once.
struct State {
    config: Arc<Config>,
    limiter: Arc<RateLimiter>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Clients whose endpoint, client id or parameters changed, or that are gone: their cached tokens were
    /// dropped.
    pub clients_changed: Vec<String>,
    /// Cached entries dropped.
    pub tokens_dropped: usize,
    /// Settings that only take effect after a restart.
    pub need_restart: Vec<&'static str>,
}

/// What the service needs to answer calls.
pub struct Broker {
    state: RwLock<Arc<State>>,
    clients: Arc<RwLock<Clients>>,
    upstream: Upstream,
    cache: TokenCache,
    proc_root: Arc<Path>,
    health: Health,
    started: (SystemTime, Instant),
    /// The audit trail, with its per-uid line budgets.
    pub audit: audit::Audit,
}

impl Broker {
    /// A broker serving `config`, fetching through `upstream`. `proc_root` is `/proc` outside tests. Clients
    /// with `dpop = true` get their keys now.
    ///
    /// # Errors
    /// When a DPoP key cannot be made (the system's random source failed).
    pub fn new(
        config: Arc<Config>,
        upstream: Upstream,
        proc_root: &Path,
    ) -> Result<Self, crate::tokens::dpop::DpopError> {
        upstream.prepare_dpop(config.clients.values().map(|c| &**c), &[])?;
        let clients = Arc::new(RwLock::new(config.clients.clone()));
        let health = Health::default();
        let fetcher = Retrying::new(
            IdpAttempt {
                clients: clients.clone(),
                upstream: upstream.clone(),
                health: health.clone(),
            },
            RetryPolicy::default(),
            config.daemon.retry_budget,
        );
        let cache = TokenCache::new(
            Arc::new(fetcher),
            CacheConfig {
                max_entries: config.daemon.max_cached_tokens,
                max_bytes: config.daemon.max_cache_bytes,
                default_min_ttl: config.daemon.default_min_ttl,
                retry_ratio: config.daemon.retry_budget,
                ..CacheConfig::default()
            },
        );
        Ok(Self {
            state: RwLock::new(Arc::new(State {
                limiter: Arc::new(RateLimiter::new(config.daemon.rate_limit)),
                config,
            })),
            clients,
            upstream,
            cache,
            proc_root: proc_root.into(),
            health,
            started: (SystemTime::now(), Instant::now()),
            audit: audit::Audit::default(),
        })
    }

    /// When the broker started: wall-clock time, and the monotonic instant for uptime.
    pub fn started(&self) -> (SystemTime, Instant) {
        self.started
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.state().config.clone()
    }

    /// Where the running config came from.
    pub fn origin(&self) -> Option<Origin> {
        self.state().config.origin.clone()
    }

    /// The token cache, for status and metrics.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Each caller uid's rate-limit bucket.
    pub fn rate_limits(
        &self,
    ) -> (
        crate::tokens::ratelimit::Rate,
        Vec<crate::tokens::ratelimit::BucketStatus>,
    ) {
        let limiter = self.state().limiter.clone();
        (limiter.rate(), limiter.buckets(Instant::now()))
    }

    /// Each configured client with its IdP's health and its token endpoint as discovered (if it was).
    pub fn clients(&self) -> Vec<(Arc<ClientConfig>, IdpHealth, Option<url::Url>)> {
        let health = self
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        read(&self.clients)
            .values()
            .map(|c| {
                let discovered = match (&c.token_url, &c.issuer) {
                    (None, Some(issuer)) => self.upstream.discovered(issuer),
                    _ => None,
                };
                (
                    c.clone(),
                    health.get(&c.name).cloned().unwrap_or_default(),
                    discovered,
                )
            })
            .collect()
    }

    /// Explains how the running policies judge `caller` asking for `client` and `scopes`.
    ///
    /// # Errors
    /// [`Refusal::UnknownClient`](crate::policy::Refusal::UnknownClient).
    pub fn explain(
        &self,
        caller: &Caller,
        client: &str,
        scopes: &ScopeSet,
    ) -> Result<crate::policy::Explanation, crate::policy::Refusal> {
        let config = self.config();
        config
            .policies
            .explain(caller, client, scopes, |c| config.clients.contains_key(c))
    }

    fn state(&self) -> Arc<State> {
        read(&self.state).clone()
    }

    /// Where `/proc` is (`/proc` outside tests).
    pub fn proc_root(&self) -> Arc<Path> {
        self.proc_root.clone()
    }

    /// Whether `caller` is one of `daemon.admins`: a user name, or a group written `@group` (primary or
    /// supplementary).
    pub fn is_admin(&self, caller: &Caller) -> bool {
        self.state()
            .config
            .daemon
            .admins
            .iter()
            .any(|a| match a.strip_prefix('@') {
                Some(group) => caller.groups.iter().any(|g| g == group),
                None => caller.user.as_deref() == Some(a.as_str()),
            })
    }

    /// Drops cached entries of `client` (every client if empty) whose scope set holds all of `scopes`;
    /// returns how many went.
    pub fn flush(&self, client: &str, scopes: &[String]) -> usize {
        self.cache.flush(client, scopes)
    }

    /// Whether any policy matches `caller`: a caller no policy matches shares a small connection budget
    /// with every other such caller.
    pub fn is_known(&self, caller: &Caller) -> bool {
        self.state().config.policies.matches_any(caller)
    }

    /// Applies a new config: the new clients serve new fetches, cached tokens of clients whose endpoint, client
    /// id or parameters changed (or that are gone) are dropped, and the new policies take over in one step.
    pub fn reload(&self, new: Config) -> Reloaded {
        let old = self.state();
        let mut changed: Vec<String> = old
            .config
            .clients
            .iter()
            .filter(|(name, c)| new.clients.get(*name).is_none_or(|n| !n.same_upstream(c)))
            .map(|(name, _)| name.clone())
            .collect();
        changed.sort();
        *write(&self.clients) = new.clients.clone();
        self.upstream.forget_discovered();
        // DPoP keys stay with clients whose tokens stay (the tokens are bound to them).
        if let Err(e) = self
            .upstream
            .prepare_dpop(new.clients.values().map(|c| &**c), &changed)
        {
            tracing::error!(error = %e, "cannot make DPoP keys; those clients' fetches fail until a reload");
        }
        let tokens_dropped = self
            .cache
            .retain_clients(|c| !changed.iter().any(|x| x == c));
        let (o, n) = (&old.config.daemon, &new.daemon);
        let mut need_restart = Vec::new();
        if o.socket != n.socket
            || o.socket_mode != n.socket_mode
            || o.socket_group != n.socket_group
        {
            need_restart.push("daemon.socket, socket_mode, socket_group");
        }
        if o.log_format != n.log_format {
            need_restart.push("daemon.log_format");
        }
        if o.metrics != n.metrics {
            need_restart.push("daemon.metrics, allow_remote_metrics");
        }
        if o.retry_budget != n.retry_budget {
            need_restart.push("daemon.retry_budget");
        }
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| new.clients.contains_key(name));
        self.cache
            .reconfigure(n.max_cached_tokens, n.max_cache_bytes, n.default_min_ttl);
        let limiter = if o.rate_limit == n.rate_limit {
            old.limiter.clone()
        } else {
            Arc::new(RateLimiter::new(n.rate_limit))
        };
        *write(&self.state) = Arc::new(State {
            config: Arc::new(new),
            limiter,
        });
        Reloaded {
            clients_changed: changed,
            tokens_dropped,
            need_restart,
        }
    }

    async fn caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Arc<Connection>, Arc<Caller>), Error> {
        let conn = request
            .extensions()
            .get::<Arc<Connection>>()
            .cloned()
            .ok_or_else(|| {
                Error::Unauthenticated(PeerError::Credentials(std::io::Error::other(
                    "not a Unix socket peer",
                )))
            })?;
        let caller = conn.caller().map_err(Error::Unauthenticated)?;
        Ok((conn, caller))
    }

    /// GetToken, over gRPC or HTTP.
    pub(crate) async fn token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<pb::GetTokenResponse, Error> {
        let result = self.decide_and_fetch(request).await;
        telemetry::metrics().call(
            "GetToken",
            result
                .as_ref()
                .map_or_else(Error::code, |_| tonic::Code::Ok),
        );
        result
    }

    async fn decide_and_fetch(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<pb::GetTokenResponse, Error> {
        let (conn, caller, log) = self.identified(&request, |r| (&r.client, &r.scopes))?;
        let req = request.into_inner();
        let ask = Ask {
            client: &req.client,
            scopes: &req.scopes,
            min_ttl_seconds: req.min_ttl_seconds,
        };
        let served = self.serve_token(&conn, &caller, log, ask, None).await?;
        let now = Instant::now();
        Ok(pb::GetTokenResponse {
            access_token: served.token.access_token.expose_secret().to_owned(),
            token_type: served.token.token_type.clone(),
            expires_at: Some(prost_types::Timestamp::from(
                served.token.expires_at_wall(now),
            )),
            scopes: served.token.granted.to_vec(),
            client: served.client.name.clone(),
        })
    }

    /// The caller of `request`, or why there is none (audited as a denial with what the request asked).
    fn identified<T>(
        &self,
        request: &Request<T>,
        asked: impl Fn(&T) -> (&String, &Vec<String>),
    ) -> Result<(Arc<Connection>, Arc<Caller>, audit::LogKey), Error> {
        let conn = request.extensions().get::<Arc<Connection>>().cloned();
        let log = conn.as_ref().map_or(audit::LogKey::Pooled, |c| c.log_key());
        let result = conn
            .ok_or_else(|| {
                Error::Unauthenticated(PeerError::Credentials(std::io::Error::other(
                    "not a Unix socket peer",
                )))
            })
            .and_then(|conn| {
                let caller = conn.caller().map_err(Error::Unauthenticated)?;
                Ok((conn, caller))
            });
        match result {
            Ok((conn, caller)) => Ok((conn, caller, log)),
            Err(e) => {
                let (client, scopes) = asked(request.get_ref());
                self.audit.denied(log, None, client, scopes, &e);
                Err(e)
            }
        }
    }

    /// GetToken's decision and fetch, for `caller` asking `ask`: the token (from the cache or the IdP) with
    /// what allowed it; every outcome audited. With `proof_for`, the token is for a DPoP proof for that URL:
    /// the client must bind its tokens and the policies allow proofs for it, or nothing is fetched.
    async fn serve_token(
        &self,
        conn: &Connection,
        caller: &Arc<Caller>,
        log: audit::LogKey,
        ask: Ask<'_>,
        proof_for: Option<&url::Url>,
    ) -> Result<Served, Error> {
        let state = self.state();
        // The audit line names the client the request resolved to, as the error does, when it did.
        let deny = |e: Error| {
            let client = match &e {
                Error::Refused(
                    crate::policy::Refusal::ClientNotAllowed { client, .. }
                    | crate::policy::Refusal::ScopeNotAllowed { client, .. },
                )
                | Error::LifetimeTooShort { client, .. } => client.as_str(),
                _ => ask.client,
            };
            self.audit.denied(log, Some(caller), client, ask.scopes, &e);
            e
        };
        if ask.client.len() > MAX_CLIENT_NAME {
            return Err(deny(Error::InvalidRequest(format!(
                "client name is longer than {MAX_CLIENT_NAME} bytes"
            ))));
        }
        let scopes = ScopeSet::parse(ask.scopes).map_err(|e| deny(Error::Scopes(e)))?;
        let min_ttl = match Duration::from_secs(ask.min_ttl_seconds.into()) {
            d if d > MAX_MIN_TTL => {
                return Err(deny(Error::InvalidRequest(format!(
                    "min_ttl_seconds must be at most {}",
                    MAX_MIN_TTL.as_secs()
                ))));
            }
            d if d.is_zero() => MinTtl::Default(state.config.daemon.default_min_ttl),
            d => MinTtl::Explicit(d),
        };
        let allowed = state
            .config
            .policies
            .authorize(caller, ask.client, &scopes, |c| {
                state.config.clients.contains_key(c)
            })
            .map_err(|r| deny(Error::Refused(r)))?;
        if allowed.by_exe {
            conn.check_exe(&self.proc_root)
                .map_err(|e| deny(Error::Unauthenticated(e)))?;
        }
        let client = state.config.clients[&allowed.client].clone();
        if let Some(url) = proof_for {
            if !client.dpop {
                return Err(deny(Error::InvalidRequest(format!(
                    "client {:?} does not bind its tokens (dpop = false): send its token as a Bearer \
                     token (GetToken)",
                    client.name
                ))));
            }
            if !allowed.proof_allowed(url) {
                return Err(deny(Error::Refused(
                    crate::policy::Refusal::TargetNotAllowed {
                        url: crate::text::clip_escaped(&target::htu(url)).to_string(),
                        policies: allowed.policies.join(", "),
                        caller: caller.to_string(),
                    },
                )));
            }
        }

        let key = CacheKey {
            client: client.name.as_str().into(),
            scopes: scopes.clone(),
        };
        let admit = || {
            let admitted = state.limiter.try_acquire(caller.uid, Instant::now());
            if admitted.is_err() {
                telemetry::metrics().rate_limited();
            }
            admitted
        };
        let (token, source) = self
            .cache
            .get(&key, min_ttl, admit)
            .await
            .map_err(|source| {
                let e = Error::Token {
                    client: client.name.clone(),
                    source,
                };
                self.audit.failed(log, caller, &client.name, &scopes, &e);
                e
            })?;
        let now = Instant::now();
        if token.remaining(now) < min_ttl.required(token.lifetime) {
            return Err(deny(Error::LifetimeTooShort {
                client: client.name.clone(),
                lifetime: token.lifetime,
                min_ttl: min_ttl.required(token.lifetime),
            }));
        }
        self.audit.granted(
            log,
            &audit::Grant {
                caller,
                client: &client.name,
                requested: &scopes,
                granted: &token.granted,
                policies: &allowed.policies,
                source,
                fingerprint: token.fingerprint,
                expires: token.expires_at,
                credential: token.credential.as_deref(),
            },
        );
        Ok(Served { token, client })
    }

    /// Proof, over gRPC or HTTP.
    pub(crate) async fn proof(
        &self,
        request: Request<pb::ProofRequest>,
    ) -> Result<pb::ProofResponse, Error> {
        let mut client_name = None;
        let result = self.make_proof(request, &mut client_name).await;
        let outcome = result
            .as_ref()
            .map_or_else(Error::code, |_| tonic::Code::Ok);
        telemetry::metrics().call("Proof", outcome);
        // Labelled by configured clients only: a caller's made-up name never becomes a series.
        if let Some(client) = client_name.filter(|c| self.config().clients.contains_key(c)) {
            telemetry::metrics().proof(&client, crate::error::code_name(outcome));
        }
        result
    }

    async fn make_proof(
        &self,
        request: Request<pb::ProofRequest>,
        client_name: &mut Option<String>,
    ) -> Result<pb::ProofResponse, Error> {
        let (conn, caller, log) = self.identified(&request, |r| (&r.client, &r.scopes))?;
        let req = request.into_inner();
        let deny = |e: Error| {
            self.audit
                .denied(log, Some(&caller), &req.client, &req.scopes, &e);
            e
        };
        // The request to the API, checked before anything is fetched.
        if !dpop::valid_method(&req.method) {
            return Err(deny(Error::InvalidRequest(
                "method must be an HTTP method (a token of at most 32 characters), e.g. GET"
                    .to_owned(),
            )));
        }
        let url = target::request_url(&req.url)
            .map_err(|e| deny(Error::InvalidRequest(format!("url: {e}"))))?;
        let nonce = match req.nonce.as_str() {
            "" => None,
            n if dpop::valid_nonce(n) => Some(n),
            _ => {
                return Err(deny(Error::InvalidRequest(
                    "nonce must be 1 to 512 printable ASCII characters, without '\"' or '\\'"
                        .to_owned(),
                )));
            }
        };
        let ask = Ask {
            client: &req.client,
            scopes: &req.scopes,
            min_ttl_seconds: req.min_ttl_seconds,
        };
        let served = self
            .serve_token(&conn, &caller, log, ask, Some(&url))
            .await
            .inspect_err(|_| *client_name = Some(req.client.clone()).filter(|c| !c.is_empty()))?;
        *client_name = Some(served.client.name.clone());
        let key = self.upstream.dpop_key(&served.client.name).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "client {:?} has no DPoP key (yet): reload the daemon",
                served.client.name
            ))
        })?;
        let token = served.token.access_token.expose_secret();
        let proof = key
            .proof(
                &req.method,
                &target::htu(&url),
                Some(token),
                nonce,
                SystemTime::now(),
            )
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.audit.proof(
            log,
            &caller,
            &served.client.name,
            served.token.fingerprint,
            &url,
            served.token.expires_at,
        );
        let now = Instant::now();
        Ok(pb::ProofResponse {
            authorization: format!("DPoP {token}"),
            dpop: proof,
            expires_at: Some(prost_types::Timestamp::from(
                served.token.expires_at_wall(now),
            )),
            scopes: served.token.granted.to_vec(),
            client: served.client.name.clone(),
        })
    }

    /// WhoAmI, over gRPC or HTTP.
    pub(crate) async fn whoami(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<pb::WhoAmIResponse, Error> {
        let result = self.describe_caller(request).await;
        telemetry::metrics().call(
            "WhoAmI",
            result
                .as_ref()
                .map_or_else(Error::code, |_| tonic::Code::Ok),
        );
        result
    }

    async fn describe_caller(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<pb::WhoAmIResponse, Error> {
        let (conn, caller) = self.caller(&request).await?;
        conn.check_exe(&self.proc_root)
            .map_err(Error::Unauthenticated)?;
        let grants = self
            .state()
            .config
            .policies
            .grants(&caller)
            .into_iter()
            .map(|(client, scopes)| pb::Grant { client, scopes })
            .collect();
        Ok(pb::WhoAmIResponse {
            caller: Some(pb::Caller {
                uid: caller.uid,
                gid: caller.gid,
                pid: caller.pid,
                user: caller.user.clone().unwrap_or_default(),
                groups: caller.groups.clone(),
                exe: caller
                    .exe
                    .as_ref()
                    .map(|e| e.display().to_string())
                    .unwrap_or_default(),
                unit: caller.unit.clone().unwrap_or_default(),
            }),
            grants,
        })
    }
}

/// What a GetToken-like request asks for.
#[derive(Clone, Copy)]
struct Ask<'a> {
    client: &'a str,
    scopes: &'a [String],
    min_ttl_seconds: u32,
}

/// A token served, with what allowed it.
struct Served {
    token: Arc<crate::tokens::cache::CachedToken>,
    client: Arc<ClientConfig>,
}

/// Operational log of an IdP failure, with the detail the caller does not get.
fn log_upstream_failure(client: &str, scopes: &ScopeSet, e: &UpstreamError) {
    use UpstreamError as U;
    match e {
        U::Rejected {
            status,
            code,
            description,
        } => tracing::warn!(
            client,
            scopes = %scopes,
            status,
            error = crate::text::clip(code.as_deref().unwrap_or("")).to_string().as_str(),
            description = crate::text::clip_at(description.as_deref().unwrap_or(""), 400)
                .to_string()
                .as_str(),
            "the IdP refused the token request"
        ),
        U::ScopeTooWide { extra } => tracing::warn!(
            client,
            scopes = %scopes,
            extra = %extra.join(" "),
            "the IdP granted more scopes than requested; token refused (least privilege)"
        ),
        other => tracing::warn!(client, scopes = %scopes, error = %other, "token request failed"),
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for Broker {
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        self.token(request)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        self.whoami(request)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn proof(
        &self,
        request: Request<pb::ProofRequest>,
    ) -> Result<Response<pb::ProofResponse>, Status> {
        Broker::proof(self, request)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}
