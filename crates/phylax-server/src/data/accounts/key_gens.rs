//! What accounts hold under each sign-in key generation, and moving
//! usernames to the newest one (docs/KEYS.md, "The sign-in key"); binding
//! accounts sealed before they named their role and status.
//!
//! Usernames can be re-hashed (the name is inside the sealed account);
//! recovery codes and enrollment links cannot (only their hashes are
//! kept), so they keep their generation alive until they are used,
//! replaced or expire.

use super::{AccountError, Accounts};
use crate::data::auth_keys::generation_of;
use phylax_store::StoreError;
use phylax_store::UserRecord;
use serde::Serialize;
use std::collections::BTreeMap;

/// What still depends on one sign-in key generation in the accounts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GenerationUse {
    /// Usernames still hashed under it (a re-hash not finished).
    pub usernames: u64,
    /// Users whose unused recovery codes were hashed under it.
    pub recovery_code_sets: u64,
    /// Unexpired enrollment links hashed under it.
    pub enrollment_links: u64,
    /// The ids of those users (not names: ids are not identifying).
    pub users: Vec<String>,
}

impl GenerationUse {
    pub fn is_empty(&self) -> bool {
        self.usernames + self.recovery_code_sets + self.enrollment_links == 0
    }
}

/// Keyed hashes under the sign-in key's generations.
impl Accounts {
    pub(super) fn keyed_msg(domain: &str, value: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(domain.len() + 1 + value.len());
        msg.extend_from_slice(domain.as_bytes());
        msg.push(0);
        msg.extend_from_slice(value);
        msg
    }

    /// A keyed, domain-separated hash (hex) of an identifier under the
    /// newest sign-in key, for what is never stored (throttle counters).
    pub fn keyed(&self, domain: &str, value: &[u8]) -> String {
        hex::encode(self.auth_keys.sign(&Self::keyed_msg(domain, value)))
    }

    /// A keyed hash of a secret to store (recovery codes, enrollment
    /// links), naming the sign-in key generation it was made under.
    pub(crate) fn keyed_stored(&self, domain: &str, value: &[u8]) -> String {
        self.auth_keys.tagged(&Self::keyed_msg(domain, value))
    }

    /// Whether a stored keyed hash is that of `value`.
    pub(crate) fn keyed_matches(&self, domain: &str, value: &[u8], stored: &str) -> bool {
        self.auth_keys
            .matches_tagged(&Self::keyed_msg(domain, value), stored)
    }

    pub(super) fn username_msg(normalized: &str) -> Vec<u8> {
        let mut msg = b"username\0".to_vec();
        msg.extend_from_slice(normalized.as_bytes());
        msg
    }

    /// The username hash a user is stored under (the newest generation).
    pub(super) fn username_hash(&self, normalized: &str) -> Vec<u8> {
        self.auth_keys
            .sign(&Self::username_msg(normalized))
            .to_vec()
    }

    /// Take the sign-in key generations from the database (what a
    /// key event would bring a server a second later).
    pub(super) async fn reload_auth_keys(&self) -> Result<(), AccountError> {
        let fresh = crate::data::auth_keys::AuthKeys::load(&self.key_store, self.keys.kek())
            .await
            .map_err(|e| AccountError::Keys(e.to_string()))?;
        self.auth_keys.replace(fresh);
        Ok(())
    }

