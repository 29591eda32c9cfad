//! `SnapshotStore` for SQLite: SQLite's online backup of every page in
//! one step (one read transaction's view; writers go on in the WAL), facts
//! read from the copy, and a restore that links a copy into place.

use super::{backend, open_conn, row_checkpoint, SqliteStore};
use crate::snapshot::{leaf, sql, Facts, Pace, Snapshot, SnapshotStore};
use crate::{Result, StoreError};
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;

/// How far the write-ahead log may grow while a paced copy holds its
/// snapshot before the copy stops pacing itself.
const WAL_BOUND: u64 = 2 << 30;

/// The copy's name inside the snapshot directory.
pub const FILE: &str = "phylax.db";

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

#[async_trait]
impl SnapshotStore for SqliteStore {
    async fn snapshot(&self, dir: &Path, max_rate: Option<u64>) -> Result<Snapshot> {
        let src = self.path.clone();
        let file = dir.join(FILE);
        let out = file.clone();
        let facts = tokio::task::spawn_blocking(move || -> Result<Facts> {
            // A connection of its own: the copy can take minutes, and the
            // pool's readers serve requests meanwhile. SQLite's online
            // backup: every page copied as stored (no rebuilding of tables
            // and indexes, as `VACUUM INTO` does), all inside one read
            // transaction held on the source connection, so the copy is one
            // instant's view while writers go on in the WAL (a backup step
            // that opened its own transaction each time would start over
            // whenever another connection wrote), paced in steps.
            let src_path = src;
            let src = open_conn(&src_path)?;
            src.execute_batch("BEGIN").map_err(backend)?;
            src.query_row("SELECT count(*) FROM meta", [], |_| Ok(()))
                .map_err(backend)?;
            let page: i64 = src
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(backend)?;
            let mut dst = Connection::open(&out).map_err(backend)?;
            {
                use rusqlite::backup::{Backup, StepResult};
                let b = Backup::new(&src, &mut dst).map_err(backend)?;
                let mut pace = Pace::new(max_rate);
                // A tenth of a second's worth at the rate, or all at once.
                let pages = match max_rate {
                    Some(r) if r > 0 => ((r / page.max(512) as u64) / 10).clamp(16, 1 << 20) as i32,
                    _ => -1,
                };
                // The pinned snapshot keeps the WAL from being reset: it
                // grows by everything written meanwhile. Past this, the
                // rest is copied at once (the disk matters more than the
                // pace).
                let wal = src_path.with_extension("db-wal");
                let mut pages = pages;
                loop {
                    if pages > 0
                        && std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > WAL_BOUND
                    {
                        tracing::warn!(event = "backup.wal_bound",
                            "the write-ahead log grew past 2 GiB while the backup held its snapshot: copying the rest unpaced");
                        pages = -1;
                    }
                    match b.step(pages).map_err(backend)? {
                        StepResult::Done => break,
                        StepResult::More => {}
                        StepResult::Busy | StepResult::Locked => {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            continue;
                        }
                        r => {
                            return Err(StoreError::Unavailable(format!(
                                "the online backup stopped: {r:?}"
                            )))
                        }
                    }
                    std::thread::sleep(pace.after(pages.max(0) as u64 * page as u64));
                }
            }
            src.execute_batch("COMMIT").map_err(backend)?;
            drop(dst);
            drop(src);
            std::fs::File::open(&out)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("syncing the copy", e))?;
            let copy = Connection::open_with_flags(&out, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(backend)?;
            facts(&copy)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(Snapshot {
            file,
            facts,
            schema: None,
        })
    }
}

/// The facts of a database file (a snapshot, or a restored copy).
pub fn facts(c: &Connection) -> Result<Facts> {
    let count = |q: &str| -> Result<u64> {
        c.query_row(q, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(backend)
    };
    let mut f = Facts {
        schema_version: c
            .query_row(sql::SCHEMA, [], |r| r.get(0))
            .map_err(backend)?,
        resources: count(sql::RESOURCES)?,
        versions: count(sql::VERSIONS)?,
        audit_records: count(sql::AUDIT)?,
        checkpoint: c
            .query_row(sql::CHECKPOINT, [], row_checkpoint)
            .optional()
            .map_err(backend)?,
        instance_id: c
            .query_row(sql::INSTANCE, [], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map_err(backend)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()),
        ..Facts::default()
    };
    let mut st = c.prepare(sql::LEAVES).map_err(backend)?;
    let mut rows = st.query([]).map_err(backend)?;
    while let Some(r) = rows.next().map_err(backend)? {
        let (i, h): (i64, Vec<u8>) = (r.get(0).map_err(backend)?, r.get(1).map_err(backend)?);
        f.leaves.push(leaf(f.leaves.len(), i, &h)?);
    }
    let mut st = c.prepare(sql::ERASURES).map_err(backend)?;
    f.erasures = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)?;
    let mut st = c.prepare(sql::CHECKPOINT_KEYS).map_err(backend)?;
    f.checkpoint_keys = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)?;
    let mut st = c.prepare(sql::KEY_HEADS).map_err(backend)?;
    for r in st
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
        .map_err(backend)?
    {
        let (h, n) = r.map_err(backend)?;
        f.key_heads.insert(h, n as u64);
    }
    Ok(f)
}

/// Put `file` at `path` (which must not exist): linked or copied under a
/// temporary name beside it, synced, checked, then linked into place, so
/// a crash leaves no database that looks complete.
pub(crate) async fn restore_file(file: &Path, path: &Path) -> Result<()> {
    let (file, path) = (file.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        if path.symlink_metadata().is_ok() {
            return Err(StoreError::Unavailable(format!(
                "{} exists; a restore writes a new database",
                path.display()
            )));
        }
        let tmp = path.with_extension("db.restoring");
        let _ = std::fs::remove_file(&tmp);
        // A link when the file is on the same file system (an unpacked
        // archive beside the target: no second copy of a large database),
        // else a copy.
        if std::fs::hard_link(&file, &tmp).is_err() {
            std::fs::copy(&file, &tmp).map_err(|e| io("copying the database", e))?;
        }
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("syncing the database", e))?;
        // Opens as SQLite and passes its own integrity check before it is
        // put in place.
        let c =
            Connection::open_with_flags(&tmp, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
        let ok: String = c
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(backend)?;
        drop(c);
        if ok != "ok" {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Backend(format!(
                "the database copy is damaged: {ok}"
            )));
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        linked.map_err(|e| io("placing the database", e))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("syncing the directory", e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| StoreError::Unavailable(e.to_string()))?
}
