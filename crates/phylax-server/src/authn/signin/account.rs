//! The account page of a signed-in user (passkeys: add, rename, remove)
//! and sign-out.

use crate::authn::signin::flow::{
    clear_cookie, form, get_cookie, mfa_required, params, uv_required, value, AuthAudit, Form,
    Session, SigninError, PENDING_TTL, SESSION_COOKIE,
};
use crate::authn::signin::pages::{account_body, signed_out, AddPasskey, Page};
use crate::data::accounts::{AccountError, Status, User};
use crate::data::grants::{Kind, Taken};
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind};
use serde::{Deserialize, Serialize};

/// The signed-in session from its cookie: (cookie secret, session, user).
async fn current_session(
    st: &AuthnState,
    h: &HeaderMap,
    now: i64,
) -> Result<Option<(String, Session, User)>, SigninError> {
    let Some(secret) = get_cookie(h, SESSION_COOKIE) else {
        return Ok(None);
    };
    let Some((_, s)) = st
        .grants
        .get::<Session>(Kind::Session, secret, now)
        .await
        .map_err(SigninError::internal)?
    else {
        return Ok(None);
    };
    match st
        .accounts
        .load(&s.user_id)
        .await
        .map_err(SigninError::internal)?
    {
        Some(u) if u.status() == Some(Status::Active) => Ok(Some((secret.to_owned(), s, u))),
        _ => Ok(None),
    }
}

/// A ceremony kept server-side for the account page (the form carries
/// only a random reference to it).
#[derive(Debug, Serialize, Deserialize)]
struct AccountCeremony {
    user_id: String,
    state: Vec<u8>,
}

/// GET /auth/account: the signed-in user's passkeys (add, rename, remove).
pub async fn account(State(st): State<Authn>, h: HeaderMap) -> Result<Response, SigninError> {
    account_page(&st, &h, None, crate::base::clock::now_secs()).await
}

async fn account_page(
    st: &AuthnState,
    h: &HeaderMap,
    msg: Option<&str>,
    now: i64,
) -> Result<Response, SigninError> {
    let (secret, sess, user) = current_session(st, h, now).await?.ok_or_else(|| {
        SigninError::page(
            StatusCode::UNAUTHORIZED,
            "Sign in from your app first, then come back to this page.",
        )
    })?;
    let csrf = st.grants.csrf(&secret);
    let add = if recent_mfa(st, &sess, now) {
        Some(offer_passkey(st, &user, now).await?)
    } else {
        None
    };
    let mut page = Page::new(
        StatusCode::OK,
        "Your sign-in",
        account_body(&csrf, msg, &user, add.as_ref()),
    );
    page.scripts = add.is_some();
    Ok(page.into_response())
}

/// Start a passkey registration for the account page.
async fn offer_passkey(st: &AuthnState, user: &User, now: i64) -> Result<AddPasskey, SigninError> {
    let (c, options) = st
        .accounts
        .passkey_registration(&st.passkeys, user.id(), uv_required(st, user))
        .await
        .map_err(SigninError::internal)?;
    let ceremony = st
        .grants
        .create(
            Kind::Pending,
            "account",
            user.id(),
            &AccountCeremony {
                user_id: user.id().to_owned(),
                state: c.0,
            },
            now + PENDING_TTL,
            now,
        )
        .await
        .map_err(SigninError::internal)?;
    Ok(AddPasskey { options, ceremony })
}

/// Step-up: the session's sign-in used a second factor and is recent.
fn recent_mfa(st: &AuthnState, s: &Session, now: i64) -> bool {
    s.amr.iter().any(|m| m != "pwd") && now - s.auth_time <= st.config.auth.step_up_secs
}

