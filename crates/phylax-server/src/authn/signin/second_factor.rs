//! The second factor: a TOTP code, a recovery code or a passkey.

use crate::authn::signin::consent::after_sign_in;
use crate::authn::signin::flow::{
    audit_auth, internal, new_pending, params, peer, take_pending, uv_required, Pending, Stage,
    BAD_LOGIN,
};
use crate::authn::signin::pages::{continue_form, error_page, mfa_form, recovery_used_note, Page};
use crate::data::accounts::{SecondFactor, Status, User};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};
use std::collections::HashMap;
use std::sync::Arc;

/// The second-factor page, with a fresh passkey ceremony (its own
/// challenge) when the user has passkeys.
pub(super) async fn mfa_page(
    st: &AppState,
    mut p: Pending,
    user: &User,
    msg: Option<&str>,
    status: StatusCode,
    now: i64,
) -> Response {
    let ceremony = match st
        .accounts
        .passkey_challenge(&st.passkeys, user, uv_required(st, user))
    {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let (state, options) = match ceremony {
        Some((c, o)) => (Some(c.0), Some(o)),
        None => (None, None),
    };
    p.stage = Stage::Mfa { passkey: state };
    let (csrf, c) = match new_pending(st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut page = Page::new(
        status,
        "Two-step sign-in",
        mfa_form(&csrf, msg, options.as_deref()),
    );
    page.scripts = options.is_some();
    page.cookies.push(c);
    page.into_response()
}

/// A second-factor attempt in progress: the form, the stage, the user
/// (still active), the passkey ceremony offered on the page, and how long
/// the account's throttle still asks to wait.
struct MfaAttempt {
    form: HashMap<String, String>,
    pending: Pending,
    user: User,
    ceremony: Option<Vec<u8>>,
    wait: i64,
}

/// Parse the form and take the pending second-factor stage.
async fn take_mfa_stage(
    st: &AppState,
    h: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<MfaAttempt, Response> {
    let form = params(body).map_err(|m| error_page(StatusCode::BAD_REQUEST, m))?;
    let p = take_pending(st, h, &form, now).await?;
    let (Stage::Mfa { passkey }, Some(uid)) = (p.stage.clone(), p.user_id.clone()) else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Unexpected step; start again from the app.",
        ));
    };
    let user = match st.accounts.load(&uid).await {
        Ok(Some(u)) if u.status() == Some(Status::Active) => u,
        Ok(_) => return Err(error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN)),
        Err(e) => return Err(internal(e)),
    };
    let wait = st
        .throttle
        .wait(&format!("mfa:{uid}"), crate::base::clock::now_ms());
    Ok(MfaAttempt {
        form,
        pending: p,
        user,
        ceremony: passkey,
        wait,
    })
}

/// POST /auth/mfa: a TOTP or recovery code.
pub async fn mfa(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let a = match take_mfa_stage(&st, &h, &body, now).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let code = a.form.get("code").map(String::as_str).unwrap_or("");
    let result = if a.wait > 0 {
        Ok(SecondFactor::Refused)
    } else {
        st.accounts.second_factor(a.user.id(), code, now).await
    };
    second_factor_done(&st, a.pending, &a.user, result, a.wait, &ext, now).await
}

/// POST /auth/mfa/passkey: the passkey assertion the page's script posts.
pub async fn mfa_passkey(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let a = match take_mfa_stage(&st, &h, &body, now).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let response = a.form.get("passkey").map(String::as_str).unwrap_or("");
    let result = match (a.wait, a.ceremony) {
        (0, Some(c)) => {
            st.accounts
                .passkey_sign_in(
                    &st.passkeys,
                    a.user.id(),
                    &phylax_auth::passkey::Ceremony(c),
                    response.as_bytes(),
                    now,
                )
                .await
        }
        _ => Ok(SecondFactor::Refused),
    };
    second_factor_done(&st, a.pending, &a.user, result, a.wait, &ext, now).await
}

