//! Enforcing patients' privacy consents.
//!
//! Every active `Consent` with scope `patient-privacy` is read into deny
//! rules (`phylax_auth::consent`), indexed by the actors they name. Each
//! request's [`phylax_auth::policy::Access`] then carries the patients whose
//! consent denies *this* requester for *this* purpose now, and the decision
//! hides their data everywhere (reads, searches, includes, `$everything`),
//! except under break-the-glass.
//!
//! The index is rebuilt when any `Consent` changes: at once after a write
//! through this node, and within [`POLL`] when another node writes (a
//! one-row history probe notices). A deployment with very many consents
//! pays one full re-read per change; see docs/ACCESS_CONTROL.md.

use crate::access::holds::Holds;
use crate::base::error::Failure;
use crate::data::repo::Repo;
use phylax_auth::consent::{delegations, deny_rules, DenyRule};
use phylax_fhir::ResourceType;
use phylax_store::{HistoryQuery, HistoryScope};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// How often other nodes' consent changes are looked for.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Index {
    rules: Vec<DenyRule>,
    by_actor: HashMap<String, Vec<usize>>,
    everyone: Vec<usize>,
    /// Delegations by delegate (`Patient/{id}`).
    delegates: HashMap<String, Vec<DenyRule>>,
    /// The newest Consent version seen when the index was read.
    mark: Option<i64>,
    /// The relationship holds' generation it was built with (a held
    /// consent's delegations are left out).
    holds: u64,
    loaded: bool,
}

/// How old the last successful look at the consents may be before
/// requests are refused: a policy that cannot be read is not applied from
/// memory indefinitely.
pub const MAX_STALE: Duration = Duration::from_secs(15);

/// The consent index (see the module doc).
#[derive(Default)]
pub struct Consents {
    index: parking_lot::RwLock<Arc<Index>>,
    reload: tokio::sync::Mutex<()>,
    /// When the consents were last read or confirmed unchanged.
    checked: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Consents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consents")
            .field("rules", &self.index.read().rules.len())
            .finish()
    }
}

fn consent_type() -> Result<ResourceType, Failure> {
    ResourceType::parse("Consent").ok_or_else(|| Failure::Internal("no Consent type".into()))
}

/// The newest Consent version's position (tombstones included).
async fn newest(repo: &Repo) -> Result<Option<i64>, Failure> {
    let v = repo
        .history(&HistoryQuery {
            scope: HistoryScope::Type("Consent".into()),
            since: None,
            before_seq: None,
            key_scopes: None,
            limit: 1,
        })
        .await?;
    Ok(v.first().map(|v| v.seq))
}

impl Consents {
    /// Reread every consent when one changed since the index was built.
    pub async fn refresh(&self, repo: &Repo, holds: &Holds) -> Result<(), Failure> {
        let _one = self.reload.lock().await;
        let mark = newest(repo).await?;
        let generation = holds.generation();
        let same = {
            let i = self.index.read();
            i.loaded && i.mark == mark && i.holds == generation
        };
        if same {
            *self.checked.lock() = Some(std::time::Instant::now());
            return Ok(());
        }
        let t = consent_type()?;
        let mut idx = Index {
            mark,
            holds: generation,
            loaded: true,
            ..Index::default()
        };
        let mut before = None;
        loop {
            let page = repo.list(&t, before, 1000).await?;
            for v in &page {
                if let Some(b) = &v.body {
                    idx.rules.extend(deny_rules(b.json()));
                    // A held consent still narrows; it opens nothing.
                    if holds.is_held(v) {
                        continue;
                    }
                    for d in delegations(b.json()) {
                        for a in &d.actors {
                            idx.delegates.entry(a.clone()).or_default().push(d.clone());
                        }
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == 1000 => before = Some(last.seq),
                _ => break,
            }
        }
        for (i, r) in idx.rules.iter().enumerate() {
            if r.actors.is_empty() {
                idx.everyone.push(i);
            }
            for a in &r.actors {
                idx.by_actor.entry(a.clone()).or_default().push(i);
            }
        }
        *self.index.write() = Arc::new(idx);
        *self.checked.lock() = Some(std::time::Instant::now());
        Ok(())
    }

    /// The index may be trusted: read or confirmed within [`MAX_STALE`].
    pub fn fresh(&self) -> bool {
        self.checked.lock().is_some_and(|t| t.elapsed() < MAX_STALE)
    }

    /// Patients whose consent denies a requester known by `refs`
    /// (`Type/id`: their Practitioner, roles, organizations; a patient's
    /// own `Patient/id`) for `purpose` at `now_ms`.
    pub fn denied(&self, refs: &[String], purpose: &str, now_ms: i64) -> BTreeSet<String> {
        let idx = self.index.read().clone();
        let mut out = BTreeSet::new();
        let candidates = idx.everyone.iter().chain(
            refs.iter()
                .flat_map(|r| idx.by_actor.get(r).into_iter().flatten()),
        );
        for &i in candidates {
            let r = &idx.rules[i];
            if r.denies(refs, purpose, now_ms) {
                out.insert(r.patient.clone());
            }
        }
        out
    }

    /// Patients who delegated access to their record to a person known by
    /// `refs` (`Patient/{id}`, and the `RelatedPerson/{id}`s that are the
    /// same person) through an active consent, for `purpose`, now.
    pub fn delegated(&self, refs: &[String], purpose: &str, now_ms: i64) -> BTreeSet<String> {
        let idx = self.index.read().clone();
        refs.iter()
            .flat_map(|me| idx.delegates.get(me).into_iter().flatten())
            .filter(|r| r.applies(refs, purpose, now_ms))
            .map(|r| r.patient.clone())
            .collect()
    }
}
