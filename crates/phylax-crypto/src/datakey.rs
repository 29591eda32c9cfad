//! Data keys and the record seal.
//!
//! Record format: `0x01 || salt(24) || AES-256-GCM(ciphertext || tag)`, or
//! after a data-key rotation `0x02 || generation(4, BE) || salt(24) ||
//! AES-256-GCM(…)`: the generation names the key (docs/KEYS.md) and is
//! authenticated with the caller's additional data, so it cannot be
//! relabelled.
//! Each record is encrypted under its own subkey,
//! `HKDF-SHA-256(ikm = data key, salt, info = "phylax/record/v1")`, with an
//! all-zero nonce. Because every subkey encrypts exactly one message, a
//! (key, nonce) pair can only repeat if two 192-bit random salts collide
//! (probability about n²/2^193 for n records), so nonces never repeat under
//! one key even across several nodes sharing a database and with no
//! coordinated counter. The caller's additional data (resource type, id,
//! version, key scope) is authenticated, so a ciphertext moved to another
//! row or replayed as another version fails to open.

use crate::secret::Secret;
use crate::{random_array, CryptoError};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use std::fmt;

const RECORD_VERSION: u8 = 1;
const RECORD_V2: u8 = 2;
const SALT_LEN: usize = 24;
const TAG_LEN: usize = 16;
const INFO: &[u8] = b"phylax/record/v1";

/// The data-key generation a sealed record names (1 for the original
/// format); `None` for bytes that are no record.
pub fn record_generation(sealed: &[u8]) -> Option<u32> {
    match *sealed.first()? {
        RECORD_VERSION => Some(1),
        RECORD_V2 if sealed.len() >= 5 => {
            let g = u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]);
            (g >= 2).then_some(g)
        }
        _ => None,
    }
}

/// The additional data a record is sealed with: the caller's, and from
/// generation 2 on the generation (the original format stays as it was).
fn gen_aad(aad: &[u8], generation: u32) -> Vec<u8> {
    let mut a = aad.to_vec();
    if generation > 1 {
        a.extend_from_slice(b"\0phylax/data-key-generation\0");
        a.extend_from_slice(&generation.to_be_bytes());
    }
    a
}

/// A 256-bit data key. Zeroized on drop; `Debug` is redacted.
pub struct DataKey {
    secret: Secret,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

impl DataKey {
    pub fn generate() -> Result<DataKey, CryptoError> {
        let mut raw = random_array::<32>()?;
        let k = DataKey::from_secret(Secret::new(raw.to_vec()));
        zeroize::Zeroize::zeroize(&mut raw);
        k
    }

    pub(crate) fn from_secret(secret: Secret) -> Result<DataKey, CryptoError> {
        if secret.len() != 32 {
            return Err(CryptoError::MalformedKey);
        }
        Ok(DataKey { secret })
    }

    pub(crate) fn secret(&self) -> &Secret {
        &self.secret
    }

