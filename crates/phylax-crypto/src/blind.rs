//! Keyed blind indexes: how Phylax searches values it never stores.
//!
//! An index entry is `HMAC-SHA-256(index key, len‖part‖len‖part…)`
//! truncated to 128 bits. The parts name the kind of entry and the search
//! parameter before the value, so the same value under two parameters gives
//! unrelated entries, and the length prefixes make the encoding unambiguous.
//! The index key is separate from the data keys and wrapped by the KEK.
//!
//! The key rotates (docs/KEYS.md): while the index is rebuilt under a new
//! key, new entries are written under the new key and a search looks for
//! a value under both ([`BlindIndexKey::entries`]), so it finds resources
//! whether they have been re-indexed yet or not.
//!
//! What an index reveals (see docs/THREAT_MODEL.md): equality of values
//! within one parameter (so frequencies), and, for string prefixes, how many
//! prefix entries a value has (its length, up to the prefix limit). Without
//! the key it does not reveal the values, and a guess cannot be checked.

use crate::{CryptoError, Kek, MacKey};
use std::fmt;

/// Length of an index entry in bytes.
pub const BLIND_LEN: usize = 16;

pub struct BlindIndexKey {
    current: MacKey,
    /// The key being replaced, while the index is rebuilt.
    previous: Option<MacKey>,
}

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexKey([REDACTED])")
    }
}

pub const PURPOSE: &str = "blind-index";

/// The wrapping purpose of index key generation `n` (1: the original).
pub fn purpose(n: u32) -> String {
    if n <= 1 {
        PURPOSE.to_owned()
    } else {
        format!("{PURPOSE}@{n}")
    }
}

/// The wrapping purpose of the audit log's patient index key (instances
/// made before it existed use [`PURPOSE`], generation 1, for both).
pub const AUDIT_PURPOSE: &str = "audit-patient";

impl BlindIndexKey {
    pub fn generate_wrapped(kek: &Kek) -> Result<(BlindIndexKey, Vec<u8>), CryptoError> {
        BlindIndexKey::generate_wrapped_as(kek, PURPOSE)
    }

    /// A new key for index key generation `n`.
    pub fn generate_wrapped_gen(
        kek: &Kek,
        n: u32,
    ) -> Result<(BlindIndexKey, Vec<u8>), CryptoError> {
        BlindIndexKey::generate_wrapped_as(kek, &purpose(n))
    }

    /// A new key wrapped for `purpose` (bound into the wrapping).
    pub fn generate_wrapped_as(
        kek: &Kek,
        purpose: &str,
    ) -> Result<(BlindIndexKey, Vec<u8>), CryptoError> {
        let (k, w) = MacKey::generate_wrapped(kek, purpose)?;
        Ok((
            BlindIndexKey {
                current: k,
                previous: None,
            },
            w,
        ))
    }

    pub fn unwrap(kek: &Kek, wrapped: &[u8]) -> Result<BlindIndexKey, CryptoError> {
        BlindIndexKey::unwrap_as(kek, PURPOSE, wrapped)
    }

    pub fn unwrap_gen(kek: &Kek, n: u32, wrapped: &[u8]) -> Result<BlindIndexKey, CryptoError> {
        BlindIndexKey::unwrap_as(kek, &purpose(n), wrapped)
    }

    pub fn unwrap_as(
        kek: &Kek,
        purpose: &str,
        wrapped: &[u8],
    ) -> Result<BlindIndexKey, CryptoError> {
        Ok(BlindIndexKey {
            current: MacKey::unwrap(kek, purpose, wrapped)?,
            previous: None,
        })
    }

    /// This key, with `previous` (the key it replaces) still searched.
    pub fn with_previous(self, previous: BlindIndexKey) -> BlindIndexKey {
        BlindIndexKey {
            current: self.current,
            previous: Some(previous.current),
        }
    }

    /// Whether a rebuild is under way (searches look under two keys).
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    fn tag(key: &MacKey, parts: &[&[u8]]) -> [u8; BLIND_LEN] {
        let mut msg = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for p in parts {
            msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
            msg.extend_from_slice(p);
        }
        let tag = key.sign(&msg);
        let mut out = [0u8; BLIND_LEN];
        out.copy_from_slice(&tag[..BLIND_LEN]);
        out
    }

    /// The index entry for a tuple of parts, as written (current key).
    pub fn entry(&self, parts: &[&[u8]]) -> [u8; BLIND_LEN] {
        BlindIndexKey::tag(&self.current, parts)
    }

    /// Every entry a search must look for: the current key's and, during
    /// a rebuild, the previous key's.
    pub fn entries(&self, parts: &[&[u8]]) -> Vec<[u8; BLIND_LEN]> {
        let mut out = vec![self.entry(parts)];
        if let Some(p) = &self.previous {
            out.push(BlindIndexKey::tag(p, parts));
        }
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
        // A rebuild: written under the new key, searched under both.
        let (next, _) = BlindIndexKey::generate_wrapped_gen(&kek, 2).unwrap();
        let next = next.with_previous(k2);
        let both = next.entries(&[b"s", b"family", b"smith"]);
        assert_eq!(both.len(), 2);
        assert_eq!(both[1], e, "the old entry is still found");
        assert_eq!(both[0], next.entry(&[b"s", b"family", b"smith"]));
        assert_ne!(both[0], e);
    }
}
