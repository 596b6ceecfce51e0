//! Running under systemd: the units pass `systemd-analyze`, socket activation through
//! `systemd-socket-activate`, readiness and watchdog notifications, reload on SIGHUP, graceful shutdown,
//! health and reflection, JSON logs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use credbroker_client::secrecy::ExposeSecret;
use credbroker_tests::fixture::{NOBODY, SECRET, Setup};
use credbroker_tests::idp::Fault;
use credbroker_tests::{Daemon, DaemonOptions, WAIT, bin, run_cli, stderr, uds_channel, wait_for};
use tokio::io::AsyncBufReadExt;

fn units() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

async fn analyze(args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("systemd-analyze");
    cmd.args(args);
    run_cli(cmd, None).await
}

#[tokio::test]
async fn the_service_unit_is_hardened_to_an_exposure_of_at_most_1_5() {
    let unit = units().join("credbroker.service");
    let out = analyze(&["security", "--offline=yes", unit.to_str().unwrap()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for credbroker.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}\n{}", stderr(&out)));
    assert!(level <= 1.5, "exposure {level}:\n{text}");
}

#[tokio::test]
async fn the_units_and_the_drop_in_verify_cleanly() {
    // A root with the daemon installed where the unit says, and the host's system units.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in [
        "usr/bin",
        "bin",
        "etc/systemd/system/credbroker.service.d",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::copy(bin("credbrokerd"), r.join("usr/bin/credbrokerd")).unwrap();
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
    for unit in ["credbroker.service", "credbroker.socket"] {
        std::fs::copy(units().join(unit), r.join("etc/systemd/system").join(unit)).unwrap();
    }
    let service = r.join("etc/systemd/system/credbroker.service");
    let socket = r.join("etc/systemd/system/credbroker.socket");
    let root_arg = format!("--root={}", r.display());
    let verify = |extra: &'static str| {
        let (root_arg, service, socket) = (root_arg.clone(), service.clone(), socket.clone());
        async move {
            // (--man=no: the units name credbrokerd(8), which the package installs; this root has no man pages.)
            let out = analyze(&[
                "verify",
                "--man=no",
                &root_arg,
                service.to_str().unwrap(),
                socket.to_str().unwrap(),
            ])
            .await;
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{extra}: {}",
                stderr(&out)
            );
        }
    };
    verify("units").await;
    std::fs::copy(
        units().join("credbroker-exe-matching.conf"),
        r.join("etc/systemd/system/credbroker.service.d/exe-matching.conf"),
    )
    .unwrap();
    verify("with the exe-matching drop-in").await;
}

#[tokio::test]
async fn the_example_config_is_valid_with_its_systemd_credential() {
    let creds = tempfile::tempdir().unwrap();
    // As systemd loads /etc/credbroker/credentials/asgardeo through the unit's LoadCredential=credbroker:…
    let secret = creds.path().join("credbroker_asgardeo");
    std::fs::write(&secret, "example-secret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    let mut cmd = tokio::process::Command::new(bin("credbrokerd"));
    cmd.arg("check-config")
        .arg("--config")
        .arg(units().join("credbroker.toml"))
        .env("CREDENTIALS_DIRECTORY", creds.path());
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("client_secret = { credential = \"asgardeo\" }"),
        "{summary}"
    );
    assert!(!summary.contains("example-secret"));
}

#[tokio::test]
async fn socket_activation_serves_the_socket_systemd_passes_and_leaves_it_to_systemd() {
    let s = Setup::new().await;
    let activated = s.dir.path().join("activated.sock");
    // The config names another socket: the daemon must serve the one it is given and bind nothing.
    let config_path = s.dir.write("credbroker.toml", &s.config(), 0o644);
    let log = std::fs::File::create(s.dir.path().join("daemon.log")).unwrap();
    let mut activate = tokio::process::Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&activated)
        .args(["-E", "CREDBROKER_LOG=debug", "-E", "NO_COLOR=1"])
        .arg(bin("credbrokerd"))
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // systemd-socket-activate says when it listens; the daemon starts on the first connection.
    let mut err = tokio::io::BufReader::new(activate.stderr.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(WAIT, err.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("Listening on"), "{line}");
    // From here on the daemon's stderr goes to the log file.
    let mut log = tokio::fs::File::from_std(log);
    let copier = tokio::spawn(async move { tokio::io::copy(&mut err, &mut log).await });

    let mut c = credbroker_client::Client::connect(&activated)
        .await
        .unwrap();
    let t = c.token(["scim:read"]).await.unwrap();
    assert_eq!(t.access_token().expose_secret(), s.idp.issued_tokens()[0]);
    assert!(
        !s.socket().exists(),
        "the daemon bound its configured socket too"
    );

    let pid = activate.id().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(WAIT, activate.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        activated.exists(),
        "the daemon removed a socket systemd owns"
    );
    let _ = tokio::time::timeout(WAIT, copier).await;
    let log = std::fs::read_to_string(s.dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("serving the socket systemd passed"), "{log}");
}

#[tokio::test]
async fn readiness_status_and_watchdog_go_to_the_notify_socket() {
    let s = Setup::new().await;
    let opts = DaemonOptions {
        env: vec![("WATCHDOG_USEC".into(), "200000".into())],
        ..DaemonOptions::default()
    };
    // start_with returns once READY=1 arrived.
    let d = Daemon::start_with(&s.dir, &s.config(), opts).await;
    d.wait_notification("WATCHDOG=1").await;
    d.wait_notification("WATCHDOG=1").await;
    d.signal("TERM");
    let msg = d.wait_notification("STOPPING=1").await;
    assert!(msg.contains("STATUS=shutting down"), "{msg}");
}

