//! [`Gate`]: the access layer's state, assembled once at start. It owns
//! the resource repository: the layers above reach resources only through
//! [`crate::access::scoped::Scoped`] (one caller's reads and writes,
//! confined and checked by construction), never the repository itself.

use crate::access::consent::Consents;
use crate::access::holds::Holds;
use crate::audit::log::AuditLog;
use crate::base::config::AccessConfig;
use crate::base::error::Failure;
use crate::data::accounts::Accounts;
use crate::data::keyring::KeyRing;
use crate::data::repo::Repo;
use phylax_crypto::BlindIndexKey;
use phylax_store::{BreakGlassStore, DynStore, MetaStore};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// What access decisions read, and the repository they guard.
#[derive(Debug)]
pub struct Gate {
    /// Private to the access layer (see the module doc).
    pub(in crate::access) repo: Repo,
    /// The break-the-glass grants (the access layer owns that table).
    pub(in crate::access) grants: Arc<dyn BreakGlassStore>,
    /// Instance metadata (which maintenance jobs ran).
    pub(in crate::access) meta: Arc<dyn MetaStore>,
    pub(in crate::access) keys: Arc<KeyRing>,
    /// Users, for how a requester is known in the data (their linked
    /// Practitioner or Patient).
    pub(in crate::access) accounts: Accounts,
    pub(in crate::access) audit: Arc<AuditLog>,
    pub(in crate::access) config: AccessConfig,
    /// Care relationships per user, briefly reused (see `reach`).
    pub care_cache: CareCache,
    /// Relationship versions from before the relationships permission,
    /// held until an operator approves them (see `holds`).
    pub(in crate::access) holds: Holds,
    /// Patients' privacy consents as deny rules (see `consent`).
    pub(in crate::access) consents: Consents,
    /// The `_security` index hashes of `access.restricted_labels`
    /// (computed once: every search by a caller without the label
    /// permission carries them).
    /// Index entries of the restricted labels, for the blind-index key
    /// generation they were computed under.
    pub(in crate::access) label_hashes: parking_lot::RwLock<Option<(u64, Vec<Vec<u8>>)>>,
}

impl Gate {
    pub fn new(
        repo: Repo,
        store: DynStore,
        keys: Arc<KeyRing>,
        accounts: Accounts,
        audit: Arc<AuditLog>,
        config: AccessConfig,
    ) -> Gate {
        Gate {
            repo,
            grants: store.clone(),
            meta: store,
            keys,
            accounts,
            audit,
            config,
            care_cache: CareCache::default(),
            holds: Holds::default(),
            consents: Consents::default(),
            label_hashes: Default::default(),
        }
    }

    /// Apply operators' approvals of held relationship data written since
    /// the last look. On failure the holds stay as they are (fail closed).
    pub async fn reload_holds(&self) {
        let before = self.holds.generation();
        if let Err(e) = self.holds.reload(&*self.meta).await {
            tracing::error!(error = %e, "could not read the relationship holds; keeping those in force");
        } else if self.holds.generation() != before {
            self.care_cache.clear();
        }
    }

    /// The held relationship versions, `Type/id/version` (`phylax access
    /// held`).
    pub fn held_relationships(&self) -> Vec<String> {
        self.holds.list()
    }

    /// The held versions an approval would release (`Type/id/version`),
    /// after rereading the approvals; each resource named must have one.
    pub async fn releases(
        &self,
        a: &crate::access::holds::Approval,
    ) -> Result<Vec<String>, crate::access::holds::HoldError> {
        self.reload_holds().await;
        use crate::access::holds::resource_of;
        let held = self.holds.list();
        match a {
            crate::access::holds::Approval::All => Ok(held),
            crate::access::holds::Approval::Resources(rs) => {
                let not_held: Vec<&str> = rs
                    .iter()
                    .filter(|r| !held.iter().any(|k| resource_of(k) == r.as_str()))
                    .map(String::as_str)
                    .collect();
                if !not_held.is_empty() {
                    return Err(crate::access::holds::HoldError::NotHeld(
                        not_held.join(", "),
                    ));
                }
                Ok(held
                    .into_iter()
                    .filter(|k| rs.iter().any(|r| r == resource_of(k)))
                    .collect())
            }
        }
    }

