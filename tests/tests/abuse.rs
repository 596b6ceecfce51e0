//! Every local user may be hostile. These tests attack the real daemon from other uids with raw sockets and
//! hand-made HTTP/2 frames (`helpers/attacker.py`), and check what a user would notice: the daemon stays
//! alive and small, a legitimate caller keeps being served, a forged identity is refused, and the log stays
//! short. None of them asserts a latency: those are benchmark figures (`scripts/bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use credbroker_client::TokenRequest;
use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::{Daemon, DaemonOptions, WAIT, bin, stderr, token_text};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The system's Python, which every uid can run (a `python3` first on root's PATH may not be).
const PYTHON: &str = "/usr/bin/python3";
/// The bound on the daemon's resident memory under attack.
const MAX_RSS_KIB: u64 = 64 * 1024;
/// Unprivileged uids that no policy of the fixture matches.
const STRANGER: (u32, u32) = (40001, 40001);
const OTHER_STRANGER: (u32, u32) = (40002, 40002);

/// A running attacker: its report, and the connections it holds until released.
struct Attacker {
    child: tokio::process::Child,
    report: serde_json::Value,
}

async fn attack(socket: &Path, who: (u32, u32), args: &[&str], env: &[(&str, &str)]) -> Attacker {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("helpers/attacker.py");
    let mut child = tokio::process::Command::new(PYTHON)
        .arg(script)
        .arg(socket)
        .args(args)
        .envs(env.iter().copied())
        .uid(who.0)
        .gid(who.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    tokio::time::timeout(WAIT * 4, out.read_line(&mut line))
        .await
        .expect("attacker reports in time")
        .unwrap();
    let report = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Attacker { child, report }
}

impl Attacker {
    async fn release(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"\n").await;
        }
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// The fixture's daemon logging at the default level (`info`), as it runs in production: what it writes
/// under attack is what these tests bound.
async fn info_daemon(s: &Setup) -> Daemon {
    let opts = DaemonOptions {
        log: "info".to_owned(),
        ..DaemonOptions::default()
    };
    Daemon::start_with(&s.dir, &s.config(), opts).await
}

/// Bytes the daemon logged since `from`, less the legitimate caller's grant events.
fn attack_log_bytes(d: &Daemon, from: usize) -> usize {
    d.log()[from..]
        .lines()
        .filter(|l| !l.contains("event=\"grant"))
        .map(|l| l.len() + 1)
        .sum()
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test]
async fn unfinished_messages_on_every_stream_of_a_thousand_connections_stay_within_64_mib() {
    let s = Setup::new().await;
    let d = info_daemon(&s).await;
    let mut c = d.client().await;
    let token = token_text(&mut c, &["scim:read"]).await;
    let log_before = d.log().len();

    // uid 65534 (a policy matches it) opens 1000 connections, on each as many streams as it can, every one a
    // message declaring the largest size allowed that never ends.
    let a = attack(&d.socket, NOBODY, &["streams", "1000"], &[]).await;
    assert!(a.report["streams"].as_u64().unwrap() >= 16, "{}", a.report);
    // It holds no more connections than its uid may.
    assert!(a.report["held"].as_u64().unwrap() <= 64, "{}", a.report);

    // A legitimate caller (another uid) is served throughout, on a new connection.
    let mut legit = d.client().await;
    assert_eq!(token_text(&mut legit, &["scim:read"]).await, token);
    let (rss, peak) = memory_kib(d.pid());
    assert!(
        peak < MAX_RSS_KIB,
        "peak RSS {peak} KiB (now {rss} KiB) over {MAX_RSS_KIB} KiB"
    );
    a.release().await;

    // Still alive, still serving; and the attack did not flood the log.
    assert_eq!(token_text(&mut c, &["scim:read"]).await, token);
    let written = attack_log_bytes(&d, log_before);
    assert!(written < 16 * 1024, "{written} log bytes during the attack");
}

#[tokio::test]
async fn callers_no_policy_matches_share_one_budget_and_cannot_lock_out_others() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // One stranger holds every connection the unmatched callers may have...
    let a = attack(&d.socket, STRANGER, &["preface", "200"], &[]).await;
    assert_eq!(a.report["held"].as_u64(), Some(64), "{}", a.report);
    // ...so another uid gains nothing by being another uid (as a user with a subordinate uid range would).
    let b = attack(&d.socket, OTHER_STRANGER, &["preface", "10"], &[]).await;
    assert_eq!(b.report["held"].as_u64(), Some(0), "{}", b.report);
    // Callers that policies name are not affected.
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;
    let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    a.release().await;
    b.release().await;
}

