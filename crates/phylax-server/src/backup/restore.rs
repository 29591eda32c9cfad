//! `phylax backup verify` and `phylax restore`. A restore reads the whole
//! archive and checks it against its signed manifest before anything is
//! put in place, builds the instance in a private directory beside the
//! target, re-applies the erasure register, proves the copy (it opens
//! under the KEK, its audit log verifies and agrees with the outside
//! checkpoints, every stored version decrypts), and only then renames it
//! to the target: a crash leaves no directory that looks restored.

use super::archive;
use super::manifest::{self, Checked, Manifest};
use super::{io, sync_dir, BackupError, Progress, Scratch};
use crate::base::config::{Backend, Config, CONFIG_FILE};
use crate::instance::Instance;
use phylax_audit::checkpoint::VerifierKey;
use phylax_audit::event::Action;
use phylax_crypto::archive::Identities;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Read a backup to its end and check it against its manifest: nothing is
/// written.
pub fn verify(
    from: &Path,
    ids: &Identities,
    trust: &[VerifierKey],
    outside: &[String],
    progress: Progress,
) -> Result<Checked, BackupError> {
    archive::read(from, ids, None, progress)?.check(trust, outside)
}

/// Where the KEK for a restore comes from: always the operator, never
/// the archive (whose configuration could name a key file, or an HSM
/// module to load, of an attacker's choosing).
#[derive(Debug, Clone, Copy)]
pub enum KekFrom<'a> {
    /// A key file (the instance's, or one recovered from its escrow).
    KeyFile(&'a Path),
    /// `PHYLAX_KEK`, set in the environment.
    Environment,
    /// The HSM holding it (the instance's `[hsm]` settings).
    Hsm(&'a crate::base::config::HsmSettings),
}

/// What to restore, where, with what.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions<'a> {
    pub from: &'a Path,
    pub ids: &'a Identities,
    /// The new data directory (absent, or empty).
    pub data_dir: &'a Path,
    /// PostgreSQL: an empty schema (named as the backup's) to restore into.
    pub database_url: Option<&'a str>,
    /// The KEK.
    pub kek: KekFrom<'a>,
    /// Keys the manifest must be signed by (`phylax audit key`); empty:
    /// any key, reported.
    pub trust: &'a [VerifierKey],
    /// Outside checkpoints (signed-note text) the restored log must agree
    /// with.
    pub outside: &'a [String],
    /// Restore a backup whose KEK belongs to another data directory.
    pub other_instance: bool,
    /// Patients erased since (the live instance's register): erased in the
    /// copy too.
    pub erasures: &'a [String],
    /// A drill's scratch copy: its outward settings (checkpoint file,
    /// export, syslog, webhook) are cleared so it cannot write where the
    /// live instance does.
    pub scratch: bool,
}

/// A finished restore.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub data_dir: String,
    pub backup_id: String,
    pub instance_id: String,
    pub backup_created_ms: i64,
    pub backend: String,
    pub resources: u64,
    /// Stored versions opened and authenticated.
    pub versions_decrypted: u64,
    pub audit_records: u64,
    pub audit_checkpoints_verified: u64,
    /// Outside checkpoints: (size, matched; `None` when newer than the
    /// backup: those records are lost with it).
    pub outside_checkpoints: Vec<(u64, Option<bool>)>,
    pub erasures_reapplied: Vec<String>,
    /// A new local CA and server certificate were issued (the backup's
    /// TLS key was not where its configuration says).
    pub tls_reissued: bool,
    pub signed_by: String,
    pub seconds: f64,
    /// What the operator should know (an outside checkpoint that could not
    /// be read).
    pub warnings: Vec<String>,
}

fn refused(m: impl Into<String>) -> BackupError {
    BackupError::Refused(m.into())
}

/// The target: absent or an empty directory, in a parent that exists.
fn target(data_dir: &Path) -> Result<(PathBuf, PathBuf), BackupError> {
    let abs = std::path::absolute(data_dir).map_err(|e| io("data directory", e))?;
    if let Ok(mut entries) = std::fs::read_dir(&abs) {
        if entries.next().is_some() {
            return Err(refused(format!(
                "{} is not empty; a restore never overwrites",
                abs.display()
            )));
        }
    } else if abs.symlink_metadata().is_ok() {
        return Err(refused(format!(
            "{} exists and is not a directory",
            abs.display()
        )));
    }
    let parent = abs
        .parent()
        .ok_or_else(|| refused("the data directory needs a parent"))?
        .to_path_buf();
    if !parent.is_dir() {
        return Err(refused(format!("{} does not exist", parent.display())));
    }
    Ok((abs, parent))
}