    /// Release held relationship versions (`phylax access approve`): all
    /// of them, or those of the resources named (`Type/id`, each must have
    /// a held version). Returns how many versions were released. The
    /// caller records the approval in the audit log first.
    pub async fn approve_relationships(
        &self,
        a: crate::access::holds::Approval,
    ) -> Result<usize, crate::access::holds::HoldError> {
        let released = self.releases(&a).await?.len();
        crate::access::holds::approve(&*self.meta, &a).await?;
        self.reload_holds().await;
        Ok(released)
    }

    /// Reread the consents now (a Consent was written on this node).
    pub async fn refresh_consents(&self) -> Result<(), Failure> {
        self.consents.refresh(&self.repo, &self.holds).await
    }

    /// Watch for other nodes' consent changes and operators' approvals of
    /// held relationship data until the gate is dropped.
    pub fn spawn_consent_poller(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::access::consent::POLL).await;
                let Some(g) = weak.upgrade() else { return };
                g.reload_holds().await;
                if let Err(e) = g.refresh_consents().await {
                    tracing::warn!(error = ?e, "could not refresh the consent index");
                }
            }
        });
    }

    /// Patients carrying one of `tags` (`system|code`) in `meta.tag` or
    /// `meta.security` (the detector's flagged, VIP, patients); `None`
    /// when no tag is configured.
    pub async fn flagged_patients(
        &self,
        tags: &[String],
    ) -> Result<Option<std::collections::HashSet<String>>, Failure> {
        let key = self.repo.blind_key();
        let mut group = Vec::new();
        for t in tags {
            if let Some((sys, code)) = t.split_once('|') {
                for param in ["_tag", "_security"] {
                    group.push(phylax_store::Cond::Hash {
                        param: param.into(),
                        hashes: crate::data::search::token_hash(&key, param, sys, code),
                    });
                }
            }
        }
        if group.is_empty() {
            return Ok(None);
        }
        let rows = self
            .repo
            .search_unconfined(&phylax_store::SearchQuery {
                rtype: "Patient".into(),
                and: vec![group],
                before_seq: None,
                limit: 100_000,
            })
            .await?;
        Ok(Some(rows.iter().map(|v| v.id.to_string()).collect()))
    }

    /// The key of the search index's blind hashes (search parameters are
    /// turned into conditions with it; it opens nothing).
    pub fn blind_key(&self) -> Arc<BlindIndexKey> {
        self.repo.blind_key()
    }

    /// Index and search under `key` from now on (a search index key
    /// rotation, docs/KEYS.md); cached index entries are recomputed.
    pub fn set_search_key(&self, key: BlindIndexKey) {
        self.repo.set_blind_key(key);
    }
}

/// One user's cached facts.
#[derive(Clone, Default)]
pub(in crate::access) struct Cached {
    /// How the user is known in the data (`Type/id`), if looked up.
    pub(in crate::access) refs: Option<Arc<Vec<String>>>,
    /// Their own family names (normalised), from their Practitioner.
    pub(in crate::access) family: Option<Arc<Vec<String>>>,
    /// Care-relationship patients (`None`: over `max_reach`), if computed.
    pub(in crate::access) care: Option<Option<Arc<BTreeSet<String>>>>,
    /// Break-the-glass patients with their grants' expiry (ms), if looked up.
    pub(in crate::access) emergency: Option<Vec<(String, i64)>>,
}

/// Per-user cache of care relationships and break-the-glass grants.
#[derive(Default)]
pub struct CareCache {
    pub(in crate::access) map: parking_lot::Mutex<HashMap<String, (Instant, Cached)>>,
}

impl std::fmt::Debug for CareCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CareCache").finish_non_exhaustive()
    }
}

impl CareCache {
    /// Forget a user's entry (their link or grants changed here).
    pub fn forget(&self, user_id: &str) {
        self.map.lock().remove(user_id);
    }

    /// Forget everyone's (a write changed who cares for whom).
    pub fn clear(&self) {
        self.map.lock().clear();
    }
}
