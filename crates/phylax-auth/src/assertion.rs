//! SMART Backend Services client authentication (`private_key_jwt`).
//!
//! The client proves possession of a private key by signing a short-lived
//! JWT ("client assertion") with `iss = sub = client_id`, `aud =` the token
//! endpoint URL, `exp` at most five minutes ahead and a unique `jti`. Phylax
//! accepts RS384 and ES384 (the two algorithms SMART requires servers to
//! support) and verifies against the JWKS registered for the client. `jti`
//! uniqueness is enforced by the caller through the store, after the
//! signature is verified, so unauthenticated requests cannot fill the table.
//!
//! Unknown clients are verified against a throwaway P-384 key generated at
//! start, so an ES384 assertion for a client id that does not exist costs
//! the same signature check as one for a real client.

use crate::AuthError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest client assertion accepted (a 4096-bit RSA signature plus claims
/// fit easily).
pub const MAX_ASSERTION_LEN: usize = 8192;
/// How far in the future an assertion's `exp` may be (SMART: 5 minutes).
pub const MAX_ASSERTION_LIFETIME: i64 = 300;
/// Clock skew tolerated on `exp`/`iat`.
const LEEWAY: u64 = 30;
const MAX_KEYS: usize = 10;
const MIN_RSA_BITS: usize = 2048;

/// A registered client's verification material.
#[derive(Debug, Clone)]
pub struct ClientKeys {
    jwks: JwkSet,
}

/// Parse and vet a JWKS for registration: public keys only, RSA ≥ 2048
/// bits or EC P-384, usable for signatures, at most 10 keys.
pub fn parse_jwks(text: &str) -> Result<ClientKeys, AuthError> {
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|_| AuthError::InvalidJwks("not valid JSON".into()))?;
    let keys = raw
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| AuthError::InvalidJwks("a JWKS needs a \"keys\" array".into()))?;
    if keys.is_empty() || keys.len() > MAX_KEYS {
        return Err(AuthError::InvalidJwks(format!(
            "a JWKS needs 1 to {MAX_KEYS} keys"
        )));
    }
    for (i, k) in keys.iter().enumerate() {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k", "oth"] {
            if k.get(private).is_some() {
                return Err(AuthError::InvalidJwks(format!(
                    "key {i} contains private key material (\"{private}\"); register only public keys"
                )));
            }
        }
    }
    let jwks: JwkSet =
        serde_json::from_value(raw).map_err(|_| AuthError::InvalidJwks("malformed JWK".into()))?;
    for (i, k) in jwks.keys.iter().enumerate() {
        if matches!(k.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return Err(AuthError::InvalidJwks(format!(
                "key {i} is not a signature key (\"use\")"
            )));
        }
        match &k.algorithm {
            AlgorithmParameters::RSA(r) => {
                let n = URL_SAFE_NO_PAD
                    .decode(r.n.trim_end_matches('='))
                    .map_err(|_| AuthError::InvalidJwks(format!("key {i}: bad modulus")))?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < MIN_RSA_BITS {
                    return Err(AuthError::InvalidJwks(format!(
                        "key {i}: RSA keys must have at least {MIN_RSA_BITS} bits"
                    )));
                }
                if !matches!(k.common.key_algorithm, None | Some(KeyAlgorithm::RS384)) {
                    return Err(AuthError::InvalidJwks(format!(
                        "key {i}: RSA keys must be for RS384"
                    )));
                }
            }
            AlgorithmParameters::EllipticCurve(ec) => {
                if ec.curve != EllipticCurve::P384 {
                    return Err(AuthError::InvalidJwks(format!(
                        "key {i}: EC keys must use P-384 (ES384)"
                    )));
                }
                if !matches!(k.common.key_algorithm, None | Some(KeyAlgorithm::ES384)) {
                    return Err(AuthError::InvalidJwks(format!(
                        "key {i}: EC keys must be for ES384"
                    )));
                }
            }
            _ => {
                return Err(AuthError::InvalidJwks(format!(
                    "key {i}: only RSA and EC keys are supported"
                )))
            }
        }
        DecodingKey::from_jwk(k)
            .map_err(|_| AuthError::InvalidJwks(format!("key {i} is unusable")))?;
    }
    Ok(ClientKeys { jwks })
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    jti: String,
}

/// A verified assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAssertion {
    pub client_id: String,
    pub jti: String,
    pub exp: i64,
}

/// Read the (unverified) `iss` of an assertion, to find the client whose
/// keys verify it. Nothing is trusted until [`Verifier::verify`] succeeds.
pub fn peek_issuer(assertion: &str) -> Option<String> {
    if assertion.len() > MAX_ASSERTION_LEN {
        return None;
    }
    let payload = assertion.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let iss = v.get("iss")?.as_str()?;
    (iss.len() <= 128).then(|| iss.to_owned())
}

