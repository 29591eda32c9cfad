//! [`crate::MetaStore`] for SQLite: instance metadata.

use super::*;
use crate::MetaStore;

#[async_trait]
impl MetaStore for SqliteStore {
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(backend)?;
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .map_err(backend)
        })
        .await
    }

    async fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = prefix.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached("SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1")
                .map_err(backend)?;
            let rows = st
                // A key that is not UTF-8 (written by hand) is read
                // lossily rather than failing every reader of the list.
                .query_map(params![prefix], |r| {
                    let key: Vec<u8> = match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            t.to_vec()
                        }
                        _ => Vec::new(),
                    };
                    Ok((String::from_utf8_lossy(&key).into_owned(), r.get(1)?))
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }
}
