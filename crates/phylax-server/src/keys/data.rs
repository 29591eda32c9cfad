//! Data-key rotation (`phylax keys rotate --data-keys`): every resource
//! version re-encrypted under a new generation of its compartment's data
//! key, in the background, while the servers keep serving.
//!
//! The steps (docs/KEYS.md, "The data keys"), each safe to repeat:
//! 1. generation N+1 is recorded (`data_keys_v1:N+1`) and announced:
//!    within a second every server seals new versions under it (keys
//!    `data:patient:{id}@N+1`, `data:tenant@N+1`, made on first use);
//!    every version names its generation, so reads open old and new alike;
//! 2. after the grace, every version sealed under an older generation is
//!    opened and sealed again, in pages, each row replaced only if it still
//!    holds the bytes that were read (an erasure meanwhile wins); the pass
//!    yields to the servers (after each page it rests three times as long
//!    as the page took), and is repeated until nothing older is left;
//! 3. `data_keys_done_v1:N+1` is recorded, and the older generations' keys
//!    are deleted (except the first `tenant` key, which also seals
//!    break-the-glass grants' details).
//!
//! The accounts and grants keys rotate with them: every account and live
//! grant is sealed again under the new generation before the old keys go.
//! The audit log's key does not (its records are append-only and chained):
//! a KEK rotation is what renews its protection.

use super::{now, KeyAdmin, KeysError};
use crate::data::key_events::{data_generation, DATA_KEYS};
use crate::data::keyring::is_resource_scope;
use phylax_audit::event::Action;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Meta key recording that every version is under generation N.
const DATA_KEYS_DONE: &str = "data_keys_done_v1:";

/// Versions re-encrypted per page (one read and one compare-and-swap
/// write each): short enough that a server's write waiting behind one
/// waits milliseconds.
const PAGE: u32 = 500;

/// How long the pass rests after each page, in multiples of the time the
/// page took: the servers get the database (and the cores) three quarters
/// of the time (docs/PERFORMANCE.md, "Data-key rotation under load":
/// reads and writes keep at least 70% of their rate).
const REST: u32 = 3;

/// The rate a data-key rotation keeps to unless told otherwise: none on
/// SQLite (where the rest after each page is enough); 600 versions a
/// second on PostgreSQL, where every re-encrypted version is an `UPDATE`
/// whose dead tuple, index entries and WAL the servers feel after the
/// page is done (docs/PERFORMANCE.md, "Data-key rotation under load": at
/// full speed reads fell to 64% and creates to 60% of the same load
/// without a rotation; at 600/s they kept 94–110%). A million versions
/// then take about half an hour; `--max-rate` changes it.
pub fn default_max_rate(backend: &str) -> Option<u32> {
    (backend == "postgres").then_some(600)
}

/// What a data-key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct DataKeysRotated {
    pub generation: u32,
    /// Versions re-encrypted.
    pub resealed: u64,
    /// Accounts re-encrypted.
    pub accounts: u64,
    /// Live grants looked at (each re-encrypted unless it already was).
    pub grants: u64,
    /// Older keys deleted.
    pub retired: u64,
}

/// The scope and generation a `data:` row holds, if it is a resource key.
fn resource_key(row: &str) -> Option<(&str, u32)> {
    let name = row.strip_prefix("data:")?;
    let (scope, generation) = match name.rsplit_once('@') {
        Some((s, g)) => (s, g.parse().ok()?),
        None => (name, 1),
    };
    (is_resource_scope(scope) || scope == "accounts" || scope == "grants")
        .then_some((scope, generation))
}

