//! `phylax backup create`: a backup taken while servers serve. The
//! database copy is one consistent snapshot (`SnapshotStore`); the
//! archive is written under a temporary name beside its destination,
//! synced, and linked into place only once complete, so a crash, a kill
//! or a full disk leaves no file that looks like a backup.

use super::archive::{self, Writer};
use super::manifest::{self, Manifest, FORMAT};
use super::{io, sync_dir, BackupError, Progress, Scratch};
use crate::audit::log::AuditLog;
use crate::base::config::Config;
use crate::instance::Instance;
use base64::{engine::general_purpose::STANDARD, Engine};
use phylax_audit::event::Action;
use phylax_crypto::kek::{Kek, Recipients};
use phylax_store::DynStore;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Meta records of finished backups (`backup_v1:<ms>`), for the metrics.
pub const LAST_BACKUP: &str = "backup_v1:";

/// A backup as recorded in the instance's database.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Recorded {
    pub id: String,
    /// Where it was written (absolute).
    pub file: String,
}

/// Every backup this instance recorded, oldest first, with its time (ms).
pub async fn recorded(store: &phylax_store::DynStore) -> Result<Vec<(i64, Recorded)>, BackupError> {
    let mut out: Vec<(i64, Recorded)> = store
        .meta_with_prefix(LAST_BACKUP)
        .await?
        .iter()
        .filter_map(|(k, v)| {
            let t = k.strip_prefix(LAST_BACKUP)?.parse::<i64>().ok()?;
            Some((t, serde_json::from_slice::<Recorded>(v).ok()?))
        })
        .collect();
    out.sort_by_key(|(t, _)| *t);
    Ok(out)
}

/// When the newest backup was written (ms), if any was.
pub async fn last_backup(store: &phylax_store::DynStore) -> Result<Option<i64>, BackupError> {
    Ok(store
        .meta_with_prefix(LAST_BACKUP)
        .await?
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(LAST_BACKUP)?.parse::<i64>().ok())
        .max())
}

/// What a backup reads: an instance opened by the CLI, or a serving
/// node's parts (a scheduled backup).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub store: &'a DynStore,
    pub audit: &'a AuditLog,
    pub config: &'a Config,
    pub data_dir: &'a Path,
}

impl<'a> From<&'a Instance> for Source<'a> {
    fn from(i: &'a Instance) -> Source<'a> {
        Source {
            store: &i.store,
            audit: &i.audit,
            config: &i.config,
            data_dir: &i.data_dir,
        }
    }
}

/// What a backup wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub file: String,
    pub backup_id: String,
    pub bytes: u64,
    pub resources: u64,
    pub versions: u64,
    pub audit_records: u64,
    pub audit_tree_size: u64,
    pub recipients: usize,
    pub seconds: f64,
}

/// The directory `out` goes in, refusing an `out` that exists (even as a
/// dangling link) or lies inside the data directory.
fn destination(inst: Source<'_>, out: &Path) -> Result<PathBuf, BackupError> {
    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent
        .canonicalize()
        .map_err(|e| io(format!("{}", parent.display()), e))?;
    if let Ok(data) = inst.data_dir.canonicalize() {
        if dir.starts_with(&data) {
            return Err(BackupError::Refused(format!(
                "{} is inside the data directory; keep backups apart from the instance",
                out.display()
            )));
        }
    }
    if out.symlink_metadata().is_ok() {
        return Err(BackupError::Refused(format!(
            "{} exists; a backup is written to a new file",
            out.display()
        )));
    }
    Ok(dir)
}

