//! Key events other processes record (a KEK generation added or retired,
//! a patient's data key erased: `keys_event_v1:N` in the meta table,
//! append-only, written by `keys`, read whole so that a removed entry
//! hides nothing after it), and what a server does about
//! them: reload the KEK's providers and, after an erasure, forget its
//! unwrapped data keys. Also the row names of keys that rotate in
//! generations (access tokens, search index) and the newest one stored.

use crate::data::keyring::KeyRing;
use phylax_store::{DynStore, StoreError};

pub const EVENT: &str = "keys_event_v1:";

/// The key-event and generation-record kind of the sign-in key
/// (`data::auth_keys`).
pub const SIGN_IN: &str = "sign-in";

/// Every key event, by number: the list is read whole, so that a
/// missing entry (removed from the database) does not hide the ones
/// after it.
async fn events(store: &DynStore) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut all: Vec<(u64, Vec<u8>)> = store
        .meta_with_prefix(EVENT)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k[EVENT.len()..].parse().ok()?, v)))
        .collect();
    all.sort_by_key(|(n, _)| *n);
    Ok(all)
}

/// The number the next event takes: after the highest recorded, or, if
/// that is the largest number there is (written by hand), the first one
/// free.
pub async fn next_event(store: &DynStore) -> Result<u64, StoreError> {
    let all = events(store).await?;
    let max = all.last().map_or(0, |(n, _)| *n);
    Ok(match max.checked_add(1) {
        Some(n) => n,
        None => {
            let used: std::collections::HashSet<u64> = all.iter().map(|(n, _)| *n).collect();
            (1..).find(|n| !used.contains(n)).unwrap_or(1)
        }
    })
}

/// Every kind a server follows, for when it cannot tell which changed.
const ALL_KINDS: [&str; 6] = [
    "tokens",
    "index",
    "cursors",
    "checkpoint",
    "data-keys",
    SIGN_IN,
];

/// What a server does about other processes' key events.
#[derive(Debug)]
pub struct KeyEvents {
    /// The event numbers seen: an event is new when its number is not
    /// among them (not when it is above the highest: a number written by
    /// hand cannot hide later events).
    seen: parking_lot::Mutex<std::collections::HashSet<u64>>,
}

impl KeyEvents {
    /// Start after the events recorded so far.
    pub async fn new(store: &DynStore) -> Result<KeyEvents, StoreError> {
        Ok(KeyEvents {
            seen: parking_lot::Mutex::new(
                events(store).await?.into_iter().map(|(n, _)| n).collect(),
            ),
        })
    }

    /// Look for new events; reload the KEK's providers and forget data
    /// keys if there are any. Returns the kinds seen (`kek-added`,
    /// `erase`, `tokens`…) for the caller's own keys.
    pub async fn poll(
        &self,
        store: &DynStore,
        keys: &KeyRing,
    ) -> Result<Vec<String>, KeyEventError> {
        let all = events(store).await?;
        let seen = self.seen.lock().clone();
        let mut erased = false;
        let mut any = false;
        let mut kinds = Vec::new();
        // An event seen before is gone: someone rewrote the list. Assume
        // the worst, once: reload everything and forget data keys.
        if seen.iter().any(|n| !all.iter().any(|(m, _)| m == n)) {
            tracing::warn!("key events were removed from the database; reloading keys");
            any = true;
            erased = true;
            kinds.extend(ALL_KINDS.iter().map(|k| (*k).to_owned()));
        }
        for (_, v) in all.iter().filter(|(n, _)| !seen.contains(n)) {
            any = true;
            erased |= v.starts_with(b"erase");
            if let Some(k) = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.split(' ').next())
            {
                kinds.push(k.to_owned());
            }
        }
        if !any {
            return Ok(kinds);
        }
        keys.kek().reload(true)?;
        if erased {
            keys.forget_data_keys();
        }
        *self.seen.lock() = all.iter().map(|(n, _)| *n).collect();
        Ok(kinds)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyEventError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] phylax_crypto::CryptoError),
}

/// Meta key recording that the search index was rebuilt under index key
/// generation N (`index_key_done_v1:N`): until then searches look under
/// the previous generation too.
pub const INDEX_KEY_DONE: &str = "index_key_done_v1:";

/// The row of the audit log's own patient index key.
pub const AUDIT_PATIENT_KEY: &str = "mac:audit-patient";

/// The wrapped-key row of search index key generation `n`.
pub fn index_key_row(n: u32) -> String {
    format!("mac:{}", phylax_crypto::blind::purpose(n))
}

/// The wrapped-key row of access-token key generation `n`.
pub fn token_key_row(n: u32) -> String {
    if n <= 1 {
        "mac:token".to_owned()
    } else {
        format!("mac:token@{n}")
    }
}

/// Meta keys recording each generation a rotation added
/// (`key_generation_v1:<kind>:N`, written before its key): the newest
/// generation is read from these, not by counting rows up from 1, because
/// rotations delete the generations before (`@2` gone, `@3` there).
pub const KEY_GENERATION: &str = "key_generation_v1:";

/// Record that generation `n` of `kind` (`index`, `tokens`, `cursors`)
/// exists; before its key is stored.
pub async fn record_generation(store: &DynStore, kind: &str, n: u32) -> Result<(), StoreError> {
    store
        .put_meta_if_absent(
            &format!("{KEY_GENERATION}{kind}:{n}"),
            crate::base::clock::now_secs().to_string().as_bytes(),
        )
        .await?;
    Ok(())
}

/// The newest generation of a rotating key of `kind` (1: never rotated),
/// given its rows by generation: the newest recorded, or a newer row
/// stored without a record (instances from before the records).
pub async fn newest_generation(
    store: &DynStore,
    kind: &str,
    row: fn(u32) -> String,
) -> Result<u32, StoreError> {
    let prefix = format!("{KEY_GENERATION}{kind}:");
    let mut n = store
        .meta_with_prefix(&prefix)
        .await?
        .iter()
        .filter_map(|(k, _)| k[prefix.len()..].parse::<u32>().ok())
        .max()
        .unwrap_or(1)
        .max(1);
    while store.get_wrapped_key(&row(n + 1)).await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The newest search index key generation stored.
pub async fn index_generation(store: &DynStore) -> Result<u32, StoreError> {
    newest_generation(store, "index", index_key_row).await
}

/// The newest access-token key generation stored.
pub async fn token_generation(store: &DynStore) -> Result<u32, StoreError> {
    newest_generation(store, "tokens", token_key_row).await
}

/// Meta keys recording each data-key generation (`data_keys_v1:N`): the
/// highest is the one resources are sealed under.
pub const DATA_KEYS: &str = "data_keys_v1:";

/// The data-key generation in force (1: never rotated).
pub async fn data_generation(store: &DynStore) -> Result<u32, StoreError> {
    Ok(store
        .meta_with_prefix(DATA_KEYS)
        .await?
        .iter()
        .filter_map(|(k, _)| k[DATA_KEYS.len()..].parse::<u32>().ok())
        .max()
        .unwrap_or(1))
}
