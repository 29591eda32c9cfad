//! Client-side helpers for SMART Backend Services: generate an ES384 key
//! pair (private key as PKCS#8 PEM, public key as a JWKS to register) and
//! sign client assertions with it. Used by `phylax client keygen` and
//! `phylax client token` (operator and developer convenience), by the
//! benchmark and by tests. Production clients use their own libraries.

use crate::AuthError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use phylax_crypto::{CryptoError, Secret};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

/// A freshly generated client key pair.
#[derive(Debug)]
pub struct GeneratedClientKey {
    /// PKCS#8 private key, PEM. Secret: write it with mode 0600.
    pub private_pem: Secret,
    /// `{"keys":[…]}` with the public key, to register with `phylax client add`.
    pub jwks: String,
    pub kid: String,
}

pub fn generate() -> Result<GeneratedClientKey, AuthError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
        .map_err(|_| CryptoError::Random)?;
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| CryptoError::Random)?;
    let point = kp.public_key().as_ref();
    let (x, y) = point[1..].split_at(48);
    let kid = uuid::Uuid::new_v4().simple().to_string();
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-384", "use": "sig", "alg": "ES384", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }]})
    .to_string();
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    Ok(GeneratedClientKey {
        private_pem: Secret::new(pem.into_bytes()),
        jwks,
        kid,
    })
}

/// Sign a client assertion (ES384) for `client_id` at `token_url`.
pub fn sign_assertion(
    private_pem: &[u8],
    kid: Option<&str>,
    client_id: &str,
    token_url: &str,
    now: i64,
) -> Result<String, AuthError> {
    let key = EncodingKey::from_ec_pem(private_pem)
        .map_err(|_| AuthError::InvalidRequest("not an EC private key (PKCS#8 PEM)"))?;
    let mut header = Header::new(Algorithm::ES384);
    header.kid = kid.map(str::to_owned);
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": token_url,
        "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
    });
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|_| AuthError::InvalidRequest("signing failed"))
}