/// Restore a backup into a new place and prove the result.
pub async fn restore(
    o: RestoreOptions<'_>,
    progress: Progress<'_>,
) -> Result<Restored, BackupError> {
    let started = std::time::Instant::now();
    let (dest, parent) = target(o.data_dir)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let work = Scratch::new(parent.join(format!(".{name}.restoring-{}", uuid::Uuid::new_v4())))?;
    let unpack = work.path.join(".unpack");
    // Blocking reads, decryption and writes: off the runtime's workers.
    let contents =
        tokio::task::block_in_place(|| archive::read(o.from, o.ids, Some(&unpack), progress))?;
    let checked = contents.check(o.trust, o.outside)?;
    let config = restored_config(&contents, &work.path, &o)?;
    // The KEK is the operator's; the archive must prove it is the
    // instance's before anything else from it is acted on.
    let kek = check_kek(&config, &checked.manifest, o.other_instance)?;
    authenticate(&contents, &checked, &kek)?;
    drop(kek);
    // The instance's outside checkpoint as it is now, when it can be read
    // where the backed-up configuration says (the same machine, or the
    // storage mounted again): the restored log is held to it too.
    let mut outside = o.outside.to_vec();
    let mut warnings = Vec::new();
    if let Some(f) = &config.audit.checkpoint_file {
        let at = Path::new(&checked.manifest.source_data_dir).join(f);
        match std::fs::read_to_string(&at) {
            Ok(note) => outside.push(note),
            Err(e) => warnings.push(format!(
                "the outside checkpoint file the backup's configuration names ({}) cannot be read ({e}): the restored log was not held to it; pass the latest copy with --checkpoint",
                at.display()
            )),
        }
    }
    let checked = if outside.len() > o.outside.len() {
        contents.check(o.trust, &outside)?
    } else {
        checked
    };
    // The restored log is held to these, and to the copy the backup
    // carries.
    if let Some(b) = contents.small.get(manifest::OUTSIDE) {
        outside.push(String::from_utf8_lossy(b).into_owned());
    }
    let m = &checked.manifest;
    progress("restoring the database", 0, 0);
    restore_database(m, &unpack, &work.path, o.database_url).await?;
    let mut made_keys: Option<PathBuf> = None;
    let placed = async {
        let mut config = config;
        let tls_reissued = restore_tls(&contents, &mut config, &work.path, &dest, o.scratch)?;
        if tls_reissued {
            made_keys = config.tls.key.parent().map(Path::to_path_buf);
        }
        place_journal(&unpack, &work.path)?;
        std::fs::remove_dir_all(&unpack).map_err(|e| io("removing the unpacked files", e))?;
        config
            .save(&work.path)
            .map_err(|e| BackupError::Io(e.to_string()))?;
        let proof = prove(
            &work.path,
            o.database_url,
            &checked,
            o.erasures,
            &outside,
            progress,
        )
        .await?;
        Ok::<_, BackupError>((tls_reissued, proof))
    }
    .await;
    let (tls_reissued, proof) = match placed {
        Ok(p) => p,
        Err(e) => {
            // A key directory this restore made goes with it.
            if let Some(k) = &made_keys {
                let _ = std::fs::remove_dir_all(k);
            }
            // The schema was empty before (checked): leave it so.
            if let Some(url) = o.database_url {
                if let Err(d) = phylax_store::drop_schema_tables(url).await {
                    tracing::warn!(error = %d, "the failed restore's schema could not be emptied");
                }
            }
            return Err(e);
        }
    };
    // Into place: a rename of the finished directory (over an empty one).
    std::fs::rename(&work.path, &dest).map_err(|e| io(format!("placing {}", dest.display()), e))?;
    let mut work = work;
    work.keep = true;
    sync_dir(&parent)?;
    Ok(Restored {
        data_dir: dest.display().to_string(),
        backup_id: m.backup_id.clone(),
        instance_id: m.instance_id.clone(),
        backup_created_ms: m.created_ms,
        backend: m.backend.clone(),
        resources: m.resources,
        versions_decrypted: proof.decrypted,
        audit_records: proof.audit_records,
        audit_checkpoints_verified: proof.checkpoints,
        outside_checkpoints: checked.outside.clone(),
        erasures_reapplied: proof.erased,
        tls_reissued,
        signed_by: checked.signer.encode(),
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// The backup's configuration, checked, for its new place.
fn restored_config(
    c: &manifest::Contents,
    work: &Path,
    o: &RestoreOptions<'_>,
) -> Result<Config, BackupError> {
    let text = c
        .small
        .get(manifest::CONFIG)
        .ok_or_else(|| BackupError::Invalid("no configuration".into()))?;
    std::fs::write(work.join(CONFIG_FILE), text).map_err(|e| io("writing the configuration", e))?;
    let mut config = Config::load(work).map_err(|e| BackupError::Invalid(e.to_string()))?;
    std::fs::remove_file(work.join(CONFIG_FILE)).map_err(|e| io("configuration", e))?;
    match o.kek {
        KekFrom::KeyFile(k) => {
            config.key_file = Some(std::path::absolute(k).map_err(|e| io("key file", e))?);
            config.hsm = None;
        }
        KekFrom::Environment => {
            if std::env::var_os("PHYLAX_KEK").is_none() {
                return Err(refused("PHYLAX_KEK is not set"));
            }
            // PHYLAX_KEK replaces the key file; an instance refuses it
            // together with an HSM.
            config.hsm = None;
        }
        KekFrom::Hsm(h) => {
            config.hsm = Some(h.clone());
            config.key_file = None;
        }
    }
    if o.scratch {
        config.audit.checkpoint_file = None;
        config.audit.export_file = None;
        config.audit.syslog_tls = None;
        config.detect.webhook_url = None;
    }
    match (config.backend, o.database_url) {
        (Backend::Sqlite, Some(_)) => Err(refused(
            "this is a SQLite backup: it restores into the data directory, without --database-url",
        )),
        (Backend::Postgres, None) => Err(refused(
            "this is a PostgreSQL backup: give --database-url (an empty schema named as the backup's)",
        )),
        _ => Ok(config),
    }
}

/// The KEK the configuration names must hold every generation the
/// backup's keys are wrapped under, and belong to the backed-up instance.
fn check_kek(
    config: &Config,
    m: &Manifest,
    other_instance: bool,
) -> Result<phylax_crypto::Kek, BackupError> {
    let kek = crate::instance::load_kek(config)?;
    let held: Vec<u32> = kek.generations().iter().map(|(n, _)| *n).collect();
    let missing: Vec<u32> = m
        .kek_generations
        .keys()
        .copied()
        .filter(|g| !held.contains(g))
        .collect();
    if !missing.is_empty() {
        return Err(refused(format!(
            "the backup's keys are wrapped under KEK generation(s) {missing:?}, which this KEK no longer holds (it holds {held:?}): the KEK was rotated after the backup (every patient erasure rotates it), so this backup cannot be read, by design; restore a backup taken since (docs/BACKUP.md)"
        )));
    }
    if let Some((file, Some(owner))) = kek.owner()? {
        if owner != m.source_data_dir && !other_instance {
            return Err(refused(format!(
                "the backup is of the instance in {}, but the KEK in {file} belongs to {owner}: pass --other-instance if this is intended",
                m.source_data_dir
            )));
        }
    }
    Ok(kek)
}

/// The manifest's signer must be a checkpoint key stored in the backup
/// wrapped under this KEK: anyone can encrypt an archive to the public
/// recipient and sign it with a key of their own, but only the instance
/// holds a checkpoint key the KEK unwraps. Checked before anything from
/// the archive is restored (a forged PostgreSQL dump would run its SQL).
fn authenticate(
    c: &manifest::Contents,
    checked: &Checked,
    kek: &phylax_crypto::Kek,
) -> Result<(), BackupError> {
    use base64::{engine::general_purpose::STANDARD, Engine};
    let forged = || {
        BackupError::Invalid(
            "the manifest is not signed by a checkpoint key this KEK holds: a forged backup, or another instance's".into(),
        )
    };
    let raw = c.small.get(manifest::CHECKPOINT_KEYS).ok_or_else(forged)?;
    let rows: Vec<(String, String)> = serde_json::from_slice(raw).map_err(|_| forged())?;
    for (row, wrapped) in rows {
        let (Some(scope), Ok(wrapped)) = (row.strip_prefix("log:"), STANDARD.decode(wrapped))
        else {
            continue;
        };
        let Ok(key) = phylax_crypto::log_signing::CheckpointKey::unwrap(kek, scope, &wrapped)
        else {
            continue;
        };
        if VerifierKey::new(&checked.manifest.origin, key.public())
            .ok()
            .as_ref()
            == Some(&checked.signer)
        {
            return Ok(());
        }
    }
    Err(forged())
}

async fn restore_database(
    m: &Manifest,
    unpack: &Path,
    work: &Path,
    url: Option<&str>,
) -> Result<(), BackupError> {
    let db = m
        .files
        .iter()
        .find(|f| f.path.starts_with(manifest::DB_DIR))
        .map(|f| unpack.join(&f.path))
        .ok_or_else(|| BackupError::Invalid("no database copy".into()))?;
    let target = match (m.backend.as_str(), url, m.pg_schema.as_deref()) {
        ("sqlite", None, _) => work.join("phylax.db"),
        ("postgres", Some(url), Some(schema)) => {
            phylax_store::restore(&db, phylax_store::Target::Postgres { url, schema }).await?;
            return Ok(());
        }
        _ => {
            return Err(BackupError::Invalid(
                "the database copy does not match its backend".into(),
            ))
        }
    };
    phylax_store::restore(&db, phylax_store::Target::Sqlite(&target)).await?;
    Ok(())
}

/// The certificates (and the client CA and OCSP response, when the
/// backup has them), always into the new data directory's `tls/`, where
/// the configuration then points (never over a path the backed-up
/// configuration named outside its data directory: that could be the live
/// instance's); a new local CA and certificate when the TLS key the
/// configuration names is not there (a restore on another machine: the
/// key is secret, and never in a backup). Whether it reissued.
fn restore_tls(
    c: &manifest::Contents,
    config: &mut Config,
    work: &Path,
    dest: &Path,
    scratch: bool,
) -> Result<bool, BackupError> {
    std::fs::create_dir_all(work.join("tls")).map_err(|e| io("tls directory", e))?;
    let write = |name: &str| -> Result<Option<PathBuf>, BackupError> {
        let Some(bytes) = c.small.get(name) else {
            return Ok(None);
        };
        std::fs::write(work.join(name), bytes).map_err(|e| io(format!("writing {name}"), e))?;
        Ok(Some(PathBuf::from(name)))
    };
    config.tls.ca = write(manifest::CA)?.ok_or_else(|| BackupError::Invalid("no CA".into()))?;
    config.tls.cert =
        write(manifest::CERT)?.ok_or_else(|| BackupError::Invalid("no certificate".into()))?;
    if config.tls.client_ca.is_some() {
        config.tls.client_ca = write(manifest::CLIENT_CA)?;
    }
    if config.tls.ocsp.is_some() {
        config.tls.ocsp = write(manifest::OCSP)?;
    }
    // A drill's copy is never served: no key is made for it.
    if config.tls.key.is_file() || scratch {
        return Ok(false);
    }
    let key_dir = crate::instance::default_key_file(dest)?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| refused("key directory"))?;
    // A new directory of its own: never into one that exists (a link
    // planted there would be written through).
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&key_dir)
            .map_err(|e| {
                io(
                    format!(
                        "creating {} for a new TLS key (the backup's is not at its configured path; move an existing one away)",
                        key_dir.display()
                    ),
                    e,
                )
            })?;
    }
    config.tls.key = crate::instance::write_tls(work, dest, &key_dir, &[])?;
    config.tls.ca = PathBuf::from(manifest::CA);
    config.tls.cert = PathBuf::from(manifest::CERT);
    Ok(true)
}

