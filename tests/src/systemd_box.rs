//! A real systemd as PID 1 of a private PID and mount namespace (`tests/systemd/boot`), for tests of the
//! packages and units under the systemd that runs them. Commands run inside with `nsenter`; dropping the box
//! kills its PID 1, which ends the namespace and everything in it.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::WAIT;

/// A booted systemd.
pub struct SystemdBox {
    boot: Child,
    pid1: u32,
    _scratch: tempfile::TempDir,
}

impl SystemdBox {
    /// Boots systemd and waits (boundedly) until it reports `running` or `degraded`.
    ///
    /// # Panics
    /// If it does not come up within [`WAIT`].
    pub async fn boot() -> Self {
        let scratch = tempfile::Builder::new()
            .prefix("credbroker-systemd")
            .tempdir_in("/var/tmp")
            .expect("scratch directory");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/boot");
        let boot = Command::new(script)
            .arg(scratch.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("boot systemd");
        let unshare = boot.id().expect("boot pid");
        let deadline = tokio::time::Instant::now() + WAIT;
        // PID 1 of the namespace is unshare's only child.
        let pid1 = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    break pid;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "systemd did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let sb = Self {
            boot,
            pid1,
            _scratch: scratch,
        };
        loop {
            let state = sb
                .sh("systemctl is-system-running 2>/dev/null || true")
                .await;
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "systemd stuck in {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sb
    }

    /// Runs `script` with `sh -c` inside, as root, with a bounded wait.
    ///
    /// # Panics
    /// If it does not finish within four times [`WAIT`].
    pub async fn sh(&self, script: &str) -> Output {
        let out = Command::new("nsenter")
            .arg("--target")
            .arg(self.pid1.to_string())
            .args(["--pid", "--mount", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(WAIT * 4, out)
            .await
            .unwrap_or_else(|_| panic!("timed out in the systemd box: {script}"))
            .expect("nsenter")
    }

    /// Runs `script` until it exits 0 (every 50 ms, for a bounded time) and returns that run's stdout: for
    /// what follows a step systemd does not wait for (a `systemctl reload` of a `Type=notify` unit returns
    /// once its `ExecReload=` has sent the signal; journald takes a service's lines in on its own time).
    ///
    /// # Panics
    /// If it has not succeeded by then.
    pub async fn eventually(&self, script: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let out = self.sh(script).await;
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{script}: {:?}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Runs `script` and returns its stdout, panicking with its output unless it exits 0.
    ///
    /// # Panics
    /// If it fails.
    pub async fn ok(&self, script: &str) -> String {
        let out = self.sh(script).await;
        assert!(
            out.status.success(),
            "{script}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `content` to a host file the box sees at the same path (under `/var/tmp`, which the box's `/var`
    /// overlays), for `install` inside; returns the path.
    pub fn put(&self, name: &str, content: &str) -> PathBuf {
        let dir = self._scratch.path().join("stage");
        std::fs::create_dir_all(&dir).expect("stage directory");
        let path = dir.join(name);
        std::fs::write(&path, content).expect("stage file");
        path
    }

    /// Copies a host file where the box sees it (the host's `/tmp`, where a checkout may live, is not visible
    /// inside); returns the path to use inside.
    pub fn stage(&self, file: &Path) -> PathBuf {
        let dir = self._scratch.path().join("stage");
        std::fs::create_dir_all(&dir).expect("stage directory");
        let path = dir.join(file.file_name().expect("a file name"));
        std::fs::copy(file, &path).expect("stage a file");
        path
    }

    /// A `systemctl show -p NAME --value UNIT` property.
    pub async fn property(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value {unit}"))
            .await
            .trim()
            .to_owned()
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        // SIGKILL to PID 1 of a PID namespace ends every process in it; the mounts go with the namespace.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.pid1.to_string()])
            .status();
        let _ = self.boot.start_kill();
    }
}

/// The packages `scripts/package` made, revision `rev`.
///
/// # Panics
/// If there is none: run `scripts/package` (and `scripts/package --revision 2`) first; `scripts/test` does.
pub fn deb(rev: u32) -> PathBuf {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    std::fs::read_dir(&dist)
        .ok()
        .and_then(|entries| {
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".deb") && n.contains(&format!("-{rev}_")))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no revision {rev} .deb in {}: run scripts/package --revision {rev}",
                dist.display()
            )
        })
}
