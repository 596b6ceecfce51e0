//! Which caller may have which scopes of which client, and what a scope is ([`scope`]).
//!
//! Deny by default. A request is allowed when every requested scope is allowed by some policy that matches
//! the caller and names the client. A policy matches when every `match` key it gives matches (each key
//! takes one value or a list of alternatives); `match = { any = true }` matches every caller.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::identity::peer::{Caller, FileId};
pub mod scope;
pub mod target;

use scope::{ScopePattern, ScopeSet};
use target::Target;

/// One `[[policy]]` of the config.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Its name, shown in the audit log.
    pub name: String,
    /// Which callers it applies to.
    pub matcher: Matcher,
    /// The clients it lets those callers use.
    pub clients: Vec<String>,
    /// The scopes it allows on those clients.
    pub scopes: Vec<ScopePattern>,
    /// URL prefixes of the APIs its callers may get DPoP proofs for.
    pub dpop_targets: Vec<Target>,
}

/// The `match` table of a policy: all given keys must match; each key matches if any of its values does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matcher {
    /// `any = true`: every caller. Exclusive with the other keys.
    pub any: bool,
    /// Uids.
    pub uid: Option<Vec<u32>>,
    /// User names.
    pub user: Option<Vec<String>>,
    /// Gids, primary or supplementary.
    pub gid: Option<Vec<u32>>,
    /// Group names, primary or supplementary.
    pub group: Option<Vec<String>>,
    /// Absolute executable paths, matched by file identity (device and inode), never as strings.
    pub exe: Option<Vec<PathBuf>>,
    /// Systemd units.
    pub unit: Option<Vec<String>>,
}

impl Matcher {
    /// Whether it names users (uid, user, gid or group); one that names only programs (exe, unit) must say
    /// `any_user = true` in the config.
    pub fn names_users(&self) -> bool {
        self.uid.is_some() || self.user.is_some() || self.gid.is_some() || self.group.is_some()
    }

    /// Whether the caller matches.
    pub fn matches(&self, caller: &Caller) -> bool {
        if self.any {
            return true;
        }
        fn key<T>(want: &Option<Vec<T>>, has: impl Fn(&T) -> bool) -> bool {
            want.as_ref().is_none_or(|alts| alts.iter().any(has))
        }
        key(&self.uid, |u| *u == caller.uid)
            && key(&self.user, |u| caller.user.as_deref() == Some(u.as_str()))
            && key(&self.gid, |g| caller.gids.contains(g))
            && key(&self.group, |g| caller.groups.contains(g))
            && key(&self.exe, |e| exe_matches(e, caller))
            && key(&self.unit, |u| caller.unit.as_deref() == Some(u.as_str()))
    }

    /// The first `match` key the caller fails, and how: for `credbroker explain`.
    pub fn mismatch(&self, caller: &Caller) -> Option<(&'static str, String)> {
        if self.any {
            return None;
        }
        fn check<T: fmt::Debug>(
            key: &'static str,
            want: &Option<Vec<T>>,
            has: impl Fn(&T) -> bool,
            caller_has: impl FnOnce() -> String,
        ) -> Option<(&'static str, String)> {
            let alts = want.as_ref()?;
            (!alts.iter().any(has)).then(|| {
                let want = match alts.as_slice() {
                    [one] => format!("{one:?}"),
                    many => format!("one of {many:?}"),
                };
                (
                    key,
                    format!("wants {want}; the caller has {}", caller_has()),
                )
            })
        }
        let or_none = |v: Option<String>| v.map_or_else(|| "none".to_owned(), |v| format!("{v:?}"));
        check(
            "match.uid",
            &self.uid,
            |u| *u == caller.uid,
            || caller.uid.to_string(),
        )
        .or_else(|| {
            check(
                "match.user",
                &self.user,
                |u| caller.user.as_deref() == Some(u.as_str()),
                || or_none(caller.user.clone()),
            )
        })
        .or_else(|| {
            check(
                "match.gid",
                &self.gid,
                |g| caller.gids.contains(g),
                || format!("{:?}", caller.gids),
            )
        })
        .or_else(|| {
            check(
                "match.group",
                &self.group,
                |g| caller.groups.contains(g),
                || format!("{:?}", caller.groups),
            )
        })
        .or_else(|| {
            check(
                "match.exe",
                &self.exe,
                |e| exe_matches(e, caller),
                || match (&caller.exe, caller.exe_id) {
                    (Some(exe), Some(_)) => {
                        format!("{:?}, another file", exe.display().to_string())
                    }
                    (Some(exe), None) => format!(
                        "{:?}, which cannot be identified",
                        exe.display().to_string()
                    ),
                    (None, _) => "no known executable".to_owned(),
                },
            )
        })
        .or_else(|| {
            check(
                "match.unit",
                &self.unit,
                |u| caller.unit.as_deref() == Some(u.as_str()),
                || or_none(caller.unit.clone()),
            )
        })
    }
}