#[tokio::test]
async fn sighup_applies_a_new_policy_refuses_a_broken_config_and_uses_a_rotated_secret() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let config_path = s.dir.path().join("credbroker.toml");
    let mut root = d.client().await;
    let cached = root.token(["scim:read"]).await.unwrap();

    // nobody may not have scim:write...
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(77));
    // ...until the policy says so.
    let widened = s.config().replace(
        "name = \"nobody-read\"\nmatch = { user = \"nobody\" }\nclient = \"idp\"\nscopes = [\"scim:read\"]",
        "name = \"nobody-read\"\nmatch = { user = \"nobody\" }\nclient = \"idp\"\nscopes = [\"scim:read\", \"scim:write\"]",
    );
    assert_ne!(widened, s.config());
    std::fs::write(&config_path, &widened).unwrap();
    d.signal("HUP");
    d.wait_notification("RELOADING=1").await;
    d.wait_notification("READY=1").await;
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The client did not change: its cached token survived the reload.
    let again = root.token(["scim:read"]).await.unwrap();
    assert_eq!(
        again.access_token().expose_secret(),
        cached.access_token().expose_secret()
    );
    let fetched = s.idp.request_count();

    // A broken config is refused, every error logged, and the running config keeps serving.
    std::fs::write(
        &config_path,
        "version = 1\n[daemon]\nbogus = true\n[clients.idp]\ntoken_url = 7\n",
    )
    .unwrap();
    d.signal("HUP");
    let msg = d.wait_notification("READY=1").await;
    assert!(msg.contains("reload refused"), "{msg}");
    let log = d.log();
    assert!(
        log.contains("daemon.bogus") && log.contains("clients.idp.token_url"),
        "{log}"
    );
    assert!(log.contains("still serving the previous config"), "{log}");
    let out = d.cli(Some(NOBODY), &["token", "scim:write"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Rotate the secret, at the IdP and in the file, and reload. Cached tokens stay (they were valid when
    // issued, and dropping them would revoke nothing); the next fetch uses the new secret.
    let rotated = "rotated+secret:2";
    s.idp.set_secret("broker", rotated);
    s.dir.write("idp.secret", rotated, 0o600);
    std::fs::write(&config_path, &widened).unwrap();
    d.signal("HUP");
    d.wait_notification("RELOADING=1").await;
    d.wait_notification("READY=1").await;
    let kept = root.token(["scim:read"]).await.unwrap();
    assert_eq!(
        kept.access_token().expose_secret(),
        cached.access_token().expose_secret()
    );
    assert_eq!(s.idp.request_count(), fetched);
    root.token(["scim:read", "scim:write"]).await.unwrap();
    assert_eq!(s.idp.request_count(), fetched + 1);
    assert!(!d.log().contains("clients_changed=idp"), "{}", d.log());

    // Another endpoint is another upstream: the client's cached tokens go.
    let moved = widened.replace("/oauth2/token", "/oauth2/token?tenant=2");
    assert_ne!(moved, widened);
    std::fs::write(&config_path, &moved).unwrap();
    d.signal("HUP");
    d.wait_notification("RELOADING=1").await;
    d.wait_notification("READY=1").await;
    let fresh = root.token(["scim:read"]).await.unwrap();
    assert_ne!(
        fresh.access_token().expose_secret(),
        cached.access_token().expose_secret()
    );
    assert_eq!(s.idp.request_count(), fetched + 2);
    assert!(d.log().contains("clients_changed=idp"), "{}", d.log());
    assert!(!d.log().contains(rotated) && !d.log().contains(SECRET));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_call_finish_then_exits_0_and_removes_the_socket() {
    let s = Setup::new().await;
    s.idp.set_fault(Fault::Slow(Duration::from_millis(1500)));
    let d = s.daemon().await;
    let mut c = d.client().await;
    let call = tokio::spawn(async move { c.token(["scim:read"]).await });
    wait_for("the call to reach the IdP", || s.idp.arrival_count() > 0).await;
    let socket = d.socket.clone();
    let log = s.dir.path().join("daemon.log");
    let status = d.stop().await;
    let token = call.await.unwrap().unwrap();
    assert_eq!(
        token.access_token().expose_secret(),
        s.idp.issued_tokens()[0]
    );
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!socket.exists());
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("SIGTERM: shutting down")
    );
}

#[tokio::test]
async fn health_and_reflection_answer_on_the_socket() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = Setup::new().await;
    let d = s.daemon().await;
    let channel = uds_channel(&d.socket).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "credbroker.v1.TokenBroker"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"credbroker.v1.TokenBroker".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn json_logs_carry_audit_events_under_their_own_target() {
    let s = Setup::new().await;
    let config = s
        .config()
        .replace("[clients.idp]", "log_format = \"json\"\n\n[clients.idp]");
    let d = Daemon::start(&s.dir, &config).await;
    d.client().await.token(["scim:read"]).await.unwrap();
    d.client().await.token(["openid"]).await.unwrap_err();
    let log = d.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let audit: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["target"] == "credbroker::audit")
        .collect();
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "grant" && e["client"] == "idp" && e["uid"] == 0),
        "{log}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "deny" && e["requested"] == "openid"),
        "{log}"
    );
}
