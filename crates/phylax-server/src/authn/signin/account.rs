//! The account page of a signed-in user (passkeys: add, rename, remove)
//! and sign-out.

use crate::authn::signin::flow::{
    audit_auth, clear_cookie, get_cookie, internal, mfa_required, params, uv_required, Session,
    PENDING_TTL, SESSION_COOKIE,
};
use crate::authn::signin::pages::{account_body, error_page, signed_out, AddPasskey, Page};
use crate::data::accounts::{Status, User};
use crate::data::grants::{Kind, Taken};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The signed-in session from its cookie: (cookie secret, session, user).
async fn current_session(
    st: &AppState,
    h: &HeaderMap,
    now: i64,
) -> Result<Option<(String, Session, User)>, Response> {
    let Some(secret) = get_cookie(h, SESSION_COOKIE) else {
        return Ok(None);
    };
    let Some((_, s)) = st
        .grants
        .get::<Session>(Kind::Session, secret, now)
        .await
        .map_err(internal)?
    else {
        return Ok(None);
    };
    match st.accounts.load(&s.user_id).await.map_err(internal)? {
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
pub async fn account(State(st): State<Arc<AppState>>, h: HeaderMap) -> Response {
    account_page(&st, &h, None, crate::base::clock::now_secs()).await
}

async fn account_page(st: &AppState, h: &HeaderMap, msg: Option<&str>, now: i64) -> Response {
    let (secret, sess, user) = match current_session(st, h, now).await {
        Ok(Some(x)) => x,
        Ok(None) => {
            return error_page(
                StatusCode::UNAUTHORIZED,
                "Sign in from your app first, then come back to this page.",
            )
        }
        Err(r) => return r,
    };
    let csrf = st.grants.csrf(&secret);
    let add = if recent_mfa(st, &sess, now) {
        match offer_passkey(st, &user, now).await {
            Ok(a) => Some(a),
            Err(r) => return r,
        }
    } else {
        None
    };
    let mut page = Page::new(
        StatusCode::OK,
        "Your sign-in",
        account_body(&csrf, msg, &user, add.as_ref()),
    );
    page.scripts = add.is_some();
    page.into_response()
}

/// Start a passkey registration for the account page.
async fn offer_passkey(st: &AppState, user: &User, now: i64) -> Result<AddPasskey, Response> {
    let (c, options) = st
        .accounts
        .passkey_registration(&st.passkeys, user.id(), uv_required(st, user))
        .await
        .map_err(internal)?;
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
        .map_err(internal)?;
    Ok(AddPasskey { options, ceremony })
}

/// Step-up: the session's sign-in used a second factor and is recent.
fn recent_mfa(st: &AppState, s: &Session, now: i64) -> bool {
    s.amr.iter().any(|m| m != "pwd") && now - s.auth_time <= st.config.auth.step_up_secs
}

/// POST /auth/account/passkeys: add, rename or remove a passkey.
pub async fn account_passkeys(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    use crate::data::accounts::AccountError;
    let now = crate::base::clock::now_secs();
    let form = match params(&body) {
        Ok(f) => f,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, m),
    };
    let (secret, sess, user) = match current_session(&st, &h, now).await {
        Ok(Some(x)) => x,
        Ok(None) => return error_page(StatusCode::UNAUTHORIZED, "Sign in from your app first."),
        Err(r) => return r,
    };
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if !st.grants.csrf_ok(&secret, get("csrf")) {
        return error_page(StatusCode::FORBIDDEN, "The form could not be verified.");
    }
    let result = match get("action") {
        "rename" => st
            .accounts
            .rename_passkey(user.id(), get("cred"), get("name"))
            .await
            .map(|()| "Renamed.".to_owned()),
        _ if !recent_mfa(&st, &sess, now) => Err(AccountError::StepUp),
        "remove" => st
            .accounts
            .remove_passkey(user.id(), get("cred"), mfa_required(&st, &user))
            .await
            .map(|()| {
                tracing::info!(event = "auth.passkey_removed", user_id = %user.id(), "passkey removed");
                "Removed.".to_owned()
            }),
        "add" => {
            let cer = match st
                .grants
                .take::<AccountCeremony>(Kind::Pending, get("ceremony"), now)
                .await
            {
                Ok(Taken::Fresh(_, c)) if c.user_id == user.id() => Some(c),
                Ok(_) => None,
                Err(e) => return internal(e),
            };
            match cer {
                Some(c) => st
                    .accounts
                    .add_passkey(
                        &st.passkeys,
                        user.id(),
                        &phylax_auth::passkey::Ceremony(c.state),
                        get("passkey").as_bytes(),
                        get("name"),
                        now,
                    )
                    .await
                    .map(|_| {
                        tracing::info!(event = "auth.passkey_added", user_id = %user.id(), "passkey added");
                        "Passkey added.".to_owned()
                    }),
                None => Err(AccountError::NoSuchPasskey),
            }
        }
        _ => Err(AccountError::NoSuchPasskey),
    };
    if result.is_ok() {
        let change = match get("action") {
            "remove" => Some((Action::Delete, "passkey removed")),
            "add" => Some((Action::Create, "passkey added")),
            _ => None,
        };
        if let Some((action, detail)) = change {
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Security("mfa"),
                action,
                Outcome::Success,
                detail,
                Some(&user),
                None,
            )
            .await
            {
                return r;
            }
        }
    }
    let msg = match result {
        Ok(m) => m,
        Err(e @ (AccountError::Store(_) | AccountError::Keys(_) | AccountError::Crypto(_))) => {
            return internal(e)
        }
        Err(AccountError::Passkey(_)) => "The passkey could not be registered.".to_owned(),
        Err(e) => e.to_string(),
    };
    account_page(&st, &h, Some(&msg), now).await
}

/// POST /auth/logout: ends the browser session.
pub async fn logout(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let form = params(&body).unwrap_or_default();
    if let Some(s) = get_cookie(&h, SESSION_COOKIE) {
        let csrf = form.get("csrf").map(String::as_str).unwrap_or("");
        if !st.grants.csrf_ok(s, csrf) {
            return error_page(StatusCode::FORBIDDEN, "The form could not be verified.");
        }
        let who = match st
            .grants
            .get::<Session>(Kind::Session, s, crate::base::clock::now_secs())
            .await
        {
            Ok(Some((g, _))) => st.accounts.load(&g.user_id).await.ok().flatten(),
            _ => None,
        };
        if let Err(e) = st.grants.delete(Kind::Session, s).await {
            return internal(e);
        }
        if let Some(u) = &who {
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Logout,
                Action::Execute,
                Outcome::Success,
                "signed out",
                Some(u),
                None,
            )
            .await
            {
                return r;
            }
        }
    }
    let mut page = Page::new(StatusCode::OK, "Signed out", signed_out());
    page.cookies.push(clear_cookie(SESSION_COOKIE));
    page.into_response()
}
