//! [`crate::MetaStore`] for PostgreSQL: instance metadata.

use super::*;
use crate::MetaStore;

#[async_trait]
impl MetaStore for PgStore {
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg)?;
        Ok(r.map(|r| r.get(0)))
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &value],
        )
        .await
        .map_err(pg)?;
        let r = c
            .query_one("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg)?;
        Ok(r.get(0))
    }

    async fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT key, value FROM meta WHERE left(key, length($1)) = $1",
                &[&prefix],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
