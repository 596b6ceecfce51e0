//! `credbroker sink`: keeps files holding a token fresh, for programs that read a token from a file
//! (Prometheus' `credentials_file`, the OpenTelemetry Collector's `bearertokenauth`, Vault Agent's JWT auth,
//! `AWS_WEB_IDENTITY_TOKEN_FILE`, `curl -H @file`).
//!
//! It runs as the consuming user, so the daemon identifies it as any other caller and its policies apply.
//! Each file is replaced atomically (a temporary file in the same directory, written, synced, renamed over
//! it): a reader sees the old token or the new one, never an empty or partial file. A token is renewed at a
//! jittered point between 65% and 75% of the time it had left when it came (the daemon renews at the same
//! fractions of its lifetime, so the next ask usually finds a new token cached). While the daemon or the IdP
//! is down, the file keeps its token while it is valid and the sink tries again after a full-jitter backoff
//! that grows with the outage and shrinks with the time left; a token that expires with no successor is removed, never left in place
//! expired.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Client, Error, Token, TokenRequest};

use crate::{Format, render};

/// One file to keep fresh.
#[derive(Clone, Debug)]
pub(crate) struct Sink {
    /// The file.
    pub(crate) path: PathBuf,
    /// What it holds.
    pub(crate) format: Format,
    /// Its permission bits.
    pub(crate) mode: u32,
    /// The request for its token.
    pub(crate) request: TokenRequest,
    /// Run with `sh -c` after each replacement.
    pub(crate) on_change: Option<String>,
}

/// Why a sink stopped (or could not start).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    /// The daemon's answer.
    #[error("{path}: {source}")]
    Daemon {
        /// The sink's file.
        path: PathBuf,
        /// The error.
        #[source]
        source: Error,
    },
    /// The file or its directory.
    #[error("{0}")]
    File(String),
}

/// Largest pause between tries while failing, and the first one.
const CAP: Duration = Duration::from_secs(300);
const BASE: Duration = Duration::from_secs(1);

/// A number in `[0, 1)`, from the standard library's randomly seeded hasher.
fn random() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Checks that the file's directory is the caller's own: owned by it (or root) and writable by nobody else,
/// not even as a sticky directory such as `/tmp`, where another user could have put a file of theirs under
/// the name, for the consumer to read.
pub(crate) fn check_directory(path: &Path) -> Result<(), SinkError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        SinkError::File(format!("{}: cannot use its directory: {e}", path.display()))
    })?;
    let me = euid();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SinkError::File(format!(
            "{}: the directory belongs to uid {}, not to this user ({me}) or root: its owner could replace \
             the token file",
            dir.display(),
            meta.uid()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(SinkError::File(format!(
            "{}: the directory is writable by {} (mode {mode:04o}){}: use a directory only its owner can \
             write, such as one of this user's own",
            dir.display(),
            if mode & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            },
            if mode & 0o1000 != 0 {
                ", sticky or not: another user could have put a file of theirs under the name"
            } else {
                ", who could replace the token file"
            }
        )));
    }
    Ok(())
}

/// This process's effective uid, from `/proc/self/status` (the CLI holds no `unsafe` code).
fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(u32::MAX)
}

