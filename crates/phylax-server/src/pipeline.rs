//! The one pipeline every FHIR interaction passes through.
//!
//! Authentication happens in the bearer-token middleware, which attaches a
//! [`RequestCtx`]. Handlers describe what they are about to do as an
//! [`Interaction`] and hand their work to [`run`], which
//! 1. asks the policy ([`phylax_auth::policy::decide`]) — deny by default;
//! 2. runs the work only if allowed;
//! 3. writes the audit record of the outcome through the [`AuditSink`], and
//!    only if that succeeds releases the response: when the audit record
//!    cannot be written, the client gets 503 and no data (fail closed).
//!
//! Later capabilities (roles, compartments, consent, the tamper-evident
//! audit log) plug in here, not in the handlers.
//!
//! Ordering today: a write commits before its audit record is written, so
//! if the sink fails the client gets 503 although the write is stored (no
//! data leaves, but a retry may duplicate a create). The foundation's log
//! sink cannot fail; the durable audit log must commit the record in the
//! write's own transaction.

use crate::error::ApiError;
use crate::http::AppState;
use axum::response::{IntoResponse, Response};
use phylax_auth::policy::{decide_instance, Decision, Interaction, Principal};
use phylax_fhir::ResourceType;
use std::future::Future;
use std::net::IpAddr;

/// Who is calling, attached by the authentication middleware.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub principal: Principal,
    pub peer: Option<IpAddr>,
}

/// What the audit sink is told about each interaction. References only:
/// no resource content ever reaches it.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub request_id: String,
    pub time_ms: i64,
    pub agent: String,
    pub token_id: String,
    pub peer: Option<IpAddr>,
    pub interaction: &'static str,
    pub resource_type: Option<&'static str>,
    pub resource_id: Option<String>,
    pub status: u16,
    /// The policy rule that denied, if denied.
    pub denied_by: Option<&'static str>,
}

/// Attached to a response by a handler that learned the resource id only
/// while working (a create), so the audit record names it.
#[derive(Debug, Clone)]
pub struct AuditRef(pub String);

#[derive(Debug, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(pub String);

/// Where audit records go. Must be durable when `record` returns `Ok`.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    fn record(&self, rec: &AuditRecord) -> Result<(), AuditError>;
}

/// The foundation's sink: one structured log line per interaction under the
/// `phylax::audit` target. The tamper-evident AuditEvent log replaces it.
#[derive(Debug, Default)]
pub struct LogAuditSink;

impl AuditSink for LogAuditSink {
    fn record(&self, r: &AuditRecord) -> Result<(), AuditError> {
        tracing::info!(
            target: "phylax::audit",
            request_id = %r.request_id,
            agent = %r.agent,
            token_id = %r.token_id,
            peer = ?r.peer,
            interaction = r.interaction,
            resource_type = r.resource_type.unwrap_or("-"),
            resource_id = r.resource_id.as_deref().unwrap_or("-"),
            status = r.status,
            denied_by = r.denied_by.unwrap_or("-"),
            "audit"
        );
        Ok(())
    }
}

/// Write one audit record for an interaction the caller decided and ran
/// itself (the entries of a transaction). `Err` means the record could not
/// be written and the response must not be released.
pub fn record(
    st: &AppState,
    ctx: &RequestCtx,
    interaction: &'static str,
    rtype: Option<&'static str>,
    resource_id: Option<String>,
    status: u16,
    denied_by: Option<&'static str>,
) -> Result<(), ApiError> {
    // A user acting through an app is recorded as `user:{id}` (the app is
    // in the token); a backend client as its client id.
    let (agent, token_id) = match &ctx.principal {
        Principal::Client {
            client_id,
            token_id,
            ..
        } => (client_id.clone(), token_id.clone()),
        Principal::User {
            user_id, token_id, ..
        } => (format!("user:{user_id}"), token_id.clone()),
    };
    let rec = AuditRecord {
        request_id: ctx.request_id.clone(),
        time_ms: crate::now_ms(),
        agent,
        token_id,
        peer: ctx.peer,
        interaction,
        resource_type: rtype,
        resource_id,
        status,
        denied_by,
    };
    st.audit
        .record(&rec)
        .map_err(|e| ApiError::Unavailable(e.to_string()))
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
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let decision = decide_instance(&ctx.principal, what, rtype.map(ResourceType::as_str), id);
    let (result, denied_by) = match decision {
        Decision::Allow => (work().await, None),
        Decision::Deny(rule) => (Err(ApiError::Forbidden), Some(rule)),
    };
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    let learned_id = result
        .as_ref()
        .ok()
        .and_then(|r| r.extensions().get::<AuditRef>())
        .map(|a| a.0.clone());
    // A requested id is recorded only when the resource was found to
    // exist: a failed request's id is client-chosen text and may be
    // anything, including a name typed into a URL.
    let resource_id = if matches!(status, 200..=299 | 410 | 412) {
        id.map(str::to_owned).or(learned_id)
    } else {
        None
    };
    if let Err(e) = record(
        st,
        ctx,
        what.as_str(),
        rtype.map(ResourceType::as_str),
        resource_id,
        status,
        denied_by,
    ) {
        // Fail closed: whatever the work produced is dropped unsent.
        return e.into_response();
    }
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
