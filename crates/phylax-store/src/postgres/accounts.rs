//! [`crate::AccountStore`] for PostgreSQL: registered clients and users.

use super::*;
use crate::AccountStore;

#[async_trait]
impl AccountStore for PgStore {
    async fn add_client(&self, cl: &ClientRecord) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            "INSERT INTO clients (id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[&cl.id, &cl.name, &cl.scope, &cl.jwks, &cl.disabled, &cl.created_at, &cl.redirect_uris.join("\n"), &cl.public, &cl.first_party, &cl.cert_bound],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_opt(
                "SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound FROM clients WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?;
        Ok(r.as_ref().map(row_client))
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                "SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party, cert_bound FROM clients ORDER BY created_at, id",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_client).collect())
    }

    async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE clients SET disabled = $1 WHERE id = $2",
                &[&disabled, &id],
            )
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    async fn add_user(&self, u: &UserRecord) -> Result<()> {
        let c = self.pool.get().await.map_err(pool_err)?;
        c.execute(
            &format!("INSERT INTO users ({USER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &u.id,
                &u.username_hash,
                &u.role,
                &u.status,
                &u.sealed,
                &u.rev,
                &u.created_at,
            ],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_opt(
                &format!("SELECT {USER_COLS} FROM users WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg)?;
        Ok(r.as_ref().map(row_user))
    }

    async fn delete_user(&self, id: &str) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute("DELETE FROM users WHERE id = $1", &[&id])
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    async fn find_user(&self, username_hash: &[u8]) -> Result<Option<UserRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let r = c
            .query_opt(
                &format!("SELECT {USER_COLS} FROM users WHERE username_hash = $1"),
                &[&username_hash],
            )
            .await
            .map_err(pg)?;
        Ok(r.as_ref().map(row_user))
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let rows = c
            .query(
                &format!("SELECT {USER_COLS} FROM users ORDER BY created_at, id"),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(row_user).collect())
    }

    async fn update_user(&self, u: &UserRecord) -> Result<bool> {
        let c = self.pool.get().await.map_err(pool_err)?;
        let n = c
            .execute(
                "UPDATE users SET role = $1, status = $2, sealed = $3, username_hash = $6, rev = rev + 1 WHERE id = $4 AND rev = $5",
                &[&u.role, &u.status, &u.sealed, &u.id, &u.rev, &u.username_hash],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }
}