    /// Every user stored under `normalized`, by any live generation's hash.
    pub(super) async fn holders(&self, normalized: &str) -> Result<Vec<UserRecord>, AccountError> {
        let mut out: Vec<UserRecord> = Vec::new();
        for (_, h) in self.auth_keys.sign_all(&Self::username_msg(normalized)) {
            if let Some(r) = self.store.find_user(&h).await? {
                if !out.iter().any(|o| o.id == r.id) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The user stored under `normalized` by any live generation's hash
    /// (a rotation re-hashes every username, but not all at once).
    pub(super) async fn find_normalized(
        &self,
        normalized: &str,
    ) -> Result<Option<UserRecord>, AccountError> {
        let hashes = self.auth_keys.sign_all(&Self::username_msg(normalized));
        // Twice when there are several generations: a rotation re-hashing
        // this username between the lookups under the newer and the older
        // hash would otherwise make a user who exists look absent.
        let rounds = if hashes.len() > 1 { 2 } else { 1 };
        for _ in 0..rounds {
            for (_, h) in &hashes {
                if let Some(r) = self.store.find_user(h).await? {
                    return Ok(Some(r));
                }
            }
        }
        Ok(None)
    }
}

impl Accounts {
    /// Bind every account sealed before accounts named their role and
    /// status (once per instance; then unbound accounts are refused).
    /// An account that does not open is left as it is (it cannot be used
    /// either way) and logged.
    pub async fn bind_all(&self) -> Result<u64, AccountError> {
        if self
            .key_store
            .get_meta(super::ACCOUNTS_BOUND)
            .await?
            .is_some()
        {
            return Ok(0);
        }
        let mut bound = 0;
        for rec in self.store.list_users().await? {
            let id = rec.id.clone();
            match self.open(rec).await {
                Ok(u) if u.acct.bound.is_none() => {
                    self.modify(&id, |_| Ok(())).await?;
                    bound += 1;
                }
                Ok(_) => {}
                Err(AccountError::Sealed) => {
                    tracing::warn!(user = %id, "account not bound: it does not open")
                }
                // The database or a key unavailable: try again at the next
                // start rather than lock the account out for good.
                Err(e) => return Err(e),
            }
        }
        self.key_store
            .put_meta_if_absent(super::ACCOUNTS_BOUND, b"1")
            .await?;
        Ok(bound)
    }

    /// Seal every account again under the data-key generation in force
    /// (a data-key rotation). Returns how many moved.
    pub async fn reseal_all(&self) -> Result<u64, AccountError> {
        let g = self.keys.data_generation();
        let mut moved = 0;
        for rec in self.store.list_users().await? {
            if phylax_crypto::datakey::record_generation(&rec.sealed) == Some(g) {
                continue;
            }
            match self.modify(&rec.id, |_| Ok(())).await {
                Ok(_) => moved += 1,
                Err(AccountError::NoSuchUser) => {}
                Err(e) => {
                    return Err(AccountError::Keys(format!(
                        "user {} could not be sealed again ({e}); see docs/KEYS.md, \"Recovery\"",
                        rec.id
                    )))
                }
            }
        }
        Ok(moved)
    }

    /// Hash every username under the newest sign-in key generation;
    /// `progress(done, total)` after each user. Returns how many changed.
    /// Lookups try every live generation meanwhile, so sign-in keeps
    /// working throughout.
    pub async fn rehash_usernames(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<u64, AccountError> {
        let recs = self.store.list_users().await?;
        let total = recs.len() as u64;
        let mut changed = 0;
        let mut clashes = Vec::new();
        for (i, rec) in recs.into_iter().enumerate() {
            let id = rec.id.clone();
            let u = self.open(rec).await?;
            if u.rec.username_hash != self.username_hash(&u.acct.username) {
                match self
                    .modify(&id, |u| {
                        u.rec.username_hash = self.username_hash(&u.acct.username);
                        Ok(())
                    })
                    .await
                {
                    Ok(_) => changed += 1,
                    // Another account has the name under the new hash:
                    // this one stays under its old hash (and keeps its
                    // generation alive) until an operator decides.
                    Err(AccountError::Store(StoreError::Duplicate)) => clashes.push(id),
                    // Deleted meanwhile: nothing to move.
                    Err(AccountError::NoSuchUser) => {}
                    Err(e) => return Err(e),
                }
            }
            progress(i as u64 + 1, total);
        }
        if !clashes.is_empty() {
            return Err(AccountError::Keys(format!(
                "users {} have the username of another account (the database was edited, or rows were restored): see docs/KEYS.md, \"Recovery\"; the other usernames were re-hashed",
                clashes.join(", ")
            )));
        }
        Ok(changed)
    }

    /// For each generation in `gens`, what the accounts still hold under
    /// it at `now`.
    pub async fn generation_uses(
        &self,
        gens: &[u32],
        now: i64,
    ) -> Result<BTreeMap<u32, GenerationUse>, AccountError> {
        let mut out: BTreeMap<u32, GenerationUse> = gens
            .iter()
            .map(|g| (*g, GenerationUse::default()))
            .collect();
        for rec in self.store.list_users().await? {
            let u = self.open(rec).await?;
            let msg = Self::username_msg(&u.acct.username);
            for (g, uses) in out.iter_mut() {
                let mut any = false;
                if self
                    .auth_keys
                    .sign_under(*g, &msg)
                    .is_some_and(|h| h.as_slice() == u.rec.username_hash.as_slice())
                {
                    uses.usernames += 1;
                    any = true;
                }
                if u.acct.recovery.iter().any(|h| generation_of(h) == Some(*g)) {
                    uses.recovery_code_sets += 1;
                    any = true;
                }
                if u.acct
                    .enrollment
                    .as_ref()
                    .is_some_and(|e| e.expires > now && generation_of(&e.hash) == Some(*g))
                {
                    uses.enrollment_links += 1;
                    any = true;
                }
                if any {
                    uses.users.push(u.rec.id.clone());
                }
            }
        }
        Ok(out)
    }
}
