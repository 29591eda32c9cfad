//! A backup's manifest: what it holds (every file with its SHA-256 and
//! size), what the database copy held (counts, the audit tree's size and
//! root, the KEK generations its keys are wrapped under, the erasure
//! register), the schema version and the time; signed with the instance's
//! checkpoint key (Ed25519) under a domain line of its own. Checking a
//! backup ([`Contents::check`]) needs no key of the instance: the verifier
//! keys are public (`phylax audit key`), and the one that signed must be
//! among those the operator trusts when they name any.

use super::BackupError;
use base64::{engine::general_purpose::STANDARD, Engine};
use phylax_audit::checkpoint::{open_signed_any, VerifierKey};
use phylax_audit::merkle;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The domain line a manifest's signature covers (never a checkpoint's
/// first line, which is the log's name).
pub const DOMAIN: &str = "phylax-backup-manifest/1";
pub const FORMAT: &str = "phylax-backup/1";
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
/// The audit tree's leaf hashes, 32 bytes each, in tree order.
pub const LEAVES: &str = "audit/leaves";
/// The newest signed checkpoint in the database copy.
pub const CHECKPOINT: &str = "audit/checkpoint";
/// The copy kept outside the database (`[audit] checkpoint_file`).
pub const OUTSIDE: &str = "audit/outside-checkpoint";
pub const CONFIG: &str = "config/phylax.toml";
/// The checkpoint keys as stored (wrapped under the KEK), JSON: a restore
/// proves the signer with the KEK before it restores anything.
pub const CHECKPOINT_KEYS: &str = "keys/checkpoint";
pub const CA: &str = "tls/ca.pem";
pub const CERT: &str = "tls/server.pem";
/// `[tls] client_ca` (mutual TLS) and `[tls] ocsp`, when configured.
pub const CLIENT_CA: &str = "tls/client-ca.pem";
pub const OCSP: &str = "tls/ocsp.der";
/// The database copy: `db/phylax.db` or `db/phylax.pgdump`.
pub const DB_DIR: &str = "db/";
pub const JOURNAL_DIR: &str = "audit-journal/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub backup_id: String,
    pub instance_id: String,
    /// The audit log's name (`phylax/<instance id>`), its key's name.
    pub origin: String,
    /// Where the instance lived (the KEK's owner names it).
    pub source_data_dir: String,
    pub created_ms: i64,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// PostgreSQL: the schema dumped.
    pub pg_schema: Option<String>,
    pub schema_version: i64,
    pub resources: u64,
    pub versions: u64,
    pub audit_records: u64,
    /// Leaves in the audit tree, and its root (base64).
    pub tree_size: u64,
    pub tree_root: String,
    /// The newest signed checkpoint's size (its root is the tree's at that
    /// size).
    pub checkpoint_size: u64,
    /// KEK generation → stored keys wrapped under it.
    pub kek_generations: BTreeMap<u32, u64>,
    /// Patients in the erasure register (ids only).
    pub erasures: Vec<String>,
    /// Every checkpoint key generation's public key, the signer's first.
    pub verifier_keys: Vec<String>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The manifest's bytes and the signature file's text.
    pub fn sign(
        &self,
        log: &crate::audit::log::AuditLog,
    ) -> Result<(Vec<u8>, String), BackupError> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| BackupError::Io(format!("manifest: {e}")))?;
        let (key, sig) = log.sign_statement(DOMAIN, &bytes);
        Ok((
            bytes,
            format!("{}\n{}\n", key.encode(), STANDARD.encode(sig)),
        ))
    }
}

/// What was read from an archive: the manifest as signed, and every file's
/// hash and size; the small files' bytes.
#[derive(Debug, Default)]
pub struct Contents {
    pub manifest_bytes: Vec<u8>,
    pub signature: String,
    pub files: BTreeMap<String, (u64, String)>,
    pub small: BTreeMap<String, Vec<u8>>,
}

/// A backup that checked out.
#[derive(Debug, Clone)]
pub struct Checked {
    pub manifest: Manifest,
    /// The key that signed it.
    pub signer: VerifierKey,
    pub leaves: Vec<merkle::Hash>,
    /// Outside checkpoints checked: (size, consistent with this backup's
    /// tree, or `None` when newer than the backup).
    pub outside: Vec<(u64, Option<bool>)>,
}

fn invalid(m: impl Into<String>) -> BackupError {
    BackupError::Invalid(m.into())
}

