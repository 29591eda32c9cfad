//! The key-encryption key.
//!
//! The KEK is 32 random bytes kept outside the data directory: in a key file
//! (base64 text, mode 0600, refused if group- or world-readable) or in the
//! `PHYLAX_KEK` environment variable. It only ever wraps other keys, with
//! AES-256-GCM, a random 96-bit nonce and additional data naming the wrapped
//! key's purpose and scope, so a wrapped key cannot be swapped for another.
//! A KEK wraps few keys (one per patient plus a handful), far below the 2^32
//! random-nonce limit for one GCM key.

use crate::datakey::DataKey;
use crate::secret::Secret;
use crate::{random_array, CryptoError};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use std::fmt;
use std::io::Write;
use std::path::Path;

const WRAP_VERSION: u8 = 1;

pub struct Kek {
    aead: LessSafeKey,
    check: [u8; 32],
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

impl Kek {
    fn from_bytes(bytes: Secret) -> Result<Kek, CryptoError> {
        if bytes.len() != 32 {
            return Err(CryptoError::MalformedKey);
        }
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes.expose()).map_err(|_| CryptoError::MalformedKey)?,
        );
        // A public fingerprint, stored in the database so that starting with
        // the wrong KEK fails clearly instead of failing every read. It is an
        // HMAC under the KEK itself and reveals nothing about it.
        let mac = hmac::Key::new(hmac::HMAC_SHA256, bytes.expose());
        let tag = hmac::sign(&mac, b"phylax/kek-check/v1");
        let mut check = [0u8; 32];
        check.copy_from_slice(tag.as_ref());
        Ok(Kek { aead, check })
    }

    fn decode(text: &str) -> Result<Kek, CryptoError> {
        let raw = STANDARD
            .decode(text.trim())
            .map_err(|_| CryptoError::MalformedKey)?;
        Kek::from_bytes(Secret::new(raw))
    }

    /// Generate a new random KEK (for tests and `init`).
    pub fn generate() -> Result<(Kek, Secret), CryptoError> {
        let mut raw = random_array::<32>()?;
        let secret = Secret::new(raw.to_vec());
        zeroize::Zeroize::zeroize(&mut raw);
        let text = Secret::new(STANDARD.encode(secret.expose()).into_bytes());
        Ok((Kek::from_bytes(secret)?, text))
    }

    /// Create a new key file with mode 0600 and a fresh KEK. Refuses to
    /// overwrite an existing file: losing a KEK loses the data.
    pub fn create_file(path: &Path) -> Result<Kek, CryptoError> {
        use std::os::unix::fs::OpenOptionsExt;
        let (kek, text) = Kek::generate()?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CryptoError::KeyFileIo(e.kind().to_string()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    CryptoError::KeyFileExists(path.display().to_string())
                }
                k => CryptoError::KeyFileIo(k.to_string()),
            })?;
        f.write_all(text.expose())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| CryptoError::KeyFileIo(e.kind().to_string()))?;
        Ok(kek)
    }

    /// Load a KEK from a key file, refusing files readable by group or others.
    pub fn from_file(path: &Path) -> Result<Kek, CryptoError> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(path).map_err(|e| CryptoError::KeyFileIo(e.kind().to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::KeyFilePermissions(path.display().to_string()));
        }
        let text = Secret::new(
            std::fs::read(path).map_err(|e| CryptoError::KeyFileIo(e.kind().to_string()))?,
        );
        let s = std::str::from_utf8(text.expose()).map_err(|_| CryptoError::MalformedKey)?;
        Kek::decode(s)
    }

    /// Load a KEK from the text of an environment variable (base64).
    pub fn from_env_value(value: &str) -> Result<Kek, CryptoError> {
        Kek::decode(value)
    }

    /// The KEK's public check value (see `from_bytes`).
    pub fn check_value(&self) -> [u8; 32] {
        self.check
    }

    fn aad(purpose: &str, scope: &str) -> Vec<u8> {
        let mut a = Vec::with_capacity(32 + purpose.len() + scope.len());
        a.extend_from_slice(b"phylax/wrap/v1\0");
        a.extend_from_slice(purpose.as_bytes());
        a.push(0);
        a.extend_from_slice(scope.as_bytes());
        a
    }

    /// Wrap secret bytes for storage. `purpose` and `scope` are bound as
    /// additional data and must be given again to unwrap.
    pub fn wrap(
        &self,
        purpose: &str,
        scope: &str,
        secret: &Secret,
    ) -> Result<Vec<u8>, CryptoError> {
        let nonce_bytes = random_array::<NONCE_LEN>()?;
        let mut buf = secret.expose().to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(Self::aad(purpose, scope)),
                &mut buf,
            )
            .map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(WRAP_VERSION);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(out)
    }

    /// Unwrap bytes produced by [`Kek::wrap`] with the same purpose and scope.
    pub fn unwrap(
        &self,
        purpose: &str,
        scope: &str,
        wrapped: &[u8],
    ) -> Result<Secret, CryptoError> {
        if wrapped.len() < 1 + NONCE_LEN + 16 || wrapped[0] != WRAP_VERSION {
            return Err(CryptoError::Decrypt);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
        let mut buf = wrapped[1 + NONCE_LEN..].to_vec();
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(purpose, scope)),
                &mut buf,
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let out = Secret::new(plain.to_vec());
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(out)
    }

    /// Wrap a data key.
    pub fn wrap_data_key(&self, scope: &str, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.wrap("data-key", scope, key.secret())
    }

    /// Unwrap a data key wrapped for `scope`.
    pub fn unwrap_data_key(&self, scope: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        DataKey::from_secret(self.unwrap("data-key", scope, wrapped)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_file_roundtrip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys/kek");
        let k1 = Kek::create_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = Kek::from_file(&p).unwrap();
        assert_eq!(k1.check_value(), k2.check_value());
        assert!(matches!(
            Kek::create_file(&p),
            Err(CryptoError::KeyFileExists(_))
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::from_file(&p),
            Err(CryptoError::KeyFilePermissions(_))
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Kek::from_file(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Kek::from_file(&p).is_ok());
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(Kek::from_env_value("not base64!").is_err());
        assert!(Kek::from_env_value(&STANDARD.encode([0u8; 16])).is_err());
        assert!(Kek::from_env_value(&STANDARD.encode([7u8; 32])).is_ok());
    }

    #[test]
    fn wrap_binds_purpose_and_scope_and_detects_tampering() {
        let (kek, _) = Kek::generate().unwrap();
        let (other, _) = Kek::generate().unwrap();
        let dk = DataKey::generate().unwrap();
        let w = kek.wrap_data_key("patient:1", &dk).unwrap();
        let back = kek.unwrap_data_key("patient:1", &w).unwrap();
        assert_eq!(back.secret().expose(), dk.secret().expose());
        assert!(kek.unwrap_data_key("patient:2", &w).is_err());
        assert!(kek.unwrap("token-key", "patient:1", &w).is_err());
        assert!(other.unwrap_data_key("patient:1", &w).is_err());
        for i in 0..w.len() {
            let mut t = w.clone();
            t[i] ^= 1;
            assert!(kek.unwrap_data_key("patient:1", &t).is_err(), "byte {i}");
        }
        assert!(kek.unwrap_data_key("patient:1", &w[..w.len() - 1]).is_err());
        // Two wraps of the same key differ (fresh nonce).
        assert_ne!(w, kek.wrap_data_key("patient:1", &dk).unwrap());
        assert!(!format!("{kek:?}").contains(&format!("{:?}", dk.secret().expose())));
    }
}
