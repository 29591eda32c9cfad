//! The HTTP face of a [`Failure`]: each maps to an HTTP status and an
//! OperationOutcome that is safe to show: messages are fixed strings written
//! here or validation messages that name element paths, never stored data,
//! SQL, file paths or key ids. Server-side causes are logged once, here,
//! with the request id. This is the only place failures become statuses.

use crate::base::error::Failure;
use crate::base::request::request_id;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_fhir::{Issue, IssueCode, OperationOutcome};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::Unauthorized => StatusCode::UNAUTHORIZED,
            Failure::Forbidden | Failure::Refused(_) | Failure::Declined(_) | Failure::Masked => {
                StatusCode::FORBIDDEN
            }
            Failure::NotFound | Failure::Hidden(_) | Failure::UnknownType => StatusCode::NOT_FOUND,
            Failure::Gone => StatusCode::GONE,
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Failure::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Failure::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Failure::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            Failure::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Failure::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Failure::Conflict => StatusCode::CONFLICT,
            Failure::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Internal(_) | Failure::Integrity(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn outcome(&self) -> OperationOutcome {
        let one = |code, msg: &str| OperationOutcome::single(Issue::error(code, msg));
        match self {
            Failure::Unauthorized => one(
                IssueCode::Login,
                "authentication required: a valid bearer token is needed",
            ),
            Failure::Forbidden => one(IssueCode::Forbidden, "not permitted by the granted scopes"),
            Failure::NotFound | Failure::Hidden(_) => {
                one(IssueCode::NotFound, "resource not found")
            }
            Failure::Masked => one(
                IssueCode::Forbidden,
                "your role does not receive this element, so it cannot search or sort on it",
            ),
            Failure::Refused("held-relationships") => one(
                IssueCode::Forbidden,
                "not permitted: this record's care relationships were stored before the \
                 relationships permission existed and are held until an operator approves \
                 them; until then only a holder of the relationships permission may change it",
            ),
            Failure::Refused(r) if r.starts_with("relationships") => one(
                IssueCode::Forbidden,
                "not permitted: changing who reaches whom (care teams, practitioner roles, \
                 encounter participants, a patient's GP or organization, consents, groups, \
                 related persons) needs the relationships permission",
            ),
            Failure::Refused(_) => one(
                IssueCode::Forbidden,
                "not permitted: the resource concerns a patient outside your access",
            ),
            Failure::Declined(r) => one(IssueCode::Forbidden, &format!("not permitted: {r}")),
            Failure::UnknownType => {
                one(IssueCode::NotSupported, "unknown resource type or endpoint")
            }
            Failure::Gone => one(IssueCode::Deleted, "resource has been deleted"),
            Failure::BadRequest(is) | Failure::Unprocessable(is) => {
                OperationOutcome { issues: is.clone() }
            }
            Failure::PayloadTooLarge(n) => one(
                IssueCode::TooLong,
                &format!("request body exceeds the limit of {n} bytes"),
            ),
            Failure::TooManyRequests(secs) => one(
                IssueCode::Throttled,
                &format!("too many requests; try again in {secs} s"),
            ),
            Failure::RequestTimeout => one(
                IssueCode::Timeout,
                "the request body did not arrive in time; send it again",
            ),
            Failure::UnsupportedMediaType => one(
                IssueCode::NotSupported,
                "send application/fhir+json (or application/json)",
            ),
            Failure::NotAcceptable => one(
                IssueCode::NotSupported,
                "only application/fhir+json is available",
            ),
            Failure::MethodNotAllowed(m) => one(IssueCode::NotSupported, m),
            Failure::PreconditionFailed => one(
                IssueCode::Conflict,
                "version conflict: If-Match does not match the current version",
            ),
            Failure::Conflict => one(IssueCode::Conflict, "concurrent modification; retry"),
            Failure::NotImplemented(m) => one(IssueCode::NotSupported, m),
            Failure::Unavailable(_) => one(
                IssueCode::Transient,
                "service temporarily unavailable; retry later",
            ),
            Failure::Internal(_) => one(IssueCode::Exception, "internal error"),
            Failure::Integrity(_) => one(
                IssueCode::Exception,
                "stored data failed an integrity check; the request was refused",
            ),
        }
    }
}

/// Build an OperationOutcome response for `status` with one issue.
pub fn outcome_response(status: StatusCode, oo: &OperationOutcome) -> Response {
    let rid = request_id();
    let body = oo.to_json(rid.as_deref()).to_string();
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let rid = request_id().unwrap_or_default();
        match &self {
            Failure::Unavailable(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "service unavailable")
            }
            Failure::Internal(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "internal error")
            }
            Failure::Integrity(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "INTEGRITY FAILURE: a stored record failed authentication")
            }
            _ => {}
        }
        let mut r = outcome_response(self.status(), &self.outcome());
        if let Failure::TooManyRequests(secs) = self {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if matches!(self, Failure::Unauthorized) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"phylax\", error=\"invalid_token\""),
            );
        }
        r
    }
}

/// Any error response that is not already JSON (axum's own 405s, extractor
/// rejections) becomes an OperationOutcome, so clients always get FHIR.
pub async fn normalize_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    // JSON (FHIR, OAuth errors) and the sign-in pages' HTML are already
    // meant for their readers.
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json") || v.starts_with("text/html"));
    if is_json {
        return resp;
    }
    let (code, msg) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            IssueCode::NotSupported,
            "method not allowed on this endpoint",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (IssueCode::TooLong, "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (IssueCode::NotSupported, "unsupported media type"),
        s if s.is_server_error() => (IssueCode::Exception, "internal error"),
        _ => (IssueCode::Invalid, "the request could not be processed"),
    };
    let mut out = outcome_response(status, &OperationOutcome::single(Issue::error(code, msg)));
    for k in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = resp.headers().get(&k) {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}
