//! After the sign-in: the browser session, consent, and the authorization
//! code.

use crate::authn::signin::flow::{
    active_user, add_cookies, clear_cookie, cookie, form, mfa_required, new_pending,
    redirect_error, redirect_to, take_pending, value, AuthAudit, CodeDetails, Pending, Session,
    SigninError, Stage, CODE_TTL, PENDING_COOKIE, SESSION_COOKIE,
};
use crate::authn::signin::pages::{consent_form, origin, Page};
use crate::data::accounts::User;
use crate::data::grants::Kind;
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind};
use phylax_auth::smart::{Holder, SmartScopes};
use phylax_store::ClientRecord;

/// POST /auth/continue (after recovery codes were shown or one was used)
pub async fn proceed(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let form = form(&body)?;
    let p = take_pending(&st, &h, &form, now).await?;
    let (Stage::Continue, Some(uid)) = (&p.stage, p.user_id.clone()) else {
        return Err(SigninError::UnexpectedStep);
    };
    let user = active_user(&st, &uid).await?;
    after_sign_in(&st, &ext, p, &user, Vec::new(), now).await
}

/// The user is authenticated (this request or an existing session): make
/// the session, then consent or the code.
pub(super) async fn after_sign_in(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    mut p: Pending,
    user: &User,
    mut cookies: Vec<String>,
    now: i64,
) -> Result<Response, SigninError> {
    // A second factor is needed unless the role may go without.
    if mfa_required(st, user) && !p.amr.iter().any(|m| m != "pwd") {
        return Err(SigninError::Refused);
    }
    let auth_time = p.auth_time.unwrap_or(now);
    if !p.resumed {
        cookies.push(start_session(st, ext, &p, user, auth_time, now).await?);
    }
    cookies.push(clear_cookie(PENDING_COOKIE));
    let (client, granted) = grant(st, &p, user).await?;
    if granted.resources.is_empty() {
        let mut r = redirect_error(
            &p.req,
            "access_denied",
            "none of the requested scopes can be granted to this user",
        );
        add_cookies(&mut r, &cookies);
        return Ok(r);
    }
    if client.first_party {
        // A failure still carries the cookies: the session exists.
        let mut r = issue_code(st, &p, user, &granted, now)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        add_cookies(&mut r, &cookies);
        return Ok(r);
    }
    p.stage = Stage::Consent {
        granted: granted.to_string(),
    };
    p.auth_time = Some(auth_time);
    let (csrf, c) = new_pending(st, &p, now).await?;
    cookies.retain(|c| !c.starts_with(PENDING_COOKIE));
    cookies.push(c);
    let mut page = Page::new(
        StatusCode::OK,
        "Allow access?",
        consent_form(&csrf, &client.name, &granted),
    );
    page.cookies = cookies;
    page.redirect_origin = origin(&p.req.redirect_uri).map(str::to_owned);
    Ok(page.into_response())
}

/// A new sign-in (not a resumed session): note it on the account, make a
/// brand-new session and audit it. Returns the session cookie.
async fn start_session(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    p: &Pending,
    user: &User,
    auth_time: i64,
    now: i64,
) -> Result<String, SigninError> {
    dormant_alert(st, user, now);
    st.accounts
        .record_success(user.id(), now)
        .await
        .map_err(SigninError::internal)?;
    // A brand-new session cookie at every sign-in (no fixation).
    let absolute = now + st.config.auth.session_max_secs;
    let s = Session {
        user_id: user.id().to_owned(),
        auth_time,
        amr: p.amr.clone(),
        absolute,
    };
    let idle = (now + st.config.auth.session_idle_secs).min(absolute);
    let family = uuid::Uuid::new_v4().to_string();
    let secret = st
        .grants
        .create(Kind::Session, &family, user.id(), &s, idle, now)
        .await
        .map_err(SigninError::internal)?;
    let session_cookie = cookie(
        SESSION_COOKIE,
        &secret,
        "Lax",
        st.config.auth.session_max_secs,
    );
    tracing::info!(event = "auth.sign_in", user_id = %user.id(), amr = %p.amr.join(" "), "signed in");
    AuthAudit::new(EventKind::Login, Action::Execute)
        .detail(format!("signed in (amr {})", p.amr.join(" ")))
        .user(user)
        .client(&p.req.client_id)
        .record(st, ext)
        .await?;
    Ok(session_cookie)
}

