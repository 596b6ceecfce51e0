//! The admin API, `credbroker.admin.v1.Admin`: reload, flush, status and explain, for the callers the kernel
//! identifies as one of `daemon.admins` (user names, and groups written `@group`). Everyone else gets
//! `PERMISSION_DENIED`. Every call, allowed or not, is an audit event (`event = "admin"`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use credbroker_proto::admin::{self as pb, admin_server::Admin};
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::Reloader;
use crate::identity::peer::{self, Caller, PeerCred};
use crate::policy::scope::ScopeSet;
use crate::serve::conn::Connection;
use crate::serve::limits::{Bucket, Budgets};
use crate::serve::service::{Broker, MAX_CLIENT_NAME};
use crate::sys;
use crate::telemetry;
use crate::tokens::cache::EntryStatus;

/// Cache entries per status message are added until it is this big: with the largest scope sets (64 of 256
/// bytes, about 17 KiB an entry, twice that with other granted scopes) a message stays far below any gRPC
/// message limit (4 MiB by default), whatever the number of entries.
pub const STATUS_PAGE_BYTES: usize = 1 << 20;

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
    reloader: Arc<Reloader>,
    budgets: Arc<Budgets>,
}

/// Counts an admin call in the metrics.
fn counted<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    telemetry::metrics().call(method, code);
    result
}

impl AdminService {
    /// The admin API over `broker`, reloading with `reloader`; `budgets` counts the socket's connections.
    pub fn new(broker: Arc<Broker>, reloader: Arc<Reloader>, budgets: Arc<Budgets>) -> Self {
        Self {
            broker,
            reloader,
            budgets,
        }
    }

    /// The caller, if the kernel identifies it as an admin; audits the call either way.
    fn admin<T>(&self, call: &'static str, request: &Request<T>) -> Result<Arc<Caller>, Status> {
        let conn = request
            .extensions()
            .get::<Arc<Connection>>()
            .ok_or_else(|| Status::unauthenticated("not a Unix socket peer"))?;
        let caller = conn
            .caller()
            .map_err(|e| Status::unauthenticated(format!("cannot identify the caller: {e}")))?;
        let allowed = self.broker.is_admin(&caller);
        self.broker
            .audit
            .admin(conn.log_key(), &caller, call, allowed);
        if allowed {
            Ok(caller)
        } else {
            Err(Status::permission_denied(format!(
                "{caller} is not one of daemon.admins"
            )))
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        counted("Reload", self.reload_config(request).await)
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        counted("Flush", self.flush_cache(request))
    }

    type StatusStream = StatusPages;

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        counted("Status", self.status_pages(request))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let result = match self.admin("explain", &request) {
            Ok(_) => {
                let broker = self.broker.clone();
                // NSS look-ups and /proc reads block: off the async workers.
                tokio::task::spawn_blocking(move || explain(&broker, request.into_inner()))
                    .await
                    .unwrap_or_else(|e| Err(Status::internal(format!("explain failed: {e}"))))
                    .map(Response::new)
            }
            Err(e) => Err(e),
        };
        counted("Explain", result)
    }
}

impl AdminService {
    async fn reload_config(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.admin("reload", &request)?;
        let (reloader, broker) = (self.reloader.clone(), self.broker.clone());
        // Reading the config and secrets blocks: off the async workers.
        let outcome = tokio::task::spawn_blocking(move || reloader.reload(&broker))
            .await
            .map_err(|e| Status::internal(format!("reload failed: {e}")))?;
        match outcome {
            Ok(r) => Ok(Response::new(pb::ReloadResponse {
                summary: r.summary,
                clients_changed: r.changes.clients_changed,
                tokens_dropped: r.changes.tokens_dropped as u64,
                need_restart: r
                    .changes
                    .need_restart
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            })),
            Err(errors) => Err(Status::invalid_argument(format!(
                "reload refused, the running config keeps serving; {errors}"
            ))),
        }
    }

    fn flush_cache(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        self.admin("flush", &request)?;
        let r = request.into_inner();
        let dropped = self.broker.flush(&r.client, &r.scopes);
        Ok(Response::new(pb::FlushResponse {
            dropped: dropped as u64,
        }))
    }

