//! DPoP (RFC 9449): tokens bound to a key the daemon holds, and the proofs that go with them.
//!
//! A client with `dpop = true` gets an EC P-256 key when the daemon starts ([`DpopKey`]): made in memory,
//! never written, its PKCS#8 document zeroized on drop and parsed only for one signature at a time, as the
//! `private_key_jwt` keys are. Every token request of that client carries a proof signed with it, so the IdP
//! binds the token to the key (`cnf.jkt`, the key's RFC 7638 thumbprint); a caller then asks the daemon for a
//! proof for each request to an API, and a copied token is worthless without one.
//!
//! Proofs for APIs are given only for URLs within the caller's policy's `dpop_targets`
//! ([`crate::policy::target::Target`]).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use zeroize::Zeroizing;

/// A client's DPoP key.
pub struct DpopKey {
    /// The PKCS#8 document: the only copy of the private key between signatures.
    pkcs8: Zeroizing<Vec<u8>>,
    /// The public key as a JWK, members in lexicographic order (RFC 7638 §3): also what is hashed for the
    /// thumbprint.
    jwk: String,
    /// Its RFC 7638 SHA-256 thumbprint, base64url.
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DpopKey({}, [redacted])", self.thumbprint)
    }
}

/// Why a key could not be made or used (the system's random source failed, in practice).
#[derive(Debug, thiserror::Error)]
#[error("DPoP key: {0}")]
pub struct DpopError(&'static str);

impl DpopKey {
    /// A new key.
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn generate() -> Result<Self, DpopError> {
        let rng = SystemRandom::new();
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DpopError("cannot generate a key"))?;
        let pkcs8 = Zeroizing::new(document.as_ref().to_vec());
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| DpopError("cannot read the key made"))?;
        // Uncompressed point: 0x04, x (32 bytes), y (32 bytes).
        let public = pair.public_key().as_ref();
        let jwk = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(&public[1..33]),
            URL_SAFE_NO_PAD.encode(&public[33..65])
        );
        let thumbprint =
            URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes()));
        Ok(Self {
            pkcs8,
            jwk,
            thumbprint,
        })
    }

    /// The key's RFC 7638 thumbprint: what the IdP puts in a bound token's `cnf.jkt`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A proof (RFC 9449 §4.2) for a `method` request to `htu` (a URL without query and fragment), made at
    /// `now`: `typ` `dpop+jwt`, ES256, the public JWK in the header; `jti` (random), `htm`, `htu`, `iat`,
    /// and `ath` (the hash of `access_token`) and `nonce` when given.
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn proof(
        &self,
        method: &str,
        htu: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
        now: SystemTime,
    ) -> Result<String, DpopError> {
        let rng = SystemRandom::new();
        let mut jti = [0u8; 16];
        rng.fill(&mut jti)
            .map_err(|_| DpopError("no randomness for jti"))?;
        let header = format!(r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{}}}"#, self.jwk);
        let mut claims = serde_json::json!({
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "htm": method,
            "htu": htu,
            "iat": now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        });
        if let Some(token) = access_token {
            claims["ath"] = URL_SAFE_NO_PAD
                .encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    token.as_bytes(),
                ))
                .into();
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = nonce.into();
        }
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &rng)
            .map_err(|_| DpopError("cannot read the key"))?;
        let signature = pair
            .sign(&rng, input.as_bytes())
            .map_err(|_| DpopError("cannot sign"))?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// A DPoP nonce or a method as a caller sends it: printable ASCII without quotes or backslashes (RFC 9449
/// §8.1: `nonce = 1*NQCHAR`), at most 512 bytes.
pub fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce.len() <= 512
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// An HTTP method (RFC 9110 §9: a token), at most 32 bytes.
pub fn valid_method(method: &str) -> bool {
    !method.is_empty()
        && method.len() <= 32
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    fn part(jwt: &str, i: usize) -> serde_json::Value {
        let p = jwt.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn a_proof_is_signed_by_the_key_in_its_header_and_carries_the_claims() {
        let key = DpopKey::generate().unwrap();
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let proof = key
            .proof(
                "GET",
                "https://api.example/v1/users",
                Some("tok"),
                Some("n-1"),
                now,
            )
            .unwrap();
        let (header, claims) = (part(&proof, 0), part(&proof, 1));
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"]["kty"], "EC");
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.example/v1/users");
        assert_eq!(claims["iat"], 1_800_000_000u64);
        assert_eq!(claims["nonce"], "n-1");
        // ath = base64url(SHA-256("tok"))
        assert_eq!(claims["ath"], "GnZ0607njffhrEOak8P6jjyUV4TU3sn9jjARc4svHWI");
        assert!(claims["jti"].as_str().unwrap().len() >= 22);
        // The signature verifies with the header's key.
        let x = URL_SAFE_NO_PAD
            .decode(header["jwk"]["x"].as_str().unwrap())
            .unwrap();
        let y = URL_SAFE_NO_PAD
            .decode(header["jwk"]["y"].as_str().unwrap())
            .unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let (input, sig) = proof.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        // The thumbprint is RFC 7638's: SHA-256 of the required members in order, no spaces.
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            header["jwk"]["x"].as_str().unwrap(),
            header["jwk"]["y"].as_str().unwrap()
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        assert_eq!(key.thumbprint(), URL_SAFE_NO_PAD.encode(digest));
        // Unique jti.
        let other = key
            .proof("GET", "https://api.example/", None, None, now)
            .unwrap();
        assert_ne!(part(&other, 1)["jti"], claims["jti"]);
        assert!(part(&other, 1).get("ath").is_none() && part(&other, 1).get("nonce").is_none());
        assert!(!format!("{key:?}").contains(&URL_SAFE_NO_PAD.encode(&*key.pkcs8)));
    }

    #[test]
    fn nonces_and_methods_are_what_the_rfcs_allow() {
        assert!(valid_nonce("eyJ7S_zG.eyJH0-Z.HX4w-7v"));
        assert!(
            !valid_nonce("") && !valid_nonce("a\"b") && !valid_nonce("a b") && !valid_nonce("a\nb")
        );
        assert!(valid_method("GET") && valid_method("PATCH"));
        assert!(!valid_method("GE T") && !valid_method("") && !valid_method("G\r\n"));
    }
}
