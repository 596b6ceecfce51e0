//! The configuration file: TOML, `version = 1`, validated into [`Config`].
//!
//! Every problem is reported with its key path (`clients.idp.timeout: …`), all at once, so an operator fixes a
//! config in one pass. That is why the TOML is walked by hand rather than deserialized with serde, which stops
//! at the first error. Unknown keys are errors, and so is a literal secret. Secrets are read while validating,
//! so an unreadable or world-readable secret file is a config error too.
//!
//! Error messages quote config values, except secrets; a TOML syntax error names its line and column but does
//! not quote the line, which could hold a secret someone pasted by mistake.

pub mod keys;
mod render;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use toml::Value;

use crate::policy::scope::ScopePattern;
use crate::policy::target::Target;
use crate::policy::{Matcher, Policy, PolicySet};
use crate::secret::{FileKind, Rotating, Secret, SecretEnv, SecretSource};
use crate::sys;
use crate::tokens::assertion::Assertion;
use crate::tokens::client::{
    AssertionAudience, BasicEncoding, ClientAuth, ClientConfig, Secrets, TlsRoots, endpoint_url,
};
use crate::tokens::jwt::{self, Alg, Certificate, PrivateKey};
use crate::tokens::ratelimit::Rate;

/// The default config file.
pub const DEFAULT_PATH: &str = "/etc/credbroker/credbroker.toml";
/// The default socket.
pub const DEFAULT_SOCKET: &str = "/run/credbroker/credbroker.sock";

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[clients.NAME]`, by name.
    pub clients: BTreeMap<String, Arc<ClientConfig>>,
    /// `[[policy]]`, in file order.
    pub policies: PolicySet,
    /// The file it came from, when, and a digest of its bytes (`None` for text parsed directly).
    pub origin: Option<Origin>,
}

/// Where a config came from, for `credbroker status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub path: PathBuf,
    /// When it was read.
    pub loaded_at: std::time::SystemTime,
    /// SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// Socket path (ignored when systemd passes a socket).
    pub socket: PathBuf,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Group that owns the socket: name and gid.
    pub socket_group: Option<(String, u32)>,
    /// Users who may use administrative calls.
    pub admins: Vec<String>,
    /// The least lifetime a handed-out token has left when a request says `min_ttl_seconds = 0`; never more
    /// than half of a token's lifetime is required.
    pub default_min_ttl: Duration,
    /// Each caller uid's rate of requests that need a new token from the IdP.
    pub rate_limit: Rate,
    /// Most (client, scope set) entries cached.
    pub max_cached_tokens: usize,
    /// Most bytes the cache's entries may take, as estimated per entry.
    pub max_cache_bytes: usize,
    /// Most connections one uid may hold at once.
    pub max_connections_per_uid: usize,
    /// How long a connection may stay open with no call in flight.
    pub idle_timeout: Duration,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where the Prometheus metrics endpoint listens, if anywhere (off by default).
    pub metrics: Option<std::net::SocketAddr>,
    /// `allow_remote_metrics`: `metrics` may be a non-loopback address.
    pub allow_remote_metrics: bool,
    /// Retries allowed per first attempt to an IdP (a fraction).
    pub retry_budget: f64,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text (the default).
    Text,
    /// One JSON object per line.
    Json,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path, e.g. `clients.idp.timeout` or `policy[2].match`; empty for the whole file.
    pub key: String,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file, if it came from one.
    pub path: Option<PathBuf>,
    /// The problems, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        match &self.path {
            Some(p) => write!(
                f,
                "{}: {n} error{}",
                p.display(),
                if n == 1 { "" } else { "s" }
            )?,
            None => write!(f, "config: {n} error{}", if n == 1 { "" } else { "s" })?,
        }
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file, loading its secrets.
    ///
    /// # Errors
    /// Every problem found, with key paths.
    pub fn load(path: &Path, env: &SecretEnv<'_>) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            path: Some(path.to_owned()),
            errors: vec![ConfigError {
                key: String::new(),
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        let mut config = Self::parse(&text, env).map_err(|mut e| {
            e.path = Some(path.to_owned());
            e
        })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        config.origin = Some(Origin {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            loaded_at: std::time::SystemTime::now(),
            sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        });
        Ok(config)
    }

    /// Validates config text, loading its secrets.
    ///
    /// # Errors
    /// Every problem found, with key paths.
    pub fn parse(text: &str, env: &SecretEnv<'_>) -> Result<Self, ConfigErrors> {
        let mut errs = Errors::default();
        let root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                let at = e
                    .span()
                    .map(|s| line_col(text, s.start))
                    .unwrap_or_default();
                errs.push("", format!("invalid TOML{at}: {}", e.message().trim()));
                return Err(errs.into_result());
            }
        };
        let mut t = Walk::new("", &root);
        match t.get("version") {
            None => errs.push("version", "missing; this file format needs `version = 1`"),
            Some(Value::Integer(1)) => {}
            Some(v) => errs.push(
                "version",
                format!("unsupported version {v} (this credbrokerd reads 1)"),
            ),
        }
        let daemon = match t.get("daemon") {
            None => Some(DaemonConfig::defaults()),
            Some(v) => as_table(&mut errs, "daemon", v).map(|d| daemon_config(&mut errs, d)),
        };
        let mut clients = BTreeMap::new();
        match t.get("clients") {
            None => errs.push(
                "clients",
                "no clients configured; add a [clients.NAME] table",
            ),
            Some(v) => {
                if let Some(table) = as_table(&mut errs, "clients", v) {
                    if table.is_empty() {
                        errs.push(
                            "clients",
                            "no clients configured; add a [clients.NAME] table",
                        );
                    }
                    for (name, v) in table {
                        let key = format!("clients.{name}");
                        if !is_name(name) {
                            errs.push(
                                &key,
                                "client names use letters, digits, '-', '_' and '.' (at most 64)",
                            );
                            continue;
                        }
                        if let Some(ct) = as_table(&mut errs, &key, v)
                            && let Some(c) = client_config(&mut errs, &key, name, ct, env)
                        {
                            clients.insert(name.clone(), Arc::new(c));
                        }
                    }
                }
            }
        }
        let known_clients: HashSet<&str> = match root.get("clients") {
            Some(Value::Table(t)) => t.keys().map(String::as_str).collect(),
            _ => HashSet::new(),
        };
        // Clients whose tokens are bound to a DPoP key: policies granting them must say for which APIs.
        let dpop_clients: HashSet<&str> = match root.get("clients") {
            Some(Value::Table(t)) => t
                .iter()
                .filter(|(_, c)| c.get("dpop") == Some(&Value::Boolean(true)))
                .map(|(name, _)| name.as_str())
                .collect(),
            _ => HashSet::new(),
        };
        let mut policies = Vec::new();
        match t.get("policy") {
            None => {}
            Some(Value::Array(list)) => {
                let mut names = HashSet::new();
                for (i, v) in list.iter().enumerate() {
                    let key = format!("policy[{i}]");
                    let Some(pt) = as_table(&mut errs, &key, v) else {
                        continue;
                    };
                    // Every duplicate is reported, whatever else is wrong with its policy.
                    if let Some(Value::String(name)) = pt.get("name")
                        && !names.insert(name.clone())
                    {
                        errs.push(
                            format!("{key}.name"),
                            format!("duplicate policy name {name:?}"),
                        );
                    }
                    if let Some(p) = policy(&mut errs, &key, pt, &known_clients, &dpop_clients) {
                        policies.push(p);
                    }
                }
            }
            Some(_) => errs.push("policy", "expected [[policy]] tables"),
        }
        t.finish(&mut errs);
        if !errs.0.is_empty() {
            return Err(errs.into_result());
        }
        Ok(Self {
            daemon: daemon.unwrap_or_else(DaemonConfig::defaults),
            clients,
            policies: PolicySet::new(policies),
            origin: None,
        })
    }

    /// What is valid but probably not meant: policies that name users or groups that do not exist (yet), so
    /// they match nobody through that key. `check-config` prints these; the daemon logs them at start.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut warnings = Vec::new();
        for (i, p) in self.policies.policies().iter().enumerate() {
            let m = &p.matcher;
            for user in m.user.iter().flatten() {
                if sys::user_id(user).is_none() {
                    warnings.push(ConfigError {
                        key: format!("policy[{i}].match.user"),
                        message: format!(
                            "no user named {user:?}; policy {:?} matches no such caller",
                            p.name
                        ),
                    });
                }
            }
            for group in m.group.iter().flatten() {
                if sys::group_id(group).is_none() {
                    warnings.push(ConfigError {
                        key: format!("policy[{i}].match.group"),
                        message: format!(
                            "no group named {group:?}; policy {:?} matches no such caller",
                            p.name
                        ),
                    });
                }
            }
        }
        warnings
    }
}

