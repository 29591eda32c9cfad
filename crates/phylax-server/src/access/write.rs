//! The checks and audit record of one caller's writes: [`WriteAuditor`],
//! the repository's [`WriteGuard`] for one request. Only
//! [`crate::access::scoped::Scoped`] makes one.

use crate::access::ctx::{facts, mark_emergency, RequestCtx};
use crate::access::gate::Gate;
use crate::data::repo::{PlannedWrite, RepoError, ResourceVersion, WriteGuard};
use phylax_auth::policy::Decision;
use phylax_fhir::ResourceType;
use phylax_store::NewAudit;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// Drafts the audit records of writes, to be committed in the writes' own
/// transaction (see `Repo::create` and friends).
#[derive(Debug, Clone, Copy)]
pub struct WriteAuditor<'a> {
    st: &'a Gate,
    ctx: &'a RequestCtx,
}

impl<'a> WriteAuditor<'a> {
    pub(in crate::access) fn new(st: &'a Gate, ctx: &'a RequestCtx) -> Self {
        WriteAuditor { st, ctx }
    }

    /// See [`WriteGuard::opened`].
    async fn opened_patients(&self, w: &PlannedWrite) -> Result<Vec<String>, RepoError> {
        let (rtype, id) = w.target();
        if rtype.as_str() != "PractitionerRole" {
            return Ok(Vec::new());
        }
        let previous = match w.replaces() {
            Some(v) => self.st.repo.vread(rtype, id, v).await.ok(),
            None => None,
        };
        let bodies: Vec<&Value> = [
            w.body(),
            previous
                .as_ref()
                .and_then(|v| v.body.as_ref())
                .map(|b| b.json()),
        ]
        .into_iter()
        .flatten()
        .collect();
        crate::access::care::patients_opened(self.st, rtype, id, &bodies)
            .await
            .map_err(|e| RepoError::Store(phylax_store::StoreError::Unavailable(format!("{e:?}"))))
    }
}

impl WriteGuard for WriteAuditor<'_> {
    /// Whether a write of `rtype` must open the version it replaces: the
    /// writer is limited (reach or labels), or may not change who reaches
    /// whom and `rtype` can (the old and new relationship elements are
    /// compared, [`phylax_auth::policy::decide_relationships`]).
    fn opens_existing(&self, rtype: &ResourceType) -> bool {
        let a = &self.ctx.access;
        a.reach != phylax_auth::policy::Reach::All
            || !a.labelled
            || (!a.relationships && phylax_auth::policy::establishes_reach(rtype.as_str()))
    }

    /// Whether the writer is limited to some patients (then a write to an
    /// id that does not exist answers like one that is hidden).
    fn limited(&self) -> bool {
        self.ctx.access.reach != phylax_auth::policy::Reach::All
    }

    /// The version a write replaces must be visible to the writer, for
    /// every patient it names.
    fn guard_existing(&self, v: &ResourceVersion) -> Result<(), RepoError> {
        let decision = match &v.body {
            Some(b) => crate::access::reach::decide_write_body(
                self.st,
                &self.ctx.access,
                &v.rtype,
                b.json(),
            ),
            None => crate::access::reach::allows(self.st, &self.ctx.access.for_writes(), v),
        };
        match decision {
            Decision::Allow => {}
            Decision::Deny(rule) => return Err(RepoError::Denied { hidden: true, rule }),
        }
        // Held relationship data (written before the relationships
        // permission): only a holder's new version releases it, so a
        // writer without the permission may not replace it, even keeping
        // its relationship elements as they are (that would vouch for
        // them). `opens_existing` makes every such write come here.
        if !self.ctx.access.relationships && self.st.holds.is_held(v) {
            return Err(RepoError::Denied {
                hidden: false,
                rule: "held-relationships",
            });
        }
        Ok(())
    }

    /// The one check of a write's content, for every path that writes
    /// (single interactions, conditional ones, Bundle entries): the new
    /// content must be within the writer's reach for every patient it
    /// names, and a change of who reaches whom (`old` is the live version
    /// it replaces, if any; `new` is absent for a delete) needs the
    /// relationships permission.
    fn guard_new(
        &self,
        rtype: &ResourceType,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), RepoError> {
        let access = &self.ctx.access;
        let refused = |rule| RepoError::Denied {
            hidden: false,
            rule,
        };
        if let Some(body) = new {
            match crate::access::reach::decide_write_body(self.st, access, rtype, body) {
                Decision::Allow => {}
                Decision::Deny(rule)
                    if rule.starts_with("reach")
                        && old.is_none()
                        && crate::access::reach::starts_care(self.st, access, rtype, body) => {}
                Decision::Deny(rule) => return Err(refused(rule)),
            }
        }
        match phylax_auth::policy::decide_relationships(
            access,
            rtype.as_str(),
            old,
            new,
            self.st.config.self_registration,
        ) {
            Decision::Allow => Ok(()),
            Decision::Deny(rule) => Err(refused(rule)),
        }
    }

    /// Patients a relationship write opens or closes beyond those the
    /// resource names (a PractitionerRole: its organization's and its own
    /// GP patients, from the new content or, for a delete, the version it
    /// replaces), for the write's audit record.
    fn opened<'a>(
        &'a self,
        w: &'a PlannedWrite,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<String>, RepoError>> + Send + 'a>> {
        Box::pin(self.opened_patients(w))
    }

    /// The sealed record of one successful write.
    fn draft(
        &self,
        interaction: &'static str,
        rtype: &str,
        id: &str,
        patients: Vec<String>,
        status: u16,
    ) -> Result<NewAudit, RepoError> {
        let mut f = facts(self.st.audit.origin(), self.ctx, interaction, status, None);
        f.patients = patients;
        f.resources = vec![format!("{rtype}/{id}")];
        mark_emergency(self.ctx, &mut f);
        self.st
            .audit
            .draft(&f)
            .map_err(|e| RepoError::Store(phylax_store::StoreError::Unavailable(e.to_string())))
    }
}
