//! Scope parsing and policy decisions. Input: a line of requested scopes (space-separated), then up to 8
//! policy lines `UID CLIENT PATTERN...`.
//!
//! Properties: a parsed scope set prints back to itself (as a list and as a token response's `scope`); a
//! decision never grants a scope that no matching policy naming the client allows; explain agrees with it.
#![no_main]

use credbroker_daemon::identity::peer::Caller;
use credbroker_daemon::policy::scope::{ScopePattern, ScopeSet};
use credbroker_daemon::policy::{Matcher, Policy, PolicySet};
use libfuzzer_sys::fuzz_target;

fn caller(uid: u32) -> Caller {
    Caller {
        uid,
        gid: uid,
        pid: 1,
        user: Some(format!("u{uid}")),
        gids: vec![uid],
        groups: vec![format!("g{uid}")],
        exe: None,
        exe_id: None,
        exe_note: None,
        unit: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let requested: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let Ok(set) = ScopeSet::parse(&requested) else {
        return;
    };
    assert_eq!(
        ScopeSet::parse(&set.to_vec()).as_ref(),
        Ok(&set),
        "a set prints back to itself"
    );
    assert_eq!(
        ScopeSet::parse_delimited(&set.joined()).as_ref(),
        Some(&set)
    );

    let policies: Vec<Policy> = lines
        .take(8)
        .enumerate()
        .map(|(i, line)| {
            let mut words = line.split(' ');
            let uid = words
                .next()
                .and_then(|u| u.parse::<u32>().ok())
                .unwrap_or(0)
                % 3;
            let client = words.next().unwrap_or("c").to_owned();
            Policy {
                name: format!("p{i}"),
                matcher: Matcher {
                    uid: Some(vec![uid]),
                    ..Matcher::default()
                },
                clients: vec![client],
                scopes: words.filter_map(ScopePattern::parse).collect(),
                dpop_targets: Vec::new(),
            }
        })
        .collect();
    let ps = PolicySet::new(policies.clone());
    for uid in 0..3 {
        let who = caller(uid);
        let decision = ps.authorize(&who, "", &set, |_| true);
        if let Ok(allowed) = &decision {
            for scope in set.iter() {
                assert!(
                    policies.iter().any(|p| p.matcher.matches(&who)
                        && p.clients.contains(&allowed.client)
                        && p.scopes.iter().any(|pat| pat.allows(scope))),
                    "granted {scope:?} that no matching policy allows"
                );
            }
        }
        let explained = ps
            .explain(&who, "", &set, |_| true)
            .expect("every client is known");
        assert_eq!(
            explained.decision.as_ref().map(Result::is_ok),
            Some(decision.is_ok())
        );
    }
});
