//! [`crate::KeyStore`] for PostgreSQL: KEK-wrapped data keys.

use super::*;
use crate::KeyStore;

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
}