/// Whether the caller's executable is the file at `path` now: the same device and inode. The path is
/// stat'ed on every check, so a binary upgraded in place (a new inode) keeps matching new processes; a
/// process still running the replaced file does not match. A path the daemon cannot see does not match.
fn exe_matches(path: &Path, caller: &Caller) -> bool {
    let Some(id) = caller.exe_id else {
        return false;
    };
    match FileId::of(path) {
        Ok(want) => want == id,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "policy exe cannot be stat'ed; no match");
            false
        }
    }
}

impl Policy {
    fn names(&self, client: &str) -> bool {
        self.clients.iter().any(|c| c == client)
    }

    fn allows(&self, scope: &str) -> bool {
        self.scopes.iter().any(|p| p.allows(scope))
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request named a client the config does not have.
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    /// The request named no client and the caller's policies name several.
    #[error("the caller's policies name several clients ({}); choose one with `client`", .0.join(", "))]
    AmbiguousClient(Vec<String>),
    /// No policy matches the caller at all.
    #[error("no policy matches {caller}")]
    NoPolicy {
        /// How the daemon saw the caller.
        caller: String,
    },
    /// Policies match the caller, but none names this client.
    #[error("no policy lets {caller} use client {client:?}")]
    ClientNotAllowed {
        /// The client.
        client: String,
        /// How the daemon saw the caller.
        caller: String,
    },
    /// A scope no matching policy allows on this client.
    #[error("scope {scope:?} of client {client:?} is not allowed for {caller}")]
    ScopeNotAllowed {
        /// The refused scope.
        scope: String,
        /// The client.
        client: String,
        /// How the daemon saw the caller.
        caller: String,
    },
    /// A DPoP proof for a URL outside the `dpop_targets` of the policies that allow the scopes.
    #[error(
        "no DPoP proof for {url}: it is not within the dpop_targets of policies {policies} (for {caller})"
    )]
    TargetNotAllowed {
        /// The URL, as parsed (query and fragment left out), clipped.
        url: String,
        /// The policies that allowed the scopes.
        policies: String,
        /// How the daemon saw the caller.
        caller: String,
    },
}

impl Refusal {
    /// Whether the refusal is about the caller's rights (`PERMISSION_DENIED`) rather than the request's shape
    /// (`INVALID_ARGUMENT`).
    pub fn is_denial(&self) -> bool {
        !matches!(self, Self::UnknownClient(_) | Self::AmbiguousClient(_))
    }
}

/// An allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The client to fetch from.
    pub client: String,
    /// The names of the policies that allowed at least one of the scopes.
    pub policies: Vec<String>,
    /// Whether one of those policies matched on the caller's executable: then the decision holds only while
    /// the process still runs that executable.
    pub by_exe: bool,
    /// The `dpop_targets` of each of those policies.
    pub dpop_targets: Vec<Vec<Target>>,
}

impl Allowed {
    /// Whether a DPoP proof for `url` may go with the token: every policy that allowed one of its scopes
    /// lists a target that covers the URL. (A token carrying scopes that two policies allow is presented only
    /// where both policies say their scopes may go.)
    pub fn proof_allowed(&self, url: &url::Url) -> bool {
        !self.dpop_targets.is_empty()
            && self
                .dpop_targets
                .iter()
                .all(|targets| targets.iter().any(|t| t.covers(url)))
    }
}