/// Journal files go back where a node's start recovers them.
fn place_journal(unpack: &Path, work: &Path) -> Result<(), BackupError> {
    let from = unpack.join(manifest::JOURNAL_DIR.trim_end_matches('/'));
    if from.is_dir() {
        std::fs::rename(&from, work.join("audit-journal")).map_err(|e| io("audit journal", e))?;
    }
    Ok(())
}

struct Proof {
    decrypted: u64,
    audit_records: u64,
    checkpoints: u64,
    erased: Vec<String>,
}

/// Open the copy as a server would, recover its journal, re-apply the
/// erasures, verify its audit log, and decrypt every stored version.
async fn prove(
    work: &Path,
    url: Option<&str>,
    checked: &Checked,
    live_erasures: &[String],
    outside: &[String],
    progress: Progress<'_>,
) -> Result<Proof, BackupError> {
    let restored = |e: String| BackupError::Restored(e);
    let inst = Instance::open(work, url)
        .await
        .map_err(|e| restored(e.to_string()))?;
    inst.audit
        .start_journal(&work.join("audit-journal"))
        .await
        .map_err(|e| restored(e.to_string()))?;
    inst.audit
        .flush()
        .await
        .map_err(|e| restored(e.to_string()))?;
    let m = &checked.manifest;
    let mut erased = Vec::new();
    let mut all: Vec<&String> = m.erasures.iter().chain(live_erasures).collect();
    all.sort();
    all.dedup();
    let admin = crate::keys::KeyAdmin::of(&inst, std::time::Duration::ZERO);
    for id in all {
        let why = if m.erasures.contains(id) {
            "the backup's own register"
        } else {
            "erased since the backup"
        };
        let e = admin
            .reapply_erasure(id, why)
            .await
            .map_err(|e| restored(e.to_string()))?;
        if e.versions > 0 || e.key_rows > 0 {
            erased.push(id.clone());
        }
    }
    // The log as restored must be the backup's (checked against its
    // signed manifest above) and verify on its own.
    let c = check(&inst, outside, progress).await?;
    if c.audit_sealed < m.tree_size {
        return Err(restored(format!(
            "the audit tree holds {} records, the backup's {}",
            c.audit_sealed, m.tree_size
        )));
    }
    let decrypted = c.versions_decrypted;
    inst.audit
        .record_admin(
            "backup-restore",
            Action::Create,
            format!(
                "restored from backup {} of instance {} taken at {} ms; {} versions decrypted; erasures re-applied: {}",
                m.backup_id,
                m.instance_id,
                m.created_ms,
                decrypted,
                erased.len()
            ),
        )
        .await
        .map_err(|e| BackupError::Audit(e.to_string()))?;
    inst.audit
        .flush()
        .await
        .map_err(|e| restored(e.to_string()))?;
    Ok(Proof {
        decrypted,
        audit_records: c.audit_records,
        checkpoints: c.audit_checkpoints,
        erased,
    })
}

