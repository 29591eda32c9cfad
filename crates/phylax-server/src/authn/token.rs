//! The token endpoint (client credentials for SMART Backend Services,
//! authorization code + PKCE and rotating refresh tokens for apps),
//! revocation (RFC 7009), introspection (RFC 7662) and discovery.
//!
//! Errors follow RFC 6749 §5.2 and never say which check failed: an unknown
//! client, a disabled client, a bad signature, a replayed `jti` and an
//! expired assertion all answer `invalid_client`. The reason is logged.

use crate::authn::signin::CodeDetails;
use crate::data::accounts::Status;
use crate::data::grants::{Kind, Taken};
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome, UserRef};
use phylax_auth::assertion::{self, peek_issuer};
use phylax_auth::pkce::Challenge;
use phylax_auth::smart::SmartScopes;
use phylax_auth::token::UserContext;
use phylax_auth::{AuthError, ScopeSet};
use phylax_store::ClientRecord;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub async fn smart_config(State(st): State<Authn>) -> Response {
    let mut r = (StatusCode::OK, st.smart_config.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// GET /auth/jwks: the public halves of the current and previous
/// `id_token` signing keys.
pub async fn jwks(State(st): State<Authn>) -> Response {
    let keys: Vec<Value> = st
        .signing
        .read()
        .iter()
        .rev()
        .take(2)
        .map(|k| phylax_auth::token::public_jwk(k))
        .collect();
    json_ok(json!({ "keys": keys }))
}

/// GET /auth/.well-known/openid-configuration (OpenID Connect Discovery).
pub async fn openid_config(State(st): State<Authn>) -> Response {
    let base = format!("{}/auth", st.config.public_url);
    json_ok(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "scopes_supported": ["openid", "fhirUser"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "fhirUser"],
    }))
}

/// 429 with Retry-After, as an OAuth error (`[rate]`).
fn too_many(secs: u64) -> Response {
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "error": "temporarily_unavailable",
            "error_description": "too many token requests; try again later",
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn oauth_error(e: &AuthError) -> Response {
    let rid = crate::base::request::request_id().unwrap_or_default();
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
            "supported grant types: authorization_code, refresh_token, client_credentials",
        ),
        AuthError::InvalidGrant(_) => (
            StatusCode::BAD_REQUEST,
            "the code or refresh token is invalid, expired, used, or was issued to another client",
        ),
        AuthError::InvalidRequest(m) => (StatusCode::BAD_REQUEST, *m),
        AuthError::InvalidJwks(_) => (StatusCode::BAD_REQUEST, "invalid request"),
        AuthError::Crypto(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server error"),
        AuthError::RateLimited(secs) => return too_many(*secs),
    };
    let body = json!({"error": e.oauth_error(), "error_description": desc, "request_id": rid});
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub async fn token(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let grant = crate::authn::signin::parse_form(&body, crate::authn::signin::MAX_FORM)
        .ok()
        .and_then(|f| f.get("grant_type").cloned())
        .filter(|g| {
            ["client_credentials", "authorization_code", "refresh_token"].contains(&g.as_str())
        })
        .unwrap_or_else(|| "other".into());
    // Per address before any work (assertions are costly to check); per
    // client once it has authenticated (an unauthenticated client id is
    // anyone's to claim, and must not let them use up a real client's
    // tokens). `[rate]`.
    let ip = ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    if let Err(secs) = st.rate.take(
        &format!("tip:{ip}"),
        st.config.rate.token_ip(),
        crate::base::clock::now_ms(),
    ) {
        st.metrics.rate_limited("token");
        return too_many(secs);
    }
    let cert = ext.get::<crate::net::conn::ClientCert>();
    let result = issue(&st, &h, &body, cert).await;
    if let Err(AuthError::RateLimited(secs)) = result {
        st.metrics.rate_limited("token");
        tracing::info!("token request over the client's rate limit; nothing issued or spent");
        return too_many(secs);
    }
    // Record the outcome before answering (fail closed). The subject comes
    // from the claims just issued; a refused request names no client (its
    // client id is unauthenticated text).
    let (outcome, detail, user, client) = match &result {
        Ok(Issued { claims: c, .. }) => {
            let user = c.role.as_ref().map(|r| UserRef {
                id: c.sub.clone(),
                role: r.clone(),
            });
            (
                Outcome::Success,
                format!("token issued ({grant})"),
                user,
                Some(c.client_id.clone()),
            )
        }
        Err(e) => (
            {
                st.metrics.auth_failure("token");
                Outcome::MinorFailure
            },
            format!("token refused ({grant}): {}", e.oauth_error()),
            None,
            None,
        ),
    };
    let ev = crate::audit::log::AuthEvent {
        kind: EventKind::Security("token"),
        action: Action::Execute,
        outcome,
        detail,
        user,
        client,
        ip: ext
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip()),
    };
    if let Err(e) = st.audit.record_auth(ev).await {
        let rid = crate::base::request::request_id().unwrap_or_default();
        tracing::error!(request_id = %rid, error = %e, "audit record not written; token withheld");
        return oauth_error(&unavailable(e));
    }
    match result {
        Ok(v) => json_ok(v.body),
        Err(e) => oauth_error(&e),
    }
}

