//! The Prometheus endpoint (`daemon.metrics`): the real daemon scraped over TCP, its output checked by
//! `promtool check metrics`, its values following the calls made; its own connection cap.

use std::time::Duration;

use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::{Daemon, stderr, token_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address the daemon says it serves metrics on.
fn metrics_addr(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split("serving metrics at http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_owned()
}

/// A daemon on the base config with metrics on a free loopback port, and that port's address.
async fn with_metrics(s: &Setup) -> (Daemon, String) {
    let config = s
        .config()
        .replace("[daemon]\n", "[daemon]\nmetrics = \"127.0.0.1:0\"\n");
    let d = Daemon::start(&s.dir, &config).await;
    let addr = metrics_addr(&d.log());
    (d, addr)
}

/// One HTTP/1.1 request; the whole answer (the endpoint closes the connection after it).
async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))?
}

async fn scrape(addr: &str) -> String {
    let answer = http_get(addr, "/metrics").await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `name{labels}` (exactly as written), or 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

fn promtool(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_follow_the_calls() {
    let s = Setup::new().await;
    let (d, addr) = with_metrics(&s).await;

    let before = scrape(&addr).await;
    promtool(&before);
    assert_eq!(
        sample(&before, "credbroker_build_info{version=\"0.1.0\"}"),
        1.0
    );
    assert_eq!(sample(&before, "credbroker_cache_entries"), 0.0);

    let mut c = d.client().await;
    let first = token_text(&mut c, &["scim:read"]).await;
    token_text(&mut c, &["scim:read"]).await;
    token_text(&mut c, &["scim:read"]).await;
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    // The IdP fails once (503), then issues on the retry.
    s.idp.fail_next(1, 503);
    token_text(&mut c, &["scim:write"]).await;

    let text = scrape(&addr).await;
    promtool(&text);
    let calls = |outcome: &str| {
        sample(
            &text,
            &format!("credbroker_calls_total{{method=\"GetToken\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(calls("ok"), 4.0, "{text}");
    assert_eq!(calls("permission_denied"), 1.0, "{text}");
    let lookups = |r: &str| {
        sample(
            &text,
            &format!("credbroker_cache_lookups_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!((lookups("hit"), lookups("miss")), (2.0, 2.0), "{text}");
    let idp = |o: &str| {
        sample(
            &text,
            &format!("credbroker_idp_requests_total{{client=\"idp\",outcome=\"{o}\"}}"),
        )
    };
    assert_eq!((idp("2xx"), idp("5xx")), (2.0, 1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "credbroker_idp_request_duration_seconds_count{client=\"idp\"}"
        ),
        3.0
    );
    assert!(
        sample(
            &text,
            "credbroker_idp_last_success_timestamp_seconds{client=\"idp\"}"
        ) > 1.7e9
    );
    assert_eq!(sample(&text, "credbroker_cache_entries"), 2.0);
    assert!(sample(&text, "credbroker_cache_bytes") > 0.0);
    assert!(
        sample(&text, "credbroker_connections_open") >= 1.0,
        "this client's"
    );
    // Bounded labels: no scope, uid or token.
    for leak in ["scim:", "65534", first.as_str()] {
        assert!(!text.contains(leak), "{leak} in the metrics:\n{text}");
    }

    // A flush, then the next call asks the IdP again.
    let out = d.cli(None, &["flush"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    token_text(&mut c, &["scim:read"]).await;
    let text = scrape(&addr).await;
    assert_eq!(
        sample(&text, "credbroker_cache_lookups_total{result=\"miss\"}"),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            "credbroker_calls_total{method=\"Flush\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "credbroker_cache_entries"), 1.0);

    // Nothing else is served.
    let answer = http_get(&addr, "/v1/token?scope=scim:read").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test]
async fn denials_over_the_log_budget_are_counted_as_suppressed_lines_not_as_rate_limiting() {
    let s = Setup::new().await;
    let (d, addr) = with_metrics(&s).await;
    let mut c = d.client().await;
    for _ in 0..200 {
        c.token(["openid"]).await.unwrap_err();
    }
    let text = scrape(&addr).await;
    promtool(&text);
    assert_eq!(
        sample(&text, "credbroker_rate_limited_total"),
        0.0,
        "{text}"
    );
    let suppressed = sample(
        &text,
        "credbroker_log_lines_suppressed_total{kind=\"deny\"}",
    );
    assert!(
        (150.0..=180.0).contains(&suppressed),
        "{suppressed}: {text}"
    );
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn silent_connections_cannot_lock_the_scraper_out() {
    let s = Setup::new().await;
    let (d, addr) = with_metrics(&s).await;
    let fds_before = open_fds(d.pid());
    // Any local user can connect: 96 silent connections, each opened again as soon as the daemon closes it
    // (from a runtime of their own, as another process would, so they do not slow the scraper down).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let attack = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut attackers = Vec::new();
                for _ in 0..96 {
                    let (addr, mut stopped) = (addr.clone(), stopped.clone());
                    attackers.push(tokio::spawn(async move {
                        let mut opened = 0u32;
                        while !*stopped.borrow() {
                            let Ok(mut silent) = TcpStream::connect(&addr).await else {
                                continue;
                            };
                            opened += 1;
                            let mut buf = [0u8; 16];
                            tokio::select! {
                                _ = silent.read(&mut buf) => {}
                                _ = stopped.changed() => {}
                            }
                        }
                        opened
                    }));
                }
                let mut reopened = 0;
                for a in attackers {
                    reopened += a.await.unwrap();
                }
                reopened
            })
        })
    };
    // A scraper beside them is served every time.
    let mut held = Vec::new();
    for i in 0..20 {
        let answer = http_get(&addr, "/metrics").await;
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
            "scrape {i}: {answer:?}"
        );
        held.push(open_fds(d.pid()).saturating_sub(fds_before));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile the daemon holds its cap of them, not all 96: 32 connections, each with a duplicate of its
    // socket to peek at (connections being closed come and go on top).
    held.sort_unstable();
    assert!(held[held.len() / 2] <= 80, "descriptors held: {held:?}");
    stop.send(true).unwrap();
    let reopened = tokio::task::spawn_blocking(move || attack.join().unwrap())
        .await
        .unwrap();
    assert!(reopened > 96, "the attack never had to reopen ({reopened})");
    // The socket's own service goes on meanwhile.
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;
}

/// The alert rules of docs/operating.md are valid rules, and name metrics the daemon serves.
#[test]
fn the_documented_alert_rules_pass_promtool() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operating.md"))
        .unwrap();
    let start = doc
        .find("groups:\n  - name: credbroker")
        .expect("alert rules in docs/operating.md");
    let rules = &doc[start..];
    let rules = &rules[..rules.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for metric in [
        "credbroker_idp_requests_total",
        "credbroker_renewal_failures_total",
    ] {
        assert!(rules.contains(metric));
    }
}

/// Renewals ahead of expiry, their failures and the stale serves they cause, as the metrics count them: a
/// 10 s token is renewed after 3.25-3.75 s; the IdP then fails, so the renewal fails (after its retries) and
/// the cached token is served stale.
#[tokio::test]
async fn renewals_their_failures_and_stale_serves_are_counted() {
    let s = Setup::new().await;
    s.idp.set_expires_in(10);
    let (d, addr) = with_metrics(&s).await;
    let mut c = d.client().await;
    let first = token_text(&mut c, &["scim:read"]).await;
    // In use: asked for again after it arrived, so it is renewed ahead of expiry.
    assert_eq!(token_text(&mut c, &["scim:read"]).await, first);
    let text = scrape(&addr).await;
    assert_eq!(sample(&text, "credbroker_renewals_total"), 0.0);
    // From now on the IdP fails.
    s.idp.fail_next(1000, 503);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&addr).await;
        if sample(&text, "credbroker_renewal_failures_total") >= 1.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed renewal:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A renewal is one attempt; the next try waits for its backoff (this token is close enough to expiry
    // to try without a retry from the budget), so by now there may have been one more.
    let renewals = sample(&text, "credbroker_renewals_total");
    assert!((1.0..=3.0).contains(&renewals), "{text}");
    assert_eq!(
        sample(&text, "credbroker_stale_serves_total"),
        0.0,
        "{text}"
    );
    // The cached token is still served (it has a few seconds left), and counted as stale.
    let token = c
        .get_token(
            credbroker_client::TokenRequest::new(["scim:read"]).min_ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    use credbroker_client::secrecy::ExposeSecret;
    assert_eq!(token.access_token().expose_secret(), first.as_str());
    let text = scrape(&addr).await;
    assert_eq!(
        sample(&text, "credbroker_stale_serves_total"),
        1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "credbroker_idp_requests_total{client=\"idp\",outcome=\"5xx\"}"
        ) >= 1.0,
        "the renewal's attempt: {text}"
    );
}
