//! The start of a sign-in: the authorization request and the password.

use crate::authn::signin::consent::after_sign_in;
use crate::authn::signin::enrollment::enrollment_page;
use crate::authn::signin::flow::{
    form, get_cookie, mfa_required, new_pending, peer, peer_ip, take_pending, value, AuthAudit,
    AuthzRequest, Form, Pending, Session, SigninError, Stage, BAD_LOGIN, SESSION_COOKIE,
};
use crate::authn::signin::pages::{login_form, Page};
use crate::authn::signin::second_factor::mfa_page;
use crate::data::accounts::{Accounts, Status, User};
use crate::data::grants::Kind;
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome, UserRef};
use phylax_auth::pkce::Challenge;
use phylax_auth::smart::{Holder, SmartScopes};
use phylax_crypto::password::Verified;

/// GET /auth/authorize
pub async fn authorize(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let q = form(q.unwrap_or_default().as_bytes())?;
    let req = authorization_request(&st, &q).await?;
    // Already signed in (session cookie, MFA done, account still active)?
    if let Some((s, user)) = resume_session(&st, &h, now).await {
        let p = Pending {
            req,
            stage: Stage::Password,
            user_id: Some(s.user_id.clone()),
            amr: s.amr.clone(),
            auth_time: Some(s.auth_time),
            resumed: true,
        };
        return after_sign_in(&st, &ext, p, &user, Vec::new(), now).await;
    }
    let p = Pending {
        req,
        stage: Stage::Password,
        user_id: None,
        amr: Vec::new(),
        auth_time: None,
        resumed: false,
    };
    let (csrf, c) = new_pending(&st, &p, now).await?;
    let mut page = Page::new(StatusCode::OK, "Sign in", login_form(&csrf, None));
    page.cookies.push(c);
    Ok(page.into_response())
}

/// Check the authorization request. Client and redirect URI first: until
/// both check out, errors are shown here and never sent anywhere; after
/// that they go back to the app.
async fn authorization_request(st: &AuthnState, q: &Form) -> Result<AuthzRequest, SigninError> {
    let get = |k: &str| value(q, k);
    let client = match st.clients.get(get("client_id")).await {
        Ok(Some(c)) if !c.disabled && !c.redirect_uris.is_empty() => c,
        Ok(_) => return Err(SigninError::UnknownClient),
        Err(e) => return Err(SigninError::internal(e)),
    };
    let redirect_uri = get("redirect_uri");
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        return Err(SigninError::bad_request(
            "The application's redirect address is not registered.",
        ));
    }
    let mut req = AuthzRequest {
        client_id: client.id.clone(),
        redirect_uri: redirect_uri.to_owned(),
        state: get("state").to_owned(),
        scope: get("scope").to_owned(),
        challenge: String::new(),
        nonce: q.get("nonce").cloned(),
    };
    if get("response_type") != "code" {
        return Err(SigninError::redirect(
            &req,
            "unsupported_response_type",
            "only response_type=code",
        ));
    }
    if req.state.is_empty() {
        return Err(SigninError::redirect(
            &req,
            "invalid_request",
            "state is required",
        ));
    }
    let Some(ch) = Challenge::parse(get("code_challenge"), get("code_challenge_method")) else {
        return Err(SigninError::redirect(
            &req,
            "invalid_request",
            "PKCE with code_challenge_method=S256 is required",
        ));
    };
    req.challenge = ch.as_str().to_owned();
    if get("aud") != st.fhir_base {
        return Err(SigninError::redirect(
            &req,
            "invalid_request",
            "aud must be this server's FHIR base URL",
        ));
    }
    let registered = SmartScopes::parse_request(&client.scope);
    let requested = SmartScopes::parse_request(&req.scope);
    if SmartScopes::grant(&requested, &registered, Holder::Patient)
        .resources
        .is_empty()
        && SmartScopes::grant(&requested, &registered, Holder::Workforce)
            .resources
            .is_empty()
    {
        return Err(SigninError::redirect(
            &req,
            "invalid_scope",
            "no requested resource scope can be granted",
        ));
    }
    Ok(req)
}

/// The browser's session, if it has one that is live, of an active user,
/// and could be kept alive (its idle deadline moved on). Any failure here
/// means a fresh sign-in.
async fn resume_session(st: &AuthnState, h: &HeaderMap, now: i64) -> Option<(Session, User)> {
    let sess = get_cookie(h, SESSION_COOKIE)?;
    let (_, s) = st
        .grants
        .get::<Session>(Kind::Session, sess, now)
        .await
        .ok()??;
    let user = st.accounts.load(&s.user_id).await.ok()??;
    if user.status() != Some(Status::Active) {
        return None;
    }
    let idle = (now + st.config.auth.session_idle_secs).min(s.absolute);
    st.grants.touch(Kind::Session, sess, idle, now).await.ok()?;
    Some((s, user))
}

/// The sign-in form again, in a new stage, with a message.
async fn login_again(
    st: &AuthnState,
    p: Pending,
    msg: &str,
    status: StatusCode,
    now: i64,
) -> Result<Response, SigninError> {
    let (csrf, c) = new_pending(st, &p, now).await?;
    let mut page = Page::new(status, "Sign in", login_form(&csrf, Some(msg)));
    page.cookies.push(c);
    Ok(page.into_response())
}

/// The throttle keys of a password attempt: the peer's address, and the
/// account as sign-in matches names (NFKC, trimmed, lower-case:
/// `ｖｉｃｔｉｍ５` is `victim5` here too). A name that cannot be one
/// (empty, too long) is throttled as typed.
fn throttle_keys(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    username: &str,
) -> (String, String) {
    let ip_key = format!("ip:{}", peer(ext));
    let canonical = crate::data::accounts::normalize_username(username)
        .unwrap_or_else(|_| username.trim().to_lowercase());
    let acct_key = format!(
        "user:{}",
        st.accounts.keyed("throttle", canonical.as_bytes())
    );
    (ip_key, acct_key)
}

