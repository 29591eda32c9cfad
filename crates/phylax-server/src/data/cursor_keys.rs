//! Paging-cursor keys, in generations: a MAC key for `_history` cursors
//! (`mac:cursor`, `mac:cursor@N`) and a data key that seals search
//! cursors (`data:cursor`, `data:cursor@N`). A rotation (`phylax keys
//! rotate --cursors`, docs/KEYS.md) adds generation N+1; servers issue
//! cursors under it and still open those issued under N, so no client's
//! next-page link breaks; generations before N are deleted.

use phylax_crypto::{Kek, MacKey};
use phylax_store::{DynStore, StoreError};
use std::sync::Arc;

/// The MAC purpose of generation `n` (1: the original).
pub fn mac_purpose(n: u32) -> String {
    if n <= 1 {
        "cursor".to_owned()
    } else {
        format!("cursor@{n}")
    }
}

/// The wrapped-key row of generation `n`'s MAC key.
pub fn mac_row(n: u32) -> String {
    format!("mac:{}", mac_purpose(n))
}

/// The data-key scope sealing generation `n`'s search cursors (its row is
/// `data:` and the scope).
pub fn data_scope(n: u32) -> String {
    mac_purpose(n)
}

#[derive(Debug, thiserror::Error)]
pub enum CursorKeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a cursor key does not unwrap with this KEK")]
    Unwrap,
    #[error("randomness unavailable")]
    Random,
}

/// The cursor keys in force.
#[derive(Debug)]
pub struct CursorSet {
    pub generation: u32,
    current: MacKey,
    previous: Option<MacKey>,
}

/// The newest generation stored, its MAC key (created if the instance has
/// none yet) and the one before it.
pub async fn load(store: &DynStore, kek: &Kek) -> Result<CursorSet, CursorKeyError> {
    let n = crate::data::key_events::newest_generation(store, "cursors", mac_row).await?;
    let w = match store.get_wrapped_key(&mac_row(n)).await? {
        Some(w) => w,
        None => {
            let (_, w) = MacKey::generate_wrapped(kek, &mac_purpose(n))
                .map_err(|_| CursorKeyError::Random)?;
            store
                .put_wrapped_key_if_absent(&mac_row(n), &w, crate::base::clock::now_secs())
                .await?
        }
    };
    let current = MacKey::unwrap(kek, &mac_purpose(n), &w).map_err(|_| CursorKeyError::Unwrap)?;
    let previous = match n {
        1 => None,
        _ => match store.get_wrapped_key(&mac_row(n - 1)).await? {
            Some(w) => Some(
                MacKey::unwrap(kek, &mac_purpose(n - 1), &w).map_err(|_| CursorKeyError::Unwrap)?,
            ),
            None => None,
        },
    };
    Ok(CursorSet {
        generation: n,
        current,
        previous,
    })
}

/// The cursor keys a server uses, replaced when a rotation's key event
/// arrives.
#[derive(Debug)]
pub struct CursorKeys(parking_lot::RwLock<Arc<CursorSet>>);

impl CursorKeys {
    pub fn new(set: CursorSet) -> CursorKeys {
        CursorKeys(parking_lot::RwLock::new(Arc::new(set)))
    }

    pub fn replace(&self, set: CursorSet) {
        *self.0.write() = Arc::new(set);
    }

    fn get(&self) -> Arc<CursorSet> {
        self.0.read().clone()
    }

    /// MAC a `_history` cursor with the current key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 32] {
        self.get().current.sign(msg)
    }

    /// Whether a `_history` cursor's tag is the current key's or the
    /// previous one's.
    pub fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        let s = self.get();
        s.current.verify(msg, tag) || s.previous.as_ref().is_some_and(|p| p.verify(msg, tag))
    }

    /// The data-key scope new search cursors are sealed under, and the
    /// one before it (cursors issued before the rotation), if any.
    pub fn search_scopes(&self) -> (String, Option<String>) {
        let s = self.get();
        let n = s.generation;
        (data_scope(n), (n > 1).then(|| data_scope(n - 1)))
    }
}
