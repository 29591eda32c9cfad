//! Sign-in key rotation and retirement (docs/KEYS.md, "The sign-in key").
//!
//! A rotation adds a generation that every node hashes new grants,
//! recovery codes, enrollment links and CSRF tags under within a second,
//! records until when grants hashed under the older generations can be
//! alive, re-hashes every username, then retires what nothing depends on.
//! A generation that recovery codes, unexpired enrollment links or live
//! grants still depend on is kept (lookups keep trying it) and retired by
//! a later `phylax keys retire`.

use super::{now, KeyAdmin, KeysError};
use crate::data::auth_keys::{self, AuthKeys, GRANTS_UNTIL, KIND};
use crate::data::key_events::{newest_generation, record_generation, KEY_GENERATION};
use phylax_audit::event::Action;
use serde::Serialize;
use std::sync::Arc;

/// Meta key recording that every username was moved to generation N
/// (`sign_in_done_v1:N`): until then a rotation finishes N instead of
/// adding another.
const DONE: &str = "sign_in_done_v1:";

/// What a sign-in key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct SignInRotated {
    pub generation: u32,
    /// Usernames re-hashed under the new generation.
    pub usernames_rehashed: u64,
    pub retire: SignInRetired,
}

/// What a retirement pass did and what it kept.
#[derive(Debug, Clone, Serialize)]
pub struct SignInRetired {
    /// Generations deleted (nothing hashed under them is accepted now).
    pub retired: Vec<u32>,
    /// Older generations kept, and why.
    pub kept: Vec<KeptGeneration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeptGeneration {
    pub generation: u32,
    /// Grants hashed under it may be used until then (seconds).
    pub grants_until: Option<i64>,
    #[serde(flatten)]
    pub accounts: crate::data::accounts::GenerationUse,
}

impl KeyAdmin<'_> {
    fn sign_in_accounts(
        &self,
        auth: Arc<AuthKeys>,
    ) -> Result<crate::data::accounts::Accounts, KeysError> {
        crate::instance::accounts_for(self.config, self.store, self.keys, auth)
            .map_err(|e| KeysError::SignIn(e.to_string()))
    }

    async fn load_sign_in(&self) -> Result<Arc<AuthKeys>, KeysError> {
        AuthKeys::load(self.store, self.kek)
            .await
            .map(Arc::new)
            .map_err(|e| KeysError::SignIn(e.to_string()))
    }