impl Contents {
    /// Check the signature (by a key in `trust`, when it names any), every
    /// file against the manifest (none missing, none extra, none altered),
    /// and the audit tree against the signed checkpoint; then each of the
    /// `outside` checkpoints (signed-note text) no newer than the backup
    /// against the tree.
    pub fn check(&self, trust: &[VerifierKey], outside: &[String]) -> Result<Checked, BackupError> {
        if self.manifest_bytes.is_empty() || self.signature.is_empty() {
            return Err(invalid("no signed manifest (an unfinished or cut archive)"));
        }
        let manifest: Manifest = serde_json::from_slice(&self.manifest_bytes)
            .map_err(|e| invalid(format!("unreadable manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(invalid(format!(
                "unknown backup format {}",
                manifest.format
            )));
        }
        let mut lines = self.signature.lines();
        let (Some(key), Some(sig)) = (lines.next(), lines.next()) else {
            return Err(invalid("malformed manifest signature"));
        };
        let signer = VerifierKey::parse(key).map_err(|_| invalid("malformed signing key"))?;
        let sig = STANDARD
            .decode(sig.trim())
            .map_err(|_| invalid("malformed manifest signature"))?;
        if !signer.verify_statement(DOMAIN, &self.manifest_bytes, &sig) {
            return Err(invalid("the manifest's signature does not verify"));
        }
        if manifest.verifier_keys.first().map(String::as_str) != Some(key.trim())
            || signer.name() != manifest.origin
        {
            return Err(invalid("the manifest is not signed by the key it names"));
        }
        if !trust.is_empty() && !trust.contains(&signer) {
            return Err(invalid(format!(
                "signed by {}, which is not a key you trust (--key): a backup of another instance, or forged",
                signer.encode()
            )));
        }
        self.check_files(&manifest)?;
        let leaves = self.check_tree(&manifest)?;
        let keys = manifest
            .verifier_keys
            .iter()
            .map(|k| VerifierKey::parse(k).map_err(|_| invalid("malformed verifier key")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut notes: Vec<String> = outside.to_vec();
        if let Some(b) = self.small.get(OUTSIDE) {
            notes.push(String::from_utf8_lossy(b).into_owned());
        }
        let mut seen = Vec::new();
        for n in &notes {
            let cp = match open_signed_any(n, &keys) {
                Ok(cp) => cp,
                // Signed by a checkpoint key made after the backup: newer
                // than it, and not checkable against it.
                Err(phylax_audit::checkpoint::CheckpointError::NoSignature) => {
                    seen.push((u64::MAX, None));
                    continue;
                }
                Err(e) => return Err(invalid(format!("an outside checkpoint: {e}"))),
            };
            if cp.size > leaves.len() as u64 {
                seen.push((cp.size, None));
                continue;
            }
            let ok = merkle::root(&leaves[..cp.size as usize]) == cp.root;
            if !ok {
                return Err(invalid(format!(
                    "the outside checkpoint of size {} does not match this backup's audit tree: the log was rewritten",
                    cp.size
                )));
            }
            seen.push((cp.size, Some(true)));
        }
        Ok(Checked {
            manifest,
            signer,
            leaves,
            outside: seen,
        })
    }

    fn check_files(&self, m: &Manifest) -> Result<(), BackupError> {
        let listed: BTreeMap<&str, &FileEntry> =
            m.files.iter().map(|f| (f.path.as_str(), f)).collect();
        for (path, f) in &listed {
            match self.files.get(*path) {
                None => return Err(invalid(format!("{path} is missing"))),
                Some((size, sha)) if *size != f.size || *sha != f.sha256 => {
                    return Err(invalid(format!(
                        "{path} was altered (its SHA-256 differs from the manifest's)"
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self.files.keys().find(|p| !listed.contains_key(p.as_str())) {
            return Err(invalid(format!("{extra} is not in the manifest")));
        }
        if !m.files.iter().any(|f| f.path.starts_with(DB_DIR)) {
            return Err(invalid("no database copy"));
        }
        Ok(())
    }

    /// The leaves file against the manifest, and the signed checkpoint
    /// against the leaves.
    fn check_tree(&self, m: &Manifest) -> Result<Vec<merkle::Hash>, BackupError> {
        let raw = self
            .small
            .get(LEAVES)
            .ok_or_else(|| invalid("no audit leaves"))?;
        if raw.len() % 32 != 0 || (raw.len() / 32) as u64 != m.tree_size {
            return Err(invalid(
                "the audit leaves do not match the manifest's tree size",
            ));
        }
        let leaves: Vec<merkle::Hash> = raw
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        if STANDARD.encode(merkle::root(&leaves)) != m.tree_root {
            return Err(invalid("the audit tree's root differs from the manifest's"));
        }
        if m.checkpoint_size > 0 {
            let note = self
                .small
                .get(CHECKPOINT)
                .ok_or_else(|| invalid("no signed checkpoint"))?;
            let keys = m
                .verifier_keys
                .iter()
                .filter_map(|k| VerifierKey::parse(k).ok())
                .collect::<Vec<_>>();
            let cp = open_signed_any(&String::from_utf8_lossy(note), &keys)
                .map_err(|e| invalid(format!("the signed checkpoint: {e}")))?;
            if cp.size != m.checkpoint_size
                || cp.size > m.tree_size
                || merkle::root(&leaves[..cp.size as usize]) != cp.root
            {
                return Err(invalid(
                    "the signed checkpoint does not match the audit tree in the backup",
                ));
            }
        }
        Ok(leaves)
    }
}
