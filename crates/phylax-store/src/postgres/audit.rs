//! [`crate::AuditStore`] for PostgreSQL: the audit log, its sealing queue, tree positions and checkpoints.

use super::*;
use crate::AuditStore;

#[async_trait]
impl AuditStore for PgStore {
    async fn append_audit(&self, rows: Vec<NewAudit>) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        // One statement: atomic on its own, one round trip per batch.
        insert_audit(&c, &rows).await
    }

    async fn audit_unsealed(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                &format!(
                    "SELECT {AUDIT_PENDING_COLS} FROM audit_pending p JOIN audit_log a ON a.id = p.audit_id \
                     WHERE p.audit_id > $2 ORDER BY p.audit_id LIMIT $1"
                ),
                &[&i64::from(limit), &after],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_audit).collect())
    }

    async fn audit_patient_entries(
        &self,
        after: Option<([u8; 8], i64)>,
        limit: u32,
    ) -> Result<Vec<([u8; 8], i64)>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        // Stored as the key's 8 bytes read as a signed big-endian integer
        // (`query::patient_key_int`); ordered by that integer.
        let (k, id) = match after {
            Some((k, id)) => (i64::from_be_bytes(k), id),
            None => (i64::MIN, i64::MIN),
        };
        let rows = c
            .query(
                "SELECT patient, audit_id FROM audit_patient \
                 WHERE (patient, audit_id) > ($1, $2) ORDER BY patient, audit_id LIMIT $3",
                &[&k, &id, &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0).to_be_bytes(), r.get(1)))
            .collect())
    }

    async fn audit_queue_clean(&self) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "DELETE FROM audit_pending p WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.id = p.audit_id) \
                 OR EXISTS (SELECT 1 FROM audit_leaf f WHERE f.audit_id = p.audit_id)",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }

    async fn audit_unqueue(&self, ids: Vec<i64>) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "DELETE FROM audit_pending WHERE audit_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn audit_seal(&self, first_index: u64, ids: Vec<i64>, cp: CheckpointRow) -> Result<bool> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c.transaction().await.map_err(pg)?;
        // One sealer at a time across every node sharing the database.
        tx.execute("SELECT pg_advisory_xact_lock(7283910)", &[])
            .await
            .map_err(pg)?;
        let end: i64 = tx
            .query_one(&format!("SELECT {TREE_SIZE}"), &[])
            .await
            .map_err(pg)?
            .get(0);
        if end as u64 != first_index {
            return Ok(false);
        }
        let idx: Vec<i64> = (0..ids.len() as i64)
            .map(|i| first_index as i64 + i)
            .collect();
        // Positions are narrow rows of their own: the records are not
        // rewritten (an UPDATE of each record left a dead ~2 KiB tuple and
        // new entries in every index of the audit log, and fed the
        // autovacuum that stalled searches at 1M resources).
        let n = tx
            .execute(
                "INSERT INTO audit_leaf (leaf_index, audit_id) \
                 SELECT u.idx, u.id FROM unnest($1::bigint[], $2::bigint[]) AS u(id, idx) \
                 WHERE EXISTS (SELECT 1 FROM audit_pending p WHERE p.audit_id = u.id)",
                &[&ids, &idx],
            )
            .await
            .map_err(pg)?;
        if n as usize != ids.len() {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM audit_pending WHERE audit_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(pg)?;
        let size = cp.size as i64;
        match tx
            .execute(
                "INSERT INTO audit_checkpoints (size, time, note, frontier) VALUES ($1, $2, $3, $4)",
                &[&size, &cp.time, &cp.note, &cp.frontier],
            )
            .await
            .map_err(pg)
        {
            Ok(_) => {}
            Err(StoreError::Duplicate) => return Ok(false),
            Err(e) => return Err(e),
        }
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn audit_by_index(&self, from_index: u64, limit: u32) -> Result<Vec<AuditRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                &format!(
                    "SELECT {AUDIT_COLS} FROM audit_leaf f JOIN audit_log a ON a.id = f.audit_id \
                     WHERE f.leaf_index >= $1 ORDER BY f.leaf_index LIMIT $2"
                ),
                &[&(from_index as i64), &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_audit).collect())
    }

    async fn audit_tree_size(&self) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(&format!("SELECT {TREE_SIZE}"), &[])
            .await
            .map_err(pg)?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    async fn audit_pending_count(&self) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one("SELECT COUNT(*) FROM audit_pending", &[])
            .await
            .map_err(pg)?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    async fn audit_counts(&self) -> Result<(u64, u64)> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(
                &format!("SELECT (SELECT COUNT(*) FROM audit_log), {TREE_SIZE}"),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
    }

    async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<AuditRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let (sql, args) = audit_search_sql(q, |n| format!("${n}"));
        let args: Vec<Box<dyn ToSql + Sync + Send>> = args
            .into_iter()
            .map(|a| -> Box<dyn ToSql + Sync + Send> {
                match a {
                    AuditArg::Text(t) => Box::new(t),
                    AuditArg::Int(i) => Box::new(i),
                    AuditArg::Bytes(b) => Box::new(b),
                    AuditArg::PatientKey(k) => Box::new(i64::from_be_bytes(k)),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|b| b.as_ref() as _).collect();
        let rows = c.query(&sql, &refs).await.map_err(pg)?;
        Ok(rows.iter().map(row_audit).collect())
    }

    async fn audit_get(&self, event_id: &str) -> Result<Option<AuditRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        Ok(c.query_opt(
            &format!("SELECT {AUDIT_COLS} FROM {AUDIT_FROM} WHERE a.event_id = $1"),
            &[&event_id],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(row_audit))
    }

    async fn checkpoints(&self, after_size: u64, limit: u32) -> Result<Vec<CheckpointRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT size, time, note, frontier FROM audit_checkpoints WHERE size > $1 ORDER BY size LIMIT $2",
                &[&(after_size as i64), &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_checkpoint).collect())
    }

    async fn latest_checkpoint_and_tree_size(&self) -> Result<(Option<CheckpointRow>, u64)> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(
                &format!(
                    "SELECT c.size, c.time, c.note, c.frontier, t.n \
                 FROM (SELECT {TREE_SIZE} AS n) t \
                 LEFT JOIN LATERAL (SELECT size, time, note, frontier FROM audit_checkpoints \
                 ORDER BY size DESC LIMIT 1) c ON true"
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        let cp = r
            .get::<_, Option<i64>>(0)
            .is_some()
            .then(|| row_checkpoint(&r));
        Ok((cp, r.get::<_, i64>(4) as u64))
    }

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        Ok(c.query_opt(
            "SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(row_checkpoint))
    }

    async fn audit_prune(&self, before: i64, limit: u32) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE audit_log SET sealed = ''::bytea WHERE id IN (SELECT a.id FROM audit_log a \
                 WHERE EXISTS (SELECT 1 FROM audit_leaf f WHERE f.audit_id = a.id) \
                 AND a.recorded < $1 AND octet_length(a.sealed) > 0 ORDER BY a.id LIMIT $2)",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }
}
