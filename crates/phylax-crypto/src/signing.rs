//! Asymmetric signing keys for tokens that others verify (OpenID Connect
//! `id_token`s): ECDSA P-256 with SHA-256 (JWS `ES256`), private keys
//! stored only wrapped by the KEK, public keys published as a JWKS.
//!
//! Rotation adds a key with a new `kid`; the previous one stays published
//! so tokens it signed keep verifying until they expire.

use crate::secret::Secret;
use crate::{CryptoError, Kek};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::fmt;

const PURPOSE: &str = "signing";

pub struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new P-256 key, and its PKCS#8 form wrapped by the KEK (bound to
    /// the purpose and `kid`).
    pub fn generate_wrapped(kek: &Kek, kid: &str) -> Result<(SigningKey, Vec<u8>), CryptoError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| CryptoError::Random)?;
        let secret = Secret::new(doc.as_ref().to_vec());
        let wrapped = kek.wrap(PURPOSE, kid, &secret)?;
        Ok((SigningKey::from_pkcs8(kid, &secret)?, wrapped))
    }

    pub fn unwrap(kek: &Kek, kid: &str, wrapped: &[u8]) -> Result<SigningKey, CryptoError> {
        let secret = kek.unwrap(PURPOSE, kid, wrapped)?;
        SigningKey::from_pkcs8(kid, &secret)
    }

    fn from_pkcs8(kid: &str, secret: &Secret) -> Result<SigningKey, CryptoError> {
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, secret.expose(), &rng)
                .map_err(|_| CryptoError::MalformedKey)?;
        Ok(SigningKey {
            kid: kid.to_owned(),
            pair,
            rng,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A JWS `ES256` signature (r ‖ s, 64 bytes).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| CryptoError::Random)
    }

    /// The public key's JWK coordinates `(x, y)`, base64url.
    pub fn public_xy(&self) -> (String, String) {
        // An uncompressed P-256 point: 0x04 ‖ X (32) ‖ Y (32).
        let p = self.pair.public_key().as_ref();
        (
            URL_SAFE_NO_PAD.encode(&p[1..33]),
            URL_SAFE_NO_PAD.encode(&p[33..65]),
        )
    }

    /// Verify with the public key (for tests and self-checks).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            self.pair.public_key().as_ref(),
        )
        .verify(msg, sig)
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_wrap_and_binding() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, w) = SigningKey::generate_wrapped(&kek, "sig-1").unwrap();
        let sig = k.sign(b"header.payload").unwrap();
        assert_eq!(sig.len(), 64);
        assert!(k.verify(b"header.payload", &sig));
        assert!(!k.verify(b"header.payloae", &sig));
        let k2 = SigningKey::unwrap(&kek, "sig-1", &w).unwrap();
        assert_eq!(k.public_xy(), k2.public_xy());
        assert!(
            SigningKey::unwrap(&kek, "sig-2", &w).is_err(),
            "bound to its kid"
        );
        let (other, _) = Kek::generate().unwrap();
        assert!(
            SigningKey::unwrap(&other, "sig-1", &w).is_err(),
            "wrong KEK"
        );
        assert!(!format!("{k:?}").contains("pair"));
    }
}