fn json_ok(v: Value) -> Response {
    let mut r = (StatusCode::OK, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

type Form = HashMap<String, String>;

fn unavailable<E: std::fmt::Display>(e: E) -> AuthError {
    tracing::error!(error = %e, "token endpoint storage failure");
    AuthError::InvalidRequest("temporarily unavailable")
}

fn read_form(h: &HeaderMap, body: &[u8]) -> Result<Form, AuthError> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(AuthError::InvalidRequest(
            "send application/x-www-form-urlencoded",
        ));
    }
    crate::authn::signin::parse_form(body, crate::authn::signin::MAX_FORM)
        .map_err(AuthError::InvalidRequest)
}

/// Authenticate the calling client: a `private_key_jwt` assertion
/// (confidential and backend clients), or for public clients their
/// `client_id` alone. A confidential client may not skip its assertion.
/// Authenticate the client, then count the request against its rate
/// limit (`[rate] token_*`) before anything single-use (a code, a refresh
/// token) is spent: an over-limit answer leaves every grant as it was.
async fn client_auth(st: &AuthnState, f: &Form) -> Result<ClientRecord, AuthError> {
    let client = authenticate_client(st, f).await?;
    st.rate
        .take(
            &format!("tc:{}", client.id),
            st.config.rate.token(),
            crate::base::clock::now_ms(),
        )
        .map_err(AuthError::RateLimited)?;
    Ok(client)
}

async fn authenticate_client(st: &AuthnState, f: &Form) -> Result<ClientRecord, AuthError> {
    if let Some(assertion_text) = f.get("client_assertion") {
        if f.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
            return Err(AuthError::InvalidRequest(
                "client_assertion_type must be jwt-bearer",
            ));
        }
        let client_id = peek_issuer(assertion_text).ok_or(AuthError::InvalidClient("no issuer"))?;
        let client = st.clients.get(&client_id).await.map_err(unavailable)?;
        let keys = match &client {
            Some(c) if !c.disabled && !c.public => assertion::parse_jwks(&c.jwks).ok(),
            _ => None,
        };
        // Signature checks are CPU-heavy: keep them off the async workers.
        let verifier = st.verifier.clone();
        let now = crate::base::clock::now_secs();
        let cid = client_id.clone();
        let text = assertion_text.clone();
        let verified =
            tokio::task::spawn_blocking(move || verifier.verify(&text, &cid, keys.as_ref(), now))
                .await
                .map_err(unavailable)??;
        if !st
            .clients
            .use_jti(&verified.client_id, &verified.jti, verified.exp + 300, now)
            .await
            .map_err(unavailable)?
        {
            return Err(AuthError::InvalidClient("jti replayed"));
        }
        if let Some(claimed) = f.get("client_id") {
            if *claimed != verified.client_id {
                return Err(AuthError::InvalidClient(
                    "client_id differs from the assertion",
                ));
            }
        }
        // Verified above, so the client exists and is enabled.
        return client.ok_or(AuthError::InvalidClient("unknown client"));
    }
    let id = f
        .get("client_id")
        .ok_or(AuthError::InvalidClient("no client authentication"))?;
    match st.clients.get(id).await.map_err(unavailable)? {
        Some(c) if c.public && !c.disabled => Ok(c),
        Some(c) if !c.public => Err(AuthError::InvalidClient(
            "confidential client without its assertion",
        )),
        _ => Err(AuthError::InvalidClient("unknown or disabled client")),
    }
}

