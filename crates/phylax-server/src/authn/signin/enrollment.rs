//! Enrollment: a first second factor (authenticator app or passkey, then
//! recovery codes), and the link from `phylax user add` that sets a first
//! password.

use crate::authn::signin::flow::{
    form, new_pending, params, take_pending, uv_required, value, AuthAudit, Form, Pending,
    SigninError, Stage,
};
use crate::authn::signin::pages::{
    continue_form, enroll_form, enroll_totp_form, enrolled_note, password_set, Page,
};
use crate::data::accounts::{AccountError, Accounts, Status, User};
use crate::state::{Authn, AuthnState};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_audit::event::{Action, EventKind, Outcome};
use phylax_crypto::totp::Totp;

fn otpauth_uri(issuer: &str, account: &str, secret_b32: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let i = utf8_percent_encode(issuer, NON_ALPHANUMERIC).to_string();
    let a = utf8_percent_encode(account, NON_ALPHANUMERIC).to_string();
    format!(
        "otpauth://totp/{i}:{a}?secret={secret_b32}&issuer={i}&algorithm=SHA1&digits=6&period=30"
    )
}

/// The enrollment page: a passkey registration ceremony and the TOTP
/// secret `t` (QR code and key). With `msg` (a failed try) it is a 401.
pub(super) async fn enrollment_page(
    st: &AuthnState,
    mut p: Pending,
    user: &User,
    t: &Totp,
    msg: Option<&str>,
    now: i64,
) -> Result<Response, SigninError> {
    let (c, options) = st
        .accounts
        .passkey_registration(&st.passkeys, user.id(), uv_required(st, user))
        .await
        .map_err(SigninError::internal)?;
    if let Stage::EnrollTotp { passkey, .. } = &mut p.stage {
        *passkey = Some(c.0);
    }
    let (csrf, c) = new_pending(st, &p, now).await?;
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
    Ok(page.into_response())
}

/// The enrollment page again after a failed try, with the same TOTP secret.
async fn enrollment_retry(
    st: &AuthnState,
    p: Pending,
    user: &User,
    secret: &str,
    msg: &str,
    now: i64,
) -> Result<Response, SigninError> {
    let t = Accounts::totp_from_b64(secret)
        .ok_or_else(|| SigninError::internal("enrollment secret unreadable"))?;
    enrollment_page(st, p, user, &t, Some(msg), now).await
}

/// The page after a second factor was enrolled: recovery codes (if new
/// ones were made), then Continue.
async fn enrolled_page(
    st: &AuthnState,
    mut p: Pending,
    codes: Option<Vec<String>>,
    now: i64,
) -> Result<Response, SigninError> {
    p.stage = Stage::Continue;
    let (csrf, c) = new_pending(st, &p, now).await?;
    let note = enrolled_note(codes.as_deref());
    let mut page = Page::new(StatusCode::OK, "Recovery codes", continue_form(&csrf, note));
    page.cookies.push(c);
    Ok(page.into_response())
}

/// An enrollment attempt in progress: the form, the stage, the user (still
/// active, still without a second factor), the TOTP secret on offer and
/// the passkey registration ceremony.
struct EnrollAttempt {
    form: Form,
    pending: Pending,
    user: User,
    secret: String,
    ceremony: Option<Vec<u8>>,
}

