//! Registered clients (SMART apps and backend services), as the token
//! endpoint and the sign-in pages see them: lookups, the disabled list,
//! and the one-time use of a client assertion's `jti`. Registration is the
//! operator's (`phylax client …`, through the instance).

use phylax_store::{AccountStore, ClientRecord, GrantStore, StoreError};
use std::collections::HashSet;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Clients {
    store: Arc<dyn AccountStore>,
    jtis: Arc<dyn GrantStore>,
}

impl Clients {
    /// `store`: the clients are read from its accounts concern, and
    /// assertion ids recorded in its grants concern.
    pub fn new(store: phylax_store::DynStore) -> Clients {
        Clients {
            jtis: store.clone(),
            store,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.store.get_client(id).await
    }

    /// Register a client (the operator's: the CLI and incident drills).
    pub async fn register(&self, c: &ClientRecord) -> Result<(), StoreError> {
        self.store.add_client(c).await
    }

    /// Disable (or enable) a client: every node refuses its tokens, and
    /// those of users signed in through it, within seconds. `false` when
    /// there is no such client.
    pub async fn set_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        self.store.set_client_disabled(id, disabled).await
    }

    /// Every registered client.
    pub async fn list(&self) -> Result<Vec<ClientRecord>, StoreError> {
        self.store.list_clients().await
    }

    /// The ids of disabled clients.
    pub async fn disabled(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .store
            .list_clients()
            .await?
            .into_iter()
            .filter(|c| c.disabled)
            .map(|c| c.id)
            .collect())
    }

    /// Record a client assertion's `jti`; false if it was used before (a
    /// replay).
    pub async fn use_jti(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.jtis.use_jti(client_id, jti, expires_at, now).await
    }
}
