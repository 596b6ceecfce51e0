//! `private_key_jwt` client authentication (RFC 7523 §2.2, §3; OpenID Connect Core §9): a short-lived JWT,
//! signed with the client's private key, that the broker sends instead of a client secret.
//!
//! Keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), EC P-256 (signed ES256) or RSA of at least 2048 bits
//! (signed RS256, or PS256), as `openssl genpkey` writes them. With the key's certificate ([`Certificate`]),
//! the header carries its SHA-256 thumbprint (`x5t#S256`, and the SHA-1 `x5t` on request), as Entra ID wants
//! for certificate credentials; every assertion is then checked against the certificate before it is sent, so
//! a key and certificate that do not belong together are never used.
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

/// The signature algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256 (EC keys).
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA keys).
    Rs256,
    /// RSASSA-PSS with SHA-256 (RSA keys).
    Ps256,
}

impl Alg {
    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
        }
    }

    /// The algorithm named `name` (a JOSE name).
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Es256, Self::Rs256, Self::Ps256]
            .into_iter()
            .find(|a| a.name() == name)
    }

    fn verification(self) -> &'static dyn rustls_pki_types::SignatureVerificationAlgorithm {
        match self {
            Self::Es256 => webpki::ring::ECDSA_P256_SHA256,
            Self::Rs256 => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            Self::Ps256 => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        }
    }
}

/// A client's certificate, for the thumbprints in the assertion's header.
#[derive(Debug)]
pub struct Certificate {
    der: Vec<u8>,
    source: crate::secret::SecretSource,
}

impl Certificate {
    /// The first certificate of a PEM file (a chain may follow; its first is the key's).
    ///
    /// # Errors
    /// When the text holds no PEM certificate, or one that is not a valid X.509 certificate.
    pub fn parse(pem: Secret) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let source = pem.source().clone();
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.expose().as_bytes())
            .next()
            .ok_or_else(|| {
                format!("{source} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            })?
            .map_err(|e| format!("{source}: not a PEM certificate: {e}"))?;
        webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("{source}: not a valid X.509 certificate: {e:?}"))?;
        Ok(Self {
            der: der.as_ref().to_vec(),
            source,
        })
    }

    /// Where it came from.
    pub fn source(&self) -> &crate::secret::SecretSource {
        &self.source
    }

    /// `x5t#S256`: the SHA-256 of the DER certificate, base64url.
    pub fn sha256_thumbprint(&self) -> String {
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &self.der))
    }

    /// `x5t`: the SHA-1 of the DER certificate, base64url (for providers that still want it).
    pub fn sha1_thumbprint(&self) -> String {
        URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            &self.der,
        ))
    }

    /// Whether the JWS `signature` over `message` verifies with this certificate's public key under `alg`.
    fn verifies(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        let der = rustls_pki_types::CertificateDer::from(self.der.as_slice());
        // X.509 verifiers take ECDSA signatures DER-encoded; JWS carries them as fixed-size r || s.
        let signature = match alg {
            Alg::Es256 => ecdsa_fixed_to_der(signature),
            Alg::Rs256 | Alg::Ps256 => signature.to_vec(),
        };
        webpki::EndEntityCert::try_from(&der).is_ok_and(|cert| {
            cert.verify_signature(alg.verification(), message, &signature)
                .is_ok()
        })
    }
}

/// An ECDSA signature as JWS writes it (r || s, each 32 bytes for P-256) in the DER form X.509 uses:
/// `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_fixed_to_der(fixed: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, n: &[u8]) {
        let n = &n[n
            .iter()
            .take_while(|&&b| b == 0)
            .count()
            .min(n.len().saturating_sub(1))..];
        let pad = n.first().is_some_and(|&b| b & 0x80 != 0);
        out.push(0x02);
        out.push(u8::try_from(n.len() + usize::from(pad)).unwrap_or(0));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(n);
    }
    let (r, s) = fixed.split_at(fixed.len() / 2);
    let mut body = Vec::with_capacity(fixed.len() + 6);
    integer(&mut body, r);
    integer(&mut body, s);
    let mut der = vec![0x30, u8::try_from(body.len()).unwrap_or(0)];
    der.extend_from_slice(&body);
    der
}