/// POST /auth/login
pub async fn login(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let form = form(&body)?;
    let mut p = take_pending(&st, &h, &form, now).await?;
    if !matches!(p.stage, Stage::Password) {
        return Err(SigninError::UnexpectedStep);
    }
    let username = value(&form, "username");
    let password = value(&form, "password");
    let (ip_key, acct_key) = throttle_keys(&st, &ext, username);
    let now_ms = crate::base::clock::now_ms();
    let wait = st
        .throttle
        .wait(&ip_key, now_ms)
        .max(st.throttle.wait(&acct_key, now_ms));
    if wait > 0 {
        return login_again(
            &st,
            p,
            &format!("Too many attempts. Wait {wait} seconds and try again."),
            StatusCode::TOO_MANY_REQUESTS,
            now,
        )
        .await;
    }
    let user = st
        .accounts
        .find(username)
        .await
        .map_err(SigninError::internal)?;
    // Always one Argon2id verification, known user or not; when every
    // Argon2id slot stays busy, 503 with Retry-After (not counted as a
    // failure: the password was never checked).
    let Ok(verdict) = st.accounts.verify_password(user.as_ref(), password).await else {
        let mut r = login_again(
            &st,
            p,
            "Too many sign-ins at once. Try again in a few seconds.",
            StatusCode::SERVICE_UNAVAILABLE,
            now,
        )
        .await?;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return Ok(r);
    };
    let ok_user = match (&user, verdict) {
        (Some(u), Verified::Match { rehash }) if u.status() == Some(Status::Active) => {
            Some((u.clone(), rehash))
        }
        _ => None,
    };
    let Some((user, rehash)) = ok_user else {
        st.throttle.fail(&ip_key, crate::base::clock::now_ms());
        st.throttle.fail(&acct_key, crate::base::clock::now_ms());
        return password_refused(&st, &ext, p, user.as_ref(), now).await;
    };
    st.throttle.succeed(&acct_key);
    if rehash {
        if let Err(e) = st.accounts.upgrade_hash(user.id(), password).await {
            tracing::warn!(user_id = %user.id(), error = %e, "password hash upgrade failed");
        }
    }
    p.user_id = Some(user.id().to_owned());
    p.amr = vec!["pwd".into()];
    p.auth_time = Some(now);
    second_step(&st, &ext, p, &user, now).await
}

/// A refused password (unknown user, wrong password, or an account that
/// cannot sign in): counted against the account, logged, audited, and the
/// same page whatever the reason.
async fn password_refused(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    p: Pending,
    user: Option<&User>,
    now: i64,
) -> Result<Response, SigninError> {
    if let Some(u) = user {
        count_failure(st, ext, u, now);
    }
    tracing::info!(
        event = "auth.failure",
        stage = "password",
        user_id = user.map(|u| u.id()).unwrap_or("-"),
        peer = %peer(ext),
        "sign-in refused"
    );
    AuthAudit::new(EventKind::Login, Action::Execute)
        .outcome(Outcome::MinorFailure)
        .detail(if user.is_some() {
            "password refused"
        } else {
            "unknown user or password refused"
        })
        .user(user)
        .client(&p.req.client_id)
        .record(st, ext)
        .await?;
    login_again(st, p, BAD_LOGIN, StatusCode::UNAUTHORIZED, now).await
}

/// Count a failed password against a known account (and lock it at the
/// threshold). Counted in the background so the answer takes the same time
/// for known and unknown users.
fn count_failure(st: &AuthnState, ext: &axum::http::Extensions, u: &User, now: i64) {
    let accounts = st.accounts.clone();
    let id = u.id().to_owned();
    let threshold = st.config.auth.lockout_threshold;
    let lockout_secs = st.config.auth.lockout_secs;
    let audit = st.audit.clone();
    let ip = peer_ip(ext);
    tokio::spawn(async move {
        match accounts
            .record_failure(&id, threshold, lockout_secs, now)
            .await
        {
            Ok(u) if u.status() == Some(Status::Locked) => {
                tracing::warn!(event = "auth.locked", user_id = %id, "account locked after repeated failures");
                let e = crate::audit::log::AuthEvent {
                    kind: EventKind::Security("lockout"),
                    action: Action::Update,
                    outcome: Outcome::Success,
                    detail: "account locked after repeated failed sign-ins".into(),
                    user: Some(UserRef {
                        id: id.clone(),
                        role: u.rec.role.clone(),
                    }),
                    client: None,
                    ip,
                };
                if let Err(e) = audit.record_auth(e).await {
                    tracing::error!(user_id = %id, error = %e, "could not record a lockout in the audit log");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(user_id = %id, error = %e, "could not count a failed sign-in")
            }
        }
    });
}

/// After the password: the second factor, enrollment, or (where a role
/// may go without) straight on.
async fn second_step(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    mut p: Pending,
    user: &User,
    now: i64,
) -> Result<Response, SigninError> {
    if user.has_mfa() {
        return mfa_page(st, p, user, None, StatusCode::OK, now).await;
    }
    if mfa_required(st, user) {
        let t = st.accounts.new_totp().map_err(SigninError::internal)?;
        p.stage = Stage::EnrollTotp {
            secret: Accounts::totp_to_b64(&t),
            passkey: None,
        };
        return enrollment_page(st, p, user, &t, None, now).await;
    }
    after_sign_in(st, ext, p, user, Vec::new(), now).await
}
