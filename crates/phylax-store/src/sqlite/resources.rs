//! [`crate::ResourceStore`] for SQLite: resource versions, the current pointer and the search index.

use super::*;
use crate::{ResourceStore, SealedVersion};

#[async_trait]
impl ResourceStore for SqliteStore {
    async fn erase_key_scope(&self, key_scope: &str, key_row: &str) -> Result<crate::Erased> {
        let (scope, row) = (key_scope.to_owned(), key_row.to_owned());
        self.write(move |c| {
            // The resources whose current version is sealed under the
            // scope lose their pointer and index entries; older versions of
            // resources that moved to another scope lose only those versions.
            c.execute(
                "DELETE FROM search_entries WHERE seq IN (SELECT r.seq FROM resources r \
                 JOIN resource_versions v ON v.seq = r.seq WHERE v.key_scope = ?1)",
                params![scope],
            )
            .map_err(backend)?;
            // Whole resources first: every version of each resource whose
            // current version is sealed under the scope.
            let mut versions = c
                .execute(
                    "DELETE FROM resource_versions WHERE (rtype, id) IN (SELECT r.rtype, r.id FROM resources r \
                     JOIN resource_versions v ON v.seq = r.seq WHERE v.key_scope = ?1) AND key_scope <> ?1",
                    params![scope],
                )
                .map_err(backend)? as u64;
            let resources = c
                .execute(
                    "DELETE FROM resources WHERE seq IN (SELECT seq FROM resource_versions WHERE key_scope = ?1)",
                    params![scope],
                )
                .map_err(backend)? as u64;
            versions += c
                .execute("DELETE FROM resource_versions WHERE key_scope = ?1", params![scope])
                .map_err(backend)? as u64;
            let key_rows = c
                .execute("DELETE FROM wrapped_keys WHERE scope = ?1", params![row])
                .map_err(backend)? as u64;
            Ok(crate::Erased {
                versions,
                resources,
                key_rows,
            })
        })
        .await
    }