impl DaemonConfig {
    fn defaults() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o666,
            socket_group: None,
            admins: vec!["root".to_owned()],
            default_min_ttl: Duration::from_secs(60),
            rate_limit: Rate::default(),
            max_cached_tokens: 10_000,
            max_cache_bytes: 64 << 20,
            max_connections_per_uid: crate::serve::limits::PER_UID_CONNECTIONS,
            idle_timeout: crate::serve::limits::IDLE_TIMEOUT,
            metrics: None,
            allow_remote_metrics: false,
            retry_budget: crate::tokens::retry::RETRY_RATIO,
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }

    fn into_result(self) -> ConfigErrors {
        ConfigErrors {
            path: None,
            errors: self.0,
        }
    }
}

/// A table being read: remembers which keys were used so the rest can be reported as unknown.
struct Walk<'t> {
    prefix: String,
    table: &'t toml::Table,
    used: HashSet<&'t str>,
}

impl<'t> Walk<'t> {
    fn new(prefix: &str, table: &'t toml::Table) -> Self {
        Self {
            prefix: prefix.to_owned(),
            table,
            used: HashSet::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&mut self, key: &'t str) -> Option<&'t Value> {
        #[cfg(test)]
        keys::record(&self.prefix, key);
        let (k, v) = self.table.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(v)
    }

    /// A boolean key: `default` when absent; an error (and `default`) when not a boolean.
    fn flag(&mut self, errs: &mut Errors, key: &'t str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                errs.push(
                    self.key(key),
                    format!("expected true or false, found {}", type_name(other)),
                );
                default
            }
        }
    }

    /// A key that must be present: reports `message` at its path when it is not.
    fn required(&mut self, errs: &mut Errors, key: &'t str, message: &str) -> Option<&'t Value> {
        let v = self.get(key);
        if v.is_none() {
            errs.push(self.key(key), message);
        }
        v
    }

    /// An optional key holding one value or a list of them, each read by `item`.
    fn list<T>(
        &mut self,
        errs: &mut Errors,
        key: &'t str,
        item: impl Fn(&mut Errors, &str, &Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let v = self.get(key)?;
        one_or_list(errs, &self.key(key), v, item)
    }

    fn finish(self, errs: &mut Errors) {
        for k in self.table.keys() {
            if !self.used.contains(k.as_str()) {
                errs.push(self.key(k), "unknown key");
            }
        }
    }
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" at line {line}, column {col}")
}

fn type_name(v: &Value) -> &'static str {
    v.type_str()
}

fn as_table<'v>(errs: &mut Errors, key: &str, v: &'v Value) -> Option<&'v toml::Table> {
    match v {
        Value::Table(t) => Some(t),
        other => {
            errs.push(key, format!("expected a table, found {}", type_name(other)));
            None
        }
    }
}

