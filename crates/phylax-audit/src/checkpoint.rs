//! Signed tree heads ("checkpoints") in the C2SP formats used by
//! transparency logs (`tlog-checkpoint` inside a `signed-note`):
//!
//! ```text
//! phylax/<instance>          ← origin: names the log
//! 1234                       ← tree size
//! 3q2+7w…=                   ← root hash, base64
//! timestamp 1764322222123    ← extension line: ms since the epoch
//!
//! — phylax/<instance> AbCd…  ← key hash (4 bytes) ‖ Ed25519 signature, base64
//! ```
//!
//! The verifier key is one line, `<name>+<key hash hex>+<base64(0x01 ‖
//! public key)>`, the `note` verifier key format, so off-the-shelf tools
//! (Go's `golang.org/x/mod/sumdb/note`, Sigsum/transparency-dev witnesses)
//! can check a checkpoint without Phylax. The signature covers the text
//! above the blank line, byte for byte.

use crate::merkle::Hash;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::digest::{Context, SHA256};
use ring::signature::{UnparsedPublicKey, ED25519};

/// The signed-note algorithm byte for Ed25519.
const ALG_ED25519: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("malformed verifier key")]
    BadKey,
    #[error("no signature by the expected key")]
    NoSignature,
    #[error("the signature does not verify")]
    BadSignature,
}

/// A tree head: the log named `origin` had `size` records with this root
/// at `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub time_ms: i64,
}

impl Checkpoint {
    /// The note text that is signed.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\ntimestamp {}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root),
            self.time_ms
        )
    }

    /// Parse note text (without signatures).
    pub fn parse_body(text: &str) -> Result<Checkpoint, CheckpointError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::Malformed("text must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty() && !o.contains(char::is_whitespace))
            .ok_or(CheckpointError::Malformed("origin"))?;
        let size_s = lines.next().ok_or(CheckpointError::Malformed("size"))?;
        // Decimal without leading zeros or signs, as the format requires.
        if size_s.is_empty()
            || !size_s.bytes().all(|b| b.is_ascii_digit())
            || (size_s.len() > 1 && size_s.starts_with('0'))
        {
            return Err(CheckpointError::Malformed("size"));
        }
        let size = size_s
            .parse()
            .map_err(|_| CheckpointError::Malformed("size"))?;
        let root: Hash = STANDARD
            .decode(lines.next().ok_or(CheckpointError::Malformed("root"))?)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(CheckpointError::Malformed("root"))?;
        let mut time_ms = None;
        for l in lines {
            if let Some(t) = l.strip_prefix("timestamp ") {
                time_ms = Some(
                    t.parse()
                        .map_err(|_| CheckpointError::Malformed("timestamp"))?,
                );
            } else if l.is_empty() {
                return Err(CheckpointError::Malformed("blank line in the text"));
            }
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            time_ms: time_ms.ok_or(CheckpointError::Malformed("timestamp"))?,
        })
    }

    /// The signed note: the body, a blank line and one signature line.
    /// `sign` is given the body bytes and returns the 64-byte signature.
    pub fn sign(&self, key: &VerifierKey, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let body = self.body();
        let mut sig = key.key_hash().to_vec();
        sig.extend(sign(body.as_bytes()));
        format!("{body}\n\u{2014} {} {}\n", key.name, STANDARD.encode(sig))
    }
}

/// A signed checkpoint's text checked against a verifier key.
/// [`open_signed`] with any of `keys` (a log whose key rotated: older
/// checkpoints carry an older key's signature). The error of the key the
/// note names if it names one of them, else "no signature by a known key".
pub fn open_signed_any(note: &str, keys: &[VerifierKey]) -> Result<Checkpoint, CheckpointError> {
    let mut last = None;
    for k in keys {
        match open_signed(note, k) {
            Ok(cp) => return Ok(cp),
            Err(CheckpointError::NoSignature) => {}
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(CheckpointError::NoSignature))
}

pub fn open_signed(note: &str, key: &VerifierKey) -> Result<Checkpoint, CheckpointError> {
    let (body, sigs) = note
        .split_once("\n\n")
        .ok_or(CheckpointError::Malformed("no signature block"))?;
    let body = format!("{body}\n");
    let prefix = format!("\u{2014} {} ", key.name);
    let mut found = false;
    for line in sigs.lines() {
        let Some(b64) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(raw) = STANDARD.decode(b64) else {
            continue;
        };
        if raw.len() != 4 + 64 || raw[..4] != key.key_hash() {
            continue;
        }
        found = true;
        if UnparsedPublicKey::new(&ED25519, key.public)
            .verify(body.as_bytes(), &raw[4..])
            .is_ok()
        {
            let cp = Checkpoint::parse_body(&body)?;
            if cp.origin != key.name {
                return Err(CheckpointError::Malformed("origin is not the key's name"));
            }
            return Ok(cp);
        }
    }
    Err(if found {
        CheckpointError::BadSignature
    } else {
        CheckpointError::NoSignature
    })
}

/// A public Ed25519 key with the log's name: everything a verifier needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    public: [u8; 32],
}

