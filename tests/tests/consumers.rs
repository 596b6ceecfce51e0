//! Token consumers that need no code: files kept fresh by `credbroker sink` (read by the real Prometheus),
//! kubectl's exec credential plugin (the real kubectl, against a stand-in API server over TLS), and git's
//! credential helper (the real git, old and new, against a stand-in smart-HTTP server). Consumers run as
//! another uid where they would, so the daemon judges them by the kernel's view as any caller.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::{Daemon, WAIT, bin, run_cli, stderr, stdout, token_text};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// The system's Python, which every uid can run.
const PYTHON: &str = "/usr/bin/python3";

/// A directory owned by `who`, with `mode`, under the test's directory.
fn dir_of(s: &Setup, name: &str, who: (u32, u32), mode: u32) -> PathBuf {
    let dir = s.dir.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(who.0), Some(who.1)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

/// `credbroker sink ARGS` against `d` as `who`, its stderr in `log`; killed when dropped.
fn sink(d: &Daemon, who: (u32, u32), args: &[&str], log: &Path) -> Child {
    Command::new(bin("credbroker"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("sink")
        .args(args)
        .uid(who.0)
        .gid(who.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("credbroker sink")
}

/// `credbroker sink ARGS` against `socket` as `who`, to its end.
async fn sink_once(socket: &Path, who: (u32, u32), args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin("credbroker"));
    cmd.arg("--socket").arg(socket).arg("sink").args(args);
    run_cli(cmd, Some(who)).await
}

/// Waits (boundedly) until `done` holds, checking every 10 ms.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops a child with SIGTERM and returns its exit code.
async fn terminate(mut child: Child) -> Option<i32> {
    let pid = child.id().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
        .code()
}

#[tokio::test]
async fn a_sink_keeps_its_file_fresh_and_a_reader_never_sees_it_empty_partial_or_expired() {
    let s = Setup::new().await;
    s.idp.set_expires_in(4);
    let d = s.daemon().await;
    let dir = dir_of(&s, "consumer", NOBODY, 0o755);
    let (file, changes) = (dir.join("token"), dir.join("changes"));
    let on_change = format!("echo \"$CREDBROKER_SINK_PATH\" >> {}", changes.display());
    let child = sink(
        &d,
        NOBODY,
        &[
            "--path",
            file.to_str().unwrap(),
            "--mode",
            "0640",
            "--on-change",
            &on_change,
            "scim:read",
        ],
        &s.dir.path().join("sink.log"),
    );
    until("the first token file", || file.exists()).await;
    // Over more than two token lifetimes, every read finds a whole, valid token.
    let (start, mut seen) = (Instant::now(), HashSet::new());
    while start.elapsed() < Duration::from_secs(9) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        let token = text.trim_end();
        assert!(
            s.idp.is_valid(token),
            "an invalid or expired token in the file: {token:?}"
        );
        seen.insert(token.to_owned());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        seen.len() >= 3,
        "{} tokens in 9 s of 4 s tokens",
        seen.len()
    );
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o640, NOBODY.0));
    // The command ran once per new token (it runs just after the file is replaced), never more.
    let count = || {
        std::fs::read_to_string(&changes)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    until("a run of the command for each token seen", || {
        count() >= seen.len()
    })
    .await;
    let runs = std::fs::read_to_string(&changes).unwrap();
    assert!(runs.lines().all(|l| l == file.to_str().unwrap()), "{runs}");
    let runs = runs.lines().count();
    assert!(
        runs >= seen.len() && runs <= s.idp.issued_tokens().len(),
        "{runs} runs, {} tokens seen, {} issued",
        seen.len(),
        s.idp.issued_tokens().len()
    );
    // SIGTERM: a clean exit, the file left for its reader.
    assert_eq!(terminate(child).await, Some(0));
    assert!(file.exists());
    // Nothing but the token file and the command's log is left in the directory.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[tokio::test]
async fn sink_options_and_directories_are_checked_with_the_cli_exit_codes() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mine = dir_of(&s, "mine", NOBODY, 0o755);
    let path = mine.join("token");
    let path = path.to_str().unwrap();
    // Modes are octal permission bits.
    for mode in ["0999", "4755", "rw-------", "0o1777"] {
        let out = sink_once(
            &d.socket,
            NOBODY,
            &["--once", "--path", path, "--mode", mode, "scim:read"],
        )
        .await;
        assert_eq!(out.status.code(), Some(64), "{mode}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("octal") || stderr(&out).contains("permission bits"),
            "{}",
            stderr(&out)
        );
    }
    // A directory others may write to, sticky or not, or someone else's, is refused before anything is written.
    for (name, owner, mode, why) in [
        ("open", NOBODY, 0o777, "writable by every user"),
        ("sticky", (0, 0), 0o1777, "sticky or not"),
        ("group", NOBODY, 0o775, "writable by its group"),
        ("theirs", (40001, 40001), 0o755, "belongs to uid 40001"),
    ] {
        let dir = dir_of(&s, name, owner, mode);
        let file = dir.join("token");
        let out = sink_once(
            &d.socket,
            NOBODY,
            &["--once", "--path", file.to_str().unwrap(), "scim:read"],
        )
        .await;
        assert_eq!(out.status.code(), Some(74), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{name}: {}", stderr(&out));
        assert!(!file.exists());
    }
    // --once: written once, exit 0; denied, 77; the daemon unreachable, 75.
    let out = sink_once(&d.socket, NOBODY, &["--once", "--path", path, "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = std::fs::read_to_string(path).unwrap();
    assert!(s.idp.is_valid(token.trim_end()), "{token}");
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o600, NOBODY.0),
        "0600 by default"
    );
    let out = sink_once(&d.socket, NOBODY, &["--once", "--path", path, "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        token,
        "a refusal leaves the file as it was"
    );
    let gone = s.dir.path().join("no-daemon.sock");
    let out = sink_once(&gone, NOBODY, &["--once", "--path", path, "scim:read"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    // A long-running sink that is denied at start exits with the code too, rather than retry forever.
    let out = sink_once(&d.socket, NOBODY, &["--path", path, "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));

    // Several sinks from one file.
    let config = s.dir.write(
        "sinks.toml",
        &format!(
            "[[sink]]\npath = \"{dir}/raw\"\nscopes = [\"scim:read\"]\n\n\
             [[sink]]\npath = \"{dir}/header\"\nscopes = [\"scim:read\"]\nformat = \"header\"\nmode = \"0644\"\n",
            dir = mine.display()
        ),
        0o644,
    );
    let out = sink_once(
        &d.socket,
        NOBODY,
        &["--once", "--config", config.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let raw = std::fs::read_to_string(mine.join("raw")).unwrap();
    let header = std::fs::read_to_string(mine.join("header")).unwrap();
    assert_eq!(header, format!("Authorization: Bearer {raw}"));
    assert_eq!(
        std::fs::metadata(mine.join("header")).unwrap().mode() & 0o777,
        0o644
    );
    // A broken file: every problem with its key, exit 64.
    let bad = s.dir.write(
        "bad.toml",
        "[[sink]]\npath = \"relative\"\nscopes = []\nmode = \"9\"\n",
        0o644,
    );
    let out = sink_once(
        &d.socket,
        NOBODY,
        &["--once", "--config", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    for key in ["sink[0].path", "sink[0].scopes", "sink[0].mode"] {
        assert!(stderr(&out).contains(key), "{key}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn while_the_daemon_is_down_the_file_keeps_its_valid_token_then_loses_it_at_expiry() {
    let s = Setup::new().await;
    s.idp.set_expires_in(4);
    let d = s.daemon().await;
    let dir = dir_of(&s, "consumer", NOBODY, 0o755);
    let file = dir.join("token");
    let log = s.dir.path().join("sink.log");
    let _child = sink(
        &d,
        NOBODY,
        &["--path", file.to_str().unwrap(), "scim:read"],
        &log,
    );
    until("the first token file", || file.exists()).await;
    let down = Instant::now();
    d.stop().await;
    // The token in place when the daemon went stays, untouched, while it is valid; once it has expired with
    // no successor, the file goes.
    let last = std::fs::read_to_string(&file).unwrap();
    let mut was_valid = false;
    until(
        "the expired token's removal",
        || match std::fs::read_to_string(&file) {
            Ok(text) => {
                assert_eq!(text, last, "replaced while the daemon was down");
                was_valid |= s.idp.is_valid(text.trim_end());
                false
            }
            Err(_) => true,
        },
    )
    .await;
    assert!(was_valid, "the file was removed before its token expired");
    assert!(!s.idp.is_valid(last.trim_end()));
    // The sink says so just after it removed the file.
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    until("the sink's word on the removal", || {
        said().contains("removed")
    })
    .await;
    assert!(said().contains("trying again in"), "{}", said());
    // The daemon is back: a new token in the file, after the sink's backoff, which grows with the outage
    // (not with the number of tries, which the short pauses before the expiry made many).
    let d = s.daemon().await;
    let outage = down.elapsed();
    until("a new token after the outage", || file.exists()).await;
    let waited = down.elapsed() - outage;
    assert!(
        waited <= outage + Duration::from_secs(5),
        "the sink waited {waited:?} after an outage of {outage:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(s.idp.is_valid(text.trim_end()));
    drop(d);
}

/// Starts `helpers/SCRIPT ARGS` and returns it with the port it printed (`port=N`).
async fn helper_server(script: &str, args: &[&str]) -> (Child, u16) {
    let mut child = Command::new(PYTHON)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("helpers")
                .join(script),
        )
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut line = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line),
    )
    .await
    .expect("the server starts in time")
    .unwrap();
    let port = line.trim().strip_prefix("port=").unwrap().parse().unwrap();
    (child, port)
}

/// A free loopback TCP port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP GET on loopback with curl; the body.
async fn get(url: &str) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "10", url]);
    stdout(&run_cli(cmd, None).await)
}

#[tokio::test]
async fn prometheus_scrapes_a_bearer_target_through_a_sink_file_over_several_token_lifetimes() {
    let s = Setup::new().await;
    s.idp.set_expires_in(5);
    let d = s.daemon().await;
    let dir = dir_of(&s, "prometheus", NOBODY, 0o755);
    let file = dir.join("token");
    let _sink = sink(
        &d,
        NOBODY,
        &[
            "--path",
            file.to_str().unwrap(),
            "--mode",
            "0644",
            "scim:read",
        ],
        &s.dir.path().join("sink.log"),
    );
    until("the token file", || file.exists()).await;
    let target_log = s.dir.path().join("target.log");
    let (_target, target) = helper_server(
        "bearer_target.py",
        &[target_log.to_str().unwrap(), &s.idp.introspection_url()],
    )
    .await;
    let config = s.dir.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
             scrape_configs:\n  - job_name: demo\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n\
             \x20   authorization:\n      type: Bearer\n      credentials_file: {}\n",
            file.display()
        ),
        0o644,
    );
    let web = format!("127.0.0.1:{}", free_port());
    let _prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            s.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.dir.path().join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian package prometheus; scripts/test installs it)");
    let deadline = Instant::now() + WAIT;
    while get(&format!("http://{web}/-/ready")).await.is_empty() {
        assert!(Instant::now() < deadline, "prometheus not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let query = |q: &str| {
        let url = format!(
            "http://{web}/api/v1/query?query={}",
            form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        );
        async move {
            let body = get(&url).await;
            let v: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    // Scrapes every second, over three token lifetimes (15 s of 5 s tokens): Prometheus' own count.
    let deadline = Instant::now() + WAIT * 2;
    while query("count_over_time(up{job=\"demo\"}[1m])").await < 16.0 {
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape 16 times"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lowest = query("min_over_time(up{job=\"demo\"}[1m])").await;
    let outcomes = std::fs::read_to_string(&target_log).unwrap();
    assert_eq!(lowest, 1.0, "a scrape failed: {outcomes}");
    assert!(outcomes.lines().all(|l| l == "ok"), "{outcomes}");
    let tokens = s.idp.issued_tokens().len();
    assert!(tokens >= 3, "{tokens} tokens over the scrapes");
}

/// A stand-in Kubernetes API server over TLS: answers `/version` to any request and records each
/// request's Authorization header. Returns its port, the CA's PEM, and the record.
async fn api_server() -> (u16, String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper_util::rt::TokioIo;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        record.lock().unwrap().push(auth);
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(hyper::body::Bytes::from(
                                        r#"{"major":"1","minor":"32","gitVersion":"v1.32.0"}"#,
                                    )))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, ca.pem(), seen)
}

#[tokio::test]
async fn kubectl_gets_its_bearer_token_from_the_exec_credential_plugin() {
    use base64::Engine as _;
    let s = Setup::new().await;
    let d = s.daemon().await;
    let (port, ca, seen) = api_server().await;
    let home = dir_of(&s, "home", NOBODY, 0o755);
    // kubectl 1.22 and later speak v1; Debian 12's kubernetes-client (1.20) only v1beta1.
    let mut cmd = Command::new("kubectl");
    cmd.args(["version", "--client", "-o", "json"]);
    let version = stdout(&run_cli(cmd, None).await);
    let minor: u32 = serde_json::from_str::<serde_json::Value>(&version)
        .ok()
        .and_then(|v| {
            v["clientVersion"]["minor"]
                .as_str()?
                .trim_end_matches('+')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("kubectl version: {version}"));
    let versions: &[&str] = if minor >= 22 {
        &["v1", "v1beta1"]
    } else {
        &["v1beta1"]
    };
    println!("kubectl 1.{minor}: exec credential {versions:?}");
    for &version in versions {
        let kubeconfig = s.dir.write(
            &format!("kubeconfig-{version}"),
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: https://127.0.0.1:{port}\n\
                 \x20   certificate-authority-data: {ca}\nusers:\n- name: broker\n  user:\n    exec:\n\
                 \x20     apiVersion: client.authentication.k8s.io/{version}\n      command: {bin}\n\
                 \x20     args: [\"--socket\", \"{socket}\", \"token\", \"--format\", \"exec-credential\", \"scim:read\"]{interactive}\n\
                 contexts:\n- name: here\n  context: {{cluster: stand-in, user: broker}}\n\
                 current-context: here\n",
                ca = base64::engine::general_purpose::STANDARD.encode(&ca),
                bin = bin("credbroker").display(),
                socket = d.socket.display(),
                // Required by v1, unknown to kubectl before 1.22.
                interactive = if version == "v1" { "\n      interactiveMode: Never" } else { "" },
            ),
            0o644,
        );
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "--raw", "/version"])
            .env("HOME", &home);
        let out = run_cli(cmd, Some(NOBODY)).await;
        assert_eq!(out.status.code(), Some(0), "{version}: {}", stderr(&out));
        assert!(stdout(&out).contains("v1.32.0"), "{}", stdout(&out));
        let auth = seen.lock().unwrap().last().cloned().unwrap();
        let token = auth
            .strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("{auth:?}"));
        assert!(s.idp.is_valid(token), "{version}: {auth}");
    }
    // The plugin's answer, by itself: the apiVersion asked for, the token and its expiry (RFC 3339).
    let mut cmd = Command::new(bin("credbroker"));
    cmd.arg("--socket")
        .arg(&d.socket)
        .args(["token", "--format", "exec-credential", "scim:read"])
        .env(
            "KUBERNETES_EXEC_INFO",
            r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#,
        );
    let out = run_cli(cmd, Some(NOBODY)).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1beta1");
    assert_eq!(v["kind"], "ExecCredential");
    assert!(s.idp.is_valid(v["status"]["token"].as_str().unwrap()));
    let expiry = v["status"]["expirationTimestamp"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(expiry).is_ok() && expiry.ends_with('Z'),
        "{expiry}"
    );
    // An apiVersion credbroker does not speak: a usage error, and the daemon is not asked.
    let mut cmd = Command::new(bin("credbroker"));
    cmd.arg("--socket")
        .arg(&d.socket)
        .args(["token", "--format", "exec-credential", "scim:read"])
        .env(
            "KUBERNETES_EXEC_INFO",
            r#"{"apiVersion":"client.authentication.k8s.io/v1alpha1"}"#,
        );
    let out = run_cli(cmd, Some(NOBODY)).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("v1alpha1"), "{}", stderr(&out));
}

#[tokio::test]
async fn git_clones_through_the_credential_helper_with_bearer_or_basic_as_git_can() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // A repository with one commit, served only with a valid token.
    let root = dir_of(&s, "repos", (0, 0), 0o755);
    let work = s.dir.path().join("src");
    let git = |args: &[&str], dir: &Path| {
        let status = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    };
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git(&["init", "-q", "-b", "main"], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "add",
            "README",
        ],
        &work,
    );
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-qm",
            "one",
        ],
        &work,
    );
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            root.join("repo.git").to_str().unwrap(),
        ],
        s.dir.path(),
    );
    let log = s.dir.path().join("git-server.log");
    let (_server, port) = helper_server(
        "git_server.py",
        &[
            root.to_str().unwrap(),
            log.to_str().unwrap(),
            &s.idp.introspection_url(),
        ],
    )
    .await;
    let home = dir_of(&s, "home", NOBODY, 0o755);
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let helper = format!(
        "credential.http://127.0.0.1:{port}.helper=!{} --socket {} git-credential -c idp --scope scim:read",
        bin("credbroker").display(),
        d.socket.display()
    );
    // git 2.46 and later take a Bearer credential; older ones get the token as a password.
    for (git, scheme) in [("/usr/local/bin/git", "bearer"), ("/usr/bin/git", "basic")] {
        std::fs::write(&log, "").unwrap();
        let dest = home.join(scheme);
        let mut cmd = Command::new(git);
        cmd.args([
            "-c",
            "credential.helper=",
            "-c",
            &helper,
            "clone",
            "-q",
            &url,
        ])
        .arg(&dest)
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0");
        let out = run_cli(cmd, Some(NOBODY)).await;
        assert_eq!(out.status.code(), Some(0), "{git}: {}", stderr(&out));
        assert_eq!(
            std::fs::read_to_string(dest.join("README")).unwrap(),
            "hello\n"
        );
        let requests = std::fs::read_to_string(&log).unwrap();
        let authorized: Vec<&str> = requests.lines().filter(|l| *l != "none").collect();
        assert!(!authorized.is_empty(), "{git}: {requests}");
        for line in authorized {
            let (used, token) = line.split_once(' ').unwrap_or((line, ""));
            assert_eq!(used, scheme, "{git}: {requests}");
            assert!(s.idp.is_valid(token), "{git}: {line}");
        }
    }
    // store and erase do nothing, and succeed.
    for op in ["store", "erase"] {
        let mut cmd = Command::new(bin("credbroker"));
        cmd.arg("--socket")
            .arg(&d.socket)
            .args(["git-credential", "--scope", "scim:read", op]);
        let out = run_cli(cmd, Some(NOBODY)).await;
        assert_eq!(out.status.code(), Some(0), "{op}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;
}