fn string(errs: &mut Errors, key: &str, v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.is_empty() => {
            errs.push(key, "must not be empty");
            None
        }
        Value::String(s) => Some(s.clone()),
        other => {
            errs.push(
                key,
                format!("expected a string, found {}", type_name(other)),
            );
            None
        }
    }
}

/// One value or a non-empty list of them.
fn one_or_list<T>(
    errs: &mut Errors,
    key: &str,
    v: &Value,
    item: impl Fn(&mut Errors, &str, &Value) -> Option<T>,
) -> Option<Vec<T>> {
    match v {
        Value::Array(list) if list.is_empty() => {
            errs.push(key, "empty list");
            None
        }
        Value::Array(list) => {
            let before = errs.0.len();
            let items: Vec<T> = list
                .iter()
                .enumerate()
                .filter_map(|(i, v)| item(errs, &format!("{key}[{i}]"), v))
                .collect();
            (errs.0.len() == before).then_some(items)
        }
        one => item(errs, key, one).map(|x| vec![x]),
    }
}

fn id(errs: &mut Errors, key: &str, v: &Value) -> Option<u32> {
    match v {
        Value::Integer(i) => match u32::try_from(*i) {
            Ok(id) => Some(id),
            Err(_) => {
                errs.push(key, format!("{i} is not a valid id (0 to 4294967295)"));
                None
            }
        },
        other => {
            errs.push(
                key,
                format!("expected an integer id, found {}", type_name(other)),
            );
            None
        }
    }
}

/// `"90"`, `"90s"`, `"5m"`, `"1h 30m"`, or an integer number of seconds.
fn duration(errs: &mut Errors, key: &str, v: &Value) -> Option<Duration> {
    let parsed = match v {
        Value::Integer(i) => u64::try_from(*i)
            .map(Duration::from_secs)
            .map_err(|_| "negative".to_owned()),
        Value::String(s) => parse_duration(s),
        other => Err(format!(
            "expected a duration such as \"90s\" or \"5m\", found {}",
            type_name(other)
        )),
    };
    match parsed {
        Ok(d) if d.is_zero() => {
            errs.push(key, "must be longer than zero");
            None
        }
        Ok(d) if d > Duration::from_secs(7 * 24 * 3600) => {
            errs.push(key, "must be at most 7 days");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(key, e);
            None
        }
    }
}

/// Parses `"90"` (seconds), `"90s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"90s\" or \"5m\": {e}"))
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn daemon_config(errs: &mut Errors, table: &toml::Table) -> DaemonConfig {
    let mut t = Walk::new("daemon", table);
    let mut d = DaemonConfig::defaults();
    if let Some(v) = t.get("socket") {
        let key = t.key("socket");
        if let Some(s) = string(errs, &key, v) {
            if s.starts_with('/') {
                d.socket = PathBuf::from(s);
            } else {
                errs.push(key, "must be an absolute path");
            }
        }
    }
    if let Some(v) = t.get("socket_mode") {
        let key = t.key("socket_mode");
        let mode = match v {
            Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
            Value::Integer(i) => u32::try_from(*i).ok(),
            _ => None,
        };
        match mode {
            Some(m) if m <= 0o777 => d.socket_mode = m,
            _ => errs.push(key, "expected octal permission bits such as \"0660\""),
        }
    }
    if let Some(v) = t.get("socket_group") {
        let key = t.key("socket_group");
        if let Some(name) = string(errs, &key, v) {
            match sys::group_id(&name) {
                Some(gid) => d.socket_group = Some((name, gid)),
                None => errs.push(key, format!("no group named {name:?}")),
            }
        }
    }
    if let Some(list) = t.list(errs, "admins", string) {
        d.admins = list;
    }
    if let Some(v) = t.get("default_min_ttl")
        && let Some(ttl) = duration(errs, &t.key("default_min_ttl"), v)
    {
        d.default_min_ttl = ttl;
    }
    if let Some(v) = t.get("rate_limit") {
        let key = t.key("rate_limit");
        if let Some(table) = as_table(errs, &key, v) {
            let mut r = Walk::new(&key, table);
            for (name, slot) in [
                ("per_minute", &mut d.rate_limit.per_minute),
                ("burst", &mut d.rate_limit.burst),
            ] {
                if let Some(v) = r.get(name) {
                    match positive(v, 1_000_000) {
                        Some(n) => *slot = n,
                        None => errs.push(r.key(name), "expected a whole number from 1 to 1000000"),
                    }
                }
            }
            r.finish(errs);
        }
    }
    match t.get("log_format") {
        None => {}
        Some(Value::String(s)) if s == "text" => d.log_format = LogFormat::Text,
        Some(Value::String(s)) if s == "json" => d.log_format = LogFormat::Json,
        Some(_) => errs.push(t.key("log_format"), "expected \"text\" or \"json\""),
    }
    if let Some(v) = t.get("max_cached_tokens") {
        match positive(v, 10_000_000) {
            Some(n) => d.max_cached_tokens = n as usize,
            None => errs.push(
                t.key("max_cached_tokens"),
                "expected a whole number from 1 to 10000000",
            ),
        }
    }
    if let Some(v) = t.get("max_cache_bytes") {
        match v {
            Value::Integer(i) if (1 << 20..=1 << 40).contains(i) => {
                d.max_cache_bytes = usize::try_from(*i).unwrap_or(usize::MAX);
            }
            _ => errs.push(
                t.key("max_cache_bytes"),
                "expected a number of bytes from 1048576 (1 MiB) to 1099511627776 (1 TiB)",
            ),
        }
    }
    if let Some(v) = t.get("max_connections_per_uid") {
        match positive(v, 1_000_000) {
            Some(n) => d.max_connections_per_uid = n as usize,
            None => errs.push(
                t.key("max_connections_per_uid"),
                "expected a whole number from 1 to 1000000",
            ),
        }
    }
    if let Some(v) = t.get("idle_timeout")
        && let Some(idle) = duration(errs, &t.key("idle_timeout"), v)
    {
        d.idle_timeout = idle;
    }
    if let Some(v) = t.get("retry_budget") {
        match v {
            Value::Float(f) if (0.0..=1.0).contains(f) => d.retry_budget = *f,
            Value::Integer(0) => d.retry_budget = 0.0,
            Value::Integer(1) => d.retry_budget = 1.0,
            _ => errs.push(
                t.key("retry_budget"),
                "expected a fraction from 0 to 1, such as 0.1 (one retry per ten first attempts)",
            ),
        }
    }
    let allow_remote = t.flag(errs, "allow_remote_metrics", false);
    d.allow_remote_metrics = allow_remote;
    if let Some(v) = t.get("metrics") {
        let key = t.key("metrics");
        if let Some(s) = string(errs, &key, v) {
            match s.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() || allow_remote => d.metrics = Some(addr),
                Ok(addr) => errs.push(
                    key,
                    format!(
                        "{addr} is not a loopback address: the metrics name your clients and show their IdPs' \
                         health to whoever can reach the port; use 127.0.0.1 or [::1], or set \
                         allow_remote_metrics = true"
                    ),
                ),
                Err(_) => errs.push(
                    key,
                    format!("{s:?} is not an address and port such as \"127.0.0.1:9464\""),
                ),
            }
        }
    }
    t.finish(errs);
    d
}

