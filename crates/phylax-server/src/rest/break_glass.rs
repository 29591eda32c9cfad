//! `POST /fhir/Patient/{id}/$break-the-glass`: the request is parsed and
//! the caller's role and second factor checked here; the grant itself is
//! [`crate::access::break_glass::issue`].

use crate::access::break_glass::{MAX_REASON, PURPOSES};
use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::state::FhirState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use phylax_auth::policy::Principal;
use phylax_fhir::ResourceId;
use serde_json::{json, Value};
use std::sync::Arc;

/// `POST /fhir/Patient/{id}/$break-the-glass`.
pub async fn request(
    State(st): State<Arc<FhirState>>,
    Extension(ctx): Extension<RequestCtx>,
    Path((ct, id, op)): Path<(String, String, String)>,
    h: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if ct == "Patient" && op == "$erase" {
        return crate::rest::erase::request(&st, &ctx, &id, &h, body).await;
    }
    if ct != "Patient" || op != "$break-the-glass" {
        return Failure::MethodNotAllowed(
            "POST here is only for Patient/{id}/$break-the-glass or Patient/{id}/$erase",
        )
        .into_response();
    }
    let pid = ResourceId::parse(&id);
    let outcome = grant(&st, &ctx, pid.as_ref(), &h, body).await;
    let (status, denied) = match &outcome {
        Ok(_) => (200, None),
        Err(e) => (e.status().as_u16(), e.denied_by()),
    };
    // The grant's own record was written before it took effect; a refusal
    // is recorded here (with no patient: the id is the caller's text).
    if outcome.is_err() {
        let refs = crate::access::ctx::AuditRefs::default();
        if let Err(e) =
            crate::rest::pipeline::record(&st, &ctx, "break-the-glass", refs, status, denied).await
        {
            return e.into_response();
        }
    }
    match outcome {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn grant(
    st: &FhirState,
    ctx: &RequestCtx,
    pid: Option<&ResourceId>,
    h: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, Failure> {
    // Checked here first so that a refused role hears so before any
    // problem with its request body; `issue` checks again, whoever calls it.
    let Principal::User { role, mfa_at, .. } = ctx.principal() else {
        return Err(Failure::Declined("break-the-glass: users only"));
    };
    if !role.break_glass {
        return Err(Failure::Declined(
            "break-the-glass: the role does not allow it",
        ));
    }
    let now_s = crate::base::clock::now_secs();
    let max_age = st.config.access.break_glass_mfa_max_age_secs as i64;
    if !mfa_at.is_some_and(|t| t <= now_s && now_s - t <= max_age) {
        return Err(Failure::BadRequest(vec![phylax_fhir::Issue::error(
            phylax_fhir::IssueCode::Security,
            "break-the-glass needs a recent second factor: sign in again, then retry",
        )]));
    }
    let pid = pid.ok_or(Failure::NotFound)?;
    let value = crate::rest::wire::read_json(st, h, body).await?;
    let value = crate::rest::wire::parameters(&value)?;
    let reason = crate::rest::wire::reason(value, MAX_REASON)?;
    let purpose = match crate::rest::wire::param(value, "purpose") {
        None => "ETREAT",
        Some(p) => {
            let code = p
                .get("valueCode")
                .or_else(|| p.pointer("/valueCoding/code"))
                .and_then(Value::as_str)
                .unwrap_or("");
            PURPOSES
                .iter()
                .find(|c| **c == code)
                .copied()
                .ok_or_else(|| {
                    Failure::bad_request(format!(
                        "purpose must be one of {} (HL7 v3 ActReason)",
                        PURPOSES.join(", ")
                    ))
                })?
        }
    };
    let (id, expires) =
        crate::access::break_glass::issue(&st.gate, ctx, pid, reason, purpose).await?;
    tracing::warn!(request_id = %ctx.request_id(), grant = %id, "break-the-glass grant issued");
    let out = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "grant", "valueString": id},
            {"name": "expires", "valueInstant": crate::base::clock::format_instant(expires)},
            {"name": "purpose", "valueCode": purpose},
        ],
    });
    Ok(crate::rest::wire::fhir_json(StatusCode::OK, &out))
}
