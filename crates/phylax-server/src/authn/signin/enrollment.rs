//! Enrollment: a first second factor (authenticator app or passkey, then
//! recovery codes), and the link from `phylax user add` that sets a first
//! password.

use crate::authn::signin::flow::{
    audit_auth, internal, new_pending, params, take_pending, uv_required, Pending, Stage, BAD_LOGIN,
};
use crate::authn::signin::pages::{
    continue_form, enroll_form, enroll_totp_form, enrolled_note, error_page, password_set, Page,
};
use crate::data::accounts::{Accounts, Status, User};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};
use std::collections::HashMap;
use std::sync::Arc;

fn otpauth_uri(issuer: &str, account: &str, secret_b32: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let i = utf8_percent_encode(issuer, NON_ALPHANUMERIC).to_string();
    let a = utf8_percent_encode(account, NON_ALPHANUMERIC).to_string();
    format!(
        "otpauth://totp/{i}:{a}?secret={secret_b32}&issuer={i}&algorithm=SHA1&digits=6&period=30"
    )
}

pub(super) async fn enrollment_page(
    st: &AppState,
    mut p: Pending,
    user: &User,
    t: &phylax_crypto::totp::Totp,
    msg: Option<&str>,
    now: i64,
) -> Response {
    let (state, options) = match st
        .accounts
        .passkey_registration(&st.passkeys, user.id(), uv_required(st, user))
        .await
    {
        Ok((c, o)) => (c.0, o),
        Err(e) => return internal(e),
    };
    if let Stage::EnrollTotp { passkey, .. } = &mut p.stage {
        *passkey = Some(state);
    }
    let (csrf, c) = match new_pending(st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let b32 = t.secret_base32();
    let uri = otpauth_uri("Phylax", user.username(), &b32);
    let status = if msg.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let mut page = Page::new(
        status,
        "Set up two-step sign-in",
        enroll_totp_form(&csrf, &uri, &b32, msg, Some(&options)),
    );
    page.scripts = true;
    page.cookies.push(c);
    page.into_response()
}

/// The page after a second factor was enrolled: recovery codes (if new
/// ones were made), then Continue.
async fn enrolled_page(
    st: &AppState,
    mut p: Pending,
    codes: Option<Vec<String>>,
    now: i64,
) -> Response {
    p.stage = Stage::Continue;
    let (csrf, c) = match new_pending(st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let note = enrolled_note(codes.as_deref());
    let mut page = Page::new(StatusCode::OK, "Recovery codes", continue_form(&csrf, note));
    page.cookies.push(c);
    page.into_response()
}

/// Take the pending enrollment stage.
async fn take_enroll_stage(
    st: &AppState,
    h: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<
    (
        HashMap<String, String>,
        Pending,
        User,
        String,
        Option<Vec<u8>>,
    ),
    Response,
> {
    let form = params(body).map_err(|m| error_page(StatusCode::BAD_REQUEST, m))?;
    let p = take_pending(st, h, &form, now).await?;
    let (Stage::EnrollTotp { secret, passkey }, Some(uid)) = (p.stage.clone(), p.user_id.clone())
    else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Unexpected step; start again from the app.",
        ));
    };
    let user = match st.accounts.load(&uid).await {
        Ok(Some(u)) if u.status() == Some(Status::Active) && !u.has_mfa() => u,
        Ok(_) => return Err(error_page(StatusCode::UNAUTHORIZED, BAD_LOGIN)),
        Err(e) => return Err(internal(e)),
    };
    Ok((form, p, user, secret, passkey))
}

/// POST /auth/mfa/enroll: confirm the authenticator app with a code.
pub async fn mfa_enroll(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let (form, mut p, user, secret, _) = match take_enroll_stage(&st, &h, &body, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let code = form.get("code").map(String::as_str).unwrap_or("");
    match st.accounts.enroll_totp(user.id(), &secret, code, now).await {
        Ok(Some(codes)) => {
            tracing::info!(event = "auth.mfa_enrolled", user_id = %user.id(), kind = "totp", "TOTP enrolled");
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Security("mfa"),
                Action::Create,
                Outcome::Success,
                "TOTP enrolled",
                Some(&user),
                Some(&p.req.client_id),
            )
            .await
            {
                return r;
            }
            p.amr.push("otp".into());
            enrolled_page(&st, p, Some(codes), now).await
        }
        Ok(None) => {
            let Some(t) = Accounts::totp_from_b64(&secret) else {
                return internal("enrollment secret unreadable");
            };
            enrollment_page(
                &st,
                p,
                &user,
                &t,
                Some(
                    "That code did not match. Check the time on your phone and try the next code.",
                ),
                now,
            )
            .await
        }
        Err(e) => internal(e),
    }
}