/// An integer in `1..=max`.
fn positive(v: &Value, max: u32) -> Option<u32> {
    match v {
        Value::Integer(i) => u32::try_from(*i).ok().filter(|n| (1..=max).contains(n)),
        _ => None,
    }
}

fn client_config(
    errs: &mut Errors,
    prefix: &str,
    name: &str,
    table: &toml::Table,
    env: &SecretEnv<'_>,
) -> Option<ClientConfig> {
    let before = errs.0.len();
    let mut t = Walk::new(prefix, table);

    let allow_http = t.flag(errs, "allow_http", false);
    let url_key = |errs: &mut Errors, key: &'static str, t: &mut Walk<'_>| {
        let v = t.get(key)?;
        string(errs, &t.key(key), v).and_then(|s| {
            endpoint_url(&s, allow_http)
                .map_err(|e| errs.push(t.key(key), e))
                .ok()
        })
    };
    let token_url = url_key(errs, "token_url", &mut t);
    let issuer = url_key(errs, "issuer", &mut t);
    if !t.used.contains("token_url") && !t.used.contains("issuer") {
        errs.push(
            t.key("token_url"),
            "missing; the IdP's token endpoint (\"https://idp.example/oauth2/token\"), or set issuer for discovery",
        );
    }
    let client_id = t
        .required(errs, "client_id", "missing")
        .and_then(|v| string(errs, &t.key("client_id"), v));
    let method = match t.get("auth_method") {
        None => Some("client_secret_basic"),
        Some(Value::String(s))
            if [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                "client_assertion",
            ]
            .contains(&s.as_str()) =>
        {
            Some(s.as_str())
        }
        Some(_) => {
            errs.push(
                t.key("auth_method"),
                "expected \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\" or \"client_assertion\"",
            );
            None
        }
    };
    let jwt = method == Some("private_key_jwt");
    let federated = method == Some("client_assertion");
    let basic = method == Some("client_secret_basic");
    // Keys that belong to other methods are mistakes worth pointing out.
    for (key, wanted) in [
        ("client_secret", !jwt && !federated),
        ("client_assertion", federated),
        ("certificate", jwt),
        ("signing_alg", jwt),
        ("certificate_sha1", jwt),
        ("private_key", jwt),
        ("key_id", jwt),
        ("assertion_audience", jwt),
        ("basic_encoding", basic),
    ] {
        if !wanted && t.table.contains_key(key) {
            t.used.insert(key);
            errs.push(
                t.key(key),
                format!(
                    "does not apply to auth_method = \"{}\"",
                    method.unwrap_or("?")
                ),
            );
        }
    }
    let auth = match method {
        None => None,
        Some("private_key_jwt") => private_key_auth(errs, &mut t, issuer.is_some(), env),
        Some("client_assertion") => t
            .required(
                errs,
                "client_assertion",
                "missing; client_assertion needs client_assertion = { file = \"/run/NAME/token.jwt\" }",
            )
            .and_then(|v| {
                credential(errs, &t.key("client_assertion"), v, env, FileKind::Assertion, |jwt| {
                    let a = Assertion::parse(jwt)?;
                    a.usable(std::time::SystemTime::now())?;
                    Ok(a)
                })
            })
            .map(|assertion| ClientAuth::ClientAssertion { assertion }),
        Some(m) => {
            let secret = t
                .required(
                    errs,
                    "client_secret",
                    "missing; e.g. client_secret = { file = \"/etc/credbroker/NAME.secret\" }",
                )
                .and_then(|v| secrets(errs, &t.key("client_secret"), v, env));
            let encoding = match t.get("basic_encoding") {
                None => BasicEncoding::Form,
                Some(Value::String(s)) if s == "form" => BasicEncoding::Form,
                Some(Value::String(s)) if s == "raw" => BasicEncoding::Raw,
                Some(_) => {
                    errs.push(
                        t.key("basic_encoding"),
                        "expected \"form\" (RFC 6749 §2.3.1) or \"raw\"",
                    );
                    BasicEncoding::Form
                }
            };
            if encoding == BasicEncoding::Raw
                && client_id.as_ref().is_some_and(|id| id.contains(':'))
            {
                errs.push(
                    t.key("client_id"),
                    "contains ':', which raw Basic credentials cannot carry; use basic_encoding = \"form\"",
                );
            }
            secret.map(|secrets| {
                if m == "client_secret_post" {
                    ClientAuth::Post { secrets }
                } else {
                    ClientAuth::Basic { secrets, encoding }
                }
            })
        }
    };
    let mut extra_params = Vec::new();
    if let Some(v) = t.get("extra_params") {
        let key = t.key("extra_params");
        if let Some(table) = as_table(errs, &key, v) {
            for (k, v) in table {
                let pkey = format!("{key}.{k}");
                if RESERVED_PARAMS.contains(&k.as_str()) {
                    errs.push(pkey, "is set by credbroker itself and cannot be overridden");
                } else if let Some(s) = string(errs, &pkey, v) {
                    extra_params.push((k.clone(), s));
                }
            }
        }
    }
    let default_ttl = t
        .get("default_ttl")
        .map_or(Some(Duration::from_secs(300)), |v| {
            duration(errs, &t.key("default_ttl"), v)
        });
    let timeout = t.get("timeout").map_or(Some(Duration::from_secs(10)), |v| {
        duration(errs, &t.key("timeout"), v)
    });
    let dpop = t.flag(errs, "dpop", false);
    let system_roots = t.flag(errs, "system_roots", true);
    let tls_roots = match t.get("ca_certificates") {
        Some(v) => credential(
            errs,
            &t.key("ca_certificates"),
            v,
            env,
            FileKind::Certificate,
            |pem| TlsRoots::parse(pem, true),
        )
        .and_then(|roots| roots.current().ok())
        .map(|roots| TlsRoots {
            system_roots,
            ..(*roots).clone()
        }),
        None if !system_roots => {
            errs.push(
                t.key("system_roots"),
                "false leaves no root to trust: give ca_certificates = { file = \"/etc/credbroker/NAME-ca.pem\" }",
            );
            None
        }
        None => None,
    };
    t.finish(errs);
    if errs.0.len() != before {
        return None;
    }
    Some(ClientConfig {
        name: name.to_owned(),
        token_url,
        issuer,
        allow_http,
        client_id: client_id?,
        auth: auth?,
        extra_params,
        default_ttl: default_ttl?,
        timeout: timeout?,
        tls_roots,
        dpop,
    })
}

