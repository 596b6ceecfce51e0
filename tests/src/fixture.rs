//! The fixture most end-to-end tests share: a temporary directory holding a client secret, a stand-in token
//! endpoint that knows client `broker`, and a base config in which root may have `scim:*` and
//! `internal_user_mgt_*`, and user `nobody` only `scim:read`.

use std::path::PathBuf;

use crate::idp::{Registration, StandInIdp};
use crate::{Daemon, TestDir};

/// uid and gid of `nobody`.
pub const NOBODY: (u32, u32) = (65534, 65534);
/// The client secret. Needs RFC 6749 §2.3.1 form-encoding inside Basic: '+', ':', '%', ' ' and '&'.
pub const SECRET: &str = "s3cr3t+with:special%chars &more";
/// The scopes the stand-in lets `broker` have.
pub const SCOPES: [&str; 4] = [
    "scim:read",
    "scim:write",
    "internal_user_mgt_view",
    "internal_user_mgt_list",
];

/// See the module docs.
pub struct Setup {
    /// The test's directory: config, secret, socket, logs.
    pub dir: TestDir,
    /// The stand-in token endpoint, with client `broker` allowed [`SCOPES`].
    pub idp: StandInIdp,
}

impl Setup {
    /// A directory with the secret file and a running stand-in endpoint.
    pub async fn new() -> Self {
        let dir = TestDir::new();
        dir.write("idp.secret", &format!("{SECRET}\n"), 0o600);
        let idp = StandInIdp::start(
            0,
            vec![Registration {
                id: "broker".into(),
                secret: SECRET.into(),
                scopes: SCOPES.iter().map(|s| (*s).to_owned()).collect(),
            }],
        )
        .await;
        Self { dir, idp }
    }

    /// The socket path of the base config.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("credbroker.sock")
    }

    /// `config` made usable by a daemon running as [`NOBODY`]: its socket moves into a directory of nobody's
    /// (with `daemon_extra` after it, in `[daemon]`), and the client secret becomes nobody's. The new socket
    /// path is [`Setup::nobody_socket`].
    pub fn for_nobody(&self, config: &str, daemon_extra: &str) -> String {
        let home = self.nobody_socket().parent().unwrap().to_owned();
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
        let secret = self.dir.path().join("idp.secret");
        std::os::unix::fs::chown(&secret, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
        config.replace(
            &format!("socket = \"{}\"", self.socket().display()),
            &format!(
                "socket = \"{}\"\n{daemon_extra}",
                self.nobody_socket().display()
            ),
        )
    }

    /// The socket of a config made by [`Setup::for_nobody`].
    pub fn nobody_socket(&self) -> PathBuf {
        self.dir.path().join("run/credbroker.sock")
    }

    /// The base config with `client_extra` appended to `[clients.idp]` and `tail` at the end.
    pub fn config_with(&self, client_extra: &str, tail: &str) -> String {
        format!(
            r#"version = 1

[daemon]
socket = "{socket}"

[clients.idp]
token_url = "{url}"
client_id = "broker"
allow_http = true
client_secret = {{ file = "{dir}/idp.secret" }}
timeout = "2s"
{client_extra}

[[policy]]
name = "root-all"
match = {{ uid = 0 }}
client = "idp"
scopes = ["scim:*", "internal_user_mgt_*"]

[[policy]]
name = "nobody-read"
match = {{ user = "nobody" }}
client = "idp"
scopes = ["scim:read"]
{tail}"#,
            socket = self.socket().display(),
            url = self.idp.token_url(),
            dir = self.dir.path().display(),
        )
    }

    /// The base config.
    pub fn config(&self) -> String {
        self.config_with("", "")
    }

    /// A daemon on the base config.
    pub async fn daemon(&self) -> Daemon {
        Daemon::start(&self.dir, &self.config()).await
    }
}