impl VerifierKey {
    pub fn new(name: &str, public: [u8; 32]) -> Result<VerifierKey, CheckpointError> {
        if name.is_empty() || name.contains(char::is_whitespace) || name.contains('+') {
            return Err(CheckpointError::BadKey);
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's signature of `domain ‖ "\n" ‖ msg` (a
    /// statement other than a checkpoint, such as a backup's manifest;
    /// see `AuditLog::sign_statement`).
    pub fn verify_statement(&self, domain: &str, msg: &[u8], sig: &[u8]) -> bool {
        let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
        m.extend_from_slice(domain.as_bytes());
        m.push(b'\n');
        m.extend_from_slice(msg);
        UnparsedPublicKey::new(&ED25519, self.public)
            .verify(&m, sig)
            .is_ok()
    }

    /// SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key), first four bytes.
    pub fn key_hash(&self) -> [u8; 4] {
        let mut c = Context::new(&SHA256);
        c.update(self.name.as_bytes());
        c.update(b"\n");
        c.update(&[ALG_ED25519]);
        c.update(&self.public);
        let d = c.finish();
        let mut out = [0u8; 4];
        out.copy_from_slice(&d.as_ref()[..4]);
        out
    }

    /// `<name>+<key hash hex>+<base64(0x01 ‖ key)>`.
    pub fn encode(&self) -> String {
        let mut k = vec![ALG_ED25519];
        k.extend_from_slice(&self.public);
        let h: String = self.key_hash().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}+{h}+{}", self.name, STANDARD.encode(k))
    }

    pub fn parse(s: &str) -> Result<VerifierKey, CheckpointError> {
        // The base64 key may itself contain '+': split at the first two.
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CheckpointError::BadKey);
        };
        let raw = STANDARD.decode(key).map_err(|_| CheckpointError::BadKey)?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(CheckpointError::BadKey);
        }
        let mut public = [0u8; 32];
        public.copy_from_slice(&raw[1..]);
        let vk = VerifierKey::new(name, public)?;
        let want: String = vk.key_hash().iter().map(|b| format!("{b:02x}")).collect();
        if want != hash {
            return Err(CheckpointError::BadKey);
        }
        Ok(vk)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn pair() -> (Ed25519KeyPair, VerifierKey) {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let vk =
            VerifierKey::new("phylax/test", kp.public_key().as_ref().try_into().unwrap()).unwrap();
        (kp, vk)
    }

    fn cp() -> Checkpoint {
        Checkpoint {
            origin: "phylax/test".into(),
            size: 42,
            root: [7u8; 32],
            time_ms: 1_764_322_222_123,
        }
    }

    #[test]
    fn round_trip_and_key_encoding() {
        let (kp, vk) = pair();
        let note = cp().sign(&vk, |m| kp.sign(m).as_ref().to_vec());
        assert_eq!(open_signed(&note, &vk).unwrap(), cp());
        let again = VerifierKey::parse(&vk.encode()).unwrap();
        assert_eq!(again, vk);
        assert!(note.contains("\n\n\u{2014} phylax/test "));
    }

    #[test]
    fn tampering_is_detected() {
        let (kp, vk) = pair();
        let note = cp().sign(&vk, |m| kp.sign(m).as_ref().to_vec());
        // A changed size, root or time.
        for (from, to) in [("\n42\n", "\n43\n"), ("timestamp 1", "timestamp 2")] {
            let bad = note.replacen(from, to, 1);
            assert_eq!(open_signed(&bad, &vk), Err(CheckpointError::BadSignature));
        }
        // Another key with the same name.
        let (_, other) = pair();
        assert_eq!(
            open_signed(&note, &other),
            Err(CheckpointError::NoSignature)
        );
        // A tampered key string.
        let enc = vk.encode();
        let bad_hash = enc.replacen('+', "+0", 1);
        assert!(VerifierKey::parse(&bad_hash).is_err());
        assert!(VerifierKey::parse("x+00000000+AAAA").is_err());
        // Malformed bodies.
        for b in [
            "o\n01\nAAAA\ntimestamp 1\n",
            "o\n1\n",
            "o\n1\nAAAA\ntimestamp 1",
        ] {
            assert!(Checkpoint::parse_body(b).is_err(), "{b:?}");
        }
    }
}