fn private_key_auth(
    errs: &mut Errors,
    t: &mut Walk<'_>,
    has_issuer: bool,
    env: &SecretEnv<'_>,
) -> Option<ClientAuth> {
    let key = t
        .required(
            errs,
            "private_key",
            "missing; private_key_jwt needs private_key = { file = \"/etc/credbroker/NAME.pem\" }",
        )
        .and_then(|v| {
            credential(
                errs,
                &t.key("private_key"),
                v,
                env,
                FileKind::Secret,
                |pem| PrivateKey::new(pem).map_err(|e| e.to_string()),
            )
        });
    let key_id = t
        .get("key_id")
        .and_then(|v| string(errs, &t.key("key_id"), v));
    let audience = match t.get("assertion_audience") {
        None => Some(AssertionAudience::TokenEndpoint),
        Some(Value::String(s)) if s == "token_endpoint" => Some(AssertionAudience::TokenEndpoint),
        Some(Value::String(s)) if s == "issuer" => {
            if !has_issuer {
                errs.push(
                    t.key("assertion_audience"),
                    "\"issuer\" needs the client's issuer to be set",
                );
            }
            Some(AssertionAudience::Issuer)
        }
        Some(Value::String(s)) if Url::parse(s).is_ok() => {
            Some(AssertionAudience::Literal(s.clone()))
        }
        Some(_) => {
            errs.push(
                t.key("assertion_audience"),
                "expected \"token_endpoint\", \"issuer\" or an absolute URL",
            );
            None
        }
    };
    let certificate = t.get("certificate").and_then(|v| {
        credential(
            errs,
            &t.key("certificate"),
            v,
            env,
            FileKind::Certificate,
            Certificate::parse,
        )
    });
    let signing_alg = match t.get("signing_alg") {
        None => None,
        Some(Value::String(s)) if Alg::parse(s).is_some() => Alg::parse(s),
        Some(_) => {
            errs.push(
                t.key("signing_alg"),
                "expected \"ES256\" (EC keys), \"PS256\" or \"RS256\" (RSA keys)",
            );
            None
        }
    };
    let certificate_sha1 = t.flag(errs, "certificate_sha1", false);
    if certificate_sha1 && !t.used.contains("certificate") {
        errs.push(t.key("certificate_sha1"), "needs a certificate");
    }
    let key = key?;
    // The key, the algorithm and the certificate must go together: sign a trial assertion as a fetch would.
    if let Ok(k) = key.current() {
        let cert = certificate.as_ref().and_then(|c| c.current().ok());
        let alg = signing_alg.unwrap_or_else(|| k.default_alg(cert.is_some()));
        let trial = jwt::client_assertion(
            "check",
            "https://check.invalid/",
            &k,
            jwt::Signing {
                alg,
                key_id: None,
                certificate: cert.as_deref(),
                sha1_thumbprint: false,
            },
            std::time::SystemTime::now(),
        );
        match trial {
            Err(e @ jwt::KeyError::CertificateMismatch(_)) => {
                errs.push(t.key("certificate"), e.to_string())
            }
            Err(e @ jwt::KeyError::WrongAlg(_)) => errs.push(t.key("signing_alg"), e.to_string()),
            Err(e) => errs.push(t.key("private_key"), e.to_string()),
            Ok(_) => {}
        }
    }
    Some(ClientAuth::PrivateKeyJwt {
        key,
        key_id,
        audience: audience?,
        certificate,
        signing_alg,
        certificate_sha1,
    })
}

const RESERVED_PARAMS: [&str; 6] = [
    "grant_type",
    "scope",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
];

/// A credential source, loaded under the rules of `kind` and parsed with `parse`; read again when its file
/// changes.
fn credential<T>(
    errs: &mut Errors,
    key: &str,
    v: &Value,
    env: &SecretEnv<'_>,
    kind: FileKind,
    parse: fn(Secret) -> Result<T, String>,
) -> Option<Rotating<T>> {
    let source = secret_source(errs, key, v)?;
    Rotating::load(source, kind, env, parse)
        .map_err(|e| errs.push(key, e))
        .ok()
}

