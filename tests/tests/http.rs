//! Plain HTTP on the daemon's socket, driven by the real `curl` (HTTP/1.1 and HTTP/2 with prior knowledge),
//! as another uid where it matters: the same tokens, identity, policy and limits as gRPC, JSON in and out.

use std::process::Output;

use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::idp::Fault;
use credbroker_tests::{Daemon, run_cli, stdout};
use tokio::process::Command;

/// `curl` on the daemon's socket: `-s`, the guard header unless `guard` is false, then `args`; with
/// `-w '\n%{http_code}'` so the last line is the status.
async fn curl(d: &Daemon, who: Option<(u32, u32)>, guard: bool, args: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.arg("-s")
        .arg("--max-time")
        .arg("20")
        .arg("--unix-socket")
        .arg(&d.socket)
        .args(["-w", "\n%{http_code}"]);
    if guard {
        cmd.args(["-H", "Credbroker-Request: true"]);
    }
    cmd.args(args);
    let out = run_cli(cmd, who).await;
    let text = stdout(&out);
    let (body, status) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (status.parse().unwrap_or(0), body.to_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn cli_json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    json(&stdout(out))
}

const TOKEN: &str = "http://localhost/v1/token";
const WHOAMI: &str = "http://localhost/v1/whoami";

#[tokio::test]
async fn a_token_over_http_1_1_and_http_2_is_the_json_the_cli_prints() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let cli = cli_json(
        &d.cli(Some(NOBODY), &["token", "--format", "json", "scim:read"])
            .await,
    );
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let (status, body) = curl(
            &d,
            Some(NOBODY),
            true,
            &[version, &format!("{TOKEN}?scope=scim:read")],
        )
        .await;
        assert_eq!(status, 200, "{version}: {body}");
        let http = json(&body);
        for key in [
            "access_token",
            "token_type",
            "expires_at",
            "scopes",
            "client",
        ] {
            assert_eq!(http[key], cli[key], "{version} {key}: {http} vs {cli}");
        }
        let left = http["expires_in"].as_u64().unwrap();
        assert!(
            left.abs_diff(cli["expires_in"].as_u64().unwrap()) <= 5,
            "{http}"
        );
        assert_eq!(
            http.as_object().unwrap().len(),
            cli.as_object().unwrap().len()
        );
    }
    // The headers a client must see, and `%20` splitting one value into scopes.
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "20", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "Credbroker-Request: true"])
        .arg(format!("{TOKEN}?scope=scim:read%20internal_user_mgt_view"));
    let out = stdout(&run_cli(cmd, None).await).to_ascii_lowercase();
    assert!(out.contains("content-type: application/json"), "{out}");
    assert!(out.contains("cache-control: no-store"), "{out}");
    assert!(
        out.contains("\"scopes\":[\"internal_user_mgt_view\",\"scim:read\"]"),
        "{out}"
    );
    assert_eq!(s.idp.request_count(), 2);
}

#[tokio::test]
async fn whoami_over_http_is_the_json_the_cli_prints() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let cli = cli_json(&d.cli(Some(NOBODY), &["whoami", "--format", "json"]).await);
    let (status, body) = curl(&d, Some(NOBODY), true, &[WHOAMI]).await;
    assert_eq!(status, 200, "{body}");
    let http = json(&body);
    for key in ["uid", "gid", "user", "groups", "unit", "grants"] {
        assert_eq!(http[key], cli[key], "{key}: {http} vs {cli}");
    }
    assert_eq!(http["uid"], 65534);
    assert!(http["exe"].as_str().unwrap().ends_with("curl"), "{http}");
    assert_eq!(http["grants"]["idp"], serde_json::json!(["scim:read"]));
}

