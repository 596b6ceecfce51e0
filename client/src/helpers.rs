//! The token in the shapes tools ask helpers for: kubectl's exec credential plugins
//! (`client.authentication.k8s.io`) and git's credential helper protocol.

use std::io::BufRead;
use std::time::SystemTime;

use credbroker_client::Token;
use credbroker_client::secrecy::ExposeSecret;

/// The `apiVersion`s of kubectl's `ExecCredential` that credbroker answers.
pub(crate) const EXEC_CREDENTIAL_VERSIONS: [&str; 2] = [
    "client.authentication.k8s.io/v1",
    "client.authentication.k8s.io/v1beta1",
];

/// The `apiVersion` to answer with: the one `KUBERNETES_EXEC_INFO` (set by kubectl for its plugin) names,
/// else v1.
///
/// # Errors
/// When the variable holds no JSON object with an `apiVersion`, or one that is not known.
pub(crate) fn exec_credential_version(exec_info: Option<&str>) -> Result<&'static str, String> {
    let Some(info) = exec_info.filter(|i| !i.trim().is_empty()) else {
        return Ok(EXEC_CREDENTIAL_VERSIONS[0]);
    };
    let value: serde_json::Value =
        serde_json::from_str(info).map_err(|e| format!("KUBERNETES_EXEC_INFO is not JSON: {e}"))?;
    let asked = value
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        .ok_or("KUBERNETES_EXEC_INFO has no apiVersion")?;
    EXEC_CREDENTIAL_VERSIONS
        .iter()
        .find(|v| **v == asked)
        .copied()
        .ok_or_else(|| {
            format!(
                "kubectl asks for {asked:?}; credbroker answers {}",
                EXEC_CREDENTIAL_VERSIONS.join(" and ")
            )
        })
}

/// An `ExecCredential` holding `token`, with its expiry (RFC 3339, UTC) so kubectl asks again only then.
pub(crate) fn exec_credential(token: &Token, api_version: &str) -> String {
    serde_json::json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token.access_token().expose_secret(),
            "expirationTimestamp": humantime::format_rfc3339_seconds(token.expires_at()).to_string(),
        },
    })
    .to_string()
}

/// What git said about the credential it wants: the attributes credbroker cares about.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct GitRequest {
    /// `capability[]` values git announced.
    pub(crate) capabilities: Vec<String>,
    /// `protocol`, for the message when it is not https.
    pub(crate) protocol: Option<String>,
}

/// Longest line git may send (its own limit is 65535 bytes); longer input is refused.
const MAX_LINE: usize = 64 * 1024;

/// Reads git's `key=value` lines up to a blank line or the end of input.
///
/// # Errors
/// Input that is not such lines, or too long.
pub(crate) fn read_git_request(input: impl BufRead) -> Result<GitRequest, String> {
    let mut request = GitRequest::default();
    let mut total = 0;
    for line in input.split(b'\n') {
        let line = line.map_err(|e| format!("cannot read git's request: {e}"))?;
        total += line.len() + 1;
        if total > 16 * MAX_LINE {
            return Err("git's request is too long".to_owned());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("not a key=value line from git: {line:?}"))?;
        match key {
            "capability[]" => request.capabilities.push(value.to_owned()),
            "protocol" => request.protocol = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok(request)
}

/// The answer to git's `get`: the token as a bearer credential when git can take one (it announced
/// `capability[]=authtype`, git 2.46 and later), marked ephemeral so no other helper stores it; else as the
/// password of `username`, with its expiry so git's credential cache drops it in time.
pub(crate) fn git_answer(request: &GitRequest, token: &Token, username: &str) -> String {
    let secret = token.access_token().expose_secret();
    if request.capabilities.iter().any(|c| c == "authtype") {
        format!("capability[]=authtype\nauthtype=Bearer\ncredential={secret}\nephemeral=1\n")
    } else {
        let expiry = token
            .expires_at()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        format!("username={username}\npassword={secret}\npassword_expiry_utc={expiry}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_credential_version_is_the_one_kubectl_names() {
        assert_eq!(
            exec_credential_version(None).unwrap(),
            EXEC_CREDENTIAL_VERSIONS[0]
        );
        let beta = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#;
        assert_eq!(
            exec_credential_version(Some(beta)).unwrap(),
            EXEC_CREDENTIAL_VERSIONS[1]
        );
        let alpha = r#"{"apiVersion":"client.authentication.k8s.io/v1alpha1"}"#;
        assert!(
            exec_credential_version(Some(alpha))
                .unwrap_err()
                .contains("v1alpha1")
        );
        assert!(exec_credential_version(Some("{")).is_err());
    }

    #[test]
    fn git_requests_are_read_to_the_blank_line() {
        let input = b"capability[]=authtype\ncapability[]=state\nprotocol=https\nhost=git.example.com\n\nignored=1\n";
        let r = read_git_request(&input[..]).unwrap();
        assert_eq!(r.capabilities, ["authtype", "state"]);
        assert_eq!(r.protocol.as_deref(), Some("https"));
        assert!(read_git_request(&b"no equals sign\n"[..]).is_err());
        assert_eq!(read_git_request(&b""[..]).unwrap(), GitRequest::default());
    }
}
