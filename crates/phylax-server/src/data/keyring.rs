//! Data keys by scope, created on first use and cached unwrapped in memory.
//!
//! Scopes: `patient:{id}` for resources in a patient's compartment (so one
//! patient's data can later be crypto-shredded without touching others) and
//! `tenant` for everything else. A key is generated, wrapped by the KEK and
//! stored with put-if-absent, then the stored one is unwrapped and used: if
//! two nodes race to create the same scope, both end up with the winner.

use phylax_crypto::signing::SigningKey;
use phylax_crypto::{DataKey, Kek};
use phylax_store::{KeyStore, StoreError};
use std::collections::HashMap;
use std::sync::Arc;

/// Bound on the in-memory cache (both generations together). A key that
/// falls out is fetched and unwrapped again on demand: one round trip.
const CACHE_MAX: usize = 100_000;

/// Unwrapped data keys in two generations, an approximate LRU without a
/// list to maintain under the lock. New and reused keys go to `hot`; when
/// `hot` is full it becomes `cold` and the old `cold` is dropped. A key
/// used at least once per generation therefore stays, so with more patients
/// than the bound the ones being worked on keep their keys, where clearing
/// the whole cache made every one of them a round trip again.
struct KeyCache {
    hot: HashMap<String, Arc<DataKey>>,
    cold: HashMap<String, Arc<DataKey>>,
    /// Entries per generation: half the bound.
    generation: usize,
}

impl KeyCache {
    fn new(max: usize) -> KeyCache {
        KeyCache {
            hot: HashMap::new(),
            cold: HashMap::new(),
            generation: (max / 2).max(1),
        }
    }

    /// A hot key, without taking the write lock.
    fn get_hot(&self, scope: &str) -> Option<Arc<DataKey>> {
        self.hot.get(scope).cloned()
    }

    /// Hot keys for a page of rows (`None`: a row without a sealed body).
    fn hot_many(&self, scopes: &[Option<&str>]) -> Vec<Option<Arc<DataKey>>> {
        scopes
            .iter()
            .map(|s| s.and_then(|s| self.get_hot(s)))
            .collect()
    }

    /// Fill in the keys `hot_many` did not find, from either generation.
    fn fill_misses(&mut self, scopes: &[Option<&str>], keys: &mut [Option<Arc<DataKey>>]) {
        for (k, s) in keys.iter_mut().zip(scopes) {
            if let (None, Some(s)) = (&k, s) {
                *k = self.get(s);
            }
        }
    }

    fn contains(&self, scope: &str) -> bool {
        self.hot.contains_key(scope) || self.cold.contains_key(scope)
    }

    /// A key from either generation; a cold one moves to `hot`.
    fn get(&mut self, scope: &str) -> Option<Arc<DataKey>> {
        if let Some(k) = self.hot.get(scope) {
            return Some(k.clone());
        }
        let k = self.cold.remove(scope)?;
        self.insert(scope, k.clone());
        Some(k)
    }

    fn insert(&mut self, scope: &str, key: Arc<DataKey>) {
        if self.hot.len() >= self.generation && !self.hot.contains_key(scope) {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(scope.to_owned(), key);
    }
}

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
    store: Arc<dyn KeyStore>,
    cache: parking_lot::RwLock<KeyCache>,
    /// The data-key generation resources are sealed under now (1 until
    /// the first `keys rotate --data-keys`).
    data_generation: std::sync::atomic::AtomicU32,
}

/// The key-ring name of generation `generation` of `scope`'s data key:
/// the scope itself for the first, `scope@N` after (stored as
/// `data:scope@N`, wrapped with that name bound in).
pub fn key_name(scope: &str, generation: u32) -> std::borrow::Cow<'_, str> {
    if generation <= 1 {
        std::borrow::Cow::Borrowed(scope)
    } else {
        std::borrow::Cow::Owned(format!("{scope}@{generation}"))
    }
}