/// Parse the form and take the pending enrollment stage.
async fn take_enroll_stage(
    st: &AuthnState,
    h: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<EnrollAttempt, SigninError> {
    let form = form(body)?;
    let p = take_pending(st, h, &form, now).await?;
    let (Stage::EnrollTotp { secret, passkey }, Some(uid)) = (p.stage.clone(), p.user_id.clone())
    else {
        return Err(SigninError::UnexpectedStep);
    };
    let user = match st.accounts.load(&uid).await {
        Ok(Some(u)) if u.status() == Some(Status::Active) && !u.has_mfa() => u,
        Ok(_) => return Err(SigninError::Refused),
        Err(e) => return Err(SigninError::internal(e)),
    };
    Ok(EnrollAttempt {
        form,
        pending: p,
        user,
        secret,
        ceremony: passkey,
    })
}

/// POST /auth/mfa/enroll: confirm the authenticator app with a code.
pub async fn mfa_enroll(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let EnrollAttempt {
        form,
        pending: mut p,
        user,
        secret,
        ..
    } = take_enroll_stage(&st, &h, &body, now).await?;
    let code = value(&form, "code");
    let enrolled = st
        .accounts
        .enroll_totp(user.id(), &secret, code, now)
        .await
        .map_err(SigninError::internal)?;
    let Some(codes) = enrolled else {
        return enrollment_retry(
            &st,
            p,
            &user,
            &secret,
            "That code did not match. Check the time on your phone and try the next code.",
            now,
        )
        .await;
    };
    tracing::info!(event = "auth.mfa_enrolled", user_id = %user.id(), kind = "totp", "TOTP enrolled");
    AuthAudit::new(EventKind::Security("mfa"), Action::Create)
        .detail("TOTP enrolled")
        .user(&user)
        .client(&p.req.client_id)
        .record(&st, &ext)
        .await?;
    p.amr.push("otp".into());
    enrolled_page(&st, p, Some(codes), now).await
}

/// POST /auth/mfa/enroll-passkey: the new passkey the page's script posts.
pub async fn mfa_enroll_passkey(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let EnrollAttempt {
        form,
        pending: mut p,
        user,
        secret,
        ceremony,
    } = take_enroll_stage(&st, &h, &body, now).await?;
    let response = value(&form, "passkey");
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
        None => Err(AccountError::NoSuchPasskey),
    };
    let audit = AuthAudit::new(EventKind::Security("mfa"), Action::Create)
        .user(&user)
        .client(&p.req.client_id);
    match result {
        Ok(codes) => {
            tracing::info!(event = "auth.mfa_enrolled", user_id = %user.id(), kind = "passkey", "passkey registered");
            audit.detail("passkey registered").record(&st, &ext).await?;
            p.amr.push("hwk".into());
            enrolled_page(&st, p, codes, now).await
        }
        Err(e) => {
            tracing::info!(event = "auth.failure", stage = "passkey-registration", user_id = %user.id(), reason = %e, "passkey registration refused");
            audit
                .outcome(Outcome::MinorFailure)
                .detail("passkey registration refused")
                .record(&st, &ext)
                .await?;
            let msg = match e {
                AccountError::BadName => e.to_string(),
                _ => "The passkey could not be registered. Try again, or use an authenticator app."
                    .into(),
            };
            enrollment_retry(&st, p, &user, &secret, &msg, now).await
        }
    }
}

/// GET /auth/enroll?token=…: the link from `phylax user add`.
pub async fn enroll_page(RawQuery(q): RawQuery) -> Result<Response, SigninError> {
    let q = params(q.unwrap_or_default().as_bytes()).unwrap_or_default();
    let token = q.get("token").ok_or(SigninError::bad_request(
        "This enrollment link is incomplete.",
    ))?;
    Ok(Page::new(
        StatusCode::OK,
        "Set your password",
        enroll_form(token, None),
    )
    .into_response())
}

/// POST /auth/enroll
pub async fn enroll_submit(
    State(st): State<Authn>,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Result<Response, SigninError> {
    let now = crate::base::clock::now_secs();
    let form = form(&body)?;
    let token = value(&form, "token");
    let pw = value(&form, "password");
    let again = |problem: &str| {
        Page::new(
            StatusCode::BAD_REQUEST,
            "Set your password",
            enroll_form(token, Some(problem)),
        )
        .into_response()
    };
    if Some(pw) != form.get("password2").map(String::as_str) {
        return Ok(again("The two passwords differ."));
    }
    let u = match st.accounts.enroll(token, pw, now).await {
        Ok(u) => u,
        Err(AccountError::Password(problem)) => return Ok(again(&problem.to_string())),
        Err(AccountError::BadEnrollment) => return Err(SigninError::bad_request(
            "This enrollment link is invalid, used or expired. Ask an administrator for a new one.",
        )),
        Err(e) => return Err(SigninError::internal(e)),
    };
    tracing::info!(event = "auth.enrolled", user_id = %u.id(), "password set from enrollment link");
    AuthAudit::new(EventKind::Security("user"), Action::Update)
        .detail("password set from an enrollment link")
        .user(&u)
        .record(&st, &ext)
        .await?;
    Ok(Page::new(StatusCode::OK, "Password set", password_set()).into_response())
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