impl KeyAdmin<'_> {
    /// Rotate every resource data key (see the module documentation). A
    /// rotation stopped part-way is finished, not stacked on. `progress`
    /// hears (versions re-encrypted, versions to do).
    pub async fn rotate_data_keys(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<DataKeysRotated, KeysError> {
        let n = data_generation(self.store).await?;
        let done = |g: u32| format!("{DATA_KEYS_DONE}{g}");
        let next = if n > 1 && self.store.get_meta(&done(n)).await?.is_none() {
            n
        } else {
            let next = n + 1;
            self.audit(
                "key-rotate",
                Action::Update,
                format!(
                    "data-key generation {next} added; resource versions are re-encrypted under it"
                ),
            )
            .await?;
            self.store
                .put_meta_if_absent(&format!("{DATA_KEYS}{next}"), now().to_string().as_bytes())
                .await?;
            next
        };
        // Announced also when a stopped rotation is resumed: its first
        // announcement may never have been made.
        self.event("data-keys").await?;
        self.keys.set_data_generation(next);
        // Every server seals under the new generation once it has seen
        // the event; then nothing older is written again.
        tokio::time::sleep(self.grace).await;
        let repo = self.index_repo().await?;
        let total = self.store.count_sealed_versions(next).await?;
        let mut resealed = 0;
        loop {
            let pass = self
                .reseal_pass(&repo, next, &|k| {
                    progress(resealed + k, total.max(resealed + k))
                })
                .await?;
            resealed += pass;
            if pass == 0 {
                break;
            }
            tokio::time::sleep(self.grace).await;
        }
        let (accounts, grants) = self.reseal_accounts_and_grants().await?;
        // Before any old key goes: announce once more and give every node
        // its grace (a node that missed the first announcement seals
        // under the new generation from now on), then look again for
        // anything sealed under an older one meanwhile.
        self.event("data-keys").await?;
        tokio::time::sleep(self.grace).await;
        let late = self.reseal_pass(&repo, next, &|_| {}).await?;
        let (late_accounts, _) = self.reseal_accounts_and_grants().await?;
        resealed += late;
        let accounts = accounts + late_accounts;
        self.store.put_meta_if_absent(&done(next), b"1").await?;
        let retired = self.retire_data_keys(next).await?;
        self.event("data-keys").await?;
        self.audit(
            "key-rotate",
            Action::Update,
            format!("data-key generation {next}: {resealed} versions, {accounts} accounts and {grants} grants re-encrypted, {retired} older keys deleted"),
        )
        .await?;
        Ok(DataKeysRotated {
            generation: next,
            resealed,
            accounts,
            grants,
            retired,
        })
    }

    /// Seal every account and live grant again under the generation in
    /// force (this process's key ring is on it), until a pass leaves none
    /// behind. Returns (accounts, grants) moved.
    async fn reseal_accounts_and_grants(&self) -> Result<(u64, u64), KeysError> {
        let err = |e: String| KeysError::DataKeys(e);
        let auth = std::sync::Arc::new(
            crate::data::auth_keys::AuthKeys::load(self.store, self.kek)
                .await
                .map_err(|e| err(e.to_string()))?,
        );
        let accounts =
            crate::instance::accounts_for(self.config, self.store, self.keys, auth.clone())
                .map_err(|e| err(e.to_string()))?;
        let grants = crate::data::grants::Grants::new(self.store.clone(), self.keys.clone(), auth);
        let moved = accounts
            .reseal_all()
            .await
            .map_err(|e| err(e.to_string()))?;
        let before = self.store.live_grants(now()).await?.len() as u64;
        for _ in 0..5 {
            let left = grants
                .reseal_all(now())
                .await
                .map_err(|e| err(e.to_string()))?;
            // An account written meanwhile by a node still on the old
            // generation would be moved by the next pass too.
            let late = accounts
                .reseal_all()
                .await
                .map_err(|e| err(e.to_string()))?;
            if left == 0 && late == 0 {
                return Ok((moved, before));
            }
            tokio::time::sleep(self.grace.max(Duration::from_millis(200))).await;
        }
        Err(KeysError::NotConverged)
    }

    /// One pass over the versions still under an older generation.
    async fn reseal_pass(
        &self,
        repo: &crate::data::repo::Repo,
        next: u32,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, KeysError> {
        let mut after = 0;
        let mut resealed = 0;
        loop {
            let started = Instant::now();
            let page = self.store.sealed_versions(next, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            // The page's keys, old and new, in a round trip or two rather
            // than one per compartment.
            use crate::data::keyring::key_name;
            let new_keys: Vec<String> = page
                .iter()
                .map(|v| key_name(&v.key_scope, next).into_owned())
                .collect();
            self.keys
                .for_write_many(&new_keys)
                .await
                .map_err(|e| KeysError::DataKeys(e.to_string()))?;
            let old_keys: Vec<String> = page
                .iter()
                .map(|v| {
                    let g = phylax_crypto::datakey::record_generation(&v.sealed).unwrap_or(1);
                    key_name(&v.key_scope, g).into_owned()
                })
                .collect();
            self.keys
                .prefetch(old_keys.iter().map(String::as_str))
                .await
                .map_err(|e| KeysError::DataKeys(e.to_string()))?;
            let mut batch = Vec::with_capacity(page.len());
            for v in page {
                let sealed = repo.reseal(&v, next).await.map_err(|e| match e {
                    crate::data::repo::RepoError::Integrity { .. } => KeysError::Unreadable {
                        kind: "resource version".into(),
                        count: 1,
                    },
                    e => KeysError::DataKeys(e.to_string()),
                })?;
                batch.push((v.seq, v.sealed, sealed));
            }
            let n = batch.len() as u64;
            resealed += self.store.reseal_versions(batch).await?;
            progress(resealed);
            // Yield to the servers.
            tokio::time::sleep(rest_after(started.elapsed(), n, self.max_rate)).await;
        }
        Ok(resealed)
    }

    /// Delete the resource keys of generations before `next` (the first
    /// `tenant` key stays: it also seals break-the-glass grants).
    async fn retire_data_keys(&self, next: u32) -> Result<u64, KeysError> {
        // Every row is looked at: names sort by the database's collation,
        // which need not keep the `data:` rows together.
        let mut after = String::new();
        let mut doomed = Vec::new();
        loop {
            let page = self.store.list_wrapped_keys(&after, 5000).await?;
            let Some(last) = page.last() else { break };
            after = last.scope.clone();
            for r in &page {
                if let Some((scope, g)) = resource_key(&r.scope) {
                    if g < next && !(scope == "tenant" && g == 1) {
                        doomed.push(r.scope.clone());
                    }
                }
            }
        }
        let mut retired = 0;
        for chunk in doomed.chunks(PAGE as usize) {
            let started = Instant::now();
            retired += self.store.delete_wrapped_keys(chunk.to_vec()).await?;
            tokio::time::sleep((started.elapsed() * REST).min(Duration::from_secs(2))).await;
        }
        Ok(retired)
    }
}

/// How long to rest after a page of `n` versions that took `took`:
/// [`REST`] times as long (at most two seconds), or longer if the
/// operator's `--max-rate` asks for it.
fn rest_after(took: Duration, n: u64, max_rate: Option<u32>) -> Duration {
    let rest = (took * REST).min(Duration::from_secs(2));
    match max_rate {
        Some(rate) => {
            let budget = Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
            rest.max(budget.saturating_sub(took))
        }
        None => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_rotates_at_a_gentler_rate_by_default() {
        assert_eq!(default_max_rate("postgres"), Some(600));
        assert_eq!(default_max_rate("sqlite"), None);
    }

    #[test]
    fn the_rest_keeps_to_the_rate() {
        let ms = Duration::from_millis;
        assert_eq!(rest_after(ms(100), 500, None), ms(300));
        assert_eq!(rest_after(ms(1000), 500, None), ms(2000), "at most 2 s");
        // 500 versions at 1,000/s: half a second a page in all.
        assert_eq!(rest_after(ms(100), 500, Some(1000)), ms(400));
        // The rest after a page still applies when it is longer.
        assert_eq!(rest_after(ms(100), 500, Some(100_000)), ms(300));
    }

    #[test]
    fn resource_keys_by_name() {
        assert_eq!(resource_key("data:patient:p1"), Some(("patient:p1", 1)));
        assert_eq!(resource_key("data:patient:p1@3"), Some(("patient:p1", 3)));
        assert_eq!(resource_key("data:tenant@2"), Some(("tenant", 2)));
        assert_eq!(resource_key("data:audit"), None);
        assert_eq!(resource_key("data:accounts@2"), Some(("accounts", 2)));
        assert_eq!(resource_key("data:grants"), Some(("grants", 1)));
        assert_eq!(resource_key("data:cursor@2"), None);
        assert_eq!(resource_key("mac:token"), None);
        assert_eq!(resource_key("data:patient:p1@x"), None);
    }
}
