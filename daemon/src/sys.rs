//! The few Linux system calls the standard library and tokio do not wrap: the only `unsafe` code of the
//! daemon, kept here so it can be reviewed in one sitting.
//!
//! - [`make_non_dumpable`]: `PR_SET_DUMPABLE` 0 and `RLIMIT_CORE` 0, so secrets never reach a core dump and
//!   other processes of the daemon's user cannot `ptrace` it or read its memory through `/proc`.
//! - [`peer_pidfd`] and [`peer_groups`]: `SO_PEERPIDFD` and `SO_PEERGROUPS`, the kernel's view of a Unix socket
//!   peer at the time it connected.
//! - [`pidfd_exited`]: whether the process behind a pidfd has exited, which makes PID reuse harmless.
//! - [`take_listen_fd`]: the listening socket systemd passes by socket activation (`LISTEN_FDS`).
//! - [`euid`], [`raise_nofile`], [`bind_with_mode`]: the effective uid; the open file limit raised to its
//!   hard limit; a socket bound with its permission bits set by the umask, atomically.
//! - [`user_name`], [`group_name`], [`user_id`], [`group_id`]: NSS look-ups (`getpwuid_r`, `getgrgid_r`, `getgrnam_r`), so
//!   users from LDAP or sssd are named like local ones.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// The socket option numbers of the asm-generic ABI (x86, x86_64, arm, aarch64, riscv, loongarch). The few
// architectures with their own numbering are not supported.
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64",
    target_arch = "powerpc",
    target_arch = "powerpc64"
))]
compile_error!("SO_PEERGROUPS/SO_PEERPIDFD numbers differ on this architecture");
const SO_PEERGROUPS: libc::c_int = 59;
const SO_PEERPIDFD: libc::c_int = 77;

/// Makes the process non-dumpable and disables core files.
///
/// # Errors
/// Fails when the kernel refuses either setting, or when `PR_GET_DUMPABLE` does not read back 0; the daemon
/// must not read any secret then.
pub fn make_non_dumpable() -> io::Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; PR_GET_DUMPABLE returns the flag.
    match unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } {
        0 => Ok(()),
        -1 => Err(io::Error::last_os_error()),
        other => Err(io::Error::other(format!(
            "PR_GET_DUMPABLE reads {other} after PR_SET_DUMPABLE 0"
        ))),
    }
}

/// A pidfd for the process that connected a Unix stream socket (`SO_PEERPIDFD`, Linux 6.5+).
///
/// Unlike the pid of `SO_PEERCRED`, the pidfd keeps referring to that very process: once it exits, the pidfd
/// says so, even when the pid has been handed to another process.
///
/// # Errors
/// The kernel's error, e.g. `ENOPROTOOPT` on kernels before 6.5.
pub fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, which is a c_int we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd for `pid` (`pidfd_open`), for kernels without `SO_PEERPIDFD`.
///
/// # Errors
/// The kernel's error, e.g. `ESRCH` when the process is gone.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited: a pidfd becomes readable when its process terminates.
///
/// # Errors
/// The kernel's error from `poll`.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly one pollfd we own; timeout 0 never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}