    async fn sealed_versions(
        &self,
        below_generation: u32,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<SealedVersion>> {
        let below = crate::generation_header(below_generation);
        self.read(move |c| {
            // Generation 1 records start 0x01; later ones 0x02 and the
            // generation, big-endian: a byte comparison of the first five
            // bytes orders them by generation.
            let mut st = c
                .prepare_cached(
                    "SELECT seq, rtype, id, version, key_scope, body FROM resource_versions \
                     WHERE seq > ?1 AND body IS NOT NULL \
                     AND (substr(body, 1, 1) = X'01' OR (substr(body, 1, 1) = X'02' AND substr(body, 1, 5) < ?2)) \
                     ORDER BY seq LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![after_seq, below, limit], |r| {
                    Ok(SealedVersion {
                        seq: r.get(0)?,
                        rtype: r.get(1)?,
                        id: r.get(2)?,
                        version: r.get::<_, i64>(3)? as u64,
                        key_scope: r.get(4)?,
                        sealed: r.get(5)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(backend)
        })
        .await
    }

    async fn count_sealed_versions(&self, below_generation: u32) -> Result<u64> {
        let below = crate::generation_header(below_generation);
        self.read(move |c| {
            c.query_row(
                "SELECT count(*) FROM resource_versions WHERE body IS NOT NULL \
                 AND (substr(body, 1, 1) = X'01' OR (substr(body, 1, 1) = X'02' AND substr(body, 1, 5) < ?1))",
                params![below],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn reseal_versions(&self, rows: Vec<(i64, Vec<u8>, Vec<u8>)>) -> Result<u64> {
        self.write(move |c| {
            let mut st = c
                .prepare_cached(
                    "UPDATE resource_versions SET body = ?1 WHERE seq = ?2 AND body = ?3",
                )
                .map_err(backend)?;
            let mut n = 0;
            for (seq, old, new) in &rows {
                n += st.execute(params![new, seq, old]).map_err(backend)? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn key_scope_summary(&self, key_scope: &str) -> Result<(u64, Option<i64>)> {
        let scope = key_scope.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT count(*), max(last_updated) FROM resource_versions WHERE key_scope = ?1",
                params![scope],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .map_err(backend)
        })
        .await
    }

    async fn append_version(
        &self,
        v: NewVersion,
        pre: Precondition,
        audit: Vec<NewAudit>,
    ) -> Result<i64> {
        self.intern([(v.rtype.as_str(), &v.index[..])]).await?;
        let pids = self.pids.pids(&v.rtype, &v.index)?;
        self.write(move |c| {
            let seq = append_one(c, v, pre, &pids)?;
            insert_audit(c, &audit)?;
            Ok(seq)
        })
        .await
    }

    async fn append_versions(
        &self,
        vs: Vec<(NewVersion, Precondition)>,
        audit: Vec<NewAudit>,
    ) -> Result<Vec<i64>> {
        self.intern(vs.iter().map(|(v, _)| (v.rtype.as_str(), &v.index[..])))
            .await?;
        let pids = vs
            .iter()
            .map(|(v, _)| self.pids.pids(&v.rtype, &v.index))
            .collect::<Result<Vec<_>>>()?;
        // One write job: its SAVEPOINT rolls every append back if any fails.
        self.write(move |c| {
            let mut out = Vec::with_capacity(vs.len());
            for ((v, pre), pids) in vs.into_iter().zip(pids) {
                out.push(append_one(c, v, pre, &pids)?);
            }
            insert_audit(c, &audit)?;
            Ok(out)
        })
        .await
    }

    async fn read_current(&self, rtype: &str, id: &str) -> Result<Option<StoredVersion>> {
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {VERSION_COLS} FROM resource_versions WHERE seq = \
                     (SELECT seq FROM resources WHERE rtype = ?1 AND id = ?2)"
                ),
                params![rtype, id],
                row_version,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>> {
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?1 AND id = ?2 AND version = ?3"),
                params![rtype, id, version as i64],
                row_version,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Vec<StoredVersion>> {
        let q = q.clone();
        self.read(move |c| {
            let since = q.since.unwrap_or(i64::MIN);
            let before = q.before_seq.unwrap_or(i64::MAX);
            let limit = q.limit as i64;
            // The key scopes as one parameter whatever their number (NULL:
            // all): newline-delimited, which no scope can contain (`tenant`,
            // `patient:` and a FHIR id).
            let scopes: Option<String> = q.key_scopes.as_ref().map(|k| {
                let mut t = String::from("\n");
                for s in k.iter().filter(|s| !s.contains('\n')) {
                    t.push_str(s);
                    t.push('\n');
                }
                t
            });
            const SCOPED: &str =
                "(?9 IS NULL OR instr(?9, char(10) || key_scope || char(10)) > 0)";
            let (sql, rtype, id) = match &q.scope {
                HistoryScope::System => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE last_updated >= ?1 AND seq < ?2 \
                         AND ?4 IS NULL AND ?5 IS NULL AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    None,
                    None,
                ),
                HistoryScope::Type(t) => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?4 AND last_updated >= ?1 \
                         AND seq < ?2 AND ?5 IS NULL AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    Some(t.clone()),
                    None,
                ),
                HistoryScope::Instance(t, id) => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?4 AND id = ?5 \
                         AND last_updated >= ?1 AND seq < ?2 AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    Some(t.clone()),
                    Some(id.clone()),
                ),
            };
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(
                    rusqlite::named_params! {
                        "?1": since, "?2": before, "?3": limit, "?4": rtype, "?5": id, "?9": scopes,
                    },
                    row_version,
                )
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn list_current(
        &self,
        rtype: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredVersion>> {
        let rtype = rtype.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {} FROM resources r JOIN resource_versions v ON v.seq = r.seq \
                     WHERE r.rtype = ?1 AND r.deleted = 0 AND r.seq < ?2 ORDER BY r.seq DESC LIMIT ?3",
                    prefixed_cols()
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![rtype, before_seq.unwrap_or(i64::MAX), limit as i64], row_version)
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn search(&self, q: &SearchQuery) -> Result<Vec<StoredVersion>> {
        let q = q.clone();
        let ids = self.pids.clone();
        self.read(move |c| {
            let pids = resolve(c, &ids, &q)?;
            let driver = driver(c, &q, &pids)?;
            let (sql, ps) = query::build(
                &q,
                &pids,
                &|n| format!("?{n}"),
                &prefixed_cols(),
                false,
                driver,
            );
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(bind(ps)), row_version)
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn search_count(&self, q: &SearchQuery) -> Result<u64> {
        let q = q.clone();
        let ids = self.pids.clone();
        self.read(move |c| {
            let pids = resolve(c, &ids, &q)?;
            let driver = driver(c, &q, &pids)?;
            let (sql, ps) = query::build(&q, &pids, &|n| format!("?{n}"), "", true, driver);
            c.query_row(&sql, rusqlite::params_from_iter(bind(ps)), |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn set_index(
        &self,
        rtype: &str,
        id: &str,
        at_seq: Option<i64>,
        rows: Vec<IndexRow>,
    ) -> Result<bool> {
        self.intern([(rtype, &rows[..])]).await?;
        let pids = self.pids.pids(rtype, &rows)?;
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.write(move |c| {
            let cur: Option<(i64, bool)> = c
                .query_row(
                    "SELECT seq, deleted FROM resources WHERE rtype = ?1 AND id = ?2",
                    params![rtype, id],
                    |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
                )
                .optional()
                .map_err(backend)?;
            // No such resource: nothing to index. A deleted one keeps none
            // (searches rely on entries naming only live versions).
            match cur {
                Some((seq, _)) if at_seq.is_some_and(|a| a != seq) => Ok(false),
                Some((seq, false)) => replace_index(c, Some(seq), seq, &pids, &rows).map(|_| true),
                Some((seq, true)) => replace_index(c, Some(seq), seq, &[], &[]).map(|_| true),
                None => Ok(false),
            }
        })
        .await
    }
}