    fn status_pages(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<StatusPages>, Status> {
        self.admin("status", &request)?;
        let clock = Clock::now();
        let broker = &self.broker;
        let config = broker.config();
        let (started_wall, started) = broker.started();
        let origin = config.origin.as_ref();
        let daemon = pb::DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: Some(started_wall.into()),
            uptime_seconds: clock.at.saturating_duration_since(started).as_secs(),
            config_path: origin
                .map(|o| o.path.display().to_string())
                .unwrap_or_default(),
            config_loaded_at: origin.map(|o| o.loaded_at.into()),
            config_sha256: origin.map(|o| o.sha256.clone()).unwrap_or_default(),
            clients: u32::try_from(config.clients.len()).unwrap_or(u32::MAX),
            policies: u32::try_from(config.policies.policies().len()).unwrap_or(u32::MAX),
        };
        let clients = broker
            .clients()
            .into_iter()
            .map(|(c, health, discovered)| {
                let (endpoint, was_discovered) = match (&c.token_url, discovered) {
                    (Some(url), _) => (url.to_string(), false),
                    (None, Some(url)) => (url.to_string(), true),
                    (None, None) => (String::new(), false),
                };
                let (last_failure, code, message) = match health.last_failure {
                    Some((at, code, message)) => (Some(at.into()), code.to_owned(), message),
                    None => (None, String::new(), String::new()),
                };
                pb::ClientStatus {
                    name: c.name.clone(),
                    endpoint,
                    discovered: was_discovered,
                    issuer: c
                        .issuer
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    auth_method: c.auth.method().to_owned(),
                    client_id: c.client_id.clone(),
                    last_success: health.last_success.map(Into::into),
                    last_failure,
                    last_failure_code: code,
                    last_failure_message: message,
                    requests: health.requests,
                    failures: health.failures,
                }
            })
            .collect();
        let usage = self.budgets.usage();
        let limits = *self.budgets.limits();
        let (rate, buckets) = broker.rate_limits();
        let mut uids: Vec<u32> = buckets.iter().map(|b| b.uid).collect();
        uids.extend(usage.iter().filter_map(|(b, ..)| match b {
            Bucket::Uid(uid) => Some(*uid),
            Bucket::Unmatched => None,
        }));
        uids.sort_unstable();
        uids.dedup();
        let callers = uids
            .into_iter()
            .map(|uid| {
                let bucket = buckets.iter().find(|b| b.uid == uid);
                let (connections, calls) = usage
                    .iter()
                    .find(|(b, ..)| *b == Bucket::Uid(uid))
                    .map_or((0, 0), |(_, c, k)| (*c, *k));
                pb::CallerStatus {
                    uid,
                    user: peer::user_name(uid).unwrap_or_default(),
                    tokens: bucket.map_or(f64::from(rate.burst), |b| b.tokens),
                    burst: rate.burst,
                    per_minute: rate.per_minute,
                    rejected: bucket.map_or(0, |b| b.rejected),
                    connections: u32::try_from(connections).unwrap_or(u32::MAX),
                    calls_in_flight: u32::try_from(calls).unwrap_or(u32::MAX),
                }
            })
            .collect();
        let count = |want: fn(&Bucket) -> bool| -> u32 {
            let n: usize = usage
                .iter()
                .filter(|(b, ..)| want(b))
                .map(|(_, c, _)| c)
                .sum();
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        let connections = pb::Connections {
            open: count(|b| matches!(b, Bucket::Uid(_))),
            max: u32::try_from(limits.max_connections).unwrap_or(u32::MAX),
            per_uid: u32::try_from(limits.per_uid_connections).unwrap_or(u32::MAX),
            unmatched_open: count(|b| matches!(b, Bucket::Unmatched)),
            unmatched_max: u32::try_from(limits.unmatched_connections).unwrap_or(u32::MAX),
        };
        let mut entries = broker.cache().entries();
        entries.sort_unstable_by(|a, b| (&a.client, &a.scopes).cmp(&(&b.client, &b.scopes)));
        let first = pb::StatusResponse {
            daemon: Some(daemon),
            clients,
            callers,
            connections: Some(connections),
            entries: Vec::new(),
            fetches_in_flight: broker.cache().fetches_in_flight() as u64,
            cache_entries: entries.len() as u64,
            cache_bytes: broker.cache().bytes() as u64,
        };
        Ok(Response::new(tokio_stream::iter(
            std::iter::once(Ok(first)).chain(Pages {
                entries: entries.into_iter(),
                clock,
            }),
        )))
    }
}

/// The status stream: the first message, then the cache entries in pages of about [`STATUS_PAGE_BYTES`].
pub type StatusPages = tokio_stream::Iter<
    std::iter::Chain<std::iter::Once<Result<pb::StatusResponse, Status>>, Pages>,
>;

/// The cache entries, converted a page at a time as the stream is read.
pub struct Pages {
    entries: std::vec::IntoIter<EntryStatus>,
    clock: Clock,
}

impl Iterator for Pages {
    type Item = Result<pb::StatusResponse, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut page = Vec::new();
        let mut bytes = 0;
        for e in self.entries.by_ref() {
            let entry = self.clock.entry(e);
            bytes += entry.encoded_len() + 8;
            page.push(entry);
            if bytes >= STATUS_PAGE_BYTES {
                break;
            }
        }
        (!page.is_empty()).then(|| {
            Ok(pb::StatusResponse {
                entries: page,
                ..pb::StatusResponse::default()
            })
        })
    }
}

