//! What the IdPs send back: a token response or an error body with its status and headers, `Retry-After`,
//! and a discovery document. Input: 2 bytes of status, then `Retry-After`, `Content-Type` and the scope asked
//! for as lines, then the body.
//!
//! Properties: a token is accepted only with a non-empty access token no wider than asked (least privilege) and
//! a lifetime within bounds; no error shows the credential the request carried, even when the body echoes it;
//! a discovered endpoint is https (http only where allowed).
#![no_main]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credbroker_daemon::policy::scope::ScopeSet;
use credbroker_daemon::secret::{FileKind, Rotating, SecretEnv, SecretSource};
use credbroker_daemon::tokens::client::{BasicEncoding, ClientAuth, ClientConfig, Secrets};
use credbroker_daemon::tokens::upstream::{
    Answer, MAX_LIFETIME, discovery_document, parse_retry_after,
};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

const SECRET: &str = "s3cr3t-the-idp-must-not-echo";

fn client() -> &'static ClientConfig {
    static CLIENT: std::sync::OnceLock<ClientConfig> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let offline = |_: &SecretSource| Some(SECRET.to_owned());
        let env = SecretEnv {
            credentials_dir: None,
            var: &|_| None,
            offline: Some(&offline),
        };
        let secret =
            Rotating::load(SecretSource::Env("S".into()), FileKind::Secret, &env, Ok).unwrap();
        ClientConfig {
            name: "idp".into(),
            token_url: Some("https://idp.example/token".parse().unwrap()),
            issuer: None,
            allow_http: false,
            client_id: "broker".into(),
            auth: ClientAuth::Basic {
                secrets: Secrets::new(vec![secret]),
                encoding: BasicEncoding::Form,
            },
            extra_params: Vec::new(),
            default_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            tls_roots: None,
            dpop: false,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let rest = &data[2..];
    let mut parts = rest.splitn(4, |b| *b == b'\n');
    let retry_after = parts
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned());
    let content_type = parts
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let asked = parts
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let body = parts.next().unwrap_or(b"");
    let Ok(scopes) = ScopeSet::parse(&asked.split(' ').collect::<Vec<_>>()) else {
        return;
    };
    let now = SystemTime::now();
    if let Some(v) = &retry_after {
        let _ = parse_retry_after(v, now);
    }
    let sensitive = vec![zeroize::Zeroizing::new(SECRET.to_owned())];
    let answer = Answer {
        status,
        retry_after: retry_after.as_deref(),
        content_type: &content_type,
        body,
    };
    match answer.interpret(
        client(),
        &scopes,
        tokio::time::Instant::now(),
        now,
        &sensitive,
    ) {
        Ok(issued) => {
            assert!((200..300).contains(&status));
            assert!(!issued.access_token.expose_secret().is_empty());
            assert!(issued.lifetime > Duration::ZERO && issued.lifetime <= MAX_LIFETIME);
            assert!(
                issued.granted.iter().all(|s| scopes.contains(s)),
                "granted more than asked"
            );
        }
        Err(e) => {
            assert!(
                !e.to_string().contains(SECRET),
                "the secret in an error: {e}"
            );
            assert!(!format!("{e:?}").contains(SECRET), "the secret in Debug");
        }
    }
    for allow_http in [false, true] {
        if let Ok(url) = discovery_document(
            body,
            "https://idp.example/.well-known/openid-configuration",
            "https://idp.example",
            allow_http,
        ) {
            assert!(
                url.scheme() == "https" || (allow_http && url.scheme() == "http"),
                "{url}"
            );
        }
    }
    let _ = Arc::new(());
});
