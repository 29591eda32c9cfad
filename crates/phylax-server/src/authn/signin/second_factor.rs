//! The second factor: a TOTP code, a recovery code or a passkey.

use crate::authn::signin::consent::after_sign_in;
use crate::authn::signin::flow::{
    active_user, form, new_pending, peer, take_pending, uv_required, value, AuthAudit, Form,
    Pending, SigninError, Stage,
};
use crate::authn::signin::pages::{continue_form, mfa_form, recovery_used_note, Page};
use crate::data::accounts::{AccountError, SecondFactor, User};
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};

/// The second-factor page, with a fresh passkey ceremony (its own
/// challenge) when the user has passkeys.
pub(super) async fn mfa_page(
    st: &AuthnState,
    mut p: Pending,
    user: &User,
    msg: Option<&str>,
    status: StatusCode,
    now: i64,
) -> Result<Response, SigninError> {
    let ceremony = st
        .accounts
        .passkey_challenge(&st.passkeys, user, uv_required(st, user))
        .map_err(SigninError::internal)?;
    let (state, options) = match ceremony {
        Some((c, o)) => (Some(c.0), Some(o)),
        None => (None, None),
    };
    p.stage = Stage::Mfa { passkey: state };
    let (csrf, c) = new_pending(st, &p, now).await?;
    let mut page = Page::new(
        status,
        "Two-step sign-in",
        mfa_form(&csrf, msg, options.as_deref()),
    );
    page.scripts = options.is_some();
    page.cookies.push(c);
    Ok(page.into_response())
}

/// A second-factor attempt in progress: the form, the stage, the user
/// (still active), the passkey ceremony offered on the page, and how long
/// the account's throttle still asks to wait.
struct MfaAttempt {
    form: Form,
    pending: Pending,
    user: User,
    ceremony: Option<Vec<u8>>,
    wait: i64,
}

/// Parse the form and take the pending second-factor stage.
async fn take_mfa_stage(
    st: &AuthnState,
    h: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<MfaAttempt, SigninError> {
    let form = form(body)?;
    let p = take_pending(st, h, &form, now).await?;
    let (Stage::Mfa { passkey }, Some(uid)) = (p.stage.clone(), p.user_id.clone()) else {
        return Err(SigninError::UnexpectedStep);
    };
    let user = active_user(st, &uid).await?;
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
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let a = take_mfa_stage(&st, &h, &body, now).await?;
    let code = value(&a.form, "code");
    let result = if a.wait > 0 {
        Ok(SecondFactor::Refused)
    } else {
        st.accounts.second_factor(a.user.id(), code, now).await
    };
    second_factor_done(&st, a.pending, &a.user, result, a.wait, &ext, now).await
}

/// POST /auth/mfa/passkey: the passkey assertion the page's script posts.
pub async fn mfa_passkey(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let a = take_mfa_stage(&st, &h, &body, now).await?;
    let response = value(&a.form, "passkey");
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
    st: &AuthnState,
    mut p: Pending,
    user: &User,
    result: Result<SecondFactor, AccountError>,
    wait: i64,
    ext: &axum::http::Extensions,
    now: i64,
) -> Result<Response, SigninError> {
    let acct_key = format!("mfa:{}", user.id());
    match result.map_err(SigninError::internal)? {
        SecondFactor::Totp => {
            st.throttle.succeed(&acct_key);
            p.amr.push("otp".into());
            after_sign_in(st, ext, p, user, Vec::new(), now).await
        }
        SecondFactor::Passkey(_) => {
            st.throttle.succeed(&acct_key);
            p.amr.push("hwk".into());
            after_sign_in(st, ext, p, user, Vec::new(), now).await
        }
        SecondFactor::Recovery(left) => {
            st.throttle.succeed(&acct_key);
            recovery_used(st, ext, p, user, left, now).await
        }
        refused @ (SecondFactor::Refused | SecondFactor::PasskeyCloned) => {
            let cloned = refused == SecondFactor::PasskeyCloned;
            second_factor_refused(st, ext, p, user, cloned, wait, now).await
        }
    }
}

/// A recovery code was used: audit it, and say how many are left before
/// going on.
async fn recovery_used(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    mut p: Pending,
    user: &User,
    left: usize,
    now: i64,
) -> Result<Response, SigninError> {
    tracing::warn!(event = "auth.recovery_code_used", user_id = %user.id(), remaining = left, "recovery code used");
    AuthAudit::new(EventKind::Security("mfa"), Action::Execute)
        .detail(format!("recovery code used; {left} left"))
        .user(user)
        .client(&p.req.client_id)
        .record(st, ext)
        .await?;
    p.amr.push("otp".into());
    p.stage = Stage::Continue;
    let (csrf, c) = new_pending(st, &p, now).await?;
    let mut page = Page::new(
        StatusCode::OK,
        "Recovery code used",
        continue_form(&csrf, recovery_used_note(left)),
    );
    page.cookies.push(c);
    Ok(page.into_response())
}

/// A refused second factor (or one refused unchecked while the throttle
/// asks to wait): count it, audit it, and show the page again.
async fn second_factor_refused(
    st: &AuthnState,
    ext: &axum::http::Extensions,
    p: Pending,
    user: &User,
    cloned: bool,
    wait: i64,
    now: i64,
) -> Result<Response, SigninError> {
    let uid = user.id();
    if wait == 0 {
        st.throttle
            .fail(&format!("mfa:{uid}"), crate::base::clock::now_ms());
        let threshold = st.config.auth.lockout_threshold;
        let lockout_secs = st.config.auth.lockout_secs;
        st.accounts
            .record_failure(uid, threshold, lockout_secs, now)
            .await
            .map_err(SigninError::internal)?;
    }
    if cloned {
        tracing::warn!(event = "auth.passkey_cloned", user_id = %uid, peer = %peer(ext), "passkey signature counter went backwards; the passkey is flagged and refused");
    }
    tracing::info!(event = "auth.failure", stage = "mfa", user_id = %uid, peer = %peer(ext), "second factor refused");
    let (kind, detail) = if cloned {
        (
            EventKind::Security("passkey-cloned"),
            "passkey signature counter went backwards: passkey flagged and refused",
        )
    } else {
        (EventKind::Login, "second factor refused")
    };
    AuthAudit::new(kind, Action::Execute)
        .outcome(Outcome::MinorFailure)
        .detail(detail)
        .user(user)
        .client(&p.req.client_id)
        .record(st, ext)
        .await?;
    let msg = if wait > 0 {
        format!("Too many attempts. Wait {wait} seconds and try again.")
    } else if cloned {
        "This passkey was refused: it looks copied. It can no longer be used; ask an administrator."
            .into()
    } else {
        "That did not work: the code is not right or was already used, or the passkey was not accepted. Try again.".into()
    };
    // A fresh page: a new sign-in stage and, for passkeys, a new
    // challenge. The account may have been locked meanwhile.
    let user = active_user(st, uid).await?;
    mfa_page(st, p, &user, Some(&msg), StatusCode::UNAUTHORIZED, now).await
}
