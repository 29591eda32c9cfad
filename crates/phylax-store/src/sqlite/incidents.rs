//! [`crate::IncidentStore`] for SQLite: the breach register's steps.

use super::*;
use crate::{IncidentEventRow, IncidentStore};

fn row_incident(r: &rusqlite::Row<'_>) -> rusqlite::Result<IncidentEventRow> {
    Ok(IncidentEventRow {
        seq: r.get(0)?,
        incident: r.get(1)?,
        step: r.get(2)?,
        at: r.get(3)?,
        kind: r.get(4)?,
        sealed: r.get(5)?,
    })
}

#[async_trait]
impl IncidentStore for SqliteStore {
    async fn incident_append(&self, e: &IncidentEventRow) -> Result<i64> {
        let e = e.clone();
        self.write(move |c| {
            // A taken step number is `Duplicate` (a constraint violation).
            c.execute(
                "INSERT INTO incident_events (incident, step, at, kind, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.incident, e.step, e.at, e.kind, e.sealed],
            )
            .map_err(backend)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn incident_events(&self, incident: Option<&str>) -> Result<Vec<IncidentEventRow>> {
        let incident = incident.map(str::to_owned);
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT seq, incident, step, at, kind, sealed FROM incident_events \
                     WHERE ?1 IS NULL OR incident = ?1 ORDER BY incident, step",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![incident], row_incident)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }
}