/// The supplementary groups of a Unix stream socket's peer when it connected (`SO_PEERGROUPS`, Linux 4.13+).
///
/// # Errors
/// The kernel's error.
pub fn peer_groups(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(io::Error::other)?;
        // SAFETY: getsockopt writes at most `len` bytes into the vector's initialised buffer.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` now holds the size needed.
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65_536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// The process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit: the daemon sizes its
/// connection budget from it.
///
/// # Errors
/// The kernel's error from `getrlimit` (a failed raise keeps and returns the old soft limit).
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads a valid rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// Binds a Unix stream socket at `path` whose permission bits are `mode` from the moment it exists: the
/// umask is set to the complement of `mode` around `bind(2)`, so no later `chmod` by path (which a symlink
/// swapped in could redirect) is needed.
///
/// The umask is process-wide: call this before other threads create files (the daemon binds before its
/// runtime starts).
///
/// # Errors
/// `bind(2)`'s error.
pub fn bind_with_mode(
    path: &std::path::Path,
    mode: u32,
) -> io::Result<std::os::unix::net::UnixListener> {
    let mask = !mode & 0o777;
    // SAFETY: umask takes and returns plain integers.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    bound
}

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: libc::c_int = 3;

/// The listening Unix stream socket systemd passed, if `LISTEN_PID` names this process and `LISTEN_FDS` is
/// at least 1 (values read from the environment by the caller). Takes ownership of fd 3 and marks it
/// close-on-exec.
///
/// # Errors
/// When fd 3 is not a listening Unix stream socket, or more than one socket is passed.
pub fn take_listen_fd(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
) -> io::Result<Option<std::os::unix::net::UnixListener>> {
    let ours = listen_pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count: u32 = match listen_fds.and_then(|n| n.parse().ok()) {
        Some(n) if ours => n,
        _ => return Ok(None),
    };
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(io::Error::other(format!(
                "systemd passed {n} sockets; the unit should pass one"
            )));
        }
    }
    let fd = LISTEN_FDS_START;
    let int_opt = |level, name| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, a c_int we own; fd 3 is open (systemd
        // passed it), and an invalid fd only makes the call fail.
        let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let domain = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let kind = int_opt(libc::SOL_SOCKET, libc::SO_TYPE)?;
    let listening = int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM || listening == 0 {
        return Err(io::Error::other(
            "the socket systemd passed is not a listening Unix stream socket (ListenStream=/path)",
        ));
    }
    // SAFETY: fd 3 is a socket systemd handed to this process for it to own; nothing else in the process
    // refers to it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl with F_SETFD on a descriptor we now own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// User `uid`'s entry from NSS: its name (if it has one) and primary gid; `None` when there is no such user.
fn user_entry(uid: u32) -> Option<(Option<String>, u32)> {
    with_buffer(|buf| {
        // SAFETY: all-zero bytes are a valid `passwd` (null pointers, zero ids); getpwuid_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to memory we own for the duration of the call; strings land in `buf`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc != 0 {
            return Err(rc);
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success a non-null pw_name points to a NUL-terminated string inside `buf`.
        let name = (!pwd.pw_name.is_null()).then(|| {
            unsafe { CStr::from_ptr(pwd.pw_name) }
                .to_string_lossy()
                .into_owned()
        });
        Ok(Some((name, pwd.pw_gid)))
    })
}

/// The name of user `uid`, from NSS; `None` when it has none.
pub fn user_name(uid: u32) -> Option<String> {
    user_entry(uid)?.0
}

/// The primary gid of user `uid`, from NSS; `None` when there is no such user.
pub fn user_gid(uid: u32) -> Option<u32> {
    user_entry(uid).map(|(_, gid)| gid)
}

/// The groups of user `name` as a login would get them (`getgrouplist`): `gid` first, then the supplementary
/// groups the group database lists the user in. At most 4096.
pub fn user_groups(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![gid];
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `cname` is NUL-terminated; `groups` has room for `n` gids, and getgrouplist writes at most
        // `n` of them, setting `n` to how many there are (or would be, when it returns -1).
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            break;
        }
        if n <= groups.len() || n > 4096 {
            groups.truncate(groups.len().min(4096));
            break;
        }
        groups.resize(n, 0);
    }
    let mut out = vec![gid];
    out.extend(groups.into_iter().filter(|&g| g != gid));
    out
}

/// The name of group `gid`, from NSS; `None` when it has none.
pub fn group_name(gid: u32) -> Option<String> {
    with_buffer(|buf| {
        // SAFETY: all-zero bytes are a valid `group`; getgrgid_r overwrites it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to memory we own for the duration of the call; strings land in `buf`.
        let rc =
            unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc != 0 {
            return Err(rc);
        }
        if result.is_null() || grp.gr_name.is_null() {
            return Ok(None);
        }
        // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
        Ok(Some(
            unsafe { CStr::from_ptr(grp.gr_name) }
                .to_string_lossy()
                .into_owned(),
        ))
    })
}

/// The id of the group called `name`, from NSS; `None` when there is none.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: all-zero bytes are a valid `group`; getgrnam_r overwrites it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to memory we own for the duration of the call.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!result.is_null()).then_some(grp.gr_gid))
    })
}

/// The id of the user called `name`, from NSS; `None` when there is none.
pub fn user_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: all-zero bytes are a valid `passwd`; getpwnam_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to memory we own for the duration of the call.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!result.is_null()).then_some(pwd.pw_uid))
    })
}

/// Runs an NSS `*_r` look-up with a buffer that grows on `ERANGE`; other errors read as "not found".
fn with_buffer<T>(
    mut lookup: impl FnMut(&mut [libc::c_char]) -> Result<Option<T>, i32>,
) -> Option<T> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        match lookup(&mut buf) {
            Ok(found) => return found,
            Err(libc::ERANGE) if size < 1 << 20 => size *= 4,
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_of_a_socketpair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pidfd = peer_pidfd(a.as_fd()).unwrap();
        assert!(!pidfd_exited(pidfd.as_fd()).unwrap());
        let groups = peer_groups(a.as_fd()).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let want: Vec<u32> = line["Groups:".len()..]
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        assert_eq!(groups, want);
    }

    #[test]
    fn pidfd_of_an_exited_child_reports_exit() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pidfd = pidfd_open(child.id() as i32).unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(pidfd.as_fd()).unwrap());
    }

    #[test]
    fn root_is_in_group_root() {
        assert_eq!(user_gid(0), Some(0));
        assert_eq!(user_groups("root", 0)[0], 0);
    }

    #[test]
    fn nss_names_root() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-credbroker"), None);
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(user_id("no-such-user-credbroker"), None);
    }
}