#[tokio::test]
async fn ten_thousand_connection_attempts_do_not_lock_out_another_uid() {
    let s = Setup::new().await;
    let d = info_daemon(&s).await;
    let mut c = d.client().await;
    let token = token_text(&mut c, &["scim:read"]).await;
    let log_before = d.log().len();
    let flood = attack(&d.socket, NOBODY, &["attempts", "10000"], &[]);
    tokio::pin!(flood);
    // While the flood goes on, new connections of another uid keep being served.
    let mut served = 0;
    let a = loop {
        tokio::select! {
            a = &mut flood => break a,
            () = async {
                let mut fresh = d.client().await;
                assert_eq!(token_text(&mut fresh, &["scim:read"]).await, token);
                served += 1;
            } => {}
        }
    };
    assert!(served >= 1);
    assert_eq!(a.report["attempts"].as_u64(), Some(10000), "{}", a.report);
    assert!(a.report["held"].as_u64().unwrap() <= 64, "{}", a.report);
    a.release().await;
    assert_eq!(token_text(&mut c, &["scim:read"]).await, token);
    // Refused connections are counted, not logged one by one.
    let written = attack_log_bytes(&d, log_before);
    assert!(written < 16 * 1024, "{written} log bytes during the flood");
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let s = Setup::new().await;
    let config = s
        .config()
        .replace("[daemon]\n", "[daemon]\nidle_timeout = \"1s\"\n");
    let d = Daemon::start(&s.dir, &config).await;
    // No preface: closed after the handshake deadline.
    let mut silent = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the daemon closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A preface and no call: closed after the first-call deadline (the idle timeout, when shorter).
    let a = attack(&d.socket, NOBODY, &["preface", "1"], &[]).await;
    assert_eq!(a.report["held"].as_u64(), Some(1));
    a.release().await;
    // A call, then nothing: closed after the idle timeout.
    let a = attack(&d.socket, NOBODY, &["call-then-idle"], &[]).await;
    assert_eq!(a.report["result"], "granted", "{}", a.report);
    let closed_after = a.report["closed_after"].as_f64().unwrap();
    assert!(closed_after < 25.0, "{}", a.report);
    // An HTTP/1.1 request head that never ends: closed too (within the first-call or header deadline).
    let a = attack(&d.socket, NOBODY, &["slow-head"], &[]).await;
    let closed_after = a.report["closed_after"].as_f64().unwrap();
    assert!(closed_after < 25.0, "{}", a.report);
}