/// Verifies client assertions for one token endpoint.
pub struct Verifier {
    token_url: String,
    decoy: DecodingKey,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(token_url: impl Into<String>) -> Result<Verifier, AuthError> {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
            .map_err(|_| phylax_crypto::CryptoError::Random)?;
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| phylax_crypto::CryptoError::Random)?;
        let point = kp.public_key().as_ref();
        // Uncompressed point: 0x04 || x (48 bytes) || y (48 bytes).
        let (x, y) = point[1..].split_at(48);
        let decoy =
            DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(x), &URL_SAFE_NO_PAD.encode(y))
                .map_err(|_| phylax_crypto::CryptoError::Random)?;
        Ok(Verifier {
            token_url: token_url.into(),
            decoy,
        })
    }

    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    fn select<'k>(keys: &'k ClientKeys, kid: Option<&str>, alg: Algorithm) -> Option<&'k Jwk> {
        let fits = |k: &&Jwk| {
            matches!(
                (&k.algorithm, alg),
                (AlgorithmParameters::RSA(_), Algorithm::RS384)
                    | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES384)
            )
        };
        match kid {
            Some(kid) => keys
                .jwks
                .keys
                .iter()
                .filter(fits)
                .find(|k| k.common.key_id.as_deref() == Some(kid)),
            None => {
                let mut it = keys.jwks.keys.iter().filter(fits);
                let first = it.next();
                // Without a kid, only an unambiguous key may be used.
                if it.next().is_some() {
                    None
                } else {
                    first
                }
            }
        }
    }

    /// Verify `assertion` for `client_id` with its keys (`None` when the
    /// client is unknown or disabled: the check still runs on a decoy key and
    /// then fails, so both cases look and cost the same).
    pub fn verify(
        &self,
        assertion: &str,
        client_id: &str,
        keys: Option<&ClientKeys>,
        now: i64,
    ) -> Result<VerifiedAssertion, AuthError> {
        if assertion.len() > MAX_ASSERTION_LEN {
            return Err(AuthError::InvalidClient("assertion too long"));
        }
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| AuthError::InvalidClient("malformed assertion"))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(AuthError::InvalidClient("unsupported assertion algorithm"));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY;
        // Times are checked below against the caller's clock, so that the
        // check is testable and uses one notion of "now".
        validation.validate_exp = false;
        validation.set_audience(&[&self.token_url]);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_owned());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);

        let key = keys.and_then(|k| Self::select(k, header.kid.as_deref(), header.alg));
        let decoded = match key {
            Some(jwk) => {
                let dk = DecodingKey::from_jwk(jwk)
                    .map_err(|_| AuthError::InvalidClient("unusable key"))?;
                jsonwebtoken::decode::<AssertionClaims>(assertion, &dk, &validation)
            }
            None => {
                let mut v = validation.clone();
                v.algorithms = vec![Algorithm::ES384];
                let _ = jsonwebtoken::decode::<AssertionClaims>(assertion, &self.decoy, &v);
                return Err(AuthError::InvalidClient(
                    "unknown client, disabled client or no matching key",
                ));
            }
        }
        .map_err(|_| AuthError::InvalidClient("assertion signature or claims invalid"))?;
        let c = decoded.claims;
        if c.iss != client_id || c.sub != client_id {
            return Err(AuthError::InvalidClient("iss/sub mismatch"));
        }
        if c.exp + (LEEWAY as i64) < now {
            return Err(AuthError::InvalidClient("assertion expired"));
        }
        if c.exp > now + MAX_ASSERTION_LIFETIME + LEEWAY as i64 {
            return Err(AuthError::InvalidClient(
                "assertion expires too far in the future",
            ));
        }
        // RFC 7523 §3: not to be used before `nbf`; an `iat` in the
        // future, or so far before `exp` that the assertion lived longer
        // than SMART's five minutes, is not a fresh assertion either.
        if c.iat.is_some_and(|iat| iat > now + LEEWAY as i64) {
            return Err(AuthError::InvalidClient("assertion issued in the future"));
        }
        if c.iat
            .is_some_and(|iat| c.exp - iat > MAX_ASSERTION_LIFETIME + LEEWAY as i64)
        {
            return Err(AuthError::InvalidClient(
                "assertion lifetime (exp - iat) over five minutes",
            ));
        }
        if c.nbf.is_some_and(|nbf| nbf > now + LEEWAY as i64) {
            return Err(AuthError::InvalidClient("assertion not valid yet (nbf)"));
        }
        if c.jti.is_empty() || c.jti.len() > 256 {
            return Err(AuthError::InvalidClient("jti missing or too long"));
        }
        Ok(VerifiedAssertion {
            client_id: c.iss,
            jti: c.jti,
            exp: c.exp,
        })
    }
}