/// A token response and the claims of the access token in it (for the
/// audit record: the issuer's own claims, not a re-read of the token).
struct Issued {
    body: Value,
    claims: phylax_auth::token::AccessClaims,
}

async fn issue(
    st: &AuthnState,
    h: &HeaderMap,
    body: &[u8],
    cert: Option<&crate::net::conn::ClientCert>,
) -> Result<Issued, AuthError> {
    let f = read_form(h, body)?;
    match f.get("grant_type").map(String::as_str) {
        Some("client_credentials") => client_credentials(st, &f, cert).await,
        Some("authorization_code") => authorization_code(st, &f, cert).await,
        Some("refresh_token") => refresh(st, &f, cert).await,
        _ => Err(AuthError::UnsupportedGrantType),
    }
}

/// RFC 8705 §3: the thumbprint a client registered `--cert-bound` binds
/// its tokens to: the certificate of this connection, which it must
/// present (verified by the TLS layer against `[tls] client_ca`). Other
/// clients' tokens are not bound, certificate or not.
fn binding<'a>(
    client: &phylax_store::ClientRecord,
    cert: Option<&'a crate::net::conn::ClientCert>,
) -> Result<Option<&'a str>, AuthError> {
    match (client.cert_bound, cert) {
        (false, _) => Ok(None),
        (true, Some(c)) => Ok(Some(c.0.as_str())),
        (true, None) => Err(AuthError::InvalidClient(
            "this client's tokens are bound to its TLS client certificate: connect with it (mutual TLS)",
        )),
    }
}

async fn client_credentials(
    st: &AuthnState,
    f: &Form,
    cert: Option<&crate::net::conn::ClientCert>,
) -> Result<Issued, AuthError> {
    if !f.contains_key("client_assertion") {
        return Err(AuthError::InvalidRequest("client_assertion is required"));
    }
    let scope = f
        .get("scope")
        .ok_or(AuthError::InvalidRequest("scope is required"))?;
    let client = client_auth(st, f).await?;
    if !client.redirect_uris.is_empty() {
        // App clients act for users, not for themselves.
        return Err(AuthError::UnsupportedGrantType);
    }
    let now = crate::base::clock::now_secs();
    let granted = ScopeSet::grant(
        &ScopeSet::parse_lenient(scope),
        &ScopeSet::parse_lenient(&client.scope),
    );
    if granted.is_empty() {
        return Err(AuthError::InvalidScope("nothing grantable"));
    }
    let (token, claims) = match binding(&client, cert)? {
        Some(t) => st.tokens.issue_bound(&client.id, &granted, now, t)?,
        None => st.tokens.issue(&client.id, &granted, now)?,
    };
    Ok(Issued {
        body: json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": claims.exp - claims.iat,
            "scope": claims.scope,
        }),
        claims,
    })
}

/// What a refresh token stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefreshDetails {
    client_id: String,
    scope: String,
    user_id: String,
    patient: Option<String>,
    auth_time: i64,
    amr: Vec<String>,
    offer_patient: bool,
}

async fn active_user(st: &AuthnState, id: &str) -> Result<crate::data::accounts::User, AuthError> {
    match st.accounts.load(id).await.map_err(unavailable)? {
        Some(u) if u.status() == Some(Status::Active) => Ok(u),
        _ => Err(AuthError::InvalidGrant("user not active")),
    }
}

