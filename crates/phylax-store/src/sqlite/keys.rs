//! [`crate::KeyStore`] for SQLite: KEK-wrapped data keys.

use super::*;
use crate::{KeyStore, WrappedKeyRow, WrappedKeyStats, WRAP_HEAD};

#[async_trait]
impl KeyStore for SqliteStore {
    async fn get_wrapped_keys(&self, scopes: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let scopes = scopes.to_vec();
        self.read(move |c| {
            let mut st = c
                .prepare_cached("SELECT wrapped FROM wrapped_keys WHERE scope = ?1")
                .map_err(backend)?;
            let mut out = Vec::new();
            for s in scopes {
                let w: Option<Vec<u8>> = st
                    .query_row(params![s], |r| r.get(0))
                    .optional()
                    .map_err(backend)?;
                if let Some(w) = w {
                    out.push((s, w));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn get_wrapped_key(&self, scope: &str) -> Result<Option<Vec<u8>>> {
        let scope = scope.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT wrapped FROM wrapped_keys WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put_wrapped_key_if_absent(
        &self,
        scope: &str,
        wrapped: &[u8],
        now: i64,
    ) -> Result<Vec<u8>> {
        let (scope, wrapped) = (scope.to_owned(), wrapped.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (scope) DO NOTHING",
                params![scope, wrapped, now],
            )
            .map_err(backend)?;
            c.query_row("SELECT wrapped FROM wrapped_keys WHERE scope = ?1", params![scope], |r| r.get(0))
                .map_err(backend)
        })
        .await
    }

    async fn put_wrapped_keys_if_absent(
        &self,
        rows: Vec<(String, Vec<u8>)>,
        now: i64,
    ) -> Result<Vec<Vec<u8>>> {
        self.write(move |c| {
            let mut put = c
                .prepare_cached("INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (scope) DO NOTHING")
                .map_err(backend)?;
            let mut get = c
                .prepare_cached("SELECT wrapped FROM wrapped_keys WHERE scope = ?1")
                .map_err(backend)?;
            let mut out = Vec::with_capacity(rows.len());
            for (scope, wrapped) in &rows {
                put.execute(params![scope, wrapped, now]).map_err(backend)?;
                out.push(get.query_row(params![scope], |r| r.get(0)).map_err(backend)?);
            }
            Ok(out)
        })
        .await
    }

    async fn wrapped_key_created(&self, scope: &str) -> Result<Option<i64>> {
        let scope = scope.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT created_at FROM wrapped_keys WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_wrapped_keys(&self, after: &str, limit: u32) -> Result<Vec<WrappedKeyRow>> {
        let after = after.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT scope, wrapped, created_at FROM wrapped_keys WHERE scope > ?1 ORDER BY scope LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![after, limit], |r| {
                    Ok(WrappedKeyRow {
                        scope: r.get(0)?,
                        wrapped: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn wrapped_keys_page(
        &self,
        from: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<WrappedKeyRow>, Option<String>)> {
        let after: i64 = match from {
            None => 0,
            Some(f) => f
                .parse()
                .map_err(|_| StoreError::Backend("not a key page position".into()))?,
        };
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT rowid, scope, wrapped, created_at FROM wrapped_keys WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                )
                .map_err(backend)?;
            let mut last = after;
            let rows = st
                .query_map(params![after, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        WrappedKeyRow {
                            scope: r.get(1)?,
                            wrapped: r.get(2)?,
                            created_at: r.get(3)?,
                        },
                    ))
                })
                .map_err(backend)?
                .map(|r| {
                    r.map(|(id, row)| {
                        last = id;
                        row
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?;
            let next = (rows.len() == limit as usize).then(|| last.to_string());
            Ok((rows, next))
        })
        .await
    }

    async fn delete_wrapped_key(&self, scope: &str) -> Result<bool> {
        let scope = scope.to_owned();
        self.write(move |c| {
            Ok(
                c.execute("DELETE FROM wrapped_keys WHERE scope = ?1", params![scope])
                    .map_err(backend)?
                    > 0,
            )
        })
        .await
    }

    async fn delete_wrapped_keys(&self, scopes: Vec<String>) -> Result<u64> {
        self.write(move |c| {
            let mut st = c
                .prepare_cached("DELETE FROM wrapped_keys WHERE scope = ?1")
                .map_err(backend)?;
            let mut n = 0;
            for s in &scopes {
                n += st.execute(params![s]).map_err(backend)? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn wrapped_keys_except(&self, kind: &str) -> Result<Vec<WrappedKeyRow>> {
        let prefix = format!("{kind}:");
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT scope, wrapped, created_at FROM wrapped_keys WHERE substr(scope, 1, length(?1)) <> ?1 ORDER BY scope",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![prefix], |r| {
                    Ok(WrappedKeyRow {
                        scope: r.get(0)?,
                        wrapped: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn replace_wrapped_keys(&self, rows: Vec<(String, Vec<u8>, Vec<u8>)>) -> Result<u64> {
        self.write(move |c| {
            let mut st = c
                .prepare_cached(
                    "UPDATE wrapped_keys SET wrapped = ?3 WHERE scope = ?1 AND wrapped = ?2",
                )
                .map_err(backend)?;
            let mut n = 0u64;
            for (scope, old, new) in rows {
                n += st.execute(params![scope, old, new]).map_err(backend)? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn wrapped_key_stats(&self) -> Result<Vec<WrappedKeyStats>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT CASE WHEN instr(scope, ':') > 0 THEN substr(scope, 1, instr(scope, ':') - 1) ELSE scope END AS kind, \
                 CASE WHEN substr(wrapped, 1, 1) = x'01' THEN x'01' ELSE substr(wrapped, 1, {WRAP_HEAD}) END AS head, \
                 count(*), min(created_at), max(created_at) FROM wrapped_keys GROUP BY kind, head ORDER BY kind, head"
            );
            let mut st = c.prepare(&sql).map_err(backend)?;
            let rows = st
                .query_map([], |r| {
                    Ok(WrappedKeyStats {
                        kind: r.get(0)?,
                        head: r.get(1)?,
                        count: r.get::<_, i64>(2)? as u64,
                        oldest: r.get(3)?,
                        newest: r.get(4)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }
}