/// POST /auth/mfa/enroll-passkey: the new passkey the page's script posts.
pub async fn mfa_enroll_passkey(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let (form, mut p, user, secret, ceremony) = match take_enroll_stage(&st, &h, &body, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let response = form.get("passkey").map(String::as_str).unwrap_or("");
    let name = form.get("name").map(String::as_str).unwrap_or("Passkey");
    let result = match ceremony {
        Some(c) => {
            st.accounts
                .add_passkey(
                    &st.passkeys,
                    user.id(),
                    &phylax_auth::passkey::Ceremony(c),
                    response.as_bytes(),
                    name,
                    now,
                )
                .await
        }
        None => Err(crate::data::accounts::AccountError::NoSuchPasskey),
    };
    match result {
        Ok(codes) => {
            tracing::info!(event = "auth.mfa_enrolled", user_id = %user.id(), kind = "passkey", "passkey registered");
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Security("mfa"),
                Action::Create,
                Outcome::Success,
                "passkey registered",
                Some(&user),
                Some(&p.req.client_id),
            )
            .await
            {
                return r;
            }
            p.amr.push("hwk".into());
            enrolled_page(&st, p, codes, now).await
        }
        Err(e) => {
            tracing::info!(event = "auth.failure", stage = "passkey-registration", user_id = %user.id(), reason = %e, "passkey registration refused");
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Security("mfa"),
                Action::Create,
                Outcome::MinorFailure,
                "passkey registration refused",
                Some(&user),
                Some(&p.req.client_id),
            )
            .await
            {
                return r;
            }
            let Some(t) = Accounts::totp_from_b64(&secret) else {
                return internal("enrollment secret unreadable");
            };
            let msg = match e {
                crate::data::accounts::AccountError::BadName => e.to_string(),
                _ => "The passkey could not be registered. Try again, or use an authenticator app."
                    .into(),
            };
            enrollment_page(&st, p, &user, &t, Some(&msg), now).await
        }
    }
}

/// GET /auth/enroll?token=…: the link from `phylax user add`.
pub async fn enroll_page(RawQuery(q): RawQuery) -> Response {
    let q = params(q.unwrap_or_default().as_bytes()).unwrap_or_default();
    let Some(token) = q.get("token") else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "This enrollment link is incomplete.",
        );
    };
    Page::new(
        StatusCode::OK,
        "Set your password",
        enroll_form(token, None),
    )
    .into_response()
}

/// POST /auth/enroll
pub async fn enroll_submit(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Response {
    let now = crate::base::clock::now_secs();
    let form = match params(&body) {
        Ok(f) => f,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, m),
    };
    let token = form.get("token").map(String::as_str).unwrap_or("");
    let pw = form.get("password").map(String::as_str).unwrap_or("");
    if Some(pw) != form.get("password2").map(String::as_str) {
        return Page::new(
            StatusCode::BAD_REQUEST,
            "Set your password",
            enroll_form(token, Some("The two passwords differ.")),
        )
        .into_response();
    }
    match st.accounts.enroll(token, pw, now).await {
        Ok(u) => {
            tracing::info!(event = "auth.enrolled", user_id = %u.id(), "password set from enrollment link");
            if let Err(r) = audit_auth(
                &st,
                &ext,
                EventKind::Security("user"),
                Action::Update,
                Outcome::Success,
                "password set from an enrollment link",
                Some(&u),
                None,
            )
            .await
            {
                return r;
            }
            Page::new(StatusCode::OK, "Password set", password_set()).into_response()
        }
        Err(crate::data::accounts::AccountError::Password(problem)) => Page::new(
            StatusCode::BAD_REQUEST,
            "Set your password",
            enroll_form(token, Some(&problem.to_string())),
        )
        .into_response(),
        Err(crate::data::accounts::AccountError::BadEnrollment) => error_page(
            StatusCode::BAD_REQUEST,
            "This enrollment link is invalid, used or expired. Ask an administrator for a new one.",
        ),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otpauth_uri_encodes_labels() {
        let u = otpauth_uri("Phylax", "dr.who@example", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            u,
            "otpauth://totp/Phylax:dr%2Ewho%40example?secret=JBSWY3DPEHPK3PXP&issuer=Phylax&algorithm=SHA1&digits=6&period=30"
        );
    }
}
