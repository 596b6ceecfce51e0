//! End-to-end tests of the daemon core: the real `credbrokerd` on a temporary Unix socket, the real
//! `credbroker` CLI (as root and as uid 65534), and the stand-in token endpoint over real HTTP.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Error, TokenRequest};
use credbroker_tests::fixture::{NOBODY, SECRET, Setup};
use credbroker_tests::idp::Fault;
use credbroker_tests::{
    Daemon, DaemonOptions, WAIT, bin, check_config, stderr, stdout, token_text,
};

#[tokio::test]
async fn an_allowed_caller_gets_the_issued_token_minted_with_exactly_its_scopes() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;

    let token = c
        .token(["scim:write", "scim:read", "scim:read"])
        .await
        .unwrap();
    let issued = s.idp.issued_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(token.access_token().expose_secret(), issued[0]);
    assert_eq!(token.scopes(), ["scim:read", "scim:write"]);
    assert_eq!(token.token_type(), "Bearer");
    assert_eq!(token.client(), "idp");
    let left = token.expires_in().as_secs();
    assert!((3500..=3600).contains(&left), "expires in {left}s");
    let req = &s.idp.requests()[0];
    assert_eq!(req.scope, "scim:read scim:write");
    assert_eq!((req.auth, req.client_id.as_str()), ("basic", "broker"));
    assert!(
        req.params
            .contains(&("grant_type".into(), "client_credentials".into()))
    );

    // Same set in another order: served from the cache, no IdP request.
    let again = c.token(["scim:read", "scim:write"]).await.unwrap();
    assert_eq!(again.access_token().expose_secret(), issued[0]);
    assert_eq!(s.idp.request_count(), 1);
    // Another set: a new token, minted for exactly that set.
    let other = c.token(["scim:read"]).await.unwrap();
    assert_eq!(s.idp.request_count(), 2);
    assert_ne!(other.access_token().expose_secret(), issued[0]);
    assert_eq!(s.idp.requests()[1].scope, "scim:read");
}

