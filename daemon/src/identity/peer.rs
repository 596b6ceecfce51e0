//! Who is calling: the identity of a Unix socket peer, as the kernel reports it.
//!
//! At accept time the daemon records what the kernel captured when the peer connected: uid, gid and pid
//! (`SO_PEERCRED`), supplementary groups (`SO_PEERGROUPS`) and a pidfd (`SO_PEERPIDFD`) for that very
//! process. Right after, still before the connection's first byte is read, the rest is read from
//! `/proc/<pid>` (the executable, as a path and as a [`FileId`]; the systemd unit) and NSS (names, cached
//! briefly). On every call the pidfd is checked, so a peer that has exited — and whose pid may now belong to
//! another process — is refused instead of being judged by the newcomer's `/proc` entries, and the process's
//! executable is checked to be the file it was at accept, so a process that `exec`s an allowed program after
//! connecting does not pass for it.
//!
//! Nothing the caller sends is part of its identity.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::sys;

/// What the kernel told us about a peer when it connected.
pub struct PeerCred {
    /// Effective uid at `connect(2)`.
    pub uid: u32,
    /// Effective gid at `connect(2)`.
    pub gid: u32,
    /// Pid in the daemon's PID namespace; `None` when the peer is not visible there.
    pub pid: Option<i32>,
    /// Supplementary groups at `connect(2)`.
    pub groups: Vec<u32>,
    /// A pidfd for the peer process, which outlives any reuse of its pid.
    pidfd: Option<OwnedFd>,
    /// Whether the pidfd came from `pidfd_open` after accept (kernels before 6.5) rather than from the socket:
    /// then the pid may already have been reused when it was pinned, and the identity is cross-checked.
    pinned_late: bool,
}

impl fmt::Debug for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCred")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("pid", &self.pid)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

