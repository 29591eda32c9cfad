//! KEK generations as text: the key file and the `PHYLAX_KEK` variable.
//!
//! One entry per generation, `N:BASE64` (N from 1 to 1,000,000), separated
//! by newlines or commas. A single bare `BASE64` entry is generation 1: the
//! format of every key file written before generations existed, still read
//! as is. Lines starting with `#` are comments; a key file's
//! `# owner: DIR` line names the data directory of the instance whose
//! rotations may rewrite it (a copy of that instance must not).
//! Files are written whole to a temporary file (0600) and renamed over the
//! old one, then the directory is synced, so a crash leaves the old file or
//! the new one, never half of either.

use crate::secret::Secret;
use crate::CryptoError;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The highest generation number a key file may name.
pub(super) const MAX_GENERATION: u32 = 1_000_000;

const OWNER: &str = "# owner: ";

/// The data directory a key file names as its owner, if any.
pub(super) fn owner(path: &Path) -> Result<Option<String>, CryptoError> {
    let text = Secret::new(std::fs::read(path).map_err(io)?);
    let text = std::str::from_utf8(text.expose()).map_err(|_| CryptoError::MalformedKey)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(OWNER))
        .map(|o| o.trim().to_owned()))
}

/// Parse the text of a key file or of `PHYLAX_KEK` into generations.
pub(super) fn parse(text: &str) -> Result<BTreeMap<u32, Secret>, CryptoError> {
    let entries: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut out = BTreeMap::new();
    for e in &entries {
        let (gen, b64) = match e.split_once(':') {
            Some((n, b)) => (
                n.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_GENERATION).contains(n))
                    .ok_or(CryptoError::MalformedKey)?,
                b.trim(),
            ),
            None if entries.len() == 1 => (1, *e),
            None => return Err(CryptoError::MalformedKey),
        };
        let raw = Secret::new(
            STANDARD
                .decode(b64)
                .map_err(|_| CryptoError::MalformedKey)?,
        );
        if raw.len() != 32 || out.insert(gen, raw).is_some() {
            return Err(CryptoError::MalformedKey);
        }
    }
    if out.is_empty() {
        return Err(CryptoError::MalformedKey);
    }
    Ok(out)
}

/// The text for a set of generations, oldest first.
#[cfg(test)]
pub(super) fn render(gens: &BTreeMap<u32, Secret>) -> Secret {
    render_owned(gens, None)
}

/// The text for a set of generations, oldest first, without an owner
/// line (an escrowed copy belongs to no running instance).
pub(super) fn render_plain(gens: &BTreeMap<u32, Secret>) -> Secret {
    render_owned(gens, None)
}

fn render_owned(gens: &BTreeMap<u32, Secret>, owner: Option<&str>) -> Secret {
    let mut s = String::new();
    if let Some(o) = owner {
        s.push_str(&format!("{OWNER}{o}\n"));
    }
    for (n, k) in gens {
        s.push_str(&format!("{n}:{}\n", STANDARD.encode(k.expose())));
    }
    Secret::new(s.into_bytes())
}

fn io(e: std::io::Error) -> CryptoError {
    CryptoError::KeyFileIo(e.kind().to_string())
}

/// Read a key file, refusing one readable by group or others.
pub(super) fn read_file(path: &Path) -> Result<BTreeMap<u32, Secret>, CryptoError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CryptoError::KeyFilePermissions(path.display().to_string()));
    }
    let text = Secret::new(std::fs::read(path).map_err(io)?);
    parse(std::str::from_utf8(text.expose()).map_err(|_| CryptoError::MalformedKey)?)
}

/// Write a key file atomically with mode 0600, keeping its owner line
/// unless `new_owner` replaces it. `create_new` refuses an existing file
/// (`init`: losing a KEK loses the data).
pub(super) fn write_file(
    path: &Path,
    gens: &BTreeMap<u32, Secret>,
    create_new: bool,
    new_owner: Option<&str>,
) -> Result<(), CryptoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().ok_or(CryptoError::MalformedKey)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    if create_new && path.exists() {
        return Err(CryptoError::KeyFileExists(path.display().to_string()));
    }
    let owner = match new_owner {
        Some(o) => Some(o.to_owned()),
        None if !create_new => owner(path)?,
        None => None,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let text = render_owned(gens, owner.as_deref());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.expose())
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    drop(f);
    if create_new {
        // Never replace a file that appeared meanwhile.
        std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                CryptoError::KeyFileExists(path.display().to_string())
            }
            k => CryptoError::KeyFileIo(k.to_string()),
        })?;
        std::fs::remove_file(&tmp).map_err(io)?;
    } else {
        std::fs::rename(&tmp, path).map_err(io)?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn legacy_and_generation_formats() {
        let k = STANDARD.encode([7u8; 32]);
        assert_eq!(parse(&k).unwrap().keys().copied().collect::<Vec<_>>(), [1]);
        let two = format!("1:{k}\n2:{}\n", STANDARD.encode([8u8; 32]));
        let commented = format!("# owner: /srv/x\n{two}");
        assert_eq!(parse(&commented).unwrap().len(), 2);
        assert_eq!(
            parse(&two).unwrap().keys().copied().collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(parse(&two.replace('\n', ",")).unwrap().len(), 2);
        let back = render(&parse(&two).unwrap());
        assert_eq!(std::str::from_utf8(back.expose()).unwrap(), two);
        for bad in [
            "",
            "x",
            &format!("{k},{k}"),
            &format!("0:{k}"),
            &format!("1000001:{k}"),
            &format!("1:{k},1:{k}"),
            &format!("1:{}", STANDARD.encode([1u8; 16])),
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
