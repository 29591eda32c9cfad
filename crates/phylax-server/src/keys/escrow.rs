//! `phylax keys escrow`: the KEK kept recoverable apart from the
//! instance. Every software generation is encrypted with age to each
//! custodian's X25519 recipient (any one of them can recover it with the
//! standard `age` tool) and written to a new file; the escrow is recorded
//! in the audit log first (who can recover the KEK is itself evidence).
//! A KEK in an HSM is refused: it cannot leave the device, and its
//! recovery is the HSM's own backup (docs/KEYS.md, "Escrow of the KEK").

use super::{KeyAdmin, KeysError};
use phylax_audit::event::Action;
use phylax_crypto::kek::Recipients;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// What an escrow wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Escrowed {
    /// KEK generations in the file.
    pub generations: Vec<u32>,
    /// How many recipients can open it.
    pub recipients: usize,
    pub file: String,
}

impl KeyAdmin<'_> {
    /// Encrypt the KEK to `to` and write it to `out`, which must not
    /// exist: written under a temporary name, synced, then renamed, so a
    /// crash leaves no file that looks complete.
    pub async fn escrow_kek(&self, to: &Recipients, out: &Path) -> Result<Escrowed, KeysError> {
        // Not where the instance's own backups would carry it along.
        let parent = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let (Ok(dir), Ok(data)) = (parent.canonicalize(), self.data_dir.canonicalize()) {
            if dir.starts_with(&data) {
                return Err(KeysError::Escrow(format!(
                    "{} is inside the data directory; keep the escrow apart from the instance",
                    out.display()
                )));
            }
        }
        if out.symlink_metadata().is_ok() {
            return Err(KeysError::Escrow(format!(
                "{} exists; escrow writes a new file",
                out.display()
            )));
        }
        let (generations, sealed) = self.kek.escrow(to)?;
        // Who can recover the KEK is itself evidence: the recipients'
        // public keys and the operating-system user go on the record.
        let uid = super::os_uid();
        let to_whom = to.names().join(" ");
        self.audit(
            "key-escrow",
            Action::Read,
            format!(
                "KEK generations {generations:?} escrowed (age) by uid {uid} to {} recipient(s): {to_whom}",
                to.len()
            ),
        )
        .await?;
        if let Err(e) = write_new(out, &sealed) {
            // The record above says it was asked for; this one that no
            // file came of it.
            self.audit(
                "key-escrow",
                Action::Read,
                format!("KEK escrow by uid {uid} not written: {}", e.kind()),
            )
            .await?;
            return Err(KeysError::Escrow(format!(
                "cannot write {}: {e}",
                out.display()
            )));
        }
        Ok(Escrowed {
            generations,
            recipients: to.len(),
            file: out.display().to_string(),
        })
    }
}

/// Write `bytes` to a new file at `path` (0600) by way of a temporary
/// name in the same directory: synced, then linked to `path` (which
/// fails if anything, even a dangling symbolic link, is there: no
/// check-then-rename race), the temporary name removed, the directory
/// synced. On any error the temporary file is removed.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let done = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    done?;
    std::fs::File::open(&dir)?.sync_all()
}
