//! DPoP (RFC 9449) with the key held by the daemon: bound tokens from the stand-in token endpoint (which
//! requires a nonce) and from a real IdP (oidc-provider, JWT access tokens with `cnf.jkt`), proofs given only
//! for a policy's `dpop_targets`, checked by a stand-in API as RFC 9449 §4.3 says; a copied token alone is
//! refused there.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credbroker_client::{DpopSender, ProofRequest, TokenRequest};
use credbroker_tests::dpop::{RS_NONCE, ResourceServer, check, thumbprint};
use credbroker_tests::fixture::{NOBODY, Setup};
use credbroker_tests::oidc::OidcProvider;
use credbroker_tests::{Daemon, check_config, run_cli, stderr, stdout};
use tokio::process::Command;

/// A reqwest client (the workspace builds reqwest with rustls and no default crypto provider: install ring's).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The JSON of part `i` of a JWT.
fn jwt_part(jwt: &str, i: usize) -> serde_json::Value {
    let part = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The fixture's config with client `idp` bound (`dpop = true`), its policies limited to `targets`; and a
/// second, unbound client `plain` for root.
fn dpop_config(s: &Setup, targets: &str) -> String {
    s.config_with("dpop = true", &format!(
        "\n[clients.plain]\ntoken_url = \"{url}\"\nclient_id = \"broker\"\nallow_http = true\n\
         client_secret = {{ file = \"{dir}/idp.secret\" }}\n\n\
         [[policy]]\nname = \"root-plain\"\nmatch = {{ uid = 0 }}\nclient = \"plain\"\nscopes = [\"scim:read\"]\n",
        url = s.idp.token_url(),
        dir = s.dir.path().display()
    ))
    .replace(
        "scopes = [\"scim:*\", \"internal_user_mgt_*\"]\n",
        &format!("scopes = [\"scim:*\", \"internal_user_mgt_*\"]\ndpop_targets = {targets}\n"),
    )
    .replace(
        "scopes = [\"scim:read\"]\n\n[clients.plain]",
        "scopes = [\"scim:read\"]\ndpop_targets = [\"https://nobody.example/\"]\n\n[clients.plain]",
    )
}

/// `credbroker proof ARGS` against `d`, as root.
async fn proof(d: &Daemon, args: &[&str]) -> std::process::Output {
    d.cli(None, &[&["proof"], args].concat()).await
}

#[tokio::test]
async fn bound_tokens_and_proofs_that_an_api_accepts_only_for_the_policys_targets() {
    let s = Setup::new().await;
    s.idp.require_dpop_nonce("as-nonce.7");
    let api = ResourceServer::start(s.idp.bindings()).await;
    let targets = format!("[\"{}/api/\"]", api.origin);
    let config =
        dpop_config(&s, &targets).replace("[daemon]\n", "[daemon]\nmetrics = \"127.0.0.1:0\"\n");
    let d = Daemon::start(&s.dir, &config).await;
    let users = format!("{}/api/users?page=2", api.origin);

    // The token request carried a proof; the token endpoint asked for its nonce, and got it on the retry.
    let out = proof(
        &d,
        &["--method", "GET", "--url", &users, "-c", "idp", "scim:read"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let requests = s.idp.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests[0].token.is_none() && requests[0].dpop.as_ref().unwrap().1.is_none());
    let (jkt, nonce) = requests[1].dpop.clone().unwrap();
    assert_eq!(nonce.as_deref(), Some("as-nonce.7"));
    let token = requests[1].token.clone().unwrap();

    // Two header lines, for curl -H @-: the bound token, and a proof for this request signed by the key the
    // token is bound to (htu without the query).
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], format!("Authorization: DPoP {token}"));
    let proof_jwt = lines[1].strip_prefix("DPoP: ").unwrap();
    let checked = check(
        proof_jwt,
        "GET",
        &format!("{}/api/users", api.origin),
        Some(&token),
        None,
    )
    .unwrap();
    assert_eq!(checked.jkt, jkt, "the proof's key is the token's");
    assert_eq!(jwt_part(proof_jwt, 0)["typ"], "dpop+jwt");

    // curl with the headers: the API first asks for its nonce, then accepts a proof that carries it.
    let curl = |headers: String, url: String| async move {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("printf '%s\\n' \"$0\" | curl -s -o /dev/null -w '%{http_code}' -H @- \"$1\"")
            .arg(headers)
            .arg(url);
        stdout(&run_cli(cmd, None).await)
    };
    assert_eq!(curl(text.clone(), users.clone()).await, "401");
    let out = proof(
        &d,
        &[
            "--method",
            "GET",
            "--url",
            &users,
            "--nonce",
            RS_NONCE,
            "-c",
            "idp",
            "scim:read",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let with_nonce = stdout(&out);
    assert_eq!(curl(with_nonce.clone(), users.clone()).await, "200");
    // The same proof again: refused (a proof is for one request).
    assert_eq!(curl(with_nonce.clone(), users.clone()).await, "401");
    // A copied token alone is worthless: as a Bearer token, or as DPoP without a proof of the key.
    assert_eq!(
        curl(format!("Authorization: Bearer {token}"), users.clone()).await,
        "401"
    );
    assert_eq!(
        curl(format!("Authorization: DPoP {token}"), users.clone()).await,
        "401"
    );
    // A proof for another URL of the API does not pass for this one.
    let out = proof(
        &d,
        &[
            "--method",
            "GET",
            "--url",
            &format!("{}/api/other", api.origin),
            "--nonce",
            RS_NONCE,
            "-c",
            "idp",
            "scim:read",
        ],
    )
    .await;
    assert_eq!(curl(stdout(&out), users.clone()).await, "401");
    let outcomes = api.outcomes();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "ok").count(),
        1,
        "{outcomes:?}"
    );

    // Only for the policy's targets: another path, host, port or scheme is denied (77); a URL with user info
    // or a method that is not one is a usage error (64), as is a proof for a client that binds nothing.
    for url in [
        format!("{}/admin", api.origin),
        format!("{}/apix/users", api.origin),
        "https://api.example.com/api/users".to_owned(),
    ] {
        let out = proof(
            &d,
            &["--method", "GET", "--url", &url, "-c", "idp", "scim:read"],
        )
        .await;
        assert_eq!(out.status.code(), Some(77), "{url}: {}", stderr(&out));
        assert!(stderr(&out).contains("dpop_targets"), "{}", stderr(&out));
    }
    let with_user = api.origin.replace("http://", "http://me:pw@");
    for (args, why) in [
        (vec!["--method", "GET", "--url", &with_user], "user info"),
        (vec!["--method", "G ET", "--url", &users], "method"),
        (
            vec!["--method", "GET", "--url", &users, "--nonce", "a\"b"],
            "nonce",
        ),
    ] {
        let out = proof(&d, &[&args[..], &["-c", "idp", "scim:read"]].concat()).await;
        assert_eq!(out.status.code(), Some(64), "{why}: {}", stderr(&out));
    }
    let out = proof(
        &d,
        &[
            "--method",
            "GET",
            "--url",
            &users,
            "-c",
            "plain",
            "scim:read",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("dpop = false"), "{}", stderr(&out));
    // Another user's policy has other targets: nobody gets no proof for this API, and no token is fetched
    // for a proof that will not be given.
    let asked = s.idp.request_count();
    let out = d
        .cli(
            Some(NOBODY),
            &["proof", "--method", "GET", "--url", &users, "scim:read"],
        )
        .await;
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert_eq!(
        s.idp.request_count(),
        asked,
        "the IdP was asked for a token no proof goes with"
    );

    // The HTTP API: the same, as JSON.
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--unix-socket"])
        .arg(&d.socket)
        .args([
            "-H",
            "Credbroker-Request: true",
            "-G",
            "http://localhost/v1/proof",
        ])
        .args([
            "--data-urlencode",
            "scope=scim:read",
            "--data-urlencode",
            "client=idp",
        ])
        .args(["--data-urlencode", "method=POST"])
        .arg("--data-urlencode")
        .arg(format!("url={users}"));
    let json: serde_json::Value = serde_json::from_str(&stdout(&run_cli(cmd, None).await)).unwrap();
    assert_eq!(json["authorization"], format!("DPoP {token}"));
    // With the token's expiry, scopes and client, as /v1/token gives them.
    assert_eq!(
        (&json["client"], &json["scopes"]),
        (&serde_json::json!("idp"), &serde_json::json!(["scim:read"]))
    );
    assert!(json["expires_in"].as_u64().unwrap() > 0, "{json}");
    assert!(
        json["expires_at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    check(
        json["dpop"].as_str().unwrap(),
        "POST",
        &format!("{}/api/users", api.origin),
        Some(&token),
        None,
    )
    .unwrap();

    // The client library: a reqwest sender answers the API's nonce challenge by itself.
    let sender = DpopSender::new(
        d.client().await,
        http(),
        TokenRequest::new(["scim:read"]).client("idp"),
    );
    let response = sender
        .send(
            reqwest::Method::GET,
            &format!("{}/api/users", api.origin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut c = d.client().await;
    let p = c
        .proof(ProofRequest::new(
            TokenRequest::new(["scim:read"]).client("idp"),
            "GET",
            format!("{}/api/users", api.origin),
        ))
        .await
        .unwrap();
    assert!(format!("{p:?}").contains("[redacted]") && !format!("{p:?}").contains(&token));

    // Proofs are counted by client and outcome.
    let log = d.log();
    let metrics = log
        .split("serving metrics at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", &metrics]);
    let text = stdout(&run_cli(cmd, None).await);
    let sample = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    assert!(
        sample("credbroker_dpop_proofs_total{client=\"idp\",outcome=\"ok\"}") >= 5.0,
        "{text}"
    );
    assert!(
        sample("credbroker_dpop_proofs_total{client=\"idp\",outcome=\"permission_denied\"}") >= 3.0,
        "{text}"
    );

    // The audit log: proofs are logged once per (uid, token, target), never the token or a proof.
    let log = d.log();
    assert_eq!(log.matches("event=\"proof\"").count(), 1, "{log}");
    assert!(
        !log.contains(&token) && !log.contains(proof_jwt),
        "a credential in the log"
    );
}

#[tokio::test]
async fn a_bearer_answer_for_a_bound_client_is_never_handed_out() {
    let s = Setup::new().await;
    s.idp.set_fault(credbroker_tests::idp::Fault::IgnoreDpop);
    let d = Daemon::start(&s.dir, &dpop_config(&s, "[\"https://api.example.com/\"]")).await;
    let out = d.cli(None, &["token", "-c", "idp", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a DPoP-bound one"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn a_bound_client_needs_targets_in_every_policy_that_grants_it() {
    let s = Setup::new().await;
    let config = s.config_with("dpop = true", "");
    let out = check_config(&s.dir, &config).await;
    assert_eq!(out.status.code(), Some(64), "{}", stdout(&out));
    for key in ["policy[0].dpop_targets", "policy[1].dpop_targets"] {
        assert!(stderr(&out).contains(key), "{key}: {}", stderr(&out));
    }
    let bad = dpop_config(
        &s,
        "[\"http://api.example.com/\", \"https://a.example/?q\"]",
    );
    let out = check_config(&s.dir, &bad).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("policy[0].dpop_targets[0]"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("policy[0].dpop_targets[1]"),
        "{}",
        stderr(&out)
    );
    // A good one, shown normalized in the effective config.
    let good = dpop_config(&s, "[\"https://API.example.com:443/v1\"]");
    let out = check_config(&s.dir, &good).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("dpop_targets = [\"https://api.example.com/v1\"]"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("dpop = true"), "{}", stdout(&out));
}

#[tokio::test]
async fn oidc_provider_binds_its_jwt_access_tokens_to_the_daemons_key() {
    let resource = "https://api.example.com";
    let op = OidcProvider::start(&serde_json::json!({
        "scopes": ["scim:read"],
        "dpop": true,
        "clients": [{
            "client_id": "bound", "auth": "client_secret_basic", "client_secret": "bound-secret",
            "scope": "scim:read", "dpop": true,
        }],
        "resources": { resource: { "scope": "scim:read" } },
    }))
    .await;
    let s = Setup::new().await;
    s.dir.write("bound.secret", "bound-secret\n", 0o600);
    // The API validates the JWT's binding itself (cnf.jkt; its signature is the IdP's business here).
    let api = ResourceServer::start(Arc::new(|t: &str| {
        let claims = t.split('.').nth(1)?;
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
        claims["cnf"]["jkt"].as_str().map(str::to_owned)
    }))
    .await;
    let config = format!(
        "version = 1\n[daemon]\nsocket = \"{socket}\"\n\n[clients.op]\ntoken_url = \"{url}\"\nallow_http = true\n\
         client_id = \"bound\"\nclient_secret = {{ file = \"{dir}/bound.secret\" }}\ndpop = true\n\
         extra_params = {{ resource = \"{resource}\" }}\n\n\
         [[policy]]\nname = \"root\"\nmatch = {{ uid = 0 }}\nclient = \"op\"\nscopes = [\"scim:read\"]\n\
         dpop_targets = [\"{api}/api/\"]\n",
        socket = s.socket().display(),
        url = op.token_url(),
        dir = s.dir.path().display(),
        api = api.origin,
    );
    let d = Daemon::start(&s.dir, &config).await;
    let url = format!("{}/api/users", api.origin);
    // The provider requires a nonce on every proof (the daemon retries once with it) and issues a JWT access
    // token bound to the daemon's key: cnf.jkt is that key's RFC 7638 thumbprint.
    let out = proof(
        &d,
        &[
            "--method",
            "GET",
            "--url",
            &url,
            "--format",
            "json",
            "scim:read",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), d.log());
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let token = json["authorization"]
        .as_str()
        .unwrap()
        .strip_prefix("DPoP ")
        .unwrap();
    let claims = jwt_part(token, 1);
    assert_eq!(claims["aud"], resource);
    let proof_jwt = json["dpop"].as_str().unwrap();
    let jwk = &jwt_part(proof_jwt, 0)["jwk"];
    assert_eq!(claims["cnf"]["jkt"], thumbprint(jwk).unwrap().as_str());
    // And the API takes it, after its own nonce challenge, from the library's sender.
    let sender = DpopSender::new(d.client().await, http(), TokenRequest::new(["scim:read"]));
    let response = sender.send(reqwest::Method::GET, &url, None).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", api.outcomes());
}
