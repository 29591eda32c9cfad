//! Data keys by scope, created on first use and cached unwrapped in memory.
//!
//! Scopes: `patient:{id}` for resources in a patient's compartment (so one
//! patient's data can later be crypto-shredded without touching others) and
//! `tenant` for everything else. A key is generated, wrapped by the KEK and
//! stored with put-if-absent, then the stored one is unwrapped and used: if
//! two nodes race to create the same scope, both end up with the winner.

use phylax_crypto::signing::SigningKey;
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

    /// Fetch and cache, in one read, the keys of these scopes that are not
    /// cached yet (a search page's, whose results each have their own
    /// patient's key: one round trip per page instead of one per result
    /// after a restart, or whenever the cache has been cleared). Keys that
    /// are missing or fail to unwrap are left out: [`KeyRing::for_read`]
    /// reports them for the record that needs them.
    pub async fn prefetch<'a>(
        &self,
        scopes: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), KeyError> {
        let want: Vec<String> = {
            let cache = self.cache.read();
            scopes
                .into_iter()
                .filter(|s| !cache.contains_key(*s))
                .map(row_name)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        if want.len() < 2 {
            // Nothing to batch: `for_read` fetches a single key itself.
            return Ok(());
        }
        for (row, wrapped) in self.store.get_wrapped_keys(&want).await? {
            let Some(scope) = row.strip_prefix("data:") else {
                continue;
            };
            if let Ok(key) = self.kek.unwrap_data_key(scope, &wrapped) {
                self.remember(scope, key);
            }
        }
        Ok(())
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

fn signing_row(n: usize) -> String {
    format!("sig:sig-{n}")
}

impl KeyRing {
    /// The `id_token` signing keys, oldest first (`sig-1`, `sig-2`, …); the
    /// last one signs. The first is created on first use (race-safe).
    pub async fn signing_keys(&self) -> Result<Vec<SigningKey>, KeyError> {
        let mut out = Vec::new();
        while let Some(w) = self
            .store
            .get_wrapped_key(&signing_row(out.len() + 1))
            .await?
        {
            let kid = format!("sig-{}", out.len() + 1);
            out.push(SigningKey::unwrap(&self.kek, &kid, &w).map_err(|_| KeyError::Unwrap)?);
        }
        if out.is_empty() {
            out.push(self.add_signing_key(1).await?);
        }
        Ok(out)
    }

    /// Is there a key newer than the `n` we know (another node rotated)?
    pub async fn signing_key_added(&self, n: usize) -> Result<bool, KeyError> {
        Ok(self
            .store
            .get_wrapped_key(&signing_row(n + 1))
            .await?
            .is_some())
    }

    /// Add the next signing key; returns its `kid`. Tokens signed with the
    /// previous key keep verifying: the JWKS publishes both.
    pub async fn rotate_signing(&self) -> Result<String, KeyError> {
        let n = self.signing_keys().await?.len() + 1;
        Ok(self.add_signing_key(n).await?.kid().to_owned())
    }

    async fn add_signing_key(&self, n: usize) -> Result<SigningKey, KeyError> {
        let kid = format!("sig-{n}");
        let (_, w) = SigningKey::generate_wrapped(&self.kek, &kid).map_err(|_| KeyError::Random)?;
        let stored = self
            .store
            .put_wrapped_key_if_absent(&signing_row(n), &w, crate::now_secs())
            .await?;
        SigningKey::unwrap(&self.kek, &kid, &stored).map_err(|_| KeyError::Unwrap)
    }
}

impl KeyRing {
    /// The audit log's checkpoint key (Ed25519), created on first use
    /// (race-safe: every node ends up with the stored one).
    pub async fn checkpoint_key(
        &self,
    ) -> Result<phylax_crypto::log_signing::CheckpointKey, KeyError> {
        use phylax_crypto::log_signing::CheckpointKey;
        const ROW: &str = "log:checkpoint-1";
        const SCOPE: &str = "checkpoint-1";
        let w = match self.store.get_wrapped_key(ROW).await? {
            Some(w) => w,
            None => {
                let (_, w) = CheckpointKey::generate_wrapped(&self.kek, SCOPE)
                    .map_err(|_| KeyError::Random)?;
                self.store
                    .put_wrapped_key_if_absent(ROW, &w, crate::now_secs())
                    .await?
            }
        };
        CheckpointKey::unwrap(&self.kek, SCOPE, &w).map_err(|_| KeyError::Unwrap)
    }
}
