//! [`crate::KeyStore`] for SQLite: KEK-wrapped data keys.

use super::*;
use crate::KeyStore;

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
}