/// Mint an access token (and a rotated refresh token when the grant
/// includes offline or online access).
#[allow(clippy::too_many_arguments)]
async fn user_tokens(
    st: &AuthnState,
    family: &str,
    d: &RefreshDetails,
    refresh_expires: Option<i64>,
    nonce: Option<&str>,
    now: i64,
    cnf: Option<&str>,
) -> Result<Issued, AuthError> {
    let user = active_user(st, &d.user_id).await?;
    let ctx = UserContext {
        user_id: d.user_id.clone(),
        role: user.rec.role.clone(),
        patient: d.patient.clone(),
        family: family.to_owned(),
        auth_time: d.auth_time,
        amr: d.amr.clone(),
    };
    let (token, claims) = match cnf {
        Some(t) => st
            .tokens
            .issue_user_bound(&d.client_id, &d.scope, &ctx, now, t)?,
        None => st.tokens.issue_user(&d.client_id, &d.scope, &ctx, now)?,
    };
    let mut out = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": claims.exp - claims.iat,
        "scope": d.scope,
    });
    if d.offer_patient {
        if let Some(p) = &d.patient {
            out["patient"] = json!(p);
            out["need_patient_banner"] = json!(false);
        }
    }
    let granted = SmartScopes::parse_request(&d.scope);
    // fhirUser: the FHIR resource for the person: a patient's Patient, a
    // workforce user's linked Practitioner.
    let fhir_user = if granted.fhir_user {
        user.patient()
            .map(|p| format!("{}/Patient/{p}", st.fhir_base))
            .or_else(|| {
                user.practitioner()
                    .map(|p| format!("{}/Practitioner/{p}", st.fhir_base))
            })
    } else {
        None
    };
    if let Some(f) = &fhir_user {
        out["fhirUser"] = json!(f);
    }
    if granted.openid {
        let key = st
            .current_signing_key()
            .ok_or(AuthError::InvalidRequest("temporarily unavailable"))?;
        let mut c = json!({
            "iss": claims.iss,
            "sub": d.user_id,
            "aud": d.client_id,
            "iat": now,
            "exp": now + st.tokens.lifetime(),
            "auth_time": d.auth_time,
            "amr": d.amr,
            "acr": claims.acr,
        });
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        if let Some(f) = fhir_user {
            c["fhirUser"] = json!(f);
        }
        out["id_token"] = json!(phylax_auth::token::sign_id_token(&key, &c)?);
    }
    if let Some(exp) = refresh_expires {
        let rt = st
            .grants
            .create(Kind::Refresh, family, &d.user_id, d, exp, now)
            .await
            .map_err(unavailable)?;
        out["refresh_token"] = json!(rt);
    }
    Ok(Issued { body: out, claims })
}

/// Revoke a grant family everywhere: its grants are deleted, the feed
/// tells the other nodes, and this node refuses its tokens at once.
async fn revoke_family(st: &AuthnState, family: &str, now: i64) -> Result<(), AuthError> {
    st.grants
        .revoke_family(family, now)
        .await
        .map_err(unavailable)?;
    st.revoked.write().add("family", family, now);
    Ok(())
}

/// Consume a single-use grant (a code, a refresh token). A second use is a
/// replay: the grant's whole family is revoked and `event` logged.
async fn take_single_use<T: serde::de::DeserializeOwned>(
    st: &AuthnState,
    kind: Kind,
    secret: &str,
    now: i64,
    event: &'static str,
) -> Result<(phylax_store::GrantRecord, T), AuthError> {
    match st
        .grants
        .take::<T>(kind, secret, now)
        .await
        .map_err(unavailable)?
    {
        Taken::Fresh(g, d) => Ok((g, d)),
        Taken::Reused(g) => {
            revoke_family(st, &g.family, now).await?;
            tracing::warn!(event, user_id = %g.user_id, "single-use grant replayed; its family is revoked");
            let role = match st.accounts.load(&g.user_id).await {
                Ok(Some(u)) => u.rec.role.clone(),
                _ => "unknown".into(),
            };
            let ev = crate::audit::log::AuthEvent {
                kind: EventKind::Security("token-replay"),
                action: Action::Execute,
                outcome: Outcome::MinorFailure,
                detail: format!("{event}: a used code or rotated refresh token came back; its grant family is revoked"),
                user: Some(UserRef { id: g.user_id.clone(), role }),
                client: None,
                ip: None,
            };
            st.audit.record_auth(ev).await.map_err(unavailable)?;
            Err(AuthError::InvalidGrant("replayed"))
        }
        Taken::Missing => Err(AuthError::InvalidGrant("unknown or expired")),
    }
}

