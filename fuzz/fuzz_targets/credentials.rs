//! Credential files others may write: federated assertions (JWTs), PKCS#8 keys, certificates, CA bundles.
//!
//! Properties: no panic; no error or Debug output shows the credential's content (inputs carry the marker
//! [`MARK`], as the seeds do, and no message may).
#![no_main]

use std::time::{Duration, SystemTime};

use credbroker_daemon::secret::{Secret, SecretSource};
use credbroker_daemon::tokens::assertion::Assertion;
use credbroker_daemon::tokens::client::TlsRoots;
use credbroker_daemon::tokens::jwt::{Certificate, PrivateKey};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fn secret(text: &str) -> Secret {
    Secret::from_value(
        SecretString::from(text.to_owned()),
        SecretSource::File("/fuzz/credential".into()),
    )
}

/// Stands for the credential's content: the seeds carry it inside JWTs, keys and certificates.
const MARK: &str = "Zq7credentialMARK";

/// Whether `message` shows the content of `text` (its marker).
fn leaks(message: &str, text: &str) -> bool {
    text.contains(MARK) && message.contains(MARK)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Assertion::parse(secret(text)) {
        Ok(a) => {
            assert!(!leaks(&format!("{a:?}"), text));
            for at in [
                SystemTime::UNIX_EPOCH,
                SystemTime::now(),
                SystemTime::now() + Duration::from_secs(1 << 40),
            ] {
                if let Err(e) = a.usable(at) {
                    assert!(!leaks(&e, text), "{e}");
                }
            }
        }
        Err(e) => assert!(!leaks(&e, text), "{e}"),
    }
    match PrivateKey::new(secret(text)) {
        Ok(k) => assert!(!leaks(&format!("{k:?}"), text)),
        Err(e) => assert!(!leaks(&e.to_string(), text)),
    }
    if let Err(e) = Certificate::parse(secret(text)) {
        assert!(!leaks(&e, text), "{e}");
    }
    if let Ok(roots) = TlsRoots::parse(secret(text), true) {
        assert!(!roots.certificates.is_empty());
    }
});