/// The patient ids in the erasure register (`erasure_v1:<id>:<time>`).
pub(crate) fn erased_ids(register: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut ids: Vec<String> = register
        .iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix("erasure_v1:")?;
            Some(rest.rsplit_once(':').map_or(rest, |(id, _)| id).to_owned())
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The patients an instance's erasure register names.
pub async fn erased_patients(store: &phylax_store::DynStore) -> Result<Vec<String>, BackupError> {
    Ok(erased_ids(&store.meta_with_prefix("erasure_v1:").await?))
}

/// Back `inst` up to a new file `out`, encrypted to `to`, reading and
/// writing at most `max_rate` bytes a second (`None`: no limit).
pub async fn create(
    inst: Source<'_>,
    to: &Recipients,
    out: &Path,
    max_rate: Option<u64>,
    progress: Progress<'_>,
) -> Result<Created, BackupError> {
    let started = std::time::Instant::now();
    let dir = destination(inst, out)?;
    let backup_id = uuid::Uuid::new_v4().to_string();
    let who = crate::keys::os_uid();
    // On the record before the snapshot (so the backup holds it): who took
    // a backup, and who can open it.
    inst.audit
        .record_admin(
            "backup",
            Action::Read,
            format!(
                "backup {backup_id} started by uid {who} to {} recipient(s): {}",
                to.len(),
                to.names().join(" ")
            ),
        )
        .await
        .map_err(|e| BackupError::Audit(e.to_string()))?;
    let res = write(inst, to, out, &dir, &backup_id, max_rate, progress).await;
    let outcome = match &res {
        Ok(c) => format!(
            "backup {backup_id} written: {} bytes, {} resources, {} versions, {} audit records",
            c.bytes, c.resources, c.versions, c.audit_records
        ),
        Err(e) => format!("backup {backup_id} failed: {e}"),
    };
    inst.audit
        .record_admin("backup", Action::Read, outcome)
        .await
        .map_err(|e| BackupError::Audit(e.to_string()))?;
    let mut c = res?;
    c.seconds = started.elapsed().as_secs_f64();
    // Recorded: the metrics, the drill (the newest recorded backup) and
    // the scheduler's retention (only recorded backups are deleted) read it.
    let record = serde_json::to_vec(&Recorded {
        id: backup_id.clone(),
        file: c.file.clone(),
    })
    .map_err(|e| BackupError::Io(e.to_string()))?;
    inst.store
        .put_meta_if_absent(
            &format!("{LAST_BACKUP}{:020}", crate::base::clock::now_ms()),
            &record,
        )
        .await?;
    Ok(c)
}

async fn write(
    inst: Source<'_>,
    to: &Recipients,
    out: &Path,
    dir: &Path,
    backup_id: &str,
    max_rate: Option<u64>,
    progress: Progress<'_>,
) -> Result<Created, BackupError> {
    // The snapshot goes into the data directory (0700, the instance's
    // own), not the backup directory, where someone who may write there
    // could swap the working directory for a link to elsewhere.
    let scratch = Scratch::new(inst.data_dir.join(format!(".backup-{backup_id}")))?;
    progress("taking a consistent snapshot of the database", 0, 0);
    // The copy at half the pace: it reads every page of the database and
    // writes it again, which is what costs the servers most (page cache
    // and disk), the archive after it much less (docs/PERFORMANCE.md).
    let snap = inst
        .store
        .snapshot(&scratch.path, max_rate.map(|r| r / 2))
        .await?;
    // The journal after the snapshot: a record acknowledged before it is
    // in one or the other (replays skip what the database already has).
    let journal = journal_files(&inst.data_dir.join("audit-journal"))?;

    // Hashing and encrypting gigabytes is blocking work: off the
    // runtime's worker threads (a scheduled backup shares them with the
    // server's requests).
    let (m, size) = tokio::task::block_in_place(|| -> Result<(Manifest, u64), BackupError> {
        let tmp = dir.join(format!(".{}.{backup_id}.partial", file_name(out)));
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io(format!("creating {}", tmp.display()), e))?
        };
        // Removed unless linked into place.
        struct Partial<'a>(&'a Path);
        impl Drop for Partial<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _partial = Partial(&tmp);
        let mut w = Writer::new(file, to, max_rate)?;
        let db_name = snap
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BackupError::Io("snapshot file name".into()))?;
        w.add_file(
            &format!("{}{db_name}", manifest::DB_DIR),
            &snap.file,
            progress,
        )?;
        add_small_files(&mut w, inst, &snap.facts, &journal)?;
        let m = manifest_for(inst, &snap, backup_id, w.files().to_vec());
        let (bytes, sig) = m.sign(inst.audit)?;
        let file = w.finish(&bytes, &sig)?;
        archive::sync(file)?;
        let size = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        // Linked, not renamed: never over a file that appeared meanwhile.
        std::fs::hard_link(&tmp, out).map_err(|e| io(format!("placing {}", out.display()), e))?;
        drop(_partial);
        sync_dir(dir)?;
        Ok((m, size))
    })?;
    drop(scratch);
    let file = out
        .canonicalize()
        .unwrap_or_else(|_| out.to_path_buf())
        .display()
        .to_string();
    Ok(Created {
        file,
        backup_id: backup_id.to_owned(),
        bytes: size,
        resources: m.resources,
        versions: m.versions,
        audit_records: m.audit_records,
        audit_tree_size: m.tree_size,
        recipients: to.len(),
        seconds: 0.0,
    })
}

