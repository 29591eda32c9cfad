//! Break-the-glass: recorded, time-limited emergency access to a patient
//! outside a user's care relationships (HIPAA §164.312(a)(2)(ii),
//! emergency access procedure; docs/ACCESS_CONTROL.md).
//!
//! `POST /fhir/Patient/{id}/$break-the-glass` with a `Parameters` body
//! (`reason`, required; `purpose`, a v3 ActReason code, default `ETREAT`).
//! The caller must be a user whose role allows it and must have completed
//! a second factor recently (`access.break_glass_mfa_max_age_secs`). The
//! grant lasts `access.break_glass_minutes`, is recorded as an AuditEvent
//! (subtype `break-the-glass`, purpose of use, the patient) before it takes
//! effect, raises the `break-the-glass` alert, and waits in a review queue
//! until an auditor closes it (`phylax access break-glass`). Every access
//! made under it carries the purpose of use `BTG` in its audit record.
//!
//! The reason is free text and may hold PHI: it is sealed in the grant
//! (never in the audit log, logs or alerts), for the reviewer.

use crate::access::ctx::RequestCtx;
use crate::access::gate::Gate;
use crate::base::error::Failure;
use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome, UserRef};
use phylax_auth::policy::Principal;
use phylax_fhir::{ResourceId, ResourceType};
use phylax_store::BreakGlassRecord;
use serde::{Deserialize, Serialize};

/// Purposes of use a grant may name (HL7 v3 ActReason).
pub const PURPOSES: &[&str] = &["ETREAT", "BTG", "TREAT"];

/// Longest reason accepted.
pub const MAX_REASON: usize = 1000;

/// The sealed part of a grant.
#[derive(Serialize, Deserialize)]
pub struct GrantDetails {
    pub patient: String,
    pub reason: String,
    pub purpose: String,
}

impl std::fmt::Debug for GrantDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantDetails")
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// The sealed review of a grant.
#[derive(Serialize, Deserialize)]
pub struct ReviewDetails {
    pub note: String,
}

impl std::fmt::Debug for ReviewDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewDetails").finish_non_exhaustive()
    }
}

fn aad(id: &str, what: &str) -> Vec<u8> {
    format!("phylax-break-glass|{what}|{id}").into_bytes()
}

/// Seal `v` for grant `id` with the tenant data key.
pub async fn seal<T: Serialize>(
    keys: &crate::data::keyring::KeyRing,
    id: &str,
    what: &str,
    v: &T,
) -> Result<Vec<u8>, Failure> {
    let key = keys
        .for_write("tenant")
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let plain = serde_json::to_vec(v).map_err(|e| Failure::Internal(e.to_string()))?;
    key.seal(&aad(id, what), &plain)
        .map_err(|e| Failure::Internal(e.to_string()))
}

/// Open a grant's sealed details.
pub async fn open_details(
    keys: &crate::data::keyring::KeyRing,
    r: &BreakGlassRecord,
) -> Result<GrantDetails, Failure> {
    let key = keys
        .for_read("tenant")
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let plain = key.open(&aad(&r.id, "grant"), &r.sealed).map_err(|_| {
        Failure::Integrity(format!("break-the-glass grant {} failed to open", r.id))
    })?;
    serde_json::from_slice(&plain).map_err(|e| Failure::Integrity(e.to_string()))
}

/// Open a grant's sealed review note.
pub async fn open_review(
    keys: &crate::data::keyring::KeyRing,
    r: &BreakGlassRecord,
) -> Result<Option<ReviewDetails>, Failure> {
    let Some(sealed) = &r.review_sealed else {
        return Ok(None);
    };
    let key = keys
        .for_read("tenant")
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let plain = key.open(&aad(&r.id, "review"), sealed).map_err(|_| {
        Failure::Integrity(format!("break-the-glass review {} failed to open", r.id))
    })?;
    Ok(Some(
        serde_json::from_slice(&plain).map_err(|e| Failure::Integrity(e.to_string()))?,
    ))
}

/// `user_id`'s unexpired grants: (patient, expiry in ms).
pub async fn active_grants(st: &Gate, user_id: &str) -> Result<Vec<(String, i64)>, Failure> {
    let rows = st
        .grants
        .break_glass_active(user_id, crate::base::clock::now_ms())
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let mut out = Vec::new();
    for r in rows {
        out.push((open_details(&st.keys, &r).await?.patient, r.expires));
    }
    Ok(out)
}

