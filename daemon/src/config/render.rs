//! A validated [`Config`] written back as TOML: the effective configuration, every key with the value the
//! daemon uses (defaults included), every secret as its source and never its value. `check-config` prints it.
//!
//! The text is itself a valid config that validates to the same configuration (with the same secret sources
//! readable): `render(parse(render(c))) == render(c)`. The config fuzz target checks that on every input
//! that validates, and a unit test checks that every key of [`super::keys::KEYS`] can appear in it.

use std::fmt::Write;
use std::time::Duration;

use toml::{Table, Value};

use super::{Config, DaemonConfig, LogFormat};
use crate::policy::{Matcher, Policy};
use crate::secret::SecretSource;
use crate::tokens::client::{AssertionAudience, BasicEncoding, ClientAuth, ClientConfig};

impl Config {
    /// What `check-config` prints: the effective configuration as TOML, every secret shown by its source (see
    /// the module's documentation).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# The effective configuration: every key with the value credbrokerd uses, defaults included.\n\
             # Secrets appear as their sources, never their values. This text is itself a valid config.\n\
             # {} client{}, {} polic{}.\n",
            self.clients.len(),
            if self.clients.len() == 1 { "" } else { "s" },
            self.policies.policies().len(),
            if self.policies.policies().len() == 1 {
                "y"
            } else {
                "ies"
            },
        );
        key(&mut out, "version", 1);
        out.push_str("\n[daemon]\n");
        daemon(&mut out, &self.daemon);
        for client in self.clients.values() {
            let _ = writeln!(out, "\n[clients.{}]", table_key(&client.name));
            client_table(&mut out, client);
        }
        for policy in self.policies.policies() {
            out.push_str("\n[[policy]]\n");
            policy_table(&mut out, policy);
        }
        out
    }
}

/// A name as a TOML key: bare when it can be, else quoted (a client named `a.b` is one key, not two).
fn table_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        name.to_owned()
    } else {
        Value::String(name.to_owned()).to_string()
    }
}

/// `name = value`, the value in TOML's own syntax (strings quoted and escaped by the `toml` crate).
fn key(out: &mut String, name: &str, value: impl Into<Value>) {
    let _ = writeln!(out, "{name} = {}", value.into());
}

/// One value, or a list when there are several (as the config accepts either).
fn single_or_array(mut items: Vec<Value>) -> Value {
    if items.len() == 1 {
        items.remove(0)
    } else {
        Value::Array(items)
    }
}

fn one_or_list(items: &[String]) -> Value {
    single_or_array(items.iter().cloned().map(Value::String).collect())
}

fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn source(s: &SecretSource) -> Value {
    let (kind, value) = match s {
        SecretSource::File(path) => ("file", path.to_string_lossy().into_owned()),
        SecretSource::Credential(name) => ("credential", name.clone()),
        SecretSource::Env(var) => ("env", var.clone()),
    };
    let mut t = Table::new();
    t.insert(kind.to_owned(), Value::String(value));
    Value::Table(t)
}

fn daemon(out: &mut String, d: &DaemonConfig) {
    key(out, "socket", d.socket.to_string_lossy().into_owned());
    key(out, "socket_mode", format!("{:04o}", d.socket_mode));
    if let Some((group, _)) = &d.socket_group {
        key(out, "socket_group", group.as_str());
    }
    key(
        out,
        "admins",
        Value::Array(d.admins.iter().cloned().map(Value::String).collect()),
    );
    key(out, "default_min_ttl", duration(d.default_min_ttl));
    let mut rate = Table::new();
    rate.insert(
        "per_minute".into(),
        i64::from(d.rate_limit.per_minute).into(),
    );
    rate.insert("burst".into(), i64::from(d.rate_limit.burst).into());
    key(out, "rate_limit", Value::Table(rate));
    key(out, "max_cached_tokens", count(d.max_cached_tokens));
    key(out, "max_cache_bytes", count(d.max_cache_bytes));
    key(
        out,
        "max_connections_per_uid",
        count(d.max_connections_per_uid),
    );
    key(out, "idle_timeout", duration(d.idle_timeout));
    key(out, "retry_budget", d.retry_budget);
    if let Some(addr) = d.metrics {
        key(out, "metrics", addr.to_string());
    }
    key(out, "allow_remote_metrics", d.allow_remote_metrics);
    key(
        out,
        "log_format",
        match d.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
    );
}

