//! The audit log's checkpoint key: Ed25519, separate from every data key
//! and from the `id_token` keys (a leaked token key must not let anyone
//! forge the log's history, and the reverse). Stored only wrapped by the
//! KEK under its own purpose, so the wrapped blob cannot be unwrapped as
//! any other kind of key.

use crate::secret::Secret;
use crate::{CryptoError, Kek};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::fmt;

const PURPOSE: &str = "audit-checkpoint";

pub struct CheckpointKey {
    scope: String,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl CheckpointKey {
    /// A new key and its PKCS#8 form wrapped by the KEK, bound to `scope`.
    pub fn generate_wrapped(
        kek: &Kek,
        scope: &str,
    ) -> Result<(CheckpointKey, Vec<u8>), CryptoError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| CryptoError::Random)?;
        let secret = Secret::new(doc.as_ref().to_vec());
        let wrapped = kek.wrap(PURPOSE, scope, &secret)?;
        Ok((CheckpointKey::from_pkcs8(scope, &secret)?, wrapped))
    }

    pub fn unwrap(kek: &Kek, scope: &str, wrapped: &[u8]) -> Result<CheckpointKey, CryptoError> {
        let secret = kek.unwrap(PURPOSE, scope, wrapped)?;
        CheckpointKey::from_pkcs8(scope, &secret)
    }

    fn from_pkcs8(scope: &str, secret: &Secret) -> Result<CheckpointKey, CryptoError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(secret.expose()).map_err(|_| CryptoError::MalformedKey)?;
        Ok(CheckpointKey {
            scope: scope.to_owned(),
            pair,
        })
    }

    /// An Ed25519 signature (64 bytes). Deterministic; cannot fail.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// A retired key's public half, wrapped by the KEK for storage (under
    /// the same purpose, with its own scope, so that it cannot pass for a
    /// private key): whoever holds the database but not the KEK cannot
    /// slip in a public key of their own to make forged checkpoints
    /// verify.
    pub fn wrap_public(kek: &Kek, scope: &str, public: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
        kek.wrap(PURPOSE, scope, &Secret::new(public.to_vec()))
    }

    /// The public key [`CheckpointKey::wrap_public`] stored.
    pub fn unwrap_public(kek: &Kek, scope: &str, wrapped: &[u8]) -> Result<[u8; 32], CryptoError> {
        let s = kek.unwrap(PURPOSE, scope, wrapped)?;
        s.expose().try_into().map_err(|_| CryptoError::MalformedKey)
    }

    /// The 32-byte public key.
    pub fn public(&self) -> [u8; 32] {
        let mut p = [0u8; 32];
        p.copy_from_slice(self.pair.public_key().as_ref());
        p
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    #[test]
    fn sign_verify_wrap_and_binding() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, w) = CheckpointKey::generate_wrapped(&kek, "log-1").unwrap();
        let sig = k.sign(b"checkpoint");
        let pk = k.public();
        assert!(UnparsedPublicKey::new(&ED25519, pk)
            .verify(b"checkpoint", &sig)
            .is_ok());
        assert!(UnparsedPublicKey::new(&ED25519, pk)
            .verify(b"checkpoinT", &sig)
            .is_err());
        assert_eq!(
            CheckpointKey::unwrap(&kek, "log-1", &w).unwrap().public(),
            pk
        );
        assert!(
            CheckpointKey::unwrap(&kek, "log-2", &w).is_err(),
            "bound to scope"
        );
        let (other, _) = Kek::generate().unwrap();
        assert!(
            CheckpointKey::unwrap(&other, "log-1", &w).is_err(),
            "wrong KEK"
        );
        // A retired key's public half: bound to its scope, not a key.
        let wp = CheckpointKey::wrap_public(&kek, "retired-1", &pk).unwrap();
        assert_eq!(
            CheckpointKey::unwrap_public(&kek, "retired-1", &wp).unwrap(),
            pk
        );
        assert!(CheckpointKey::unwrap_public(&kek, "log-1", &wp).is_err());
        assert!(CheckpointKey::unwrap(&kek, "retired-1", &wp).is_err());
        // The id_token purpose cannot open it.
        assert!(crate::signing::SigningKey::unwrap(&kek, "log-1", &w).is_err());
        assert!(!format!("{k:?}").contains("pair"));
    }
}
