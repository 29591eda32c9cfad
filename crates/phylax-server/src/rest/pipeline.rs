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
//! The work reaches resources through `FhirState::scoped`, whose
//! `Scoped` works only inside [`run`] once the policy allowed
//! ([`crate::access::scoped::decided`]); made anywhere else it refuses
//! every access, so a handler cannot skip this pipeline and still read.
//!
//! Writes commit their audit record in their own transaction (the scoped
//! repository's write guard, [`crate::access::write::WriteAuditor`],
//! drafts it; the response carries the proof, [`AuditCommitted`]), so
//! a stored write always has its record and an unrecordable write is not
//! stored. Reads, searches and refusals are recorded here, after the work
//! and before the response leaves.

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::access::scoped::AuditCommitted;
use crate::base::error::Failure;
use crate::state::FhirState;
use axum::response::{IntoResponse, Response};
use phylax_auth::policy::{decide_instance, Decision, Interaction};
use phylax_fhir::ResourceType;
use std::future::Future;

/// Write one audit record for an interaction the caller decided and ran
/// itself (a Bundle as a whole). `Err` means the record could not be
/// written and the response must not be released.
pub async fn record(
    st: &FhirState,
    ctx: &RequestCtx,
    interaction: &'static str,
    refs: AuditRefs,
    status: u16,
    denied_by: Option<&'static str>,
) -> Result<(), Failure> {
    let mut f = crate::access::ctx::facts(st.audit.origin(), ctx, interaction, status, denied_by);
    // A failed request's refs are client-chosen text: only successful
    // (or revealing: 410, 412) outcomes name what they touched.
    if matches!(status, 200..=299 | 410 | 412) {
        f.patients = refs.patients;
        if refs.resources.len() <= 1 {
            f.resources = refs.resources;
        }
    }
    crate::access::ctx::mark_emergency(ctx, &mut f);
    f.query_params = refs.params;
    f.query_type = refs.query_type;
    st.audit.record_owned(f).await.map_err(|e| {
        tracing::error!(request_id = %ctx.request_id(), error = %e, "audit record not written; response withheld");
        Failure::Unavailable("the audit log is unavailable".into())
    })
}

/// Decide several interactions at once (a transaction's entries) and run
/// `work` only when the policy allows every one: the first denial is
/// recorded and refuses all. `work` records its own outcome (a
/// transaction's writes commit their records with them; its answer is
/// recorded by the caller).
pub async fn run_all<F, Fut, T>(
    st: &FhirState,
    ctx: &RequestCtx,
    what: &[(Interaction, ResourceType)],
    work: F,
) -> Result<T, Failure>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    for (w, t) in what {
        allow(st, ctx, *w, t).await?;
    }
    crate::access::scoped::decided(work()).await
}

/// The type-level decision for one interaction, its denial recorded (a
/// transaction's entries, and an entry's update-as-create decided inside
/// the running work).
pub async fn allow(
    st: &FhirState,
    ctx: &RequestCtx,
    what: Interaction,
    rtype: &ResourceType,
) -> Result<(), Failure> {
    match phylax_auth::policy::decide(ctx.principal(), what, Some(rtype.as_str())) {
        Decision::Allow => Ok(()),
        Decision::Deny(rule) => {
            record(
                st,
                ctx,
                what.as_str(),
                AuditRefs::default(),
                403,
                Some(rule),
            )
            .await?;
            Err(Failure::Forbidden)
        }
    }
}

/// Run one FHIR interaction through policy, work and audit.
pub async fn run<F, Fut>(
    st: &FhirState,
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
    let decision = decide_instance(ctx.principal(), what, rtype.map(ResourceType::as_str), id);
    let (result, denied_by) = match decision {
        // Only decided work reaches resources: a `Scoped` made anywhere
        // else refuses every access.
        Decision::Allow => (crate::access::scoped::decided(work()).await, None),
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
        // The record went into the write's own transaction; the detector
        // still sees the write (who touched which patient).
        if let Some(d) = st.audit.detector() {
            let mut f =
                crate::access::ctx::facts(st.audit.origin(), ctx, what.as_str(), status, None);
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