#[tokio::test]
async fn a_caller_running_as_another_uid_is_judged_by_the_kernel_not_by_what_it_says() {
    let s = Setup::new().await;
    let d = s.daemon().await;

    // uid 65534 asks for a scope only root's policy allows: refused, and the IdP never hears of it.
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("\"scim:write\""), "{err}");
    assert!(err.contains("uid=65534(nobody)"), "{err}");
    assert_eq!(s.idp.request_count(), 0);

    // Its own scope works, and the token is the one the IdP issued.
    let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), s.idp.issued_tokens()[0]);

    // WhoAmI reports the kernel's view of the process.
    let out = d.cli(Some(NOBODY), &["whoami", "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let me: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(me["uid"], 65534);
    assert_eq!(me["user"], "nobody");
    assert_eq!(me["groups"][0], "nogroup");
    assert_eq!(me["exe"], bin("credbroker").display().to_string());
    assert_eq!(me["grants"]["idp"], serde_json::json!(["scim:read"]));

    // Root, by contrast, may have scim:write.
    let out = d.cli(None, &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn cli_formats_and_pasted_scope_strings() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let out = d
        .cli(
            None,
            &["token", "--format", "header", "scim:read scim:write"],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = &s.idp.issued_tokens()[0];
    assert_eq!(stdout(&out), format!("Authorization: Bearer {token}"));
    assert_eq!(s.idp.requests()[0].scope, "scim:read scim:write");

    let out = d
        .cli(
            None,
            &[
                "token",
                "--format",
                "json",
                "-c",
                "idp",
                "scim:write",
                "scim:read",
            ],
        )
        .await;
    let j: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(j["access_token"], token.as_str());
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["scopes"], serde_json::json!(["scim:read", "scim:write"]));
    assert_eq!(j["client"], "idp");
    assert!(j["expires_in"].as_u64().unwrap() > 3500);
    assert!(j["expires_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn client_secret_post_and_raw_basic_are_sent_as_configured() {
    let s = Setup::new().await;
    let d = Daemon::start(
        &s.dir,
        &s.config_with("auth_method = \"client_secret_post\"", ""),
    )
    .await;
    d.client().await.token(["scim:read"]).await.unwrap();
    let req = &s.idp.requests()[0];
    assert_eq!((req.auth, req.client_id.as_str()), ("post", "broker"));
    drop(d);

    // Raw Basic sends the secret unencoded; the stand-in decodes as §2.3.1 says, so '+' turns into ' ' and
    // the secret no longer matches. That is what raw mode is for: servers that do not decode.
    let s = Setup::new().await;
    let d = Daemon::start(&s.dir, &s.config_with("basic_encoding = \"raw\"", "")).await;
    let err = d.client().await.token(["scim:read"]).await.unwrap_err();
    assert!(err.needs_operator(), "{err}");
    assert!(err.to_string().contains("invalid_client"), "{err}");
    assert_eq!(s.idp.requests()[0].auth, "basic");
}

#[tokio::test]
async fn malformed_and_refused_requests_get_their_status_and_cost_the_idp_nothing() {
    let s = Setup::new().await;
    let tail = r#"
[clients.other]
token_url = "http://127.0.0.1:9/token"
client_id = "x"
allow_http = true
client_secret = { file = "SECRET_FILE" }
"#;
    let tail = tail.replace(
        "SECRET_FILE",
        &s.dir.path().join("idp.secret").display().to_string(),
    );
    let config = s.config_with("", &tail).replace(
        "[[policy]]\nname = \"root-all\"\nmatch = { uid = 0 }\nclient = \"idp\"",
        "[[policy]]\nname = \"root-all\"\nmatch = { uid = 0 }\nclient = [\"idp\", \"other\"]",
    );
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    let code = |r: Result<credbroker_client::Token, Error>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    // No client named while root's policies name two.
    let e = code(c.token(["scim:read"]).await);
    assert!(
        e.is_invalid_request() && e.to_string().contains("several clients"),
        "{e}"
    );
    let idp = |scopes: Vec<&str>| TokenRequest::new(scopes).client("idp");
    let e = code(c.get_token(idp(vec![])).await);
    assert!(
        e.is_invalid_request() && e.to_string().contains("at least one scope"),
        "{e}"
    );
    let e = code(c.get_token(idp(vec!["scim read"])).await);
    assert!(
        e.is_invalid_request() && e.to_string().contains("not a valid OAuth scope"),
        "{e}"
    );
    let many: Vec<String> = (0..65).map(|i| format!("scim:s{i}")).collect();
    let e = code(c.get_token(TokenRequest::new(many).client("idp")).await);
    assert!(
        e.is_invalid_request() && e.to_string().contains("too many scopes"),
        "{e}"
    );
    let e = code(
        c.get_token(TokenRequest::new(["x".repeat(300)]).client("idp"))
            .await,
    );
    assert!(
        e.is_invalid_request() && e.to_string().contains("too long"),
        "{e}"
    );
    let e = code(
        c.get_token(TokenRequest::new(["scim:read"]).client("nope"))
            .await,
    );
    assert!(
        e.is_invalid_request() && e.to_string().contains("unknown client"),
        "{e}"
    );
    let e = code(c.get_token(idp(vec!["openid"])).await);
    assert!(e.is_denied(), "{e}");
    assert!(
        e.to_string().contains("\"openid\"") && e.to_string().contains("uid=0(root)"),
        "{e}"
    );
    assert_eq!(s.idp.request_count(), 0, "refusals must not reach the IdP");

    // A min_ttl longer than the tokens live is refused once the lifetime is known.
    let e = code(
        c.get_token(idp(vec!["scim:read"]).min_ttl(Duration::from_secs(7200)))
            .await,
    );
    assert!(
        e.is_invalid_request() && e.to_string().contains("3600"),
        "{e}"
    );
    let t = c
        .get_token(idp(vec!["scim:read"]).min_ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    assert!(t.expires_in() >= Duration::from_secs(600));

    // CLI exit code for a malformed request.
    let out = d.cli(None, &["token", "-c", "idp", "bad\"scope"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[tokio::test]
async fn idp_failures_become_status_codes_an_operator_or_a_retry_can_act_on() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;
    // Each case asks for its own scope set so nothing cached interferes.
    let cases: Vec<(Fault, &[&str], bool, &str)> = vec![
        (Fault::Status(503), &["scim:read"], true, "HTTP 503"),
        (
            Fault::RateLimited("120".into()),
            &["scim:write"],
            true,
            "HTTP 429",
        ),
        (
            Fault::Slow(Duration::from_secs(5)),
            &["internal_user_mgt_view"],
            true,
            "did not answer within 2s",
        ),
        (
            Fault::HtmlOk,
            &["internal_user_mgt_list"],
            false,
            "HTML page",
        ),
        (
            Fault::EmptyForbidden,
            &["scim:read", "scim:write"],
            false,
            "HTTP 403",
        ),
        (
            Fault::WiderScope("scim:admin".into()),
            &["scim:read", "internal_user_mgt_view"],
            false,
            "scim:admin",
        ),
        (
            Fault::EchoSecret,
            &["scim:write", "internal_user_mgt_view"],
            false,
            "invalid_client",
        ),
    ];
    for (fault, scopes, retryable, says) in cases {
        s.idp.set_fault(fault.clone());
        let err = c.token(scopes.iter().copied()).await.unwrap_err();
        assert_eq!(err.is_retryable(), retryable, "{fault:?}: {err}");
        assert_eq!(err.needs_operator(), !retryable, "{fault:?}: {err}");
        assert!(err.to_string().contains(says), "{fault:?}: {err}");
    }
    s.idp.set_fault(Fault::None);
    // The IdP refuses a scope the broker's policy allows.
    let err = c.token(["internal_user_mgt_delete"]).await.unwrap_err();
    assert!(
        err.needs_operator() && err.to_string().contains("invalid_scope"),
        "{err}"
    );
    let out = d.cli(None, &["token", "internal_user_mgt_delete"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    s.idp.set_fault(Fault::Status(502));
    let out = d
        .cli(
            None,
            &["token", "internal_user_mgt_view", "internal_user_mgt_list"],
        )
        .await;
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("worth retrying"), "{}", stderr(&out));

    // Lenient lifetimes: a string expires_in, and a missing one (the client's default_ttl, 300 s here).
    s.idp.set_fault(Fault::ExpiresInString);
    let t = c.token(["scim:read"]).await.unwrap();
    assert!(t.expires_in() > Duration::from_secs(3500));
    s.idp.set_fault(Fault::NoExpiresIn);
    let t = c.token(["scim:write"]).await.unwrap();
    let left = t.expires_in().as_secs();
    assert!((290..=300).contains(&left), "{left}");

    // A cached token is still served while the IdP fails.
    s.idp.set_fault(Fault::Status(500));
    assert_eq!(token_text(&mut c, &["scim:read"]).await, t_first(&s));
}

fn t_first(s: &Setup) -> String {
    let reqs = s.idp.requests();
    reqs.iter()
        .find(|r| r.scope == "scim:read" && r.token.is_some())
        .and_then(|r| r.token.clone())
        .unwrap()
}

#[tokio::test]
async fn an_unreachable_idp_is_unavailable() {
    let s = Setup::new().await;
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = s.config().replace(
        &s.idp.token_url(),
        &format!("http://127.0.0.1:{port}/oauth2/token"),
    );
    let d = Daemon::start(&s.dir, &config).await;
    let err = d.client().await.token(["scim:read"]).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .contains("could not reach the token endpoint"),
        "{err}"
    );
}

#[tokio::test]
async fn a_peer_the_daemon_cannot_see_is_unauthenticated() {
    let s = Setup::new().await;
    // The daemon in its own PID namespace sees callers from outside it with pid 0: it cannot pin or inspect
    // them, so it must refuse rather than guess.
    let opts = DaemonOptions {
        wrapper: ["unshare", "--pid", "--fork", "--kill-child"]
            .map(String::from)
            .to_vec(),
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &s.config(), opts).await;
    let err = d.client().await.token(["scim:read"]).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
    assert!(err.to_string().contains("not visible"), "{err}");
    let out = d.cli(None, &["whoami"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert_eq!(s.idp.request_count(), 0);
}

#[tokio::test]
async fn garbage_and_hundreds_of_idle_connections_do_not_stop_the_daemon_serving_others() {
    // Another uid holds idle, garbage and half-finished connections (more than its budget lets it keep).
    let s = Setup::new().await;
    let d = s.daemon().await;
    let garbage = r"
import socket, sys
sent = [b'', b'\x00\xffGARBAGE\r\n\r\n not http/2 at all', b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00']
conns = []
for i in range(300):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.sendall(sent[i % 3])
    except OSError:
        pass  # over its uid's budget: closed at once
    conns.append(s)
print('ready', flush=True)
sys.stdin.readline()
";
    let mut idle = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", garbage])
        .arg(&d.socket)
        .uid(NOBODY.0)
        .gid(NOBODY.1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = tokio::io::BufReader::new(idle.stdout.take().unwrap());
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let mut c = d.client().await;
    let t = c.token(["scim:read"]).await.unwrap();
    assert_eq!(t.access_token().expose_secret(), s.idp.issued_tokens()[0]);
    // Once the attacker is gone, its uid's connections are given back as the daemon sees each one close.
    idle.kill().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nobody is still refused after its connections closed: {}",
            stderr(&out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        token_text(&mut c, &["scim:read"]).await,
        s.idp.issued_tokens()[0]
    );
}

#[tokio::test]
async fn nothing_the_daemon_prints_at_trace_level_contains_a_secret_or_a_token() {
    let s = Setup::new().await;
    let tail = format!(
        r#"
[clients.post]
token_url = "{url}"
client_id = "broker"
allow_http = true
client_secret = {{ file = "{dir}/idp.secret" }}
auth_method = "client_secret_post"

[[policy]]
name = "root-post"
match = {{ uid = 0 }}
client = "post"
scopes = ["scim:read"]
"#,
        url = s.idp.token_url(),
        dir = s.dir.path().display()
    );
    let opts = DaemonOptions {
        log: "trace".into(),
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &s.config_with("", &tail), opts).await;
    let mut c = d.client().await;
    c.get_token(TokenRequest::new(["scim:read"]).client("idp"))
        .await
        .unwrap();
    c.get_token(TokenRequest::new(["scim:read"]).client("idp"))
        .await
        .unwrap();
    c.get_token(TokenRequest::new(["scim:read"]).client("post"))
        .await
        .unwrap();
    let out = d
        .cli(Some(NOBODY), &["token", "-c", "idp", "scim:read"])
        .await;
    assert_eq!(out.status.code(), Some(0));
    let _ = c
        .get_token(TokenRequest::new(["openid"]).client("idp"))
        .await
        .unwrap_err();
    // A sloppy server that echoes the secret in its error description.
    s.idp.set_fault(Fault::EchoSecret);
    let _ = c
        .get_token(TokenRequest::new(["scim:write"]).client("idp"))
        .await
        .unwrap_err();
    let _ = c
        .get_token(TokenRequest::new(["scim:write"]).client("post"))
        .await
        .unwrap_err();
    drop(c);
    d.stop().await;

    let log = std::fs::read_to_string(s.dir.path().join("daemon.log")).unwrap();
    // The log is not vacuous: it has the grants, the denial, and the scrubbed IdP description.
    assert!(log.contains("token granted"), "{log}");
    assert!(log.contains("token denied"), "{log}");
    assert!(
        log.contains("client authentication failed for secret '[redacted]'"),
        "{log}"
    );
    let encoded: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("broker:{encoded}"))
    };
    for needle in [SECRET, "s3cr3t", encoded.as_str(), basic.as_str()] {
        assert!(
            !log.contains(needle),
            "the daemon's log contains the secret ({needle:?})"
        );
    }
    let tokens = s.idp.issued_tokens();
    assert_eq!(tokens.len(), 2);
    for t in tokens {
        assert!(!log.contains(&t), "the daemon's log contains a token");
        // The token's first characters are no fingerprint either.
        assert!(
            !log.contains(&t[..13]),
            "the daemon's log contains part of a token"
        );
    }
}

#[tokio::test]
async fn the_daemon_is_not_dumpable() {
    let s = Setup::new().await;
    // Run the daemon as uid 65534: then /proc/<pid>/* belongs to root only if it made itself non-dumpable.
    let config = s.for_nobody(&s.config(), "");
    let opts = DaemonOptions {
        run_as: Some(NOBODY),
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &config, opts).await;
    let status_file = format!("/proc/{}/status", d.pid());
    let status = std::fs::read_to_string(&status_file).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some("65534"),
        "{uid_line}"
    );
    let owner = std::fs::metadata(&status_file).unwrap().uid();
    assert_eq!(
        owner, 0,
        "a dumpable process's /proc entries belong to its own uid"
    );
    // And it still serves.
    let mut c = credbroker_client::Client::connect(s.nobody_socket())
        .await
        .unwrap();
    c.token(["scim:read"]).await.unwrap();
}

#[tokio::test]
async fn config_errors_are_reported_at_once_with_key_paths_and_refuse_start() {
    let s = Setup::new().await;
    s.dir.write("open.secret", "x", 0o644);
    let bad = format!(
        r#"version = 1
colour = "blue"

[daemon]
socket = "{socket}"
socket_mode = "rwx"

[clients.idp]
token_url = "{url}"
client_id = "broker"
allow_http = true
client_secret = "a-literal-secret-in-the-file"
timeout = "soon"

[clients.open]
token_url = "http://idp.example.com/token"
client_id = "x"
client_secret = {{ file = "{dir}/open.secret" }}

[clients.missing]
token_url = "https://idp.example.com/token"
client_id = "y"
client_secret = {{ file = "{dir}/no-such.secret" }}

[[policy]]
name = "p"
match = {{}}
client = "nope"
scopes = ["ok", "not ok"]
"#,
        socket = s.socket().display(),
        url = s.idp.token_url(),
        dir = s.dir.path().display()
    );
    let out = check_config(&s.dir, &bad).await;
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    for key in [
        "colour: unknown key",
        "daemon.socket_mode:",
        "clients.idp.client_secret: a secret must not be written in the config file",
        "clients.idp.timeout:",
        "clients.open.token_url:",
        "clients.open.client_secret:",
        "readable by every user (mode 0644)",
        "clients.missing.client_secret: cannot read",
        "policy[0].match:",
        "policy[0].client: no client named \"nope\"",
        "policy[0].scopes[1]:",
    ] {
        assert!(err.contains(key), "missing {key:?} in:\n{err}");
    }
    assert!(err.contains("10 errors"), "{err}");
    assert!(!err.contains("a-literal-secret-in-the-file"), "{err}");

    // The daemon refuses to start on it, with the same report.
    let path = s.dir.write("bad.toml", &bad, 0o644);
    let run = tokio::process::Command::new(bin("credbrokerd"))
        .arg("--config")
        .arg(&path)
        .output();
    let out = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("policy[0].client"),
        "{}",
        stderr(&out)
    );
    assert!(!s.socket().exists());

    // A good config: exit 0 and a summary without the secret.
    let out = check_config(&s.dir, &s.config()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("client_id = \"broker\"") && summary.contains("nobody-read"),
        "{summary}"
    );
    assert!(
        !summary.contains(SECRET) && !summary.contains("s3cr3t"),
        "{summary}"
    );
    // The summary is the effective config: checked as a config file, it is valid and prints itself.
    let again = check_config(&s.dir, &summary).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(stdout(&again), summary);
}

#[tokio::test]
async fn the_socket_gets_its_mode_and_group_and_a_stale_one_is_replaced() {
    let s = Setup::new().await;
    // A stale socket from a previous run: bound, then abandoned.
    drop(std::os::unix::net::UnixListener::bind(s.socket()).unwrap());
    assert!(s.socket().exists());
    let config = s.config().replace(
        &format!("socket = \"{}\"", s.socket().display()),
        &format!(
            "socket = \"{}\"\nsocket_mode = \"0660\"\nsocket_group = \"nogroup\"",
            s.socket().display()
        ),
    );
    let d = Daemon::start(&s.dir, &config).await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    // nobody (group nogroup) may connect; uid/gid 65533 may not: denied (77), told the socket's mode and
    // group, not that the service might be down.
    let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = d.cli(Some((65533, 65533)), &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    for part in [
        d.socket.display().to_string(),
        "permission denied".to_owned(),
        "mode 0660".to_owned(),
        "group nogroup (65534)".to_owned(),
    ] {
        assert!(
            stderr(&out).contains(&part),
            "{part} missing: {}",
            stderr(&out)
        );
    }
    assert!(
        !stderr(&out).contains("is the service running"),
        "{}",
        stderr(&out)
    );

    // A second daemon on the same socket refuses to steal it.
    let other = tokio::process::Command::new(bin("credbrokerd"))
        .arg("--config")
        .arg(s.dir.path().join("credbroker.toml"))
        .output();
    let out = tokio::time::timeout(WAIT, other).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // Said once.
    assert_eq!(
        stderr(&out).matches("in use").count(),
        1,
        "{}",
        stderr(&out)
    );
    // The first one still serves.
    d.client().await.token(["scim:read"]).await.unwrap();

    // SIGTERM: exit 0 and the socket is gone.
    let socket = d.socket.clone();
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(!socket.exists());
}

#[tokio::test]
async fn denials_are_audited_every_time_and_a_grant_once_per_uid_and_token() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let log_path = s.dir.path().join("daemon.log");
    let mut c = d.client().await;
    for _ in 0..5 {
        c.token(["scim:read"]).await.unwrap();
    }
    for _ in 0..3 {
        c.token(["openid"]).await.unwrap_err();
    }
    // A caller cannot forge audit lines: what it sends is logged escaped, on the denial's own line.
    let forged = "x\nFORGED credbroker::audit: token granted event=\"grant\" uid=0";
    c.get_token(TokenRequest::new([forged]).client("idp"))
        .await
        .unwrap_err();
    let log = d.log();
    let grants: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"grant\""))
        .collect();
    assert_eq!(grants.len(), 1, "{log}");
    let g = grants[0];
    for field in [
        "event=\"grant\"",
        "uid=0",
        "user=\"root\"",
        "client=\"idp\"",
        "requested=scim:read",
        "source=\"idp\"",
        "policies=root-all",
    ] {
        assert!(g.contains(field), "{field} missing in {g}");
    }
    let fp = g
        .split("token=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(fp.len(), 12);
    let denials = log.lines().filter(|l| l.contains("token denied")).count();
    assert_eq!(denials, 4, "{log}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
    assert!(log.contains("x\\nFORGED"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("token denied") && l.contains("reason=scope \"openid\"")),
        "{log}"
    );

    // Grants are logged once per uid and token, not per connection: a caller that reconnects for every
    // call writes no more lines.
    drop(c);
    for _ in 0..3 {
        let mut again = d.client().await;
        again.token(["scim:read"]).await.unwrap();
    }
    let log = d.log();
    assert_eq!(log.matches("event=\"grant\"").count(), 1, "{log}");
    // The repeats are summed up in one event (at the latest when the token expires, or at shutdown).
    d.stop().await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let l = log.lines().find(|l| l.contains("grant-repeats")).unwrap();
    assert!(l.contains("count=7") && l.contains(&fp), "{l}");
}

/// A gRPC client over one already-connected stream.
fn client_over(
    stream: tokio::net::UnixStream,
) -> credbroker_proto::TokenBrokerClient<tonic::transport::Channel> {
    let stream = std::sync::Mutex::new(Some(stream));
    let channel = tonic::transport::Endpoint::from_static("http://peer.invalid")
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let s = stream.lock().unwrap().take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("stream used"))
            }
        }));
    credbroker_proto::TokenBrokerClient::new(channel)
}

#[tokio::test]
async fn a_peer_that_exited_cannot_lend_its_identity_to_whoever_holds_its_connection() {
    use credbroker_proto::pb;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let s = Setup::new().await;
    let d = s.daemon().await;
    let proxy_path = s.dir.path().join("proxy.sock");
    let proxy = tokio::net::UnixListener::bind(&proxy_path).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helpers/exiting_peer.py");
    let mut peer = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&d.socket)
        .arg(&proxy_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = tokio::io::BufReader::new(peer.stdout.take().unwrap());
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let peer_pid: i32 = line.trim().parse().unwrap();
    let (relayed, _) = tokio::time::timeout(WAIT, proxy.accept())
        .await
        .unwrap()
        .unwrap();
    let mut c = client_over(relayed);

    // While the peer lives, the connection carries its identity.
    let me = c.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.caller.unwrap().pid, peer_pid);

    // The peer exits; the relay still holds the connection. Its identity must not outlive it.
    peer.stdin.take().unwrap().write_all(b"\n").await.unwrap();
    tokio::time::timeout(WAIT, peer.wait())
        .await
        .unwrap()
        .unwrap();
    let req = pb::GetTokenRequest {
        scopes: vec!["scim:read".into()],
        ..Default::default()
    };
    let err = c.get_token(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("pid {peer_pid}) has exited")),
        "{}",
        err.message()
    );
    assert_eq!(s.idp.request_count(), 0);
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_daemon_serves_on() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;
    let huge: Vec<String> = (0..1000).map(|i| format!("scim:{i:0>100}")).collect();
    let err = c.token(huge).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Other {
                code: tonic::Code::OutOfRange,
                ..
            } | Error::ResourceExhausted(_)
        ),
        "{err}"
    );
    assert_eq!(s.idp.request_count(), 0);
    c.token(["scim:read"]).await.unwrap();
}
