//! [`Scoped`]: the repository as one caller may see and change it. Every
//! read, search and write a handler makes goes through it: reads and
//! searches are confined by construction, and every write carries the
//! caller's [`WriteAuditor`] (the checks and the audit record).

use crate::access::ctx::RequestCtx;
use crate::access::gate::Gate;
use crate::access::reach::{allows, check, query_conditions, returned};
use crate::access::write::WriteAuditor;
use crate::base::error::Failure;
use crate::data::repo::{PlannedWrite, RepoError, ResourceVersion, WriteGuard};
use phylax_auth::policy::{Decision, Reach};
use phylax_fhir::{ResourceId, ResourceType, VersionId};
use phylax_store::{HistoryQuery, HistoryScope, Precondition, SearchQuery, StoredVersion};
use serde_json::Value;

/// A request's reads, searches and writes, confined to what its caller may
/// see and change by construction. Reads, vreads and includes apply the decision to what
/// they open; every search query gets the caller's conditions
/// ([`query_conditions`]) added here, not by each handler, and every
/// resource it returns is checked again after decryption against the
/// decision ([`returned`]). Search index entries are not authenticated
/// (whoever can write the database can move a hash); the stored resource
/// is. A mismatch is refused (no data leaves) and raises an
/// `index-tamper` alert.
#[derive(Clone, Copy)]
pub struct Scoped<'a> {
    st: &'a Gate,
    ctx: &'a RequestCtx,
    /// Made inside [`decided`] work: only then does it reach the
    /// repository.
    decided: bool,
}

tokio::task_local! {
    /// Set while the interaction pipeline runs work the policy allowed.
    static DECIDED: ();
}

/// Run `work` as work the policy allowed: a [`Scoped`] made inside it
/// reaches the repository; one made anywhere else refuses every access
/// (403, rule `undecided`), so a handler that skips the interaction
/// pipeline (its type-level decision, masking and audit record) fails
/// closed at its first test. Only `rest::pipeline::run` calls this
/// (`scripts/module-graph` refuses the name elsewhere above this layer).
pub async fn decided<F: std::future::Future>(work: F) -> F::Output {
    DECIDED.scope((), work).await
}

impl std::fmt::Debug for Scoped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scoped").finish_non_exhaustive()
    }
}

