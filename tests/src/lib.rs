//! Test support for credbroker's end-to-end tests: the stand-in token endpoint ([`idp`]) and a harness that
//! runs the real `credbrokerd` and `credbroker` binaries on a fresh socket in a temporary directory.
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to the test executable
//! (`target/<profile>/`); the README's test command builds them first.

pub mod dpop;
pub mod fixture;
pub mod idp;
pub mod oidc;
pub mod systemd_box;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// A built binary of the workspace.
///
/// # Panics
/// If it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<binary> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins), or run scripts/test",
        path.display()
    );
    path
}

/// A temporary directory every user can traverse, so a caller running as another uid reaches the socket.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// A new, empty directory (mode 0755).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credbroker-test")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Self { dir }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file with the given mode and returns its path.
    pub fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, content).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// How to start the daemon.
pub struct DaemonOptions {
    /// `CREDBROKER_LOG`.
    pub log: String,
    /// Run as this uid/gid instead of root.
    pub run_as: Option<(u32, u32)>,
    /// Wrap the command (e.g. `["unshare", "--pid", "--fork"]`).
    pub wrapper: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            log: "debug".to_owned(),
            run_as: None,
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `credbrokerd`, killed on drop.
pub struct Daemon {
    child: Child,
    /// The socket it serves.
    pub socket: PathBuf,
    log: PathBuf,
    notify: UnixDatagram,
}

impl Daemon {
    /// Writes `config` to `dir/credbroker.toml`, starts the daemon on it, and returns once it has signalled
    /// readiness (`READY=1` on `NOTIFY_SOCKET`), i.e. once its socket is being served.
    ///
    /// # Panics
    /// If it exits or does not become ready within [`WAIT`]; the panic shows its log.
    pub async fn start(dir: &TestDir, config: &str) -> Self {
        Self::start_with(dir, config, DaemonOptions::default()).await
    }

    /// As [`Daemon::start`], with options.
    ///
    /// # Panics
    /// As [`Daemon::start`].
    pub async fn start_with(dir: &TestDir, config: &str, opts: DaemonOptions) -> Self {
        let config_path = dir.write("credbroker.toml", config, 0o644);
        let notify_path = dir.path().join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        if opts.run_as.is_some() {
            std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        let log = dir.path().join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let daemon = bin("credbrokerd");
        let mut cmd = match opts.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(&daemon);
                c
            }
            None => Command::new(&daemon),
        };
        cmd.arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CREDBROKER_LOG", &opts.log)
            .env("NO_COLOR", "1")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file.try_clone().expect("dup log"))
            .kill_on_drop(true);
        if let Some((uid, gid)) = opts.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("spawn credbrokerd");
        let socket = socket_of(config);
        let mut buf = [0u8; 512];
        tokio::select! {
            r = notify.recv(&mut buf) => {
                let n = r.expect("recv notify");
                let msg = String::from_utf8_lossy(&buf[..n]);
                assert!(msg.lines().any(|l| l == "READY=1"), "unexpected notification {msg:?}");
            }
            status = child.wait() => {
                panic!("credbrokerd exited ({:?}) before it was ready:\n{}", status, std::fs::read_to_string(&log).unwrap_or_default());
            }
            () = tokio::time::sleep(WAIT) => {
                panic!("credbrokerd not ready within {WAIT:?}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        }
        Self {
            child,
            socket,
            log,
            notify,
        }
    }

    /// The next `sd_notify` message the daemon sends.
    ///
    /// # Panics
    /// If none comes within [`WAIT`].
    pub async fn notification(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, self.notify.recv(&mut buf))
            .await
            .expect("no notification in time")
            .expect("recv notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for a notification with a line equal to `line`, skipping others (such as `WATCHDOG=1`).
    pub async fn wait_notification(&self, line: &str) -> String {
        loop {
            let msg = self.notification().await;
            if msg.lines().any(|l| l == line) {
                return msg;
            }
        }
    }

    /// Sends a signal (`"HUP"`, `"TERM"`…) to the daemon.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Everything the daemon has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where its stderr goes, to read once it has been stopped.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// The daemon's pid (of the wrapper, if one was used).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// A library client connected to the daemon.
    ///
    /// # Panics
    /// If it cannot connect.
    pub async fn client(&self) -> credbroker_client::Client {
        credbroker_client::Client::connect(&self.socket)
            .await
            .expect("connect to credbrokerd")
            .with_timeout(WAIT)
    }

    /// Runs the `credbroker` CLI against this daemon, optionally as another uid/gid.
    pub async fn cli(&self, as_user: Option<(u32, u32)>, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("credbroker"));
        cmd.arg("--socket").arg(&self.socket).args(args);
        run_cli(cmd, as_user).await
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("credbrokerd did not exit after SIGTERM")
            .expect("wait")
    }
}

/// Runs a prepared command with a bounded wait, optionally as another uid/gid (supplementary groups dropped).
pub async fn run_cli(mut cmd: Command, as_user: Option<(u32, u32)>) -> Output {
    if let Some((uid, gid)) = as_user {
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("command did not finish in time")
        .expect("run command")
}

/// The `socket = "…"` line of a test config's `[daemon]` table.
fn socket_of(config: &str) -> PathBuf {
    config
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("socket = "))
        .map(|v| PathBuf::from(v.trim().trim_matches('"')))
        .expect("the test config sets daemon.socket")
}

/// The access token a `token(scopes)` call returns.
///
/// # Panics
/// If the call fails.
pub async fn token_text(client: &mut credbroker_client::Client, scopes: &[&str]) -> String {
    use credbroker_client::secrecy::ExposeSecret;
    let token = client
        .token(scopes.iter().copied())
        .await
        .expect("get a token");
    token.access_token().expose_secret().to_owned()
}

/// A command's standard output, trailing whitespace removed.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_owned()
}

/// A command's standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until `done` holds, checking every 10 ms.
///
/// # Panics
/// If it does not hold within [`WAIT`]; the message names `what`.
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gRPC channel to a Unix socket, for talking to a server without the client library.
///
/// # Panics
/// If it cannot connect.
pub async fn uds_channel(path: &Path) -> tonic::transport::Channel {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://credbroker.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to the socket")
}

/// Runs `credbrokerd check-config` on `config` written to `dir`.
pub async fn check_config(dir: &TestDir, config: &str) -> Output {
    let path = dir.write("check.toml", config, 0o644);
    let mut cmd = Command::new(bin("credbrokerd"));
    cmd.arg("check-config").arg("--config").arg(path);
    run_cli(cmd, None).await
}