/// Why a peer's identity could not be established. Each refuses the call with `UNAUTHENTICATED`.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// `SO_PEERCRED` failed.
    #[error("the kernel did not report the peer's credentials: {0}")]
    Credentials(#[source] io::Error),
    /// The peer lives in a PID namespace the daemon cannot see into.
    #[error("the peer's process is not visible to the daemon (another PID namespace?)")]
    PidNotVisible,
    /// Neither `SO_PEERPIDFD` nor `pidfd_open` gave a handle on the peer process.
    #[error("could not pin the peer process (pid {pid}): {source}")]
    Pidfd {
        /// The peer's pid.
        pid: i32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The peer exited (its pid may already name another process).
    #[error("the calling process (pid {pid}) has exited")]
    Exited {
        /// The peer's pid.
        pid: i32,
    },
    /// (Kernels before 6.5.) The process now behind the pid has other ids than the peer that connected: the
    /// pid may have been reused.
    #[error("the process behind pid {pid} is not the one that connected (pid reused?)")]
    Replaced {
        /// The peer's pid.
        pid: i32,
    },
    /// The process runs another program than when it connected (it called `exec`).
    #[error("the calling process (pid {pid}) has executed another program since it connected")]
    ExeChanged {
        /// The peer's pid.
        pid: i32,
    },
    /// `/proc/<pid>` could not be read.
    #[error("could not read /proc/{pid}: {source}")]
    Proc {
        /// The peer's pid.
        pid: i32,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl PeerCred {
    /// Reads the peer's credentials from a freshly accepted connection.
    ///
    /// # Errors
    /// [`PeerError`] when the kernel does not report them, or reports no pid, or the process cannot be pinned.
    pub fn from_stream(stream: &UnixStream) -> Result<Self, PeerError> {
        let cred = stream.peer_cred().map_err(PeerError::Credentials)?;
        let pid = cred.pid().filter(|&p| p > 0);
        let groups = sys::peer_groups(stream.as_fd()).map_err(PeerError::Credentials)?;
        let mut pinned_late = false;
        let pidfd = match pid {
            None => None,
            Some(pid) => Some(match sys::peer_pidfd(stream.as_fd()) {
                Ok(fd) => fd,
                // Kernels before 6.5: pin the pid now, as close to connect() as we can get.
                Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                    pinned_late = true;
                    sys::pidfd_open(pid).map_err(|source| PeerError::Pidfd { pid, source })?
                }
                Err(source) => return Err(PeerError::Pidfd { pid, source }),
            }),
        };
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            groups,
            pidfd,
            pinned_late,
        })
    }

    /// The credentials of live process `pid`, for `credbroker explain --pid`: pinned by a pidfd first, then its
    /// effective uid and gid and its supplementary groups read from `/proc/<pid>/status`, which belong to it
    /// because the pidfd still says it is alive afterwards. [`identify`](Self::identify) completes the
    /// identity as for a real call.
    ///
    /// # Errors
    /// [`PeerError`] when there is no such process, or it exits meanwhile.
    pub fn of_process(pid: i32, proc_root: &Path) -> Result<Self, PeerError> {
        let pidfd = sys::pidfd_open(pid).map_err(|source| PeerError::Pidfd { pid, source })?;
        let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))
            .map_err(|source| PeerError::Proc { pid, source })?;
        let field = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|ids| {
                    ids.split_whitespace()
                        .filter_map(|i| i.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let unreadable = || PeerError::Proc {
            pid,
            source: io::Error::other("no Uid or Gid line in its status"),
        };
        // Real, effective, saved, filesystem: the effective one is what SO_PEERCRED reports.
        let uid = *field("Uid:").get(1).ok_or_else(unreadable)?;
        let gid = *field("Gid:").get(1).ok_or_else(unreadable)?;
        let cred = Self {
            uid,
            gid,
            pid: Some(pid),
            groups: field("Groups:"),
            pidfd: Some(pidfd),
            pinned_late: false,
        };
        cred.ensure_alive()?;
        Ok(cred)
    }

    /// Fails unless the peer process is still the one that connected.
    ///
    /// # Errors
    /// [`PeerError::PidNotVisible`] or [`PeerError::Exited`].
    pub fn ensure_alive(&self) -> Result<i32, PeerError> {
        let (Some(pid), Some(pidfd)) = (self.pid, &self.pidfd) else {
            return Err(PeerError::PidNotVisible);
        };
        match sys::pidfd_exited(pidfd.as_fd()) {
            Ok(false) => Ok(pid),
            Ok(true) => Err(PeerError::Exited { pid }),
            Err(source) => Err(PeerError::Pidfd { pid, source }),
        }
    }

    /// Reads the peer's executable: the first thing the daemon does with a new connection, right after
    /// accepting it, because a process may `exec` another program after `connect(2)` and would be judged as
    /// that program if the daemon looked later. `late` says how far behind the connection was accepted (see
    /// [`Settled::late`]). Cheap and non-blocking: two `readlink`s and a `stat` in `/proc`.
    ///
    /// The executable cannot be read when the daemon lacks ptrace access to the peer (a non-root daemon and
    /// a peer of another user): policies that name `exe` then do not match it.
    pub fn settle_exe(&self, proc_root: &Path, late: Option<Late>) -> Settled {
        let Some(pid) = self.pid else {
            return Settled::default();
        };
        let dir = proc_root.join(pid.to_string());
        let exe = std::fs::read_link(dir.join("exe")).ok();
        let exe_id = exe.as_ref().and_then(|_| FileId::of(&dir.join("exe")).ok());
        let namespace = |d: &Path| std::fs::read_link(d.join("ns/mnt")).ok();
        let other_namespace = match (namespace(&dir), namespace(&proc_root.join("self"))) {
            (Some(theirs), Some(ours)) => theirs != ours,
            _ => false,
        };
        Settled {
            exe,
            exe_id,
            other_namespace,
            late,
        }
    }

    /// Completes the identity from `/proc` and NSS, with the executable settled at accept. Blocking: call it
    /// off the async workers.
    ///
    /// `proc_root` is `/proc` outside tests.
    ///
    /// # Errors
    /// [`PeerError`] when the peer is not visible, has exited, or `/proc/<pid>` cannot be read.
    pub fn identify(&self, proc_root: &Path, settled: Settled) -> Result<Caller, PeerError> {
        let pid = self.ensure_alive()?;
        let dir = proc_root.join(pid.to_string());
        let Settled {
            exe,
            mut exe_id,
            other_namespace,
            late,
        } = settled;
        if late.is_some() {
            // Read too long after connect(2) to tell what the process was then: no exe policy may match.
            exe_id = None;
        }
        let cgroup = std::fs::read_to_string(dir.join("cgroup"))
            .map_err(|source| PeerError::Proc { pid, source })?;
        if self.pinned_late {
            // The pidfd may pin a newcomer that reused the pid before accept(): refuse unless it has the
            // effective uid and gid the kernel recorded at connect(2).
            let status = std::fs::read_to_string(dir.join("status"))
                .map_err(|source| PeerError::Proc { pid, source })?;
            let effective = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|ids| ids.split_whitespace().nth(1)?.parse::<u32>().ok())
            };
            if effective("Uid:") != Some(self.uid) || effective("Gid:") != Some(self.gid) {
                return Err(PeerError::Replaced { pid });
            }
        }
        // Whatever we read belongs to the peer only if it is still alive now: a pid is not reused before its
        // process has exited, and the pidfd says whether it has.
        self.ensure_alive()?;

        let mut gids = Vec::with_capacity(self.groups.len() + 1);
        gids.push(self.gid);
        gids.extend(self.groups.iter().copied().filter(|&g| g != self.gid));
        let groups = gids
            .iter()
            .map(|&g| group_name(g).unwrap_or_else(|| g.to_string()))
            .collect();
        Ok(Caller {
            uid: self.uid,
            gid: self.gid,
            pid,
            user: user_name(self.uid),
            gids,
            groups,
            exe,
            exe_id,
            exe_note: match (late, other_namespace) {
                (Some(late), _) => Some(ExeNote::Late(late)),
                (None, true) => Some(ExeNote::OtherNamespace),
                (None, false) => None,
            },
            unit: unit_from_cgroup(&cgroup),
        })
    }

    /// Checks that the process that connected is alive and still runs the executable file it ran when
    /// [`identify`](Self::identify) made `caller` of it. A `stat` of `/proc/<pid>/exe`: callers pay it only when
    /// a decision depends on the executable.
    ///
    /// # Errors
    /// [`PeerError::Exited`], [`PeerError::ExeChanged`], or why `/proc/<pid>/exe` could no longer be read.
    pub fn check_exe(&self, caller: &Caller, proc_root: &Path) -> Result<(), PeerError> {
        let pid = self.ensure_alive()?;
        if let Some(id) = caller.exe_id {
            let path = proc_root.join(pid.to_string()).join("exe");
            match FileId::of(&path) {
                Ok(now) if now == id => {}
                Ok(_) => return Err(PeerError::ExeChanged { pid }),
                Err(source) => return Err(PeerError::Proc { pid, source }),
            }
            // The exe read above is the peer's only if the peer is still alive now.
            self.ensure_alive()?;
        }
        Ok(())
    }
}