/// How an assertion is signed: the algorithm, `kid`, and the certificate whose thumbprints go in the header.
#[derive(Clone, Copy, Debug)]
pub struct Signing<'a> {
    /// The algorithm; it must suit the key.
    pub alg: Alg,
    /// `kid` for the header.
    pub key_id: Option<&'a str>,
    /// The key's certificate: `x5t#S256` in the header, and the signature checked against it.
    pub certificate: Option<&'a Certificate>,
    /// Add the SHA-1 thumbprint `x5t` as well.
    pub sha1_thumbprint: bool,
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
    /// The algorithm does not suit the key.
    #[error("{0} does not suit this key: use ES256 with an EC key, RS256 or PS256 with an RSA key")]
    WrongAlg(&'static str),
    /// The signature does not verify with the certificate.
    #[error("the private key does not match the certificate {0}")]
    CertificateMismatch(String),
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

    /// The algorithm this key signs with by default: ES256 for EC keys; for RSA keys RS256, or PS256 when a
    /// certificate is given (as Entra ID's documentation asks).
    pub fn default_alg(&self, with_certificate: bool) -> Alg {
        match self.alg {
            Alg::Rs256 if with_certificate => Alg::Ps256,
            alg => alg,
        }
    }

    /// The key's type, as its default algorithm without a certificate.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Where the key came from.
    pub fn source(&self) -> &crate::secret::SecretSource {
        self.pem.source()
    }

    fn sign(&self, alg: Alg, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let der = pkcs8_der(self.pem.expose())?;
        let rng = SystemRandom::new();
        match (self.alg, alg) {
            (Alg::Es256, Alg::Es256) => {
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
            (Alg::Rs256, Alg::Rs256 | Alg::Ps256) => {
                let key = RsaKeyPair::from_pkcs8(&der).map_err(|_| KeyError::Unsupported)?;
                let mut sig = vec![0; key.public().modulus_len()];
                let padding: &dyn signature::RsaEncoding = if alg == Alg::Ps256 {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                key.sign(padding, &rng, message, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
            (_, alg) => Err(KeyError::WrongAlg(alg.name())),
        }
    }
}

/// A signed client assertion: `iss` = `sub` = `client_id`, `aud`, `iat`, a 60-second `exp`, a fresh random
/// `jti`; in the header `kid` when given and the certificate's thumbprints when there is one.
///
/// # Errors
/// [`KeyError`] when signing fails, the algorithm does not suit the key, or the signature does not verify
/// with the certificate.
pub fn client_assertion(
    client_id: &str,
    audience: &str,
    key: &PrivateKey,
    signing: Signing<'_>,
    now: SystemTime,
) -> Result<Zeroizing<String>, KeyError> {
    let mut header = serde_json::json!({ "alg": signing.alg.name(), "typ": "JWT" });
    if let Some(kid) = signing.key_id {
        header["kid"] = kid.into();
    }
    if let Some(cert) = signing.certificate {
        header["x5t#S256"] = cert.sha256_thumbprint().into();
        if signing.sha1_thumbprint {
            header["x5t"] = cert.sha1_thumbprint().into();
        }
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
    let signature = key.sign(signing.alg, signing_input.as_bytes())?;
    if let Some(cert) = signing.certificate
        && !cert.verifies(signing.alg, signing_input.as_bytes(), &signature)
    {
        return Err(KeyError::CertificateMismatch(cert.source().to_string()));
    }
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
        let signing = |key_id| Signing {
            alg: Alg::Es256,
            key_id,
            certificate: None,
            sha1_thumbprint: false,
        };
        let a = client_assertion(
            "broker",
            "https://idp.example/token",
            &key,
            signing(Some("k1")),
            now,
        )
        .unwrap();
        let b = client_assertion(
            "broker",
            "https://idp.example/token",
            &key,
            signing(None),
            now,
        )
        .unwrap();
        let header = part(&a, 0);
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("ES256"), Some("k1"))
        );
        assert!(part(&b, 0).get("kid").is_none());
        assert!(part(&b, 0).get("x5t#S256").is_none());
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

    /// A certificate for `pem`'s key (self-signed, as Entra ID accepts), as a [`Certificate`] and its DER.
    fn certificate_for(pem: &str) -> (Certificate, Vec<u8>) {
        let pair = rcgen::KeyPair::from_pem(pem).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["broker.example".to_owned()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let parsed = Certificate::parse(Secret::from_value(
            SecretString::from(cert.pem()),
            SecretSource::File("/etc/credbroker/broker.crt".into()),
        ))
        .unwrap();
        (parsed, cert.der().to_vec())
    }

    fn ec_pem() -> (PrivateKey, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let pem = pair.serialize_pem();
        let key = PrivateKey::new(Secret::from_value(
            SecretString::from(pem.clone()),
            SecretSource::Env("K".into()),
        ))
        .unwrap();
        (key, pem)
    }

    #[test]
    fn a_certificate_puts_its_thumbprints_in_the_header_and_must_match_the_key() {
        let (key, pem) = ec_pem();
        let (cert, der) = certificate_for(&pem);
        let signing = Signing {
            alg: key.default_alg(true),
            key_id: None,
            certificate: Some(&cert),
            sha1_thumbprint: true,
        };
        let now = SystemTime::now();
        let a =
            client_assertion("broker", "https://idp.example/token", &key, signing, now).unwrap();
        let header = part(&a, 0);
        assert_eq!(header["alg"], "ES256");
        let sha256 = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der));
        assert_eq!(header["x5t#S256"], sha256.as_str());
        assert_eq!(
            header["x5t"].as_str().unwrap().len(),
            27,
            "SHA-1, base64url: {header}"
        );
        // SHA-1 only on request.
        let b = client_assertion(
            "broker",
            "https://idp.example/token",
            &key,
            Signing {
                sha1_thumbprint: false,
                ..signing
            },
            now,
        )
        .unwrap();
        assert!(part(&b, 0).get("x5t").is_none());

        // Another key's certificate: refused, naming the certificate.
        let (other, _) = ec_pem();
        let err = client_assertion("broker", "https://idp.example/token", &other, signing, now)
            .unwrap_err();
        assert_eq!(
            err,
            KeyError::CertificateMismatch("file /etc/credbroker/broker.crt".into())
        );
        // An algorithm that does not suit the key.
        let err = client_assertion(
            "broker",
            "https://idp.example/token",
            &key,
            Signing {
                alg: Alg::Ps256,
                ..signing
            },
            now,
        )
        .unwrap_err();
        assert_eq!(err, KeyError::WrongAlg("PS256"));
    }

    #[test]
    fn what_is_not_a_certificate_is_refused_by_source() {
        let secret = |text: &str| {
            Secret::from_value(
                SecretString::from(text.to_owned()),
                SecretSource::File("/etc/credbroker/x.crt".into()),
            )
        };
        let e = Certificate::parse(secret("hello")).unwrap_err();
        assert!(
            e.contains("holds no PEM certificate") && e.contains("x.crt"),
            "{e}"
        );
        let e = Certificate::parse(secret(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ))
        .unwrap_err();
        assert!(e.contains("not a valid X.509 certificate"), "{e}");
    }
}