/// The daemon's audit events and warnings, for failure messages.
fn audit_lines(d: &Daemon) -> String {
    d.log()
        .lines()
        .filter(|l| l.contains("credbroker::audit") || l.contains(" WARN "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A copy of `from` at `to`, executable by everyone.
fn copy_exe(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    to.to_owned()
}

/// The fixture's config where `scim:write` is only for uid 65534 running `exe`.
fn exe_config(s: &Setup, exe: &Path) -> String {
    s.config_with(
        "",
        &format!(
            "\n[[policy]]\nname = \"by-exe\"\nmatch = {{ uid = 65534, exe = \"{}\" }}\nclient = \"idp\"\nscopes = [\"scim:write\"]\n",
            exe.display()
        ),
    )
}

#[tokio::test]
async fn a_process_that_execs_after_connecting_is_judged_by_what_it_was_and_refused_once_changed() {
    let s = Setup::new().await;
    let python = std::fs::canonicalize(PYTHON).unwrap();
    // Control: the program that connected is the allowed one, and a child using its connection is served.
    let d = Daemon::start(&s.dir, &exe_config(&s, &python)).await;
    let a = attack(&d.socket, NOBODY, &["call"], &[("SCOPE", "scim:write")]).await;
    assert_eq!(
        a.report["result"],
        "granted",
        "{}\n{}",
        a.report,
        audit_lines(&d)
    );
    d.stop().await;

    // The attack: connect as something else, then exec the allowed program while a child calls. The daemon
    // judges the program it saw at accept.
    let sleep = std::fs::canonicalize("/usr/bin/sleep").unwrap();
    let d = Daemon::start(&s.dir, &exe_config(&s, &sleep)).await;
    let a = attack(
        &d.socket,
        NOBODY,
        &["exec-swap", sleep.to_str().unwrap()],
        &[("SCOPE", "scim:write")],
    )
    .await;
    assert_eq!(a.report["result"], "refused", "{}", a.report);
    d.stop().await;

    // The other way round: the allowed program connects, then execs another one (whatever it was made to
    // run); the call on its connection is refused because the executable changed since accept.
    let d = Daemon::start(&s.dir, &exe_config(&s, &python)).await;
    let a = attack(
        &d.socket,
        NOBODY,
        &["exec-swap", sleep.to_str().unwrap()],
        &[("SCOPE", "scim:write")],
    )
    .await;
    assert_eq!(a.report["result"], "refused", "{}", a.report);
    assert!(
        d.log()
            .contains("has executed another program since it connected"),
        "{}",
        audit_lines(&d)
    );
    assert_eq!(s.idp.request_count(), 1, "only the control reached the IdP");
}

#[tokio::test]
async fn a_bind_mount_over_the_allowed_path_does_not_pass_for_it() {
    let s = Setup::new().await;
    let dir = s.dir.path();
    let allowed = copy_exe(Path::new("/usr/bin/true"), &dir.join("allowed"));
    let evil = copy_exe(&bin("credbroker"), &dir.join("evil"));
    let s = &s;
    let run = |policy_exe: &Path, shell: String| {
        let config = exe_config(s, policy_exe);
        async move {
            let d = Daemon::start(&s.dir, &config).await;
            let out = tokio::time::timeout(
                WAIT,
                tokio::process::Command::new("unshare")
                    .args(["-m", "sh", "-c", &shell])
                    .env("CREDBROKER_SOCKET", &d.socket)
                    .output(),
            )
            .await
            .unwrap()
            .unwrap();
            (d, out)
        }
    };
    let as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups";
    // Control: the program itself, where a policy names it, is served.
    let (_d, out) = run(
        &evil,
        format!(
            "exec {as_nobody} {} token -c idp scim:write",
            evil.display()
        ),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    _d.stop().await;
    // The attack: in a mount namespace of its own, the caller's program is mounted over the allowed path,
    // so /proc/<pid>/exe reads as that path. The daemon compares files, not strings.
    let (d, out) = run(
        &allowed,
        format!(
            "mount --bind {evil} {allowed} && exec {as_nobody} {allowed} token -c idp scim:write",
            evil = evil.display(),
            allowed = allowed.display()
        ),
    )
    .await;
    assert_eq!(out.status.code(), Some(77), "{}\n{}", stderr(&out), d.log());
}

#[tokio::test]
async fn a_denial_flood_writes_short_lines_at_a_bounded_rate() {
    let s = Setup::new().await;
    let d = info_daemon(&s).await;
    let mut c = d.client().await;
    let log_before = d.log().len();
    // 64 scopes of 250 control bytes each: escaped, one would make a 100 KB line.
    let hostile: Vec<String> = (0..64).map(|_| "\u{1}".repeat(250)).collect();
    for _ in 0..2000 {
        let e = c
            .get_token(TokenRequest::new(hostile.clone()).client("idp"))
            .await
            .unwrap_err();
        assert!(e.is_invalid_request(), "{e}");
    }
    let log = d.log()[log_before..].to_owned();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1536, "a {longest}-byte log line");
    let denials = log.lines().filter(|l| l.contains("token denied")).count();
    assert!((20..500).contains(&denials), "{denials} denials logged");
    assert!(log.len() < 64 * 1024, "{} log bytes", log.len());
    // What was not logged is counted, and said once the uid may log again (its rate refills in seconds).
    tokio::time::timeout(WAIT, async {
        while !d.log().contains("event=\"deny-suppressed\"") {
            let _ = c.token(["openid"]).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a deny-suppressed summary");
}

#[tokio::test]
async fn the_socket_cannot_be_redirected_nor_removed_from_under_a_successor() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new().await;
    // A socket directory others may rearrange (writable by all, not sticky) is refused.
    let open_dir = s.dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = s.config().replace(
        &s.socket().display().to_string(),
        &open_dir.join("credbroker.sock").display().to_string(),
    );
    let path = s.dir.write("open.toml", &config, 0o644);
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(bin("credbrokerd"))
            .arg("--config")
            .arg(&path)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not be writable by others"),
        "{}",
        stderr(&out)
    );
    // Sticky, like /tmp, is fine: nobody else can rename or remove the daemon's entry.
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sticky = Daemon::start(&s.dir, &config).await;
    assert_eq!(
        std::fs::metadata(&sticky.socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o666
    );
    sticky.stop().await;

    // An old instance still draining must not remove the socket of the instance that replaced it.
    let old = Daemon::start(&s.dir, &s.config()).await;
    std::fs::remove_file(&old.socket).unwrap();
    let new = Daemon::start(&s.dir, &s.config()).await;
    assert_eq!(old.stop().await.code(), Some(0));
    assert!(
        new.socket.exists(),
        "the old instance removed its successor's socket"
    );
    let mut c = new.client().await;
    token_text(&mut c, &["scim:read"]).await;
    let socket = new.socket.clone();
    assert_eq!(new.stop().await.code(), Some(0));
    assert!(!socket.exists(), "an instance removes its own socket");
}

#[tokio::test]
async fn a_policy_exe_the_daemon_cannot_see_is_a_warning_and_matches_nobody() {
    let s = Setup::new().await;
    let hidden = s.dir.path().join("not-here");
    let d = Daemon::start(&s.dir, &exe_config(&s, &hidden)).await;
    assert!(
        d.log().contains("cannot see") && d.log().contains("not-here"),
        "{}",
        d.log()
    );
    let out = d
        .cli(Some(NOBODY), &["token", "-c", "idp", "scim:write"])
        .await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}
