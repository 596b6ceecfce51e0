//! Client credentials: where they come from (a file, a systemd credential, an environment variable), how they
//! are read and checked ([`FileKind`]), the type that holds them, and how a file is read again when it changes
//! ([`Rotating`]).
//!
//! # Security
//! A secret is read into a [`SecretString`] (zeroized on drop) and stays there until the upstream request is
//! built. [`Secret`]'s `Debug` prints the source, never the value. Files readable by every user are refused:
//! a secret anyone can read is no secret.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// Largest secret file accepted, in bytes.
pub const MAX_SECRET_LEN: u64 = 64 * 1024;

/// Where a secret is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (`{ file = "/etc/credbroker/x.secret" }`).
    File(PathBuf),
    /// A systemd credential in `$CREDENTIALS_DIRECTORY` (`{ credential = "x" }`, from `LoadCredential=`).
    Credential(String),
    /// An environment variable of the daemon (`{ env = "VAR" }`).
    Env(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Credential(c) => write!(f, "systemd credential {c}"),
            Self::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// The rules a credential file must pass, by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Client secrets and private keys: the file itself, never a link; owned by root or the daemon's user;
    /// not writable by group or others, not readable by others.
    Secret,
    /// Certificates and CA bundles: public, so they may be readable by everyone, but the file itself (never a
    /// link), owned by root or the daemon's user, and not writable by group or others: whoever could replace a
    /// CA bundle could impersonate the IdP.
    Certificate,
    /// Federated client assertions, written by an agent (spire-agent, vault agent, a kubelet): links are
    /// followed (Kubernetes-style `..data` links), then the file must be a regular file, owned by anyone (the
    /// writer), not writable or readable by others. Not secret from the uid that writes it.
    Assertion,
}

/// What the process environment offers secret sources, read once at the edge (so tests need no `set_var`).
pub struct SecretEnv<'a> {
    /// `$CREDENTIALS_DIRECTORY`, set by systemd when the unit has `LoadCredential=`.
    pub credentials_dir: Option<PathBuf>,
    /// Looks up an environment variable.
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// When set, every source is read through this instead, and no file, directory or variable is touched:
    /// the seam through which the config fuzz target validates configs without reading secrets from disk.
    pub offline: Option<ReadSource<'a>>,
}

/// Reads a credential source without the file system or the environment (`SecretEnv::offline`).
pub type ReadSource<'a> = &'a dyn Fn(&SecretSource) -> Option<String>;

impl SecretEnv<'_> {
    /// No credentials directory and no variables: for reading files.
    pub fn none() -> SecretEnv<'static> {
        SecretEnv {
            credentials_dir: None,
            var: &|_| None,
            offline: None,
        }
    }

    /// The real process environment.
    pub fn process() -> SecretEnv<'static> {
        SecretEnv {
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            var: &|name| std::env::var(name).ok(),
            offline: None,
        }
    }
}

/// Why a secret could not be loaded. Messages name the source, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by every user.
    #[error("{path} is readable by every user (mode {mode:04o}); run: chmod o-rwx {path}")]
    WorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A symbolic link: secrets are read from the file the config names, never through a link.
    #[error("{path} is a symbolic link; name the file itself")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Writable by every user, who could replace it.
    #[error("{path} is writable by every user (mode {mode:04o}); run: chmod o-w {path}")]
    OtherWritable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by someone other than root or the daemon's user, who could replace it.
    #[error("{path} is owned by uid {uid}; it must belong to root or to the daemon's user")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Writable by group or other users, who could replace the secret.
    #[error("{path} is writable by other users (mode {mode:04o}); run: chmod go-w {path}")]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Larger than [`MAX_SECRET_LEN`].
    #[error("{path} is larger than {MAX_SECRET_LEN} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Empty once a trailing newline is removed.
    #[error("{0} is empty")]
    Empty(SecretSource),
    /// Not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(SecretSource),
    /// `{ credential = … }` without `$CREDENTIALS_DIRECTORY`.
    #[error(
        "systemd credential {0:?} needs $CREDENTIALS_DIRECTORY, which systemd sets: put the secret in \
         /etc/credbroker/credentials/{0} (root only, 0600) and run the shipped credbroker.service, which loads \
         that directory; outside systemd, use {{ file = \"/path\" }} or {{ env = \"VAR\" }}"
    )]
    NoCredentialsDirectory(String),
    /// The environment variable is not set (or not UTF-8).
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    /// Someone the daemon does not trust controls the path, and it does not lead to a file of theirs; or a
    /// directory on the way is open to others (see [`crate::path_trust`]).
    #[error(transparent)]
    Path(#[from] crate::path_trust::WalkError),
    /// The file was replaced between the check of its path and its opening.
    #[error("{path} changed while it was being read; it is read again at the next use")]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

/// The credential prefixes of the shipped unit: `LoadCredential=credbroker:/etc/credbroker/credentials` and
/// `LoadCredentialEncrypted=credbroker-encrypted:/etc/credbroker/credentials-encrypted` load every file `F`
/// of those directories as `credbroker_F` and `credbroker-encrypted_F`.
pub const CREDENTIAL_PREFIXES: [&str; 2] = ["credbroker_", "credbroker-encrypted_"];

/// Where credential `name` is: `name` itself (a unit's own `LoadCredential=name:…`), else the file `name` of
/// the shipped unit's credential directories, plain or encrypted. The first that exists; `name` if none does,
/// so the error names the plain path.
fn credential_path(dir: &Path, name: &str) -> PathBuf {
    std::iter::once(dir.join(name))
        .chain(
            CREDENTIAL_PREFIXES
                .iter()
                .map(|p| dir.join(format!("{p}{name}"))),
        )
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join(name))
}

