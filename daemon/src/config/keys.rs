//! Every key of `credbroker.toml`, in one table: the README's configuration reference and `credbroker.toml(5)`
//! are generated from it, and a test checks it against the keys the parser reads.

/// One config key.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    /// Its path: `daemon.socket`, `clients.NAME.timeout`, `policy.match.uid`.
    pub name: &'static str,
    /// What it takes.
    pub kind: &'static str,
    /// Its default, or `required`, or `-`.
    pub default: &'static str,
    /// What it means.
    pub meaning: &'static str,
}

const fn key(
    name: &'static str,
    kind: &'static str,
    default: &'static str,
    meaning: &'static str,
) -> Key {
    Key {
        name,
        kind,
        default,
        meaning,
    }
}

/// Every key, in the order the reference lists them.
pub const KEYS: &[Key] = &[
    key("version", "integer", "required", "must be `1`"),
    key("daemon", "table", "-", "the daemon's own settings"),
    key(
        "daemon.socket",
        "path",
        "`/run/credbroker/credbroker.sock`",
        "absolute socket path; its directory is created (0755) if missing and must belong to root or the daemon's user and be writable by its owner only (not sticky `/tmp`: another user could bind the name first); ignored when systemd passes the socket",
    ),
    key(
        "daemon.socket_mode",
        "octal string",
        "`\"0666\"`",
        "permission bits of the socket (policies are the gate)",
    ),
    key(
        "daemon.socket_group",
        "group name",
        "none",
        "group that owns the socket; must exist",
    ),
    key(
        "daemon.admins",
        "list of user names and `@group`s",
        "`[\"root\"]`",
        "who may use the admin API (`credbroker status`, `explain`, `flush`, `reload`): these users, and members of these groups (primary or supplementary), as the kernel identifies the caller; others get `PERMISSION_DENIED` (exit 77); every admin call is audited",
    ),
    key(
        "daemon.default_min_ttl",
        "duration",
        "`\"60s\"`",
        "least lifetime left on a handed-out token when a request says `min_ttl_seconds = 0`; never more than half of the token's lifetime is required",
    ),
    key(
        "daemon.rate_limit",
        "table",
        "`{ per_minute = 60, burst = 20 }`",
        "per caller uid: requests that need a new token from the IdP (cache hits and joining a fetch already under way are free); over it, `RESOURCE_EXHAUSTED`",
    ),
    key(
        "daemon.rate_limit.per_minute",
        "integer 1-1000000",
        "`60`",
        "sustained new tokens a minute",
    ),
    key(
        "daemon.rate_limit.burst",
        "integer 1-1000000",
        "`20`",
        "new tokens at once before the rate applies",
    ),
    key(
        "daemon.max_cached_tokens",
        "integer 1-10000000",
        "`10000`",
        "most (client, scope set) entries cached; when over, idle entries go: those without a token first, then the soonest to expire",
    ),
    key(
        "daemon.max_cache_bytes",
        "integer (bytes)",
        "`67108864` (64 MiB)",
        "most bytes the cache may take, estimated per entry (keys, tokens, remembered IdP refusals); 1 MiB to 1 TiB",
    ),
    key(
        "daemon.max_connections_per_uid",
        "integer 1-1000000",
        "`64`",
        "connections one uid may hold at once; more are accepted and closed at once",
    ),
    key(
        "daemon.idle_timeout",
        "duration",
        "`\"5m\"`",
        "a connection with no call in flight for this long is closed (clients reconnect by themselves); a new connection must start its first call within 10 s, or this if shorter",
    ),
    key(
        "daemon.retry_budget",
        "fraction 0-1",
        "`0.1`",
        "retries to an IdP per first attempt, per client: while a client's IdP is failing, a renewal is tried again only with a retry earned this way (or when its token is about to expire); fetches a caller waits for retry at once from a budget of 2 that refills at this rate. Takes effect at restart",
    ),
    key(
        "daemon.metrics",
        "address:port",
        "off",
        "serve Prometheus metrics (text format 0.0.4) at `http://ADDRESS/metrics`, e.g. `\"127.0.0.1:9464\"`; a loopback address unless `allow_remote_metrics`",
    ),
    key(
        "daemon.allow_remote_metrics",
        "bool",
        "`false`",
        "let `daemon.metrics` listen on a non-loopback address (the metrics name clients and show IdP health, never tokens or secrets)",
    ),
    key(
        "daemon.log_format",
        "`\"text\"` or `\"json\"`",
        "`\"text\"`",
        "`\"json\"` for one JSON object per line",
    ),
    key(
        "clients",
        "table of tables",
        "-",
        "`[clients.NAME]`: one IdP registration each; `NAME` uses letters, digits, `-`, `_`, `.` (at most 64)",
    ),
    key(
        "clients.NAME.token_url",
        "URL",
        "or `issuer`",
        "the token endpoint; `https` (plain `http` only with `allow_http`)",
    ),
    key(
        "clients.NAME.issuer",
        "URL",
        "or `token_url`",
        "the issuer: without `token_url`, the token endpoint is found by OpenID Connect Discovery (`<issuer>/.well-known/openid-configuration`), else RFC 8414, on first use; the document must name this issuer; cached until the next reload",
    ),
    key(
        "clients.NAME.allow_http",
        "boolean",
        "`false`",
        "allow plain `http`, loopback included: any local user who binds a free loopback port first would receive the secret, so only for an endpoint you own (a local test IdP); elsewhere the secret crosses the network in clear",
    ),
    key(
        "clients.NAME.client_id",
        "string",
        "required",
        "the OAuth client id",
    ),
    key(
        "clients.NAME.client_secret",
        "secret source, or a list",
        "required (but for `private_key_jwt`, `client_assertion`)",
        "`{ file = \"/abs/path\" }`, `{ credential = \"NAME\" }` (systemd `$CREDENTIALS_DIRECTORY`) or `{ env = \"VAR\" }`; a literal string is an error. A list of sources is tried in order when the IdP rejects the client's authentication (`invalid_client`, `unauthorized_client`, 401), and the one that worked is tried first from then on: new and old secrets both work while the IdP accepts both. A file is read again when it changes (no reload needed)",
    ),
    key(
        "clients.NAME.client_secret.file",
        "path",
        "-",
        "a file: regular (not a link), owned by root or the daemon's user, not writable by group or others, not readable by others, at most 64 KiB; one trailing newline is removed; read again before a fetch when its inode, size or times changed",
    ),
    key(
        "clients.NAME.client_secret.credential",
        "name",
        "-",
        "a systemd credential, read from `$CREDENTIALS_DIRECTORY` (fixed for the life of the process: rotate with `systemctl restart`)",
    ),
    key(
        "clients.NAME.client_secret.env",
        "variable name",
        "-",
        "an environment variable (the weakest source: it stays in `/proc/<pid>/environ`; it cannot change while the daemon runs)",
    ),
    key(
        "clients.NAME.auth_method",
        "string",
        "`\"client_secret_basic\"`",
        "or `\"client_secret_post\"`, `\"private_key_jwt\"` (RFC 7523: a JWT the broker signs), or `\"client_assertion\"` (RFC 7523: a JWT another issuer minted, sent as it is)",
    ),
    key(
        "clients.NAME.client_assertion",
        "secret source",
        "with `client_assertion`",
        "a federated client assertion (a Kubernetes service-account token, a SPIFFE JWT-SVID…), sent with `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer` and `client_id`; it must be a JWT with `exp`, valid for 30 s more (and past its `nbf` less 30 s), else the fetch fails with `FAILED_PRECONDITION` and the IdP is not asked",
    ),
    key(
        "clients.NAME.client_assertion.file",
        "path",
        "-",
        "read again before each fetch when it changed; links are followed (Kubernetes' `..data`), then the file must be regular, not writable or readable by others; any owner (the agent that writes it)",
    ),
    key(
        "clients.NAME.client_assertion.credential",
        "name",
        "-",
        "as `client_secret.credential`",
    ),
    key(
        "clients.NAME.client_assertion.env",
        "variable name",
        "-",
        "as `client_secret.env`",
    ),
    key(
        "clients.NAME.private_key",
        "secret source",
        "with `private_key_jwt`",
        "PKCS#8 PEM key, EC P-256 (signs ES256) or RSA ≥ 2048 bits (RS256); the same sources as `client_secret`",
    ),
    key(
        "clients.NAME.private_key.file",
        "path",
        "-",
        "as `client_secret.file`",
    ),
    key(
        "clients.NAME.private_key.credential",
        "name",
        "-",
        "as `client_secret.credential`",
    ),
    key(
        "clients.NAME.private_key.env",
        "variable name",
        "-",
        "as `client_secret.env`",
    ),
    key(
        "clients.NAME.certificate",
        "secret source",
        "none",
        "with `private_key_jwt`: the key's X.509 certificate (PEM; the first of a chain), e.g. one registered with Entra ID: the assertion's header carries its SHA-256 thumbprint `x5t#S256`, RSA keys sign PS256 by default, and every assertion is checked against it (a key that does not match is a config error); read again when the file changes",
    ),
    key(
        "clients.NAME.certificate.file",
        "path",
        "-",
        "may be readable by everyone; regular (not a link), owned by root or the daemon's user, not writable by group or others",
    ),
    key(
        "clients.NAME.certificate.credential",
        "name",
        "-",
        "as `client_secret.credential`",
    ),
    key(
        "clients.NAME.certificate.env",
        "variable name",
        "-",
        "as `client_secret.env`",
    ),
    key(
        "clients.NAME.signing_alg",
        "`\"ES256\"`, `\"PS256\"` or `\"RS256\"`",
        "by key",
        "with `private_key_jwt`: ES256 for EC keys; for RSA keys PS256 when a `certificate` is given (as Entra ID asks), else RS256",
    ),
    key(
        "clients.NAME.certificate_sha1",
        "boolean",
        "`false`",
        "also put the SHA-1 thumbprint `x5t` in the header, for providers that still want it",
    ),
    key(
        "clients.NAME.key_id",
        "string",
        "none",
        "`kid` in the assertion's header",
    ),
    key(
        "clients.NAME.assertion_audience",
        "string",
        "`\"token_endpoint\"`",
        "the assertion's `aud`: the token endpoint URL, `\"issuer\"`, or a literal URL",
    ),
    key(
        "clients.NAME.basic_encoding",
        "`\"form\"` or `\"raw\"`",
        "`\"form\"`",
        "RFC 6749 §2.3.1 form-encoding of id and secret inside Basic; `\"raw\"` for servers that do not decode",
    ),
    key(
        "clients.NAME.extra_params",
        "table of strings",
        "none",
        "sent with every token request (`audience`, `resource`…); the OAuth parameters credbroker sets itself cannot be overridden",
    ),
    key(
        "clients.NAME.ca_certificates",
        "secret source",
        "none",
        "PEM CA certificates (at least one) this client's TLS also trusts, for its token endpoint and discovery: a private CA, without changing the host's trust store",
    ),
    key(
        "clients.NAME.ca_certificates.file",
        "path",
        "-",
        "as `certificate.file`: whoever could replace it could impersonate the IdP",
    ),
    key(
        "clients.NAME.ca_certificates.credential",
        "name",
        "-",
        "as `client_secret.credential`",
    ),
    key(
        "clients.NAME.ca_certificates.env",
        "variable name",
        "-",
        "as `client_secret.env`",
    ),
    key(
        "clients.NAME.system_roots",
        "boolean",
        "`true`",
        "`false`: trust only `ca_certificates`, not the system's roots",
    ),
    key(
        "clients.NAME.default_ttl",
        "duration",
        "`\"5m\"`",
        "lifetime assumed when the IdP omits `expires_in`",
    ),
    key(
        "clients.NAME.timeout",
        "duration",
        "`\"10s\"`",
        "per IdP request, connection to last byte",
    ),
    key(
        "clients.NAME.dpop",
        "boolean",
        "`false`",
        "bind this client's tokens to a key the daemon holds (DPoP, RFC 9449): an EC P-256 key made at start, in memory only; every token request carries a proof, the IdP must answer `token_type` `DPoP`, and callers get proofs for their requests with `Proof` (`credbroker proof`) only for their policy's `dpop_targets`",
    ),
    key(
        "policy",
        "array of tables",
        "none",
        "`[[policy]]`: deny by default",
    ),
    key(
        "policy.name",
        "string",
        "required",
        "unique; shown in the audit log",
    ),
    key(
        "policy.match",
        "table",
        "required",
        "which callers: every key given must match; each takes one value or a list of alternatives. `{}` is an error; `{ any = true }` matches every caller. A match on `exe` and/or `unit` alone is an error unless it says `any_user = true`",
    ),
    key(
        "policy.match.any",
        "`true`",
        "-",
        "every caller, written on purpose; no other key beside it",
    ),
    key(
        "policy.match.any_user",
        "`true`",
        "-",
        "with `exe` or `unit` and no user key: every user running that program may have these scopes (any of them can ptrace it)",
    ),
    key("policy.match.uid", "uid or list", "-", "the caller's uid"),
    key(
        "policy.match.user",
        "name or list",
        "-",
        "the caller's user name",
    ),
    key(
        "policy.match.gid",
        "gid or list",
        "-",
        "a gid of the caller, primary or supplementary",
    ),
    key(
        "policy.match.group",
        "name or list",
        "-",
        "a group of the caller, primary or supplementary",
    ),
    key(
        "policy.match.exe",
        "absolute path or list",
        "-",
        "the caller's executable, matched by file identity (device and inode), never as a string",
    ),
    key(
        "policy.match.unit",
        "unit name or list",
        "-",
        "the systemd unit the caller runs in",
    ),
    key(
        "policy.client",
        "name or list",
        "required",
        "a configured client name, or a list",
    ),
    key(
        "policy.scopes",
        "scope or list",
        "required",
        "exact scopes, or a prefix ending in `*` (`internal_user_mgt_*`; a lone `*` allows any scope)",
    ),
    key(
        "policy.dpop_targets",
        "URL prefix or list",
        "none; required when a client named has `dpop = true`",
        "the APIs this policy's callers may get DPoP proofs for: scheme, host, port and a path prefix of whole segments (`https://api.example.com/v1/`); https only, plain http for loopback; no user info, query or fragment. A token whose scopes several policies allow gets proofs only for URLs every one of them lists",
    ),
];

