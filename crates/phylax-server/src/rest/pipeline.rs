//! The one pipeline every FHIR interaction passes through.
//!
//! Authentication happens in the bearer-token middleware, which attaches a
//! [`RequestCtx`]. Handlers describe what they are about to do as an
//! [`Interaction`] and hand their work to [`run`], which
//! 1. asks the policy ([`phylax_auth::policy::decide`]) — deny by default;
//! 2. runs the work only if allowed;
//! 3. writes the audit record of the outcome to the audit log
//!    ([`crate::audit::log::AuditLog`], group-committed) and only once it is
//!    durable releases the response: when the record cannot be written,
//!    the client gets 503 and no data (fail closed).
//!
//! Writes commit their audit record in their own transaction (a
//! [`WriteAuditor`] drafts it; the response carries [`AuditCommitted`]), so
//! a stored write always has its record and an unrecordable write is not
//! stored. Reads, searches and refusals are recorded here, after the work
//! and before the response leaves.

use crate::audit::log::AuditError;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::state::AppState;
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome, UserRef};
use phylax_auth::policy::{decide_instance, Decision, Interaction, Principal};
use phylax_fhir::{compartment, ResourceType};
use phylax_store::NewAudit;
use serde_json::Value;
use std::future::Future;
use std::net::IpAddr;

/// Who is calling, attached by the authentication middleware.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub principal: Principal,
    pub peer: Option<IpAddr>,
    /// Which patients' data this request reaches (computed once, by the
    /// authentication middleware; see [`crate::access::reach`]).
    pub access: std::sync::Arc<phylax_auth::policy::Access>,
}

/// What a response tells the pipeline about the data it carries, so the
/// audit record names the patients and resources concerned. Handlers
/// attach it as a response extension (computed from the full resources,
/// before `_elements`/`_summary` trimmed them).
#[derive(Debug, Clone, Default)]
pub struct AuditRefs {
    pub patients: Vec<String>,
    /// `Type/id`; kept for single-resource interactions only (a search's
    /// record lists the patients whose data was returned), so at most two
    /// are collected: two means "more than one".
    pub resources: Vec<String>,
    /// Search parameter names (never values).
    pub params: Vec<String>,
}

impl AuditRefs {
    /// Add one returned or written resource.
    pub fn add(&mut self, rtype: &ResourceType, id: &str, body: Option<&Value>) {
        let patient = body.and_then(|b| compartment::patient_of(rtype, b));
        self.add_known(rtype, id, patient);
    }

    /// Like [`AuditRefs::add`], with the compartment's patient already known.
    fn add_known(&mut self, rtype: &ResourceType, id: &str, patient: Option<String>) {
        let patient = patient.or_else(|| (rtype.as_str() == "Patient").then(|| id.to_owned()));
        if let Some(p) = patient {
            self.add_patient(p);
        }
        if self.resources.len() < 2 {
            self.resources.push(format!("{rtype}/{id}"));
        }
    }

    fn add_patient(&mut self, p: String) {
        if !self.patients.contains(&p) {
            self.patients.push(p);
        }
    }

    /// Every patient the returned versions name. The key scope gives the
    /// first without a parse; a body whose text holds more patient
    /// references than that (a Group, a CareTeam, an Observation with a
    /// patient performer, a linked Patient) is read for all of them.
    pub fn of_versions<'a>(vs: impl IntoIterator<Item = &'a ResourceVersion>) -> AuditRefs {
        let mut r = AuditRefs::default();
        for v in vs {
            r.add_known(&v.rtype, v.id.as_str(), v.patient.clone());
            let Some(b) = &v.body else { continue };
            let known = usize::from(v.patient.is_some() && v.rtype.as_str() != "Patient");
            if b.at_most("\"Patient/") > known {
                for p in compartment::patients_of(&v.rtype, b.json()) {
                    r.add_patient(p);
                }
            }
        }
        r
    }
}

/// Marks a response whose audit record was committed in the write's own
/// transaction; the pipeline does not record it a second time.
#[derive(Debug, Clone, Copy)]
pub struct AuditCommitted;