async fn authorization_code(
    st: &AuthnState,
    f: &Form,
    cert: Option<&crate::net::conn::ClientCert>,
) -> Result<Issued, AuthError> {
    let client = client_auth(st, f).await?;
    let cnf = binding(&client, cert)?;
    let code = f
        .get("code")
        .ok_or(AuthError::InvalidRequest("code is required"))?;
    let now = crate::base::clock::now_secs();
    // RFC 6749 §4.1.2: a code used twice revokes what it produced.
    let (g, d) =
        take_single_use::<CodeDetails>(st, Kind::Code, code, now, "auth.code_replayed").await?;
    if d.client_id != client.id {
        return Err(AuthError::InvalidGrant("code issued to another client"));
    }
    if f.get("redirect_uri") != Some(&d.redirect_uri) {
        return Err(AuthError::InvalidGrant("redirect_uri differs"));
    }
    let verifier = f.get("code_verifier").map(String::as_str).unwrap_or("");
    let ok = Challenge::parse(&d.challenge, "S256").is_some_and(|c| c.verify(verifier));
    if !ok {
        return Err(AuthError::InvalidGrant("PKCE verifier does not match"));
    }
    let scopes = SmartScopes::parse_request(&d.scope);
    let refresh_expires = if scopes.offline_access {
        Some(now + st.config.auth.offline_refresh_secs)
    } else if scopes.online_access {
        Some(now + st.config.auth.session_max_secs)
    } else {
        None
    };
    let rd = RefreshDetails {
        client_id: d.client_id,
        scope: d.scope,
        user_id: d.user_id,
        patient: d.patient,
        auth_time: d.auth_time,
        amr: d.amr,
        offer_patient: d.offer_patient,
    };
    user_tokens(
        st,
        &g.family,
        &rd,
        refresh_expires,
        d.nonce.as_deref(),
        now,
        cnf,
    )
    .await
}

async fn refresh(
    st: &AuthnState,
    f: &Form,
    cert: Option<&crate::net::conn::ClientCert>,
) -> Result<Issued, AuthError> {
    let client = client_auth(st, f).await?;
    let cnf = binding(&client, cert)?;
    let rt = f
        .get("refresh_token")
        .ok_or(AuthError::InvalidRequest("refresh_token is required"))?;
    let now = crate::base::clock::now_secs();
    // Reuse detection: a rotated-out token came back, so it was copied.
    // The whole family goes, the legitimate holder's current tokens
    // included; the user signs in again.
    let (g, d) =
        take_single_use::<RefreshDetails>(st, Kind::Refresh, rt, now, "auth.refresh_replayed")
            .await?;
    if d.client_id != client.id {
        return Err(AuthError::InvalidGrant("refresh token of another client"));
    }
    // The grant follows the app's registration as it is now: a narrowed
    // registration narrows the refreshed token; one that no longer allows
    // any of it, or no longer allows refresh, ends the grant (the person
    // signs in again).
    let user = active_user(st, &d.user_id).await?;
    let holder = match st.roles.get(user.role()) {
        Some(r) if r.patient => phylax_auth::smart::Holder::Patient,
        Some(_) => phylax_auth::smart::Holder::Workforce,
        None => return Err(AuthError::InvalidGrant("the user's role no longer exists")),
    };
    let narrowed = SmartScopes::grant(
        &SmartScopes::parse_request(&d.scope),
        &SmartScopes::parse_request(&client.scope),
        holder,
    );
    if narrowed.resources.is_empty() || !narrowed.wants_refresh() {
        revoke_family(st, &g.family, now).await?;
        return Err(AuthError::InvalidGrant(
            "the app's registration no longer allows this grant",
        ));
    }
    let mut d = d;
    d.scope = narrowed.to_string();
    // The new token keeps the family and the original expiry: rotation
    // never extends the grant.
    user_tokens(st, &g.family, &d, Some(g.expires_at), None, now, cnf).await
}

