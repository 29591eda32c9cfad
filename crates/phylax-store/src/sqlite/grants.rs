//! [`crate::GrantStore`] for SQLite: bearer grants, revocations and used client-assertion ids.

use super::*;
use crate::GrantStore;

#[async_trait]
impl GrantStore for SqliteStore {
    async fn put_grant(&self, g: &GrantRecord, now: i64) -> Result<()> {
        let g = g.clone();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE expires_at < ?1", params![now])
                .map_err(backend)?;
            c.execute(
                &format!("INSERT INTO grants ({GRANT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    g.kind,
                    g.key_hash,
                    g.family,
                    g.user_id,
                    g.sealed,
                    g.expires_at,
                    g.used_at
                ],
            )
            .map(|_| ())
            .map_err(unique)
        })
        .await
    }

    async fn get_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        now: i64,
    ) -> Result<Option<GrantRecord>> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = ?1 AND key_hash = ?2 AND expires_at > ?3"),
                params![kind, h, now],
                row_grant,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn use_grant(&self, kind: &str, key_hash: &[u8], now: i64) -> Result<GrantUse> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        // One writer thread: the read and the mark cannot interleave with
        // another use of the same grant.
        self.write(move |c| {
            let g = c
                .query_row(
                    &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = ?1 AND key_hash = ?2 AND expires_at > ?3"),
                    params![kind, h, now],
                    row_grant,
                )
                .optional()
                .map_err(backend)?;
            let Some(g) = g else { return Ok(GrantUse::Missing) };
            if g.used_at.is_some() {
                return Ok(GrantUse::Reused(g));
            }
            c.execute(
                "UPDATE grants SET used_at = ?1 WHERE kind = ?2 AND key_hash = ?3",
                params![now, kind, h],
            )
            .map_err(backend)?;
            Ok(GrantUse::Fresh(g))
        })
        .await
    }

    async fn touch_grant(&self, kind: &str, key_hash: &[u8], expires_at: i64) -> Result<()> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.write(move |c| {
            c.execute(
                "UPDATE grants SET expires_at = ?1 WHERE kind = ?2 AND key_hash = ?3",
                params![expires_at, kind, h],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn delete_grant(&self, kind: &str, key_hash: &[u8]) -> Result<bool> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.write(move |c| {
            c.execute(
                "DELETE FROM grants WHERE kind = ?1 AND key_hash = ?2",
                params![kind, h],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    async fn max_grant_expiry(&self, now: i64) -> Result<Option<i64>> {
        self.read(move |c| {
            c.query_row(
                "SELECT MAX(expires_at) FROM grants WHERE expires_at > ?1",
                params![now],
                |r| r.get(0),
            )
            .map_err(backend)
        })
        .await
    }

    async fn live_grants(&self, now: i64) -> Result<Vec<GrantRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE expires_at > ?1"
                ))
                .map_err(backend)?;
            let rows = st.query_map(params![now], row_grant).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn reseal_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool> {
        let (kind, h, old, new) = (
            kind.to_owned(),
            key_hash.to_vec(),
            old.to_vec(),
            new.to_vec(),
        );
        self.write(move |c| {
            c.execute(
                "UPDATE grants SET sealed = ?4 WHERE kind = ?1 AND key_hash = ?2 AND sealed = ?3",
                params![kind, h, old, new],
            )
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn delete_family(&self, family: &str) -> Result<u64> {
        let family = family.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE family = ?1", params![family])
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn delete_user_grants(&self, user_id: &str) -> Result<u64> {
        let user_id = user_id.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE user_id = ?1", params![user_id])
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn add_revocation(&self, kind: &str, key: &str, at: i64) -> Result<i64> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO revocations (kind, key, at) VALUES (?1, ?2, ?3)",
                params![kind, key, at],
            )
            .map_err(backend)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn revocations_since(&self, after: i64, not_before: i64) -> Result<Vec<Revocation>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached("SELECT seq, kind, key, at FROM revocations WHERE seq > ?1 AND at >= ?2 ORDER BY seq")
                .map_err(backend)?;
            let rows = st
                .query_map(params![after, not_before], |r| {
                    Ok(Revocation {
                        seq: r.get(0)?,
                        kind: r.get(1)?,
                        key: r.get(2)?,
                        at: r.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn use_jti(&self, client_id: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool> {
        let (client_id, jti) = (client_id.to_owned(), jti.to_owned());
        self.write(move |c| {
            c.execute("DELETE FROM used_jti WHERE expires_at < ?1", params![now])
                .map_err(backend)?;
            let n = c
                .execute(
                    "INSERT INTO used_jti (client_id, jti, expires_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    params![client_id, jti, expires_at],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }
}
