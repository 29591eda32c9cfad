//! [`crate::IncidentStore`] for PostgreSQL: the breach register's steps.

use super::*;
use crate::{IncidentEventRow, IncidentStore};

#[async_trait]
impl IncidentStore for PgStore {
    async fn incident_append(&self, e: &IncidentEventRow) -> Result<i64> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let row = c
            .query_one(
                "INSERT INTO incident_events (incident, step, at, kind, sealed) VALUES ($1, $2, $3, $4, $5) RETURNING seq",
                &[&e.incident, &e.step, &e.at, &e.kind, &e.sealed],
            )
            .await
            // A taken step number is `Duplicate` (unique violation).
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn incident_events(&self, incident: Option<&str>) -> Result<Vec<IncidentEventRow>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT seq, incident, step, at, kind, sealed FROM incident_events \
                 WHERE $1::text IS NULL OR incident = $1 ORDER BY incident, step",
                &[&incident],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| IncidentEventRow {
                seq: r.get(0),
                incident: r.get(1),
                step: r.get(2),
                at: r.get(3),
                kind: r.get(4),
                sealed: r.get(5),
            })
            .collect())
    }
}