impl<'a> Scoped<'a> {
    pub fn new(st: &'a Gate, ctx: &'a RequestCtx) -> Scoped<'a> {
        let decided = DECIDED.try_with(|_| ()).is_ok();
        Scoped { st, ctx, decided }
    }

    /// The repository, for decided work only.
    fn repo(&self) -> Result<&'a crate::data::repo::Repo, RepoError> {
        if self.decided {
            Ok(&self.st.repo)
        } else {
            tracing::error!(
                request_id = %self.ctx.request_id(),
                "resource access outside the interaction pipeline refused"
            );
            Err(RepoError::Denied {
                hidden: false,
                rule: "undecided",
            })
        }
    }

    /// The caller's write guard: every write below passes it to the
    /// repository.
    fn guard(&self) -> WriteAuditor<'a> {
        WriteAuditor::new(self.st, self.ctx)
    }

    fn confine(&self, q: &mut SearchQuery) -> Result<(), Failure> {
        let t = ResourceType::parse(&q.rtype).ok_or(Failure::UnknownType)?;
        q.and
            .extend(query_conditions(self.st, &self.ctx.access, &t));
        Ok(())
    }

    /// The current version of `Type/id`, if the caller may see it: a
    /// hidden one answers exactly like one that does not exist (404), and
    /// so does a deleted one for a caller limited to some patients.
    pub async fn read(
        &self,
        rtype: &ResourceType,
        id: &phylax_fhir::ResourceId,
    ) -> Result<ResourceVersion, Failure> {
        let v = self.gone_hidden(self.repo()?.read(rtype, id).await)?;
        check(self.st, &self.ctx.access, &v)?;
        Ok(v)
    }

    /// One version of `Type/id`, under the same rules as [`Scoped::read`].
    pub async fn vread(
        &self,
        rtype: &ResourceType,
        id: &phylax_fhir::ResourceId,
        version: phylax_fhir::VersionId,
    ) -> Result<ResourceVersion, Failure> {
        let v = self.gone_hidden(self.repo()?.vread(rtype, id, version).await)?;
        check(self.st, &self.ctx.access, &v)?;
        Ok(v)
    }

    /// `Type/id` if it exists, is live and the caller may see it; `None`
    /// otherwise, whichever the reason (includes leave such resources out
    /// silently).
    pub async fn visible(
        &self,
        rtype: &ResourceType,
        id: &phylax_fhir::ResourceId,
    ) -> Result<Option<ResourceVersion>, Failure> {
        match self.repo()?.read(rtype, id).await {
            Ok(v) if allows(self.st, &self.ctx.access, &v) == Decision::Allow => Ok(Some(v)),
            Ok(_) | Err(RepoError::NotFound | RepoError::Gone(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn gone_hidden(
        &self,
        r: Result<ResourceVersion, RepoError>,
    ) -> Result<ResourceVersion, Failure> {
        match r {
            Err(RepoError::Gone(_)) if self.ctx.access.reach != Reach::All => Err(Failure::Hidden(
                "reach: a deleted resource names no patient",
            )),
            r => Ok(r?),
        }
    }

    /// The patient whose compartment an operation lists (`$everything`)
    /// must exist, be live and be within the caller's reach; else it
    /// answers like an unknown id. A restricted label on the Patient hides
    /// the demographics only: the compartment stays reachable when the
    /// patient is.
    pub async fn compartment_anchor(
        &self,
        patient_type: &ResourceType,
        pid: &ResourceId,
    ) -> Result<(), Failure> {
        // The patient must exist, be live and be within the caller's
        // reach (else: not found, like an unknown id).
        let p = match self.repo()?.read(patient_type, pid).await {
            Err(crate::data::repo::RepoError::Gone(_))
                if self.ctx.access.reach != phylax_auth::policy::Reach::All =>
            {
                return Err(Failure::Hidden(
                    "reach: a deleted resource names no patient",
                ))
            }
            r => r?,
        };
        if let Decision::Deny(rule) = allows(self.st, &self.ctx.access, &p) {
            // A restricted label on the Patient hides the demographics
            // only; the compartment stays reachable when the patient is.
            if !self.ctx.access.reaches(pid.as_str())
                || self.ctx.access.denied.contains(pid.as_str())
            {
                return Err(Failure::Hidden(rule));
            }
        }
        Ok(())
    }

    /// Every match (up to `q.limit`), confined and checked.
    pub async fn search(&self, mut q: SearchQuery) -> Result<Vec<ResourceVersion>, Failure> {
        self.confine(&mut q)?;
        let rows = self.repo()?.search_unconfined(&q).await?;
        self.verify(rows)
    }

    /// One page (at most `keep`) and whether there are more, confined and
    /// checked.
    pub async fn search_page(
        &self,
        mut q: SearchQuery,
        keep: usize,
    ) -> Result<(Vec<ResourceVersion>, bool), Failure> {
        self.confine(&mut q)?;
        let (rows, more) = self.repo()?.search_page_unconfined(&q, keep).await?;
        Ok((self.verify(rows)?, more))
    }

    /// How many resources match, confined (counts only what the caller
    /// may see; nothing is opened).
    pub async fn count(&self, mut q: SearchQuery) -> Result<u64, Failure> {
        self.confine(&mut q)?;
        q.before_seq = None;
        Ok(self.repo()?.count_unconfined(&q).await?)
    }

    /// Every returned row checked against the decision after decryption.
    /// A held Patient matched through the compartment its held `link`
    /// names is left out (its index entries are right; the hold is what
    /// keeps it out); any other mismatch is tampering.
    fn verify(&self, mut rows: Vec<ResourceVersion>) -> Result<Vec<ResourceVersion>, Failure> {
        rows.retain(|v| {
            !(self.st.holds.is_held(v)
                && matches!(returned(self.st, &self.ctx.access, v), Decision::Deny(_)))
        });
        for v in &rows {
            if let Decision::Deny(rule) = returned(self.st, &self.ctx.access, v) {
                let what = format!("{}/{}", v.rtype, v.id);
                tracing::error!(
                    event = "integrity.index",
                    request_id = %self.ctx.request_id,
                    resource = %what,
                    rule,
                    "a search matched a resource outside the caller's access: index entries may have been altered; nothing was served"
                );
                if let Some(d) = self.st.audit.detector() {
                    d.raise_once(
                        crate::audit::alert::Alert {
                            rule: "index-tamper",
                            severity: "high",
                            detail: format!(
                                "a search by {} matched {what}, which the stored resource puts outside their access: search index entries may have been altered",
                                self.ctx.principal.id()
                            ),
                            user: None,
                        },
                        format!("index-tamper|{what}"),
                    );
                }
                return Err(Failure::Integrity(format!(
                    "search index entry for {what} does not match the stored resource"
                )));
            }
        }
        Ok(rows)
    }

    /// One page of history, newest first: at most `count` versions, of
    /// which those the caller may see are returned. A caller limited to
    /// some patients pages through their versions only (the database
    /// filters by key scope, [`crate::access::reach::history_scopes`]), so
    /// a page reveals nothing of other patients' writes and nothing of
    /// theirs is decrypted; every version is checked again once opened.
    pub async fn history_page(
        &self,
        scope: HistoryScope,
        since: Option<i64>,
        before_seq: Option<i64>,
        count: u32,
    ) -> Result<HistoryPage, Failure> {
        let key_scopes = crate::access::reach::history_scopes(&self.ctx.access, &scope);
        let rows = self
            .repo()?
            .history(&HistoryQuery {
                scope,
                since,
                before_seq,
                key_scopes,
                limit: count + 1,
            })
            .await?;
        let more = rows.len() > count as usize;
        let mut rows = rows;
        rows.truncate(count as usize);
        // The cursor follows the page before the per-version check (labels,
        // consents, later patients of a version), so paging stays stable.
        let last_seq = rows.last().map(|v| v.seq);
        let versions = rows
            .into_iter()
            .filter(|v| allows(self.st, &self.ctx.access, v) == Decision::Allow)
            .collect();
        Ok(HistoryPage {
            versions,
            last_seq,
            more,
        })
    }

    /// Whether the caller is limited to some patients (a write to an id
    /// they cannot see answers like one that does not exist).
    pub fn limited(&self) -> bool {
        self.guard().limited()
    }

    /// Create with a server-assigned id, checked and audited.
    pub async fn create(
        &self,
        rtype: &ResourceType,
        body: Value,
    ) -> Result<(ResourceVersion, AuditCommitted), RepoError> {
        let v = self
            .repo()?
            .create(rtype, body, Some(&self.guard()))
            .await?;
        self.written([rtype]).await;
        Ok((v, AuditCommitted(())))
    }

    /// Update (or create with the client's id when `allow_create`),
    /// checked and audited. Returns the new version and whether it was
    /// created.
    pub async fn update(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        body: Value,
        if_match: Option<VersionId>,
        allow_create: bool,
    ) -> Result<(ResourceVersion, bool, AuditCommitted), RepoError> {
        let (v, created) = self
            .repo()?
            .update(rtype, id, body, if_match, allow_create, Some(&self.guard()))
            .await?;
        self.written([rtype]).await;
        Ok((v, created, AuditCommitted(())))
    }

    /// Delete, checked and audited; `Ok(None)` when already deleted.
    pub async fn delete(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
    ) -> Result<Option<(ResourceVersion, AuditCommitted)>, RepoError> {
        let r = self.repo()?.delete(rtype, id, Some(&self.guard())).await?;
        if r.is_some() {
            self.written([rtype]).await;
        }
        Ok(r.map(|v| (v, AuditCommitted(()))))
    }

    /// Whether `Type/id` has ever been written (a tombstone counts): what
    /// a 404 for an unknown id tells anyway. Nothing else of the row.
    pub async fn exists(&self, rtype: &ResourceType, id: &ResourceId) -> Result<bool, RepoError> {
        Ok(self.repo()?.current_row(rtype, id).await?.is_some())
    }

    /// Whether a live resource holds `Type/id`, for a conditional update
    /// that would otherwise create it there. A writer limited to some
    /// patients learns nothing of ids it cannot see: those answer as
    /// hidden (404) before a conflict is told.
    pub async fn occupied(&self, rtype: &ResourceType, id: &ResourceId) -> Result<bool, RepoError> {
        let row = self.repo()?.current_row(rtype, id).await?;
        if self.limited() {
            self.repo()?
                .guard_existing(Some(&self.guard()), rtype, row.as_ref())
                .await?;
        }
        Ok(row.is_some_and(|r| !r.deleted))
    }

    /// The current state of `Type/id` as a write will replace it, checked:
    /// the version replaced must be within the caller's reach (a limited
    /// writer gets the same 404 for an id that does not exist, a deleted
    /// resource it could not see, and a hidden one).
    pub async fn current(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
    ) -> Result<Current, RepoError> {
        let row = self.repo()?.current_row(rtype, id).await?;
        self.checked(rtype, id, row).await
    }

    /// [`Scoped::current`] for an id that may never have been written:
    /// `None` then, without the checks (a delete of nothing).
    pub async fn existing(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
    ) -> Result<Option<Current>, RepoError> {
        match self.repo()?.current_row(rtype, id).await? {
            None => Ok(None),
            row => Ok(Some(self.checked(rtype, id, row).await?)),
        }
    }

    /// The stored row, with the version it holds opened when the checks
    /// need it, once the writer may replace it.
    async fn checked(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        row: Option<StoredVersion>,
    ) -> Result<Current, RepoError> {
        let old = self
            .repo()?
            .guard_existing(Some(&self.guard()), rtype, row.as_ref())
            .await?;
        Ok(Current {
            rtype: rtype.clone(),
            id: id.clone(),
            row,
            old,
        })
    }

    /// A new resource with a server-assigned id (a random UUID).
    pub fn fresh(&self, rtype: &ResourceType) -> Current {
        Current {
            rtype: rtype.clone(),
            id: ResourceId::from_uuid(uuid::Uuid::new_v4()),
            row: None,
            old: None,
        }
    }

    /// Plan a new version of `cur` (its version and precondition follow
    /// from what is stored), checked as it will be stored: the only way to
    /// get a write [`Scoped::commit`] takes. Writing over nothing or a
    /// tombstone records a create, else an update.
    pub async fn plan_put(&self, cur: &Current, body: Value) -> Result<CheckedWrite, RepoError> {
        let (version, pre) = match &cur.row {
            None => (VersionId::FIRST, Precondition::Absent),
            Some(r) => (
                VersionId::new(r.version).ok_or(RepoError::Conflict)?.next(),
                Precondition::CurrentIs(r.version),
            ),
        };
        let w = self
            .repo()?
            .plan_put(&cur.rtype, &cur.id, version, body, pre)
            .await?;
        let interaction = if cur.is_absent() || cur.is_deleted() {
            "create"
        } else {
            "update"
        };
        self.check(w, cur.old.as_ref(), interaction)
    }

    /// Plan the deletion of the live resource `cur`, checked.
    pub fn plan_delete(&self, cur: Current) -> Result<CheckedWrite, RepoError> {
        let row = cur
            .row
            .as_ref()
            .filter(|r| !r.deleted)
            .ok_or(RepoError::NotFound)?;
        let w = self.repo()?.plan_delete(&cur.rtype, &cur.id, row)?;
        self.check(w, cur.old.as_ref(), "delete")
    }

    /// The content as it will be stored, against the version it replaces.
    fn check(
        &self,
        w: PlannedWrite,
        old: Option<&ResourceVersion>,
        interaction: &'static str,
    ) -> Result<CheckedWrite, RepoError> {
        self.guard().guard_new(
            w.rtype(),
            old.and_then(|v| v.body.as_ref()).map(|b| b.json()),
            w.body(),
        )?;
        Ok(CheckedWrite { w, interaction })
    }

    /// Commit checked writes all or nothing, each with its audit record in
    /// the same transaction.
    pub async fn commit(
        &self,
        writes: Vec<CheckedWrite>,
    ) -> Result<Vec<ResourceVersion>, RepoError> {
        // Decided work only, before anything is read for the records.
        let repo = self.repo()?;
        let guard = self.guard();
        let mut records = Vec::with_capacity(writes.len());
        for c in &writes {
            let opened = guard.opened(&c.w).await?;
            records.push(c.w.audit(&guard, c.interaction, &opened)?);
        }
        let written = repo
            .commit(writes.into_iter().map(|c| c.w).collect(), records)
            .await?;
        self.written(written.iter().map(|v| &v.rtype)).await;
        Ok(written)
    }

    /// After committed writes of these types: who cares for whom may have
    /// changed (recomputed on this node at once, on other nodes within
    /// the cache's few seconds), and a changed consent applies from the
    /// next request on this node (other nodes notice within a second).
    async fn written<'t>(&self, types: impl IntoIterator<Item = &'t ResourceType>) {
        let (mut care, mut consent) = (false, false);
        for t in types {
            care |= crate::access::care::CARE_TYPES.contains(&t.as_str());
            consent |= t.as_str() == "Consent";
        }
        if care {
            self.st.care_cache.clear();
        }
        if consent {
            if let Err(e) = self.st.refresh_consents().await {
                tracing::warn!(request_id = %self.ctx.request_id, error = ?e, "consent index not refreshed after a write");
            }
        }
    }
}

/// Proof that a write's audit record was committed in the write's own
/// transaction: only `Scoped`'s writes make one. A response carrying it
/// tells the pipeline not to record the interaction a second time, so it
/// cannot be made up (a read claiming it would go unrecorded):
///
/// ```compile_fail,E0423
/// let forged = phylax_server::access::scoped::AuditCommitted(());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct AuditCommitted(());

/// The current state of `Type/id` as a write will replace it
/// ([`Scoped::current`]): the stored row and, when the checks need it,
/// the version it holds, opened. Only `Scoped` makes one (its fields are
/// private), so a plan cannot claim to replace anything but what is
/// stored, as the caller may see it:
///
/// ```compile_fail,E0451
/// use phylax_server::access::scoped::Current;
/// let t = phylax_fhir::ResourceType::parse("Patient").unwrap();
/// let id = phylax_fhir::ResourceId::parse("p1").unwrap();
/// let forged = Current { rtype: t, id, row: None, old: None };
/// ```
pub struct Current {
    rtype: ResourceType,
    id: ResourceId,
    row: Option<StoredVersion>,
    old: Option<ResourceVersion>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

impl Current {
    pub fn id(&self) -> &ResourceId {
        &self.id
    }

    /// Never written.
    pub fn is_absent(&self) -> bool {
        self.row.is_none()
    }

    /// The current version is a tombstone.
    pub fn is_deleted(&self) -> bool {
        self.row.as_ref().is_some_and(|r| r.deleted)
    }

    /// The current version's number, if any.
    pub fn version(&self) -> Option<VersionId> {
        self.row.as_ref().and_then(|r| VersionId::new(r.version))
    }
}

/// A planned write that passed the checks ([`Scoped::plan_put`],
/// [`Scoped::plan_delete`]).
#[derive(Debug)]
pub struct CheckedWrite {
    w: PlannedWrite,
    interaction: &'static str,
}

/// One page of history ([`Scoped::history_page`]).
#[derive(Debug)]
pub struct HistoryPage {
    /// The page's versions the caller may see.
    pub versions: Vec<ResourceVersion>,
    /// The last version of the page before the per-version check (the
    /// next page's cursor).
    pub last_seq: Option<i64>,
    /// Whether there are more versions after this page.
    pub more: bool,
}
