//! The admin API (`credbroker.admin.v1.Admin`) through the CLI: reload and flush, for `daemon.admins` only,
//! every call audited.

use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::{Daemon, stderr, stdout, token_text};

#[tokio::test]
async fn reload_returns_its_outcome_to_an_admin_and_refuses_others() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let out = d.cli(None, &["reload"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "reloaded: serving 1 clients, 2 policies"
    );

    // A broken config: every error comes back (exit 64), and the running config keeps serving.
    s.dir.write(
        "credbroker.toml",
        &s.config()
            .replace("[daemon]\n", "[daemon]\nbogus = 1\ncolour = 2\n"),
        0o644,
    );
    let out = d.cli(None, &["reload"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    for key in ["daemon.bogus", "daemon.colour"] {
        assert!(
            stderr(&out).contains(key),
            "{key} missing: {}",
            stderr(&out)
        );
    }
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;

    // Not an admin: denied (77), and audited either way.
    let out = d.cli(Some(NOBODY), &["reload"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not one of daemon.admins"),
        "{}",
        stderr(&out)
    );
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("event=\"admin\"")
            && l.contains("allowed=true")
            && l.contains("uid=0")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("event=\"admin\"")
            && l.contains("allowed=false")
            && l.contains("uid=65534")),
        "{log}"
    );
}

#[tokio::test]
async fn flush_drops_cached_tokens_so_the_next_call_asks_the_idp_again() {
    let s = Setup::new().await;
    // Admins by group: nobody's primary group.
    let config = s.config().replace(
        "[daemon]\n",
        "[daemon]\nadmins = [\"root\", \"@nogroup\"]\n",
    );
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    let first = token_text(&mut c, &["scim:read"]).await;
    token_text(&mut c, &["scim:read", "scim:write"]).await;
    assert_eq!(s.idp.request_count(), 2);
    assert_eq!(token_text(&mut c, &["scim:read"]).await, first, "cached");

    // Only the entries of that client holding that scope and another: here one.
    let out = d
        .cli(Some(NOBODY), &["flush", "-c", "idp", "scim:write"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "dropped 1 cached entries");
    assert_eq!(
        token_text(&mut c, &["scim:read"]).await,
        first,
        "still cached"
    );
    // Everything.
    let out = d.cli(None, &["flush"]).await;
    assert_eq!(stdout(&out).trim(), "dropped 1 cached entries");
    let again = token_text(&mut c, &["scim:read"]).await;
    assert_ne!(again, first);
    assert_eq!(s.idp.request_count(), 3);
    // Someone who is neither root nor in the group may not.
    let out = d.cli(Some((65533, 65533)), &["flush"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}