/// The facts of an audit record for a request, before outcome and refs.
fn facts(
    st: &AppState,
    ctx: &RequestCtx,
    interaction: &'static str,
    status: u16,
    denied_by: Option<&'static str>,
) -> AuditFacts {
    let (user, client) = match &ctx.principal {
        Principal::Client { client_id, .. } => (None, Some(client_id.clone())),
        Principal::User {
            user_id,
            role,
            client_id,
            ..
        } => (
            Some(UserRef {
                id: user_id.clone(),
                role: role.name.clone(),
            }),
            Some(client_id.clone()),
        ),
    };
    let code = match interaction {
        "update-create" => "update",
        "operation-everything" | "access-log" => "operation",
        other => other,
    };
    let outcome_desc = match denied_by {
        Some(rule) => Some(format!("HTTP {status}; denied by {rule}")),
        None if status >= 400 => Some(format!("HTTP {status}")),
        None => None,
    };
    AuditFacts {
        id: crate::audit::log::new_event_id(),
        recorded_ms: crate::base::clock::now_ms(),
        kind: EventKind::Rest(code),
        action: Action::for_rest(code),
        outcome: Outcome::from_status(status),
        outcome_desc,
        user,
        client,
        ip: ctx.peer,
        token_id: Some(ctx.principal.token_id().to_owned()),
        request_id: ctx.request_id.clone(),
        // The role's purpose of use (break-the-glass accesses say `BTG`).
        purpose: Some(ctx.access.purpose),
        patients: Vec::new(),
        resources: Vec::new(),
        query_params: Vec::new(),
        observer: st.audit.origin().to_owned(),
    }
}

/// An access to a patient reached through break-the-glass carries the
/// purpose of use `BTG` (v3 ActReason), so it stands out in the log and in
/// the patient's access log.
fn mark_emergency(ctx: &RequestCtx, f: &mut AuditFacts) {
    if f.patients.iter().any(|p| ctx.access.emergency.contains(p)) {
        f.purpose = Some("BTG");
    }
}

/// Drafts the audit records of writes, to be committed in the writes' own
/// transaction (see `Repo::create` and friends).
#[derive(Debug, Clone, Copy)]
pub struct WriteAuditor<'a> {
    st: &'a AppState,
    ctx: &'a RequestCtx,
}

impl<'a> WriteAuditor<'a> {
    pub fn new(st: &'a AppState, ctx: &'a RequestCtx) -> Self {
        WriteAuditor { st, ctx }
    }

    /// Whether a write of `rtype` must open the version it replaces: the
    /// writer is limited (reach or labels), or may not change who reaches
    /// whom and `rtype` can (the old and new relationship elements are
    /// compared, [`phylax_auth::policy::decide_relationships`]).
    pub fn opens_existing(&self, rtype: &ResourceType) -> bool {
        let a = &self.ctx.access;
        a.reach != phylax_auth::policy::Reach::All
            || !a.labelled
            || (!a.relationships && phylax_auth::policy::establishes_reach(rtype.as_str()))
    }

    /// Whether the writer is limited to some patients (then a write to an
    /// id that does not exist answers like one that is hidden).
    pub fn limited(&self) -> bool {
        self.ctx.access.reach != phylax_auth::policy::Reach::All
    }

    /// The version a write replaces must be visible to the writer, for
    /// every patient it names.
    pub fn guard_existing(&self, v: &ResourceVersion) -> Result<(), crate::data::repo::RepoError> {
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
            Decision::Allow => Ok(()),
            Decision::Deny(rule) => {
                Err(crate::data::repo::RepoError::Denied { hidden: true, rule })
            }
        }
    }

    /// The one check of a write's content, for every path that writes
    /// (single interactions, conditional ones, Bundle entries): the new
    /// content must be within the writer's reach for every patient it
    /// names, and a change of who reaches whom (`old` is the live version
    /// it replaces, if any; `new` is absent for a delete) needs the
    /// relationships permission.
    pub fn guard_new(
        &self,
        rtype: &ResourceType,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), crate::data::repo::RepoError> {
        let access = &self.ctx.access;
        let refused = |rule| crate::data::repo::RepoError::Denied {
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
            self.st.config.access.self_registration,
        ) {
            Decision::Allow => Ok(()),
            Decision::Deny(rule) => Err(refused(rule)),
        }
    }

    /// Patients a relationship write opens or closes beyond those the
    /// resource names (a PractitionerRole: its organization's and its own
    /// GP patients, from the new content or, for a delete, the version it
    /// replaces), for the write's audit record.
    pub async fn opened(
        &self,
        w: &crate::data::repo::PlannedWrite,
    ) -> Result<Vec<String>, crate::data::repo::RepoError> {
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
        crate::access::reach::patients_opened(self.st, rtype, id, &bodies)
            .await
            .map_err(|e| {
                crate::data::repo::RepoError::Store(phylax_store::StoreError::Unavailable(format!(
                    "{e:?}"
                )))
            })
    }

    /// The sealed record of one successful write.
    pub fn draft(
        &self,
        interaction: &'static str,
        rtype: &str,
        id: &str,
        patients: Vec<String>,
        status: u16,
    ) -> Result<NewAudit, AuditError> {
        let mut f = facts(self.st, self.ctx, interaction, status, None);
        f.patients = patients;
        f.resources = vec![format!("{rtype}/{id}")];
        mark_emergency(self.ctx, &mut f);
        self.st.audit.draft(&f)
    }
}

