//! KEK escrow: every software generation, as key-file text, encrypted
//! with age (X25519 recipients) so that whoever holds one of the
//! recipients' identities can recover the KEK with the standard `age`
//! tool (`age -d -i identity.txt kek.age > kek`), and nobody else can.
//! Each recipient alone can decrypt: give the identities to different
//! custodians, kept apart from the data (docs/KEYS.md, "Escrow of the KEK").

use super::{Kek, Provider};
use crate::secret::Secret;
use crate::CryptoError;
use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;

/// The recipients of an escrow, parsed from `age1…` strings (each once).
pub struct Recipients(Vec<age::x25519::Recipient>, Vec<String>);

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipients({})", self.0.len())
    }
}

impl Recipients {
    /// Parse each `age1…` recipient; blank lines and `#` comments (as in
    /// an age recipients file) are skipped. At least one is needed.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<Recipients, CryptoError> {
        let (mut out, mut names) = (Vec::new(), Vec::<String>::new());
        for (i, l) in lines.into_iter().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let r = age::x25519::Recipient::from_str(l).map_err(|e| {
                CryptoError::Escrow(format!(
                    "recipient {} is not an age X25519 recipient (age1…): {e}",
                    i + 1
                ))
            })?;
            // Named twice is one custodian, counted once.
            let name = r.to_string();
            if !names.contains(&name) {
                names.push(name);
                out.push(r);
            }
        }
        if out.is_empty() {
            return Err(CryptoError::Escrow("no recipient".into()));
        }
        Ok(Recipients(out, names))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The parsed recipients (for [`crate::archive::seal`]).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &age::x25519::Recipient> {
        self.0.iter()
    }

    /// The recipients (public keys), for the audit record.
    pub fn names(&self) -> &[String] {
        &self.1
    }
}

impl Kek {
    /// Every generation, as the text of a key file, encrypted with age to
    /// `to`. Refuses when a generation is in an HSM: it cannot leave the
    /// device (its recovery is the HSM's own backup).
    pub fn escrow(&self, to: &Recipients) -> Result<(Vec<u32>, Vec<u8>), CryptoError> {
        for (n, p) in self.generations() {
            if p == Provider::Hsm {
                return Err(CryptoError::HsmEscrow(n));
            }
        }
        let mut soft: BTreeMap<u32, Secret> = BTreeMap::new();
        for s in &self.sources {
            soft.extend(s.software()?.unwrap_or_default());
        }
        let text = super::text::render_plain(&soft);
        // The age crate panics on a recipient that is a low-order point
        // (an all-zero shared secret) instead of refusing it: that is a
        // bad recipient, not a crash.
        // (Quietly: the default hook would print the crate's misleading
        // message before the one-line reason. Escrow runs only in the CLI.)
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seal(to, &text)));
        std::panic::set_hook(hook);
        let sealed = caught.map_err(|_| {
            CryptoError::Escrow(
                "a recipient is not a usable X25519 public key (low-order point)".into(),
            )
        })??;
        Ok((soft.keys().copied().collect(), sealed))
    }
}

fn seal(to: &Recipients, text: &Secret) -> Result<Vec<u8>, CryptoError> {
    let err = |e: &dyn std::fmt::Display| CryptoError::Escrow(e.to_string());
    let enc = age::Encryptor::with_recipients(to.0.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out).map_err(|e| err(&e))?;
    w.write_all(text.expose()).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn open(sealed: &[u8], id: &age::x25519::Identity) -> Result<Vec<u8>, String> {
        let d = age::Decryptor::new(sealed).map_err(|e| e.to_string())?;
        let mut r = d
            .decrypt(std::iter::once(id as &dyn age::Identity))
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn each_recipient_alone_recovers_every_generation_and_nobody_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = Kek::create_file(&path).unwrap();
        kek.add_generation(1).unwrap();
        let (a, b, stranger) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let (pa, pb) = (a.to_public().to_string(), b.to_public().to_string());
        let to = Recipients::parse(["# custodians", "", pa.as_str(), pb.as_str()]).unwrap();
        assert_eq!(to.len(), 2);
        let (gens, sealed) = kek.escrow(&to).unwrap();
        assert_eq!(gens, vec![1, 2]);
        for id in [&a, &b] {
            let text = open(&sealed, id).unwrap();
            let back = crate::kek::text::parse(std::str::from_utf8(&text).unwrap()).unwrap();
            let file = crate::kek::text::read_file(&path).unwrap();
            assert_eq!(back.len(), file.len());
            for (n, k) in &file {
                assert_eq!(back[n].expose(), k.expose(), "generation {n}");
            }
        }
        assert!(open(&sealed, &stranger).is_err());
        // The key bytes do not appear in the sealed file.
        let file = std::fs::read_to_string(&path).unwrap();
        let b64 = file.lines().find(|l| l.starts_with("1:")).unwrap();
        assert!(!sealed.windows(10).any(|w| w == &b64.as_bytes()[2..12]));
    }

    #[test]
    fn bad_recipients_are_refused_by_line() {
        // A low-order point parses, but is refused rather than crashing.
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create_file(&dir.path().join("kek")).unwrap();
        let low =
            Recipients::parse(["age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq5cu47z"]);
        if let Ok(low) = low {
            let e = kek.escrow(&low).unwrap_err();
            assert!(e.to_string().contains("low-order"), "{e}");
        }
        // One custodian named twice is one recipient.
        let a = age::x25519::Identity::generate().to_public().to_string();
        let twice = Recipients::parse([a.as_str(), a.as_str()]).unwrap();
        assert_eq!(twice.len(), 1);
        assert_eq!(twice.names(), [a]);
        let e = Recipients::parse(["age1notarecipient"]).unwrap_err();
        assert!(e.to_string().contains("recipient 1"), "{e}");
        assert!(Recipients::parse(["# only a comment", " "]).is_err());
    }
}
