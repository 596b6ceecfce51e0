//! DPoP (RFC 9449) as the other side checks it: proof verification (§4.3), for the stand-in token endpoint
//! and a stand-in resource server that, like a real API, wants a bound token, a fresh proof for each request,
//! and answers its first request with a nonce challenge.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// What a valid proof said.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `nonce`, if any.
    pub nonce: Option<String>,
}

fn json_part(part: &str) -> Result<serde_json::Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| format!("not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))
}

/// The RFC 7638 thumbprint of an EC P-256 JWK.
pub fn thumbprint(jwk: &serde_json::Value) -> Result<String, String> {
    let (x, y) = (
        jwk["x"].as_str().ok_or("jwk without x")?,
        jwk["y"].as_str().ok_or("jwk without y")?,
    );
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
        return Err("not an EC P-256 key".to_owned());
    }
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    Ok(URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    )))
}

/// Checks a DPoP proof as RFC 9449 §4.3 says: a JWT with `typ` `dpop+jwt`, an asymmetric `alg` (ES256 here)
/// and a public `jwk` in its header, signed by that key; `htm` and `htu` those of the request; `iat` within a
/// minute of now; `ath` the hash of `access_token` when one goes with it; `nonce` the one expected, if any.
/// (Whether `jti` was seen before is the caller's to check.)
///
/// # Errors
/// What is wrong with it.
pub fn check(
    proof: &str,
    method: &str,
    htu: &str,
    access_token: Option<&str>,
    nonce: Option<&str>,
) -> Result<Checked, String> {
    let parts: Vec<&str> = proof.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("not a JWS compact serialization".to_owned());
    };
    let (h, c) = (json_part(header)?, json_part(claims)?);
    if h["typ"] != "dpop+jwt" {
        return Err(format!("typ is {}", h["typ"]));
    }
    if h["alg"] != "ES256" {
        return Err(format!("alg is {}", h["alg"]));
    }
    let jwk = &h["jwk"];
    if jwk.get("d").is_some() {
        return Err("the jwk holds a private key".to_owned());
    }
    let x = URL_SAFE_NO_PAD
        .decode(jwk["x"].as_str().unwrap_or(""))
        .map_err(|_| "jwk x")?;
    let y = URL_SAFE_NO_PAD
        .decode(jwk["y"].as_str().unwrap_or(""))
        .map_err(|_| "jwk y")?;
    let point = [&[4u8][..], &x, &y].concat();
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "signature not base64url")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "the signature does not verify with the header's key")?;
    if c["htm"] != method {
        return Err(format!(
            "htm is {}, the request's method {method}",
            c["htm"]
        ));
    }
    if c["htu"] != htu {
        return Err(format!("htu is {}, the request's URL {htu}", c["htu"]));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let iat = c["iat"].as_u64().ok_or("no iat")?;
    if iat.abs_diff(now) > 60 {
        return Err(format!("iat {iat} is not within a minute of {now}"));
    }
    let jti = c["jti"].as_str().ok_or("no jti")?.to_owned();
    if let Some(token) = access_token {
        let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ));
        if c["ath"] != ath.as_str() {
            return Err("ath is not the hash of the access token".to_owned());
        }
    }
    let given = c["nonce"].as_str().map(str::to_owned);
    if let Some(expected) = nonce
        && given.as_deref() != Some(expected)
    {
        return Err(format!("nonce is {given:?}, not {expected:?}"));
    }
    Ok(Checked {
        jkt: thumbprint(jwk)?,
        jti,
        nonce: given,
    })
}

/// Tells a resource server the key a token is bound to: `Some(jkt)` for an active DPoP-bound token.
pub type Binding = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A stand-in API on 127.0.0.1 that requires DPoP-bound tokens, as RFC 9449 §7 says a resource server does:
/// `Authorization: DPoP <token>` with a `DPoP` proof for this very request (method and URL), signed by the
/// key the token is bound to, never seen before, with the server's current nonce (its first answer is a
/// `use_dpop_nonce` challenge). Any request under `/api/` answers `200 ok` when all holds, `401` otherwise;
/// each outcome is recorded.
pub struct ResourceServer {
    /// `http://127.0.0.1:PORT`.
    pub origin: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    seen: HashSet<String>,
    outcomes: Vec<String>,
}

/// The nonce the resource server wants.
pub const RS_NONCE: &str = "rs-nonce.1";

impl ResourceServer {
    /// Starts one that learns a token's binding from `binding`.
    pub async fn start(binding: Binding) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (shared, base) = (state.clone(), origin.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, binding, base) = (shared.clone(), binding.clone(), base.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let response = answer(&req, &state, &binding, &base);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            origin,
            state,
            task,
        }
    }

    /// Every outcome so far: `ok`, `challenge` (a nonce was asked for), or `refused: <why>`.
    pub fn outcomes(&self) -> Vec<String> {
        self.state.lock().unwrap().outcomes.clone()
    }
}

impl Drop for ResourceServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    req: &Request<Incoming>,
    state: &Mutex<State>,
    binding: &Binding,
    base: &str,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let htu = format!("{base}{}", req.uri().path());
    let verdict = (|| {
        let auth = header("authorization").ok_or("no Authorization")?;
        let token = auth
            .strip_prefix("DPoP ")
            .ok_or_else(|| format!("not a DPoP token: {}", auth.split(' ').next().unwrap_or("")))?;
        let proof = header("dpop").ok_or("no DPoP proof")?;
        let checked = check(&proof, req.method().as_str(), &htu, Some(token), None)?;
        if checked.nonce.as_deref() != Some(RS_NONCE) {
            return Ok(false);
        }
        let bound = binding(token).ok_or("the token is not active, or not bound")?;
        if bound != checked.jkt {
            return Err("the proof's key is not the one the token is bound to".to_owned());
        }
        if !state.lock().unwrap().seen.insert(checked.jti) {
            return Err("the proof was used before (jti)".to_owned());
        }
        Ok(true)
    })();
    let (status, outcome) = match verdict {
        Ok(true) => (StatusCode::OK, "ok".to_owned()),
        Ok(false) => (StatusCode::UNAUTHORIZED, "challenge".to_owned()),
        Err(why) => (StatusCode::UNAUTHORIZED, format!("refused: {why}")),
    };
    state.lock().unwrap().outcomes.push(outcome.clone());
    let mut response = Response::new(Full::new(Bytes::from(format!("{outcome}\n"))));
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        let challenge = if outcome == "challenge" {
            r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof", algs="ES256""#
        } else {
            r#"DPoP error="invalid_token", algs="ES256""#
        };
        response
            .headers_mut()
            .insert("www-authenticate", challenge.parse().unwrap());
        response
            .headers_mut()
            .insert("dpop-nonce", RS_NONCE.parse().unwrap());
    }
    response
}
