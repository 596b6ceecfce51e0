//! Who can change what a path leads to, so the daemon never reads, for someone, a file that they could not
//! read themselves (the confused deputy).
//!
//! A path is walked one component at a time, links followed by hand, and every directory an entry is looked
//! up in is judged: its owner can rename, replace or remove the entry, and so can anyone when the directory
//! is writable by others without the sticky bit (then only the entry's owner and the directory's owner can).
//! Those users *control* the path. Root and the daemon's own user are trusted; every other controller must
//! own the file the path finally names, or the daemon refuses to open it. So a user who controls a link may
//! point it at their own files only: not at `/etc/shadow`, another client's secret or
//! `/proc/<daemon>/environ`, which the daemon could read and they could not.
//!
//! When someone untrusted controls the path, every failure reads the same: the error never tells a missing
//! file from one that exists and belongs to someone else.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Links followed in one walk at most (as the kernel's own limit).
const MAX_LINKS: usize = 40;

/// What a walk found: the file a path leads to, its identity, and who could change that.
#[derive(Debug)]
pub struct Walked {
    /// The path with every link resolved.
    pub resolved: PathBuf,
    /// The file's owner.
    pub owner: u32,
    /// The file's device and inode, to check the descriptor opened afterwards against.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
    /// Whether a link was followed on the way.
    pub through_link: bool,
}

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// An untrusted user controls the path and it does not lead to a file of theirs: missing, someone else's,
    /// or unreadable, deliberately not said which.
    #[error(
        "{path}: uid {controller} can change where it leads ({dir}), and it does not lead to an existing \
         file of that user's; the daemon reads for a user only files that user owns"
    )]
    Foreign {
        /// The configured path.
        path: PathBuf,
        /// One untrusted user who controls it.
        controller: u32,
        /// Where: the directory whose owner, or whose write permission, gives that control.
        dir: PathBuf,
    },
    /// A directory on the way can be changed by a whole group, or by anyone (writable, not sticky).
    #[error(
        "{path}: {dir} is writable by {who} (mode {mode:04o}), who could replace what it holds; make it \
         writable by its owner only (or sticky)"
    )]
    OpenDirectory {
        /// The configured path.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// "its group" or "every user".
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// More links than [`MAX_LINKS`], or a link where links are not allowed.
    #[error("{path}: too many symbolic links on the way")]
    Loop {
        /// The configured path.
        path: PathBuf,
    },
    /// A trusted path that cannot be walked (missing, unreadable), with the system's reason.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path, as far as it was walked.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Walks `path` (absolute), following links, and checks that whoever controls it, beyond root and the
/// daemon's user, owns the file it leads to.
///
/// # Errors
/// [`WalkError`].
pub fn walk(path: &Path) -> Result<Walked, WalkError> {
    let trusted = |uid: u32| uid == 0 || uid == crate::sys::euid();
    let mut pending: VecDeque<OsString> = components(path);
    let mut at = PathBuf::from("/");
    let mut dir_meta = lstat(&at).map_err(|source| WalkError::Io {
        path: at.clone(),
        source,
    })?;
    // Untrusted controllers, each with the directory that gives it control.
    let mut controllers: BTreeSet<(u32, PathBuf)> = BTreeSet::new();
    let mut links = 0;
    // Once someone untrusted controls the walk, every failure is reported alike.
    let fail = |controllers: &BTreeSet<(u32, PathBuf)>, source: std::io::Error, at: &Path| {
        match controllers.iter().next() {
            Some((uid, dir)) => WalkError::Foreign {
                path: path.to_owned(),
                controller: *uid,
                dir: dir.clone(),
            },
            None => WalkError::Io {
                path: at.to_owned(),
                source,
            },
        }
    };
    loop {
        let Some(name) = pending.pop_front() else {
            return Err(fail(
                &controllers,
                std::io::Error::from(std::io::ErrorKind::IsADirectory),
                &at,
            ));
        };
        if name == ".." {
            at.pop();
            dir_meta = lstat(&at).map_err(|e| fail(&controllers, e, &at))?;
            continue;
        }
        let entry = at.join(&name);
        let meta = lstat(&entry).map_err(|e| fail(&controllers, e, &entry))?;
        // Who can change this entry of `at`.
        let mode = dir_meta.mode();
        let sticky = mode & libc::S_ISVTX != 0;
        if !trusted(dir_meta.uid()) {
            controllers.insert((dir_meta.uid(), at.clone()));
        }
        if mode & 0o002 != 0 || (mode & 0o020 != 0 && dir_meta.gid() != 0) {
            if !sticky {
                return Err(WalkError::OpenDirectory {
                    path: path.to_owned(),
                    dir: at.clone(),
                    who: if mode & 0o002 != 0 {
                        "every user"
                    } else {
                        "its group"
                    },
                    mode: mode & 0o7777,
                });
            }
            if !trusted(meta.uid()) {
                controllers.insert((meta.uid(), at.clone()));
            }
        }
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(WalkError::Loop {
                    path: path.to_owned(),
                });
            }
            let target = std::fs::read_link(&entry).map_err(|e| fail(&controllers, e, &entry))?;
            let mut rest = components(&target);
            rest.extend(pending);
            pending = rest;
            if target.is_absolute() {
                at = PathBuf::from("/");
                dir_meta = lstat(&at).map_err(|e| fail(&controllers, e, &at))?;
            }
            continue;
        }
        if pending.is_empty() {
            // The file itself: every untrusted controller must own it.
            if let Some((uid, dir)) = controllers.iter().find(|(uid, _)| *uid != meta.uid()) {
                return Err(WalkError::Foreign {
                    path: path.to_owned(),
                    controller: *uid,
                    dir: dir.clone(),
                });
            }
            return Ok(Walked {
                resolved: entry,
                owner: meta.uid(),
                dev: meta.dev(),
                ino: meta.ino(),
                through_link: links > 0,
            });
        }
        if !meta.is_dir() {
            return Err(fail(
                &controllers,
                std::io::Error::from(std::io::ErrorKind::NotADirectory),
                &entry,
            ));
        }
        at = entry;
        dir_meta = meta;
    }
}