/// A moment in both clocks, to show monotonic instants as wall-clock times.
#[derive(Clone, Copy)]
struct Clock {
    at: Instant,
    wall: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    fn wall(&self, t: Instant) -> Option<prost_types::Timestamp> {
        let wall = if t >= self.at {
            self.wall.checked_add(t - self.at)
        } else {
            self.wall.checked_sub(self.at - t)
        };
        wall.map(Into::into)
    }

    fn entry(&self, e: EntryStatus) -> pb::CacheEntry {
        let token = e.token.as_ref();
        pb::CacheEntry {
            client: e.client.to_string(),
            scopes: e.scopes.to_vec(),
            fingerprint: token.map(|t| t.fingerprint.to_string()).unwrap_or_default(),
            expires_at: token.and_then(|t| self.wall(t.expires_at)),
            renews_at: token.and_then(|t| self.wall(t.renews_at)),
            hits: e.hits,
            last_used: self.wall(e.last_used),
            fetching: e.fetching,
            refused: e.refused.unwrap_or_default(),
            granted: token
                .filter(|t| t.granted != e.scopes)
                .map(|t| t.granted.to_vec())
                .unwrap_or_default(),
        }
    }
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

/// Explains a request for a described caller or a live process: the daemon's own policy code decides.
fn explain(broker: &Broker, r: pb::ExplainRequest) -> Result<pb::ExplainResponse, Status> {
    use pb::explain_request::Who;
    if r.client.len() > MAX_CLIENT_NAME {
        return Err(invalid(format!(
            "client name is longer than {MAX_CLIENT_NAME} bytes"
        )));
    }
    let scopes = if r.scopes.is_empty() {
        ScopeSet::default()
    } else {
        ScopeSet::parse(&r.scopes).map_err(|e| invalid(e.to_string()))?
    };
    let proc_root = broker.proc_root();
    let (caller, mut notes) = match r.who.clone() {
        None => return Err(invalid("name the caller: a uid, a user or a pid")),
        Some(Who::Pid(pid)) => {
            if !r.groups.is_empty() || !r.exe.is_empty() || !r.unit.is_empty() {
                return Err(invalid(
                    "a pid comes with its own groups, executable and unit: give no others",
                ));
            }
            let caller = PeerCred::of_process(pid, &proc_root)
                .and_then(|cred| cred.identify(&proc_root, cred.settle_exe(&proc_root, None)))
                .map_err(|e| invalid(format!("cannot identify pid {pid}: {e}")))?;
            let mut notes = Vec::new();
            if caller.exe_id.is_none() {
                notes.push(format!(
                    "the daemon cannot read the executable of pid {pid} (it needs CAP_SYS_PTRACE for \
                     another user's process): exe policies do not match it, as on a real call"
                ));
            }
            (caller, notes)
        }
        Some(Who::Uid(uid)) => described(uid, &r)?,
        Some(Who::User(name)) => {
            let uid =
                sys::user_id(&name).ok_or_else(|| invalid(format!("no user named {name:?}")))?;
            described(uid, &r)?
        }
    };
    let e = broker
        .explain(&caller, &r.client, &scopes)
        .map_err(|refusal| invalid(refusal.to_string()))?;
    let (decided, allowed, refused_scope, reason, allowed_by) = match &e.decision {
        None => (false, false, String::new(), String::new(), Vec::new()),
        Some(Ok(a)) => (true, true, String::new(), String::new(), a.policies.clone()),
        Some(Err(refusal)) => {
            let scope = match refusal {
                crate::policy::Refusal::ScopeNotAllowed { scope, .. } => scope.clone(),
                _ => String::new(),
            };
            (true, false, scope, refusal.to_string(), Vec::new())
        }
    };
    if !decided && e.matching.is_empty() {
        notes.push("no policy matches this caller: every request would be denied".to_owned());
    }
    Ok(pb::ExplainResponse {
        caller: Some(pb::Caller {
            uid: caller.uid,
            user: caller.user.clone().unwrap_or_default(),
            gid: caller.gid,
            groups: caller.groups.clone(),
            pid: caller.pid,
            exe: caller
                .exe
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            unit: caller.unit.clone().unwrap_or_default(),
        }),
        notes,
        matching: e
            .matching
            .iter()
            .map(|p| pb::PolicyGrant {
                policy: p.name.clone(),
                clients: p.clients.clone(),
                scopes: p.scopes.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        decided,
        allowed,
        client: e.client.unwrap_or_default(),
        refused_scope,
        reason,
        allowed_by,
        near_misses: e
            .near_misses
            .into_iter()
            .map(|m| pb::NearMiss {
                policy: m.policy,
                key: m.key,
                detail: m.detail,
            })
            .collect(),
    })
}

/// A described caller: user `uid`, with the groups given (names or gids, the primary first) or else the
/// user's groups from the group database, and the executable and unit given.
fn described(uid: u32, r: &pb::ExplainRequest) -> Result<(Caller, Vec<String>), Status> {
    let gids = if r.groups.is_empty() {
        let gid = sys::user_gid(uid).ok_or_else(|| {
            invalid(format!(
                "uid {uid} has no user entry, so no groups are known: give them with --group"
            ))
        })?;
        let name = sys::user_name(uid).unwrap_or_default();
        sys::user_groups(&name, gid)
    } else {
        r.groups
            .iter()
            .map(|g| {
                g.parse::<u32>()
                    .ok()
                    .or_else(|| sys::group_id(g))
                    .ok_or_else(|| invalid(format!("no group named {g:?}")))
            })
            .collect::<Result<Vec<u32>, Status>>()?
    };
    let exe = match r.exe.as_str() {
        "" => None,
        path if path.starts_with('/') => Some(PathBuf::from(path)),
        path => {
            return Err(invalid(format!(
                "exe must be an absolute path, not {path:?}"
            )));
        }
    };
    let unit = (!r.unit.is_empty()).then(|| r.unit.clone());
    Ok(Caller::described(uid, gids, exe, unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::cache::{Fingerprint, TokenStatus};
    use std::time::Duration;

    /// 10,000 entries with the largest scope sets, as many granted scopes again: every page stays within
    /// its bound, far below gRPC's default 4 MiB message limit.
    #[test]
    fn status_pages_fit_the_message_limit_whatever_the_number_of_entries() {
        let clock = Clock::now();
        let scopes: Vec<String> = (0..crate::policy::scope::MAX_SCOPES)
            .map(|i| {
                format!(
                    "{i:03}{}",
                    "s".repeat(crate::policy::scope::MAX_SCOPE_LEN - 3)
                )
            })
            .collect();
        let granted: Vec<String> = scopes.iter().map(|s| s.replace('s', "g")).collect();
        let (scopes, granted) = (
            ScopeSet::parse(&scopes).unwrap(),
            ScopeSet::parse(&granted).unwrap(),
        );
        let entries: Vec<EntryStatus> = (0..10_000)
            .map(|i| EntryStatus {
                client: Arc::from(format!("client-{i}")),
                scopes: scopes.clone(),
                token: Some(TokenStatus {
                    fingerprint: Fingerprint::of("t"),
                    granted: granted.clone(),
                    expires_at: clock.at + Duration::from_secs(3600),
                    renews_at: clock.at + Duration::from_secs(2400),
                }),
                hits: 1,
                last_used: clock.at,
                fetching: false,
                refused: Some("x".repeat(400)),
            })
            .collect();
        let pages: Vec<pb::StatusResponse> = Pages {
            entries: entries.into_iter(),
            clock,
        }
        .map(Result::unwrap)
        .collect();
        assert_eq!(pages.iter().map(|p| p.entries.len()).sum::<usize>(), 10_000);
        let largest = pages.iter().map(Message::encoded_len).max().unwrap();
        assert!(largest < STATUS_PAGE_BYTES + 64 * 1024, "{largest}");
        assert!(largest < 4 << 20);
    }
}
