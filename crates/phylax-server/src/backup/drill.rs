//! `phylax backup drill`: a restore drill. The newest backup (or the one
//! named) is restored into a scratch place with the live instance's KEK
//! and erasure register, proven as any restore is, timed, and thrown
//! away. The result goes into the live instance's audit log and a meta
//! record the metrics report (`phylax_backup_drill_*`); a drill older
//! than `[backup] drill_interval_days` is a warning.

use super::restore::{restore, KekFrom, RestoreOptions, Restored};
use super::{BackupError, Progress};
use crate::instance::Instance;
use phylax_audit::checkpoint::VerifierKey;
use phylax_audit::event::Action;
use phylax_crypto::archive::Identities;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Meta records of drills (`backup_drill_v1:<ms>`), newest last.
pub const DRILL: &str = "backup_drill_v1:";

/// A drill's result as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillRecord {
    pub at_ms: i64,
    pub ok: bool,
    /// Restore time, seconds: the recovery time this backup gives.
    pub rto_secs: f64,
    /// The backup's age when drilled, seconds: the data a loss at that
    /// moment would have cost.
    pub rpo_secs: f64,
    pub backup: String,
    pub error: Option<String>,
}

/// A drill's report.
#[derive(Debug, Clone, Serialize)]
pub struct Drill {
    pub record: DrillRecord,
    pub restored: Option<Restored>,
}

/// The newest backup this instance recorded whose file is still there
/// (in `dir`, when given): only backups the instance wrote, never a file
/// someone else put in the directory.
pub async fn newest_backup(
    store: &phylax_store::DynStore,
    dir: Option<&Path>,
) -> Result<crate::backup::create::Recorded, BackupError> {
    let dir = dir.and_then(|d| d.canonicalize().ok());
    crate::backup::create::recorded(store)
        .await?
        .into_iter()
        .rev()
        .map(|(_, r)| r)
        .find(|r| {
            let f = Path::new(&r.file);
            f.is_file() && dir.as_ref().is_none_or(|d| f.parent() == Some(d.as_path()))
        })
        .ok_or_else(|| {
            BackupError::Refused("no backup this instance recorded is where it was written".into())
        })
}

/// The newest drill recorded, if any.
pub async fn last_drill(
    store: &phylax_store::DynStore,
) -> Result<Option<DrillRecord>, BackupError> {
    let rows = store.meta_with_prefix(DRILL).await?;
    Ok(rows
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice::<DrillRecord>(v).ok())
        .max_by_key(|r| r.at_ms))
}

/// What a drill needs besides the live instance.
#[derive(Debug, Clone, Copy)]
pub struct DrillOptions<'a> {
    pub from: &'a Path,
    pub ids: &'a Identities,
    /// PostgreSQL: an empty scratch schema (named as the backup's), in a
    /// database other than the live one.
    pub scratch_url: Option<&'a str>,
    pub other_instance: bool,
    /// The backup id the instance recorded for `from` ([`newest_backup`]):
    /// a different archive at that path (an older one put in its place)
    /// fails the drill.
    pub expect: Option<&'a str>,
}

/// Drill: restore `o.from` into a scratch place and prove it; record the
/// outcome either way.
pub async fn drill(
    live: &Instance,
    o: DrillOptions<'_>,
    progress: Progress<'_>,
) -> Result<Drill, BackupError> {
    let scratch = std::env::temp_dir().join(format!("phylax-drill-{}", uuid::Uuid::new_v4()));
    let trust: Vec<VerifierKey> = live.audit.verifier_keys();
    let erased = crate::backup::create::erased_patients(&live.store).await?;
    let outside: Vec<String> = live
        .config
        .audit
        .checkpoint_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(live.data_dir.join(p)).ok())
        .into_iter()
        .collect();
    // The live instance's KEK, from its own configuration.
    let kek = if std::env::var_os("PHYLAX_KEK").is_some() {
        KekFrom::Environment
    } else if let Some(h) = &live.config.hsm {
        KekFrom::Hsm(h)
    } else if let Some(k) = &live.config.key_file {
        KekFrom::KeyFile(k)
    } else {
        return Err(BackupError::Refused("the instance names no KEK".into()));
    };
    let res = restore(
        RestoreOptions {
            from: o.from,
            ids: o.ids,
            data_dir: &scratch,
            database_url: o.scratch_url,
            kek,
            // Only this instance's own keys: a drill of another
            // instance's backup proves nothing about this one.
            trust: if o.other_instance { &[] } else { &trust },
            outside: &outside,
            other_instance: o.other_instance,
            erasures: &erased,
            scratch: true,
        },
        progress,
    )
    .await;
    let res = match (res, o.expect) {
        (Ok(r), Some(id)) if r.backup_id != id => Err(BackupError::Invalid(format!(
            "{} holds backup {}, but the instance recorded backup {id} there: it was replaced",
            o.from.display(),
            r.backup_id
        ))),
        (res, _) => res,
    };
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(url) = o.scratch_url {
        if let Ok(r) = &res {
            // The scratch schema held nothing before (a restore refuses
            // otherwise): what is there now is the drill's.
            if let Err(e) = phylax_store::drop_schema_tables(url).await {
                tracing::warn!(event = "backup.drill_cleanup_failed", error = %e, backup = %r.backup_id,
                    "the drill's scratch schema could not be emptied");
            }
        }
    }
    let now = crate::base::clock::now_ms();
    let record = match &res {
        Ok(r) => DrillRecord {
            at_ms: now,
            ok: true,
            rto_secs: r.seconds,
            rpo_secs: (now - r.backup_created_ms).max(0) as f64 / 1000.0,
            backup: r.backup_id.clone(),
            error: None,
        },
        Err(e) => DrillRecord {
            at_ms: now,
            ok: false,
            rto_secs: 0.0,
            rpo_secs: 0.0,
            backup: o.from.display().to_string(),
            error: Some(e.to_string()),
        },
    };
    live.audit
        .record_admin(
            "backup-drill",
            Action::Execute,
            format!(
                "restore drill of {}: {}; restore took {:.1} s; backup age {:.0} s",
                record.backup,
                if record.ok { "passed" } else { "FAILED" },
                record.rto_secs,
                record.rpo_secs
            ),
        )
        .await
        .map_err(|e| BackupError::Audit(e.to_string()))?;
    let body = serde_json::to_vec(&record).map_err(|e| BackupError::Io(e.to_string()))?;
    live.store
        .put_meta_if_absent(&format!("{DRILL}{now:020}"), &body)
        .await?;
    match res {
        Ok(r) => Ok(Drill {
            record,
            restored: Some(r),
        }),
        Err(e) => Err(e),
    }
}