/// One secret source, or a list of them tried in order (`client_secret = [{ file = … }, { file = … }]`).
fn secrets(errs: &mut Errors, key: &str, v: &Value, env: &SecretEnv<'_>) -> Option<Secrets> {
    let keep = |s: Secret| -> Result<Secret, String> { Ok(s) };
    match v {
        Value::Array(list) if list.is_empty() => {
            errs.push(key, "an empty list; give at least one source");
            None
        }
        Value::Array(list) => {
            let loaded: Vec<Option<Rotating<Secret>>> = list
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    credential(errs, &format!("{key}[{i}]"), v, env, FileKind::Secret, keep)
                })
                .collect();
            loaded
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .map(Secrets::new)
        }
        v => credential(errs, key, v, env, FileKind::Secret, keep).map(|s| Secrets::new(vec![s])),
    }
}

fn secret_source(errs: &mut Errors, key: &str, v: &Value) -> Option<SecretSource> {
    #[cfg(test)]
    for source in ["file", "credential", "env"] {
        keys::record(key, source);
    }
    let table = match v {
        Value::Table(t) => t,
        // Never echo the value: it may be the secret itself.
        Value::String(_) => {
            errs.push(
                key,
                "a secret must not be written in the config file; use { file = \"/path\" }, \
                 { credential = \"NAME\" } (systemd LoadCredential=) or { env = \"VAR\" }",
            );
            return None;
        }
        other => {
            errs.push(
                key,
                format!(
                    "expected {{ file = … }}, {{ credential = … }} or {{ env = … }}, found {}",
                    type_name(other)
                ),
            );
            return None;
        }
    };
    if table.len() != 1 {
        errs.push(key, "give exactly one of file, credential or env");
        return None;
    }
    let (kind, v) = table.iter().next()?;
    let skey = format!("{key}.{kind}");
    let value = string(errs, &skey, v)?;
    let source = match kind.as_str() {
        "file" if value.starts_with('/') => SecretSource::File(PathBuf::from(value)),
        "file" => {
            errs.push(skey, "must be an absolute path");
            return None;
        }
        "credential" if is_name(&value) => SecretSource::Credential(value),
        "credential" => {
            errs.push(
                skey,
                "a credential name uses letters, digits, '-', '_' and '.'",
            );
            return None;
        }
        "env" => SecretSource::Env(value),
        _ => {
            errs.push(skey, "unknown key; use file, credential or env");
            return None;
        }
    };
    Some(source)
}

fn policy(
    errs: &mut Errors,
    prefix: &str,
    table: &toml::Table,
    clients: &HashSet<&str>,
    dpop_clients: &HashSet<&str>,
) -> Option<Policy> {
    let before = errs.0.len();
    let mut t = Walk::new(prefix, table);
    let name = t
        .required(
            errs,
            "name",
            "missing; every policy needs a name for the audit log",
        )
        .and_then(|v| string(errs, &t.key("name"), v));
    let matcher = t
        .required(
            errs,
            "match",
            "missing; say which callers this policy is for (or { any = true })",
        )
        .and_then(|v| {
            as_table(errs, &t.key("match"), v).and_then(|m| matcher(errs, &t.key("match"), m))
        });
    let client_list = t
        .required(
            errs,
            "client",
            "missing; name the client (or clients) this policy grants",
        )
        .and_then(|v| one_or_list(errs, &t.key("client"), v, string));
    if let Some(list) = &client_list {
        for (i, c) in list.iter().enumerate() {
            if !clients.contains(c.as_str()) {
                let key = if list.len() == 1 {
                    t.key("client")
                } else {
                    format!("{}[{i}]", t.key("client"))
                };
                errs.push(key, format!("no client named {c:?} in [clients]"));
            }
        }
    }
    let scopes = t
        .required(
            errs,
            "scopes",
            "missing; list the scopes this policy allows",
        )
        .and_then(|v| {
            one_or_list(errs, &t.key("scopes"), v, |errs, key, v| {
                let s = string(errs, key, v)?;
                let p = ScopePattern::parse(&s);
                if p.is_none() {
                    errs.push(
                        key,
                        format!(
                            "{s:?} is not a scope (RFC 6749 scope-token), optionally ending in '*'"
                        ),
                    );
                }
                p
            })
        });
    let dpop_targets = match t.get("dpop_targets") {
        None => Some(Vec::new()),
        Some(v) => one_or_list(errs, &t.key("dpop_targets"), v, |errs, key, v| {
            let s = string(errs, key, v)?;
            Target::parse(&s).map_err(|e| errs.push(key, e)).ok()
        }),
    };
    if let (Some(list), Some(targets)) = (&client_list, &dpop_targets)
        && targets.is_empty()
        && let Some(bound) = list.iter().find(|c| dpop_clients.contains(c.as_str()))
    {
        errs.push(
            t.key("dpop_targets"),
            format!(
                "missing; client {bound:?} has dpop = true, so its callers need proofs: list the API URL \
                 prefixes they may get them for, e.g. dpop_targets = [\"https://api.example.com/v1/\"]"
            ),
        );
    }
    t.finish(errs);
    if errs.0.len() != before {
        return None;
    }
    Some(Policy {
        name: name?,
        matcher: matcher?,
        clients: client_list?,
        scopes: scopes?,
        dpop_targets: dpop_targets?,
    })
}