/// The reference as a Markdown table (the README's).
pub fn markdown() -> String {
    let mut s = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        s.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            k.name, k.kind, k.default, k.meaning
        ));
    }
    s
}

/// Text for roff: backslashes and hyphens escaped, `code` in bold.
pub fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    let mut out = String::new();
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("\\fB");
            out.push_str(part);
            out.push_str("\\fR");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// `credbroker.toml(5)`, in roff.
pub fn man_page(date: &str, version: &str) -> String {
    let mut s = format!(
        ".TH CREDBROKER.TOML 5 \"{date}\" \"credbroker {version}\" \"File Formats\"\n\
         .SH NAME\ncredbroker.toml \\- configuration of credbrokerd\n\
         .SH SYNOPSIS\n/etc/credbroker/credbroker.toml\n\
         .SH DESCRIPTION\n\
         credbrokerd(8) reads TOML from \\fI/etc/credbroker/credbroker.toml\\fR (or \\fB\\-\\-config\\fR, or \\fBCREDBROKER_CONFIG\\fR). \
         Unknown keys, bad values, dangling client names and unsafe secret files are errors, all reported at once with \
         their key paths; the daemon then refuses to start (exit 64), and \\fBcredbrokerd check\\-config\\fR says the same \
         without starting. A secret is never written in the file itself.\n\
         .PP\nDurations are \\fB\"90\"\\fR (seconds), \\fB\"90s\"\\fR, \\fB\"5m\"\\fR, \\fB\"1h 30m\"\\fR, or an integer number of seconds.\n\
         .PP\nPolicies: a request for scopes S of client C is allowed when every scope in S is allowed by some policy \
         that matches the caller and names C. An empty client in the request means the only client the caller's \
         matching policies name.\n\
         .SH KEYS\n"
    );
    for k in KEYS {
        s.push_str(&format!(
            ".TP\n.B {}\n{} (default: {}).\n{}\n",
            roff(k.name),
            roff(k.kind),
            roff(k.default),
            roff(k.meaning)
        ));
    }
    s.push_str(
        ".SH EXAMPLE\n.nf\nversion = 1\n\n[clients.asgardeo]\ntoken_url = \"https://api.asgardeo.io/t/myorg/oauth2/token\"\n\
         client_id = \"abc123\"\nclient_secret = { credential = \"asgardeo\" }\n\n[[policy]]\nname = \"billing\\-sync\"\n\
         match = { user = \"billing\", exe = \"/usr/local/bin/billing\\-sync\" }\nclient = \"asgardeo\"\n\
         scopes = [\"internal_user_mgt_view\"]\n.fi\n.SH SEE ALSO\ncredbrokerd(8), credbroker(1)\n",
    );
    s
}

#[cfg(test)]
thread_local! {
    /// The keys the parser looked up on this thread, normalized (`clients.NAME`, `policy`).
    pub(crate) static READ: std::cell::RefCell<std::collections::BTreeSet<String>> =
        const { std::cell::RefCell::new(std::collections::BTreeSet::new()) };
}

/// Records that the parser looked up `key` under `prefix` (tests only).
#[cfg(test)]
pub(crate) fn record(prefix: &str, key: &str) {
    let full = if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    };
    let mut parts: Vec<String> = full.split('.').map(str::to_owned).collect();
    if parts.first().is_some_and(|p| p == "clients") && parts.len() > 2 {
        parts[1] = "NAME".to_owned();
    }
    if let Some(first) = parts.first_mut()
        && first.starts_with("policy[")
    {
        *first = "policy".to_owned();
    }
    READ.with(|r| r.borrow_mut().insert(parts.join(".")));
}