/// The policies of a config, in order.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Wraps validated policies.
    pub fn new(policies: Vec<Policy>) -> Self {
        Self { policies }
    }

    /// The policies.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Whether any policy matches `caller`.
    pub fn matches_any(&self, caller: &Caller) -> bool {
        self.policies.iter().any(|p| p.matcher.matches(caller))
    }

    /// The `exe` paths the daemon cannot stat (hidden by `ProtectHome=` or `PrivateTmp=`, missing, …), with
    /// why: policies naming them match nobody.
    pub fn unseen_exes(&self) -> Vec<(PathBuf, std::io::Error)> {
        let mut unseen: Vec<(PathBuf, std::io::Error)> = Vec::new();
        for path in self
            .policies
            .iter()
            .flat_map(|p| p.matcher.exe.iter().flatten())
        {
            if let Err(e) = FileId::of(path)
                && !unseen.iter().any(|(p, _)| p == path)
            {
                unseen.push((path.clone(), e));
            }
        }
        unseen
    }

    /// Whether any policy matches on the caller's executable.
    pub fn match_exe(&self) -> bool {
        self.policies.iter().any(|p| p.matcher.exe.is_some())
    }

    /// Decides a request. `client` is the requested client name, empty for "the only one my policies name";
    /// `is_client` says whether a name is configured.
    ///
    /// # Errors
    /// A [`Refusal`] saying what was refused and how the caller was seen.
    pub fn authorize(
        &self,
        caller: &Caller,
        client: &str,
        scopes: &ScopeSet,
        is_client: impl Fn(&str) -> bool,
    ) -> Result<Allowed, Refusal> {
        if !client.is_empty() && !is_client(client) {
            return Err(Refusal::UnknownClient(client.to_owned()));
        }
        let matching: Vec<&Policy> = self
            .policies
            .iter()
            .filter(|p| p.matcher.matches(caller))
            .collect();
        if matching.is_empty() {
            return Err(Refusal::NoPolicy {
                caller: caller.to_string(),
            });
        }
        let client = if client.is_empty() {
            let mut named: Vec<String> = matching
                .iter()
                .flat_map(|p| p.clients.iter().cloned())
                .collect();
            named.sort_unstable();
            named.dedup();
            match named.len() {
                1 => named.remove(0),
                _ => return Err(Refusal::AmbiguousClient(named)),
            }
        } else {
            client.to_owned()
        };
        let for_client: Vec<&Policy> = matching.into_iter().filter(|p| p.names(&client)).collect();
        if for_client.is_empty() {
            return Err(Refusal::ClientNotAllowed {
                client,
                caller: caller.to_string(),
            });
        }
        let mut policies = Vec::new();
        let mut dpop_targets = Vec::new();
        let mut by_exe = false;
        for scope in scopes.iter() {
            let Some(p) = for_client.iter().find(|p| p.allows(scope)) else {
                return Err(Refusal::ScopeNotAllowed {
                    scope: scope.to_owned(),
                    client,
                    caller: caller.to_string(),
                });
            };
            if !policies.contains(&p.name) {
                policies.push(p.name.clone());
                dpop_targets.push(p.dpop_targets.clone());
                by_exe |= p.matcher.exe.is_some();
            }
        }
        Ok(Allowed {
            client,
            policies,
            by_exe,
            dpop_targets,
        })
    }

    /// What the caller may request: for each client its matching policies name, the allowed scope patterns.
    pub fn grants(&self, caller: &Caller) -> BTreeMap<String, Vec<String>> {
        let mut grants: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in self.policies.iter().filter(|p| p.matcher.matches(caller)) {
            for client in &p.clients {
                let scopes = grants.entry(client.clone()).or_default();
                for s in &p.scopes {
                    let s = s.to_string();
                    if !scopes.contains(&s) {
                        scopes.push(s);
                    }
                }
            }
        }
        grants
    }
}

/// A policy that came close to allowing a request, and the key that fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearMiss {
    /// The policy's name.
    pub policy: String,
    /// The failing key: `clients`, `scopes`, or a `match.*` key.
    pub key: String,
    /// How it fails.
    pub detail: String,
}

/// How the policies judge a request, for `credbroker explain`.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The policies that match the caller.
    pub matching: Vec<Policy>,
    /// The decision, when scopes were given: made by [`PolicySet::authorize`], as for a real call.
    pub decision: Option<Result<Allowed, Refusal>>,
    /// The client judged: the requested one, or the one the caller's policies resolve to.
    pub client: Option<String>,
    /// Policies that came close (listed unless the request is allowed): those that match the caller but not
    /// the client or a scope, and those that name the client and allow every requested scope the caller's own
    /// policies do not, but do not match the caller.
    pub near_misses: Vec<NearMiss>,
}

