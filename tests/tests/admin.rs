//! The admin API (`credbroker.admin.v1.Admin`) through the CLI: reload and flush, for `daemon.admins` only,
//! every call audited.

use credbroker_tests::fixture::{NOBODY, SECRET, Setup};
use credbroker_tests::{Daemon, stderr, stdout, token_text};

#[tokio::test]
async fn reload_returns_its_outcome_to_an_admin_and_refuses_others() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let out = d.cli(None, &["reload"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "reloaded: serving 1 client, 2 policies"
    );

    // A broken config: every error comes back (exit 64), and the running config keeps serving.
    s.dir.write(
        "credbroker.toml",
        &s.config()
            .replace("[daemon]\n", "[daemon]\nbogus = 1\ncolour = 2\n"),
        0o644,
    );
    let out = d.cli(None, &["reload"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("credbroker: reload refused, the running config keeps serving; ")
            && stderr(&out).contains("2 errors"),
        "{}",
        stderr(&out)
    );
    for key in ["daemon.bogus", "daemon.colour"] {
        assert!(
            stderr(&out).contains(key),
            "{key} missing: {}",
            stderr(&out)
        );
    }
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;

    // Not an admin: denied (77), and audited either way.
    let out = d.cli(Some(NOBODY), &["reload"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not one of daemon.admins"),
        "{}",
        stderr(&out)
    );
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("event=\"admin\"")
            && l.contains("allowed=true")
            && l.contains("uid=0")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("event=\"admin\"")
            && l.contains("allowed=false")
            && l.contains("uid=65534")),
        "{log}"
    );
}

