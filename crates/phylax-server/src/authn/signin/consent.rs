//! After the sign-in: the browser session, consent, and the authorization
//! code.

use crate::authn::signin::flow::{
    add_cookies, audit_auth, clear_cookie, cookie, internal, mfa_required, new_pending, params,
    redirect_error, redirect_to, take_pending, CodeDetails, Pending, Session, Stage, BAD_LOGIN,
    CODE_TTL, PENDING_COOKIE, SESSION_COOKIE,
};
use crate::authn::signin::pages::{consent_form, error_page, origin, Page};
use crate::data::accounts::{Status, User};
use crate::data::grants::Kind;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};
use phylax_auth::smart::{Holder, SmartScopes};
use std::sync::Arc;

/// POST /auth/continue (after recovery codes were shown or one was used)
pub async fn proceed(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let form = match params(&body) {
        Ok(f) => f,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, m),
    };
    let p = match take_pending(&st, &h, &form, now).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (Stage::Continue, Some(uid)) = (&p.stage, p.user_id.clone()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Unexpected step; start again from the app.",
        );
    };
    let user = match st.accounts.load(&uid).await {
        Ok(Some(u)) if u.status() == Some(Status::Active) => u,
        Ok(_) => return error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN),
        Err(e) => return internal(e),
    };
    after_sign_in(&st, &ext, p, &user, Vec::new(), now).await
}

/// The user is authenticated (this request or an existing session): make
/// the session, then consent or the code.
pub(super) async fn after_sign_in(
    st: &AppState,
    ext: &axum::http::Extensions,
    mut p: Pending,
    user: &User,
    mut cookies: Vec<String>,
    now: i64,
) -> Response {
    // A second factor is needed unless the role may go without.
    if mfa_required(st, user) && !p.amr.iter().any(|m| m != "pwd") {
        return error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN);
    }
    let auth_time = p.auth_time.unwrap_or(now);
    if !p.resumed {
        // A sign-in after a long silence (or a first one long after the
        // account was made) is worth a look: a leaver's account, a shared
        // password.
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
        if let Err(e) = st.accounts.record_success(user.id(), now).await {
            return internal(e);
        }
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
        match st
            .grants
            .create(Kind::Session, &family, user.id(), &s, idle, now)
            .await
        {
            Ok(secret) => cookies.push(cookie(
                SESSION_COOKIE,
                &secret,
                "Lax",
                st.config.auth.session_max_secs,
            )),
            Err(e) => return internal(e),
        }
        tracing::info!(event = "auth.sign_in", user_id = %user.id(), amr = %p.amr.join(" "), "signed in");
        if let Err(r) = audit_auth(
            st,
            ext,
            EventKind::Login,
            Action::Execute,
            Outcome::Success,
            format!("signed in (amr {})", p.amr.join(" ")),
            Some(user),
            Some(&p.req.client_id),
        )
        .await
        {
            return r;
        }
    }
    cookies.push(clear_cookie(PENDING_COOKIE));
    let client = match st.clients.get(&p.req.client_id).await {
        Ok(Some(c)) if !c.disabled && c.redirect_uris.contains(&p.req.redirect_uri) => c,
        Ok(_) => return error_page(StatusCode::BAD_REQUEST, "Unknown or disabled application."),
        Err(e) => return internal(e),
    };
    let holder = match st.roles.get(user.role()) {
        Some(r) if r.patient => Holder::Patient,
        Some(_) => Holder::Workforce,
        // A role removed from the configuration: no access at all.
        None => return error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN),
    };
    let granted = SmartScopes::grant(
        &SmartScopes::parse_request(&p.req.scope),
        &SmartScopes::parse_request(&client.scope),
        holder,
    );
    if granted.resources.is_empty() {
        let mut r = redirect_error(
            &p.req,
            "access_denied",
            "none of the requested scopes can be granted to this user",
        );
        add_cookies(&mut r, &cookies);
        return r;
    }
    if client.first_party {
        let mut r = issue_code(st, &p, user, &granted, now).await;
        add_cookies(&mut r, &cookies);
        return r;
    }
    p.stage = Stage::Consent {
        granted: granted.to_string(),
    };
    p.auth_time = Some(auth_time);
    let (csrf, c) = match new_pending(st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    cookies.retain(|c| !c.starts_with(PENDING_COOKIE));
    cookies.push(c);
    let mut page = Page::new(
        StatusCode::OK,
        "Allow access?",
        consent_form(&csrf, &client.name, &granted),
    );
    page.cookies = cookies;
    page.redirect_origin = origin(&p.req.redirect_uri).map(str::to_owned);
    page.into_response()
}

async fn issue_code(
    st: &AppState,
    p: &Pending,
    user: &User,
    granted: &SmartScopes,
    now: i64,
) -> Response {
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
    match st
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
    {
        Ok(code) => redirect_to(
            &p.req.redirect_uri,
            &[("code", code.as_str()), ("state", p.req.state.as_str())],
        ),
        Err(e) => internal(e),
    }
}

/// POST /auth/consent
pub async fn consent(State(st): State<Arc<AppState>>, h: HeaderMap, body: Bytes) -> Response {
    let now = crate::base::clock::now_secs();
    let form = match params(&body) {
        Ok(f) => f,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, m),
    };
    let p = match take_pending(&st, &h, &form, now).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (Stage::Consent { granted }, Some(uid)) = (p.stage.clone(), p.user_id.clone()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Unexpected step; start again from the app.",
        );
    };
    let mut r = if form.get("decision").map(String::as_str) == Some("allow") {
        let user = match st.accounts.load(&uid).await {
            Ok(Some(u)) if u.status() == Some(Status::Active) => u,
            Ok(_) => return error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN),
            Err(e) => return internal(e),
        };
        issue_code(&st, &p, &user, &SmartScopes::parse_request(&granted), now).await
    } else {
        redirect_error(&p.req, "access_denied", "the user denied access")
    };
    add_cookies(&mut r, &[clear_cookie(PENDING_COOKIE)]);
    r
}
