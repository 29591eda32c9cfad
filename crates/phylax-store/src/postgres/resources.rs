//! [`crate::ResourceStore`] for PostgreSQL: resource versions, the current pointer and the search index.

use super::*;
use crate::{ResourceStore, SealedVersion};

#[async_trait]
impl ResourceStore for PgStore {
    async fn erase_key_scope(&self, key_scope: &str, key_row: &str) -> Result<crate::Erased> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c.transaction().await.map_err(pg)?;
        // As in SQLite: pointers and index entries of resources whose
        // current version is sealed under the scope, then every version.
        tx.execute(
            "DELETE FROM search_entries WHERE seq IN (SELECT r.seq FROM resources r \
             JOIN resource_versions v ON v.seq = r.seq WHERE v.key_scope = $1)",
            &[&key_scope],
        )
        .await
        .map_err(pg)?;
        let mut versions = tx
            .execute(
                "DELETE FROM resource_versions WHERE (rtype, id) IN (SELECT r.rtype, r.id FROM resources r \
                 JOIN resource_versions v ON v.seq = r.seq WHERE v.key_scope = $1) AND key_scope <> $1",
                &[&key_scope],
            )
            .await
            .map_err(pg)?;
        let resources = tx
            .execute(
                "DELETE FROM resources WHERE seq IN (SELECT seq FROM resource_versions WHERE key_scope = $1)",
                &[&key_scope],
            )
            .await
            .map_err(pg)?;
        versions += tx
            .execute(
                "DELETE FROM resource_versions WHERE key_scope = $1",
                &[&key_scope],
            )
            .await
            .map_err(pg)?;
        let key_rows = tx
            .execute("DELETE FROM wrapped_keys WHERE scope = $1", &[&key_row])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(crate::Erased {
            versions,
            resources,
            key_rows,
        })
    }

    async fn sealed_versions(
        &self,
        below_generation: u32,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<SealedVersion>> {
        let below = crate::generation_header(below_generation);
        let c = self.pool.get().await.map_err(pool_err)?;
        // Generation 1 records start 0x01; later ones 0x02 and the
        // generation, big-endian: bytea comparison orders them.
        let rows = c
            .query(
                "SELECT seq, rtype, id, version, key_scope, body FROM resource_versions \
                 WHERE seq > $1 AND body IS NOT NULL \
                 AND (substring(body from 1 for 1) = '\\x01'::bytea \
                      OR (substring(body from 1 for 1) = '\\x02'::bytea AND substring(body from 1 for 5) < $2)) \
                 ORDER BY seq LIMIT $3",
                &[&after_seq, &below, &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| SealedVersion {
                seq: r.get(0),
                rtype: r.get(1),
                id: r.get(2),
                version: r.get::<_, i64>(3) as u64,
                key_scope: r.get(4),
                sealed: r.get(5),
            })
            .collect())
    }

    async fn count_sealed_versions(&self, below_generation: u32) -> Result<u64> {
        let below = crate::generation_header(below_generation);
        let c = self.pool.get().await.map_err(pool_err)?;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM resource_versions WHERE body IS NOT NULL \
                 AND (substring(body from 1 for 1) = '\\x01'::bytea \
                      OR (substring(body from 1 for 1) = '\\x02'::bytea AND substring(body from 1 for 5) < $1))",
                &[&below],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(n as u64)
    }

    async fn reseal_versions(&self, rows: Vec<(i64, Vec<u8>, Vec<u8>)>) -> Result<u64> {
        let (mut seqs, mut olds, mut news) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, old, new) in rows {
            seqs.push(seq);
            olds.push(old);
            news.push(new);
        }
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE resource_versions v SET body = u.new \
                 FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS u(seq, old, new) \
                 WHERE v.seq = u.seq AND v.body = u.old",
                &[&seqs, &olds, &news],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }

    async fn key_scope_summary(&self, key_scope: &str) -> Result<(u64, Option<i64>)> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(
                "SELECT count(*), max(last_updated) FROM resource_versions WHERE key_scope = $1",
                &[&key_scope],
            )
            .await
            .map_err(pg)?;
        Ok((r.get::<_, i64>(0) as u64, r.get(1)))
    }

    async fn append_version(
        &self,
        v: NewVersion,
        pre: Precondition,
        audit: Vec<NewAudit>,
    ) -> Result<i64> {
        self.intern([(v.rtype.as_str(), &v.index[..])]).await?;
        let mut c = self.pool.get().await.map_err(pool_err)?;
        if audit.is_empty() {
            return append_one(&c, &v, pre, &self.pids).await;
        }
        let tx = c.transaction().await.map_err(pg)?;
        let seq = append_one(&tx, &v, pre, &self.pids).await?;
        insert_audit(&tx, &audit).await?;
        tx.commit().await.map_err(pg)?;
        Ok(seq)
    }

    async fn append_versions(
        &self,
        vs: Vec<(NewVersion, Precondition)>,
        audit: Vec<NewAudit>,
    ) -> Result<Vec<i64>> {
        self.intern(vs.iter().map(|(v, _)| (v.rtype.as_str(), &v.index[..])))
            .await?;
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c.transaction().await.map_err(pg)?;
        // Lock rows in a fixed order so that two transactions touching the
        // same resources cannot deadlock; answer in the caller's order.
        let mut order: Vec<usize> = (0..vs.len()).collect();
        order.sort_by(|&a, &b| (&vs[a].0.rtype, &vs[a].0.id).cmp(&(&vs[b].0.rtype, &vs[b].0.id)));
        let mut seqs = vec![0i64; vs.len()];
        for i in order {
            let (v, pre) = &vs[i];
            // An error drops `tx`, which rolls everything back.
            seqs[i] = append_one(&tx, v, *pre, &self.pids).await?;
        }
        insert_audit(&tx, &audit).await?;
        tx.commit().await.map_err(pg)?;
        Ok(seqs)
    }

    async fn read_current(&self, rtype: &str, id: &str) -> Result<Option<StoredVersion>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM resource_versions WHERE seq = \
                 (SELECT seq FROM resources WHERE rtype = $1 AND id = $2)"
            ))
            .await
            .map_err(pg)?;
        Ok(c.query_opt(&st, &[&rtype, &id])
            .await
            .map_err(pg)?
            .as_ref()
            .map(row_version))
    }

    async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = $1 AND id = $2 AND version = $3"
            ))
            .await
            .map_err(pg)?;
        let v = version as i64;
        Ok(c.query_opt(&st, &[&rtype, &id, &v])
            .await
            .map_err(pg)?
            .as_ref()
            .map(row_version))
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Vec<StoredVersion>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let since = q.since.unwrap_or(i64::MIN);
        let before = q.before_seq.unwrap_or(i64::MAX);
        let limit = q.limit as i64;
        // NULL: every key scope.
        let scopes: Option<&Vec<String>> = q.key_scopes.as_ref();
        let rows = match &q.scope {
            HistoryScope::System => {
                c.query(
                    &format!("SELECT {VERSION_COLS} FROM resource_versions WHERE last_updated >= $1 AND seq < $2 \
                              AND ($4::text[] IS NULL OR key_scope = ANY($4)) ORDER BY seq DESC LIMIT $3"),
                    &[&since, &before, &limit, &scopes],
                )
                .await
            }
            HistoryScope::Type(t) => {
                c.query(
                    &format!("SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = $1 AND last_updated >= $2 AND seq < $3 \
                              AND ($5::text[] IS NULL OR key_scope = ANY($5)) ORDER BY seq DESC LIMIT $4"),
                    &[t, &since, &before, &limit, &scopes],
                )
                .await
            }
            HistoryScope::Instance(t, id) => {
                c.query(
                    &format!("SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = $1 AND id = $2 AND last_updated >= $3 AND seq < $4 \
                              AND ($6::text[] IS NULL OR key_scope = ANY($6)) ORDER BY seq DESC LIMIT $5"),
                    &[t, id, &since, &before, &limit, &scopes],
                )
                .await
            }
        }
        .map_err(pg)?;
        Ok(rows.iter().map(row_version).collect())
    }

    async fn list_current(
        &self,
        rtype: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredVersion>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let cols = VERSION_COLS
            .split(", ")
            .map(|c| format!("v.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let before = before_seq.unwrap_or(i64::MAX);
        let limit = limit as i64;
        let rows = c
            .query(
                &format!(
                    "SELECT {cols} FROM resources r JOIN resource_versions v ON v.seq = r.seq \
                     WHERE r.rtype = $1 AND NOT r.deleted AND r.seq < $2 ORDER BY r.seq DESC LIMIT $3"
                ),
                &[&rtype, &before, &limit],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_version).collect())
    }

    async fn search(&self, q: &SearchQuery) -> Result<Vec<StoredVersion>> {
        let c = self.search_pool.get().await.map_err(pool_err)?;
        let pids = resolve(&self.pids, q);
        let driver = driver(&c, q, &pids).await?;
        let (sql, ps) = query::build(
            q,
            &pids,
            &|n| format!("${n}"),
            &prefixed_cols(),
            false,
            driver,
        );
        let st = prepare_search(&c, &sql).await?;
        let owned = bind(ps);
        let refs: Vec<&(dyn ToSql + Sync)> =
            owned.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
        let rows = c.query(&st, &refs).await.map_err(pg)?;
        Ok(rows.iter().map(row_version).collect())
    }

    async fn search_count(&self, q: &SearchQuery) -> Result<u64> {
        let c = self.search_pool.get().await.map_err(pool_err)?;
        let pids = resolve(&self.pids, q);
        let driver = driver(&c, q, &pids).await?;
        let (sql, ps) = query::build(q, &pids, &|n| format!("${n}"), "", true, driver);
        let owned = bind(ps);
        let refs: Vec<&(dyn ToSql + Sync)> =
            owned.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
        let st = prepare_search(&c, &sql).await?;
        let n: i64 = c.query_one(&st, &refs).await.map_err(pg)?.get(0);
        Ok(n as u64)
    }

    async fn set_index(
        &self,
        rtype: &str,
        id: &str,
        at_seq: Option<i64>,
        rows: Vec<IndexRow>,
    ) -> Result<bool> {
        self.intern([(rtype, &rows[..])]).await?;
        let cols = IndexCols::new(&rows, self.pids.pids(rtype, &rows)?);
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c.transaction().await.map_err(pg)?;
        // The resource's current version, locked against a concurrent
        // append; no such resource: nothing to index.
        let Some(row) = tx
            .query_opt(
                "SELECT seq, deleted FROM resources WHERE rtype = $1 AND id = $2 FOR UPDATE",
                &[&rtype, &id],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(false);
        };
        let seq: i64 = row.get(0);
        if at_seq.is_some_and(|a| a != seq) {
            return Ok(false);
        }
        tx.execute("DELETE FROM search_entries WHERE seq = $1", &[&seq])
            .await
            .map_err(pg)?;
        // A deleted resource keeps no entries (searches rely on entries
        // naming only live versions).
        if row.get::<_, bool>(1) {
            return tx.commit().await.map_err(pg).map(|_| true);
        }
        tx.execute(
            "INSERT INTO search_entries (seq, pid, hash, lo, hi, num) \
             SELECT $1, u.pid, u.hash, u.lo, u.hi, u.num \
             FROM unnest($2::int4[], $3::bytea[], $4::bigint[], $5::bigint[], $6::float8[]) AS u(pid, hash, lo, hi, num)",
            &[&seq, &cols.pids, &cols.hashes, &cols.lo, &cols.hi, &cols.num],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg).map(|_| true)
    }
}
