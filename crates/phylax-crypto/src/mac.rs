//! HMAC-SHA-256 keys for Phylax's own tokens and tamper-proof cursors.
//! Verification is constant-time (`ring::hmac::verify`).

use crate::secret::Secret;
use crate::{random_array, CryptoError, Kek};
use ring::hmac;
use std::fmt;

pub struct MacKey {
    key: hmac::Key,
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey([REDACTED])")
    }
}

impl MacKey {
    /// Generate a fresh key and return it with its KEK-wrapped form for
    /// storage under `purpose`.
    pub fn generate_wrapped(kek: &Kek, purpose: &str) -> Result<(MacKey, Vec<u8>), CryptoError> {
        let mut raw = random_array::<32>()?;
        let secret = Secret::new(raw.to_vec());
        zeroize::Zeroize::zeroize(&mut raw);
        let wrapped = kek.wrap(purpose, "", &secret)?;
        Ok((MacKey::from_secret(&secret), wrapped))
    }

    /// Unwrap a stored key.
    pub fn unwrap(kek: &Kek, purpose: &str, wrapped: &[u8]) -> Result<MacKey, CryptoError> {
        let secret = kek.unwrap(purpose, "", wrapped)?;
        Ok(MacKey::from_secret(&secret))
    }

    /// A key shared with someone else (a webhook receiver's secret, read
    /// from a 0600 file). At least 32 bytes.
    pub fn shared(secret: &Secret) -> Result<MacKey, CryptoError> {
        if secret.len() < 32 {
            return Err(CryptoError::MalformedKey);
        }
        Ok(MacKey::from_secret(secret))
    }

    fn from_secret(secret: &Secret) -> MacKey {
        MacKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose()),
        }
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.key, msg).as_ref());
        out
    }

    /// Constant-time check of `tag` over `msg`.
    pub fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.key, msg, tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_wrap() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, w) = MacKey::generate_wrapped(&kek, "token").unwrap();
        let t = k.sign(b"msg");
        assert!(k.verify(b"msg", &t));
        assert!(!k.verify(b"msh", &t));
        assert!(!k.verify(b"msg", &t[..31]));
        let k2 = MacKey::unwrap(&kek, "token", &w).unwrap();
        assert!(k2.verify(b"msg", &t));
        assert!(MacKey::unwrap(&kek, "cursor", &w).is_err());
    }
}