/// Replaces `path` with `content` atomically: a new file in the same directory (created, never opened
/// through a link), its mode set, written and synced, renamed over `path`, and the directory synced.
pub(crate) fn replace(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let tmp = dir.join(format!(
        ".{}.credbroker-{}-{:x}",
        name.to_string_lossy(),
        std::process::id(),
        (random() * f64::from(u32::MAX)) as u32
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc_o_nofollow())
            .open(&tmp)?;
        // The umask may have taken bits away: the mode asked for is the mode the file gets.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `O_NOFOLLOW` (Linux), without a libc dependency in the CLI.
const fn libc_o_nofollow() -> i32 {
    0o400000
}

/// What a sink's file holds: the token as `format` says, and a newline.
fn content(token: &Token, format: Format) -> Vec<u8> {
    let mut text = render(token, format);
    text.push('\n');
    text.into_bytes()
}

/// Keeps one sink's file fresh. With `once`, writes it once and returns. Otherwise runs until the process
/// is stopped; it returns an error only when the first token cannot be had for a reason that retrying will
/// not fix (denied, operator action needed, bad request), so that a misconfigured sink fails at start.
pub(crate) async fn run(socket: PathBuf, sink: Sink, once: bool) -> Result<(), SinkError> {
    check_directory(&sink.path)?;
    let daemon_err = |source| SinkError::Daemon {
        path: sink.path.clone(),
        source,
    };
    // The token in the file, and when it expires.
    let mut current: Option<(String, SystemTime)> = None;
    // Since when the daemon (or the IdP behind it) has failed the sink, without a success since.
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        let result = async {
            let mut client = Client::connect(&socket).await?;
            client.get_token(sink.request.clone()).await
        }
        .await;
        let now = SystemTime::now();
        let pause = match result {
            Ok(token) if token.expires_at() > now => {
                down_since = None;
                let secret = token.access_token().expose_secret().to_owned();
                if current.as_ref().is_none_or(|(t, _)| *t != secret) {
                    replace(&sink.path, &content(&token, sink.format), sink.mode).map_err(|e| {
                        SinkError::File(format!("{}: cannot write: {e}", sink.path.display()))
                    })?;
                    eprintln!(
                        "credbroker sink: {}: a new token, valid until {}",
                        sink.path.display(),
                        humantime::format_rfc3339_seconds(token.expires_at())
                    );
                    current = Some((secret, token.expires_at()));
                    if let Some(command) = &sink.on_change {
                        on_change(command, &sink.path).await;
                    }
                }
                if once {
                    return Ok(());
                }
                let left = token.expires_at().duration_since(now).unwrap_or_default();
                left.mul_f64(0.65 + 0.1 * random())
                    .max(Duration::from_millis(100))
            }
            outcome => {
                let e = match outcome {
                    Err(e) => e,
                    Ok(_) => {
                        Error::Unavailable("the daemon handed out an expired token".to_owned())
                    }
                };
                if once || (current.is_none() && down_since.is_none() && !e.is_retryable()) {
                    return Err(daemon_err(e));
                }
                // The pause grows with the outage, not with the number of tries: at most as long as the
                // failures have lasted (at least BASE), a quarter of the file's token's time left, and CAP.
                // (Counting tries would let the short pauses of a token about to expire add up to minutes
                // of waiting once it has.)
                let down = down_since
                    .get_or_insert_with(std::time::Instant::now)
                    .elapsed();
                let left = current
                    .as_ref()
                    .map_or(CAP, |(_, exp)| exp.duration_since(now).unwrap_or_default());
                let pause = BASE
                    .max(down)
                    .min(left / 4)
                    .min(CAP)
                    .mul_f64(random())
                    .max(Duration::from_millis(200));
                eprintln!(
                    "credbroker sink: {}: {e}; trying again in {} (the file keeps its token while it is valid)",
                    sink.path.display(),
                    humantime::format_duration(Duration::from_millis(pause.as_millis() as u64))
                );
                pause
            }
        };
        // Sleep until the next try, or until the file's token expires, whichever comes first.
        let expires_in = current
            .as_ref()
            .and_then(|(_, exp)| exp.duration_since(SystemTime::now()).ok());
        match expires_in {
            Some(left) if left <= pause => {
                tokio::time::sleep(left).await;
                expired(&sink.path, &mut current);
            }
            None if current.is_some() => expired(&sink.path, &mut current),
            _ => tokio::time::sleep(pause).await,
        }
    }
}

/// The file's token has expired with no successor: it goes, rather than stay in place expired.
fn expired(path: &Path, current: &mut Option<(String, SystemTime)>) {
    if current.take().is_some() {
        match std::fs::remove_file(path) {
            Ok(()) => eprintln!(
                "credbroker sink: {}: its token expired and no new one could be had: removed",
                path.display()
            ),
            Err(e) => eprintln!(
                "credbroker sink: {}: its token expired; cannot remove it: {e}",
                path.display()
            ),
        }
    }
}

/// Runs `command` with `sh -c` after the file changed, with `CREDBROKER_SINK_PATH` naming it.
async fn on_change(command: &str, path: &Path) {
    let status = tokio::process::Command::new("/bin/sh")
        .args(["-c", command])
        .env("CREDBROKER_SINK_PATH", path)
        .stdin(std::process::Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "credbroker sink: {}: --on-change: {command:?} {s}",
            path.display()
        ),
        Err(e) => eprintln!(
            "credbroker sink: {}: --on-change: cannot run sh: {e}",
            path.display()
        ),
    }
}