/// What [`check`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Checkup {
    pub versions_decrypted: u64,
    pub audit_records: u64,
    pub audit_sealed: u64,
    pub audit_checkpoints: u64,
    /// Outside checkpoints consistent with the log.
    pub outside_consistent: Vec<u64>,
    /// Outside checkpoints newer than the log (a restore or a
    /// point-in-time recovery to before them: the records after the
    /// recovery point are not in it).
    pub outside_newer: Vec<u64>,
}

/// Prove an instance (a restored copy, or a database after PostgreSQL's
/// own point-in-time recovery): its audit log verifies, and agrees with
/// every outside checkpoint no newer than itself; every stored version
/// decrypts under its keys.
pub async fn check(
    inst: &Instance,
    outside: &[String],
    progress: Progress<'_>,
) -> Result<Checkup, BackupError> {
    let restored = |e: String| BackupError::Restored(e);
    progress("verifying the audit log", 0, 0);
    let first = inst
        .audit
        .verify(&[], None)
        .await
        .map_err(|e| restored(format!("audit log: {e}")))?;
    // The outside checkpoints this log can be held to; newer ones say
    // how much the recovery point lost.
    let keys = inst.audit.verifier_keys();
    let (mut older, mut newer_sizes, mut older_sizes) = (Vec::new(), Vec::new(), Vec::new());
    for n in outside {
        let cp = match phylax_audit::checkpoint::open_signed_any(n, &keys) {
            Ok(cp) => cp,
            // By a checkpoint key made after this log's newest: newer.
            Err(phylax_audit::checkpoint::CheckpointError::NoSignature) => {
                newer_sizes.push(u64::MAX);
                continue;
            }
            Err(e) => return Err(restored(format!("an outside checkpoint: {e}"))),
        };
        if cp.size > first.sealed {
            newer_sizes.push(cp.size);
        } else {
            older.push(n.clone());
            older_sizes.push(cp.size);
        }
    }
    let report = if older.is_empty() {
        first
    } else {
        inst.audit
            .verify(&older, None)
            .await
            .map_err(|e| restored(format!("audit log: {e}")))?
    };
    let decrypted = decrypt_all(inst, progress).await?;
    Ok(Checkup {
        versions_decrypted: decrypted,
        audit_records: report.records,
        audit_sealed: report.sealed,
        audit_checkpoints: report.checkpoints,
        outside_consistent: older_sizes,
        outside_newer: newer_sizes,
    })
}

/// Open every stored version; any that does not is a failed restore.
async fn decrypt_all(inst: &Instance, progress: Progress<'_>) -> Result<u64, BackupError> {
    let blind = crate::instance::search_key(&inst.store, inst.keys.kek()).await?;
    let repo = crate::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        blind,
        inst.config.fhir_base(),
    );
    let total = inst.store.count_sealed_versions(u32::MAX).await?;
    let (mut after, mut ok, mut bad) = (0i64, 0u64, 0u64);
    loop {
        let page = inst.store.sealed_versions(u32::MAX, after, 2000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for v in &page {
            match repo.opens(v).await {
                Ok(true) => ok += 1,
                Ok(false) => bad += 1,
                Err(e) => return Err(BackupError::Restored(e.to_string())),
            }
        }
        progress("decrypting every version", ok + bad, total);
    }
    if bad > 0 {
        return Err(BackupError::Restored(format!(
            "{bad} of {} stored versions do not decrypt",
            ok + bad
        )));
    }
    Ok(ok)
}
