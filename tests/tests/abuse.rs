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

/// A child process killed when dropped.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
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
        while !d.log().contains("event=\"suppressed\"") {
            let _ = c.token(["openid"]).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a suppressed summary");
}

#[tokio::test]
async fn the_socket_cannot_be_redirected_nor_removed_from_under_a_successor() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
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
        stderr(&out).contains("be writable by its owner only"),
        "{}",
        stderr(&out)
    );
    // Sticky, like /tmp, is refused too: another user could bind the socket's name before the daemon (and
    // be what callers talk to), as a squatter does here.
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let squat = std::process::Command::new(PYTHON)
        .args([
            "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print(flush=True); sys.stdin.readline()",
        ])
        .arg(open_dir.join("credbroker.sock"))
        .uid(STRANGER.0)
        .gid(STRANGER.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut squat = scopeguard(squat);
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squat.0.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
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
        stderr(&out).contains("bind the socket's name first"),
        "{}",
        stderr(&out)
    );
    drop(squat);

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

/// The fixture's config, with a policy for each of the strangers too: three uids with budgets of their own.
fn three_users_config(s: &Setup) -> String {
    s.config_with(
        "",
        &format!(
            "\n[[policy]]\nname = \"strangers\"\nmatch = {{ uid = [{}, {}] }}\nclient = \"idp\"\nscopes = [\"scim:read\"]\n",
            STRANGER.0, OTHER_STRANGER.0
        ),
    )
}

#[tokio::test]
async fn replies_waiting_for_a_window_stay_within_the_memory_bound() {
    replies_the_attacker_will_not_read_stay_within_the_memory_bound("zero").await;
}

#[tokio::test]
async fn replies_to_a_peer_that_never_reads_stay_within_the_memory_bound() {
    replies_the_attacker_will_not_read_stay_within_the_memory_bound("open").await;
}

/// Three uids with a budget each attack with reflection answers they never take, giving the daemon `window`
/// (see `attacker.py replies`); the daemon stays within the memory bound and root is served throughout.
async fn replies_the_attacker_will_not_read_stay_within_the_memory_bound(window: &str) {
    let s = Setup::new().await;
    let opts = DaemonOptions {
        log: "info".to_owned(),
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &three_users_config(&s), opts).await;
    let mut c = d.client().await;
    let token = token_text(&mut c, &["scim:read"]).await;
    // One uid: every connection it may hold, 16 reflection streams on each asking 50 times for a 13 KB
    // answer, and no flow-control window to send them in.
    let one = attack(&d.socket, NOBODY, &["replies", "64", "50", window], &[]).await;
    assert!(
        one.report["streams"].as_u64().unwrap() >= 16,
        "{}",
        one.report
    );
    let (rss, peak) = memory_kib(d.pid());
    eprintln!("one uid: RSS {rss} KiB, peak {peak} KiB");
    assert!(
        peak < MAX_RSS_KIB,
        "one uid: peak RSS {peak} KiB (now {rss} KiB) over {MAX_RSS_KIB} KiB"
    );
    let mut legit = d.client().await;
    assert_eq!(token_text(&mut legit, &["scim:read"]).await, token);
    // Two more uids join in.
    let two = attack(&d.socket, STRANGER, &["replies", "64", "50", window], &[]).await;
    let three = attack(
        &d.socket,
        OTHER_STRANGER,
        &["replies", "64", "50", window],
        &[],
    )
    .await;
    let (rss, peak) = memory_kib(d.pid());
    eprintln!("three uids: RSS {rss} KiB, peak {peak} KiB");
    assert!(
        peak < 2 * MAX_RSS_KIB,
        "three uids: peak RSS {peak} KiB (now {rss} KiB) over {} KiB",
        2 * MAX_RSS_KIB
    );
    // Root is served throughout, on a new connection.
    let mut legit = d.client().await;
    assert_eq!(token_text(&mut legit, &["scim:read"]).await, token);
    for a in [one, two, three] {
        a.release().await;
    }
    assert_eq!(token_text(&mut c, &["scim:read"]).await, token);
}

