//! The SMART Backend Services token endpoint and discovery document.
//!
//! Errors follow RFC 6749 §5.2 and never say which check failed: an unknown
//! client, a disabled client, a bad signature, a replayed `jti` and an
//! expired assertion all answer `invalid_client`. The reason is logged.

use crate::config::Config;
use crate::http::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_auth::assertion::{self, peek_issuer};
use phylax_auth::{AuthError, ScopeSet};
use serde_json::{json, Value};
use std::sync::Arc;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const MAX_FORM: usize = 16 * 1024;

pub fn smart_configuration(cfg: &Config) -> Value {
    json!({
        "issuer": format!("{}/auth", cfg.public_url),
        "token_endpoint": cfg.token_url(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
        "response_types_supported": [],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    })
}

pub async fn smart_config(State(st): State<Arc<AppState>>) -> Response {
    let mut r = (StatusCode::OK, st.smart_config.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn oauth_error(e: &AuthError) -> Response {
    let rid = crate::error::request_id().unwrap_or_default();
    tracing::info!(request_id = %rid, reason = %e, "token request refused");
    let (status, desc) = match e {
        AuthError::InvalidClient(_) | AuthError::InvalidToken(_) => {
            (StatusCode::UNAUTHORIZED, "client authentication failed")
        }
        AuthError::InvalidScope(_) => (
            StatusCode::BAD_REQUEST,
            "none of the requested scopes can be granted to this client",
        ),
        AuthError::UnsupportedGrantType => (
            StatusCode::BAD_REQUEST,
            "only client_credentials is supported",
        ),
        AuthError::InvalidRequest(m) => (StatusCode::BAD_REQUEST, *m),
        AuthError::InvalidJwks(_) => (StatusCode::BAD_REQUEST, "invalid request"),
        AuthError::Crypto(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server error"),
    };
    let body = json!({"error": e.oauth_error(), "error_description": desc, "request_id": rid});
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub async fn token(State(st): State<Arc<AppState>>, h: HeaderMap, body: Bytes) -> Response {
    match issue(&st, &h, &body).await {
        Ok(v) => {
            let mut r = (StatusCode::OK, v.to_string()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => oauth_error(&e),
    }
}

async fn issue(st: &AppState, h: &HeaderMap, body: &[u8]) -> Result<Value, AuthError> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(AuthError::InvalidRequest(
            "send application/x-www-form-urlencoded",
        ));
    }
    if body.len() > MAX_FORM {
        return Err(AuthError::InvalidRequest("request too large"));
    }
    let mut grant_type = None;
    let mut scope = None;
    let mut a_type = None;
    let mut assertion_text = None;
    for (k, v) in form_urlencoded::parse(body) {
        let slot = match k.as_ref() {
            "grant_type" => &mut grant_type,
            "scope" => &mut scope,
            "client_assertion_type" => &mut a_type,
            "client_assertion" => &mut assertion_text,
            _ => continue,
        };
        if slot.is_some() {
            return Err(AuthError::InvalidRequest("repeated parameter"));
        }
        *slot = Some(v.into_owned());
    }
    if grant_type.as_deref() != Some("client_credentials") {
        return Err(AuthError::UnsupportedGrantType);
    }
    if a_type.as_deref() != Some(ASSERTION_TYPE) {
        return Err(AuthError::InvalidRequest(
            "client_assertion_type must be jwt-bearer",
        ));
    }
    let assertion_text =
        assertion_text.ok_or(AuthError::InvalidRequest("client_assertion is required"))?;
    let scope = scope.ok_or(AuthError::InvalidRequest("scope is required"))?;
    let client_id = peek_issuer(&assertion_text).ok_or(AuthError::InvalidClient("no issuer"))?;
    let client = st
        .store
        .get_client(&client_id)
        .await
        .map_err(|_| AuthError::InvalidRequest("temporarily unavailable"))?;
    let keys = match &client {
        Some(c) if !c.disabled => assertion::parse_jwks(&c.jwks).ok(),
        _ => None,
    };
    // Signature checks are CPU-heavy: keep them off the async workers.
    let verifier = st.verifier.clone();
    let now = crate::now_secs();
    let cid = client_id.clone();
    let verified = tokio::task::spawn_blocking(move || {
        verifier.verify(&assertion_text, &cid, keys.as_ref(), now)
    })
    .await
    .map_err(|_| AuthError::InvalidRequest("temporarily unavailable"))??;
    let fresh = st
        .store
        .use_jti(&verified.client_id, &verified.jti, verified.exp + 300, now)
        .await
        .map_err(|_| AuthError::InvalidRequest("temporarily unavailable"))?;
    if !fresh {
        return Err(AuthError::InvalidClient("jti replayed"));
    }
    // Verified above, so the client exists and is enabled.
    let registered = client
        .map(|c| ScopeSet::parse_lenient(&c.scope))
        .unwrap_or_default();
    let granted = ScopeSet::grant(&ScopeSet::parse_lenient(&scope), &registered);
    if granted.is_empty() {
        return Err(AuthError::InvalidScope("nothing grantable"));
    }
    let (token, claims) = st.tokens.issue(&verified.client_id, &granted, now)?;
    Ok(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": claims.exp - claims.iat,
        "scope": claims.scope,
    }))
}