/// The executable of a new connection's peer, read right after accept.
#[derive(Clone, Debug, Default)]
pub struct Settled {
    exe: Option<PathBuf>,
    exe_id: Option<FileId>,
    other_namespace: bool,
    late: Option<Late>,
}

/// How far behind a connection was accepted, when too far for its executable to be judged: it was queued
/// behind `behind` others (or accepted `after` the first of them), so the process may have called `exec`
/// between its `connect(2)` and the daemon's look at `/proc/<pid>/exe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Late {
    /// Connections accepted before it since the queue was last empty.
    pub behind: usize,
    /// Time since the first of them was accepted.
    pub after: Duration,
}

/// What a caller's executable path cannot be taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExeNote {
    /// The path is as the process sees it in its own mount namespace: it may name another file in the
    /// daemon's (policies compare files, by device and inode, so the decision is right; the path may not be).
    OtherNamespace,
    /// Read too late to be judged (see [`Late`]): policies that name `exe` do not match.
    Late(Late),
}

impl fmt::Display for ExeNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OtherNamespace => write!(f, "as seen in another mount namespace"),
            Self::Late(l) => write!(
                f,
                "not judged: accepted behind {} other connections, {} ms after the first; connect again",
                l.behind,
                l.after.as_millis()
            ),
        }
    }
}

/// A file's identity: its device and inode. Two paths name the same file when their ids are equal, whatever
/// the path strings say; a bind mount over a path in another mount namespace does not change what the daemon
/// sees at that path in its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `path` names, following symbolic links (and `/proc/<pid>/exe`).
    ///
    /// # Errors
    /// `stat(2)`'s error.
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// How long a user or group name from NSS is reused.
const NAME_TTL: Duration = Duration::from_secs(60);
/// Names cached at most; the cache starts afresh when full.
const MAX_NAMES: usize = 4096;