fn lstat(path: &Path) -> std::io::Result<std::fs::Metadata> {
    std::fs::symlink_metadata(path)
}

/// The names to look up, in order (`.` dropped, `..` kept: it is resolved against the walked path).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn dir_of(uid: u32, mode: u32) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(d.path(), Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    fn file_of(path: &Path, uid: u32, mode: u32) {
        std::fs::write(path, "x").unwrap();
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// These tests give files away to other uids: they need root, as the end-to-end tests do.
    fn root() -> bool {
        crate::sys::euid() == 0
    }

    #[test]
    fn a_user_may_point_a_link_at_their_own_files_only() {
        if !root() {
            return;
        }
        let agent = dir_of(12346, 0o755);
        let own = agent.path().join("jwt.real");
        file_of(&own, 12346, 0o600);
        let link = agent.path().join("jwt");
        symlink(&own, &link).unwrap();
        let w = walk(&link).unwrap();
        assert_eq!((w.owner, w.through_link), (12346, true));

        // Someone else's file, a root file, a missing file: one and the same refusal.
        let other = dir_of(12347, 0o755);
        let theirs = other.path().join("jwt");
        file_of(&theirs, 12347, 0o600);
        let root_file = agent.path().join("root-owned");
        file_of(&root_file, 0, 0o600);
        let mut messages = Vec::new();
        for (i, target) in [
            theirs.clone(),
            PathBuf::from("/etc/shadow"),
            root_file,
            other.path().join("missing"),
        ]
        .iter()
        .enumerate()
        {
            let l = agent.path().join(format!("l{i}"));
            symlink(target, &l).unwrap();
            let e = walk(&l).unwrap_err();
            assert!(
                matches!(
                    e,
                    WalkError::Foreign {
                        controller: 12346,
                        ..
                    }
                ),
                "{e}"
            );
            messages.push(e.to_string().replace(&format!("l{i}"), "L"));
        }
        assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
        // A file of the agent's own in the agent's directory, no link: fine; a root file there is not.
        assert!(walk(&own).is_ok());
    }

    #[test]
    fn root_controlled_paths_may_lead_anywhere_and_say_why_they_fail() {
        if !root() {
            return;
        }
        let d = dir_of(0, 0o755);
        let f = d.path().join("f");
        file_of(&f, 12346, 0o600);
        let l = d.path().join("l");
        symlink(&f, &l).unwrap();
        assert_eq!(walk(&l).unwrap().owner, 12346);
        let e = walk(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, WalkError::Io { .. }), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
    }

    #[test]
    fn open_directories_are_refused_and_sticky_ones_give_control_to_the_entry_owner() {
        if !root() {
            return;
        }
        let open = dir_of(0, 0o777);
        let f = open.path().join("f");
        file_of(&f, 0, 0o600);
        assert!(matches!(walk(&f), Err(WalkError::OpenDirectory { .. })));
        let sticky = dir_of(0, 0o1777);
        let mine = sticky.path().join("mine");
        file_of(&mine, 12346, 0o600);
        assert_eq!(walk(&mine).unwrap().owner, 12346);
        // A user's link in a sticky directory, to root's file.
        let l = sticky.path().join("l");
        symlink("/etc/shadow", &l).unwrap();
        std::os::unix::fs::lchown(&l, Some(12346), Some(12346)).unwrap();
        assert!(matches!(
            walk(&l),
            Err(WalkError::Foreign {
                controller: 12346,
                ..
            })
        ));
    }

    #[test]
    fn relative_links_and_dot_dot_resolve_against_the_walked_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/f"), "x").unwrap();
        symlink("a", d.path().join("data")).unwrap();
        symlink("data/f", d.path().join("token")).unwrap();
        let w = walk(&d.path().join("token")).unwrap();
        assert_eq!(w.resolved, d.path().join("a/f"));
        let w = walk(&d.path().join("a/../token")).unwrap();
        assert_eq!(w.resolved, d.path().join("a/f"));
    }
}
