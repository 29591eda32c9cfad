//! API errors. Each maps to an HTTP status and an OperationOutcome that is
//! safe to show: messages are fixed strings written here or validation
//! messages that name element paths, never stored data, SQL, file paths or
//! key ids. Server-side causes are logged once, here, with the request id.

use crate::data::repo::RepoError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_fhir::{Issue, IssueCode, OperationOutcome};

tokio::task_local! {
    /// The current request's id, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The current request id, if inside a request.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|r| r.clone()).ok()
}

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    Forbidden,
    NotFound,
    /// A resource exists but is outside the caller's reach (another
    /// patient, a restricted label): answered exactly like `NotFound`, so
    /// ids cannot be probed. The rule goes to the audit record only.
    Hidden(&'static str),
    /// A write the type-level grant allows, on data outside the caller's
    /// reach (the rule goes to the audit record).
    Refused(&'static str),
    /// The caller's access as a whole is refused (care relationships over
    /// `access.max_reach`, more consent denials than a query can carry, a
    /// role that may not break the glass). The reason is fixed text about
    /// the caller, not about any resource, so the OperationOutcome states it
    /// too: the caller (or their administrator) can act on it.
    Declined(&'static str),
    /// A search or sort on an element the caller's role masks.
    Masked,
    UnknownType,
    Gone,
    BadRequest(Vec<Issue>),
    Unprocessable(Vec<Issue>),
    PayloadTooLarge(usize),
    /// The request body did not arrive within `http.body_timeout_secs`.
    RequestTimeout,
    /// Over a rate limit (`[rate]`); retry after this many seconds.
    TooManyRequests(u64),
    UnsupportedMediaType,
    NotAcceptable,
    MethodNotAllowed(&'static str),
    PreconditionFailed,
    Conflict,
    NotImplemented(&'static str),
    /// The backend or a dependency is down; the cause is logged.
    Unavailable(String),
    /// A bug or unexpected failure; the cause is logged.
    Internal(String),
    /// A stored record failed authentication; the cause is logged.
    Integrity(String),
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(vec![Issue::error(IssueCode::Invalid, msg)])
    }

    /// The access rule behind a refusal, for the audit record.
    pub fn denied_by(&self) -> Option<&'static str> {
        match self {
            ApiError::Hidden(r) | ApiError::Refused(r) | ApiError::Declined(r) => Some(r),
            ApiError::Masked => Some("mask: search or sort on a masked element"),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden
            | ApiError::Refused(_)
            | ApiError::Declined(_)
            | ApiError::Masked => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::Hidden(_) | ApiError::UnknownType => {
                StatusCode::NOT_FOUND
            }
            ApiError::Gone => StatusCode::GONE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) | ApiError::Integrity(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn outcome(&self) -> OperationOutcome {
        let one = |code, msg: &str| OperationOutcome::single(Issue::error(code, msg));
        match self {
            ApiError::Unauthorized => one(
                IssueCode::Login,
                "authentication required: a valid bearer token is needed",
            ),
            ApiError::Forbidden => one(IssueCode::Forbidden, "not permitted by the granted scopes"),
            ApiError::NotFound | ApiError::Hidden(_) => {
                one(IssueCode::NotFound, "resource not found")
            }
            ApiError::Masked => one(
                IssueCode::Forbidden,
                "your role does not receive this element, so it cannot search or sort on it",
            ),
            ApiError::Refused(r) if r.starts_with("relationships") => one(
                IssueCode::Forbidden,
                "not permitted: changing who reaches whom (care teams, practitioner roles, \
                 encounter participants, a patient's GP or organization, consents, groups, \
                 related persons) needs the relationships permission",
            ),
            ApiError::Refused(_) => one(
                IssueCode::Forbidden,
                "not permitted: the resource concerns a patient outside your access",
            ),
            ApiError::Declined(r) => one(IssueCode::Forbidden, &format!("not permitted: {r}")),
            ApiError::UnknownType => {
                one(IssueCode::NotSupported, "unknown resource type or endpoint")
            }
            ApiError::Gone => one(IssueCode::Deleted, "resource has been deleted"),
            ApiError::BadRequest(is) | ApiError::Unprocessable(is) => {
                OperationOutcome { issues: is.clone() }
            }
            ApiError::PayloadTooLarge(n) => one(
                IssueCode::TooLong,
                &format!("request body exceeds the limit of {n} bytes"),
            ),
            ApiError::TooManyRequests(secs) => one(
                IssueCode::Throttled,
                &format!("too many requests; try again in {secs} s"),
            ),
            ApiError::RequestTimeout => one(
                IssueCode::Timeout,
                "the request body did not arrive in time; send it again",
            ),
            ApiError::UnsupportedMediaType => one(
                IssueCode::NotSupported,
                "send application/fhir+json (or application/json)",
            ),
            ApiError::NotAcceptable => one(
                IssueCode::NotSupported,
                "only application/fhir+json is available",
            ),
            ApiError::MethodNotAllowed(m) => one(IssueCode::NotSupported, m),
            ApiError::PreconditionFailed => one(
                IssueCode::Conflict,
                "version conflict: If-Match does not match the current version",
            ),
            ApiError::Conflict => one(IssueCode::Conflict, "concurrent modification; retry"),
            ApiError::NotImplemented(m) => one(IssueCode::NotSupported, m),
            ApiError::Unavailable(_) => one(
                IssueCode::Transient,
                "service temporarily unavailable; retry later",
            ),
            ApiError::Internal(_) => one(IssueCode::Exception, "internal error"),
            ApiError::Integrity(_) => one(
                IssueCode::Exception,
                "stored data failed an integrity check; the request was refused",
            ),
        }
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound => ApiError::NotFound,
            RepoError::Gone(_) => ApiError::Gone,
            RepoError::VersionMismatch => ApiError::PreconditionFailed,
            RepoError::CreateViaUpdateDisabled => {
                ApiError::MethodNotAllowed("update-as-create is not allowed on this server")
            }
            RepoError::Conflict => ApiError::Conflict,
            RepoError::Denied { hidden: true, rule } => ApiError::Hidden(rule),
            RepoError::Denied {
                hidden: false,
                rule,
            } => ApiError::Refused(rule),
            e @ RepoError::Integrity { .. } => ApiError::Integrity(e.to_string()),
            RepoError::Store(phylax_store::StoreError::Unavailable(c)) => ApiError::Unavailable(c),
            other => ApiError::Internal(other.to_string()),
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rid = request_id().unwrap_or_default();
        match &self {
            ApiError::Unavailable(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "service unavailable")
            }
            ApiError::Internal(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "internal error")
            }
            ApiError::Integrity(cause) => {
                tracing::error!(request_id = %rid, cause = %cause, "INTEGRITY FAILURE: a stored record failed authentication")
            }
            _ => {}
        }
        let mut r = outcome_response(self.status(), &self.outcome());
        if let ApiError::TooManyRequests(secs) = self {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if matches!(self, ApiError::Unauthorized) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"phylax\", error=\"invalid_token\""),
            );
        }
        r
    }
}
