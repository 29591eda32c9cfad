//! age encryption of backup archives (docs/BACKUP.md): a stream encrypted
//! to X25519 recipients ([`Recipients`], the same as the KEK escrow's), in
//! the file format the standard `age` tool reads, so that any holder of
//! one recipient's identity can decrypt it with `age -d -i key.txt`.
//! Backups are large: both directions stream.

use crate::kek::Recipients;
use crate::CryptoError;
use std::io::{Read, Write};
use std::str::FromStr;

fn err(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Archive(e.to_string())
}

/// A writer that encrypts everything written to it; [`Sealing::finish`]
/// writes the last chunk (without it the archive is truncated, and refused).
pub struct Sealing<W: Write>(age::stream::StreamWriter<W>);

impl<W: Write> std::fmt::Debug for Sealing<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealing")
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Sealing<W> {
    /// The final chunk; gives back the inner writer (to sync it).
    pub fn finish(self) -> std::io::Result<W> {
        self.0.finish()
    }
}

/// Encrypt what is written to `out` to every recipient in `to`.
pub fn seal<W: Write>(to: &Recipients, out: W) -> Result<Sealing<W>, CryptoError> {
    // As with the escrow: the age crate panics on a low-order recipient
    // instead of refusing it (the panic happens when the file key is
    // wrapped, here).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let enc = age::Encryptor::with_recipients(to.iter().map(|r| r as &dyn age::Recipient))
            .map_err(err)?;
        enc.wrap_output(out).map_err(err)
    }));
    std::panic::set_hook(hook);
    let w = caught.map_err(|_| {
        CryptoError::Archive(
            "a recipient is not a usable X25519 public key (low-order point)".into(),
        )
    })??;
    Ok(Sealing(w))
}

/// age X25519 identities (`AGE-SECRET-KEY-1…` lines, as `age-keygen`
/// writes them; `#` comments and blank lines skipped). The secret keys
/// zeroize on drop (the age crate's own types) and never print.
pub struct Identities(Vec<age::x25519::Identity>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({})", self.0.len())
    }
}

impl Identities {
    /// Parse an identity file's text. The error names the line, never its
    /// content.
    pub fn parse(text: &str) -> Result<Identities, CryptoError> {
        let mut out = Vec::new();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let id = age::x25519::Identity::from_str(l).map_err(|_| {
                CryptoError::Archive(format!(
                    "line {} of the identity file is not an age X25519 identity (AGE-SECRET-KEY-1…)",
                    i + 1
                ))
            })?;
            out.push(id);
        }
        if out.is_empty() {
            return Err(CryptoError::Archive(
                "no identity in the identity file".into(),
            ));
        }
        Ok(Identities(out))
    }
}

/// Decrypt `input` with any of `ids`. Reading the result fails (an I/O
/// error) where the archive was altered or cut short: age authenticates
/// every 64 KiB chunk and marks the last one.
pub fn open<R: Read>(ids: &Identities, input: R) -> Result<impl Read, CryptoError> {
    let d = age::Decryptor::new(input).map_err(|e| match e {
        age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => {
            CryptoError::Archive("not an age file (or its header is damaged)".into())
        }
        e => err(e),
    })?;
    d.decrypt(ids.0.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                CryptoError::Archive("the archive is not encrypted to this identity".into())
            }
            e => err(e),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use age::secrecy::ExposeSecret;

    fn pair() -> (Identities, Recipients) {
        let id = age::x25519::Identity::generate();
        let r = Recipients::parse([id.to_public().to_string().as_str()]).unwrap();
        let ids =
            Identities::parse(&format!("# test\n{}\n", id.to_string().expose_secret())).unwrap();
        (ids, r)
    }

    #[test]
    fn round_trip_and_tampering() {
        let (ids, to) = pair();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = seal(&to, Vec::new()).unwrap();
        w.write_all(&data).unwrap();
        let sealed = w.finish().unwrap();
        let mut back = Vec::new();
        open(&ids, &sealed[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        // A flipped byte in the payload, and a truncated file, fail to read.
        let mut bad = sealed.clone();
        let n = bad.len() - 1000;
        bad[n] ^= 1;
        let mut sink = Vec::new();
        assert!(open(&ids, &bad[..])
            .unwrap()
            .read_to_end(&mut sink)
            .is_err());
        let cut = &sealed[..sealed.len() - 70_000];
        assert!(open(&ids, cut).unwrap().read_to_end(&mut sink).is_err());
        // Another identity cannot open it.
        let (other, _) = pair();
        assert!(open(&other, &sealed[..]).is_err());
        assert!(Identities::parse("# nothing\n").is_err());
        assert!(Identities::parse("AGE-SECRET-KEY-1NOPE").is_err());
    }
}
