//! Data keys by scope, created on first use and cached unwrapped in memory.
//!
//! Scopes: `patient:{id}` for resources in a patient's compartment (so one
//! patient's data can later be crypto-shredded without touching others) and
//! `tenant` for everything else. A key is generated, wrapped by the KEK and
//! stored with put-if-absent, then the stored one is unwrapped and used: if
//! two nodes race to create the same scope, both end up with the winner.

use phylax_crypto::{DataKey, Kek};
use phylax_store::{DynStore, StoreError};
use std::collections::HashMap;
use std::sync::Arc;

/// Bound on the in-memory cache; when exceeded the cache is cleared (keys
/// are re-unwrapped on demand, which is cheap).
const CACHE_MAX: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key unwrap failed for a stored data key (wrong KEK or tampered key row)")]
    Unwrap,
    #[error("no data key for a stored record's scope")]
    Missing,
    #[error("random number generator failed")]
    Random,
}

pub struct KeyRing {
    kek: Kek,
    store: DynStore,
    cache: parking_lot::RwLock<HashMap<String, Arc<DataKey>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").finish_non_exhaustive()
    }
}

fn row_name(scope: &str) -> String {
    format!("data:{scope}")
}

impl KeyRing {
    pub fn new(kek: Kek, store: DynStore) -> KeyRing {
        KeyRing {
            kek,
            store,
            cache: parking_lot::RwLock::new(HashMap::new()),
        }
    }

    fn cached(&self, scope: &str) -> Option<Arc<DataKey>> {
        self.cache.read().get(scope).cloned()
    }

    fn remember(&self, scope: &str, key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        let mut c = self.cache.write();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(scope.to_owned(), key.clone());
        key
    }

    /// The data key for `scope`, creating it if this is the scope's first write.
    pub async fn for_write(&self, scope: &str) -> Result<Arc<DataKey>, KeyError> {
        if let Some(k) = self.cached(scope) {
            return Ok(k);
        }
        let wrapped = match self.store.get_wrapped_key(&row_name(scope)).await? {
            Some(w) => w,
            None => {
                let fresh = DataKey::generate().map_err(|_| KeyError::Random)?;
                let w = self
                    .kek
                    .wrap_data_key(scope, &fresh)
                    .map_err(|_| KeyError::Random)?;
                self.store
                    .put_wrapped_key_if_absent(&row_name(scope), &w, crate::now_secs())
                    .await?
            }
        };
        let key = self
            .kek
            .unwrap_data_key(scope, &wrapped)
            .map_err(|_| KeyError::Unwrap)?;
        Ok(self.remember(scope, key))
    }

    /// The data key for reading a record sealed under `scope`.
    pub async fn for_read(&self, scope: &str) -> Result<Arc<DataKey>, KeyError> {
        if let Some(k) = self.cached(scope) {
            return Ok(k);
        }
        let wrapped = self
            .store
            .get_wrapped_key(&row_name(scope))
            .await?
            .ok_or(KeyError::Missing)?;
        let key = self
            .kek
            .unwrap_data_key(scope, &wrapped)
            .map_err(|_| KeyError::Unwrap)?;
        Ok(self.remember(scope, key))
    }
}
