//! Backups and restores (`phylax backup …`, `phylax restore`), for the
//! operator's CLI only (no HTTP route reaches them). docs/BACKUP.md says
//! what a backup holds, how it is encrypted and signed, and how to restore.
//!
//! A backup is one file: a tar stream encrypted with age to the custodians'
//! X25519 recipients. Inside, a consistent copy of the database (resource
//! bodies still sealed under their data keys, keys still wrapped under the
//! KEK, which is never inside), the configuration, the TLS certificates
//! (not their private keys), the audit journal, the newest signed
//! checkpoint and the audit tree's leaf hashes, and last a manifest signed
//! with the instance's checkpoint key that lists every file's SHA-256.
//!
//! # Layout
//! Bottom first:
//! - [`manifest`]: what a backup states about itself, its signature, and
//!   checking a backup's contents against it;
//! - [`archive`]: the tar-in-age container: writing entries while hashing
//!   them, reading them back (refusing anything unexpected);
//! - [`create`]: taking a backup while servers serve;
//! - [`restore`]: verifying a backup, restoring it into an empty place,
//!   re-applying erasures and proving the result opens and verifies;
//! - [`drill`]: restore drills: timed, recorded in the audit log and
//!   exported as metrics;
//! - [`schedule`]: backups taken by a serving node on a schedule, and
//!   their retention.

pub mod archive;
pub mod create;
pub mod drill;
pub mod manifest;
pub mod restore;
pub mod schedule;

use phylax_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Asked for something a backup or restore does not do (a target that
    /// exists, a backup of another instance…).
    #[error("{0}")]
    Refused(String),
    /// The archive cannot be read to its end: altered, cut short, or not
    /// for this identity.
    #[error("the archive is damaged or cut short: {0}")]
    Damaged(String),
    /// The archive reads, but does not match its signed manifest.
    #[error("the backup does not verify: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] phylax_crypto::CryptoError),
    #[error("not recorded in the audit log, so not done: {0}")]
    Audit(String),
    #[error(transparent)]
    Instance(#[from] Box<crate::instance::InstanceError>),
    /// The restored copy does not open, verify or decrypt.
    #[error("the restored instance fails its checks: {0}")]
    Restored(String),
}

impl From<crate::instance::InstanceError> for BackupError {
    fn from(e: crate::instance::InstanceError) -> Self {
        BackupError::Instance(Box::new(e))
    }
}

/// Progress of a long step: its name, work done and total (bytes or
/// records; total 0 when unknown).
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

fn io(what: impl std::fmt::Display, e: std::io::Error) -> BackupError {
    BackupError::Io(format!("{what}: {e}"))
}

/// Sync a directory (a rename or link in it is durable after this).
fn sync_dir(dir: &std::path::Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(format!("syncing {}", dir.display()), e))
}

/// A private directory (0700) that is removed, with its contents, when
/// dropped unless kept: work in progress a crash or error must not leave
/// looking finished.
#[derive(Debug)]
struct Scratch {
    path: std::path::PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(path: std::path::PathBuf) -> Result<Scratch, BackupError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| io(format!("creating {}", path.display()), e))?;
        Ok(Scratch { path, keep: false })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