/// A loaded secret and where it came from.
pub struct Secret {
    value: SecretString,
    source: SecretSource,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, [redacted])", self.source)
    }
}

impl Secret {
    /// Reads a secret from its source.
    ///
    /// # Errors
    /// [`SecretError`] when the source is missing, unreadable, world-readable, empty, too large or not UTF-8.
    pub fn load(source: SecretSource, env: &SecretEnv<'_>) -> Result<Self, SecretError> {
        Self::load_kind(source, FileKind::Secret, env).map(|(s, _)| s)
    }

    /// Reads a credential of `kind` from its source; for a file, also the stamp it was read at.
    ///
    /// # Errors
    /// [`SecretError`], as for [`load`](Self::load) under the rules of `kind`.
    pub fn load_kind(
        source: SecretSource,
        kind: FileKind,
        env: &SecretEnv<'_>,
    ) -> Result<(Self, Option<Stamp>), SecretError> {
        let mut stamp = None;
        let raw: Zeroizing<String> = match (&source, env.offline) {
            (_, Some(read)) => Zeroizing::new(read(&source).ok_or_else(|| SecretError::Read {
                path: PathBuf::from(source.to_string()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?),
            (source, None) => match source {
                SecretSource::File(path) => {
                    let (raw, s) = read_file(path, kind)?;
                    stamp = Some(s);
                    raw
                }
                SecretSource::Credential(name) => {
                    let dir = env
                        .credentials_dir
                        .as_ref()
                        .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
                    read_file(&credential_path(dir, name), FileKind::Secret)?.0
                }
                SecretSource::Env(var) => Zeroizing::new(
                    (env.var)(var).ok_or_else(|| SecretError::EnvUnset(var.clone()))?,
                ),
            },
        };
        let trimmed = raw.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(SecretError::Empty(source));
        }
        Ok((
            Self {
                value: SecretString::from(trimmed.to_owned()),
                source,
            },
            stamp,
        ))
    }

    /// Wraps a value that is already in memory (tests, and the stand-in's quick start).
    pub fn from_value(value: SecretString, source: SecretSource) -> Self {
        Self { value, source }
    }

    /// The secret. Call only where it is about to be sent.
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }

    /// Where it came from.
    pub fn source(&self) -> &SecretSource {
        &self.source
    }
}

/// What identifies one version of a file: device, inode, size, modification and change times. A file
/// replaced by a rename (a new inode), rewritten in place (new times or size) or a link switched to another
/// file (Kubernetes' `..data`) all change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of the file at `path` now: through links for [`FileKind::Assertion`], of the path itself
    /// otherwise (a link then reads as changed, and reading it fails as it should).
    fn now(path: &Path, kind: FileKind) -> std::io::Result<Self> {
        match kind {
            FileKind::Secret | FileKind::Certificate => std::fs::symlink_metadata(path),
            FileKind::Assertion => std::fs::metadata(path),
        }
        .map(|m| Self::of(&m))
    }
}