/// POST /auth/account/passkeys: add, rename or remove a passkey.
pub async fn account_passkeys(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let form = form(&body)?;
    let (secret, sess, user) = current_session(&st, &h, now).await?.ok_or_else(|| {
        SigninError::page(StatusCode::UNAUTHORIZED, "Sign in from your app first.")
    })?;
    if !st.grants.csrf_ok(&secret, value(&form, "csrf")) {
        return Err(SigninError::page(
            StatusCode::FORBIDDEN,
            "The form could not be verified.",
        ));
    }
    let result = change_passkeys(&st, &form, &sess, &user, now).await?;
    if result.is_ok() {
        let change = match value(&form, "action") {
            "remove" => Some((Action::Delete, "passkey removed")),
            "add" => Some((Action::Create, "passkey added")),
            _ => None,
        };
        if let Some((action, detail)) = change {
            AuthAudit::new(EventKind::Security("mfa"), action)
                .detail(detail)
                .user(&user)
                .record(&st, &ext)
                .await?;
        }
    }
    let msg = match result {
        Ok(m) => m,
        Err(e @ (AccountError::Store(_) | AccountError::Keys(_) | AccountError::Crypto(_))) => {
            return Err(SigninError::internal(e))
        }
        Err(AccountError::Passkey(_)) => "The passkey could not be registered.".to_owned(),
        Err(e) => e.to_string(),
    };
    account_page(&st, &h, Some(&msg), now).await
}

/// The change the account form asks for: what to tell the user, or why
/// it was refused. Adding and removing need a recent second factor.
async fn change_passkeys(
    st: &AuthnState,
    form: &Form,
    sess: &Session,
    user: &User,
    now: i64,
) -> Result<Result<String, AccountError>, SigninError> {
    let get = |k: &str| value(form, k);
    Ok(match get("action") {
        "rename" => st
            .accounts
            .rename_passkey(user.id(), get("cred"), get("name"))
            .await
            .map(|()| "Renamed.".to_owned()),
        _ if !recent_mfa(st, sess, now) => Err(AccountError::StepUp),
        "remove" => st
            .accounts
            .remove_passkey(user.id(), get("cred"), mfa_required(st, user))
            .await
            .map(|()| {
                tracing::info!(event = "auth.passkey_removed", user_id = %user.id(), "passkey removed");
                "Removed.".to_owned()
            }),
        "add" => add_passkey(st, form, user, now).await?,
        _ => Err(AccountError::NoSuchPasskey),
    })
}

/// Register the passkey the account page's script posts, against the
/// ceremony the form names (it must be this user's).
async fn add_passkey(
    st: &AuthnState,
    form: &Form,
    user: &User,
    now: i64,
) -> Result<Result<String, AccountError>, SigninError> {
    let cer = match st
        .grants
        .take::<AccountCeremony>(Kind::Pending, value(form, "ceremony"), now)
        .await
    {
        Ok(Taken::Fresh(_, c)) if c.user_id == user.id() => c,
        Ok(_) => return Ok(Err(AccountError::NoSuchPasskey)),
        Err(e) => return Err(SigninError::internal(e)),
    };
    Ok(st
        .accounts
        .add_passkey(
            &st.passkeys,
            user.id(),
            &phylax_auth::passkey::Ceremony(cer.state),
            value(form, "passkey").as_bytes(),
            value(form, "name"),
            now,
        )
        .await
        .map(|_| {
            tracing::info!(event = "auth.passkey_added", user_id = %user.id(), "passkey added");
            "Passkey added.".to_owned()
        }))
}

/// POST /auth/logout: ends the browser session.
pub async fn logout(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let form = params(&body).unwrap_or_default();
    if let Some(s) = get_cookie(&h, SESSION_COOKIE) {
        if !st.grants.csrf_ok(s, value(&form, "csrf")) {
            return Err(SigninError::page(
                StatusCode::FORBIDDEN,
                "The form could not be verified.",
            ));
        }
        let who = match st
            .grants
            .get::<Session>(Kind::Session, s, crate::base::clock::now_secs())
            .await
        {
            Ok(Some((g, _))) => st.accounts.load(&g.user_id).await.ok().flatten(),
            _ => None,
        };
        st.grants
            .delete(Kind::Session, s)
            .await
            .map_err(SigninError::internal)?;
        if let Some(u) = &who {
            AuthAudit::new(EventKind::Logout, Action::Execute)
                .detail("signed out")
                .user(u)
                .record(&st, &ext)
                .await?;
        }
    }
    let mut page = Page::new(StatusCode::OK, "Signed out", signed_out());
    page.cookies.push(clear_cookie(SESSION_COOKIE));
    Ok(page.into_response())
}
