//! Search index key rotation (`phylax keys rotate --index`, and every
//! erasure): the blind index is rebuilt under a new key while searches
//! keep working, then the old key is deleted.
//!
//! The steps (docs/KEYS.md, "Rotating"), each safe to repeat:
//! 1. a new generation `mac:blind-index@N` is stored and announced: every
//!    node writes index entries under it and searches under it and the one
//!    before, so a resource is found whether it is re-indexed yet or not;
//! 2. once every node has seen it (the grace), every current resource is
//!    indexed again under it; then once more those written since the pass
//!    began (a node slower than the grace may have used the old key);
//! 3. `index_key_done_v1:N` is recorded and announced: nodes search under
//!    the new key alone; after the grace the older generations are
//!    deleted (the first one only when the audit log has its own key).
//!
//! Why it matters for erasure: the index entries of a copy of the database
//! made before the rotation are keyed with a key that no longer exists, so
//! holding today's keys does not let anyone test that copy's entries for
//! an erased patient's values.

use super::{now, KeyAdmin, KeysError};
use crate::data::repo::Repo;
use crate::instance::{index_generation, index_key_row, AUDIT_PATIENT_KEY, INDEX_KEY_DONE};
use phylax_audit::event::Action;
use phylax_crypto::blind::BlindIndexKey;
use phylax_store::{HistoryQuery, HistoryScope, SearchQuery};
use serde::Serialize;

/// What an index key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct IndexRotated {
    /// The new key's row.
    pub key: String,
    /// Resources indexed again under it.
    pub reindexed: u64,
    /// Older keys' rows deleted.
    pub retired: Vec<String>,
}

fn boxed(e: crate::instance::InstanceError) -> KeysError {
    KeysError::Instance(Box::new(e))
}

impl KeyAdmin<'_> {
    /// A repository that indexes under the search index key in force.
    pub(super) async fn index_repo(&self) -> Result<Repo, KeysError> {
        let key = crate::instance::search_key(self.store, self.kek)
            .await
            .map_err(boxed)?;
        Ok(Repo::new(
            self.store.clone(),
            self.keys.clone(),
            key,
            self.config.fhir_base(),
        )
        .with_aliases(&self.config.http.base_aliases))
    }

    /// How many current resources there are (the rebuild's length).
    async fn current_resources(&self) -> Result<u64, KeysError> {
        let mut n = 0;
        for t in phylax_fhir::defs::definitions().resource_types() {
            n += self
                .store
                .search_count(&SearchQuery {
                    rtype: t.to_owned(),
                    and: Vec::new(),
                    before_seq: None,
                    limit: 1,
                })
                .await?;
        }
        Ok(n)
    }

    /// The newest version's write order number (0: none).
    async fn newest_seq(&self) -> Result<i64, KeysError> {
        Ok(self
            .store
            .history(&HistoryQuery {
                scope: HistoryScope::System,
                since: None,
                before_seq: None,
                key_scopes: None,
                limit: 1,
            })
            .await?
            .first()
            .map_or(0, |v| v.seq))
    }

    /// Rotate the search index key (see the module documentation).
    /// A rotation stopped half-way is finished, not stacked on: searches
    /// look one generation back only. `progress` hears (done, total).
    pub async fn rotate_index(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<IndexRotated, KeysError> {
        let n = index_generation(self.store).await?;
        let done = |g: u32| format!("{INDEX_KEY_DONE}{g}");
        let next = if n > 1 && self.store.get_meta(&done(n)).await?.is_none() {
            n
        } else {
            let next = n + 1;
            self.audit(
                "key-rotate",
                Action::Update,
                format!(
                    "search index key {} added; the index is rebuilt under it",
                    index_key_row(next)
                ),
            )
            .await?;
            crate::data::key_events::record_generation(self.store, "index", next).await?;
            let (_, w) = BlindIndexKey::generate_wrapped_gen(self.kek, next)?;
            self.store
                .put_wrapped_key_if_absent(&index_key_row(next), &w, now())
                .await?;
            self.event("index").await?;
            next
        };
        // Every node writes under the new key once it has seen the event.
        tokio::time::sleep(self.grace).await;
        let repo = self.index_repo().await?;
        let total = self.current_resources().await?;
        let start = self.newest_seq().await?;
        let idx = |e: crate::data::repo::RepoError| KeysError::Index(e.to_string());
        let reindexed = repo
            .rebuild_index(None, &|k| progress(k, total.max(k)))
            .await
            .map_err(idx)?;
        tokio::time::sleep(self.grace).await;
        repo.rebuild_index(Some(start + 1), &|_| {})
            .await
            .map_err(idx)?;
        self.store.put_meta_if_absent(&done(next), b"1").await?;
        self.event("index").await?;
        // Nodes stop searching under the old key before it goes.
        tokio::time::sleep(self.grace).await;
        // An instance made before the audit log had its own patient index
        // key keeps using the first generation there: it stays.
        let audit_uses_first = self
            .store
            .get_wrapped_key(AUDIT_PATIENT_KEY)
            .await?
            .is_none();
        let mut retired = Vec::new();
        for old in 1..next {
            if old == 1 && audit_uses_first {
                continue;
            }
            if self.store.delete_wrapped_key(&index_key_row(old)).await? {
                retired.push(index_key_row(old));
            }
        }
        self.audit(
            "key-rotate",
            Action::Update,
            format!(
                "search index rebuilt under {}: {reindexed} resources; retired {retired:?}",
                index_key_row(next)
            ),
        )
        .await?;
        Ok(IndexRotated {
            key: index_key_row(next),
            reindexed,
            retired,
        })
    }
}