/// A sign-in after a long silence (or a first one long after the account
/// was made) is worth a look: a leaver's account, a shared password.
fn dormant_alert(st: &AuthnState, user: &User, now: i64) {
    let last = user.last_sign_in().unwrap_or(user.rec.created_at);
    let dormant = i64::from(st.config.detect.dormant_days) * 86_400;
    if now - last > dormant {
        if let Some(d) = st.audit.detector() {
            d.raise(crate::audit::alert::Alert {
                rule: "dormant-account",
                severity: "medium",
                detail: format!(
                    "user {} signed in after {} days without a sign-in",
                    user.id(),
                    (now - last) / 86_400
                ),
                user: Some(user.id().to_owned()),
            });
        }
    }
}

/// The application (still enabled, the redirect URI still registered) and
/// the scopes this user may give it.
async fn grant(
    st: &AuthnState,
    p: &Pending,
    user: &User,
) -> Result<(ClientRecord, SmartScopes), SigninError> {
    let client = match st.clients.get(&p.req.client_id).await {
        Ok(Some(c)) if !c.disabled && c.redirect_uris.contains(&p.req.redirect_uri) => c,
        Ok(_) => return Err(SigninError::UnknownClient),
        Err(e) => return Err(SigninError::internal(e)),
    };
    let holder = match st.roles.get(user.role()) {
        Some(r) if r.patient => Holder::Patient,
        Some(_) => Holder::Workforce,
        // A role removed from the configuration: no access at all.
        None => return Err(SigninError::Refused),
    };
    let granted = SmartScopes::grant(
        &SmartScopes::parse_request(&p.req.scope),
        &SmartScopes::parse_request(&client.scope),
        holder,
    );
    Ok((client, granted))
}

async fn issue_code(
    st: &AuthnState,
    p: &Pending,
    user: &User,
    granted: &SmartScopes,
    now: i64,
) -> Result<Response, SigninError> {
    let details = CodeDetails {
        client_id: p.req.client_id.clone(),
        redirect_uri: p.req.redirect_uri.clone(),
        scope: granted.to_string(),
        challenge: p.req.challenge.clone(),
        user_id: user.id().to_owned(),
        patient: user.patient().map(str::to_owned),
        auth_time: p.auth_time.unwrap_or(now),
        amr: p.amr.clone(),
        nonce: p.req.nonce.clone(),
        offer_patient: granted.launch_patient || granted.has_patient_scopes(),
    };
    // The code and every token later minted from it share one family, so a
    // replayed code revokes them all.
    let family = uuid::Uuid::new_v4().to_string();
    let code = st
        .grants
        .create(
            Kind::Code,
            &family,
            user.id(),
            &details,
            now + CODE_TTL,
            now,
        )
        .await
        .map_err(SigninError::internal)?;
    Ok(redirect_to(
        &p.req.redirect_uri,
        &[("code", code.as_str()), ("state", p.req.state.as_str())],
    ))
}

/// POST /auth/consent
pub async fn consent(
    State(st): State<Authn>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let form = form(&body)?;
    let p = take_pending(&st, &h, &form, now).await?;
    let (Stage::Consent { granted }, Some(uid)) = (p.stage.clone(), p.user_id.clone()) else {
        return Err(SigninError::UnexpectedStep);
    };
    let mut r = if value(&form, "decision") == "allow" {
        let user = active_user(&st, &uid).await?;
        // A failure still clears the sign-in cookie (it was used).
        issue_code(&st, &p, &user, &SmartScopes::parse_request(&granted), now)
            .await
            .unwrap_or_else(IntoResponse::into_response)
    } else {
        redirect_error(&p.req, "access_denied", "the user denied access")
    };
    add_cookies(&mut r, &[clear_cookie(PENDING_COOKIE)]);
    Ok(r)
}
