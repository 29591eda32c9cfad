//! [`crate::AccountStore`] for SQLite: registered clients and users.

use super::*;
use crate::AccountStore;

#[async_trait]
impl AccountStore for SqliteStore {
    async fn add_client(&self, cl: &ClientRecord) -> Result<()> {
        let cl = cl.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO clients (id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![cl.id, cl.name, cl.scope, cl.jwks, cl.disabled as i64, cl.created_at, cl.redirect_uris.join("\n"), cl.public as i64, cl.first_party as i64, cl.cert_bound as i64],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound FROM clients WHERE id = ?1",
                params![id],
                row_client,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare("SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound FROM clients ORDER BY created_at, id")
                .map_err(backend)?;
            let rows = st.query_map([], row_client).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE clients SET disabled = ?1 WHERE id = ?2",
                params![disabled as i64, id],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    async fn add_user(&self, u: &UserRecord) -> Result<()> {
        let u = u.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    u.id,
                    u.username_hash,
                    u.role,
                    u.status,
                    u.sealed,
                    u.rev,
                    u.created_at
                ],
            )
            .map(|_| ())
            .map_err(unique)
        })
        .await
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                params![id],
                row_user,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn delete_user(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM users WHERE id = ?1", params![id])
                .map(|n| n > 0)
                .map_err(backend)
        })
        .await
    }

    async fn find_user(&self, username_hash: &[u8]) -> Result<Option<UserRecord>> {
        let h = username_hash.to_vec();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE username_hash = ?1"),
                params![h],
                row_user,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {USER_COLS} FROM users ORDER BY created_at, id"
                ))
                .map_err(backend)?;
            let rows = st.query_map([], row_user).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn update_user(&self, u: &UserRecord) -> Result<bool> {
        let u = u.clone();
        self.write(move |c| {
            c.execute(
                "UPDATE users SET role = ?1, status = ?2, sealed = ?3, username_hash = ?6, rev = rev + 1 WHERE id = ?4 AND rev = ?5",
                params![u.role, u.status, u.sealed, u.id, u.rev, u.username_hash],
            )
            .map(|n| n == 1)
            .map_err(unique)
        })
        .await
    }
}
