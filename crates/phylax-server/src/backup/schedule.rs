//! Scheduled backups (`[backup] schedule`), taken by a serving node: one
//! every interval after the newest backup recorded (so a restart does not
//! take an extra one), into `[backup] dir`, encrypted to the recipients in
//! `[backup] recipients_file`; then the oldest are deleted past `keep`
//! and `keep_days` (the newest always stays). A backup that fails is
//! logged and tried again after a quarter of the interval (at most an
//! hour). The recovery point this gives is the interval: a disk lost just
//! before a backup loses what was written since the one before.
//! Also: a warning at start when the newest restore drill is overdue.

use super::create::{create, last_backup, Source};
use super::drill::last_drill;
use crate::audit::log::AuditLog;
use crate::base::config::Config;
use phylax_audit::event::Action;
use phylax_store::DynStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the scheduler holds of a serving node.
#[derive(Debug, Clone)]
pub struct Node {
    pub store: DynStore,
    pub audit: Arc<AuditLog>,
    pub config: Arc<Config>,
    pub data_dir: PathBuf,
}

/// Start the schedule (if configured) and warn about an overdue drill.
pub fn spawn(node: Node) {
    tokio::spawn(async move {
        warn_if_drill_overdue(&node).await;
        let Ok(Some(every)) = node.config.backup.interval() else {
            return;
        };
        loop {
            let now = crate::base::clock::now_ms();
            let last = last_backup(&node.store).await.ok().flatten();
            let due = last.map_or(now, |t| t + every.as_millis() as i64);
            if due > now {
                tokio::time::sleep(Duration::from_millis((due - now) as u64)).await;
            }
            if let Err(e) = once(&node).await {
                tracing::error!(event = "backup.scheduled_failed", error = %e,
                    "a scheduled backup failed; trying again later");
                tokio::time::sleep((every / 4).min(Duration::from_secs(3600))).await;
            }
        }
    });
}

async fn warn_if_drill_overdue(node: &Node) {
    let days = node.config.backup.drill_interval_days;
    let overdue = match last_drill(&node.store).await {
        Ok(Some(d)) => {
            !d.ok || crate::base::clock::now_ms() - d.at_ms > i64::from(days) * 86_400_000
        }
        Ok(None) => true,
        Err(_) => return,
    };
    if overdue {
        tracing::warn!(event = "backup.drill_overdue", interval_days = days,
            "no restore drill has passed within [backup] drill_interval_days: run `phylax backup drill` (docs/BACKUP.md)");
    }
}

/// One scheduled backup and the pruning after it.
async fn once(node: &Node) -> Result<(), super::BackupError> {
    let b = &node.config.backup;
    let (Some(dir), Some(rf)) = (&b.dir, &b.recipients_file) else {
        return Ok(());
    };
    let dir = node.data_dir.join(dir);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| super::io(format!("creating {}", dir.display()), e))?;
    }
    let text = std::fs::read_to_string(node.data_dir.join(rf))
        .map_err(|e| super::io(format!("reading {}", rf.display()), e))?;
    let to = phylax_crypto::kek::Recipients::parse(text.lines())?;
    let t = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let out = dir.join(format!("phylax-{t}.age"));
    let src = Source {
        store: &node.store,
        audit: &node.audit,
        config: &node.config,
        data_dir: &node.data_dir,
    };
    let step = parking_lot::Mutex::new(String::new());
    let c = create(src, &to, &out, b.max_rate(), &|s, done, total| {
        let mut last = step.lock();
        if *last != s {
            tracing::info!(event = "backup.progress", step = s, done, total);
            s.clone_into(&mut last);
        }
    })
    .await?;
    tracing::info!(event = "backup.written", file = %c.file, bytes = c.bytes, seconds = c.seconds,
        "scheduled backup written");
    let recorded = super::create::recorded(&node.store).await?;
    let pruned = prune(
        &dir,
        &recorded,
        Path::new(&c.file),
        b.keep,
        b.keep_days,
        crate::base::clock::now_ms(),
    );
    if !pruned.is_empty() {
        node.audit
            .record_admin(
                "backup",
                Action::Delete,
                format!(
                    "scheduled backups past retention deleted: {}",
                    pruned.join(" ")
                ),
            )
            .await
            .map_err(|e| super::BackupError::Audit(e.to_string()))?;
    }
    Ok(())
}

/// Delete this instance's recorded backups in `dir` (`recorded`: time in
/// ms and where each was written, as `create` records them) beyond the
/// newest `keep` or older than `keep_days`, by their recorded time. The
/// newest and `just_written` always stay; a file the instance did not
/// record (put there by someone else, whatever its name or time) is never
/// touched. The names deleted.
pub fn prune(
    dir: &Path,
    recorded: &[(i64, super::create::Recorded)],
    just_written: &Path,
    keep: u32,
    keep_days: u32,
    now_ms: i64,
) -> Vec<String> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let mut mine: Vec<(i64, PathBuf)> = recorded
        .iter()
        .map(|(t, r)| (*t, PathBuf::from(&r.file)))
        .filter(|(_, f)| f.parent() == Some(dir.as_path()) && f.is_file())
        .collect();
    mine.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    let oldest_kept = now_ms - i64::from(keep_days) * 86_400_000;
    let mut deleted = Vec::new();
    for (i, (t, p)) in mine.iter().enumerate() {
        if i == 0 || p == just_written {
            continue;
        }
        if (i >= keep as usize || *t < oldest_kept) && std::fs::remove_file(p).is_ok() {
            deleted.push(
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
    }
    deleted
}