fn matcher(errs: &mut Errors, prefix: &str, table: &toml::Table) -> Option<Matcher> {
    if table.is_empty() {
        errs.push(
            prefix,
            "an empty match would match every caller; write { any = true } if you mean that",
        );
        return None;
    }
    let before = errs.0.len();
    let mut t = Walk::new(prefix, table);
    let mut m = Matcher::default();
    match t.get("any") {
        None => {}
        Some(Value::Boolean(true)) if table.len() == 1 => m.any = true,
        Some(Value::Boolean(true)) => errs.push(
            t.key("any"),
            "any = true matches every caller; remove the other keys",
        ),
        Some(_) => errs.push(t.key("any"), "only `any = true` is meaningful"),
    }
    let any_user = match t.get("any_user") {
        None => false,
        Some(Value::Boolean(true)) => true,
        Some(_) => {
            errs.push(t.key("any_user"), "only `any_user = true` is meaningful");
            false
        }
    };
    m.uid = t.list(errs, "uid", id);
    m.gid = t.list(errs, "gid", id);
    m.user = t.list(errs, "user", string);
    m.group = t.list(errs, "group", string);
    m.unit = t.list(errs, "unit", string);
    m.exe = t.list(errs, "exe", |errs, key, v| {
        let s = string(errs, key, v)?;
        if s.starts_with('/') {
            Some(PathBuf::from(s))
        } else {
            errs.push(key, format!("{s:?} is not an absolute path"));
            None
        }
    });
    let names_users = m.names_users();
    let names_programs = m.exe.is_some() || m.unit.is_some();
    if any_user && names_users {
        errs.push(
            t.key("any_user"),
            "any_user = true says the policy is for every user; remove uid/user/gid/group, or any_user",
        );
    } else if any_user && !names_programs {
        errs.push(
            t.key("any_user"),
            "any_user = true goes with exe or unit; for every caller write { any = true }",
        );
    } else if names_programs && !names_users && !any_user {
        errs.push(
            prefix,
            "matches only on exe/unit, so every local user who can run that program gets these scopes \
             (they can ptrace it or make it run their code); add uid, user, gid or group, or write \
             any_user = true if every user really may",
        );
    }
    t.finish(errs);
    (errs.0.len() == before).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let secret = dir.path().join("idp.secret");
            std::fs::write(&secret, "s3cr3t-value\n").unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            Self { dir }
        }

        fn secret_path(&self) -> String {
            self.dir.path().join("idp.secret").display().to_string()
        }

        fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
            let text = text.replace("SECRET_FILE", &self.secret_path());
            Config::parse(
                &text,
                &SecretEnv {
                    credentials_dir: None,
                    var: &|_| None,
                    offline: None,
                },
            )
        }
    }

    const GOOD: &str = r#"