/// The TOML file of `credbroker sink --config`: several sinks in one process.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    sink: Vec<Entry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    path: PathBuf,
    scopes: Vec<String>,
    client: Option<String>,
    #[serde(default)]
    format: Option<String>,
    mode: Option<String>,
    min_ttl: Option<String>,
    on_change: Option<String>,
}

/// Parses a sink file (every problem at once, by its `sink[N].key`).
pub(crate) fn parse_file(text: &str) -> Result<Vec<Sink>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.sink.is_empty() {
        return Err("no [[sink]] in the file".to_owned());
    }
    let mut errors = Vec::new();
    let mut sinks = Vec::new();
    for (i, e) in file.sink.into_iter().enumerate() {
        let key = |k: &str| format!("sink[{i}].{k}");
        let format = match e.format.as_deref().unwrap_or("raw") {
            "raw" => Some(Format::Raw),
            "header" => Some(Format::Header),
            "json" => Some(Format::Json),
            other => {
                errors.push(format!(
                    "{}: {other:?} is not raw, header or json",
                    key("format")
                ));
                None
            }
        };
        let mode = match parse_mode(e.mode.as_deref().unwrap_or("0600")) {
            Ok(m) => Some(m),
            Err(err) => {
                errors.push(format!("{}: {err}", key("mode")));
                None
            }
        };
        let min_ttl = match e.min_ttl.as_deref().map(crate::parse_duration).transpose() {
            Ok(d) => d,
            Err(err) => {
                errors.push(format!("{}: {err}", key("min_ttl")));
                None
            }
        };
        if e.scopes.is_empty() {
            errors.push(format!("{}: name at least one scope", key("scopes")));
        }
        if !e.path.is_absolute() {
            errors.push(format!("{}: must be an absolute path", key("path")));
        }
        if let (Some(format), Some(mode)) = (format, mode) {
            sinks.push(Sink {
                path: e.path,
                format,
                mode,
                request: crate::request(&e.scopes, e.client, min_ttl),
                on_change: e.on_change,
            });
        }
    }
    if errors.is_empty() {
        Ok(sinks)
    } else {
        Err(errors.join("\n"))
    }
}

/// A file mode written in octal: "0600", "600", "0o640". Only permission bits (no setuid, setgid or
/// sticky bit, and nothing over 0777).
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = (!digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
    .then(|| u32::from_str_radix(digits, 8).ok())
    .flatten()
    .ok_or_else(|| format!("{s:?} is not an octal file mode such as 0600"))?;
    if mode > 0o777 {
        return Err(format!(
            "{s:?}: only permission bits (at most 0777), no setuid, setgid or sticky bit"
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert_eq!(parse_mode("0o644"), Ok(0o644));
        for bad in [
            "",
            "600x",
            "0800",
            "4755",
            "1777",
            "07777",
            "rw-------",
            "0x180",
            "99999",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sink_file_lists_every_problem_with_its_key() {
        let err = parse_file(
            "[[sink]]\npath = \"rel\"\nscopes = []\nformat = \"xml\"\nmode = \"0999\"\nmin_ttl = \"soon\"\n",
        )
        .unwrap_err();
        for key in [
            "sink[0].format",
            "sink[0].mode",
            "sink[0].min_ttl",
            "sink[0].scopes",
            "sink[0].path",
        ] {
            assert!(err.contains(key), "{key} missing: {err}");
        }
        assert!(parse_file("[[sink]]\npath = \"/x\"\nscopes = [\"a\"]\nbogus = 1\n").is_err());
        let sinks = parse_file(
            "[[sink]]\npath = \"/run/x/token\"\nscopes = [\"a b\"]\nclient = \"idp\"\nmode = \"0640\"\n\
             on_change = \"true\"\n",
        )
        .unwrap();
        assert_eq!(sinks[0].mode, 0o640);
        assert_eq!(sinks[0].on_change.as_deref(), Some("true"));
    }

    #[test]
    fn a_replacement_is_atomic_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        replace(&path, b"one\n", 0o640).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        let inode = std::fs::metadata(&path).unwrap().ino();
        replace(&path, b"two\n", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        assert_ne!(
            std::fs::metadata(&path).unwrap().ino(),
            inode,
            "renamed over, not rewritten"
        );
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
