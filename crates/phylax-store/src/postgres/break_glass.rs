//! [`crate::BreakGlassStore`] for PostgreSQL: break-the-glass grants and their reviews.

use super::*;
use crate::BreakGlassStore;

#[async_trait]
impl BreakGlassStore for PgStore {
    async fn put_break_glass(&self, r: &BreakGlassRecord) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "INSERT INTO break_glass (id, user_id, started, expires, sealed) VALUES ($1, $2, $3, $4, $5)",
            &[&r.id, &r.user_id, &r.started, &r.expires, &r.sealed],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn break_glass_active(&self, user_id: &str, now: i64) -> Result<Vec<BreakGlassRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                &format!("SELECT {BREAK_GLASS_COLS} FROM break_glass WHERE user_id = $1 AND expires > $2 ORDER BY started"),
                &[&user_id, &now],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_break_glass).collect())
    }

    async fn break_glass_list(&self, open_only: bool, limit: u32) -> Result<Vec<BreakGlassRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let filter = if open_only {
            "WHERE reviewed_at IS NULL"
        } else {
            ""
        };
        let rows = c
            .query(
                &format!("SELECT {BREAK_GLASS_COLS} FROM break_glass {filter} ORDER BY started DESC LIMIT $1"),
                &[&(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_break_glass).collect())
    }

    async fn review_break_glass(
        &self,
        id: &str,
        reviewer: &str,
        at: i64,
        sealed_note: &[u8],
    ) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE break_glass SET reviewed_at = $2, reviewer = $3, review_sealed = $4 WHERE id = $1 AND reviewed_at IS NULL",
                &[&id, &at, &reviewer, &sealed_note],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }
}
