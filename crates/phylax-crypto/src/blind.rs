//! Keyed blind indexes: how Phylax searches values it never stores.
//!
//! An index entry is `HMAC-SHA-256(index key, len‖part‖len‖part…)`
//! truncated to 128 bits. The parts name the kind of entry and the search
//! parameter before the value, so the same value under two parameters gives
//! unrelated entries, and the length prefixes make the encoding unambiguous.
//! The index key is separate from the data keys and wrapped by the KEK.
//!
//! What an index reveals (see docs/THREAT_MODEL.md): equality of values
//! within one parameter (so frequencies), and, for string prefixes, how many
//! prefix entries a value has (its length, up to the prefix limit). Without
//! the key it does not reveal the values, and a guess cannot be checked.

use crate::{CryptoError, Kek, MacKey};
use std::fmt;

/// Length of an index entry in bytes.
pub const BLIND_LEN: usize = 16;

pub struct BlindIndexKey(MacKey);

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexKey([REDACTED])")
    }
}

pub const PURPOSE: &str = "blind-index";

impl BlindIndexKey {
    pub fn generate_wrapped(kek: &Kek) -> Result<(BlindIndexKey, Vec<u8>), CryptoError> {
        let (k, w) = MacKey::generate_wrapped(kek, PURPOSE)?;
        Ok((BlindIndexKey(k), w))
    }

    pub fn unwrap(kek: &Kek, wrapped: &[u8]) -> Result<BlindIndexKey, CryptoError> {
        Ok(BlindIndexKey(MacKey::unwrap(kek, PURPOSE, wrapped)?))
    }

    /// The index entry for a tuple of parts.
    pub fn entry(&self, parts: &[&[u8]]) -> [u8; BLIND_LEN] {
        let mut msg = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for p in parts {
            msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
            msg.extend_from_slice(p);
        }
        let tag = self.0.sign(&msg);
        let mut out = [0u8; BLIND_LEN];
        out.copy_from_slice(&tag[..BLIND_LEN]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_keyed_deterministic_and_unambiguous() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, w) = BlindIndexKey::generate_wrapped(&kek).unwrap();
        let k2 = BlindIndexKey::unwrap(&kek, &w).unwrap();
        let e = k.entry(&[b"s", b"family", b"smith"]);
        assert_eq!(
            e,
            k2.entry(&[b"s", b"family", b"smith"]),
            "deterministic under one key"
        );
        assert_ne!(
            e,
            k.entry(&[b"s", b"given", b"smith"]),
            "parameter separates"
        );
        assert_ne!(
            k.entry(&[b"ab", b"c"]),
            k.entry(&[b"a", b"bc"]),
            "length-prefixed"
        );
        let (other, _) = BlindIndexKey::generate_wrapped(&kek).unwrap();
        assert_ne!(e, other.entry(&[b"s", b"family", b"smith"]), "keyed");
        assert!(!e.windows(5).any(|w| w == b"smith"));
        assert!(BlindIndexKey::unwrap(&kek, b"garbage").is_err());
    }
}
