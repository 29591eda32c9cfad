//! The sign-in MAC key in generations (docs/KEYS.md, "The sign-in key").
//!
//! The key hashes what sign-in looks up by a secret or a name: grants
//! (codes, sessions, refresh tokens), recovery codes, enrollment links,
//! usernames and CSRF tags. A hash cannot be recomputed without its
//! secret, so a rotation cannot re-hash grants or recovery codes: every
//! generation something still depends on stays loaded, lookups try each
//! (newest first), and new hashes are made under the newest only. Stored
//! string hashes name their generation (`g3:` and hex; generation 1 is
//! plain hex, as before rotations existed), so what still depends on an
//! old generation can be counted and the generation deleted when nothing
//! does (`phylax keys retire`).

use phylax_crypto::{Kek, MacKey};
use phylax_store::{DynStore, StoreError};
use std::sync::Arc;

/// Meta-record and key-event kind of sign-in key generations
/// (`key_generation_v1:sign-in:N`).
pub use crate::data::key_events::SIGN_IN as KIND;

/// Meta key recording, per generation G, when the grants hashed under the
/// generations before G all expire (`sign_in_grants_until_v1:G`): written
/// by the rotation to G once every node hashes under G.
pub const GRANTS_UNTIL: &str = "sign_in_grants_until_v1:";

/// Meta key marking generation N retired (`sign_in_retired_v1:N`),
/// written before its key is deleted: a key row put back from a backup
/// does not bring it back.
pub const RETIRED: &str = "sign_in_retired_v1:";

/// The wrapping purpose of generation `n`.
pub fn purpose(n: u32) -> String {
    if n <= 1 {
        "auth".to_owned()
    } else {
        format!("auth@{n}")
    }
}

/// The wrapped-key row of generation `n`.
pub fn row(n: u32) -> String {
    format!("mac:{}", purpose(n))
}

/// The generation a stored string hash was made under (`None`: not a
/// hash of ours).
pub fn generation_of(stored: &str) -> Option<u32> {
    match stored.strip_prefix('g') {
        Some(rest) => {
            let (n, hex) = rest.split_once(':')?;
            let n: u32 = n.parse().ok()?;
            (n >= 2 && hex.len() == 64).then_some(n)
        }
        None => (stored.len() == 64).then_some(1),
    }
}

/// The live generations, newest first.
type Gens = Arc<[(u32, Arc<MacKey>)]>;

/// Every sign-in key generation something may still depend on.
#[derive(Debug)]
pub struct AuthKeys {
    gens: parking_lot::RwLock<Gens>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the sign-in key {0} does not unwrap with this KEK")]
    Unwrap(String),
    #[error("the sign-in key {0} is missing from the database (usernames are hashed under it): restore its wrapped_keys row from a backup, or see docs/KEYS.md, \"Recovery\"")]
    Missing(String),
}

impl AuthKeys {
    /// A single generation (a new instance, or tests).
    pub fn single(key: MacKey) -> AuthKeys {
        AuthKeys {
            gens: parking_lot::RwLock::new(Arc::from(vec![(1, Arc::new(key))])),
        }
    }

    /// The stored generations: the newest, which must exist, and every
    /// older one not yet retired.
    pub async fn load(store: &DynStore, kek: &Kek) -> Result<AuthKeys, AuthKeyError> {
        let newest = crate::data::key_events::newest_generation(store, KIND, row).await?;
        let retired: std::collections::HashSet<u32> = store
            .meta_with_prefix(RETIRED)
            .await?
            .iter()
            .filter_map(|(k, _)| k[RETIRED.len()..].parse().ok())
            .collect();
        let mut gens = Vec::new();
        for n in (1..=newest).rev() {
            let Some(w) = store.get_wrapped_key(&row(n)).await? else {
                if n == newest {
                    return Err(AuthKeyError::Missing(row(n)));
                }
                continue;
            };
            if retired.contains(&n) && n != newest {
                tracing::warn!(
                    key = %row(n),
                    "a retired sign-in key is back in the database (restored from a backup?); it is not used"
                );
                continue;
            }
            let key =
                MacKey::unwrap(kek, &purpose(n), &w).map_err(|_| AuthKeyError::Unwrap(row(n)))?;
            gens.push((n, Arc::new(key)));
        }
        Ok(AuthKeys {
            gens: parking_lot::RwLock::new(Arc::from(gens)),
        })
    }

    /// Take another load's generations (after a rotation or retirement).
    pub fn replace(&self, other: AuthKeys) {
        *self.gens.write() = other.gens.into_inner();
    }

    /// Every live generation, newest first.
    pub fn live(&self) -> Gens {
        self.gens.read().clone()
    }

    pub fn generations(&self) -> Vec<u32> {
        self.live().iter().map(|(n, _)| *n).collect()
    }

    /// The generation new hashes are made under.
    pub fn current(&self) -> (u32, Arc<MacKey>) {
        let g = self.live();
        // `load` and `single` never make an empty list.
        g.first()
            .map(|(n, k)| (*n, k.clone()))
            .unwrap_or_else(|| unreachable!("no sign-in key generation"))
    }

    fn get(&self, n: u32) -> Option<Arc<MacKey>> {
        self.live()
            .iter()
            .find(|(g, _)| *g == n)
            .map(|(_, k)| k.clone())
    }

    /// The MAC of `msg` under the newest generation.
    pub fn sign(&self, msg: &[u8]) -> [u8; 32] {
        self.current().1.sign(msg)
    }

    /// The MAC of `msg` under generation `n`, if it is live.
    pub fn sign_under(&self, n: u32, msg: &[u8]) -> Option<[u8; 32]> {
        self.get(n).map(|k| k.sign(msg))
    }

    /// The MAC of `msg` under every live generation, newest first: the
    /// candidates a lookup by hash tries.
    pub fn sign_all(&self, msg: &[u8]) -> Vec<(u32, [u8; 32])> {
        self.live().iter().map(|(n, k)| (*n, k.sign(msg))).collect()
    }

    /// A hash to store as a string, naming its generation.
    pub fn tagged(&self, msg: &[u8]) -> String {
        let (n, k) = self.current();
        let hex = hex::encode(k.sign(msg));
        if n <= 1 {
            hex
        } else {
            format!("g{n}:{hex}")
        }
    }

    /// Whether `stored` (from [`AuthKeys::tagged`]) is the hash of `msg`,
    /// under the generation it names (constant-time compare). A retired
    /// generation matches nothing.
    pub fn matches_tagged(&self, msg: &[u8], stored: &str) -> bool {
        use subtle::ConstantTimeEq;
        let Some(n) = generation_of(stored) else {
            return false;
        };
        let Some(k) = self.get(n) else {
            return false;
        };
        let hex = hex::encode(k.sign(msg));
        let given = stored.rsplit(':').next().unwrap_or(stored);
        hex.as_bytes().ct_eq(given.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(generation_of(&hex), Some(1));
        assert_eq!(generation_of(&format!("g2:{hex}")), Some(2));
        assert_eq!(generation_of(&format!("g1:{hex}")), None);
        assert_eq!(generation_of(&format!("gx:{hex}")), None);
        assert_eq!(generation_of("g3:abc"), None);
        assert_eq!(generation_of(""), None);
    }
}
