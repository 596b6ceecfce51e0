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
            { "client_id": "cb-ps256", "auth": "private_key_jwt", "alg": "PS256", "scope": "scim:read scim:write" },
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
        // PS256 with the key's certificate, as Entra ID's certificate credentials: x5t#S256 in the header.
        let (ps_pem, ps_kid) = &op.keys["cb-ps256"];
        let ps = dir.write("ps256.pem", ps_pem, 0o600);
        let ps_key =
            rcgen::KeyPair::from_pem_and_sign_algo(ps_pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        let ps_cert = rcgen::CertificateParams::new(vec!["cb-ps256".to_owned()])
            .unwrap()
            .self_signed(&ps_key)
            .unwrap();
        let ps_crt = dir.write("ps256.crt", &ps_cert.pem(), 0o644);
        let (ps, ps_crt) = (ps.display(), ps_crt.display());
        // A client assertion minted elsewhere (here with cb-rs256's key), sent as it is by a client_assertion
        // client: the wire format oidc-provider checks like any private_key_jwt assertion.
        let federated = dir.write(
            "federated.jwt",
            &mint_assertion(rs_pem, "cb-rs256", &op.token_url()),
            0o600,
        );
        let federated = federated.display();
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

[clients.ps256]
token_url = "{t}"
client_id = "cb-ps256"
allow_http = true
auth_method = "private_key_jwt"
private_key = {{ file = "{ps}" }}
certificate = {{ file = "{ps_crt}" }}
key_id = "{ps_kid}"

[clients.federated]
token_url = "{t}"
client_id = "cb-rs256"
allow_http = true
auth_method = "client_assertion"
client_assertion = {{ file = "{federated}" }}

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
client = ["basic", "post", "es256", "rs256", "ps256", "federated", "api", "discovered", "wrong", "mismatch"]
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

/// An RS256 client assertion for `client_id` at `audience`, valid five minutes, signed with `pem`.
fn mint_assertion(pem: &str, client_id: &str, audience: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": audience, "iat": now, "exp": now + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
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
async fn private_key_jwt_es256_rs256_and_ps256_with_a_certificate_with_a_fresh_jti_per_assertion() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    // oidc-provider refuses a reused jti: two fetches per key prove each assertion is fresh. The ES256
    // client finds its endpoint by discovery and sends a kid; the RS256 one addresses the issuer; the PS256 one
    // signs with RSA-PSS, its certificate's thumbprint in the header, which oidc-provider accepts.
    for client in ["es256", "rs256", "ps256"] {
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

#[tokio::test]
async fn a_federated_client_assertion_is_accepted_by_oidc_provider() {
    let it = Interop::start().await;
    let mut c = it.client().await;
    token(&mut c, "federated", &["scim:read"])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", it.daemon.log()));
    // The same assertion again: oidc-provider refuses a replayed jti, as it should; the broker reports the
    // refusal (an operator must give it a fresh assertion).
    let again = token(&mut c, "federated", &["scim:write"])
        .await
        .unwrap_err();
    assert!(again.needs_operator(), "{again}");
    let _ = &it.dir;
}
