//! The `credbroker` CLI and the client library against the real daemon: `exec`, `whoami`, exit codes, error
//! messages, completions and man page; reconnecting after a daemon restart, in-process token reuse, the
//! blocking facade and the reqwest integration.

use std::process::Stdio;

use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Client, RequestBuilderExt, TokenRequest};
use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::{Daemon, WAIT, bin, run_cli, stderr, stdout};
use tokio::io::AsyncBufReadExt;

#[tokio::test]
async fn exec_hands_the_token_to_the_command_in_its_environment_only() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // The token arrives in ACCESS_TOKEN, the command's exit status is passed through, and the token is on
    // no command line.
    let script = r#"echo "$ACCESS_TOKEN"; tr '\0' ' ' < /proc/$$/cmdline; echo; exit 7"#;
    let out = d
        .cli(
            Some(NOBODY),
            &["exec", "-s", "scim:read", "--", "sh", "-c", script],
        )
        .await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let token = s.idp.issued_tokens()[0].clone();
    assert_eq!(lines.next(), Some(token.as_str()));
    let cmdline = lines.next().unwrap();
    assert!(
        cmdline.starts_with("sh -c") && !cmdline.contains(&token),
        "{cmdline}"
    );

    // --env names the variable; -s takes several scopes.
    let out = d
        .cli(
            None,
            &[
                "exec",
                "--env",
                "API_TOKEN",
                "-s",
                "scim:read",
                "scim:write",
                "--",
                "sh",
                "-c",
                "echo \"$API_TOKEN\"",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), s.idp.issued_tokens()[1]);
    assert_eq!(s.idp.requests()[1].scope, "scim:read scim:write");

    // Denied: the command never runs.
    let out = d
        .cli(
            Some(NOBODY),
            &["exec", "-s", "scim:write", "--", "sh", "-c", "echo ran"],
        )
        .await;
    assert_eq!(out.status.code(), Some(77));
    assert!(!stdout(&out).contains("ran"));

    // A command that does not exist: 127, as a shell would say.
    let out = d
        .cli(None, &["exec", "-s", "scim:read", "--", "/nonexistent/cmd"])
        .await;
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot run /nonexistent/cmd"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn signals_sent_to_exec_reach_the_command() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut cmd = tokio::process::Command::new(bin("credbroker"));
    cmd.arg("--socket")
        .arg(&d.socket)
        .args([
            "exec",
            "-s",
            "scim:read",
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(42));
}

#[tokio::test]
async fn whoami_text_shows_the_kernel_view_and_grants() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let out = d.cli(Some(NOBODY), &["whoami"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("uid:    65534 (nobody)"), "{text}");
    assert!(text.contains("groups: nogroup"), "{text}");
    assert!(
        text.contains(&format!("exe:    {}", bin("credbroker").display())),
        "{text}"
    );
    assert!(text.contains("grant:  idp: scim:read"), "{text}");
}

#[tokio::test]
async fn usage_errors_exit_64_and_an_unreachable_daemon_exits_75_naming_the_socket() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    for args in [
        &["token"][..],
        &["token", "--format", "xml", "a"],
        &["token", "--min-ttl", "soon", "a"],
        &["frobnicate"],
        &["exec", "-s", "a"],
    ] {
        let out = d.cli(None, args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    let out = d.cli(None, &["--help"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("77  denied"), "{}", stdout(&out));

    let missing = s.dir.path().join("nowhere.sock");
    let mut cmd = tokio::process::Command::new(bin("credbroker"));
    cmd.arg("token")
        .arg("scim:read")
        .env("CREDBROKER_SOCKET", &missing);
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(75));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("systemctl status"),
        "{err}"
    );
}