#[tokio::test]
async fn flush_drops_cached_tokens_so_the_next_call_asks_the_idp_again() {
    let s = Setup::new().await;
    // Admins by group: nobody's primary group.
    let config = s.config().replace(
        "[daemon]\n",
        "[daemon]\nadmins = [\"root\", \"@nogroup\"]\n",
    );
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    let first = token_text(&mut c, &["scim:read"]).await;
    token_text(&mut c, &["scim:read", "scim:write"]).await;
    assert_eq!(s.idp.request_count(), 2);
    assert_eq!(token_text(&mut c, &["scim:read"]).await, first, "cached");

    // Only the entries of that client holding that scope and another: here one.
    let out = d
        .cli(Some(NOBODY), &["flush", "-c", "idp", "scim:write"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "dropped 1 cached entries");
    assert_eq!(
        token_text(&mut c, &["scim:read"]).await,
        first,
        "still cached"
    );
    // Everything.
    let out = d.cli(None, &["flush"]).await;
    assert_eq!(stdout(&out).trim(), "dropped 1 cached entries");
    let again = token_text(&mut c, &["scim:read"]).await;
    assert_ne!(again, first);
    assert_eq!(s.idp.request_count(), 3);
    // Someone who is neither root nor in the group may not.
    let out = d.cli(Some((65533, 65533)), &["flush"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}

/// What the audit log says was handed out: the token fingerprints.
fn fingerprints(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("event=\"grant\""))
        .filter_map(|l| l.split("token=").nth(1))
        .map(|t| {
            t.split([' ', '"'])
                .find(|s| !s.is_empty())
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn status_shows_config_clients_entries_and_callers_but_never_a_token() {
    let s = Setup::new().await;
    // A rate slow enough that the token nobody takes is not given back before `status` shows it.
    let config = s.config().replace(
        "[clients.idp]",
        "rate_limit = { per_minute = 1, burst = 20 }\n\n[clients.idp]",
    );
    let d = Daemon::start(&s.dir, &config).await;
    // nobody asks first: its uid shows with its rate limit (one new token taken).
    let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut c = d.client().await;
    let read = token_text(&mut c, &["scim:read"]).await;
    token_text(&mut c, &["scim:read"]).await;
    let write = token_text(&mut c, &["scim:read", "scim:write"]).await;
    // A scope the IdP does not know: the client's last failure.
    assert!(c.token(["internal_user_mgt_delete"]).await.is_err());

    let out = d.cli(None, &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let config = s.dir.path().join("credbroker.toml");
    for want in [
        "credbrokerd 0.1.0".to_owned(),
        format!("config:  {}", config.display()),
        format!("  idp: {}", s.idp.token_url()),
        "auth client_secret_basic, client_id broker; 3 requests to the IdP, 1 failed".to_owned(),
        "last failure: ".to_owned(),
        "invalid_scope".to_owned(),
        "idp [scim:read]".to_owned(),
        "idp [scim:read scim:write]".to_owned(),
        "2 hits".to_owned(),
        "uid 65534 (nobody): 0 connections, 0 calls in flight; new tokens: 19.".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing from:\n{text}");
    }
    for fp in fingerprints(&d.log()) {
        assert!(
            text.contains(&format!("token {fp}")),
            "{fp} missing:\n{text}"
        );
    }

    let out = d.cli(None, &["status", "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let digest = std::process::Command::new("sha256sum")
        .arg(&config)
        .output()
        .unwrap();
    let digest = String::from_utf8(digest.stdout).unwrap();
    assert_eq!(
        json["daemon"]["config"]["sha256"].as_str().unwrap(),
        digest.split(' ').next().unwrap()
    );
    assert_eq!(json["cache"]["entries"], 3, "{json}");
    let entries = json["entries"].as_array().unwrap();
    let read_entry = entries
        .iter()
        .find(|e| e["scopes"] == serde_json::json!(["scim:read"]))
        .unwrap();
    assert_eq!(read_entry["hits"], 2, "{read_entry}");
    assert!(read_entry["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(read_entry["renews_at"].is_string());
    assert_eq!(json["clients"][0]["last_failure"]["code"], "invalid_scope");
    assert!(json["clients"][0]["last_success"].is_string());

    // Never a token or a secret, in either format.
    for output in [&text, &stdout(&out)] {
        for secret in [read.as_str(), write.as_str(), SECRET] {
            assert!(!output.contains(secret), "{secret} leaked:\n{output}");
        }
    }

    // Not an admin: 77.
    let out = d.cli(Some(NOBODY), &["status"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}

#[tokio::test]
async fn explain_judges_described_callers_and_live_processes_with_the_daemons_policies() {
    let s = Setup::new().await;
    let config = s.config_with(
        "",
        r#"
[[policy]]
name = "sh-write"
match = { user = "nobody", exe = "/bin/sh" }
client = "idp"
scopes = ["scim:write"]
"#,
    );
    let d = Daemon::start(&s.dir, &config).await;

    // Allowed.
    let out = d
        .cli(None, &["explain", "--user", "nobody", "scim:read"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("decision: allowed (client idp, by nobody-read)"),
        "{}",
        stdout(&out)
    );

    // Denied: the first refused scope, and the policies that came close with their failing key.
    let out = d
        .cli(
            None,
            &["explain", "--user", "nobody", "scim:read", "scim:write"],
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "matching policies:\n  nobody-read: idp [scim:read]",
        "first refused scope: scim:write",
        "nobody-read: scopes do not allow \"scim:write\"",
        "root-all: match.uid wants 0; the caller has 65534",
        "sh-write: match.exe wants \"/bin/sh\"",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // The executable, by file identity: /bin/sh is the file the policy names.
    let out = d
        .cli(
            None,
            &[
                "explain",
                "--uid",
                "65534",
                "--exe",
                "/bin/sh",
                "scim:write",
            ],
        )
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    // Another file at a path that merely looks alike does not match.
    let copy = s.dir.path().join("sh");
    std::fs::copy("/bin/sh", &copy).unwrap();
    let out = d
        .cli(
            None,
            &[
                "explain",
                "--uid",
                "65534",
                "--exe",
                copy.to_str().unwrap(),
                "scim:write",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));

    // Unknown callers: a uid no policy names is denied, with every policy's failing key; a user, group or
    // client that does not exist is bad input.
    let out = d
        .cli(
            None,
            &[
                "explain", "--uid", "40001", "--group", "40001", "--format", "json",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["matching"], serde_json::json!([]));
    assert_eq!(json["near_misses"].as_array().unwrap().len(), 3, "{json}");
    for args in [
        &["explain", "--user", "no-such-user", "scim:read"][..],
        &["explain", "--uid", "40001", "scim:read"],
        &["explain", "--uid", "0", "--group", "no-such-group"],
        &["explain", "--uid", "0", "-c", "nope", "scim:read"],
        &["explain", "--uid", "0", "bad scope\u{7}"],
        &["explain", "scim:read"],
    ] {
        let out = d.cli(None, args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }

    // A live process of another uid, identified by the kernel: nobody, running sleep.
    let mut sleeper = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = sleeper.id().unwrap().to_string();
    // setpriv execs sleep: wait until the process runs it, so the kernel's view is sleep's.
    credbroker_tests::wait_for("setpriv to exec sleep", || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("sleep"))
    })
    .await;
    let out = d.cli(None, &["explain", "--pid", &pid, "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "caller:  uid 65534 (nobody), groups nogroup, pid {pid}"
        )),
        "{text}"
    );
    assert!(text.contains("exe /usr/bin/sleep"), "{text}");
    let out = d.cli(None, &["explain", "--pid", &pid, "scim:write"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    sleeper.kill().await.unwrap();
    sleeper.wait().await.unwrap();
    let out = d.cli(None, &["explain", "--pid", &pid, "scim:read"]).await;
    assert_eq!(
        out.status.code(),
        Some(64),
        "a dead process: {}",
        stderr(&out)
    );

    // Only admins.
    let out = d
        .cli(Some(NOBODY), &["explain", "--uid", "0", "scim:read"])
        .await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}

/// A daemon without `CAP_SYS_PTRACE` (here running as uid 65534) cannot read the executable of another
/// user's process: explain says so, and `exe` policies do not match it, as on a real call.
#[tokio::test]
async fn explain_says_when_the_daemon_cannot_read_a_process_executable() {
    let s = Setup::new().await;
    let config = s.for_nobody(
        &s.config_with(
            "",
            "\n[[policy]]\nname = \"sleep-only\"\nmatch = { uid = 0, exe = \"/usr/bin/sleep\" }\n\
             client = \"idp\"\nscopes = [\"sleep:only\"]\n",
        ),
        "admins = [\"nobody\"]",
    );
    let opts = credbroker_tests::DaemonOptions {
        run_as: Some(NOBODY),
        ..credbroker_tests::DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &config, opts).await;
    // A process of root's, running sleep.
    let mut sleeper = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = sleeper.id().unwrap().to_string();
    let out = d
        .cli(Some(NOBODY), &["explain", "--pid", &pid, "sleep:only"])
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains(&format!("cannot read the executable of pid {pid}")),
        "{text}"
    );
    assert!(text.contains("sleep-only: match.exe"), "{text}");
    sleeper.kill().await.unwrap();
}
