//! A real OpenID Provider for interop tests: panva's `oidc-provider` (npm, pinned in `tests/oidc/`), run with
//! Node.js on 127.0.0.1. `npm ci --prefix tests/oidc` installs it; `scripts/test` does that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::WAIT;

/// A running provider, killed on drop.
pub struct OidcProvider {
    _child: Child,
    /// Its issuer identifier, `http://127.0.0.1:PORT` (the token endpoint is `<issuer>/token`).
    pub issuer: String,
    /// For each `private_key_jwt` client: its PKCS#8 PEM private key and key id.
    pub keys: HashMap<String, (String, String)>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

impl OidcProvider {
    /// Starts a provider configured by `spec` (see `tests/oidc/provider.js`).
    ///
    /// # Panics
    /// If Node.js or the npm packages are missing, or it does not start within [`WAIT`].
    pub async fn start(spec: &serde_json::Value) -> Self {
        assert!(
            dir().join("node_modules/oidc-provider").exists(),
            "oidc-provider is not installed: run npm ci --prefix tests/oidc (scripts/test does)"
        );
        let mut child = Command::new("node")
            .arg(dir().join("provider.js"))
            .arg(spec.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run node (Node.js is needed for the interop tests)");
        let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        tokio::time::timeout(WAIT, out.read_line(&mut line))
            .await
            .expect("oidc-provider did not start in time")
            .expect("read oidc-provider's first line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let keys = v["keys"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, k)| {
                        let pem = k["pem"].as_str().unwrap_or_default().to_owned();
                        (
                            id.clone(),
                            (pem, k["kid"].as_str().unwrap_or_default().to_owned()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            _child: child,
            issuer: v["issuer"].as_str().expect("issuer").to_owned(),
            keys,
        }
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }
}
