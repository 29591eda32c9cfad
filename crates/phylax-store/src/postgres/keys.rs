//! [`crate::KeyStore`] for PostgreSQL: KEK-wrapped data keys.

use super::*;
use crate::{KeyStore, WrappedKeyRow, WrappedKeyStats, WRAP_HEAD};

#[async_trait]
impl KeyStore for PgStore {
    async fn get_wrapped_key(&self, scope: &str) -> Result<Option<Vec<u8>>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let st = c
            .prepare_cached("SELECT wrapped FROM wrapped_keys WHERE scope = $1")
            .await
            .map_err(pg)?;
        let r = c.query_opt(&st, &[&scope]).await.map_err(pg)?;
        Ok(r.map(|r| r.get(0)))
    }

    async fn get_wrapped_keys(&self, scopes: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.pool.get().await.map_err(pool_err)?;
        let st = c
            .prepare_cached("SELECT scope, wrapped FROM wrapped_keys WHERE scope = ANY($1)")
            .await
            .map_err(pg)?;
        let rows = c.query(&st, &[&scopes]).await.map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn put_wrapped_key_if_absent(
        &self,
        scope: &str,
        wrapped: &[u8],
        now: i64,
    ) -> Result<Vec<u8>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let st = c
            .prepare_cached("SELECT phylax_put_wrapped_key($1, $2, $3)")
            .await
            .map_err(pg)?;
        let row = c
            .query_one(&st, &[&scope, &wrapped, &now])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn put_wrapped_keys_if_absent(
        &self,
        rows: Vec<(String, Vec<u8>)>,
        now: i64,
    ) -> Result<Vec<Vec<u8>>> {
        let (scopes, wrapped): (Vec<String>, Vec<Vec<u8>>) = rows.into_iter().unzip();
        let c = self.pool.get().await.map_err(pool_err)?;
        // Insert what is absent, then read back what is stored (another
        // node's key where it won), in the order given.
        c.execute(
            "INSERT INTO wrapped_keys (scope, wrapped, created_at) \
             SELECT u.scope, u.wrapped, $3 FROM unnest($1::text[], $2::bytea[]) AS u(scope, wrapped) \
             ON CONFLICT (scope) DO NOTHING",
            &[&scopes, &wrapped, &now],
        )
        .await
        .map_err(pg)?;
        let stored = c
            .query(
                "SELECT scope, wrapped FROM wrapped_keys WHERE scope = ANY($1)",
                &[&scopes],
            )
            .await
            .map_err(pg)?;
        let by: std::collections::HashMap<String, Vec<u8>> =
            stored.iter().map(|r| (r.get(0), r.get(1))).collect();
        scopes
            .iter()
            .map(|s| {
                by.get(s)
                    .cloned()
                    .ok_or_else(|| StoreError::Backend(format!("wrapped key {s} not stored")))
            })
            .collect()
    }

    async fn wrapped_key_created(&self, scope: &str) -> Result<Option<i64>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        Ok(c.query_opt(
            "SELECT created_at FROM wrapped_keys WHERE scope = $1",
            &[&scope],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0)))
    }

    async fn list_wrapped_keys(&self, after: &str, limit: u32) -> Result<Vec<WrappedKeyRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT scope, wrapped, created_at FROM wrapped_keys WHERE scope > $1 ORDER BY scope LIMIT $2",
                &[&after, &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| WrappedKeyRow {
                scope: r.get(0),
                wrapped: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    async fn delete_wrapped_key(&self, scope: &str) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        Ok(
            c.execute("DELETE FROM wrapped_keys WHERE scope = $1", &[&scope])
                .await
                .map_err(pg)?
                > 0,
        )
    }

    async fn delete_wrapped_keys(&self, scopes: Vec<String>) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute("DELETE FROM wrapped_keys WHERE scope = ANY($1)", &[&scopes])
            .await
            .map_err(pg)
    }

    async fn wrapped_keys_except(&self, kind: &str) -> Result<Vec<WrappedKeyRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT scope, wrapped, created_at FROM wrapped_keys WHERE split_part(scope, ':', 1) <> $1 ORDER BY scope",
                &[&kind],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| WrappedKeyRow {
                scope: r.get(0),
                wrapped: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    async fn replace_wrapped_keys(&self, rows: Vec<(String, Vec<u8>, Vec<u8>)>) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        // Two statements on two connections, each a compare-and-swap per
        // row for half the batch: PostgreSQL runs them on two backends
        // (one was the bottleneck of a KEK rotation; docs/PERFORMANCE.md).
        let mut rows = rows;
        let second = rows.split_off(rows.len() / 2);
        let (a, b) = tokio::join!(self.swap_keys(rows), self.swap_keys(second));
        Ok(a? + b?)
    }

    async fn wrapped_key_stats(&self) -> Result<Vec<WrappedKeyStats>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let sql = format!(
            "SELECT split_part(scope, ':', 1) AS kind, \
             CASE WHEN get_byte(wrapped, 0) = 1 THEN '\\x01'::bytea ELSE substring(wrapped from 1 for {WRAP_HEAD}) END AS head, \
             count(*), min(created_at), max(created_at) FROM wrapped_keys GROUP BY 1, 2 ORDER BY 1, 2"
        );
        let rows = c.query(&sql, &[]).await.map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| WrappedKeyStats {
                kind: r.get(0),
                head: r.get(1),
                count: r.get::<_, i64>(2) as u64,
                oldest: r.get(3),
                newest: r.get(4),
            })
            .collect())
    }
}

impl PgStore {
    async fn swap_keys(&self, rows: Vec<(String, Vec<u8>, Vec<u8>)>) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut scopes = Vec::with_capacity(rows.len());
        let mut olds = Vec::with_capacity(rows.len());
        let mut news = Vec::with_capacity(rows.len());
        for (s, o, n) in rows {
            scopes.push(s);
            olds.push(o);
            news.push(n);
        }
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "UPDATE wrapped_keys k SET wrapped = u.new FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(scope, old, new) \
             WHERE k.scope = u.scope AND k.wrapped = u.old",
            &[&scopes, &olds, &news],
        )
        .await
        .map_err(pg)
    }
}
