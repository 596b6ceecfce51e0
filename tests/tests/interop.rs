//! Interop with a real, certified OpenID Provider nobody here wrote: panva's `oidc-provider`. Every client
//! authentication method, a secret that needs RFC 6749 §2.3.1 encoding, a resource indicator that yields a
//! JWT access token, discovery, and the IdP's refusals as the codes callers and the CLI report.

use base64::Engine as _;
use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Client, Error, TokenRequest};
use credbroker_tests::oidc::OidcProvider;
use credbroker_tests::{Daemon, TestDir};

/// Needs form-encoding inside Basic; oidc-provider decodes as RFC 6749 says.
const SECRET: &str = "p+ss:w%rd &x";
const RESOURCE: &str = "https://api.example.com";

fn spec(issuer_host: &str) -> serde_json::Value {
    serde_json::json!({
        "issuer_host": issuer_host,
        "scopes": ["scim:read", "scim:write", "api:read"],
        "clients": [
            { "client_id": "cb-basic", "auth": "client_secret_basic", "client_secret": SECRET, "scope": "scim:read scim:write" },
            { "client_id": "cb-post", "auth": "client_secret_post", "client_secret": SECRET, "scope": "scim:read scim:write" },
            { "client_id": "cb-es256", "auth": "private_key_jwt", "alg": "ES256", "scope": "scim:read scim:write" },
            { "client_id": "cb-rs256", "auth": "private_key_jwt", "alg": "RS256", "scope": "scim:read scim:write" },
            { "client_id": "cb-api", "auth": "client_secret_basic", "client_secret": SECRET, "scope": "api:read" },
        ],
        "resources": { RESOURCE: { "scope": "api:read" } },
    })
}

struct Interop {
    dir: TestDir,
    op: OidcProvider,
    daemon: Daemon,
}

impl Interop {
    async fn start() -> Self {
        let dir = TestDir::new();
        let op = OidcProvider::start(&spec("127.0.0.1")).await;
        // A second provider whose metadata names another issuer (localhost instead of 127.0.0.1).
        let secret = dir.write("op.secret", SECRET, 0o600);
        let wrong = dir.write("wrong.secret", "not-the-secret", 0o600);
        let (es_pem, es_kid) = &op.keys["cb-es256"];
        let (rs_pem, _) = &op.keys["cb-rs256"];
        let es = dir.write("es256.pem", es_pem, 0o600);
        let rs = dir.write("rs256.pem", rs_pem, 0o600);
        let t = op.token_url();
        let i = &op.issuer;
        let (secret, wrong, es, rs) = (
            secret.display(),
            wrong.display(),
            es.display(),
            rs.display(),
        );
        let config = format!(
            r#"version = 1
[daemon]
socket = "{socket}"

[clients.basic]
token_url = "{t}"
client_id = "cb-basic"
allow_http = true
client_secret = {{ file = "{secret}" }}

[clients.post]
token_url = "{t}"
client_id = "cb-post"
allow_http = true
client_secret = {{ file = "{secret}" }}
auth_method = "client_secret_post"

[clients.es256]
issuer = "{i}"
client_id = "cb-es256"
allow_http = true
auth_method = "private_key_jwt"
private_key = {{ file = "{es}" }}
key_id = "{es_kid}"

[clients.rs256]
token_url = "{t}"
issuer = "{i}"
client_id = "cb-rs256"
allow_http = true
auth_method = "private_key_jwt"
private_key = {{ file = "{rs}" }}
assertion_audience = "issuer"

[clients.api]
token_url = "{t}"
client_id = "cb-api"
allow_http = true
client_secret = {{ file = "{secret}" }}
extra_params = {{ resource = "{RESOURCE}" }}

[clients.discovered]
issuer = "{i}"
client_id = "cb-basic"
allow_http = true
client_secret = {{ file = "{secret}" }}

[clients.wrong]
token_url = "{t}"
client_id = "cb-basic"
allow_http = true
client_secret = {{ file = "{wrong}" }}

[clients.mismatch]
issuer = "{mismatch}"
client_id = "cb-basic"
allow_http = true
client_secret = {{ file = "{secret}" }}

[[policy]]
name = "root"
match = {{ uid = 0 }}
client = ["basic", "post", "es256", "rs256", "api", "discovered", "wrong", "mismatch"]
scopes = ["*"]
"#,
            socket = dir.path().join("credbroker.sock").display(),
            // Same server, named by another host: its metadata's issuer will not match.
            mismatch = i.replace("127.0.0.1", "localhost"),
        );
        let daemon = Daemon::start(&dir, &config).await;
        Self { dir, op, daemon }
    }