#[tokio::test]
async fn completions_and_man_pages_are_complete_and_lint_clean() {
    let mut cmd = tokio::process::Command::new(bin("credbroker"));
    cmd.args(["completions", "bash"]);
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("_credbroker()") && stdout(&out).contains("whoami"));

    let page = |program: &str, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(bin(program));
        cmd.args(args);
        cmd
    };
    // credbroker(1): every subcommand with its options, exit status, environment; no page it does not have.
    let man = stdout(&run_cli(page("credbroker", &["manpage"]), None).await);
    assert!(man.contains(".TH credbroker 1"), "{man}");
    for part in [
        ".SS \"credbroker token\"",
        ".SS \"credbroker exec\"",
        ".SS \"credbroker whoami\"",
        ".SS \"credbroker completions\"",
        "\\-\\-min\\-ttl",
        "\\-\\-format",
        "\\-\\-env",
        "\\-\\-socket",
        ".SH \"EXIT STATUS\"",
        "74  the output could not be written",
        "77  denied",
        "CREDBROKER_SOCKET",
    ] {
        assert!(man.contains(part), "{part} missing in credbroker(1)");
    }
    assert!(
        !man.contains("credbroker\\-token(1)"),
        "refers to a page that does not exist"
    );
    // credbrokerd(8) and credbroker.toml(5).
    let daemon = stdout(&run_cli(page("credbrokerd", &["manpage", "credbrokerd"]), None).await);
    for part in [
        ".TH credbrokerd 8",
        ".SH SIGNALS",
        "SIGHUP",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
        "check\\-config",
    ] {
        assert!(daemon.contains(part), "{part} missing in credbrokerd(8)");
    }
    let toml = stdout(&run_cli(page("credbrokerd", &["manpage", "credbroker.toml"]), None).await);
    for key in [
        "daemon.max_connections_per_uid",
        "clients.NAME.allow_http",
        "policy.match.any_user",
    ] {
        assert!(toml.contains(key), "{key} missing in credbroker.toml(5)");
    }
    // mandoc finds nothing at warning level in any of them.
    for (name, text) in [
        ("credbroker.1", &man),
        ("credbrokerd.8", &daemon),
        ("credbroker.toml.5", &toml),
    ] {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let mut lint = tokio::process::Command::new("mandoc");
        lint.args(["-T", "lint", "-W", "warning"]).arg(&path);
        let out = run_cli(lint, None).await;
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn the_library_reconnects_after_the_daemon_restarts() {
    let s = Setup::new().await;
    let config = s.config();
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    c.token(["scim:read"]).await.unwrap();
    assert_eq!(d.stop().await.code(), Some(0));
    // While it is down: a retryable connection error.
    let err = c.token(["scim:read"]).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let d = Daemon::start(&s.dir, &config).await;
    // Same client, no reconnect call: it just works again.
    let t = c.token(["scim:read"]).await.unwrap();
    assert_eq!(t.access_token().expose_secret(), s.idp.issued_tokens()[1]);
    drop(d);
}

#[tokio::test]
async fn a_token_source_reuses_its_token_without_asking_the_daemon() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let source = d
        .client()
        .await
        .token_source(TokenRequest::new(["scim:read"]));
    let first = source.token().await.unwrap();
    // The daemon is gone: a reused token does not need it.
    d.stop().await;
    for _ in 0..100 {
        let t = source.token().await.unwrap();
        assert_eq!(
            t.access_token().expose_secret(),
            first.access_token().expose_secret()
        );
    }
    // (When the token nears its min TTL the source asks the daemon again: see the client's unit tests.)
}

#[test]
fn the_blocking_facade_works_without_an_async_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (s, d) = rt.block_on(async {
        let s = Setup::new().await;
        let d = s.daemon().await;
        (s, d)
    });
    let socket = d.socket.clone();
    // A plain thread, as in a program with no runtime of its own.
    let token = std::thread::spawn(move || {
        let mut c = credbroker_client::blocking::Client::connect(&socket).unwrap();
        assert_eq!(c.whoami().unwrap().uid, 0);
        c.token(["scim:read"])
            .unwrap()
            .access_token()
            .expose_secret()
            .to_owned()
    })
    .join()
    .unwrap();
    assert_eq!(token, s.idp.issued_tokens()[0]);
    drop(d);
    drop(rt);
}

