//! Callers in other languages and unusual but valid HTTP/2 clients, unmodified: Python's grpcio with a plain
//! `unix://` channel (gRPC core sends the socket path, percent-encoded, as `:authority`), and raw HTTP/2 frames
//! with every `:authority` form a gRPC stack sends over a Unix socket (`helpers/h2client.py`).

use std::path::{Path, PathBuf};

use credbroker_tests::fixture::Setup;
use credbroker_tests::{WAIT, stderr};

/// The venv `scripts/test` makes, with the pinned `tests/python/requirements.txt`.
fn venv_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test, which creates it",
        python.display()
    );
    python
}

/// Runs a Python helper and parses the one JSON line it prints.
async fn python(python: &Path, script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = tokio::time::timeout(
        WAIT * 4,
        tokio::process::Command::new(python)
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the helper finished in time")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}\n{}", stderr(&out)))
}

#[tokio::test]
async fn python_grpcio_with_a_plain_unix_channel_gets_tokens_whoami_health_and_reflection() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    // 1000 calls on the one channel: gRPC core indexes its headers, so HPACK state must hold throughout.
    let r = python(
        &venv_python(),
        "python/grpc_client.py",
        &[d.socket.as_os_str(), proto.as_os_str(), "1000".as_ref()],
    )
    .await;
    assert_eq!(r["token"]["calls"], 1000, "{r}");
    assert_eq!(r["token"]["distinct"], 1, "{r}");
    assert_eq!(
        r["token"]["token"],
        s.idp.issued_tokens()[0].as_str(),
        "{r}"
    );
    assert_eq!(r["token"]["client"], "idp", "{r}");
    assert_eq!(
        r["token"]["scopes"],
        serde_json::json!(["scim:read"]),
        "{r}"
    );
    assert_eq!(r["denied"], "PERMISSION_DENIED", "{r}");
    assert_eq!(r["whoami"]["uid"], 0, "{r}");
    assert_eq!(r["whoami"]["self"], true, "{r}");
    assert_eq!(
        r["whoami"]["grants"]["idp"],
        serde_json::json!(["scim:*", "internal_user_mgt_*"]),
        "{r}"
    );
    assert_eq!(r["health"], "SERVING", "{r}");
    for service in [
        "credbroker.v1.TokenBroker",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            r["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == service),
            "{service} missing: {r}"
        );
    }
    assert_eq!(s.idp.request_count(), 1);
}

#[tokio::test]
async fn every_authority_a_grpc_stack_sends_over_a_unix_socket_is_served() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let py = Path::new("/usr/bin/python3");
    for form in ["path", "encoded", "encoded-relative", "localhost", "none"] {
        let r = python(
            py,
            "helpers/h2client.py",
            &[d.socket.as_os_str(), "authority".as_ref(), form.as_ref()],
        )
        .await;
        assert_eq!(r["result"], "granted", ":authority {form}: {r}");
    }
    // Anything else that is malformed is still refused, the stream reset, the daemon none the worse.
    let r = python(
        py,
        "helpers/h2client.py",
        &[
            d.socket.as_os_str(),
            "authority".as_ref(),
            "bad host!".as_ref(),
        ],
    )
    .await;
    assert_eq!(r["result"], "reset", "{r}");
    assert!(d.log().contains("malformed authority"), "{}", d.log());
}

#[tokio::test]
async fn a_thousand_calls_on_one_connection_with_indexed_headers_and_continuation_frames() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let r = python(
        Path::new("/usr/bin/python3"),
        "helpers/h2client.py",
        &[d.socket.as_os_str(), "indexed".as_ref(), "1000".as_ref()],
    )
    .await;
    assert_eq!(r["results"], serde_json::json!({ "granted": 1000 }), "{r}");
}

/// Runs an example from `examples/` against the daemon as a new user would: from the checkout, with
/// `CREDBROKER_SOCKET` only (the proto is found in the checkout, Node's packages in `examples/node_modules`).
async fn run_example(program: &Path, args: &[&str], socket: &Path) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(program)
            .args(args)
            .env("CREDBROKER_SOCKET", socket)
            .env_remove("CREDBROKER_PROTO")
            .env_remove("NODE_PATH")
            .current_dir(&root)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the example finished in time")
    .unwrap()
}

/// [`run_example`], which must succeed; what it printed.
async fn example(program: &Path, args: &[&str], socket: &Path) -> String {
    let out = run_example(program, args, socket).await;
    assert_eq!(out.status.code(), Some(0), "{:?}: {}", args, stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn the_examples_get_the_token_none_of_them_setting_an_authority() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let python = venv_python();
    let node = Path::new("node");
    let shell = Path::new("sh");
    let runs: [(&Path, &str); 4] = [
        (&python, "examples/python_grpc.py"),
        (&python, "examples/python_httpx.py"),
        (node, "examples/node_grpc.js"),
        (shell, "examples/curl.sh"),
    ];
    for (program, script) in runs {
        let got = example(
            program,
            &[script, "scim:read", "internal_user_mgt_view"],
            &d.socket,
        )
        .await;
        assert_eq!(got, s.idp.issued_tokens()[0], "{script}");
    }
    assert_eq!(s.idp.request_count(), 1);
    // None of them sets an authority (or a channel option to the same end).
    for (_, script) in runs {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(script),
        )
        .unwrap();
        assert!(!text.contains("authority"), "{script} sets an authority");
    }
}

#[tokio::test]
async fn node_grpc_js_reports_a_denial_with_its_status() {
    let s = Setup::new().await;
    let d = s.daemon().await;
    let out = run_example(
        Path::new("node"),
        &["examples/node_grpc.js", "openid"],
        &d.socket,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );
}