#[tokio::test]
async fn every_method_with_streams_dropped_and_no_window_causes_no_panic() {
    let s = Setup::new().await;
    let opts = DaemonOptions {
        log: "info".to_owned(),
        // What a panic costs is worst with backtraces.
        env: vec![("RUST_BACKTRACE".to_owned(), "1".to_owned())],
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, &s.config(), opts).await;
    // A stranger, and root (an admin, so the admin API answers it in full: Status streams).
    for who in [STRANGER, (0, 0)] {
        let a = attack(&d.socket, who, &["drop-streams", "240"], &[]).await;
        assert_eq!(a.report["dropped"].as_u64(), Some(3840), "{}", a.report);
    }
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;
    // Stopped, so that whatever the last dropped streams and connections made it do is in the log.
    drop(c);
    let log_path = d.log_path();
    assert!(d.stop().await.success());
    let log = std::fs::read_to_string(log_path).unwrap();
    let panics = log.matches("panicked").count();
    assert_eq!(
        panics,
        0,
        "{panics} panics:\n{}",
        &log[..log.len().min(4000)]
    );
}

/// What a log flood may write: the first burst of lines (20, each under 1.5 KiB) and 64 KiB a minute.
fn log_bound(elapsed: std::time::Duration) -> usize {
    20 * 1536 + (64 * 1024 * elapsed.as_millis() as usize) / 60_000
}