    /// A new sign-in key generation: every node hashes new grants and
    /// codes under it within a second (and keeps accepting older ones);
    /// usernames are re-hashed under it (`progress(done, total)`); then
    /// the older generations nothing depends on are deleted.
    pub async fn rotate_sign_in(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<SignInRotated, KeysError> {
        let n = newest_generation(self.store, KIND, auth_keys::row).await?;
        // A key stored by a rotation that stopped before recording it is
        // finished, not stacked on.
        let recorded = n == 1
            || self
                .store
                .get_meta(&format!("{KEY_GENERATION}{KIND}:{n}"))
                .await?
                .is_some();
        // A generation whose usernames were never all moved (a rotation
        // that stopped on an account it could not move) is finished too.
        let done = n == 1 || self.store.get_meta(&format!("{DONE}{n}")).await?.is_some();
        let next = if recorded && done { n + 1 } else { n };
        self.audit(
            "key-rotate",
            Action::Update,
            format!("sign-in key generation {next} added"),
        )
        .await?;
        // The key first, then its record: a rotation stopped in between
        // leaves a key nobody uses yet, never a record without its key
        // (which would stop every node from starting).
        let (_, wrapped) =
            phylax_crypto::MacKey::generate_wrapped(self.kek, &auth_keys::purpose(next))?;
        self.store
            .put_wrapped_key_if_absent(&auth_keys::row(next), &wrapped, now())
            .await?;
        record_generation(self.store, KIND, next).await?;
        self.event(KIND).await?;
        // Every node hashes under the new generation before the grants
        // made under the older ones are counted.
        tokio::time::sleep(self.grace).await;
        self.record_grants_until(next).await?;
        let auth = self.load_sign_in().await?;
        let usernames_rehashed = self
            .sign_in_accounts(auth)?
            .rehash_usernames(progress)
            .await
            .map_err(|e| KeysError::SignIn(e.to_string()))?;
        self.store
            .put_meta_if_absent(&format!("{DONE}{next}"), now().to_string().as_bytes())
            .await?;
        let retire = self.retire_sign_in().await?;
        self.audit(
            "key-rotate",
            Action::Update,
            format!(
                "sign-in key generation {next} in force; {usernames_rehashed} usernames re-hashed; generations {:?} retired, {:?} kept",
                retire.retired,
                retire.kept.iter().map(|k| k.generation).collect::<Vec<_>>()
            ),
        )
        .await?;
        Ok(SignInRotated {
            generation: next,
            usernames_rehashed,
            retire,
        })
    }

    /// Record when the grants hashed before generation `g` expire, once:
    /// the latest expiry of any grant now.
    async fn record_grants_until(&self, g: u32) -> Result<i64, KeysError> {
        let t = now();
        let until = self.store.max_grant_expiry(t).await?.unwrap_or(t).max(t);
        let v = self
            .store
            .put_meta_if_absent(&format!("{GRANTS_UNTIL}{g}"), until.to_string().as_bytes())
            .await?;
        Ok(std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(until))
    }

    /// Until when grants made under the generation before `g` may be
    /// used: recorded by the rotation to `g`, or now recorded if that
    /// rotation stopped before (and the nodes have had their grace).
    async fn grants_until(&self, g: u32) -> Result<Option<i64>, KeysError> {
        if let Some(v) = self.store.get_meta(&format!("{GRANTS_UNTIL}{g}")).await? {
            return Ok(std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()));
        }
        let added = self
            .store
            .get_meta(&format!("{KEY_GENERATION}{KIND}:{g}"))
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
        match added {
            Some(a) if now() >= a + self.grace.as_secs() as i64 => {
                Ok(Some(self.record_grants_until(g).await?))
            }
            _ => Ok(None),
        }
    }

    /// Delete every sign-in key generation older than the newest that
    /// nothing depends on any more: no live grant can be hashed under it,
    /// no username, unused recovery code or unexpired enrollment link is.
    /// Usernames left under an older generation (a rotation that stopped
    /// early) are re-hashed first.
    pub async fn retire_sign_in(&self) -> Result<SignInRetired, KeysError> {
        let auth = self.load_sign_in().await?;
        let (current, _) = auth.current();
        let older: Vec<u32> = auth
            .generations()
            .into_iter()
            .filter(|g| *g < current)
            .collect();
        let mut out = SignInRetired {
            retired: Vec::new(),
            kept: Vec::new(),
        };
        if older.is_empty() {
            return Ok(out);
        }
        // Every node knows the newest generation before names move to it
        // (a rotation that stopped before its announcement is announced
        // now).
        self.event(KIND).await?;
        tokio::time::sleep(self.grace).await;
        let accounts = self.sign_in_accounts(auth.clone())?;
        accounts
            .rehash_usernames(&|_, _| {})
            .await
            .map_err(|e| KeysError::SignIn(e.to_string()))?;
        let t = now();
        let uses = accounts
            .generation_uses(&older, t)
            .await
            .map_err(|e| KeysError::SignIn(e.to_string()))?;
        for g in older {
            let grants_until = self.grants_until(g + 1).await?;
            let a = uses.get(&g).cloned().unwrap_or_default();
            let grants_live = grants_until.is_none_or(|u| u > t);
            if grants_live || !a.is_empty() {
                out.kept.push(KeptGeneration {
                    generation: g,
                    grants_until,
                    accounts: a,
                });
                continue;
            }
            self.audit(
                "key-retire",
                Action::Delete,
                format!("sign-in key generation {g} retired (nothing depends on it)"),
            )
            .await?;
            self.store
                .put_meta_if_absent(
                    &format!("{}{g}", auth_keys::RETIRED),
                    now().to_string().as_bytes(),
                )
                .await?;
            if self.store.delete_wrapped_key(&auth_keys::row(g)).await? {
                out.retired.push(g);
            }
        }
        if !out.retired.is_empty() {
            self.event(KIND).await?;
        }
        Ok(out)
    }
}
