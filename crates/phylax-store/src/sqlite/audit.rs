//! [`crate::AuditStore`] for SQLite: the audit log, its sealing queue, tree positions and checkpoints.

use super::*;
use crate::AuditStore;

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, rows: Vec<NewAudit>) -> Result<()> {
        self.write(move |c| insert_audit(c, &rows)).await
    }

    async fn audit_unsealed(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {AUDIT_PENDING_COLS} FROM audit_pending p JOIN audit_log a ON a.id = p.audit_id \
                     WHERE p.audit_id > ?2 ORDER BY p.audit_id LIMIT ?1"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![limit as i64, after], row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_patient_entries(
        &self,
        after: Option<([u8; 8], i64)>,
        limit: u32,
    ) -> Result<Vec<([u8; 8], i64)>> {
        self.read(move |c| {
            let (k, id) = match after {
                Some((k, id)) => (k.to_vec(), id),
                None => (Vec::new(), i64::MIN),
            };
            let mut st = c
                .prepare_cached(
                    "SELECT patient, audit_id FROM audit_patient \
                     WHERE (patient, audit_id) > (?1, ?2) ORDER BY patient, audit_id LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![k, id, limit as i64], |r| {
                    let p: Vec<u8> = r.get(0)?;
                    Ok((query::patient_key(&p), r.get(1)?))
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_queue_clean(&self) -> Result<u64> {
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM audit_pending WHERE audit_id NOT IN (SELECT id FROM audit_log) \
                     OR audit_id IN (SELECT audit_id FROM audit_leaf)",
                    [],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn audit_unqueue(&self, ids: Vec<i64>) -> Result<()> {
        self.write(move |c| {
            let mut st = c
                .prepare_cached("DELETE FROM audit_pending WHERE audit_id = ?1")
                .map_err(backend)?;
            for id in ids {
                st.execute(params![id]).map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_seal(&self, first_index: u64, ids: Vec<i64>, cp: CheckpointRow) -> Result<bool> {
        self.write(move |c| {
            let end: i64 = c
                .query_row(
                    &format!("SELECT {TREE_SIZE}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            if end as u64 != first_index {
                return Ok(false);
            }
            // One statement, not one per record (per-row statements inside
            // the writer's SAVEPOINT grow SQLite's statement journal
            // quadratically: 15,000 records took 13 s). Positions follow
            // arrival (id) order; the single writer commits ids in order,
            // so the pending records up to the last one read are exactly
            // `ids`, which the count confirms (a mismatch rolls back). The
            // records themselves are not touched: a position is a narrow
            // row of its own.
            let Some(&last) = ids.last() else {
                return Ok(false);
            };
            let n = c
                .execute(
                    "INSERT INTO audit_leaf (leaf_index, audit_id) \
                     SELECT ?1 + ROW_NUMBER() OVER (ORDER BY audit_id) - 1, audit_id \
                     FROM audit_pending WHERE audit_id <= ?2",
                    params![first_index as i64, last],
                )
                .map_err(backend)?;
            if n != ids.len() {
                return Err(StoreError::Conflict);
            }
            c.execute(
                "DELETE FROM audit_pending WHERE audit_id <= ?1",
                params![last],
            )
            .map_err(backend)?;
            c.execute(
                "INSERT INTO audit_checkpoints (size, time, note, frontier) VALUES (?1, ?2, ?3, ?4)",
                params![cp.size as i64, cp.time, cp.note, cp.frontier],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
        .or_else(|e| match e {
            StoreError::Conflict | StoreError::Duplicate => Ok(false),
            o => Err(o),
        })
    }

    async fn audit_by_index(&self, from_index: u64, limit: u32) -> Result<Vec<AuditRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {AUDIT_COLS} FROM audit_leaf f JOIN audit_log a ON a.id = f.audit_id \
                     WHERE f.leaf_index >= ?1 ORDER BY f.leaf_index LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![from_index as i64, limit as i64], row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_tree_size(&self) -> Result<u64> {
        self.read(move |c| {
            c.query_row(&format!("SELECT {TREE_SIZE}"), [], |r| {
                Ok(r.get::<_, i64>(0)? as u64)
            })
            .map_err(backend)
        })
        .await
    }

    async fn audit_pending_count(&self) -> Result<u64> {
        self.read(move |c| {
            c.query_row("SELECT COUNT(*) FROM audit_pending", [], |r| {
                Ok(r.get::<_, i64>(0)? as u64)
            })
            .map_err(backend)
        })
        .await
    }

    async fn audit_counts(&self) -> Result<(u64, u64)> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT (SELECT COUNT(*) FROM audit_log), {TREE_SIZE}"),
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(backend)
        })
        .await
    }

    async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<AuditRow>> {
        let q = q.clone();
        self.read(move |c| {
            use rusqlite::types::Value as V;
            let (sql, args) = audit_search_sql(&q, |n| format!("?{n}"));
            let args: Vec<V> = args
                .into_iter()
                .map(|a| match a {
                    AuditArg::Text(t) => V::Text(t),
                    AuditArg::Int(i) => V::Integer(i),
                    AuditArg::Bytes(b) => V::Blob(b),
                    AuditArg::PatientKey(k) => V::Blob(k.to_vec()),
                })
                .collect();
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_get(&self, event_id: &str) -> Result<Option<AuditRow>> {
        let event_id = event_id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {AUDIT_COLS} FROM {AUDIT_FROM} WHERE a.event_id = ?1"),
                params![event_id],
                row_audit,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn checkpoints(&self, after_size: u64, limit: u32) -> Result<Vec<CheckpointRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT size, time, note, frontier FROM audit_checkpoints WHERE size > ?1 ORDER BY size LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![after_size as i64, limit as i64], row_checkpoint)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn latest_checkpoint_and_tree_size(&self) -> Result<(Option<CheckpointRow>, u64)> {
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT c.size, c.time, c.note, c.frontier, {TREE_SIZE} \
                     FROM (SELECT 1) LEFT JOIN \
                     (SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1) c ON 1"
                ),
                [],
                |r| {
                    let size: Option<i64> = r.get(0)?;
                    let cp = match size {
                        Some(_) => Some(row_checkpoint(r)?),
                        None => None,
                    };
                    Ok((cp, r.get::<_, i64>(4)? as u64))
                },
            )
            .map_err(backend)
        })
        .await
    }

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>> {
        self.read(move |c| {
            c.query_row(
                "SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                row_checkpoint,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn audit_prune(&self, before: i64, limit: u32) -> Result<u64> {
        self.write(move |c| {
            // One statement (per-row updates on a table with triggers are
            // quadratic inside the writer's SAVEPOINT; see audit_seal).
            let n = c
                .execute(
                    "UPDATE audit_log SET sealed = x'' WHERE id IN (SELECT a.id FROM audit_log a \
                     WHERE EXISTS (SELECT 1 FROM audit_leaf f WHERE f.audit_id = a.id) \
                     AND a.recorded < ?1 AND length(a.sealed) > 0 ORDER BY a.id LIMIT ?2)",
                    params![before, limit as i64],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }
}