/// Issue a break-the-glass grant to the calling user for patient `pid`
/// (who must exist), recorded durably before it takes effect. Returns the
/// grant id and its expiry (ms). Checks here, whatever the caller checked:
/// a user, whose role allows it, with a recent second factor.
pub async fn issue(
    st: &Gate,
    ctx: &RequestCtx,
    pid: &ResourceId,
    reason: &str,
    purpose: &'static str,
) -> Result<(String, i64), Failure> {
    let Principal::User {
        user_id,
        role,
        client_id,
        mfa_at,
        ..
    } = &ctx.principal
    else {
        return Err(Failure::Declined("break-the-glass: users only"));
    };
    if !role.break_glass {
        return Err(Failure::Declined(
            "break-the-glass: the role does not allow it",
        ));
    }
    let now_s = crate::base::clock::now_secs();
    let max_age = st.config.break_glass_mfa_max_age_secs as i64;
    if !mfa_at.is_some_and(|t| t <= now_s && now_s - t <= max_age) {
        return Err(Failure::BadRequest(vec![phylax_fhir::Issue::error(
            phylax_fhir::IssueCode::Security,
            "break-the-glass needs a recent second factor: sign in again, then retry",
        )]));
    }
    // The patient must exist (the grant names a real record).
    let ptype = ResourceType::parse("Patient").ok_or(Failure::Internal("Patient".into()))?;
    st.repo.read(&ptype, pid).await?;
    let minutes = st.config.break_glass_minutes as i64;
    let now = crate::base::clock::now_ms();
    let expires = now + minutes * 60_000;
    let id = uuid::Uuid::new_v4().to_string();
    let details = GrantDetails {
        patient: pid.to_string(),
        reason: reason.to_owned(),
        purpose: purpose.to_owned(),
    };
    let sealed = seal(&st.keys, &id, "grant", &details).await?;
    // Recorded (durably) before the grant exists: no unrecorded emergency
    // access. The detector raises the `break-the-glass` alert from it.
    let facts = AuditFacts {
        id: crate::audit::log::new_event_id(),
        recorded_ms: now,
        kind: EventKind::Security("break-the-glass"),
        action: Action::Execute,
        outcome: Outcome::Success,
        outcome_desc: Some(format!(
            "break-the-glass grant {id} for {minutes} min, purpose {purpose}; awaiting review"
        )),
        user: Some(UserRef {
            id: user_id.clone(),
            role: role.name.clone(),
        }),
        client: Some(client_id.clone()),
        ip: ctx.peer,
        token_id: Some(ctx.principal.token_id().to_owned()),
        request_id: ctx.request_id.clone(),
        purpose: Some(purpose),
        patients: vec![pid.to_string()],
        resources: vec![format!("Patient/{pid}")],
        query_params: Vec::new(),
        query_type: None,
        token_family: None,
        observer: st.audit.origin().to_owned(),
    };
    st.audit.record(&facts).await.map_err(|e| {
        tracing::error!(request_id = %ctx.request_id, error = %e, "break-the-glass not recorded; refused");
        Failure::Unavailable("the audit log is unavailable".into())
    })?;
    st.grants
        .put_break_glass(&BreakGlassRecord {
            id: id.clone(),
            user_id: user_id.clone(),
            started: now,
            expires,
            sealed,
            reviewed_at: None,
            reviewer: None,
            review_sealed: None,
        })
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    st.care_cache.forget(user_id);
    Ok((id, expires))
}

/// A grant in the review queue, opened for the reviewer (the reason may
/// hold PHI: shown to the reviewer, never logged).
#[derive(Serialize)]
pub struct QueueItem {
    pub id: String,
    pub user_id: String,
    pub started: i64,
    pub expires: i64,
    pub patient: String,
    pub reason: String,
    pub purpose: String,
    pub reviewed_at: Option<i64>,
    pub reviewer: Option<String>,
    pub review_note: Option<String>,
}

impl std::fmt::Debug for QueueItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueItem")
            .field("id", &self.id)
            .field("reviewed", &self.reviewed_at.is_some())
            .finish_non_exhaustive()
    }
}

/// The review queue: grants not yet reviewed (or all), newest first.
pub async fn queue(st: &Gate, open_only: bool) -> Result<Vec<QueueItem>, Failure> {
    let rows = st
        .grants
        .break_glass_list(open_only, 10_000)
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let d = open_details(&st.keys, &r).await?;
        let note = open_review(&st.keys, &r).await?.map(|n| n.note.clone());
        out.push(QueueItem {
            id: r.id.clone(),
            user_id: r.user_id.clone(),
            started: r.started,
            expires: r.expires,
            patient: d.patient.clone(),
            reason: d.reason.clone(),
            purpose: d.purpose.clone(),
            reviewed_at: r.reviewed_at,
            reviewer: r.reviewer.clone(),
            review_note: note,
        });
    }
    Ok(out)
}

/// Why a review could not be closed.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("no user named that")]
    NoReviewer,
    #[error("only users with the auditor role close break-the-glass reviews")]
    NotAuditor,
    #[error("the review note is required (at most 2000 characters)")]
    Note,
    #[error("no open break-the-glass grant with that id")]
    NotOpen,
    #[error("{0:?}")]
    Api(Failure),
}

/// Close one grant's review: `reviewer` (a username) must hold the
/// auditor role; the note is sealed. Returns the reviewer's user id.
pub async fn close(st: &Gate, id: &str, reviewer: &str, note: &str) -> Result<String, ReviewError> {
    let note = note.trim();
    if note.is_empty() || note.chars().count() > 2000 {
        return Err(ReviewError::Note);
    }
    let u = st
        .accounts
        .find(reviewer)
        .await
        .map_err(|e| ReviewError::Api(Failure::Unavailable(e.to_string())))?
        .ok_or(ReviewError::NoReviewer)?;
    if u.role() != "auditor" {
        return Err(ReviewError::NotAuditor);
    }
    let sealed = seal(&st.keys, id, "review", &ReviewDetails { note: note.into() })
        .await
        .map_err(ReviewError::Api)?;
    let done = st
        .grants
        .review_break_glass(id, u.id(), crate::base::clock::now_ms(), &sealed)
        .await
        .map_err(|e| ReviewError::Api(Failure::Unavailable(e.to_string())))?;
    if !done {
        return Err(ReviewError::NotOpen);
    }
    Ok(u.id().to_owned())
}
