//! End-to-end tests of the token lifecycle through the real daemon: single flight, refresh ahead, retries,
//! serving through IdP trouble, remembered refusals, per-uid rate limits, and callers that give up.
//! Timing-heavy behaviour (backoff schedules, jitter, refresh points) is tested on tokio's paused clock in
//! the daemon's `cache` and `retry` unit tests; here each wait is for an event, bounded by `credbroker_tests::WAIT`.

use std::time::Duration;

use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Error, TokenRequest};
use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::idp::Fault;
use credbroker_tests::{Daemon, token_text, wait_for};

#[tokio::test]
async fn a_burst_of_300_cold_callers_makes_one_idp_request() {
    let s = Setup::new().await;
    // A slow IdP, so every caller arrives while the first fetch is still under way.
    s.idp.set_fault(Fault::Slow(Duration::from_millis(500)));
    let d = s.daemon().await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(d.client().await);
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut c = clients[i % clients.len()].clone();
        calls.spawn(async move {
            c.token(["scim:read", "scim:write"])
                .await
                .map(|t| t.access_token().expose_secret().to_owned())
        });
    }
    let mut tokens = Vec::new();
    while let Some(r) = calls.join_next().await {
        tokens.push(r.unwrap().unwrap());
    }
    assert_eq!(s.idp.request_count(), 1);
    let issued = s.idp.issued_tokens();
    assert!(tokens.iter().all(|t| *t == issued[0]));
}

#[tokio::test]
async fn a_token_in_use_is_renewed_in_the_background() {
    let s = Setup::new().await;
    s.idp.set_expires_in(4);
    // Usable life: 4 s less the 1 s default min TTL; renewal between ~2 s and ~2.25 s.
    let config = s
        .config()
        .replace("[clients.idp]", "default_min_ttl = \"1s\"\n\n[clients.idp]");
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    let first = c.token(["scim:read"]).await.unwrap();
    // Use it again: a token asked for after it arrived is in use.
    assert_eq!(
        token_text(&mut c, &["scim:read"]).await,
        first.access_token().expose_secret()
    );
    // Wait for the renewal the daemon makes on its own.
    // (The daemon says so once the new token is in its cache; the IdP has counted the request before.)
    wait_for("the background renewal", || {
        d.log().contains("token renewed")
    })
    .await;
    assert_eq!(s.idp.request_count(), 2);
    let renewed = s.idp.issued_tokens()[1].clone();
    // Callers now get the renewed token from the cache, with the whole new lifetime ahead.
    let t = c.token(["scim:read"]).await.unwrap();
    assert_eq!(t.access_token().expose_secret(), renewed);
    assert_eq!(s.idp.request_count(), 2);
}

#[tokio::test]
async fn transient_idp_failures_are_retried_with_backoff() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    s.idp.fail_next(2, 503);
    let t = d.client().await.token(["scim:read"]).await.unwrap();
    assert_eq!(s.idp.request_count(), 3);
    assert_eq!(t.access_token().expose_secret(), s.idp.issued_tokens()[0]);
    let log = d.log();
    assert!(
        log.contains("retrying after a backoff") && log.contains("HTTP 503"),
        "{log}"
    );
}

#[tokio::test]
async fn while_the_idp_is_down_cached_tokens_are_served_and_new_ones_fail_fast() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;
    let cached = c.token(["scim:read"]).await.unwrap();
    s.idp.set_fault(Fault::Status(503));
    for _ in 0..5 {
        let t = c.token(["scim:read"]).await.unwrap();
        assert_eq!(
            t.access_token().expose_secret(),
            cached.access_token().expose_secret()
        );
    }
    assert_eq!(s.idp.request_count(), 1);
    let started = tokio::time::Instant::now();
    let err = c.token(["scim:write"]).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("worth retrying"), "{err}");
    // The first attempt and the two retries the client's retry budget holds, then UNAVAILABLE (a few hundred
    // ms of backoff here, well within the 15 s time budget).
    assert_eq!(s.idp.request_count(), 1 + 3);
    assert!(d.log().contains("retry budget is spent"), "{}", d.log());
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn an_idp_refusal_is_remembered_briefly_instead_of_hammering_the_idp() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;
    // The policy allows it; the IdP does not.
    let first = c.token(["internal_user_mgt_delete"]).await.unwrap_err();
    assert!(
        first.needs_operator() && first.to_string().contains("invalid_scope"),
        "{first}"
    );
    let second = c.token(["internal_user_mgt_delete"]).await.unwrap_err();
    assert!(
        second.needs_operator() && second.to_string().contains("remembered"),
        "{second}"
    );
    assert_eq!(s.idp.request_count(), 1);
}

#[tokio::test]
async fn each_uid_has_its_own_rate_of_new_tokens_and_cache_hits_are_free() {
    let s = Setup::new().await;
    let config = s.config().replace(
        "[clients.idp]",
        "rate_limit = { per_minute = 1, burst = 3 }\n\n[clients.idp]",
    );
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    for scopes in [
        &["scim:write"][..],
        &["internal_user_mgt_view"],
        &["scim:write", "internal_user_mgt_view"],
    ] {
        c.token(scopes.iter().copied()).await.unwrap();
    }
    let err = c.token(["internal_user_mgt_list"]).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    assert!(err.is_retryable());
    assert_eq!(s.idp.request_count(), 3);
    // Cache hits do not count.
    for _ in 0..10 {
        c.token(["scim:write"]).await.unwrap();
    }
    // The CLI says it is worth retrying (75).
    let out = d.cli(None, &["token", "scim:read"]).await;
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another uid has its own bucket.
    let out = d.cli(Some(NOBODY), &["token", "scim:read"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.idp.request_count(), 4);
    assert!(
        d.log().contains("too many new tokens requested"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_cancel_the_fetch_others_wait_for() {
    let s = Setup::new().await;
    s.idp.set_fault(Fault::Slow(Duration::from_millis(1500)));
    let d = s.daemon().await;
    let mut impatient = d.client().await.with_timeout(Duration::from_millis(300));
    let mut patient = d.client().await;
    let a = tokio::spawn(async move { impatient.token(["scim:read"]).await });
    // Let the impatient caller start the fetch first.
    wait_for("the first fetch to reach the IdP", || {
        s.idp.arrival_count() > 0
    })
    .await;
    let b = tokio::spawn(async move { patient.get_token(TokenRequest::new(["scim:read"])).await });
    let err = a.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    let t = b.await.unwrap().unwrap();
    assert_eq!(s.idp.request_count(), 1);
    assert_eq!(t.access_token().expose_secret(), s.idp.issued_tokens()[0]);
}
