//! Shared request plumbing of the sign-in: cookies, form parsing, the
//! pending-stage cookie and its CSRF token, redirects back to the app,
//! the audit helper, and the types a sign-in carries between stages.

use crate::authn::signin::pages::error_page;
use crate::data::accounts::{Status, User};
use crate::data::grants::{Kind, Taken};
use crate::state::AuthnState;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome, UserRef};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;

pub const PENDING_COOKIE: &str = "__Host-phylax-signin";

pub const SESSION_COOKIE: &str = "__Host-phylax-session";

/// Time allowed to finish a sign-in.
pub(super) const PENDING_TTL: i64 = 15 * 60;

/// Authorization codes are redeemed at once by real clients.
pub const CODE_TTL: i64 = 60;

/// Largest form or query string the auth endpoints accept.
pub(crate) const MAX_FORM: usize = 16 * 1024;

/// Longest single value on the sign-in pages (a token endpoint's client
/// assertion may be longer: it uses the whole form limit).
pub(super) const MAX_PARAM: usize = 2048;

pub(super) const BAD_LOGIN: &str =
    "The username or password is not right, or this account cannot sign in now.";

/// The authorization request, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthzRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub state: String,
    pub scope: String,
    pub challenge: String,
    #[serde(default)]
    pub nonce: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Stage {
    Password,
    /// Second factor; `passkey` holds the WebAuthn ceremony offered on the
    /// page (if the user has passkeys).
    Mfa {
        #[serde(default)]
        passkey: Option<Vec<u8>>,
    },
    /// Enrollment: a TOTP secret on offer, and a passkey registration
    /// ceremony.
    EnrollTotp {
        secret: String,
        #[serde(default)]
        passkey: Option<Vec<u8>>,
    },
    /// Waiting for "Continue" after recovery codes were shown.
    Continue,
    Consent {
        granted: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Pending {
    pub(super) req: AuthzRequest,
    pub(super) stage: Stage,
    pub(super) user_id: Option<String>,
    pub(super) amr: Vec<String>,
    pub(super) auth_time: Option<i64>,
    /// Resumed from an existing session (no new sign-in happened).
    #[serde(default)]
    pub(super) resumed: bool,
}

/// A signed-in browser session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub user_id: String,
    pub auth_time: i64,
    pub amr: Vec<String>,
    pub absolute: i64,
}

/// What an authorization code stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodeDetails {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub challenge: String,
    pub user_id: String,
    pub patient: Option<String>,
    pub auth_time: i64,
    pub amr: Vec<String>,
    pub nonce: Option<String>,
    pub offer_patient: bool,
}

pub(super) fn cookie(name: &str, value: &str, same_site: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={max_age}")
}

pub(super) fn clear_cookie(name: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

pub(super) fn get_cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(super) fn add_cookies(r: &mut Response, cookies: &[String]) {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
}

/// A parsed form or query string.
pub(super) type Form = HashMap<String, String>;

/// Parse a form or query string; a repeated or oversized parameter is an
/// error (parameter pollution).
pub(super) fn params(raw: &[u8]) -> Result<Form, &'static str> {
    parse_form(raw, MAX_PARAM)
}

/// [`params`], refused with a 400 page.
pub(super) fn form(raw: &[u8]) -> Result<Form, SigninError> {
    params(raw).map_err(SigninError::bad_request)
}

/// A form value; missing is empty.
pub(super) fn value<'a>(form: &'a Form, key: &str) -> &'a str {
    form.get(key).map(String::as_str).unwrap_or("")
}

/// Parse an auth endpoint's form: at most [`MAX_FORM`] bytes, values at
/// most `max_value` bytes, no parameter twice.
pub(crate) fn parse_form(
    raw: &[u8],
    max_value: usize,
) -> Result<HashMap<String, String>, &'static str> {
    if raw.len() > MAX_FORM {
        return Err("request too large");
    }
    let mut m = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw) {
        if v.len() > max_value {
            return Err("a parameter is too long");
        }
        if m.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err("a parameter is repeated");
        }
    }
    Ok(m)
}

