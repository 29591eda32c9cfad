//! [`crate::GrantStore`] for PostgreSQL: bearer grants, revocations and used client-assertion ids.

use super::*;
use crate::GrantStore;

#[async_trait]
impl GrantStore for PgStore {
    async fn put_grant(&self, g: &GrantRecord, now: i64) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute("DELETE FROM grants WHERE expires_at < $1", &[&now])
            .await
            .map_err(pg)?;
        c.execute(
            &format!("INSERT INTO grants ({GRANT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &g.kind,
                &g.key_hash,
                &g.family,
                &g.user_id,
                &g.sealed,
                &g.expires_at,
                &g.used_at,
            ],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn get_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        now: i64,
    ) -> Result<Option<GrantRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_opt(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = $1 AND key_hash = $2 AND expires_at > $3"),
                &[&kind, &key_hash, &now],
            )
            .await
            .map_err(pg)?;
        Ok(r.as_ref().map(row_grant))
    }

    async fn use_grant(&self, kind: &str, key_hash: &[u8], now: i64) -> Result<GrantUse> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        // The row lock makes "check unused, mark used" atomic across nodes.
        let tx = c.transaction().await.map_err(pg)?;
        let r = tx
            .query_opt(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = $1 AND key_hash = $2 AND expires_at > $3 FOR UPDATE"),
                &[&kind, &key_hash, &now],
            )
            .await
            .map_err(pg)?;
        let Some(g) = r.as_ref().map(row_grant) else {
            return Ok(GrantUse::Missing);
        };
        if g.used_at.is_some() {
            return Ok(GrantUse::Reused(g));
        }
        tx.execute(
            "UPDATE grants SET used_at = $1 WHERE kind = $2 AND key_hash = $3",
            &[&now, &kind, &key_hash],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(GrantUse::Fresh(g))
    }

    async fn touch_grant(&self, kind: &str, key_hash: &[u8], expires_at: i64) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "UPDATE grants SET expires_at = $1 WHERE kind = $2 AND key_hash = $3",
            &[&expires_at, &kind, &key_hash],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn delete_grant(&self, kind: &str, key_hash: &[u8]) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "DELETE FROM grants WHERE kind = $1 AND key_hash = $2",
                &[&kind, &key_hash],
            )
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    async fn max_grant_expiry(&self, now: i64) -> Result<Option<i64>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(
                "SELECT MAX(expires_at) FROM grants WHERE expires_at > $1",
                &[&now],
            )
            .await
            .map_err(pg)?;
        Ok(r.get(0))
    }

    async fn live_grants(&self, now: i64) -> Result<Vec<GrantRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE expires_at > $1"),
                &[&now],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_grant).collect())
    }

    async fn reseal_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE grants SET sealed = $4 WHERE kind = $1 AND key_hash = $2 AND sealed = $3",
                &[&kind, &key_hash, &old, &new],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    async fn delete_family(&self, family: &str) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute("DELETE FROM grants WHERE family = $1", &[&family])
            .await
            .map_err(pg)
    }

    async fn delete_user_grants(&self, user_id: &str) -> Result<u64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute("DELETE FROM grants WHERE user_id = $1", &[&user_id])
            .await
            .map_err(pg)
    }

    async fn add_revocation(&self, kind: &str, key: &str, at: i64) -> Result<i64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_one(
                "INSERT INTO revocations (kind, key, at) VALUES ($1, $2, $3) RETURNING seq",
                &[&kind, &key, &at],
            )
            .await
            .map_err(pg)?;
        Ok(r.get(0))
    }

    async fn revocations_since(&self, after: i64, not_before: i64) -> Result<Vec<Revocation>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT seq, kind, key, at FROM revocations WHERE seq > $1 AND at >= $2 ORDER BY seq",
                &[&after, &not_before],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| Revocation {
                seq: r.get(0),
                kind: r.get(1),
                key: r.get(2),
                at: r.get(3),
            })
            .collect())
    }

    async fn use_jti(&self, client_id: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute("DELETE FROM used_jti WHERE expires_at < $1", &[&now])
            .await
            .map_err(pg)?;
        let n = c
            .execute(
                "INSERT INTO used_jti (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&client_id, &jti, &expires_at],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }
}