/// POST /auth/revoke (RFC 7009). Answers 200 whatever the token was, so it
/// cannot be used to test tokens.
pub async fn revoke(State(st): State<Authn>, h: HeaderMap, body: Bytes) -> Response {
    let f = match read_form(&h, &body) {
        Ok(f) => f,
        Err(e) => return oauth_error(&e),
    };
    let client = match client_auth(&st, &f).await {
        Ok(c) => c,
        Err(e) => return oauth_error(&e),
    };
    let now = crate::base::clock::now_secs();
    let token = f.get("token").map(String::as_str).unwrap_or("");
    let mut revoked: Option<&'static str> = None;
    if let Ok(Some((g, d))) = st
        .grants
        .get::<RefreshDetails>(Kind::Refresh, token, now)
        .await
    {
        if d.client_id == client.id {
            if let Err(e) = revoke_family(&st, &g.family, now).await {
                return oauth_error(&e);
            }
            revoked = Some("refresh token and its grant family revoked");
        }
    } else if let Ok(c) = st.tokens.verify(token, now) {
        if c.client_id == client.id {
            if let Err(e) = st.grants.publish_revocation("token", &c.jti, now).await {
                return oauth_error(&unavailable(e));
            }
            st.revoked.write().add("token", &c.jti, now);
            revoked = Some("access token revoked");
        }
    }
    if let Some(detail) = revoked {
        let ev = crate::audit::log::AuthEvent {
            kind: EventKind::Security("token-revoke"),
            action: Action::Execute,
            outcome: Outcome::Success,
            detail: detail.into(),
            user: None,
            client: Some(client.id.clone()),
            ip: None,
        };
        if let Err(e) = st.audit.record_auth(ev).await {
            return oauth_error(&unavailable(e));
        }
    }
    json_ok(json!({}))
}

/// POST /auth/introspect (RFC 7662), for authenticated confidential
/// clients about their own tokens. Anything else is `{"active": false}`.
pub async fn introspect(State(st): State<Authn>, h: HeaderMap, body: Bytes) -> Response {
    let f = match read_form(&h, &body) {
        Ok(f) => f,
        Err(e) => return oauth_error(&e),
    };
    if !f.contains_key("client_assertion") {
        return oauth_error(&AuthError::InvalidClient(
            "introspection needs client authentication",
        ));
    }
    let client = match client_auth(&st, &f).await {
        Ok(c) => c,
        Err(e) => return oauth_error(&e),
    };
    let now = crate::base::clock::now_secs();
    let token = f.get("token").map(String::as_str).unwrap_or("");
    let inactive = json!({"active": false});
    if let Ok(c) = st.tokens.verify(token, now) {
        if c.client_id != client.id || st.revoked.read().refuses(&c) {
            return json_ok(inactive);
        }
        let mut v = json!({
            "active": true,
            "scope": c.scope,
            "client_id": c.client_id,
            "sub": c.sub,
            "exp": c.exp,
            "iat": c.iat,
            "iss": c.iss,
            "aud": c.aud,
            "token_type": "Bearer",
        });
        if let Some(p) = c.patient {
            v["patient"] = json!(p);
        }
        if let Some(a) = c.acr {
            v["acr"] = json!(a);
        }
        // RFC 8705 §3.2: a protected resource checks the binding itself.
        if let Some(cnf) = c.cnf {
            v["cnf"] = json!(cnf);
        }
        return json_ok(v);
    }
    if let Ok(Some((g, d))) = st
        .grants
        .get::<RefreshDetails>(Kind::Refresh, token, now)
        .await
    {
        if d.client_id == client.id && g.used_at.is_none() {
            return json_ok(json!({
                "active": true,
                "scope": d.scope,
                "client_id": d.client_id,
                "sub": d.user_id,
                "exp": g.expires_at,
                "token_type": "refresh_token",
            }));
        }
    }
    json_ok(inactive)
}