pub(super) fn peer_ip(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

pub(super) fn peer(ext: &axum::http::Extensions) -> String {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Why a sign-in step stops. Each variant is the answer the browser gets
/// (an error page with its status, or a redirect back to the app), so the
/// handlers return `Result<Response, SigninError>` and use `?`.
#[derive(Debug, thiserror::Error)]
pub enum SigninError {
    /// An error page with this status and message.
    #[error("{message}")]
    Page {
        status: StatusCode,
        message: Cow<'static, str>,
    },
    /// The sign-in cookie is missing, expired or was already used.
    #[error("the sign-in has expired or was already used")]
    Expired,
    /// The form's CSRF token does not match the sign-in cookie.
    #[error("the form could not be verified")]
    Unverified,
    /// A form posted at a stage the sign-in is not at.
    #[error("unexpected sign-in step")]
    UnexpectedStep,
    /// The user cannot sign in now: one answer for every reason, so the
    /// page tells nothing about the account.
    #[error("sign-in refused")]
    Refused,
    /// The application is unknown or disabled.
    #[error("unknown or disabled application")]
    UnknownClient,
    /// An error the app is told through its registered (already checked)
    /// redirect URI.
    #[error("{error}: {description}")]
    Redirect {
        redirect_uri: String,
        state: String,
        error: &'static str,
        description: &'static str,
    },
    /// The audit record could not be written: the step is refused (fail
    /// closed). Logged when made.
    #[error("audit record not written")]
    AuditUnavailable,
    /// Storage, keys or the like failed. Logged when made.
    #[error("sign-in failed internally: {0}")]
    Internal(String),
}

impl SigninError {
    /// An error page with this status and message.
    pub(super) fn page(status: StatusCode, message: impl Into<Cow<'static, str>>) -> SigninError {
        SigninError::Page {
            status,
            message: message.into(),
        }
    }

    /// A 400 page: a malformed request.
    pub(super) fn bad_request(message: &'static str) -> SigninError {
        SigninError::page(StatusCode::BAD_REQUEST, message)
    }

    /// An internal failure, logged here (with the request id) before the
    /// browser gets the 503 page.
    pub(super) fn internal(e: impl std::fmt::Display) -> SigninError {
        let rid = crate::base::request::request_id().unwrap_or_default();
        tracing::error!(request_id = %rid, error = %e, "sign-in failed internally");
        SigninError::Internal(e.to_string())
    }

    /// An error sent back to the app that made `req`.
    pub(super) fn redirect(
        req: &AuthzRequest,
        error: &'static str,
        description: &'static str,
    ) -> SigninError {
        SigninError::Redirect {
            redirect_uri: req.redirect_uri.clone(),
            state: req.state.clone(),
            error,
            description,
        }
    }
}

impl IntoResponse for SigninError {
    fn into_response(self) -> Response {
        let (status, message): (StatusCode, Cow<'static, str>) = match self {
            SigninError::Redirect {
                redirect_uri,
                state,
                error,
                description,
            } => return redirect_error_to(&redirect_uri, &state, error, description),
            SigninError::Page { status, message } => (status, message),
            SigninError::Expired => (
                StatusCode::BAD_REQUEST,
                "This sign-in has expired or was already used. Go back to the app and start again."
                    .into(),
            ),
            SigninError::Unverified => (
                StatusCode::FORBIDDEN,
                "The form could not be verified. Go back to the app and start again.".into(),
            ),
            SigninError::UnexpectedStep => (
                StatusCode::BAD_REQUEST,
                "Unexpected step; start again from the app.".into(),
            ),
            SigninError::Refused => (StatusCode::UNAUTHORIZED, BAD_LOGIN.into()),
            SigninError::UnknownClient => (
                StatusCode::BAD_REQUEST,
                "Unknown or disabled application.".into(),
            ),
            SigninError::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in is unavailable right now. Try again in a few minutes.".into(),
            ),
            SigninError::Internal(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in is temporarily unavailable. Try again shortly.".into(),
            ),
        };
        error_page(status, &message).into_response()
    }
}

/// A sign-in or account event for the audit log:
/// `AuthAudit::new(kind, action).outcome(..).detail(..).user(..).client(..)
/// .record(st, ext).await?`. The outcome is success unless set. Recording
/// fails closed: when the record cannot be written the step is refused
/// with [`SigninError::AuditUnavailable`] instead of completing.
#[derive(Debug)]
#[must_use = "an audit event does nothing until recorded"]
pub(super) struct AuthAudit<'a> {
    kind: EventKind,
    action: Action,
    outcome: Outcome,
    detail: String,
    user: Option<&'a User>,
    client: Option<&'a str>,
}

impl<'a> AuthAudit<'a> {
    pub(super) fn new(kind: EventKind, action: Action) -> AuthAudit<'a> {
        AuthAudit {
            kind,
            action,
            outcome: Outcome::Success,
            detail: String::new(),
            user: None,
            client: None,
        }
    }

    pub(super) fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub(super) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// The user the event is about (`None`: unknown).
    pub(super) fn user(mut self, user: impl Into<Option<&'a User>>) -> Self {
        self.user = user.into();
        self
    }

    /// The application the sign-in is for.
    pub(super) fn client(mut self, client: &'a str) -> Self {
        self.client = Some(client);
        self
    }

    /// Count a failure in the metrics and write the record.
    pub(super) async fn record(
        self,
        st: &AuthnState,
        ext: &axum::http::Extensions,
    ) -> Result<(), SigninError> {
        if self.outcome != Outcome::Success {
            st.metrics.auth_failure(match self.kind {
                EventKind::Login => "login",
                EventKind::Security("mfa") => "mfa",
                _ => "other",
            });
        }
        let e = crate::audit::log::AuthEvent {
            kind: self.kind,
            action: self.action,
            outcome: self.outcome,
            detail: self.detail,
            user: self.user.map(|u| UserRef {
                id: u.id().to_owned(),
                role: u.rec.role.clone(),
            }),
            client: self.client.map(str::to_owned),
            ip: peer_ip(ext),
        };
        st.audit.record_auth(e).await.map_err(|e| {
            let rid = crate::base::request::request_id().unwrap_or_default();
            tracing::error!(request_id = %rid, error = %e, "audit record not written; sign-in step refused");
            SigninError::AuditUnavailable
        })
    }
}