#[tokio::test]
async fn errors_are_json_with_the_mapped_status_and_never_reach_the_idp() {
    let s = Setup::new().await;
    let config = s.config().replace(
        "[daemon]\n",
        "[daemon]\nrate_limit = { per_minute = 1, burst = 1 }\n",
    );
    let d = Daemon::start(&s.dir, &config).await;
    let check = |(status, body): (u16, String), want: u16, error: &str| {
        assert_eq!(status, want, "{body}");
        let j = json(&body);
        assert_eq!(j["error"], error, "{body}");
        assert!(!j["message"].as_str().unwrap().is_empty(), "{body}");
    };
    // No guard header: 400, and no token, whatever else the request says.
    check(
        curl(
            &d,
            Some(NOBODY),
            false,
            &[&format!("{TOKEN}?scope=scim:read")],
        )
        .await,
        400,
        "invalid_argument",
    );
    assert_eq!(
        s.idp.request_count(),
        0,
        "a request without the guard reached the IdP"
    );
    check(
        curl(
            &d,
            Some(NOBODY),
            true,
            &[&format!("{TOKEN}?scope=scim:write")],
        )
        .await,
        403,
        "permission_denied",
    );
    check(
        curl(&d, Some(NOBODY), true, &["http://localhost/v1/nope"]).await,
        404,
        "not_found",
    );
    check(
        curl(&d, Some(NOBODY), true, &["-X", "DELETE", WHOAMI]).await,
        405,
        "unimplemented",
    );
    check(
        curl(&d, Some(NOBODY), true, &["-X", "GET", "-d", "x=1", WHOAMI]).await,
        400,
        "invalid_argument",
    );
    check(
        curl(
            &d,
            Some(NOBODY),
            true,
            &[&format!("{TOKEN}?scope=scim:read&colour=red")],
        )
        .await,
        400,
        "invalid_argument",
    );
    check(
        curl(&d, Some(NOBODY), true, &[&format!("{TOKEN}?scope=%22")]).await,
        400,
        "invalid_argument",
    );
    assert_eq!(s.idp.request_count(), 0);

    // Over the rate of new tokens: 429 with Retry-After.
    let (status, _) = curl(&d, None, true, &[&format!("{TOKEN}?scope=scim:read")]).await;
    assert_eq!(status, 200);
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "20", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "Credbroker-Request: true"])
        .arg(format!("{TOKEN}?scope=scim:write"));
    let out = stdout(&run_cli(cmd, None).await).to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 429"), "{out}");
    assert!(out.contains("retry-after: "), "{out}");
    assert!(out.contains("\"error\":\"resource_exhausted\""), "{out}");
}

#[tokio::test]
async fn an_idp_that_keeps_failing_is_503_with_its_retry_after() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    s.idp.set_fault(Fault::RateLimited("1".into()));
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "30", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "Credbroker-Request: true"])
        .arg(format!("{TOKEN}?scope=scim:write"));
    let out = stdout(&run_cli(cmd, None).await).to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 503"), "{out}");
    assert!(out.contains("retry-after: 1\r\n"), "{out}");
    assert!(out.contains("\"error\":\"unavailable\""), "{out}");
}

#[tokio::test]
async fn request_heads_and_keep_alive_are_bounded_and_the_largest_valid_request_fits() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    // The largest valid request, every byte percent-encoded (about 50 KiB), is read and judged.
    let scope: String = format!("scim:{}", "x".repeat(251));
    let encoded: String = scope.bytes().map(|b| format!("%{b:02X}")).collect();
    let query: Vec<String> = (0..64)
        .map(|i| format!("scope={}{i:02}", &encoded[..encoded.len() - 6]))
        .collect();
    let url = format!("{TOKEN}?{}", query.join("&"));
    assert!(url.len() > 48 * 1024, "{}", url.len());
    let (status, body) = curl(&d, Some(NOBODY), true, &[&url]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(json(&body)["error"], "permission_denied");
    // A larger head is refused before it is parsed, and the daemon serves on.
    let huge = format!("X-Padding: {}", "p".repeat(64 * 1024));
    let (status, _) = curl(&d, Some(NOBODY), true, &["-H", &huge, WHOAMI]).await;
    assert_eq!(status, 431);
    // Keep-alive: one connection serves at most 1000 requests, then closes.
    let urls: Vec<&str> = std::iter::repeat_n(WHOAMI, 1001).collect();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "120", "--unix-socket"])
        .arg(&d.socket)
        .args([
            "-H",
            "Credbroker-Request: true",
            "-w",
            "connects=%{num_connects}\n",
        ])
        .args(&urls);
    let out = stdout(&run_cli(cmd, Some(NOBODY)).await);
    let counts: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects=")?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 1001, "{out}");
    let connects: u32 = counts.iter().sum();
    assert_eq!(connects, 2, "{out}");
    let (status, _) = curl(&d, Some(NOBODY), true, &[WHOAMI]).await;
    assert_eq!(status, 200);
}

/// Found while fuzzing the socket: a client that sends its request and shuts its writing side down (as
/// `nc -N` and some proxies do) got no answer at all.
#[tokio::test]
async fn a_request_from_a_client_that_half_closes_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    stream
        .write_all(b"GET /v1/token?scope=scim:read HTTP/1.1\r\nHost: x\r\nCredbroker-Request: true\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"access_token\""), "{answer}");
}