impl PolicySet {
    /// Explains how `caller` asking for `client` (empty for the only one its policies name) and `scopes` is
    /// judged: the matching policies, the decision (if any scopes are given), and the policies that came close.
    ///
    /// # Errors
    /// [`Refusal::UnknownClient`] for a client the config does not have.
    pub fn explain(
        &self,
        caller: &Caller,
        client: &str,
        scopes: &ScopeSet,
        is_client: impl Fn(&str) -> bool,
    ) -> Result<Explanation, Refusal> {
        if !client.is_empty() && !is_client(client) {
            return Err(Refusal::UnknownClient(client.to_owned()));
        }
        let matching: Vec<Policy> = self
            .policies
            .iter()
            .filter(|p| p.matcher.matches(caller))
            .cloned()
            .collect();
        let decision =
            (!scopes.is_empty()).then(|| self.authorize(caller, client, scopes, &is_client));
        let resolved = match &decision {
            Some(Ok(a)) => Some(a.client.clone()),
            Some(Err(
                Refusal::ClientNotAllowed { client, .. } | Refusal::ScopeNotAllowed { client, .. },
            )) => Some(client.clone()),
            _ if !client.is_empty() => Some(client.to_owned()),
            _ => None,
        };
        let mut near_misses = Vec::new();
        if !matches!(decision, Some(Ok(_))) {
            // Policies for this caller that do not name the client, or not every scope.
            for p in &matching {
                if let Some(c) = &resolved
                    && !p.names(c)
                {
                    near_misses.push(NearMiss {
                        policy: p.name.clone(),
                        key: "clients".to_owned(),
                        detail: format!("name {:?}, not {c:?}", p.clients),
                    });
                } else if let Some(scope) = scopes.iter().find(|s| !p.allows(s)) {
                    near_misses.push(NearMiss {
                        policy: p.name.clone(),
                        key: "scopes".to_owned(),
                        detail: format!("do not allow {scope:?}"),
                    });
                }
            }
            // Policies that would grant what the caller's own policies do not, to another caller.
            let missing: Vec<&str> = scopes
                .iter()
                .filter(|s| {
                    !matching
                        .iter()
                        .any(|p| resolved.as_ref().is_none_or(|c| p.names(c)) && p.allows(s))
                })
                .collect();
            for p in self.policies.iter().filter(|p| !p.matcher.matches(caller)) {
                let grants_client = resolved.as_ref().is_none_or(|c| p.names(c));
                if grants_client && missing.iter().all(|s| p.allows(s)) {
                    let (key, detail) = p
                        .matcher
                        .mismatch(caller)
                        .unwrap_or(("match", "does not match the caller".to_owned()));
                    near_misses.push(NearMiss {
                        policy: p.name.clone(),
                        key: key.to_owned(),
                        detail,
                    });
                }
            }
        }
        Ok(Explanation {
            matching,
            decision,
            client: resolved,
            near_misses,
        })
    }
}