/// Write one audit record for an interaction the caller decided and ran
/// itself (a Bundle as a whole). `Err` means the record could not be
/// written and the response must not be released.
pub async fn record(
    st: &AppState,
    ctx: &RequestCtx,
    interaction: &'static str,
    refs: AuditRefs,
    status: u16,
    denied_by: Option<&'static str>,
) -> Result<(), Failure> {
    let mut f = facts(st, ctx, interaction, status, denied_by);
    // A failed request's refs are client-chosen text: only successful
    // (or revealing: 410, 412) outcomes name what they touched.
    if matches!(status, 200..=299 | 410 | 412) {
        f.patients = refs.patients;
        if refs.resources.len() <= 1 {
            f.resources = refs.resources;
        }
    }
    mark_emergency(ctx, &mut f);
    f.query_params = refs.params;
    st.audit.record_owned(f).await.map_err(|e| {
        tracing::error!(request_id = %ctx.request_id, error = %e, "audit record not written; response withheld");
        Failure::Unavailable("the audit log is unavailable".into())
    })
}

/// Run one FHIR interaction through policy, work and audit.
pub async fn run<F, Fut>(
    st: &AppState,
    ctx: &RequestCtx,
    what: Interaction,
    rtype: Option<&ResourceType>,
    id: Option<&str>,
    work: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Response, Failure>>,
{
    let started = std::time::Instant::now();
    // A read records through the journal: let its group commit wait for
    // this one. (A write commits its record in its own transaction; a
    // ticket for it would only hold reads' syncs back.)
    let ticket = match what {
        Interaction::Create
        | Interaction::Update
        | Interaction::UpdateCreate
        | Interaction::Delete => crate::audit::journal::Ticket::none(),
        _ => st.audit.ticket(),
    };
    let decision = decide_instance(&ctx.principal, what, rtype.map(ResourceType::as_str), id);
    let (result, denied_by) = match decision {
        Decision::Allow => (work().await, None),
        Decision::Deny(rule) => (Err(Failure::Forbidden), Some(rule)),
    };
    // Field masking, after `_elements`/`_summary` shaped the response.
    let result = match (crate::rest::mask::masks_of(ctx), result) {
        (Some(masks), Ok(r)) => Ok(crate::rest::mask::apply(r, masks).await),
        (_, other) => other,
    };
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    let denied_by = denied_by.or_else(|| result.as_ref().err().and_then(Failure::denied_by));
    let mut refs = result
        .as_ref()
        .ok()
        .and_then(|r| r.extensions().get::<AuditRefs>())
        .cloned()
        .unwrap_or_default();
    // Counted when the answer is known (after its audit record below, the
    // histogram includes the audit wait for reads).
    let count = |status: u16| {
        st.metrics
            .request(what.as_str(), status, started.elapsed().as_secs_f64())
    };
    if result
        .as_ref()
        .is_ok_and(|r| r.extensions().get::<AuditCommitted>().is_some())
    {
        count(status);
        // Who cares for whom may have changed: recompute on this node at
        // once (other nodes within the cache's few seconds).
        if rtype.is_some_and(|t| crate::access::reach::CARE_TYPES.contains(&t.as_str())) {
            st.care_cache.clear();
        }
        // A changed consent applies from the next request on this node
        // (other nodes notice within a second).
        if rtype.is_some_and(|t| t.as_str() == "Consent") {
            if let Err(e) = st.consents.refresh(&st.repo).await {
                tracing::warn!(request_id = %ctx.request_id, error = ?e, "consent index not refreshed after a write");
            }
        }
        // The record went into the write's own transaction; the detector
        // still sees the write (who touched which patient).
        if let Some(d) = st.audit.detector() {
            let mut f = facts(st, ctx, what.as_str(), status, None);
            f.patients = refs.patients;
            d.observe_owned(f);
        }
        return match result {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    // A requested id is recorded only when the resource was found to
    // exist: a failed request's id is client-chosen text and may be
    // anything, including a name typed into a URL.
    if refs.resources.is_empty() && matches!(status, 200..=299 | 410 | 412) {
        if let (Some(t), Some(i)) = (rtype, id) {
            refs.add(t, i, None);
        }
    }
    ticket.redeem();
    if let Err(e) = record(st, ctx, what.as_str(), refs, status, denied_by).await {
        // Fail closed: whatever the work produced is dropped unsent.
        count(503);
        return e.into_response();
    }
    count(status);
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
