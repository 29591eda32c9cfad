//! Why a request failed, in terms every layer shares. Domain code (search
//! planning, access decisions, the repository's callers) returns these; only
//! the REST layer ([`crate::rest::error`]) turns one into an HTTP status and
//! an OperationOutcome.

use phylax_fhir::{Issue, IssueCode};

#[derive(Debug)]
pub enum Failure {
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

impl Failure {
    pub fn bad_request(msg: impl Into<String>) -> Failure {
        Failure::BadRequest(vec![Issue::error(IssueCode::Invalid, msg)])
    }

    /// The access rule behind a refusal, for the audit record.
    pub fn denied_by(&self) -> Option<&'static str> {
        match self {
            Failure::Hidden(r) | Failure::Refused(r) | Failure::Declined(r) => Some(r),
            Failure::Masked => Some("mask: search or sort on a masked element"),
            _ => None,
        }
    }
}