version = 1
[daemon]
socket = "/tmp/x.sock"
socket_mode = "0660"
[clients.idp]
token_url = "http://127.0.0.1:9/token"
allow_http = true
client_id = "broker"
client_secret = { file = "SECRET_FILE" }
extra_params = { audience = "https://api.example" }
[[policy]]
name = "billing"
match = { user = "billing", exe = ["/usr/bin/a", "/usr/bin/b"] }
client = "idp"
scopes = ["scim:read", "internal_*"]
"#;

    #[test]
    fn plain_http_needs_allow_http_even_on_loopback() {
        let f = Fixture::new();
        let errs = f
            .parse(&GOOD.replace("allow_http = true\n", ""))
            .unwrap_err();
        assert_eq!(errs.errors[0].key, "clients.idp.token_url");
        assert!(errs.errors[0].message.contains("allow_http"), "{errs}");
    }

    #[test]
    fn program_only_policies_need_any_user() {
        let f = Fixture::new();
        let exe_only = GOOD.replace("{ user = \"billing\", exe", "{ exe");
        let errs = f.parse(&exe_only).unwrap_err();
        assert_eq!(errs.errors[0].key, "policy[0].match");
        assert!(errs.errors[0].message.contains("any_user = true"), "{errs}");
        let unit_only = GOOD.replace(
            "{ user = \"billing\", exe = [\"/usr/bin/a\", \"/usr/bin/b\"] }",
            "{ unit = \"x.service\" }",
        );
        assert!(f.parse(&unit_only).is_err());
        // Said on purpose, it is accepted.
        let opted = GOOD.replace("{ user = \"billing\", exe", "{ any_user = true, exe");
        assert!(f.parse(&opted).is_ok());
        // any_user beside a user key, or without a program key, is a mistake.
        let both = GOOD.replace(
            "{ user = \"billing\", exe",
            "{ any_user = true, user = \"billing\", exe",
        );
        assert_eq!(
            f.parse(&both).unwrap_err().errors[0].key,
            "policy[0].match.any_user"
        );
        let alone = GOOD.replace(
            "{ user = \"billing\", exe = [\"/usr/bin/a\", \"/usr/bin/b\"] }",
            "{ any_user = true }",
        );
        assert_eq!(
            f.parse(&alone).unwrap_err().errors[0].key,
            "policy[0].match.any_user"
        );
    }

    #[test]
    fn connection_and_cache_limits() {
        let f = Fixture::new();
        let c = f
            .parse(&GOOD.replace(
                "socket_mode = \"0660\"",
                "socket_mode = \"0660\"\nmax_connections_per_uid = 8\nidle_timeout = \"30s\"\nmax_cache_bytes = 2097152",
            ))
            .unwrap();
        assert_eq!(c.daemon.max_connections_per_uid, 8);
        assert_eq!(c.daemon.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.daemon.max_cache_bytes, 2 << 20);
        let errs = f
            .parse(&GOOD.replace(
                "socket_mode = \"0660\"",
                "max_connections_per_uid = 0\nmax_cache_bytes = 10",
            ))
            .unwrap_err();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["daemon.max_cache_bytes", "daemon.max_connections_per_uid"]
        );
    }

    #[test]
    fn metrics_listen_on_loopback_unless_remote_is_allowed() {
        let f = Fixture::new();
        let with = |extra: &str| GOOD.replace("socket_mode = \"0660\"", extra);
        assert_eq!(
            f.parse(GOOD).unwrap().daemon.metrics,
            None,
            "off by default"
        );
        let c = f.parse(&with("metrics = \"127.0.0.1:9464\"")).unwrap();
        assert_eq!(c.daemon.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        let errs = f.parse(&with("metrics = \"0.0.0.0:9464\"")).unwrap_err();
        assert_eq!(errs.errors[0].key, "daemon.metrics");
        assert!(
            errs.errors[0].message.contains("allow_remote_metrics"),
            "{errs}"
        );
        let c = f
            .parse(&with(
                "metrics = \"0.0.0.0:9464\"\nallow_remote_metrics = true",
            ))
            .unwrap();
        assert_eq!(c.daemon.metrics, Some("0.0.0.0:9464".parse().unwrap()));
        let errs = f.parse(&with("metrics = \"localhost\"")).unwrap_err();
        assert!(
            errs.errors[0].message.contains("not an address and port"),
            "{errs}"
        );
    }

    #[test]
    fn the_key_table_is_exactly_what_the_parser_reads() {
        keys::READ.with(|r| r.borrow_mut().clear());
        let f = Fixture::new();
        // Every table the parser walks, so that it looks up every key it knows (present or not).
        let everything = GOOD.replace(
            "[clients.idp]",
            "rate_limit = { per_minute = 1 }\n[clients.idp]",
        ) + r#"
[clients.jwt]
token_url = "https://idp.example/token"
client_id = "j"
auth_method = "private_key_jwt"
private_key = { file = "SECRET_FILE" }
certificate = { env = "CERT" }
signing_alg = "PS256"
certificate_sha1 = true
ca_certificates = { env = "CA" }
system_roots = false

[clients.federated]
token_url = "https://idp.example/token"
client_id = "f"
auth_method = "client_assertion"
client_assertion = { env = "ASSERTION" }
"#;
        let _ = f.parse(&everything);
        let read = keys::READ.with(|r| r.borrow().clone());
        let table: std::collections::BTreeSet<String> =
            keys::KEYS.iter().map(|k| k.name.to_owned()).collect();
        let missing: Vec<_> = read.difference(&table).collect();
        let extra: Vec<_> = table.difference(&read).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "read by the parser but not in KEYS: {missing:?}; in KEYS but never read: {extra:?}"
        );
    }

    #[test]
    fn the_documented_reference_is_generated_from_the_key_table() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap();
        let (begin, end) = ("<!-- config-keys:begin -->\n", "<!-- config-keys:end -->");
        let start = doc
            .find(begin)
            .expect("docs/configuration.md has the config-keys block")
            + begin.len();
        let stop = doc[start..].find(end).unwrap() + start;
        assert_eq!(
            &doc[start..stop],
            keys::markdown(),
            "docs/configuration.md's table is stale: replace it with `credbrokerd config-reference`"
        );
    }

    #[test]
    fn a_good_config_validates() {
        let f = Fixture::new();
        let c = f.parse(GOOD).unwrap();
        assert_eq!(c.daemon.socket_mode, 0o660);
        let idp = &c.clients["idp"];
        let ClientAuth::Basic { secrets, .. } = &idp.auth else {
            panic!("basic by default")
        };
        let (_, secret) = secrets.in_turn().next().unwrap();
        assert_eq!(secret.current().unwrap().expose(), "s3cr3t-value");
        assert_eq!(idp.auth.method(), "client_secret_basic");
        assert_eq!(idp.timeout, Duration::from_secs(10));
        assert_eq!(
            c.policies.policies()[0].matcher.exe.as_ref().unwrap().len(),
            2
        );
        let summary = c.summary();
        assert!(summary.contains("client_id = \"broker\""), "{summary}");
        assert!(!summary.contains("s3cr3t"), "{summary}");
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_key_path() {
        let f = Fixture::new();
        let bad = r#"
version = 1
colour = "blue"
[daemon]
socket_mode = "rw"
[clients.idp]
token_url = "http://idp.example.com/token"
client_id = "broker"
client_secret = "literal-secret-value"
timeout = "soon"
[[policy]]
name = "p"
match = {}
client = "nope"
scopes = ["a b"]
"#;
        let errs = f.parse(bad).unwrap_err();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "colour",
            "daemon.socket_mode",
            "clients.idp.token_url",
            "clients.idp.client_secret",
            "clients.idp.timeout",
            "policy[0].match",
            "policy[0].client",
            "policy[0].scopes[0]",
        ] {
            assert!(keys.contains(&want), "missing {want} in {errs}");
        }
        assert!(!errs.to_string().contains("literal-secret-value"), "{errs}");
    }

    #[test]
    fn syntax_errors_name_the_place_but_not_the_line() {
        let f = Fixture::new();
        let errs = f
            .parse("version = 1\nclient_secret = \"oops-secret\n")
            .unwrap_err();
        let msg = errs.to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains("oops-secret"), "{msg}");
    }

    #[test]
    fn version_is_required() {
        let f = Fixture::new();
        let errs = f.parse(&GOOD.replace("version = 1", "")).unwrap_err();
        assert_eq!(errs.errors[0].key, "version");
        let errs = f
            .parse(&GOOD.replace("version = 1", "version = 2"))
            .unwrap_err();
        assert!(errs.errors[0].message.contains("unsupported version 2"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn any_must_be_written_on_purpose() {
        let f = Fixture::new();
        let c = f.parse(&GOOD.replace(
            "{ user = \"billing\", exe = [\"/usr/bin/a\", \"/usr/bin/b\"] }",
            "{ any = true }",
        ));
        assert!(c.unwrap().policies.policies()[0].matcher.any);
        let errs = f
            .parse(&GOOD.replace("{ user = \"billing\",", "{ any = true, user = \"billing\","))
            .unwrap_err();
        assert_eq!(errs.errors[0].key, "policy[0].match.any");
    }
}
