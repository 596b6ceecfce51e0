//! How `credbroker status` and `credbroker explain` print the admin API's answers: text for people, JSON for
//! scripts. Neither answer holds a token or a secret.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use credbroker_client::admin;
use serde_json::{Value, json};

/// `text` for a terminal: control characters (newlines, escape sequences), and characters that reorder or
/// hide text, shown escaped, as the daemon's audit log shows them. What the daemon reports of a process (its
/// executable's path, its unit) is chosen by whoever runs it, and must not be able to write lines or colours
/// into an admin's terminal.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Each of `items`, [`shown`], joined by `sep`.
fn shown_all(items: &[String], sep: &str) -> String {
    items.iter().map(|i| shown(i)).collect::<Vec<_>>().join(sep)
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

fn rfc3339(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        Value::String(humantime::format_rfc3339_seconds(t).to_string())
    })
}

/// "in 40m" or "12s ago", to the second, largest two units.
fn relative(t: SystemTime, now: SystemTime) -> String {
    let short = |d: Duration| {
        let d = Duration::from_secs(d.as_secs());
        let text = humantime::format_duration(d).to_string();
        text.split(' ').take(2).collect::<Vec<_>>().join(" ")
    };
    match t.duration_since(now) {
        Ok(ahead) if ahead.as_secs() == 0 => "now".to_owned(),
        Ok(ahead) => format!("in {}", short(ahead)),
        Err(e) if e.duration().as_secs() == 0 => "now".to_owned(),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

fn when(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    match time(t) {
        Some(t) => format!(
            "{} ({})",
            humantime::format_rfc3339_seconds(t),
            relative(t, now)
        ),
        None => "never".to_owned(),
    }
}

fn short_when(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    time(t).map_or_else(|| "-".to_owned(), |t| relative(t, now))
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// `credbroker status` for people.
pub(crate) fn status_text(s: &admin::StatusResponse) -> String {
    let now = SystemTime::now();
    let mut out = String::new();
    let d = s.daemon.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "credbrokerd {}, pid {}, up {} (since {})",
        d.version,
        d.pid,
        humantime::format_duration(Duration::from_secs(d.uptime_seconds)),
        rfc3339(time(d.started_at.as_ref())).as_str().unwrap_or("?"),
    );
    if d.config_path.is_empty() {
        let _ = writeln!(out, "config:  (not from a file)");
    } else {
        let _ = writeln!(
            out,
            "config:  {} (sha256 {}), loaded {}",
            d.config_path,
            d.config_sha256,
            when(d.config_loaded_at.as_ref(), now)
        );
    }
    let _ = writeln!(
        out,
        "         {} client{}, {} polic{}",
        d.clients,
        if d.clients == 1 { "" } else { "s" },
        d.policies,
        if d.policies == 1 { "y" } else { "ies" }
    );
    let c = s.connections.unwrap_or_default();
    let _ = writeln!(
        out,
        "connections: {} open (at most {}, {} per uid; callers no policy matches: {} of {})",
        c.open, c.max, c.per_uid, c.unmatched_open, c.unmatched_max
    );
    let _ = writeln!(
        out,
        "cache:   {} entries, {}; {} fetches in flight",
        s.cache_entries,
        bytes(s.cache_bytes),
        s.fetches_in_flight
    );
    let _ = writeln!(out, "\nclients:");
    for c in &s.clients {
        let endpoint = match (c.endpoint.as_str(), c.discovered) {
            ("", _) => format!("issuer {} (not discovered yet)", c.issuer),
            (e, true) => format!("{e} (discovered from {})", c.issuer),
            (e, false) => e.to_owned(),
        };
        let _ = writeln!(out, "  {}: {endpoint}", c.name);
        let _ = writeln!(
            out,
            "    auth {}, client_id {}; {} requests to the IdP, {} failed",
            c.auth_method, c.client_id, c.requests, c.failures
        );
        let _ = writeln!(
            out,
            "    last success: {}",
            when(c.last_success.as_ref(), now)
        );
        if c.last_failure.is_some() {
            let _ = writeln!(
                out,
                "    last failure: {}: {} ({})",
                when(c.last_failure.as_ref(), now),
                c.last_failure_code,
                c.last_failure_message
            );
        }
    }
    if !s.callers.is_empty() {
        let _ = writeln!(out, "\ncallers:");
        for u in &s.callers {
            let name = if u.user.is_empty() {
                String::new()
            } else {
                format!(" ({})", u.user)
            };
            let _ = writeln!(
                out,
                "  uid {}{name}: {} connections, {} calls in flight; new tokens: {:.1} of {} left \
                 ({}/min), {} refused",
                u.uid,
                u.connections,
                u.calls_in_flight,
                u.tokens,
                u.burst,
                u.per_minute,
                u.rejected
            );
        }
    }
    let _ = writeln!(out, "\ncached tokens:");
    if s.entries.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for e in &s.entries {
        let state = if e.fingerprint.is_empty() {
            if e.fetching {
                "fetching".to_owned()
            } else if !e.refused.is_empty() {
                format!("refused: {}", e.refused)
            } else {
                "no token".to_owned()
            }
        } else {
            format!(
                "token {}, expires {}, renews {}{}",
                e.fingerprint,
                short_when(e.expires_at.as_ref(), now),
                short_when(e.renews_at.as_ref(), now),
                if e.fetching { ", fetching" } else { "" }
            )
        };
        let _ = writeln!(out, "  {} [{}]", e.client, e.scopes.join(" "));
        let _ = writeln!(
            out,
            "    {state}; {} hits, last used {}",
            e.hits,
            short_when(e.last_used.as_ref(), now)
        );
        if !e.granted.is_empty() {
            let _ = writeln!(out, "    granted: {}", e.granted.join(" "));
        }
    }
    out.pop();
    out
}

/// `credbroker status --format json`.
pub(crate) fn status_json(s: &admin::StatusResponse) -> Value {
    let d = s.daemon.clone().unwrap_or_default();
    let c = s.connections.unwrap_or_default();
    json!({
        "daemon": {
            "version": d.version,
            "pid": d.pid,
            "started_at": rfc3339(time(d.started_at.as_ref())),
            "uptime_seconds": d.uptime_seconds,
            "config": {
                "path": d.config_path,
                "loaded_at": rfc3339(time(d.config_loaded_at.as_ref())),
                "sha256": d.config_sha256,
                "clients": d.clients,
                "policies": d.policies,
            },
        },
        "connections": {
            "open": c.open, "max": c.max, "per_uid": c.per_uid,
            "unmatched_open": c.unmatched_open, "unmatched_max": c.unmatched_max,
        },
        "fetches_in_flight": s.fetches_in_flight,
        "cache": { "entries": s.cache_entries, "bytes": s.cache_bytes },
        "clients": s.clients.iter().map(|c| json!({
            "name": c.name,
            "endpoint": c.endpoint,
            "discovered": c.discovered,
            "issuer": c.issuer,
            "auth_method": c.auth_method,
            "client_id": c.client_id,
            "requests": c.requests,
            "failures": c.failures,
            "last_success": rfc3339(time(c.last_success.as_ref())),
            "last_failure": c.last_failure.as_ref().map(|t| json!({
                "at": rfc3339(time(Some(t))),
                "code": c.last_failure_code,
                "message": c.last_failure_message,
            })),
        })).collect::<Vec<_>>(),
        "callers": s.callers.iter().map(|u| json!({
            "uid": u.uid,
            "user": u.user,
            "connections": u.connections,
            "calls_in_flight": u.calls_in_flight,
            "rate_limit": {
                "tokens": u.tokens, "burst": u.burst, "per_minute": u.per_minute, "refused": u.rejected,
            },
        })).collect::<Vec<_>>(),
        "entries": s.entries.iter().map(|e| json!({
            "client": e.client,
            "scopes": e.scopes,
            "granted": if e.granted.is_empty() { &e.scopes } else { &e.granted },
            "fingerprint": (!e.fingerprint.is_empty()).then_some(&e.fingerprint),
            "expires_at": rfc3339(time(e.expires_at.as_ref())),
            "renews_at": rfc3339(time(e.renews_at.as_ref())),
            "hits": e.hits,
            "last_used": rfc3339(time(e.last_used.as_ref())),
            "fetching": e.fetching,
            "refused": (!e.refused.is_empty()).then_some(&e.refused),
        })).collect::<Vec<_>>(),
    })
}

/// `credbroker explain`, for people. Every text that comes from the process or the request is [`shown`].
pub(crate) fn explain_text(e: &admin::ExplainResponse) -> String {
    let mut out = String::new();
    let c = e.caller.clone().unwrap_or_default();
    let _ = write!(out, "caller:  uid {}", c.uid);
    if !c.user.is_empty() {
        let _ = write!(out, " ({})", shown(&c.user));
    }
    let _ = write!(out, ", groups {}", shown_all(&c.groups, ", "));
    if c.pid != 0 {
        let _ = write!(out, ", pid {}", c.pid);
    }
    let _ = write!(
        out,
        "\n         exe {}, unit {}\n",
        if c.exe.is_empty() {
            "-".into()
        } else {
            shown(&c.exe)
        },
        if c.unit.is_empty() {
            "-".into()
        } else {
            shown(&c.unit)
        }
    );
    for note in &e.notes {
        let _ = writeln!(out, "note:    {}", shown(note));
    }
    if e.matching.is_empty() {
        let _ = writeln!(out, "matching policies: none");
    } else {
        let _ = writeln!(out, "matching policies:");
        for p in &e.matching {
            let _ = writeln!(
                out,
                "  {}: {} [{}]",
                shown(&p.policy),
                shown_all(&p.clients, ", "),
                shown_all(&p.scopes, " ")
            );
        }
    }
    if e.decided {
        if e.allowed {
            let _ = writeln!(
                out,
                "decision: allowed (client {}, by {})",
                shown(&e.client),
                shown_all(&e.allowed_by, ", ")
            );
        } else {
            let _ = writeln!(out, "decision: denied: {}", shown(&e.reason));
            if !e.refused_scope.is_empty() {
                let _ = writeln!(out, "first refused scope: {}", shown(&e.refused_scope));
            }
        }
    }
    if !e.near_misses.is_empty() {
        let _ = writeln!(out, "came close:");
        for m in &e.near_misses {
            let _ = writeln!(
                out,
                "  {}: {} {}",
                shown(&m.policy),
                shown(&m.key),
                shown(&m.detail)
            );
        }
    }
    out.pop();
    out
}

/// `credbroker explain --format json`.
pub(crate) fn explain_json(e: &admin::ExplainResponse) -> Value {
    let c = e.caller.clone().unwrap_or_default();
    json!({
        "caller": {
            "uid": c.uid, "user": c.user, "gid": c.gid, "groups": c.groups, "pid": c.pid,
            "exe": c.exe, "unit": c.unit,
        },
        "notes": e.notes,
        "matching": e.matching.iter().map(|p| json!({
            "policy": p.policy, "clients": p.clients, "scopes": p.scopes,
        })).collect::<Vec<_>>(),
        "decision": if e.decided {
            json!({
                "allowed": e.allowed,
                "client": e.client,
                "allowed_by": e.allowed_by,
                "refused_scope": (!e.refused_scope.is_empty()).then_some(&e.refused_scope),
                "reason": (!e.reason.is_empty()).then_some(&e.reason),
            })
        } else {
            Value::Null
        },
        "near_misses": e.near_misses.iter().map(|m| json!({
            "policy": m.policy, "key": m.key, "detail": m.detail,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_cannot_write_lines_or_colours_into_the_explanation() {
        let e = admin::ExplainResponse {
            caller: Some(admin::Caller {
                uid: 1000,
                exe: "/tmp/x\ndecision: allowed (client idp, by root-all)\u{1b}[2K\u{202e}"
                    .to_owned(),
                unit: "u\r.service".to_owned(),
                ..Default::default()
            }),
            decided: true,
            reason: "no policy\nFORGED".to_owned(),
            ..Default::default()
        };
        let text = explain_text(&e);
        assert_eq!(
            text.lines().filter(|l| l.starts_with("decision")).count(),
            1,
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert!(text.contains("/tmp/x\\ndecision: allowed"), "{text}");
    }
}