#[tokio::test]
async fn the_reqwest_integration_sets_a_sensitive_bearer_header() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c: Client = d.client().await;
    let token = c.token(["scim:read"]).await.unwrap();
    // The workspace builds reqwest with rustls and no default crypto provider (the daemon installs ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let request = reqwest::Client::new()
        .get("http://127.0.0.1:9/")
        .credbroker_auth(&token)
        .build()
        .unwrap();
    let value = request.headers().get("authorization").unwrap();
    assert_eq!(
        value.to_str().unwrap(),
        format!("Bearer {}", s.idp.issued_tokens()[0])
    );
    assert!(value.is_sensitive());
}

/// Runs `credbroker token scim:read` against `d` through `sh -c`, with `redirect` applied to its stdout.
async fn token_with_stdout(d: &Daemon, redirect: &str) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "exec \"$0\" --socket \"$1\" token scim:read {redirect}"
        ))
        .arg(bin("credbroker"))
        .arg(&d.socket);
    run_cli(cmd, None).await
}

#[tokio::test]
async fn output_that_cannot_be_written_exits_74_never_0_and_never_panics() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    for redirect in [">/dev/full"] {
        let out = token_with_stdout(&d, redirect).await;
        assert_eq!(out.status.code(), Some(74), "{redirect}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("credbroker: cannot write the output"),
            "{redirect}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    // A pipe whose reader has gone: EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // (spawn, not output(): tokio's output() would replace stdout with its own pipe)
    let child = tokio::process::Command::new(bin("credbroker"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["token", "scim:read"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(74), "{}", stderr(&out));
    assert!(stderr(&out).contains("Broken pipe"), "{}", stderr(&out));
    // Output to /dev/null on purpose is a success, however it was opened: write-only as a shell does,
    // read-write as Python's subprocess.DEVNULL and systemd's StandardOutput=null do, or by Rust's runtime
    // for a standard output that was closed (the two cannot be told apart, so neither is an error).
    for redirect in [">/dev/null", "<>/dev/null 1<&0", ">&-"] {
        let out = token_with_stdout(&d, redirect).await;
        assert_eq!(out.status.code(), Some(0), "{redirect}: {}", stderr(&out));
    }
    // Python, running it only for its exit status.
    let script = "import subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n\
                  sys.exit(r.returncode)";
    let mut cmd = tokio::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", script])
        .arg(bin("credbroker"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["token", "scim:read"]);
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn the_daemon_never_gives_a_socket_the_standard_descriptors() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // A daemon started with stdin, stdout and stderr closed still has them, on /dev/null.
    let config = s.dir.path().join("credbroker.toml");
    let other = s.dir.path().join("other.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("credbroker.sock", "other.sock");
    std::fs::write(&other, text).unwrap();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" --config \"$1\" <&- >&- 2>&-")
        .arg(bin("credbrokerd"))
        .arg(&other)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = s.dir.path().join("other.sock");
    credbroker_tests::wait_for("the second daemon's socket", || socket.exists()).await;
    let pid = child.id().unwrap();
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
    }
    let mut c = Client::connect(&socket).await.unwrap();
    c.token(["scim:read"]).await.unwrap();
    let _ = child.kill().await;
    drop(d);
}

#[tokio::test]
async fn credbrokerd_names_itself_and_check_config_warns_and_reports_every_duplicate() {
    let out = run_cli(
        {
            let mut c = tokio::process::Command::new(bin("credbrokerd"));
            c.arg("--version");
            c
        },
        None,
    )
    .await;
    assert!(stdout(&out).starts_with("credbrokerd "), "{}", stdout(&out));

    let s = Setup::new().await;
    let tail = r#"
[[policy]]
name = "nobody-read"
match = { user = "no-such-user-here" }
client = "idp"
scopes = ["scim:read"]

[[policy]]
name = "ghosts"
match = { group = "no-such-group-here" }
client = "nope"
scopes = ["scim:read"]

[[policy]]
name = "ghosts"
match = { uid = 5 }
client = "idp"
scopes = ["scim:read"]
"#;
    let out = credbroker_tests::check_config(&s.dir, &s.config_with("", tail)).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    // Both duplicates, though one of them has another error too.
    assert!(
        err.contains("policy[2].name: duplicate policy name \"nobody-read\""),
        "{err}"
    );
    assert!(
        err.contains("policy[4].name: duplicate policy name \"ghosts\""),
        "{err}"
    );
    assert!(err.contains("policy[3].client"), "{err}");

    // Valid, but naming a user and a group that do not exist: warnings.
    let tail = r#"
[[policy]]
name = "ghost-user"
match = { user = "no-such-user-here" }
client = "idp"
scopes = ["scim:read"]

[[policy]]
name = "ghost-group"
match = { group = "no-such-group-here" }
client = "idp"
scopes = ["scim:read"]
"#;
    let out = credbroker_tests::check_config(&s.dir, &s.config_with("", tail)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning: policy[2].match.user: no user named \"no-such-user-here\""),
        "{err}"
    );
    assert!(
        err.contains("warning: policy[3].match.group: no group named \"no-such-group-here\""),
        "{err}"
    );
}

#[tokio::test]
async fn rough_edges_a_newcomer_met_are_gone() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // exec without `--`: the command was read as a scope; now the error says so.
    let out = d.cli(None, &["exec", "-s", "scim:read", "env"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("goes after `--`"), "{}", stderr(&out));
    // Printing completions or the man page asks no daemon: --socket is a mistake there.
    for args in [&["completions", "bash"][..], &["manpage"]] {
        let out = d.cli(None, args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--socket does not apply"),
            "{}",
            stderr(&out)
        );
    }
    // Each command's help lists its own exit codes.
    let help = |args: &'static [&'static str]| async move {
        let mut cmd = tokio::process::Command::new(bin("credbroker"));
        cmd.args(args);
        stdout(&run_cli(cmd, None).await)
    };
    let token = help(&["token", "--help"]).await;
    assert!(token.contains("78  operator action needed"), "{token}");
    for admin in [
        &["status", "--help"][..],
        &["reload", "--help"],
        &["flush", "--help"],
    ] {
        let text = help(admin).await;
        assert!(
            text.contains("77  this user is not one of the daemon's admins"),
            "{text}"
        );
        assert!(
            !text.contains("78  operator"),
            "{admin:?} repeats token's codes: {text}"
        );
    }
    let whoami = help(&["whoami", "--help"]).await;
    assert!(
        !whoami.contains("78  operator") && whoami.contains("75  the daemon is unreachable"),
        "{whoami}"
    );
    // One convention for man pages: `manpage`, for both programs (credbrokerd's old `man` still works).
    for args in [
        &["manpage"][..],
        &["manpage", "credbroker.toml"],
        &["man", "credbrokerd"],
    ] {
        let mut cmd = tokio::process::Command::new(bin("credbrokerd"));
        cmd.args(args);
        let out = run_cli(cmd, None).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(
            stdout(&out).starts_with(".ie") || stdout(&out).contains(".TH"),
            "{args:?}"
        );
    }
    // The stand-in's --help is help, not an error with a backtrace.
    let mut cmd = tokio::process::Command::new(bin("credbroker-stand-in-idp"));
    cmd.arg("--help").env("RUST_BACKTRACE", "1");
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("usage:") && !stderr(&out).contains("backtrace"));
    // A denial's audit line names the client its message names, though the request named none.
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77));
    assert!(
        stderr(&out).contains("of client \"idp\""),
        "{}",
        stderr(&out)
    );
    let log = d.log();
    let line = log.lines().find(|l| l.contains("event=\"deny\"")).unwrap();
    assert!(line.contains("client=\"idp\""), "{line}");
}