type NameCache = HashMap<(bool, u32), (Option<String>, Instant)>;

/// uid and gid names, cached so that a flood of connections does not become a flood of NSS look-ups (which
/// may ask LDAP or sssd) on the blocking threads.
static NAMES: LazyLock<Mutex<NameCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn cached_name(group: bool, id: u32, lookup: fn(u32) -> Option<String>) -> Option<String> {
    let now = Instant::now();
    {
        let names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((name, at)) = names.get(&(group, id))
            && now.duration_since(*at) < NAME_TTL
        {
            return name.clone();
        }
    }
    let name = lookup(id);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if names.len() >= MAX_NAMES {
        names.clear();
    }
    names.insert((group, id), (name.clone(), now));
    name
}

/// The name of user `uid` (NSS, cached for a minute).
pub fn user_name(uid: u32) -> Option<String> {
    cached_name(false, uid, sys::user_name)
}

/// The name of group `gid` (NSS, cached for a minute).
pub fn group_name(gid: u32) -> Option<String> {
    cached_name(true, gid, sys::group_name)
}

/// A caller as the daemon sees it: what policies match on, what WhoAmI reports and what the audit log names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid when it connected.
    pub uid: u32,
    /// Effective gid when it connected.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
    /// The uid's user name, if NSS knows one.
    pub user: Option<String>,
    /// Primary gid first, then supplementary gids.
    pub gids: Vec<u32>,
    /// Names of `gids`, in the same order (the number where a group has no name).
    pub groups: Vec<String>,
    /// `/proc/<pid>/exe`, if readable.
    pub exe: Option<PathBuf>,
    /// The identity of the executable file at accept, if readable and read in time. Policies match `exe` on
    /// this, never on the path string.
    pub exe_id: Option<FileId>,
    /// What `exe` cannot be taken for, if anything.
    pub exe_note: Option<ExeNote>,
    /// The systemd unit the process runs in, if any.
    pub unit: Option<String>,
}

impl fmt::Display for Caller {
    /// A short description for error messages and logs: `uid=1000(alice) gid=1000 pid=42 exe="/usr/bin/x"
    /// unit="x.service"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={}", self.uid)?;
        if let Some(user) = &self.user {
            write!(f, "({user})")?;
        }
        write!(f, " gid={} pid={}", self.gid, self.pid)?;
        // Quoted and escaped: a path or cgroup name may hold newlines and other control characters, which must
        // not reach log lines or messages raw.
        match &self.exe {
            Some(exe) => write!(
                f,
                " exe=\"{}\"",
                crate::text::clip_escaped(&exe.to_string_lossy())
            )?,
            None => write!(f, " exe=?")?,
        }
        if let Some(note) = &self.exe_note {
            write!(f, " ({note})")?;
        }
        if let Some(unit) = &self.unit {
            write!(f, " unit=\"{}\"", crate::text::clip_escaped(unit))?;
        }
        Ok(())
    }
}

impl Caller {
    /// A caller described rather than connected, for `credbroker explain`: user `uid` with `gids` (primary
    /// first), running `exe` in `unit`. The executable is identified as on a real call, by the file at that path
    /// now (device and inode); a path that cannot be stat'ed identifies nothing, so `exe` policies do not match.
    /// Returns notes on what could not be resolved.
    pub fn described(
        uid: u32,
        gids: Vec<u32>,
        exe: Option<PathBuf>,
        unit: Option<String>,
    ) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let exe_id = exe.as_ref().and_then(|path| match FileId::of(path) {
            Ok(id) => Some(id),
            Err(e) => {
                notes.push(format!(
                    "cannot stat {}: {e}; exe policies do not match",
                    path.display()
                ));
                None
            }
        });
        let user = user_name(uid);
        if user.is_none() {
            notes.push(format!(
                "uid {uid} has no user name; user policies do not match"
            ));
        }
        let groups = gids
            .iter()
            .map(|&g| group_name(g).unwrap_or_else(|| g.to_string()))
            .collect();
        let caller = Self {
            uid,
            gid: gids.first().copied().unwrap_or(uid),
            pid: 0,
            user,
            gids,
            groups,
            exe,
            exe_id,
            exe_note: None,
            unit,
        };
        (caller, notes)
    }
}