/// What follows a second-factor attempt, whichever kind.
async fn second_factor_done(
    st: &AppState,
    mut p: Pending,
    user: &User,
    result: Result<SecondFactor, crate::data::accounts::AccountError>,
    wait: i64,
    ext: &axum::http::Extensions,
    now: i64,
) -> Response {
    let uid = user.id().to_owned();
    let acct_key = format!("mfa:{uid}");
    match result {
        Ok(SecondFactor::Totp) => {
            st.throttle.succeed(&acct_key);
            p.amr.push("otp".into());
            after_sign_in(st, ext, p, user, Vec::new(), now).await
        }
        Ok(SecondFactor::Passkey(_)) => {
            st.throttle.succeed(&acct_key);
            p.amr.push("hwk".into());
            after_sign_in(st, ext, p, user, Vec::new(), now).await
        }
        Ok(SecondFactor::Recovery(left)) => {
            st.throttle.succeed(&acct_key);
            tracing::warn!(event = "auth.recovery_code_used", user_id = %uid, remaining = left, "recovery code used");
            if let Err(r) = audit_auth(
                st,
                ext,
                EventKind::Security("mfa"),
                Action::Execute,
                Outcome::Success,
                format!("recovery code used; {left} left"),
                Some(user),
                Some(&p.req.client_id),
            )
            .await
            {
                return r;
            }
            p.amr.push("otp".into());
            p.stage = Stage::Continue;
            let (csrf, c) = match new_pending(st, &p, now).await {
                Ok(x) => x,
                Err(r) => return r,
            };
            let mut page = Page::new(
                StatusCode::OK,
                "Recovery code used",
                continue_form(&csrf, recovery_used_note(left)),
            );
            page.cookies.push(c);
            page.into_response()
        }
        Ok(refused @ (SecondFactor::Refused | SecondFactor::PasskeyCloned)) => {
            let cloned = refused == SecondFactor::PasskeyCloned;
            if wait == 0 {
                st.throttle.fail(&acct_key, crate::base::clock::now_ms());
                let threshold = st.config.auth.lockout_threshold;
                let lockout_secs = st.config.auth.lockout_secs;
                if let Err(e) = st
                    .accounts
                    .record_failure(&uid, threshold, lockout_secs, now)
                    .await
                {
                    return internal(e);
                }
            }
            if cloned {
                tracing::warn!(event = "auth.passkey_cloned", user_id = %uid, peer = %peer(ext), "passkey signature counter went backwards; the passkey is flagged and refused");
            }
            tracing::info!(event = "auth.failure", stage = "mfa", user_id = %uid, peer = %peer(ext), "second factor refused");
            let detail = if cloned {
                "passkey signature counter went backwards: passkey flagged and refused"
            } else {
                "second factor refused"
            };
            if let Err(r) = audit_auth(
                st,
                ext,
                if cloned {
                    EventKind::Security("passkey-cloned")
                } else {
                    EventKind::Login
                },
                Action::Execute,
                Outcome::MinorFailure,
                detail,
                Some(user),
                Some(&p.req.client_id),
            )
            .await
            {
                return r;
            }
            let msg = if wait > 0 {
                format!("Too many attempts. Wait {wait} seconds and try again.")
            } else if cloned {
                "This passkey was refused: it looks copied. It can no longer be used; ask an administrator.".into()
            } else {
                "That did not work: the code is not right or was already used, or the passkey was not accepted. Try again.".into()
            };
            // A fresh page: a new sign-in stage and, for passkeys, a new
            // challenge. The account may have been locked meanwhile.
            let user = match st.accounts.load(&uid).await {
                Ok(Some(u)) if u.status() == Some(Status::Active) => u,
                Ok(_) => return error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN),
                Err(e) => return internal(e),
            };
            mfa_page(st, p, &user, Some(&msg), StatusCode::UNAUTHORIZED, now).await
        }
        Err(e) => internal(e),
    }
}