/// Everything but the database copy: configuration, certificates, the
/// audit tree's leaves and checkpoints, the checkpoint keys as stored, the
/// journal.
fn add_small_files(
    w: &mut Writer,
    inst: Source<'_>,
    facts: &phylax_store::snapshot::Facts,
    journal: &[(String, Vec<u8>)],
) -> Result<(), BackupError> {
    let data = inst.data_dir;
    let read = |p: &Path| std::fs::read(p).map_err(|e| io(format!("reading {}", p.display()), e));
    w.add_bytes(
        manifest::CONFIG,
        &read(&data.join(crate::base::config::CONFIG_FILE))?,
    )?;
    w.add_bytes(manifest::CA, &read(&data.join(&inst.config.tls.ca))?)?;
    w.add_bytes(manifest::CERT, &read(&data.join(&inst.config.tls.cert))?)?;
    // The rest of the TLS material that is not secret.
    for (name, path) in [
        (manifest::CLIENT_CA, &inst.config.tls.client_ca),
        (manifest::OCSP, &inst.config.tls.ocsp),
    ] {
        if let Some(p) = path {
            w.add_bytes(name, &read(&data.join(p))?)?;
        }
    }
    let leaves: Vec<u8> = facts.leaves.iter().flatten().copied().collect();
    w.add_bytes(manifest::LEAVES, &leaves)?;
    if let Some(cp) = &facts.checkpoint {
        w.add_bytes(manifest::CHECKPOINT, cp.note.as_bytes())?;
    }
    if let Some(p) = &inst.config.audit.checkpoint_file {
        if let Ok(o) = std::fs::read(data.join(p)) {
            w.add_bytes(manifest::OUTSIDE, &o)?;
        }
    }
    let keys: Vec<(&str, String)> = facts
        .checkpoint_keys
        .iter()
        .map(|(row, wrapped)| (row.as_str(), STANDARD.encode(wrapped)))
        .collect();
    let keys = serde_json::to_vec(&keys).map_err(|e| BackupError::Io(e.to_string()))?;
    w.add_bytes(manifest::CHECKPOINT_KEYS, &keys)?;
    for (name, bytes) in journal {
        w.add_bytes(&format!("{}{name}", manifest::JOURNAL_DIR), bytes)?;
    }
    Ok(())
}

/// The manifest of a backup of `inst` holding `snap` and `files`.
fn manifest_for(
    inst: Source<'_>,
    snap: &phylax_store::snapshot::Snapshot,
    backup_id: &str,
    files: Vec<manifest::FileEntry>,
) -> Manifest {
    let facts = &snap.facts;
    let mut generations: BTreeMap<u32, u64> = BTreeMap::new();
    for (head, n) in &facts.key_heads {
        if let Some(g) = Kek::generation_of(head) {
            *generations.entry(g).or_default() += n;
        }
    }
    Manifest {
        format: FORMAT.into(),
        backup_id: backup_id.to_owned(),
        instance_id: facts.instance_id.clone().unwrap_or_default(),
        origin: inst.audit.origin().to_owned(),
        source_data_dir: crate::keys::owner_name(inst.data_dir),
        created_ms: crate::base::clock::now_ms(),
        backend: inst.store.backend().to_owned(),
        pg_schema: snap.schema.clone(),
        schema_version: facts.schema_version,
        resources: facts.resources,
        versions: facts.versions,
        audit_records: facts.audit_records,
        tree_size: facts.leaves.len() as u64,
        tree_root: STANDARD.encode(phylax_audit::merkle::root(&facts.leaves)),
        checkpoint_size: facts.checkpoint.as_ref().map_or(0, |c| c.size),
        kek_generations: generations,
        erasures: erased_ids(&facts.erasures),
        verifier_keys: inst
            .audit
            .verifier_keys()
            .iter()
            .map(|k| k.encode())
            .collect(),
        files,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into())
}

/// Every journal file (`NODE/FILE`) with its bytes. Files that vanish
/// while listed (an indexer recycling them) are skipped: their records
/// are in the database by then.
fn journal_files(root: &Path) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let mut out = Vec::new();
    let Ok(nodes) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for node in nodes.flatten() {
        let Ok(files) = std::fs::read_dir(node.path()) else {
            continue;
        };
        for f in files.flatten() {
            let is_file = f.file_type().map(|t| t.is_file()).unwrap_or(false);
            if !is_file {
                continue;
            }
            if let Ok(bytes) = std::fs::read(f.path()) {
                out.push((
                    format!(
                        "{}/{}",
                        node.file_name().to_string_lossy(),
                        f.file_name().to_string_lossy()
                    ),
                    bytes,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}
