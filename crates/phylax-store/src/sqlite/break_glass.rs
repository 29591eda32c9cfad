//! [`crate::BreakGlassStore`] for SQLite: break-the-glass grants and their reviews.

use super::*;
use crate::BreakGlassStore;

#[async_trait]
impl BreakGlassStore for SqliteStore {
    async fn put_break_glass(&self, r: &BreakGlassRecord) -> Result<()> {
        let r = r.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO break_glass (id, user_id, started, expires, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.id, r.user_id, r.started, r.expires, r.sealed],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn break_glass_active(&self, user_id: &str, now: i64) -> Result<Vec<BreakGlassRecord>> {
        let user_id = user_id.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {BREAK_GLASS_COLS} FROM break_glass WHERE user_id = ?1 AND expires > ?2 ORDER BY started"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![user_id, now], row_break_glass)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn break_glass_list(&self, open_only: bool, limit: u32) -> Result<Vec<BreakGlassRecord>> {
        self.read(move |c| {
            let filter = if open_only { "WHERE reviewed_at IS NULL" } else { "" };
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {BREAK_GLASS_COLS} FROM break_glass {filter} ORDER BY started DESC LIMIT ?1"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![limit as i64], row_break_glass)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn review_break_glass(
        &self,
        id: &str,
        reviewer: &str,
        at: i64,
        sealed_note: &[u8],
    ) -> Result<bool> {
        let (id, reviewer, note) = (id.to_owned(), reviewer.to_owned(), sealed_note.to_vec());
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE break_glass SET reviewed_at = ?2, reviewer = ?3, review_sealed = ?4 WHERE id = ?1 AND reviewed_at IS NULL",
                    params![id, at, reviewer, note],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }
}