    async fn client(&self) -> Client {
        self.daemon.client().await
    }
}

async fn token(c: &mut Client, client: &str, scopes: &[&str]) -> Result<String, Error> {
    c.get_token(TokenRequest::new(scopes.iter().copied()).client(client))
        .await
        .map(|t| t.access_token().expose_secret().to_owned())
}

#[tokio::test]
async fn client_secret_basic_with_a_secret_that_needs_form_encoding_and_client_secret_post() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    let basic = token(&mut c, "basic", &["scim:read"]).await.unwrap();
    let post = token(&mut c, "post", &["scim:read"]).await.unwrap();
    assert!(!basic.is_empty() && basic != post);
    // Opaque tokens without a resource indicator.
    assert_eq!(basic.split('.').count(), 1, "{basic}");
}

#[tokio::test]
async fn private_key_jwt_es256_and_rs256_with_a_fresh_jti_per_assertion() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    // oidc-provider refuses a reused jti: two fetches per key prove each assertion is fresh. The ES256
    // client finds its endpoint by discovery and sends a kid; the RS256 one addresses the issuer.
    for client in ["es256", "rs256"] {
        let a = token(&mut c, client, &["scim:read"])
            .await
            .unwrap_or_else(|e| panic!("{client}: {e}\n{}", it.daemon.log()));
        let b = token(&mut c, client, &["scim:write"])
            .await
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        assert_ne!(a, b);
    }
    let log = it.daemon.log();
    assert!(
        !log.contains("BEGIN PRIVATE KEY") && !log.contains("client_assertion="),
        "{log}"
    );
    let _ = &it.dir;
}

#[tokio::test]
async fn a_resource_indicator_yields_a_jwt_access_token_for_that_audience() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    let jwt = token(&mut c, "api", &["api:read"]).await.unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {jwt}");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], RESOURCE, "{claims}");
    assert_eq!(claims["scope"], "api:read", "{claims}");
    assert_eq!(claims["client_id"], "cb-api", "{claims}");
}

#[tokio::test]
async fn discovery_finds_the_token_endpoint_and_checks_the_issuer() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    token(&mut c, "discovered", &["scim:read"]).await.unwrap();
    assert!(
        it.daemon
            .log()
            .contains(&format!("token_endpoint={}", it.op.token_url())),
        "{}",
        it.daemon.log()
    );
    let err = token(&mut c, "mismatch", &["scim:read"]).await.unwrap_err();
    assert!(err.needs_operator(), "{err}");
    assert!(
        err.to_string()
            .contains("names another issuer than the configured"),
        "{err}"
    );
}

#[tokio::test]
async fn the_idps_refusals_are_failed_precondition_with_the_oauth_code_and_cli_exit_78() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    // A scope the policy allows but the IdP does not give this client.
    let err = token(&mut c, "basic", &["api:read"]).await.unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("invalid_scope"),
        "{err}"
    );
    // A wrong secret.
    let err = token(&mut c, "wrong", &["scim:read"]).await.unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("invalid_client"),
        "{err}"
    );
    for (client, code) in [("basic", "invalid_scope"), ("wrong", "invalid_client")] {
        let scope = if client == "basic" {
            "api:read"
        } else {
            "scim:write"
        };
        let out = it.daemon.cli(None, &["token", "-c", client, scope]).await;
        assert_eq!(
            out.status.code(),
            Some(78),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains(code));
    }
    assert!(!it.daemon.log().contains(SECRET));
}
