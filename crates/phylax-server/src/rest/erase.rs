//! `POST /fhir/Patient/{id}/$erase`: crypto-shredding a patient's record
//! through the API (GDPR Art. 17; docs/KEYS.md, "Erasing a patient").
//! Only a signed-in user whose role has the erase permission
//! (`privacy-officer`), with a token allowing `Patient` deletes and a
//! recent second factor; never a backend client, whatever its scopes.
//! The request is parsed and those checks made here; the erasure is
//! [`crate::keys::erase::Eraser`].

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::error::Failure;
use crate::keys::KeysError;
use crate::state::FhirState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_auth::policy::Principal;
use phylax_auth::scopes::{Context, Perm};
use phylax_fhir::{Issue, IssueCode, ResourceId, ResourceType};
use serde_json::{json, Value};

/// The longest reason accepted (it goes into the audit log).
const MAX_REASON: usize = 500;

/// The caller may erase: a user, the role's permission, the token's
/// scopes, a second factor within `access.break_glass_mfa_max_age_secs`.
fn check_caller(st: &FhirState, ctx: &RequestCtx) -> Result<(), Failure> {
    let Principal::User {
        role,
        scopes,
        mfa_at,
        ..
    } = ctx.principal()
    else {
        return Err(Failure::Declined("$erase: signed-in users only"));
    };
    if !role.erase {
        return Err(Failure::Declined("$erase: the role does not allow it"));
    }
    if !scopes.allows(Context::User, "Patient", Perm::Delete) {
        return Err(Failure::Declined(
            "$erase: the token's scopes do not allow deleting Patient (user/Patient.d)",
        ));
    }
    let now_s = crate::base::clock::now_secs();
    let max_age = st.config.access.break_glass_mfa_max_age_secs as i64;
    if !mfa_at.is_some_and(|t| t <= now_s && now_s - t <= max_age) {
        return Err(Failure::BadRequest(vec![Issue::error(
            IssueCode::Security,
            "$erase needs a recent second factor: sign in again, then retry",
        )]));
    }
    Ok(())
}

/// What the request asks: the reason and whether the retention period is
/// overridden.
fn parse(value: &Value) -> Result<(String, bool), Failure> {
    use crate::rest::wire::{param, parameters, reason};
    let value = parameters(value)?;
    let reason = reason(value, MAX_REASON)?;
    let override_retention = match param(value, "overrideRetention") {
        None => false,
        Some(p) => p
            .get("valueBoolean")
            .and_then(Value::as_bool)
            .ok_or_else(|| Failure::bad_request("overrideRetention takes a valueBoolean"))?,
    };
    Ok((reason.to_owned(), override_retention))
}

fn refused(msg: String) -> Failure {
    Failure::Unprocessable(vec![Issue::error(IssueCode::Processing, msg)])
}

/// Key administration's refusals as the API states them.
fn failure(e: KeysError) -> Failure {
    match e {
        KeysError::NothingToErase => Failure::NotFound,
        e @ (KeysError::LegalHold | KeysError::WithinRetention { .. }) => refused(e.to_string()),
        KeysError::NoReason | KeysError::BadId(_) => Failure::bad_request(e.to_string()),
        e @ KeysError::NotOwner { .. } => refused(e.to_string()),
        e => Failure::Internal(e.to_string()),
    }
}

/// Erase the patient; the answer names what was deleted, and that the
/// rotations sealing older copies run on in the background.
async fn erase(
    st: &FhirState,
    ctx: &RequestCtx,
    pid: Option<&ResourceId>,
    h: &HeaderMap,
    body: axum::body::Body,
) -> Result<(Response, AuditRefs), Failure> {
    check_caller(st, ctx)?;
    let pid = pid.ok_or(Failure::NotFound)?;
    let value = crate::rest::wire::read_json(st, h, body).await?;
    let (reason, override_retention) = parse(&value)?;
    let started = st
        .eraser
        .erase(pid.as_str(), &reason, override_retention)
        .await
        .map_err(failure)?;
    tracing::warn!(request_id = %ctx.request_id(), "patient erased through the API");
    let mut refs = AuditRefs::default();
    if let Some(t) = ResourceType::parse("Patient") {
        refs.add(&t, pid.as_str(), None);
    }
    let out = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "versions", "valueInteger": started.erased.versions},
            {"name": "resources", "valueInteger": started.erased.resources},
            {"name": "retentionOverridden", "valueBoolean": started.retention_overridden},
            {"name": "status", "valueCode": "rekeying"},
            {"name": "detail", "valueString": "the patient's data and data key are deleted; the search index key and the KEK are being rotated so that older copies cannot be read (phylax keys status lists the erasure as pending until then)"},
        ],
    });
    Ok((crate::rest::wire::fhir_json(StatusCode::OK, &out), refs))
}

/// `POST /fhir/Patient/{id}/$erase` (routed with `$break-the-glass`):
/// the request is recorded in the audit log as the caller's, whatever
/// the outcome; the erasure's own records follow it.
pub async fn request(
    st: &FhirState,
    ctx: &RequestCtx,
    id: &str,
    h: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    let pid = ResourceId::parse(id);
    let outcome = erase(st, ctx, pid.as_ref(), h, body).await;
    let (status, denied, refs) = match &outcome {
        Ok((_, refs)) => (200, None, refs.clone()),
        Err(e) => (e.status().as_u16(), e.denied_by(), AuditRefs::default()),
    };
    if let Err(e) = crate::rest::pipeline::record(st, ctx, "erase", refs, status, denied).await {
        return e.into_response();
    }
    match outcome {
        Ok((r, _)) => r,
        Err(e) => e.into_response(),
    }
}