/// Build the redirect back to the app with `params` (already validated
/// redirect URI; values percent-encoded).
pub(super) fn redirect_to(uri: &str, params: &[(&str, &str)]) -> Response {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    let loc = format!("{uri}{sep}{}", q.finish());
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// An OAuth error back to the app (`state` only when the app sent one).
pub(super) fn redirect_error(req: &AuthzRequest, error: &str, desc: &str) -> Response {
    redirect_error_to(&req.redirect_uri, &req.state, error, desc)
}

fn redirect_error_to(uri: &str, state: &str, error: &str, desc: &str) -> Response {
    let mut p = vec![("error", error), ("error_description", desc)];
    if !state.is_empty() {
        p.push(("state", state));
    }
    redirect_to(uri, &p)
}

/// Start a stage: a new sign-in cookie (and CSRF token) per stage.
pub(super) async fn new_pending(
    st: &AuthnState,
    p: &Pending,
    now: i64,
) -> Result<(String, String), SigninError> {
    let secret = st
        .grants
        .create(
            Kind::Pending,
            "signin",
            p.user_id.as_deref().unwrap_or(""),
            p,
            now + PENDING_TTL,
            now,
        )
        .await
        .map_err(SigninError::internal)?;
    let c = cookie(PENDING_COOKIE, &secret, "Strict", PENDING_TTL);
    Ok((st.grants.csrf(&secret), c))
}

/// The current stage from the sign-in cookie, checked against the form's
/// CSRF token, and consumed (each stage's cookie works once).
pub(super) async fn take_pending(
    st: &AuthnState,
    h: &HeaderMap,
    form: &Form,
    now: i64,
) -> Result<Pending, SigninError> {
    let secret = get_cookie(h, PENDING_COOKIE).ok_or(SigninError::Expired)?;
    if !st.grants.csrf_ok(secret, value(form, "csrf")) {
        return Err(SigninError::Unverified);
    }
    match st.grants.take::<Pending>(Kind::Pending, secret, now).await {
        Ok(Taken::Fresh(_, p)) => Ok(p),
        Ok(_) => Err(SigninError::Expired),
        Err(e) => Err(SigninError::internal(e)),
    }
}

/// The user a sign-in stage is for, still active (anything else gets the
/// same refusal as a wrong password).
pub(super) async fn active_user(st: &AuthnState, id: &str) -> Result<User, SigninError> {
    match st.accounts.load(id).await {
        Ok(Some(u)) if u.status() == Some(Status::Active) => Ok(u),
        Ok(_) => Err(SigninError::Refused),
        Err(e) => Err(SigninError::internal(e)),
    }
}

pub(super) fn mfa_required(st: &AuthnState, user: &User) -> bool {
    !st.config.auth.mfa_optional_roles.contains(&user.rec.role)
}

/// Does this user's role require user verification (PIN, biometric) on
/// passkeys?
pub(super) fn uv_required(st: &AuthnState, user: &User) -> bool {
    st.config.auth.uv_required_roles.contains(&user.rec.role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(params(b"a=1&a=2").is_err());
        assert_eq!(params(b"a=1&b=%20").unwrap()["b"], " ");
    }

    async fn rendered(e: SigninError) -> (StatusCode, Option<String>, String) {
        let r = e.into_response();
        let status = r.status();
        let location = r
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        (
            status,
            location,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn errors_render_their_pages_and_redirects() {
        let cases = [
            (SigninError::Expired, 400, "has expired or was already used"),
            (
                SigninError::Unverified,
                403,
                "The form could not be verified. Go back",
            ),
            (
                SigninError::UnexpectedStep,
                400,
                "Unexpected step; start again",
            ),
            (SigninError::Refused, 401, BAD_LOGIN),
            (
                SigninError::UnknownClient,
                400,
                "Unknown or disabled application.",
            ),
            (SigninError::AuditUnavailable, 503, "unavailable right now"),
            (
                SigninError::internal("disk on fire"),
                503,
                "temporarily unavailable",
            ),
            (
                SigninError::page(StatusCode::UNAUTHORIZED, "Sign in <first>."),
                401,
                "<p>Sign in &lt;first&gt;.</p>",
            ),
        ];
        for (e, status, text) in cases {
            let (s, location, body) = rendered(e).await;
            assert_eq!(s.as_u16(), status, "{body}");
            assert!(location.is_none());
            assert!(body.contains(text), "{body}");
            assert!(
                !body.contains("disk on fire"),
                "internal details stay in the log"
            );
        }
        let req = AuthzRequest {
            client_id: "app".into(),
            redirect_uri: "https://app.example/cb?x=1".into(),
            state: "s 1".into(),
            scope: String::new(),
            challenge: String::new(),
            nonce: None,
        };
        let (s, location, _) = rendered(SigninError::redirect(
            &req,
            "invalid_request",
            "state is required",
        ))
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        assert_eq!(
            location.as_deref(),
            Some("https://app.example/cb?x=1&error=invalid_request&error_description=state+is+required&state=s+1")
        );
    }
}
