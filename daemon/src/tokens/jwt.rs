//! `private_key_jwt` client authentication (RFC 7523 §2.2, §3; OpenID Connect Core §9): a short-lived JWT,
//! signed with the client's private key, that the broker sends instead of a client secret.
//!
//! Keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), EC P-256 (signed ES256) or RSA of at least 2048 bits
//! (signed RS256), as `openssl genpkey` writes them.
//!
//! # Security
//! The key is a secret like a client secret: it stays in a [`Secret`] (PEM text, zeroized on drop) and is
//! parsed only to sign, so the parsed key lives no longer than one signature. Each assertion carries a fresh
//! random `jti`, lives 60 seconds, and is never logged.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// How long an assertion is valid.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// The signature algorithm, from the key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
}

impl Alg {
    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        }
    }
}

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not PEM, or not PKCS#8.
    #[error(
        "not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----); convert one with: \
         openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.p8.pem"
    )]
    NotPkcs8,
    /// PKCS#8, but neither an EC P-256 nor a usable RSA key.
    #[error(
        "unsupported key: use an EC P-256 key (ES256) or an RSA key of at least 2048 bits (RS256)"
    )]
    Unsupported,
    /// Signing failed.
    #[error("signing the client assertion failed")]
    Sign,
}

/// A client's private key for `private_key_jwt`.
pub struct PrivateKey {
    pem: Secret,
    alg: Alg,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, {:?})", self.alg.name(), self.pem)
    }
}

fn pkcs8_der(pem: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = pem.find(BEGIN).ok_or(KeyError::NotPkcs8)? + BEGIN.len();
    let end = start + pem[start..].find(END).ok_or(KeyError::NotPkcs8)?;
    let body: Zeroizing<String> = Zeroizing::new(
        pem[start..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    );
    STANDARD
        .decode(body.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| KeyError::NotPkcs8)
}

impl PrivateKey {
    /// Checks that `pem` holds a usable key and keeps it.
    ///
    /// # Errors
    /// [`KeyError`] when it is not a PKCS#8 EC P-256 or RSA (2048+) key.
    pub fn new(pem: Secret) -> Result<Self, KeyError> {
        let der = pkcs8_der(pem.expose())?;
        let rng = SystemRandom::new();
        let alg =
            if EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
                .is_ok()
            {
                Alg::Es256
            } else if RsaKeyPair::from_pkcs8(&der).is_ok() {
                Alg::Rs256
            } else {
                return Err(KeyError::Unsupported);
            };
        Ok(Self { pem, alg })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Where the key came from.
    pub fn source(&self) -> &crate::secret::SecretSource {
        self.pem.source()
    }

    /// Whether two keys are the same key.
    pub fn same_as(&self, other: &PrivateKey) -> bool {
        self.pem.expose() == other.pem.expose()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let der = pkcs8_der(self.pem.expose())?;
        let rng = SystemRandom::new();
        match self.alg {
            Alg::Es256 => {
                let key = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &der,
                    &rng,
                )
                .map_err(|_| KeyError::Unsupported)?;
                key.sign(&rng, message)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| KeyError::Sign)
            }
            Alg::Rs256 => {
                let key = RsaKeyPair::from_pkcs8(&der).map_err(|_| KeyError::Unsupported)?;
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
        }
    }
}

/// A signed client assertion: `iss` = `sub` = `client_id`, `aud`, `iat`, a 60-second `exp`, a fresh random
/// `jti`, and `kid` in the header when given.
///
/// # Errors
/// [`KeyError`] when signing fails.
pub fn client_assertion(
    client_id: &str,
    audience: &str,
    key: &PrivateKey,
    key_id: Option<&str>,
    now: SystemTime,
) -> Result<Zeroizing<String>, KeyError> {
    let mut header = serde_json::json!({ "alg": key.alg().name(), "typ": "JWT" });
    if let Some(kid) = key_id {
        header["kid"] = kid.into();
    }
    let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut jti = [0u8; 16];
    SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| KeyError::Sign)?;
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME.as_secs(),
        "jti": URL_SAFE_NO_PAD.encode(jti),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(signing_input.as_bytes())?;
    Ok(Zeroizing::new(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;
    use secrecy::SecretString;

    fn ec_key() -> (PrivateKey, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let public = ring::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec();
        let secret = Secret::from_value(SecretString::from(pem), SecretSource::Env("TEST".into()));
        (PrivateKey::new(secret).unwrap(), public)
    }

    fn part(jwt: &str, i: usize) -> serde_json::Value {
        let p = jwt.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn assertions_are_signed_es256_with_the_rfc7523_claims_and_fresh_jtis() {
        let (key, public) = ec_key();
        assert_eq!(key.alg(), Alg::Es256);
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a =
            client_assertion("broker", "https://idp.example/token", &key, Some("k1"), now).unwrap();
        let b = client_assertion("broker", "https://idp.example/token", &key, None, now).unwrap();
        let header = part(&a, 0);
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("ES256"), Some("k1"))
        );
        assert!(part(&b, 0).get("kid").is_none());
        let claims = part(&a, 1);
        assert_eq!(claims["iss"], "broker");
        assert_eq!(claims["sub"], "broker");
        assert_eq!(claims["aud"], "https://idp.example/token");
        assert_eq!(claims["iat"], 1_800_000_000u64);
        assert_eq!(claims["exp"], 1_800_000_060u64);
        assert_ne!(claims["jti"], part(&b, 1)["jti"]);
        // The signature verifies with the public key.
        let (input, sig) = a.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(input.as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn non_pkcs8_keys_are_refused_with_a_hint() {
        let secret = |pem: &str| {
            Secret::from_value(
                SecretString::from(pem.to_owned()),
                SecretSource::Env("T".into()),
            )
        };
        let err = PrivateKey::new(secret(
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        ))
        .unwrap_err();
        assert_eq!(err, KeyError::NotPkcs8);
        assert!(err.to_string().contains("openssl pkcs8 -topk8"));
        let err = PrivateKey::new(secret(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ))
        .unwrap_err();
        assert_eq!(err, KeyError::Unsupported);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let (key, _) = ec_key();
        let dbg = format!("{key:?}");
        assert!(
            !dbg.contains("BEGIN") && dbg.contains("[redacted]"),
            "{dbg}"
        );
    }
}
