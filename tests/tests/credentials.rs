//! Credentials beyond one static secret: files read again when they change (no reload), several secrets tried
//! in order, and federated client assertions (RFC 7523) picked up as their files rotate. The real daemon
//! against the stand-in IdP, which records what it receives.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credbroker_tests::fixture::{SECRET, Setup};
use credbroker_tests::{Daemon, check_config, stderr, stdout, token_text};

/// Replaces a file the way config management and agents do: a new file renamed over the old one.
fn replace(path: &Path, content: &str, mode: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The audit log's `credential` of the grants, in order.
fn credentials_granted(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("event=\"grant\""))
        .filter_map(|l| l.split("credential=\"").nth(1))
        .map(|c| c.split('"').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_at_once_without_a_reload() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let mut c = d.client().await;
    let cached = token_text(&mut c, &["scim:read"]).await;

    // Rotated by a rename (a new inode), at the IdP and in the file: the next fetch reads it again.
    let secret_file = s.dir.path().join("idp.secret");
    s.idp.set_secret("broker", "rotated-by-rename");
    replace(&secret_file, "rotated-by-rename\n", 0o600);
    token_text(&mut c, &["scim:write"]).await;
    // Rewritten in place (same inode, new size and times): read again too.
    s.idp.set_secret("broker", "rewritten-in-place-longer");
    std::fs::write(&secret_file, "rewritten-in-place-longer\n").unwrap();
    token_text(&mut c, &["scim:read", "scim:write"]).await;
    assert_eq!(s.idp.request_count(), 3, "no refusal on the way");
    // The cached token stays: it was valid when issued.
    assert_eq!(token_text(&mut c, &["scim:read"]).await, cached);

    let log = d.log();
    let changes = log
        .lines()
        .filter(|l| l.contains("credential file changed; read again"))
        .collect::<Vec<_>>();
    assert_eq!(changes.len(), 2, "{log}");
    assert!(
        changes[0].contains(&secret_file.display().to_string()),
        "{log}"
    );
    for secret in [SECRET, "rotated-by-rename", "rewritten-in-place-longer"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    assert!(!log.contains("config reloaded"), "no reload happened");
}

#[tokio::test]
async fn several_secrets_are_tried_in_order_and_the_one_that_works_is_kept() {
    let s = Setup::new().await;
    let next = s.dir.write("next.secret", "next-secret\n", 0o600);
    let old = s.dir.path().join("idp.secret");
    let config = s.config().replace(
        &format!("client_secret = {{ file = \"{}\" }}", old.display()),
        &format!(
            "client_secret = [{{ file = \"{}\" }}, {{ file = \"{}\" }}]",
            next.display(),
            old.display()
        ),
    );
    assert_ne!(config, s.config());
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;

    // The IdP knows the old secret only: the new one is refused, the old one serves at once.
    let read = token_text(&mut c, &["scim:read"]).await;
    assert_eq!(s.idp.request_count(), 2);
    // Then the old one is tried first.
    token_text(&mut c, &["scim:write"]).await;
    assert_eq!(s.idp.request_count(), 3);
    // The IdP moves to the new secret: the old one is refused, the new one serves and is kept.
    s.idp.set_secret("broker", "next-secret");
    token_text(&mut c, &["internal_user_mgt_view"]).await;
    assert_eq!(s.idp.request_count(), 5);
    token_text(&mut c, &["internal_user_mgt_list"]).await;
    assert_eq!(s.idp.request_count(), 6);
    let granted = credentials_granted(&d.log());
    let (old, next) = (
        format!("file {}", old.display()),
        format!("file {}", next.display()),
    );
    assert_eq!(
        granted,
        [&old, &old, &next, &next].map(String::clone),
        "the audit log names the secret that served"
    );

    // Every secret refused: the caller is told (an operator must act), after one request per secret, and
    // the cached token keeps being served.
    s.idp.set_secret("broker", "neither");
    let out = d
        .cli(None, &["token", "scim:read", "internal_user_mgt_view"])
        .await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid_client"), "{}", stderr(&out));
    assert_eq!(s.idp.request_count(), 8);
    assert_eq!(token_text(&mut c, &["scim:read"]).await, read);
}

/// A JWT as another issuer would mint it (the stand-in does not check the signature).
fn jwt(exp: SystemTime, subject: &str) -> String {
    let exp = exp.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "iss": "https://cluster.example", "sub": subject, "aud": "broker", "exp": exp,
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A Kubernetes-style projected volume: `token -> ..data/token`, `..data -> ..VERSION`, written by the
/// agent's uid. Switching `..data` to a new version rotates the token.
struct Projected {
    dir: std::path::PathBuf,
}

impl Projected {
    fn new(root: &Path) -> Self {
        let dir = root.join("projected");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
        Self { dir }
    }

    fn token(&self) -> std::path::PathBuf {
        self.dir.join("token")
    }

    /// Publishes `content` as version `version`, owned by the agent (uid 65534), mode 0640.
    fn publish(&self, version: &str, content: &str) {
        let v = self.dir.join(format!("..{version}"));
        std::fs::create_dir(&v).unwrap();
        let file = v.join("token");
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn assertion_config(s: &Setup, file: &Path) -> String {
    let secret_line = format!(
        "client_secret = {{ file = \"{}\" }}",
        s.dir.path().join("idp.secret").display()
    );
    let config = s.config().replace(
        &secret_line,
        &format!(
            "auth_method = \"client_assertion\"\nclient_assertion = {{ file = \"{}\" }}",
            file.display()
        ),
    );
    assert_ne!(config, s.config());
    config
}

#[tokio::test]
async fn a_federated_assertion_is_sent_as_it_is_and_picked_up_when_it_rotates() {
    let s = Setup::new().await;
    let hour = SystemTime::now() + Duration::from_secs(3600);
    let (first, second) = (jwt(hour, "first"), jwt(hour, "second"));
    let projected = Projected::new(s.dir.path());
    projected.publish("v1", &format!("{first}\n"));
    s.idp.set_secret("broker", &first);
    let d = Daemon::start(&s.dir, &assertion_config(&s, &projected.token())).await;
    let mut c = d.client().await;

    token_text(&mut c, &["scim:read"]).await;
    let sent = s.idp.requests().pop().unwrap();
    assert_eq!(sent.auth, "assertion");
    assert_eq!(sent.client_id, "broker");
    let param = |k: &str| {
        sent.params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        param("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(param("client_assertion").as_deref(), Some(first.as_str()));

    // The agent rotates it: the next fetch sends the new one, with no reload.
    projected.publish("v2", &second);
    s.idp.set_secret("broker", &second);
    token_text(&mut c, &["scim:write"]).await;
    let sent = s.idp.requests().pop().unwrap();
    assert!(
        sent.params
            .contains(&("client_assertion".to_owned(), second.clone())),
        "{sent:?}"
    );

    // An expired assertion is not sent: FAILED_PRECONDITION (exit 78) naming the file and the time; the IdP
    // is not asked, and the cached tokens keep being served.
    let asked = s.idp.request_count();
    projected.publish(
        "v3",
        &jwt(SystemTime::now() - Duration::from_secs(10), "old"),
    );
    let out = d.cli(None, &["token", "internal_user_mgt_view"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("expired at") && err.contains("projected/token"),
        "{err}"
    );
    assert_eq!(s.idp.request_count(), asked);
    let out = d.cli(None, &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The assertion is a credential: never in the log.
    let log = d.log();
    for secret in [&first, &second] {
        assert!(!log.contains(secret.as_str()), "assertion in the log");
    }
}

#[tokio::test]
async fn bad_assertion_files_are_refused_with_their_key() {
    let s = Setup::new().await;
    let hour = SystemTime::now() + Duration::from_secs(3600);
    let key = "clients.idp.client_assertion";
    for (name, content, mode, why) in [
        ("not-a-jwt", "hello".to_owned(), 0o600, "not a JWT"),
        ("empty", "\n".to_owned(), 0o600, "is empty"),
        (
            "expired",
            jwt(SystemTime::now() - Duration::from_secs(60), "x"),
            0o600,
            "expired at",
        ),
        ("writable", jwt(hour, "x"), 0o602, "writable by every user"),
        ("readable", jwt(hour, "x"), 0o644, "readable by every user"),
    ] {
        let file = s.dir.write(name, &content, mode);
        let out = check_config(&s.dir, &assertion_config(&s, &file)).await;
        assert_eq!(out.status.code(), Some(64), "{name}: {}", stdout(&out));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(text.contains(key) && text.contains(why), "{name}: {text}");
    }
    let missing = s.dir.path().join("missing");
    let out = check_config(&s.dir, &assertion_config(&s, &missing)).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

/// A CA and a certificate it issued for 127.0.0.1 and localhost: (CA PEM, server chain PEM, server key PEM).
fn private_ca() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "credbroker test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
    (ca.pem(), server.pem(), key.serialize_pem())
}

#[tokio::test]
async fn a_private_ca_is_trusted_for_its_client_only_when_configured() {
    let s = Setup::new().await;
    let (ca, chain, key) = private_ca();
    let idp = credbroker_tests::idp::StandInIdp::start_tls(
        vec![credbroker_tests::idp::Registration {
            id: "broker".into(),
            secret: SECRET.into(),
            scopes: vec!["scim:read".into(), "scim:write".into()],
        }],
        &chain,
        &key,
    )
    .await;
    assert!(idp.token_url().starts_with("https://127.0.0.1:"));
    let ca_file = s.dir.write("private-ca.pem", &ca, 0o644);
    let https = |extra: &str| {
        s.config()
            .replace(&s.idp.token_url(), &idp.token_url())
            .replace("allow_http = true\n", extra)
    };

    // Without the CA: the IdP's certificate is not trusted, and the broker says so.
    let d = Daemon::start(&s.dir, &https("")).await;
    let out = d.cli(None, &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        d.log().to_lowercase().contains("certificate"),
        "{}",
        d.log()
    );
    assert_eq!(idp.request_count(), 0);
    drop(d);

    // With it, beside the system's roots, and instead of them.
    for extra in [
        format!("ca_certificates = {{ file = \"{}\" }}\n", ca_file.display()),
        format!(
            "ca_certificates = {{ file = \"{}\" }}\nsystem_roots = false\n",
            ca_file.display()
        ),
    ] {
        let d = Daemon::start(&s.dir, &https(&extra)).await;
        let out = d.cli(None, &["token", "scim:read"]).await;
        assert_eq!(out.status.code(), Some(0), "{extra}: {}", stderr(&out));
    }
    assert_eq!(idp.request_count(), 2);

    // A bundle without certificates, or one others may write, is refused with its key.
    let key = "clients.idp.ca_certificates";
    for (name, content, mode, why) in [
        (
            "empty-ca.pem",
            "no certificates here\n".to_owned(),
            0o644,
            "holds no certificate",
        ),
        ("open-ca.pem", ca.clone(), 0o664, "writable by other users"),
    ] {
        let file = s.dir.write(name, &content, mode);
        let extra = format!("ca_certificates = {{ file = \"{}\" }}\n", file.display());
        let out = check_config(&s.dir, &https(&extra)).await;
        assert_eq!(out.status.code(), Some(64), "{name}");
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(text.contains(key) && text.contains(why), "{name}: {text}");
    }
    let out = check_config(&s.dir, &https("system_roots = false\n")).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("clients.idp.system_roots"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn private_key_jwt_with_a_certificate_carries_its_thumbprint_and_must_match_it() {
    let s = Setup::new().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["broker".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_file = s.dir.write("broker.key", &key.serialize_pem(), 0o600);
    let cert_file = s.dir.write("broker.crt", &cert.pem(), 0o644);
    let secret_line = format!(
        "client_secret = {{ file = \"{}\" }}",
        s.dir.path().join("idp.secret").display()
    );
    let config = |cert_file: &Path| {
        s.config().replace(
            &secret_line,
            &format!(
                "auth_method = \"private_key_jwt\"\nprivate_key = {{ file = \"{}\" }}\n\
                 certificate = {{ file = \"{}\" }}\ncertificate_sha1 = true",
                key_file.display(),
                cert_file.display()
            ),
        )
    };
    let d = Daemon::start(&s.dir, &config(&cert_file)).await;
    // The stand-in does not verify signatures (oidc-provider does, in the interop suite): it refuses, and
    // records what it received.
    let out = d.cli(None, &["token", "scim:read"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let sent = s.idp.requests().pop().unwrap();
    let assertion = sent
        .params
        .iter()
        .find(|(k, _)| k == "client_assertion")
        .map(|(_, v)| v.clone())
        .expect("a client assertion");
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(assertion.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let sha256 = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert.der()));
    let sha1 = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        cert.der(),
    ));
    assert_eq!(header["x5t#S256"], sha256.as_str(), "{header}");
    assert_eq!(header["x5t"], sha1.as_str(), "{header}");
    assert_eq!(header["alg"], "ES256", "{header}");

    // Another key's certificate is a config error, naming the key path.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_cert = rcgen::CertificateParams::new(vec!["other".to_owned()])
        .unwrap()
        .self_signed(&other)
        .unwrap();
    let other_file = s.dir.write("other.crt", &other_cert.pem(), 0o644);
    let out = check_config(&s.dir, &config(&other_file)).await;
    assert_eq!(out.status.code(), Some(64));
    let text = stderr(&out);
    assert!(
        text.contains("clients.idp.certificate") && text.contains("does not match"),
        "{text}"
    );
}

/// A directory owned by `uid` (mode 0755) under `root`.
fn dir_of(root: &Path, name: &str, uid: u32) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
    dir
}

/// Writes `content` to `path`, owned by `uid`, mode 0600.
fn file_of(path: &Path, content: &str, uid: u32) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

#[tokio::test]
async fn an_agent_cannot_make_the_daemon_read_what_it_could_not_read_itself() {
    let (agent, victim) = (12346, 12347);
    let s = Setup::new().await;
    let hour = SystemTime::now() + Duration::from_secs(3600);
    let (own, theirs) = (jwt(hour, "agent"), jwt(hour, "victim"));
    let agent_dir = dir_of(s.dir.path(), "agent", agent);
    let victim_dir = dir_of(s.dir.path(), "victim", victim);
    file_of(&agent_dir.join("jwt.real"), &own, agent);
    file_of(&victim_dir.join("jwt"), &theirs, victim);
    let root_owned = s.dir.path().join("root-owned.jwt");
    file_of(&root_owned, &theirs, 0);
    let link = agent_dir.join("jwt");
    std::os::unix::fs::symlink(agent_dir.join("jwt.real"), &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(agent), Some(agent)).unwrap();
    let config = assertion_config(&s, &link);

    // The agent's link to its own file: fine.
    let out = check_config(&s.dir, &config).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Pointed at another user's file, root's files, another client's secret, the daemon's environment, or
    // nothing at all: refused alike, without telling whether the target exists.
    let mut errors = Vec::new();
    for target in [
        victim_dir.join("jwt"),
        std::path::PathBuf::from("/etc/shadow"),
        root_owned.clone(),
        s.dir.path().join("idp.secret"),
        std::path::PathBuf::from("/proc/1/environ"),
        victim_dir.join("missing"),
    ] {
        let relinked = agent_dir.join("jwt.new");
        std::os::unix::fs::symlink(&target, &relinked).unwrap();
        std::fs::rename(&relinked, &link).unwrap();
        let out = check_config(&s.dir, &config).await;
        assert_eq!(
            out.status.code(),
            Some(64),
            "{}: {}",
            target.display(),
            stdout(&out)
        );
        let err = stderr(&out);
        assert!(err.contains("clients.idp.client_assertion"), "{err}");
        assert!(
            err.contains(&format!("uid {agent} can change where it leads")),
            "{err}"
        );
        errors.push(err);
    }
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:#?}");

    // At fetch time too: the daemon reads the assertion again before each fetch, and a link switched to the
    // victim's file is not followed. The IdP never sees the victim's assertion.
    let relinked = agent_dir.join("jwt.new");
    std::os::unix::fs::symlink(agent_dir.join("jwt.real"), &relinked).unwrap();
    std::fs::rename(&relinked, &link).unwrap();
    s.idp.set_secret("broker", &own);
    let d = Daemon::start(&s.dir, &config).await;
    let mut c = d.client().await;
    token_text(&mut c, &["scim:read"]).await;
    let relinked = agent_dir.join("jwt.new");
    std::os::unix::fs::symlink(victim_dir.join("jwt"), &relinked).unwrap();
    std::fs::rename(&relinked, &link).unwrap();
    let out = d.cli(None, &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        !s.idp.requests().iter().any(|r| r
            .params
            .contains(&("client_assertion".to_owned(), theirs.clone()))),
        "the IdP received the victim's assertion"
    );
}