/// Whether `scope` seals resources (its key rotates with `--data-keys`).
pub fn is_resource_scope(scope: &str) -> bool {
    scope == "tenant" || scope.starts_with("patient:")
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
    /// When the wrapped key stored as `row` was created (seconds), for
    /// key-age metrics.
    pub async fn created(&self, row: &str) -> Result<Option<i64>, StoreError> {
        self.store.wrapped_key_created(row).await
    }

    pub fn new(kek: Kek, store: Arc<dyn KeyStore>) -> KeyRing {
        KeyRing {
            kek,
            store,
            cache: parking_lot::RwLock::new(KeyCache::new(CACHE_MAX)),
            data_generation: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// The data-key generation new resource versions are sealed under.
    pub fn data_generation(&self) -> u32 {
        self.data_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Seal new resource versions under generation `n` from now on (a
    /// data-key rotation's key event).
    pub fn set_data_generation(&self, n: u32) {
        self.data_generation
            .store(n.max(1), std::sync::atomic::Ordering::Release);
    }

    /// The KEK (for key administration: rotation re-wraps with it).
    pub fn kek(&self) -> &Kek {
        &self.kek
    }

    /// Forget every unwrapped data key (a patient's key was erased: no
    /// node may keep sealing with it). Keys in use are unwrapped again on
    /// their next use, one round trip each.
    pub fn forget_data_keys(&self) {
        *self.cache.write() = KeyCache::new(CACHE_MAX);
    }

    /// The key for `scope` if it is in memory (no database access).
    pub(crate) fn cached(&self, scope: &str) -> Option<Arc<DataKey>> {
        // The common case (a hot key) takes only the read lock.
        if let Some(k) = self.cache.read().get_hot(scope) {
            return Some(k);
        }
        self.cache.write().get(scope)
    }

    fn remember(&self, scope: &str, key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        self.cache.write().insert(scope, key.clone());
        key
    }

    /// [`KeyRing::cached`] for a page of rows, under one read lock (the
    /// write lock only if some key is not hot): a lock and its shared
    /// counter per row were a visible part of opening a search page.
    pub(crate) fn cached_all(&self, scopes: &[Option<&str>]) -> Vec<Option<Arc<DataKey>>> {
        let mut keys = self.cache.read().hot_many(scopes);
        if keys
            .iter()
            .zip(scopes)
            .any(|(k, s)| k.is_none() && s.is_some())
        {
            self.cache.write().fill_misses(scopes, &mut keys);
        }
        keys
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
                    .put_wrapped_key_if_absent(&row_name(scope), &w, crate::base::clock::now_secs())
                    .await?
            }
        };
        let key = self
            .kek
            .unwrap_data_key(scope, &wrapped)
            .map_err(|_| KeyError::Unwrap)?;
        Ok(self.remember(scope, key))
    }

    /// [`KeyRing::for_write`] for many scopes at once: those not in memory
    /// are fetched in one read, and those that do not exist yet are made
    /// and stored in one write (a data-key rotation's page of versions
    /// needs the new generation's key of every compartment on it).
    pub async fn for_write_many(&self, scopes: &[String]) -> Result<(), KeyError> {
        let missing: std::collections::BTreeSet<&String> =
            scopes.iter().filter(|s| self.cached(s).is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<String> = missing.iter().map(|s| row_name(s)).collect();
        let mut found = std::collections::BTreeSet::new();
        for (row, wrapped) in self.store.get_wrapped_keys(&rows).await? {
            if let Some(scope) = row.strip_prefix("data:") {
                let key = self
                    .kek
                    .unwrap_data_key(scope, &wrapped)
                    .map_err(|_| KeyError::Unwrap)?;
                self.remember(scope, key);
                found.insert(scope.to_owned());
            }
        }
        let mut fresh = Vec::new();
        let mut names = Vec::new();
        for scope in missing.into_iter().filter(|s| !found.contains(*s)) {
            let key = DataKey::generate().map_err(|_| KeyError::Random)?;
            let w = self
                .kek
                .wrap_data_key(scope, &key)
                .map_err(|_| KeyError::Random)?;
            fresh.push((row_name(scope), w));
            names.push(scope.clone());
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let stored = self
            .store
            .put_wrapped_keys_if_absent(fresh, crate::base::clock::now_secs())
            .await?;
        // What is stored wins (another node may have made it first).
        for (scope, wrapped) in names.iter().zip(stored) {
            let key = self
                .kek
                .unwrap_data_key(scope, &wrapped)
                .map_err(|_| KeyError::Unwrap)?;
            self.remember(scope, key);
        }
        Ok(())
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
                .filter(|s| !cache.contains(s))
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

    /// Seal `plain` under the data key of `scope` (accounts, grants) of
    /// the generation in force, naming the generation in the record, so
    /// that `keys rotate --data-keys` can move these records too.
    pub async fn seal_current(
        &self,
        scope: &str,
        aad: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let g = self.data_generation();
        let key = self.for_write(&key_name(scope, g)).await?;
        key.seal_gen(g, aad, plain).map_err(|_| KeyError::Random)
    }

    /// The data key of `scope` that opens `sealed` (by the generation the
    /// record names), or `None` if the record names none.
    pub async fn for_record(
        &self,
        scope: &str,
        sealed: &[u8],
    ) -> Result<Option<Arc<DataKey>>, KeyError> {
        match phylax_crypto::datakey::record_generation(sealed) {
            Some(g) => self.for_read(&key_name(scope, g)).await.map(Some),
            None => Ok(None),
        }
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
            .put_wrapped_key_if_absent(&signing_row(n), &w, crate::base::clock::now_secs())
            .await?;
        SigningKey::unwrap(&self.kek, &kid, &stored).map_err(|_| KeyError::Unwrap)
    }
}

/// The wrapped-key row of checkpoint key generation `n` (its private key,
/// while it signs) and of its public half once retired.
pub fn checkpoint_row(n: u32) -> String {
    format!("log:checkpoint-{n}")
}

pub fn retired_checkpoint_row(n: u32) -> String {
    format!("log:retired-checkpoint-{n}")
}

/// The audit log's checkpoint keys: the one that signs, and the public
/// halves of those before it (older checkpoints verify with them).
#[derive(Debug)]
pub struct CheckpointKeys {
    pub generation: u32,
    pub signer: phylax_crypto::log_signing::CheckpointKey,
    pub retired: Vec<[u8; 32]>,
}

impl KeyRing {
    /// The audit log's checkpoint keys (Ed25519): the newest generation
    /// whose private key is stored signs; every other generation, private
    /// or retired, verifies (docs/KEYS.md, "The checkpoint key"). A
    /// generation missing below a later one is refused (fail closed), and
    /// generation 1 is made only when `may_create` (a log with nothing in
    /// it yet): a database whose key rows were deleted must not quietly
    /// get a new key that signs whatever is there.
    pub async fn checkpoint_keys(&self, may_create: bool) -> Result<CheckpointKeys, KeyError> {
        use phylax_crypto::log_signing::CheckpointKey;
        let scope = |n: u32| format!("checkpoint-{n}");
        let mut private = Vec::new();
        let mut retired = Vec::new();
        let mut n = 1;
        loop {
            if let Some(w) = self.store.get_wrapped_key(&checkpoint_row(n)).await? {
                private.push((n, w));
            } else if let Some(w) = self
                .store
                .get_wrapped_key(&retired_checkpoint_row(n))
                .await?
            {
                retired.push(
                    CheckpointKey::unwrap_public(&self.kek, &format!("retired-{}", scope(n)), &w)
                        .map_err(|_| KeyError::Unwrap)?,
                );
            } else {
                break;
            }
            n += 1;
        }
        // A later generation beyond a missing one: a generation that
        // existed is gone (retired generations keep their public half).
        for later in n + 1..n + 16 {
            if self
                .store
                .get_wrapped_key(&checkpoint_row(later))
                .await?
                .is_some()
                || self
                    .store
                    .get_wrapped_key(&retired_checkpoint_row(later))
                    .await?
                    .is_some()
            {
                return Err(KeyError::Missing);
            }
        }
        let (generation, w) = match private.pop() {
            Some(p) => p,
            None if n == 1 && may_create => {
                let (_, w) = CheckpointKey::generate_wrapped(&self.kek, &scope(1))
                    .map_err(|_| KeyError::Random)?;
                let w = self
                    .store
                    .put_wrapped_key_if_absent(
                        &checkpoint_row(1),
                        &w,
                        crate::base::clock::now_secs(),
                    )
                    .await?;
                (1, w)
            }
            // No key, but a log that has signed checkpoints; or every
            // generation retired: nothing may sign (fail closed).
            None => return Err(KeyError::Missing),
        };
        for (m, w) in private {
            retired.push(
                CheckpointKey::unwrap(&self.kek, &scope(m), &w)
                    .map_err(|_| KeyError::Unwrap)?
                    .public(),
            );
        }
        Ok(CheckpointKeys {
            generation,
            signer: CheckpointKey::unwrap(&self.kek, &scope(generation), &w)
                .map_err(|_| KeyError::Unwrap)?,
            retired,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn key() -> Arc<DataKey> {
        Arc::new(DataKey::generate().unwrap())
    }

    /// Keys in use survive the cache filling up with others; the bound
    /// holds; a key unused for a whole generation is dropped.
    #[test]
    fn keys_in_use_stay_when_the_cache_fills() {
        let mut c = KeyCache::new(8); // generations of 4
        let hot = key();
        c.insert("patient:hot", hot.clone());
        c.insert("patient:idle", key());
        for i in 0..100 {
            c.insert(&format!("patient:{i}"), key());
            // The patient being worked on is used between the others.
            let k = c.get("patient:hot").unwrap();
            assert!(Arc::ptr_eq(&k, &hot));
            assert!(c.hot.len() + c.cold.len() <= 8);
            assert!(c.hot.len() <= 4);
        }
        assert!(c.get("patient:idle").is_none());
        assert!(!c.contains("patient:0"));
        // The most recent ones are still there, in either generation.
        assert!(c.contains("patient:99") && c.contains("patient:98"));
        // Reinserting a hot key does not start a new generation.
        let before = c.cold.len();
        c.insert("patient:99", key());
        assert_eq!(c.cold.len(), before);
    }

    /// A page's keys: hot ones at once, cold ones moved to `hot`, unknown
    /// scopes and rows without a body left empty, each in its row's place.
    #[test]
    fn a_page_of_keys_in_row_order() {
        let mut c = KeyCache::new(4); // generations of 2
        let (a, b) = (key(), key());
        c.insert("patient:a", a.clone());
        c.insert("patient:b", b.clone());
        c.insert("patient:c", key()); // a and b are now cold
        let scopes = [
            Some("patient:c"),
            None,
            Some("patient:a"),
            Some("patient:x"),
        ];
        let mut keys = c.hot_many(&scopes);
        assert!(keys[0].is_some() && keys[1].is_none() && keys[2].is_none());
        c.fill_misses(&scopes, &mut keys);
        assert!(Arc::ptr_eq(keys[2].as_ref().unwrap(), &a));
        assert!(keys[1].is_none() && keys[3].is_none());
        assert!(c.get_hot("patient:a").is_some(), "a used: hot again");
        assert!(c.get_hot("patient:b").is_none());
    }
}
