//! Shared request plumbing of the sign-in: cookies, form parsing, the
//! pending-stage cookie and its CSRF token, redirects back to the app,
//! the audit helper, and the types a sign-in carries between stages.

use crate::authn::signin::pages::error_page;
use crate::data::accounts::User;
use crate::data::grants::{Kind, Taken};
use crate::state::AppState;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome, UserRef};
use serde::{Deserialize, Serialize};
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

/// Parse a form or query string; a repeated or oversized parameter is an
/// error (parameter pollution).
pub(super) fn params(raw: &[u8]) -> Result<HashMap<String, String>, &'static str> {
    parse_form(raw, MAX_PARAM)
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

/// Record a sign-in or account event in the audit log. Fails closed: when
/// the record cannot be written the caller answers with this error page
/// instead of completing the step.
#[allow(clippy::too_many_arguments)]
pub(super) async fn audit_auth(
    st: &AppState,
    ext: &axum::http::Extensions,
    kind: EventKind,
    action: Action,
    outcome: Outcome,
    detail: impl Into<String>,
    user: Option<&User>,
    client: Option<&str>,
) -> Result<(), Response> {
    if outcome != Outcome::Success {
        st.metrics.auth_failure(match kind {
            EventKind::Login => "login",
            EventKind::Security("mfa") => "mfa",
            _ => "other",
        });
    }
    let e = crate::audit::log::AuthEvent {
        kind,
        action,
        outcome,
        detail: detail.into(),
        user: user.map(|u| UserRef {
            id: u.id().to_owned(),
            role: u.rec.role.clone(),
        }),
        client: client.map(str::to_owned),
        ip: peer_ip(ext),
    };
    st.audit.record_auth(e).await.map_err(|e| {
        let rid = crate::base::request::request_id().unwrap_or_default();
        tracing::error!(request_id = %rid, error = %e, "audit record not written; sign-in step refused");
        error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is unavailable right now. Try again in a few minutes.",
        )
    })
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

pub(super) fn redirect_error(req: &AuthzRequest, error: &str, desc: &str) -> Response {
    let mut p = vec![("error", error), ("error_description", desc)];
    if !req.state.is_empty() {
        p.push(("state", req.state.as_str()));
    }
    redirect_to(&req.redirect_uri, &p)
}

pub(super) fn internal(e: impl std::fmt::Display) -> Response {
    let rid = crate::base::request::request_id().unwrap_or_default();
    tracing::error!(request_id = %rid, error = %e, "sign-in failed internally");
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in is temporarily unavailable. Try again shortly.",
    )
}

/// Start a stage: a new sign-in cookie (and CSRF token) per stage.
pub(super) async fn new_pending(
    st: &AppState,
    p: &Pending,
    now: i64,
) -> Result<(String, String), Response> {
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
        .map_err(internal)?;
    let c = cookie(PENDING_COOKIE, &secret, "Strict", PENDING_TTL);
    Ok((st.grants.csrf(&secret), c))
}

/// The current stage from the sign-in cookie, checked against the form's
/// CSRF token, and consumed (each stage's cookie works once).
pub(super) async fn take_pending(
    st: &AppState,
    h: &HeaderMap,
    form: &HashMap<String, String>,
    now: i64,
) -> Result<Pending, Response> {
    let expired = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "This sign-in has expired or was already used. Go back to the app and start again.",
        )
    };
    let Some(secret) = get_cookie(h, PENDING_COOKIE) else {
        return Err(expired());
    };
    let csrf = form.get("csrf").map(String::as_str).unwrap_or("");
    if !st.grants.csrf_ok(secret, csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "The form could not be verified. Go back to the app and start again.",
        ));
    }
    match st.grants.take::<Pending>(Kind::Pending, secret, now).await {
        Ok(Taken::Fresh(_, p)) => Ok(p),
        Ok(_) => Err(expired()),
        Err(e) => Err(internal(e)),
    }
}

pub(super) fn mfa_required(st: &AppState, user: &User) -> bool {
    !st.config.auth.mfa_optional_roles.contains(&user.rec.role)
}

/// Does this user's role require user verification (PIN, biometric) on
/// passkeys?
pub(super) fn uv_required(st: &AppState, user: &User) -> bool {
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
}