fn read_file(path: &Path, kind: FileKind) -> Result<(Zeroizing<String>, Stamp), SecretError> {
    // Secrets, keys and certificates are the file the config names, never a link to another.
    if kind != FileKind::Assertion
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(SecretError::Symlink {
            path: path.to_owned(),
        });
    }
    // Who controls the path must be able to read what it leads to (assertion files may be links, such as
    // Kubernetes' `..data`): never a confused deputy.
    let walked = crate::path_trust::walk(path).map_err(|e| match e {
        crate::path_trust::WalkError::Io { path, source } => SecretError::Read { path, source },
        other => SecretError::Path(other),
    })?;
    let path = walked.resolved.as_path();
    let read_err = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    // No following a link to a file the config does not name, and no blocking on a FIFO: the file's kind
    // is checked on the descriptor before anything is read.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SecretError::Symlink {
                path: path.to_owned(),
            },
            _ => read_err(e),
        })?;
    let meta = file.metadata().map_err(read_err)?;
    if (meta.dev(), meta.ino()) != (walked.dev, walked.ino) {
        return Err(SecretError::Changed {
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if kind == FileKind::Assertion && mode & 0o002 != 0 {
        return Err(SecretError::OtherWritable {
            path: path.to_owned(),
            mode,
        });
    }
    if kind != FileKind::Assertion && meta.uid() != 0 && meta.uid() != crate::sys::euid() {
        return Err(SecretError::Owner {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    if kind != FileKind::Assertion && mode & 0o022 != 0 {
        return Err(SecretError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if kind != FileKind::Certificate && mode & 0o004 != 0 {
        return Err(SecretError::WorldReadable {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.size() > MAX_SECRET_LEN {
        return Err(SecretError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.size() as usize + 1));
    (&mut file)
        .take(MAX_SECRET_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_SECRET_LEN {
        return Err(SecretError::TooLarge {
            path: path.to_owned(),
        });
    }
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok((Zeroizing::new(s.to_owned()), Stamp::of(&meta))),
        Err(_) => Err(SecretError::NotUtf8(SecretSource::File(path.to_owned()))),
    }
}

/// A credential read again when its file changes: before each use, the file is stat'ed (device, inode, size,
/// times: [`Stamp`]); when it changed, it is read and parsed again, and the change is logged with the source's
/// name, never its content. `credential` and `env` sources cannot change while the daemon runs.
pub struct Rotating<T> {
    source: SecretSource,
    kind: FileKind,
    parse: fn(Secret) -> Result<T, String>,
    current: Mutex<(Option<Stamp>, Arc<T>)>,
}

impl<T> fmt::Debug for Rotating<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rotating({}, [redacted])", self.source)
    }
}

impl<T> Rotating<T> {
    /// Reads `source` under the rules of `kind` and parses it with `parse`.
    ///
    /// # Errors
    /// Why it cannot be read or parsed (naming the source, never the content).
    pub fn load(
        source: SecretSource,
        kind: FileKind,
        env: &SecretEnv<'_>,
        parse: fn(Secret) -> Result<T, String>,
    ) -> Result<Self, String> {
        let (secret, stamp) =
            Secret::load_kind(source.clone(), kind, env).map_err(|e| e.to_string())?;
        let value = parse(secret)?;
        Ok(Self {
            source,
            kind,
            parse,
            current: Mutex::new((stamp, Arc::new(value))),
        })
    }

    /// Where it comes from.
    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    /// The value as of now: read again if its file changed since it was last read.
    ///
    /// # Errors
    /// Why the changed file cannot be read or parsed; the next call tries again.
    pub fn current(&self) -> Result<Arc<T>, String> {
        let path = {
            let current = self.lock();
            match (&current.0, &self.source) {
                (Some(_), SecretSource::File(path)) => path,
                // Not a file, or one read through `SecretEnv::offline`: nothing to watch.
                _ => return Ok(current.1.clone()),
            }
        };
        let now = Stamp::now(path, self.kind)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut current = self.lock();
        if current.0 == Some(now) {
            return Ok(current.1.clone());
        }
        let (secret, stamp) = Secret::load_kind(self.source.clone(), self.kind, &SecretEnv::none())
            .map_err(|e| e.to_string())?;
        let value = Arc::new((self.parse)(secret)?);
        tracing::info!(source = %self.source, "credential file changed; read again");
        *current = (stamp, value.clone());
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Stamp>, Arc<T>)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> SecretEnv<'static> {
        SecretEnv {
            credentials_dir: None,
            var: &|_| None,
            offline: None,
        }
    }

    fn write(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn file_secret_is_read_and_trimmed_and_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "s", "hunter2-very-secret\n", 0o600);
        let s = Secret::load(SecretSource::File(p), &no_env()).unwrap();
        assert_eq!(s.expose(), "hunter2-very-secret");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn world_readable_and_empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "s", "x", 0o644);
        let err = Secret::load(SecretSource::File(p), &no_env()).unwrap_err();
        assert!(
            matches!(err, SecretError::WorldReadable { mode: 0o644, .. }),
            "{err}"
        );
        let p = write(dir.path(), "e", "\n", 0o600);
        let err = Secret::load(SecretSource::File(p), &no_env()).unwrap_err();
        assert!(matches!(err, SecretError::Empty(_)), "{err}");
    }

    #[test]
    fn writable_linked_foreign_and_fifo_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Writable by other users: mode 0602 hides no secret from the world's write bit.
        let p = write(dir.path(), "w", "x", 0o602);
        let err = Secret::load(SecretSource::File(p), &no_env()).unwrap_err();
        assert!(
            matches!(err, SecretError::Writable { mode: 0o602, .. }),
            "{err}"
        );
        let p = write(dir.path(), "g", "x", 0o620);
        let err = Secret::load(SecretSource::File(p), &no_env()).unwrap_err();
        assert!(matches!(err, SecretError::Writable { .. }), "{err}");
        // A link, even to a good file.
        let good = write(dir.path(), "good", "x", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let err = Secret::load(SecretSource::File(link), &no_env()).unwrap_err();
        assert!(matches!(err, SecretError::Symlink { .. }), "{err}");
        // A FIFO is refused at once instead of blocking the start or a reload.
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Secret::load(SecretSource::File(fifo), &no_env()).unwrap_err();
        assert!(matches!(err, SecretError::NotAFile { .. }), "{err}");
        // Owned by another user (when the tests run as root, as they do in CI).
        if crate::sys::euid() == 0 {
            let p = write(dir.path(), "o", "x", 0o600);
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let err = Secret::load(SecretSource::File(p), &no_env()).unwrap_err();
            assert!(
                matches!(err, SecretError::Owner { uid: 65534, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn a_credential_is_found_under_the_shipped_units_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let env = SecretEnv {
            credentials_dir: Some(dir.path().to_owned()),
            var: &|_| None,
            offline: None,
        };
        write(dir.path(), "credbroker_plain", "p", 0o400);
        write(dir.path(), "credbroker-encrypted_sealed", "e", 0o400);
        write(dir.path(), "own", "o", 0o400);
        write(dir.path(), "credbroker_own", "shadowed", 0o400);
        let get = |name: &str| {
            Secret::load(SecretSource::Credential(name.into()), &env).map(|s| s.expose().to_owned())
        };
        assert_eq!(get("plain").unwrap(), "p");
        assert_eq!(get("sealed").unwrap(), "e");
        assert_eq!(
            get("own").unwrap(),
            "o",
            "a unit's own credential name comes first"
        );
        assert!(matches!(get("missing"), Err(SecretError::Read { .. })));
    }

    #[test]
    fn credential_needs_the_directory_and_env_needs_the_variable() {
        let err = Secret::load(SecretSource::Credential("idp".into()), &no_env()).unwrap_err();
        assert!(matches!(err, SecretError::NoCredentialsDirectory(_)));
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "idp", "cred-secret", 0o400);
        let env = SecretEnv {
            credentials_dir: Some(dir.path().to_owned()),
            var: &|v| (v == "IDP_SECRET").then(|| "env-secret".to_owned()),
            offline: None,
        };
        let s = Secret::load(SecretSource::Credential("idp".into()), &env).unwrap();
        assert_eq!(s.expose(), "cred-secret");
        let s = Secret::load(SecretSource::Env("IDP_SECRET".into()), &env).unwrap();
        assert_eq!(s.expose(), "env-secret");
        let err = Secret::load(SecretSource::Env("NOPE".into()), &env).unwrap_err();
        assert!(matches!(err, SecretError::EnvUnset(_)));
    }
}
