//! Federated client assertions (RFC 7523 §2.2): a JWT that another issuer minted for this client (a Kubernetes
//! projected service-account token, a SPIFFE JWT-SVID, a cloud instance identity), sent as it is with
//! `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`. The IdP verifies it; the
//! broker checks only what spares a doomed request: that it is a JWT, and that it is valid now.
//!
//! # Security
//! An assertion is a credential: it stays in a [`Secret`], and neither it nor its claims are logged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::secret::{Secret, SecretSource};

/// Clock skew allowed between this host and the IdP: an assertion must stay valid this much longer to be
/// sent, and may be sent this much before its `nbf`.
pub const SKEW: Duration = Duration::from_secs(30);

/// A federated client assertion and its validity.
#[derive(Debug)]
pub struct Assertion {
    jwt: Secret,
    expires: SystemTime,
    not_before: Option<SystemTime>,
}

fn time(claims: &serde_json::Value, name: &str) -> Result<Option<SystemTime>, String> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0 && *t < 1e11)
            .map(|t| Some(UNIX_EPOCH + Duration::from_secs_f64(t)))
            .ok_or_else(|| format!("its {name} claim is not a time in seconds")),
    }
}

impl Assertion {
    /// Checks that `jwt` is a JWT with an `exp` claim (and a well-formed `nbf`, if any).
    ///
    /// # Errors
    /// What is wrong, naming the source, never the content.
    pub fn parse(jwt: Secret) -> Result<Self, String> {
        let source = jwt.source().clone();
        let bad = |why: &str| format!("{source} does not hold a client assertion: {why}");
        let text = jwt.expose().trim();
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 3 || parts.iter().take(2).any(|p| p.is_empty()) {
            return Err(bad("not a JWT (three base64url parts separated by dots)"));
        }
        let claims: serde_json::Value = URL_SAFE_NO_PAD
            .decode(parts[1].trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| bad("its payload is not a base64url JSON object"))?;
        let expires = time(&claims, "exp")
            .map_err(|e| bad(&e))?
            .ok_or_else(|| bad("it has no exp claim"))?;
        let not_before = time(&claims, "nbf").map_err(|e| bad(&e))?;
        Ok(Self {
            jwt,
            expires,
            not_before,
        })
    }

    /// Where it came from.
    pub fn source(&self) -> &SecretSource {
        self.jwt.source()
    }

    /// The assertion, if it is valid at `now` allowing for [`SKEW`].
    ///
    /// # Errors
    /// Why it may not be sent: expired, or not yet valid, naming the source and the time.
    pub fn usable(&self, now: SystemTime) -> Result<&str, String> {
        let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        if now + SKEW >= self.expires {
            return Err(format!(
                "the client assertion from {} expired at {} (it must stay valid {} s longer to be sent)",
                self.source(),
                at(self.expires),
                SKEW.as_secs()
            ));
        }
        if let Some(nbf) = self.not_before
            && nbf > now + SKEW
        {
            return Err(format!(
                "the client assertion from {} is not valid before {}",
                self.source(),
                at(nbf)
            ));
        }
        Ok(self.jwt.expose().trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn jwt(claims: &str) -> Secret {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        Secret::from_value(
            SecretString::from(format!(
                "{}.{}.sig",
                enc("{\"alg\":\"RS256\"}"),
                enc(claims)
            )),
            SecretSource::File("/run/spire/svid.jwt".into()),
        )
    }

    #[test]
    fn a_jwt_is_sent_while_valid_allowing_for_skew() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let a = Assertion::parse(jwt(r#"{"exp":2000000100,"nbf":1999999990,"sub":"x"}"#)).unwrap();
        assert!(a.usable(now).is_ok());
        // 30 s of skew: expired 30 s early, usable 30 s before nbf.
        let e = a.usable(now + Duration::from_secs(70)).unwrap_err();
        assert!(
            e.contains("/run/spire/svid.jwt") && e.contains("expired at 2033-05-18T03:35:00Z"),
            "{e}"
        );
        assert!(a.usable(now - Duration::from_secs(40)).is_ok());
        let e = a.usable(now - Duration::from_secs(41)).unwrap_err();
        assert!(e.contains("not valid before"), "{e}");
        // Never the content in a message or Debug output.
        assert!(!format!("{a:?}").contains("sig"), "{a:?}");
    }

    #[test]
    fn what_is_not_a_jwt_with_an_exp_is_refused_by_source() {
        for (claims, why) in [
            (r#"{"sub":"x"}"#, "no exp claim"),
            (r#"{"exp":"soon"}"#, "exp claim is not a time"),
            ("[1]", "not a base64url JSON object"),
        ] {
            let e = Assertion::parse(jwt(claims)).unwrap_err();
            assert!(e.contains(why) && e.contains("/run/spire/svid.jwt"), "{e}");
        }
        let plain = Secret::from_value(
            SecretString::from("hunter2".to_owned()),
            SecretSource::Env("A".into()),
        );
        let e = Assertion::parse(plain).unwrap_err();
        assert!(e.contains("not a JWT") && !e.contains("hunter2"), "{e}");
    }
}