    fn subkey(&self, salt: &[u8]) -> Result<LessSafeKey, CryptoError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(self.secret.expose());
        let okm = prk
            .expand(&[INFO], &AES_256_GCM)
            .map_err(|_| CryptoError::MalformedKey)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Encrypt `plaintext`, authenticating `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.seal_gen(1, aad, plaintext)
    }

    /// [`DataKey::seal`] by data-key generation `generation` (1: the
    /// original format, without a generation).
    pub fn seal_gen(
        &self,
        generation: u32,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let header: Vec<u8> = if generation <= 1 {
            vec![RECORD_VERSION]
        } else {
            let mut h = vec![RECORD_V2];
            h.extend_from_slice(&generation.to_be_bytes());
            h
        };
        let aad = gen_aad(aad, generation);
        let salt = random_array::<SALT_LEN>()?;
        let key = self.subkey(&salt)?;
        let mut body = Vec::with_capacity(plaintext.len() + TAG_LEN);
        body.extend_from_slice(plaintext);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
            Aad::from(&aad[..]),
            &mut body,
        )
        .map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(header.len() + SALT_LEN + body.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decrypt a record sealed by [`DataKey::seal`] with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_owned(aad, sealed.to_vec())
    }

    /// [`DataKey::open`] of a record the caller owns: decrypted where it
    /// lies and shifted over the header in the same pass (ring's
    /// `open_within`), so a search page's bodies are not copied once more
    /// before decryption. On failure the buffer is dropped: whatever it
    /// holds then was never authenticated and is never returned.
    pub fn open_owned(&self, aad: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
        let generation = record_generation(&sealed).ok_or(CryptoError::Decrypt)?;
        let head = if generation <= 1 && sealed[0] == RECORD_VERSION {
            1
        } else {
            5
        };
        if sealed.len() < head + SALT_LEN + TAG_LEN {
            return Err(CryptoError::Decrypt);
        }
        let aad = gen_aad(aad, generation);
        let key = self.subkey(&sealed[head..head + SALT_LEN])?;
        let n = key
            .open_within(
                Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                Aad::from(&aad[..]),
                &mut sealed,
                head + SALT_LEN..,
            )
            .map_err(|_| CryptoError::Decrypt)?
            .len();
        sealed.truncate(n);
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotated record names its generation, authenticated: relabelled
    /// to another generation (or to the original format) it fails.
    #[test]
    fn generations_are_named_and_bound() {
        let k = DataKey::generate().unwrap();
        let v1 = k.seal(b"ad", b"body").unwrap();
        assert_eq!(record_generation(&v1), Some(1));
        let v3 = k.seal_gen(3, b"ad", b"body").unwrap();
        assert_eq!(record_generation(&v3), Some(3));
        assert_eq!(k.open(b"ad", &v3).unwrap(), b"body");
        assert_eq!(k.open(b"ad", &v1).unwrap(), b"body");
        let mut relabelled = v3.clone();
        relabelled[4] = 4;
        assert!(k.open(b"ad", &relabelled).is_err());
        let mut as_v1 = vec![1u8];
        as_v1.extend_from_slice(&v3[5..]);
        assert!(k.open(b"ad", &as_v1).is_err());
        assert_eq!(record_generation(&[2, 0, 0, 0, 1]), None, "2 and up only");
        assert_eq!(record_generation(b""), None);
    }

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let k = DataKey::generate().unwrap();
        let c = k.seal(b"Patient/1/1", b"{\"name\":\"x\"}").unwrap();
        assert_eq!(k.open(b"Patient/1/1", &c).unwrap(), b"{\"name\":\"x\"}");
        assert!(
            k.open(b"Patient/1/2", &c).is_err(),
            "replayed as another version"
        );
        assert!(k.open(b"Patient/2/1", &c).is_err(), "moved to another id");
        let other = DataKey::generate().unwrap();
        assert!(other.open(b"Patient/1/1", &c).is_err(), "wrong key");
        for i in 0..c.len() {
            let mut t = c.clone();
            t[i] ^= 0x80;
            assert!(k.open(b"Patient/1/1", &t).is_err(), "tampered byte {i}");
        }
        assert!(k.open(b"Patient/1/1", &c[..10]).is_err());
        assert!(k.open(b"Patient/1/1", &[]).is_err());
    }

    #[test]
    fn open_owned_shifts_the_plaintext_over_the_header() {
        let k = DataKey::generate().unwrap();
        for len in [0usize, 1, 15, 16, 17, 4096, 70_001] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let c = k.seal(b"Patient/1/1", &plain).unwrap();
            assert_eq!(k.open_owned(b"Patient/1/1", c.clone()).unwrap(), plain);
            let mut t = c.clone();
            let last = t.len() - 1;
            t[last] ^= 1;
            assert!(k.open_owned(b"Patient/1/1", t).is_err(), "tampered tag");
            assert!(k.open_owned(b"Patient/1/2", c).is_err(), "other aad");
        }
    }

    #[test]
    fn same_plaintext_never_gives_same_ciphertext() {
        let k = DataKey::generate().unwrap();
        let a = k.seal(b"x", b"same").unwrap();
        let b = k.seal(b"x", b"same").unwrap();
        assert_ne!(a, b);
        assert_ne!(a[1..25], b[1..25], "fresh salt per record");
        assert!(!a.windows(4).any(|w| w == b"same"));
    }
}