/// Runs `attacker.py args` as `who` against a daemon on `config` logging at `info`, and checks what the
/// flood wrote: within [`log_bound`], no line over 1.5 KiB, and what was not logged summed up in a
/// `suppressed` event (the next line `more` causes, or the periodic summary, carries it). Returns the log of
/// the attack and the attacker's report.
async fn flood_within_the_log_budget(
    s: &Setup,
    config: &str,
    who: (u32, u32),
    args: &[&str],
    env: &[(&str, &str)],
) -> (String, serde_json::Value) {
    let opts = DaemonOptions {
        log: "info".to_owned(),
        ..DaemonOptions::default()
    };
    let d = Daemon::start_with(&s.dir, config, opts).await;
    let before = d.log().len();
    let started = std::time::Instant::now();
    let a = attack(&d.socket, who, args, env).await;
    let elapsed = started.elapsed();
    let log = d.log()[before..].to_owned();
    let written = log.len();
    eprintln!("{args:?}: {} in {elapsed:?}, {written} log bytes", a.report);
    assert!(
        written <= log_bound(elapsed),
        "{written} log bytes in {elapsed:?} (bound {}); {}:\n{}",
        log_bound(elapsed),
        a.report,
        &log[..log.len().min(3000)]
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1536, "a {longest}-byte log line");
    // The summary comes within 30 s (the periodic one) at the latest.
    tokio::time::timeout(WAIT * 2, async {
        while !d.log()[before..].contains("event=\"suppressed\"") {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a suppressed summary");
    (log, a.report)
}

#[tokio::test]
async fn refused_admin_calls_from_any_uid_are_within_the_log_budget() {
    let s = Setup::new().await;
    let (log, report) = flood_within_the_log_budget(
        &s,
        &s.config(),
        STRANGER,
        &[
            "unary",
            "/credbroker.admin.v1.Admin/Flush",
            "empty",
            "5",
            "reuse",
        ],
        &[],
    )
    .await;
    // A flood many times the log budget (bursts of 20), however slow the machine: thousands here.
    assert!(report["answered"].as_u64().unwrap() > 300, "{report}");
    assert!(log.contains("event=\"admin\""), "{log}");
}

#[tokio::test]
async fn rate_limited_calls_are_within_the_log_budget() {
    let s = Setup::new().await;
    let config = s
        .config_with(
            "",
            &format!(
                "\n[[policy]]\nname = \"stranger\"\nmatch = {{ uid = {} }}\nclient = \"idp\"\nscopes = [\"scim:*\"]\n",
                STRANGER.0
            ),
        )
        .replace(
            "[daemon]\n",
            "[daemon]\nrate_limit = { per_minute = 1, burst = 1 }\n",
        );
    let (log, report) = flood_within_the_log_budget(
        &s,
        &config,
        STRANGER,
        &[
            "unary",
            "/credbroker.v1.TokenBroker/GetToken",
            "varying:scim:r",
            "5",
            "reuse",
        ],
        &[],
    )
    .await;
    // A flood many times the log budget (bursts of 20), however slow the machine: thousands here.
    assert!(report["answered"].as_u64().unwrap() > 300, "{report}");
    assert!(log.contains("event=\"error\""), "{log}");
}

#[tokio::test]
async fn a_caller_that_reconnects_for_every_call_is_granted_once_in_the_log() {
    let s = Setup::new().await;
    let (log, report) = flood_within_the_log_budget_or_not(&s, NOBODY).await;
    // Many more than the one line it is worth (hundreds here).
    assert!(report["answered"].as_u64().unwrap() > 50, "{report}");
    assert_eq!(
        log.matches("event=\"grant\"").count(),
        1,
        "{}",
        &log[..log.len().min(3000)]
    );
}

/// Nobody reconnecting for every GetToken call: no line is over budget, so no summary is expected.
async fn flood_within_the_log_budget_or_not(
    s: &Setup,
    who: (u32, u32),
) -> (String, serde_json::Value) {
    let d = info_daemon(s).await;
    let before = d.log().len();
    let a = attack(
        &d.socket,
        who,
        &[
            "unary",
            "/credbroker.v1.TokenBroker/GetToken",
            "scope:scim:read",
            "3",
            "reconnect",
        ],
        &[],
    )
    .await;
    (d.log()[before..].to_owned(), a.report)
}

#[tokio::test]
async fn three_hundred_uids_of_one_user_share_one_log_budget() {
    let s = Setup::new().await;
    // Even a policy for every caller gives a subordinate uid (no name in the user database) no budget of
    // its own.
    let config = s.config_with(
        "",
        "\n[[policy]]\nname = \"everyone\"\nmatch = { any = true }\nclient = \"idp\"\nscopes = [\"scim:read\"]\n",
    );
    let (log, report) = flood_within_the_log_budget(
        &s,
        &config,
        (0, 0),
        &["uids", "200000", "300", "30"],
        &[("SCOPE", "scim:write")],
    )
    .await;
    assert_eq!(report["answered"].as_u64(), Some(9000), "{report}");
    assert!(log.contains("event=\"deny\""), "{log}");
}

/// One race of `attacker.py exec-race` as nobody, with `prior` connections queued first, while the daemon is
/// stopped: it accepts the racing connection only after the racing process has become `prog`. The result:
/// "granted" or "refused".
async fn stopped_exec_race(d: &Daemon, prog: &Path, prior: usize) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("helpers/attacker.py");
    d.signal("STOP");
    let mut child = tokio::process::Command::new(PYTHON)
        .arg(script)
        .arg(&d.socket)
        .args(["exec-race", prog.to_str().unwrap(), &prior.to_string()])
        .env("SCOPE", "scim:write")
        .uid(NOBODY.0)
        .gid(NOBODY.1)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let queued = tokio::time::timeout(WAIT, lines.next_line()).await;
    d.signal("CONT");
    let queued = queued.expect("the racer runs in time").unwrap().unwrap();
    assert!(queued.contains("queued"), "{queued}");
    let result = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a result in time")
        .unwrap()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&result).unwrap();
    report["result"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_connection_accepted_behind_a_queue_is_not_judged_by_its_executable() {
    let s = Setup::new().await;
    let sleep = std::fs::canonicalize("/usr/bin/sleep").unwrap();
    let d = Daemon::start(&s.dir, &exe_config(&s, &sleep)).await;
    // Behind 40 queued connections, the racing process has become the allowed program before the daemon
    // looks: the daemon knows it looked too late, and does not judge by the executable.
    let result = stopped_exec_race(&d, &sleep, 40).await;
    assert_eq!(result, "refused", "{}", audit_lines(&d));
    assert!(
        d.log()
            .contains("not judged: accepted behind 40 other connections"),
        "{}",
        audit_lines(&d)
    );
    // The window the daemon cannot close, for the record (and as this test's control): first in the queue, a
    // process that has exec'd while the daemon was stopped is judged as what it became (README, threat model).
    let result = stopped_exec_race(&d, &sleep, 0).await;
    assert_eq!(result, "granted", "{}", audit_lines(&d));
}