fn count(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn client_table(out: &mut String, c: &ClientConfig) {
    if let Some(url) = &c.token_url {
        key(out, "token_url", url.as_str());
    }
    if let Some(url) = &c.issuer {
        key(out, "issuer", url.as_str());
    }
    key(out, "allow_http", c.allow_http);
    key(out, "client_id", c.client_id.as_str());
    key(out, "auth_method", c.auth.method());
    match &c.auth {
        ClientAuth::Basic { .. } | ClientAuth::Post { .. } => {
            let sources = c.auth.sources().into_iter().map(source).collect();
            key(out, "client_secret", single_or_array(sources));
        }
        ClientAuth::PrivateKeyJwt {
            key: private_key,
            key_id,
            audience,
            certificate,
            signing_alg,
            certificate_sha1,
        } => {
            key(out, "private_key", source(private_key.source()));
            if let Some(certificate) = certificate {
                key(out, "certificate", source(certificate.source()));
            }
            if let Some(alg) = signing_alg {
                key(out, "signing_alg", alg.name());
            }
            key(out, "certificate_sha1", *certificate_sha1);
            if let Some(id) = key_id {
                key(out, "key_id", id.as_str());
            }
            key(
                out,
                "assertion_audience",
                match audience {
                    AssertionAudience::TokenEndpoint => "token_endpoint",
                    AssertionAudience::Issuer => "issuer",
                    AssertionAudience::Literal(aud) => aud.as_str(),
                },
            );
        }
        ClientAuth::ClientAssertion { assertion } => {
            key(out, "client_assertion", source(assertion.source()));
        }
    }
    if let ClientAuth::Basic { encoding, .. } = &c.auth {
        key(
            out,
            "basic_encoding",
            match encoding {
                BasicEncoding::Form => "form",
                BasicEncoding::Raw => "raw",
            },
        );
    }
    if !c.extra_params.is_empty() {
        let params: Table = c
            .extra_params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        key(out, "extra_params", Value::Table(params));
    }
    if let Some(roots) = &c.tls_roots {
        key(out, "ca_certificates", source(&roots.source));
    }
    key(
        out,
        "system_roots",
        c.tls_roots.as_ref().is_none_or(|r| r.system_roots),
    );
    key(out, "default_ttl", duration(c.default_ttl));
    key(out, "timeout", duration(c.timeout));
    key(out, "dpop", c.dpop);
}

fn policy_table(out: &mut String, p: &Policy) {
    key(out, "name", p.name.as_str());
    key(out, "match", matcher(&p.matcher));
    key(out, "client", one_or_list(&p.clients));
    key(
        out,
        "scopes",
        Value::Array(
            p.scopes
                .iter()
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
    );
    if !p.dpop_targets.is_empty() {
        key(
            out,
            "dpop_targets",
            Value::Array(
                p.dpop_targets
                    .iter()
                    .map(|t| Value::String(t.as_str().to_owned()))
                    .collect(),
            ),
        );
    }
}

fn matcher(m: &Matcher) -> Value {
    let mut t = Table::new();
    if m.any {
        t.insert("any".into(), true.into());
        return Value::Table(t);
    }
    if !m.names_users() {
        // Only exe/unit: the config must say so on purpose.
        t.insert("any_user".into(), true.into());
    }
    let ids = |ids: &[u32]| single_or_array(ids.iter().map(|&i| i64::from(i).into()).collect());
    if let Some(uid) = &m.uid {
        t.insert("uid".into(), ids(uid));
    }
    if let Some(user) = &m.user {
        t.insert("user".into(), one_or_list(user));
    }
    if let Some(gid) = &m.gid {
        t.insert("gid".into(), ids(gid));
    }
    if let Some(group) = &m.group {
        t.insert("group".into(), one_or_list(group));
    }
    if let Some(exe) = &m.exe {
        let exe: Vec<String> = exe
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        t.insert("exe".into(), one_or_list(&exe));
    }
    if let Some(unit) = &m.unit {
        t.insert("unit".into(), one_or_list(unit));
    }
    Value::Table(t)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;
    use crate::secret::SecretEnv;

    const SECRET: &str = "secret-value-0d7c";

    /// Every auth method, every daemon key, every source kind and every way to write a policy's match.
    const EVERYTHING: &str = r#"
version = 1
[daemon]
socket = "/run/x/credbroker.sock"
socket_mode = "0660"
socket_group = "root"
admins = ["root", "@adm"]
default_min_ttl = "90s"
rate_limit = { per_minute = 120, burst = 5 }
max_cached_tokens = 500
max_cache_bytes = 2097152
max_connections_per_uid = 8
idle_timeout = "1m 30s"
retry_budget = 0.25
metrics = "[::]:9464"
allow_remote_metrics = true
log_format = "json"

[clients.basic]
token_url = "https://idp.example/token"
issuer = "https://idp.example"
client_id = "basic \"quoted\" \u00e9"
client_secret = [{ file = "/etc/credbroker/new.secret" }, { credential = "old" }, { env = "OLDEST" }]
basic_encoding = "raw"
extra_params = { audience = "https://api.example", "odd key" = "tab\there" }
ca_certificates = { env = "CA" }
system_roots = false
default_ttl = "10m"
timeout = "2500ms"

[clients."post.v2"]
issuer = "http://127.0.0.1:8080/realms/x"
allow_http = true
client_id = "post"
auth_method = "client_secret_post"
client_secret = { env = "POST" }

[clients.jwt]
issuer = "https://idp.example"
client_id = "jwt"
auth_method = "private_key_jwt"
private_key = { env = "KEY" }
certificate = { env = "CERT" }
signing_alg = "ES256"
certificate_sha1 = true
key_id = "k1"
assertion_audience = "issuer"

[clients.federated]
token_url = "https://login.example/token"
client_id = "fed"
auth_method = "client_assertion"
client_assertion = { file = "/var/run/secrets/tokens/token.jwt" }
dpop = true

[[policy]]
name = "everyone"
match = { any = true }
client = "basic"
scopes = ["openid"]

[[policy]]
name = "programs"
match = { any_user = true, exe = "/usr/bin/true", unit = ["a.service", "b.service"] }
client = ["post.v2", "jwt"]
scopes = ["x:*", "y"]

[[policy]]
name = "people \"q\""
match = { uid = [0, 1], user = "root", gid = 0, group = ["root"] }
client = "federated"
scopes = ["*"]
dpop_targets = ["https://API.example:443/v1", "http://127.0.0.1:8080/"]
"#;

    /// What each source holds, without touching a file or a variable.
    struct Sources {
        key: String,
        cert: String,
        ca: String,
        assertion: String,
    }

    impl Sources {
        fn new() -> Self {
            let pair = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["broker.example".to_owned()])
                .unwrap()
                .self_signed(&pair)
                .unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(vec!["ca.example".to_owned()]).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca.self_signed(&ca_key).unwrap();
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3600;
            let part = |s: &str| URL_SAFE_NO_PAD.encode(s);
            Self {
                key: pair.serialize_pem(),
                cert: cert.pem(),
                ca: ca.pem(),
                assertion: format!(
                    "{}.{}.{}",
                    part(r#"{"alg":"RS256"}"#),
                    part(&format!(r#"{{"iss":"k8s","exp":{exp}}}"#)),
                    part(SECRET)
                ),
            }
        }

        fn read(&self, source: &SecretSource) -> Option<String> {
            Some(match source {
                SecretSource::Env(v) if v == "KEY" => self.key.clone(),
                SecretSource::Env(v) if v == "CERT" => self.cert.clone(),
                SecretSource::Env(v) if v == "CA" => self.ca.clone(),
                SecretSource::File(p) if p.ends_with("token.jwt") => self.assertion.clone(),
                _ => SECRET.to_owned(),
            })
        }
    }

    fn parse(text: &str, sources: &Sources) -> Config {
        let read = |s: &SecretSource| sources.read(s);
        let env = SecretEnv {
            credentials_dir: None,
            var: &|_| None,
            offline: Some(&read),
        };
        Config::parse(text, &env).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Every key path in a TOML text, with `clients.NAME` and `policy` for the names and indexes.
    fn key_paths(text: &str) -> BTreeSet<String> {
        fn walk(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
            match v {
                Value::Table(t) => {
                    for (k, v) in t {
                        let k = if prefix == "clients" {
                            "NAME"
                        } else {
                            k.as_str()
                        };
                        let path = if prefix.is_empty() {
                            k.to_owned()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        out.insert(path.clone());
                        // extra_params holds free-form names.
                        if !path.ends_with("extra_params") {
                            walk(&path, v, out);
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|v| walk(prefix, v, out)),
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        walk("", &Value::Table(text.parse().unwrap()), &mut out);
        out
    }

    #[test]
    fn the_summary_is_a_config_that_validates_to_itself() {
        let sources = Sources::new();
        let summary = parse(EVERYTHING, &sources).summary();
        let again = parse(&summary, &sources).summary();
        assert_eq!(summary, again);
        // Defaults are written out too.
        let minimal = parse(
            "version = 1\n[clients.idp]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"x\"\n\
             client_secret = { env = \"S\" }\n",
            &sources,
        )
        .summary();
        for default in [
            "socket = \"/run/credbroker/credbroker.sock\"",
            "socket_mode = \"0666\"",
            "default_min_ttl = \"1m\"",
            "idle_timeout = \"5m\"",
            "retry_budget = 0.1",
            "auth_method = \"client_secret_basic\"",
            "basic_encoding = \"form\"",
            "timeout = \"10s\"",
        ] {
            assert!(minimal.contains(default), "{default} in\n{minimal}");
        }
        assert_eq!(parse(&minimal, &sources).summary(), minimal);
    }

    #[test]
    fn the_summary_can_show_every_key_and_no_secret() {
        let sources = Sources::new();
        let summary = parse(EVERYTHING, &sources).summary();
        let shown = key_paths(&summary);
        let missing: Vec<&str> = crate::config::keys::KEYS
            .iter()
            .map(|k| k.name)
            .filter(|k| {
                // Every source kind is written by one function: a source's parent key is enough here.
                let source = ["file", "credential", "env"]
                    .iter()
                    .find_map(|kind| k.strip_suffix(&format!(".{kind}")));
                !shown.contains(*k) && !source.is_some_and(|parent| shown.contains(parent))
            })
            .collect();
        assert!(missing.is_empty(), "never shown: {missing:?}\n{summary}");
        for value in [
            SECRET,
            sources.key.lines().nth(1).unwrap(),
            sources.assertion.as_str(),
        ] {
            assert!(!summary.contains(value), "{value} in\n{summary}");
        }
        assert!(
            summary.contains(
                "client_secret = [{ file = \"/etc/credbroker/new.secret\" }, { credential = \"old\" }, \
                 { env = \"OLDEST\" }]"
            ),
            "{summary}"
        );
    }
}