impl fmt::Display for Matcher {
    /// The `match` table as it would be written in TOML, for `check-config`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.any {
            return f.write_str("{ any = true }");
        }
        let mut parts = Vec::new();
        fn list<T: fmt::Debug>(parts: &mut Vec<String>, key: &str, v: &Option<Vec<T>>) {
            match v.as_deref() {
                Some([one]) => parts.push(format!("{key} = {one:?}")),
                Some(many) => parts.push(format!("{key} = {many:?}")),
                None => {}
            }
        }
        list(&mut parts, "uid", &self.uid);
        list(&mut parts, "user", &self.user);
        list(&mut parts, "gid", &self.gid);
        list(&mut parts, "group", &self.group);
        list(&mut parts, "exe", &self.exe);
        list(&mut parts, "unit", &self.unit);
        write!(f, "{{ {} }}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, user: &str, groups: &[(u32, &str)], exe: &str) -> Caller {
        Caller {
            uid,
            gid: groups[0].0,
            pid: 4242,
            user: Some(user.to_owned()),
            gids: groups.iter().map(|g| g.0).collect(),
            groups: groups.iter().map(|g| g.1.to_owned()).collect(),
            exe: Some(PathBuf::from(exe)),
            exe_id: FileId::of(Path::new(exe)).ok(),
            exe_note: None,
            unit: Some("billing.service".to_owned()),
        }
    }

    fn policy(name: &str, matcher: Matcher, clients: &[&str], scopes: &[&str]) -> Policy {
        Policy {
            name: name.to_owned(),
            matcher,
            clients: clients.iter().map(|c| (*c).to_owned()).collect(),
            scopes: scopes
                .iter()
                .map(|s| ScopePattern::parse(s).unwrap())
                .collect(),
            dpop_targets: Vec::new(),
        }
    }

    fn set(s: &[&str]) -> ScopeSet {
        ScopeSet::parse(s).unwrap()
    }

    fn known(c: &str) -> bool {
        ["idp", "other"].contains(&c)
    }

    #[test]
    fn all_match_keys_must_match() {
        let billing = caller(
            1001,
            "billing",
            &[(1001, "billing"), (50, "staff")],
            "/usr/bin/env",
        );
        let m = Matcher {
            user: Some(vec!["billing".into()]),
            exe: Some(vec!["/usr/bin/env".into()]),
            ..Matcher::default()
        };
        assert!(m.matches(&billing));
        let m2 = Matcher {
            exe: Some(vec!["/bin/sh".into()]),
            ..m.clone()
        };
        assert!(!m2.matches(&billing));
        let by_group = Matcher {
            group: Some(vec!["wheel".into(), "staff".into()]),
            unit: Some(vec!["billing.service".into()]),
            ..Matcher::default()
        };
        assert!(by_group.matches(&billing));
        let by_gid = Matcher {
            gid: Some(vec![50]),
            uid: Some(vec![0]),
            ..Matcher::default()
        };
        assert!(!by_gid.matches(&billing));
    }

    #[test]
    fn exe_matches_the_file_not_the_path_string() {
        let dir = tempfile::tempdir().unwrap();
        let (allowed, other) = (dir.path().join("allowed"), dir.path().join("other"));
        std::fs::write(&allowed, "#!/bin/sh\n").unwrap();
        std::fs::write(&other, "#!/bin/sh\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&allowed, &link).unwrap();
        let m = |p: &Path| Matcher {
            uid: Some(vec![1001]),
            exe: Some(vec![p.to_owned()]),
            ..Matcher::default()
        };
        let mut c = caller(1001, "u", &[(1001, "u")], allowed.to_str().unwrap());
        assert!(m(&allowed).matches(&c));
        // Another path to the same file matches (a symlink in the config, say).
        assert!(m(&link).matches(&c));
        // The same path string for another file does not: what a bind mount over the path in the caller's
        // own mount namespace would show.
        c.exe_id = FileId::of(&other).ok();
        assert!(!m(&allowed).matches(&c));
        // Upgraded in place (a new file at the path): new processes of it match.
        std::fs::remove_file(&allowed).unwrap();
        std::fs::rename(&other, &allowed).unwrap();
        assert!(m(&allowed).matches(&c));
        // A path the daemon cannot see matches nobody, and is reported.
        let gone = dir.path().join("gone");
        assert!(!m(&gone).matches(&c));
        let ps = PolicySet::new(vec![policy("p", m(&gone), &["idp"], &["x"])]);
        assert_eq!(ps.unseen_exes()[0].0, gone);
        // A decision that rests on the executable says so (the service then re-checks it for the call).
        let ps = PolicySet::new(vec![policy("p", m(&allowed), &["idp"], &["x"])]);
        let ok = ps.authorize(&c, "", &set(&["x"]), known).unwrap();
        assert!(ok.by_exe);
        // A caller whose executable could not be read matches no exe policy.
        c.exe_id = None;
        assert!(!m(&allowed).matches(&c));
    }

    #[test]
    fn deny_by_default_and_union_over_policies() {
        let c = caller(1001, "billing", &[(1001, "billing")], "/bin/x");
        let by_user = |u: &str| Matcher {
            user: Some(vec![u.into()]),
            ..Matcher::default()
        };
        let ps = PolicySet::new(vec![
            policy("read", by_user("billing"), &["idp"], &["scim:read"]),
            policy(
                "mgt",
                by_user("billing"),
                &["idp"],
                &["internal_user_mgt_*"],
            ),
            policy("someone-else", by_user("ops"), &["idp"], &["scim:write"]),
        ]);
        let ok = ps
            .authorize(
                &c,
                "",
                &set(&["scim:read", "internal_user_mgt_view"]),
                known,
            )
            .unwrap();
        assert_eq!(ok.client, "idp");
        assert_eq!(ok.policies, ["mgt", "read"]);
        assert!(!ok.by_exe, "no policy matched on the executable");
        let err = ps
            .authorize(&c, "idp", &set(&["scim:read", "scim:write"]), known)
            .unwrap_err();
        assert!(matches!(&err, Refusal::ScopeNotAllowed { scope, .. } if scope == "scim:write"));
        assert!(err.to_string().contains("uid=1001(billing)"), "{err}");
        let stranger = caller(1002, "eve", &[(1002, "eve")], "/bin/x");
        assert!(matches!(
            ps.authorize(&stranger, "", &set(&["scim:read"]), known),
            Err(Refusal::NoPolicy { .. })
        ));
    }

    #[test]
    fn client_selection() {
        let c = caller(0, "root", &[(0, "root")], "/bin/x");
        let any = Matcher {
            any: true,
            ..Matcher::default()
        };
        let ps = PolicySet::new(vec![
            policy("a", any.clone(), &["idp"], &["x"]),
            policy("b", any, &["other"], &["y"]),
        ]);
        assert_eq!(
            ps.authorize(&c, "", &set(&["x"]), known),
            Err(Refusal::AmbiguousClient(vec!["idp".into(), "other".into()]))
        );
        assert_eq!(
            ps.authorize(&c, "nope", &set(&["x"]), known),
            Err(Refusal::UnknownClient("nope".into()))
        );
        assert!(matches!(
            ps.authorize(&c, "other", &set(&["x"]), known),
            Err(Refusal::ScopeNotAllowed { .. })
        ));
        assert_eq!(
            ps.authorize(&c, "other", &set(&["y"]), known)
                .unwrap()
                .client,
            "other"
        );
        let grants = ps.grants(&c);
        assert_eq!(grants["idp"], ["x"]);
        assert_eq!(grants["other"], ["y"]);
    }

    #[test]
    fn explain_names_the_policies_that_came_close_and_their_failing_key() {
        let c = caller(1001, "billing", &[(1001, "billing")], "/usr/bin/env");
        let ps = PolicySet::new(vec![
            policy(
                "billing-read",
                Matcher {
                    user: Some(vec!["billing".into()]),
                    ..Matcher::default()
                },
                &["idp"],
                &["scim:read"],
            ),
            policy(
                "ops-write",
                Matcher {
                    user: Some(vec!["ops".into()]),
                    ..Matcher::default()
                },
                &["idp"],
                &["scim:*"],
            ),
            policy(
                "sh-only",
                Matcher {
                    user: Some(vec!["billing".into()]),
                    exe: Some(vec!["/bin/sh".into()]),
                    ..Matcher::default()
                },
                &["idp"],
                &["scim:write"],
            ),
            policy(
                "other-idp",
                Matcher {
                    any: true,
                    ..Matcher::default()
                },
                &["other"],
                &["x"],
            ),
        ]);
        let e = ps.explain(&c, "idp", &set(&["scim:write"]), known).unwrap();
        let names: Vec<&str> = e.matching.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["billing-read", "other-idp"]);
        assert!(matches!(
            &e.decision,
            Some(Err(Refusal::ScopeNotAllowed { scope, .. })) if scope == "scim:write"
        ));
        let misses: Vec<(&str, &str)> = e
            .near_misses
            .iter()
            .map(|m| (m.policy.as_str(), m.key.as_str()))
            .collect();
        assert_eq!(
            misses,
            [
                ("billing-read", "scopes"),
                ("other-idp", "clients"),
                ("ops-write", "match.user"),
                ("sh-only", "match.exe"),
            ]
        );
        assert!(
            e.near_misses[2].detail.contains("\"ops\""),
            "{:?}",
            e.near_misses[2]
        );
        // Allowed: the decision, and no near misses.
        let ok = ps.explain(&c, "idp", &set(&["scim:read"]), known).unwrap();
        assert_eq!(ok.decision.unwrap().unwrap().policies, ["billing-read"]);
        assert!(ok.near_misses.is_empty());
        // No scopes: no decision, the matching policies only.
        let none = ps.explain(&c, "", &ScopeSet::default(), known).unwrap();
        assert!(none.decision.is_none());
        assert_eq!(none.matching.len(), 2);
        assert_eq!(
            ps.explain(&c, "nope", &set(&["x"]), known).unwrap_err(),
            Refusal::UnknownClient("nope".into())
        );
    }
}