/// Whether this process holds `CAP_SYS_PTRACE`, which reading `/proc/<pid>/exe` of another user's process
/// needs (from `CapEff` in `/proc/self/status`).
pub fn can_read_other_users_exe() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// The systemd unit named by a `/proc/<pid>/cgroup` file: the first path component below the slices,
/// e.g. `billing.service` for `0::/system.slice/billing.service`, `session-3.scope` for a login session.
/// Uses the unified (v2) hierarchy, else the `name=systemd` one of a hybrid set-up.
pub fn unit_from_cgroup(content: &str) -> Option<String> {
    let path_of = |prefix: &str| {
        content
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .filter(|path| *path != "/")
    };
    let path = path_of("0::").or_else(|| {
        content.lines().find_map(|line| {
            let (_, rest) = line.split_once(':')?;
            rest.strip_prefix("name=systemd:")
        })
    })?;
    path.split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| is_unit_name(c))
        .map(str::to_owned)
}

fn is_unit_name(component: &str) -> bool {
    const SUFFIXES: [&str; 4] = [".service", ".scope", ".socket", ".mount"];
    SUFFIXES
        .iter()
        .any(|s| component.len() > s.len() && component.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_of_a_system_service() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/billing-sync.service\n").as_deref(),
            Some("billing-sync.service")
        );
    }

    #[test]
    fn unit_of_a_login_session_and_user_manager() {
        assert_eq!(
            unit_from_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            unit_from_cgroup(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n"
            )
            .as_deref(),
            Some("user@1000.service")
        );
    }

    #[test]
    fn unit_from_a_hybrid_hierarchy() {
        let hybrid = "12:memory:/x\n1:name=systemd:/system.slice/cron.service\n0::/\n";
        assert_eq!(unit_from_cgroup(hybrid).as_deref(), Some("cron.service"));
    }

    #[test]
    fn no_unit_outside_systemd() {
        assert_eq!(unit_from_cgroup("0::/\n"), None);
        assert_eq!(unit_from_cgroup("0::/docker/abc123\n"), None);
        assert_eq!(unit_from_cgroup(""), None);
    }

    #[tokio::test]
    async fn a_late_pinned_pid_must_still_have_the_ids_that_connected() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut cred = PeerCred::from_stream(&a).unwrap();
        cred.pinned_late = true;
        let proc = Path::new("/proc");
        assert!(cred.identify(proc, cred.settle_exe(proc, None)).is_ok());
        cred.uid += 1;
        assert!(matches!(
            cred.identify(proc, cred.settle_exe(proc, None)),
            Err(PeerError::Replaced { .. })
        ));
    }

    #[tokio::test]
    async fn identifies_this_process_over_a_socketpair() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = PeerCred::from_stream(&a).unwrap();
        let proc = Path::new("/proc");
        let caller = cred.identify(proc, cred.settle_exe(proc, None)).unwrap();
        assert_eq!(caller.exe_note, None, "the same mount namespace");
        assert_eq!(caller.pid, std::process::id() as i32);
        assert_eq!(caller.exe, Some(std::env::current_exe().unwrap()));
        assert_eq!(
            caller.exe_id,
            Some(FileId::of(&std::env::current_exe().unwrap()).unwrap())
        );
        assert_eq!(caller.gids[0], caller.gid);
        assert!(cred.check_exe(&caller, Path::new("/proc")).is_ok());
        // Another executable than the one seen at accept is refused.
        let other = Caller {
            exe_id: Some(FileId::of(Path::new("/bin/sh")).unwrap()),
            ..caller
        };
        assert!(matches!(
            cred.check_exe(&other, Path::new("/proc")),
            Err(PeerError::ExeChanged { .. })
        ));
        // Read too late after accept: the path is kept for the record, but no exe policy may match.
        let late = Late {
            behind: 40,
            after: Duration::from_millis(3),
        };
        let caller = cred
            .identify(proc, cred.settle_exe(proc, Some(late)))
            .unwrap();
        assert_eq!(caller.exe_id, None);
        assert!(
            caller
                .to_string()
                .contains("not judged: accepted behind 40"),
            "{caller}"
        );
    }
}
