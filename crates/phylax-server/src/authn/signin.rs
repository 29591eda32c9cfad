//! The authorization endpoint and its server-rendered pages: sign-in
//! (password), second factor (TOTP or a recovery code), TOTP enrollment
//! with a QR code, recovery codes, consent, and the enrollment link that
//! sets a first password. Plain HTML forms, no JavaScript.
//!
//! Threats handled (docs/AUTHENTICATION.md has the full design):
//! - **Open redirects**: an unknown client or a redirect URI that is not
//!   registered *exactly* gets an error page here, never a redirect.
//! - **Code interception**: PKCE S256 is required of every client.
//! - **CSRF / login CSRF**: every form carries a token derived (HMAC) from
//!   the sign-in cookie, which is `__Host-`, `Secure`, `HttpOnly` and
//!   `SameSite=Strict`; a cross-site form cannot supply it.
//! - **Session fixation**: each stage of a sign-in replaces the sign-in
//!   cookie, and a completed sign-in gets a brand-new session cookie.
//! - **Enumeration**: unknown users, wrong passwords, locked and disabled
//!   accounts get the same page, status and (Argon2id-dominated) time.
//! - **Online guessing**: growing delays per IP and per account, and a
//!   lockout after `auth.lockout_threshold` failures (passwords and second
//!   factors both count).
//! - **Clickjacking**: `frame-ancestors 'none'`.

use crate::data::accounts::{Accounts, Passkey, SecondFactor, Status, User};
use crate::data::grants::{Kind, Taken};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, Render};
use phylax_audit::event::{Action, EventKind, Outcome, UserRef};
use phylax_auth::pkce::Challenge;
use phylax_auth::smart::{Holder, SmartScopes};
use phylax_crypto::password::Verified;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub const PENDING_COOKIE: &str = "__Host-phylax-signin";
pub const SESSION_COOKIE: &str = "__Host-phylax-session";
/// Time allowed to finish a sign-in.
const PENDING_TTL: i64 = 15 * 60;
/// Authorization codes are redeemed at once by real clients.
pub const CODE_TTL: i64 = 60;
/// Largest form or query string the auth endpoints accept.
pub(crate) const MAX_FORM: usize = 16 * 1024;
/// Longest single value on the sign-in pages (a token endpoint's client
/// assertion may be longer: it uses the whole form limit).
const MAX_PARAM: usize = 2048;

/// The authorization request, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthzRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub state: String,
    pub scope: String,
    pub challenge: String,
    #[serde(default)]
    pub nonce: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Stage {
    Password,
    /// Second factor; `passkey` holds the WebAuthn ceremony offered on the
    /// page (if the user has passkeys).
    Mfa {
        #[serde(default)]
        passkey: Option<Vec<u8>>,
    },
    /// Enrollment: a TOTP secret on offer, and a passkey registration
    /// ceremony.
    EnrollTotp {
        secret: String,
        #[serde(default)]
        passkey: Option<Vec<u8>>,
    },
    /// Waiting for "Continue" after recovery codes were shown.
    Continue,
    Consent {
        granted: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    req: AuthzRequest,
    stage: Stage,
    user_id: Option<String>,
    amr: Vec<String>,
    auth_time: Option<i64>,
    /// Resumed from an existing session (no new sign-in happened).
    #[serde(default)]
    resumed: bool,
}

/// A signed-in browser session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub user_id: String,
    pub auth_time: i64,
    pub amr: Vec<String>,
    pub absolute: i64,
}

/// What an authorization code stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodeDetails {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub challenge: String,
    pub user_id: String,
    pub patient: Option<String>,
    pub auth_time: i64,
    pub amr: Vec<String>,
    pub nonce: Option<String>,
    pub offer_patient: bool,
}

// ---------------------------------------------------------------- HTML
//
// Every page is a maud template: text and attribute values are escaped as
// they are inserted, so no page is assembled from strings by hand.

/// The doctype: a fixed constant, the only markup not made by `html!`.
const DOCTYPE: PreEscaped<&str> = PreEscaped("<!doctype html>");

/// JSON for a `<script type="application/json">` element. A script's text
/// is not HTML-decoded, so entity escaping would corrupt the JSON; what it
/// must not contain is `<` (`</script>`, `<!--`), so every `<` becomes
/// `\u003c`, which JSON reads as the same character.
struct ScriptJson<'a>(&'a str);

impl Render for ScriptJson<'_> {
    fn render_to(&self, buffer: &mut String) {
        buffer.push_str(&self.0.replace('<', "\\u003c"));
    }
}

/// The origin (`scheme://host[:port]`) of a URL, for `form-action`: Chrome
/// applies it to the redirect that follows a form post.
fn origin(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + end])
}

struct Page {
    status: StatusCode,
    title: &'static str,
    body: Markup,
    cookies: Vec<String>,
    /// Extra `form-action` source (the app's redirect origin).
    redirect_origin: Option<String>,
    /// The page loads `/auth/passkey.js`.
    scripts: bool,
}

impl Page {
    fn new(status: StatusCode, title: &'static str, body: Markup) -> Page {
        Page {
            status,
            title,
            body,
            cookies: Vec::new(),
            redirect_origin: None,
            scripts: false,
        }
    }

    fn html(&self) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (self.title) " · Phylax" }
                }
                body { main { h1 { (self.title) } (self.body) } }
            }
        }
    }
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.html().into_string()).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        let form_action = match &self.redirect_origin {
            Some(o) => format!("'self' {o}"),
            None => "'self'".into(),
        };
        // Scripts only from our own origin, and only on pages that need
        // the passkey helper; never inline.
        let script = if self.scripts {
            "; script-src 'self'"
        } else {
            ""
        };
        let csp = format!(
            "default-src 'none'; img-src data:; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'{script}"
        );
        if let Ok(v) = HeaderValue::from_str(&csp) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        for c in self.cookies {
            if let Ok(v) = HeaderValue::from_str(&c) {
                h.append(header::SET_COOKIE, v);
            }
        }
        r
    }
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    Page::new(status, "Cannot sign in", html! { p { (msg) } }).into_response()
}

fn cookie(name: &str, value: &str, same_site: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={max_age}")
}

fn clear_cookie(name: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

fn get_cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Parse a form or query string; a repeated or oversized parameter is an
/// error (parameter pollution).
fn params(raw: &[u8]) -> Result<HashMap<String, String>, &'static str> {
    parse_form(raw, MAX_PARAM)
}

/// Parse an auth endpoint's form: at most [`MAX_FORM`] bytes, values at
/// most `max_value` bytes, no parameter twice.
pub(crate) fn parse_form(
    raw: &[u8],
    max_value: usize,
) -> Result<HashMap<String, String>, &'static str> {
    if raw.len() > MAX_FORM {
        return Err("request too large");
    }
    let mut m = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw) {
        if v.len() > max_value {
            return Err("a parameter is too long");
        }
        if m.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err("a parameter is repeated");
        }
    }
    Ok(m)
}

fn peer_ip(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

/// Record a sign-in or account event in the audit log. Fails closed: when
/// the record cannot be written the caller answers with this error page
/// instead of completing the step.
#[allow(clippy::too_many_arguments)]
async fn audit_auth(
    st: &AppState,
    ext: &axum::http::Extensions,
    kind: EventKind,
    action: Action,
    outcome: Outcome,
    detail: impl Into<String>,
    user: Option<&User>,
    client: Option<&str>,
) -> Result<(), Response> {
    if outcome != Outcome::Success {
        st.metrics.auth_failure(match kind {
            EventKind::Login => "login",
            EventKind::Security("mfa") => "mfa",
            _ => "other",
        });
    }
    let e = crate::audit::log::AuthEvent {
        kind,
        action,
        outcome,
        detail: detail.into(),
        user: user.map(|u| UserRef {
            id: u.id().to_owned(),
            role: u.rec.role.clone(),
        }),
        client: client.map(str::to_owned),
        ip: peer_ip(ext),
    };
    st.audit.record_auth(e).await.map_err(|e| {
        let rid = crate::base::request::request_id().unwrap_or_default();
        tracing::error!(request_id = %rid, error = %e, "audit record not written; sign-in step refused");
        error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is unavailable right now. Try again in a few minutes.",
        )
    })
}

fn peer(ext: &axum::http::Extensions) -> String {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn hidden(name: &str, value: &str) -> Markup {
    html! { input type="hidden" name=(name) value=(value); }
}

/// A message at the top of a form (a refused code, a wait).
fn alert(message: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = message {
            p role="alert" { strong { (m) } }
        }
    }
}

fn login_form(csrf: &str, message: Option<&str>) -> Markup {
    html! {
        (alert(message))
        form method="post" action="/auth/login" {
            (hidden("csrf", csrf))
            p { label { "Username " input name="username" autocomplete="username" required autofocus; } }
            p { label { "Password " input type="password" name="password" autocomplete="current-password" required; } }
            p { button type="submit" { "Sign in" } }
        }
    }
}

/// What a passkey block asks the browser for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PasskeyMode {
    /// Sign in with an existing passkey.
    Get,
    /// Register a new passkey.
    Create,
}

/// The passkey part of a page: the WebAuthn options as JSON for the small
/// script (`/auth/passkey.js`), a button it reveals, and the form it posts
/// (`extra`: more fields for that form). Without JavaScript nothing shows
/// and the other forms still work.
fn passkey_block(
    csrf: &str,
    mode: PasskeyMode,
    options_json: &str,
    action: &str,
    label: &str,
    extra: Markup,
) -> Markup {
    let mode_name = match mode {
        PasskeyMode::Get => "get",
        PasskeyMode::Create => "create",
    };
    html! {
        script type="application/json" id="passkey-options" data-mode=(mode_name) {
            (ScriptJson(options_json))
        }
        form method="post" action=(action) id="passkey-form" {
            (hidden("csrf", csrf))
            input type="hidden" name="passkey" value="";
            (extra)
            @if mode == PasskeyMode::Create {
                p { label { "Name for this passkey " input name="name" value="Passkey" maxlength="64"; } }
            }
            p { button type="button" id="passkey-button" hidden { (label) } }
            p id="passkey-error" role="alert" {}
        }
        script src="/auth/passkey.js" {}
    }
}

fn mfa_form(csrf: &str, message: Option<&str>, passkey: Option<&str>) -> Markup {
    html! {
        (alert(message))
        @if let Some(opts) = passkey {
            (passkey_block(csrf, PasskeyMode::Get, opts, "/auth/mfa/passkey", "Use a passkey", html! {}))
        }
        form method="post" action="/auth/mfa" {
            (hidden("csrf", csrf))
            p {
                label {
                    "Code from your authenticator app, or a recovery code "
                    input name="code" autocomplete="one-time-code" inputmode="text" required autofocus;
                }
            }
            p { button type="submit" { "Verify" } }
        }
    }
}

fn otpauth_uri(issuer: &str, account: &str, secret_b32: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let i = utf8_percent_encode(issuer, NON_ALPHANUMERIC).to_string();
    let a = utf8_percent_encode(account, NON_ALPHANUMERIC).to_string();
    format!(
        "otpauth://totp/{i}:{a}?secret={secret_b32}&issuer={i}&algorithm=SHA1&digits=6&period=30"
    )
}

fn qr_data_uri(text: &str) -> Option<String> {
    use base64::Engine;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .build();
    Some(format!(
        "data:image/svg+xml;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(svg)
    ))
}

fn enroll_totp_form(
    csrf: &str,
    uri: &str,
    secret_b32: &str,
    message: Option<&str>,
    passkey: Option<&str>,
) -> Markup {
    html! {
        (alert(message))
        p { "Your account needs a second factor." }
        @if let Some(opts) = passkey {
            h2 { "A passkey (recommended)" }
            p { "Your device's screen lock, fingerprint or face, or a security key." }
            (passkey_block(csrf, PasskeyMode::Create, opts, "/auth/mfa/enroll-passkey", "Create a passkey", html! {}))
            h2 { "Or an authenticator app" }
        }
        p {
            "Scan this code with an authenticator app \
             (or enter the key by hand), then type the six-digit code it shows."
        }
        @if let Some(img) = qr_data_uri(uri) {
            p { img alt="QR code for your authenticator app" width="200" height="200" src=(img); }
        }
        p { "Key: " code { (secret_b32) } }
        p { a href=(uri) { "Open in an authenticator app on this device" } }
        form method="post" action="/auth/mfa/enroll" {
            (hidden("csrf", csrf))
            p {
                label {
                    "Six-digit code "
                    input name="code" autocomplete="one-time-code" inputmode="numeric" required autofocus;
                }
            }
            p { button type="submit" { "Turn on two-step sign-in" } }
        }
    }
}

fn continue_form(csrf: &str, before: Markup) -> Markup {
    html! {
        (before)
        form method="post" action="/auth/continue" {
            (hidden("csrf", csrf))
            p { button type="submit" { "Continue" } }
        }
    }
}

/// The note after a second factor was enrolled: the new recovery codes, if
/// any were made.
fn enrolled_note(codes: Option<&[String]>) -> Markup {
    html! {
        @if let Some(codes) = codes {
            p {
                "Two-step sign-in is on. These are your recovery codes. Each works once, \
                 if you lose your second factor. Store them somewhere safe now: they will not be shown again."
            }
            ol { @for code in codes { li { code { (code) } } } }
        } @else {
            p { "Two-step sign-in is on." }
        }
    }
}

/// The note after a recovery code was used.
fn recovery_used_note(left: usize) -> Markup {
    html! {
        p {
            "Recovery code accepted. You have " strong { (left) } " recovery code"
            @if left != 1 { "s" }
            " left."
            @if left <= 3 { " Ask an administrator to reset your two-step sign-in soon." }
        }
    }
}

fn consent_form(csrf: &str, app: &str, granted: &SmartScopes) -> Markup {
    let purposes = [
        (granted.launch_patient, "know which patient record is yours"),
        (granted.openid || granted.fhir_user, "know who you are"),
        (
            granted.offline_access,
            "keep access while you are away (until you revoke it)",
        ),
        (granted.online_access, "keep access while you are signed in"),
    ];
    html! {
        p { strong { (app) } " asks to:" }
        ul {
            @for s in granted.resources.iter() { li { code { (s.to_string()) } } }
            @for (on, what) in purposes { @if on { li { (what) } } }
        }
        form method="post" action="/auth/consent" {
            (hidden("csrf", csrf))
            p {
                button type="submit" name="decision" value="allow" { "Allow" }
                " "
                button type="submit" name="decision" value="deny" { "Deny" }
            }
        }
    }
}

// ---------------------------------------------------------------- flow

/// Build the redirect back to the app with `params` (already validated
/// redirect URI; values percent-encoded).
fn redirect_to(uri: &str, params: &[(&str, &str)]) -> Response {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    let loc = format!("{uri}{sep}{}", q.finish());
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn redirect_error(req: &AuthzRequest, error: &str, desc: &str) -> Response {
    let mut p = vec![("error", error), ("error_description", desc)];
    if !req.state.is_empty() {
        p.push(("state", req.state.as_str()));
    }
    redirect_to(&req.redirect_uri, &p)
}

fn internal(e: impl std::fmt::Display) -> Response {
    let rid = crate::base::request::request_id().unwrap_or_default();
    tracing::error!(request_id = %rid, error = %e, "sign-in failed internally");
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in is temporarily unavailable. Try again shortly.",
    )
}

/// Start a stage: a new sign-in cookie (and CSRF token) per stage.
async fn new_pending(st: &AppState, p: &Pending, now: i64) -> Result<(String, String), Response> {
    let secret = st
        .grants
        .create(
            Kind::Pending,
            "signin",
            p.user_id.as_deref().unwrap_or(""),
            p,
            now + PENDING_TTL,
            now,
        )
        .await
        .map_err(internal)?;
    let c = cookie(PENDING_COOKIE, &secret, "Strict", PENDING_TTL);
    Ok((st.grants.csrf(&secret), c))
}

/// The current stage from the sign-in cookie, checked against the form's
/// CSRF token, and consumed (each stage's cookie works once).
async fn take_pending(
    st: &AppState,
    h: &HeaderMap,
    form: &HashMap<String, String>,
    now: i64,
) -> Result<Pending, Response> {
    let expired = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "This sign-in has expired or was already used. Go back to the app and start again.",
        )
    };
    let Some(secret) = get_cookie(h, PENDING_COOKIE) else {
        return Err(expired());
    };
    let csrf = form.get("csrf").map(String::as_str).unwrap_or("");
    if !st.grants.csrf_ok(secret, csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "The form could not be verified. Go back to the app and start again.",
        ));
    }
    match st.grants.take::<Pending>(Kind::Pending, secret, now).await {
        Ok(Taken::Fresh(_, p)) => Ok(p),
        Ok(_) => Err(expired()),
        Err(e) => Err(internal(e)),
    }
}

/// GET /auth/authorize
pub async fn authorize(
    State(st): State<Arc<AppState>>,
    ext: axum::http::Extensions,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let now = crate::base::clock::now_secs();
    let q = match params(q.unwrap_or_default().as_bytes()) {
        Ok(q) => q,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, m),
    };
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    // Client and redirect URI first: until both check out, errors are
    // shown here and never sent anywhere.
    let client = match st.clients.get(get("client_id")).await {
        Ok(Some(c)) if !c.disabled && !c.redirect_uris.is_empty() => c,
        Ok(_) => return error_page(StatusCode::BAD_REQUEST, "Unknown or disabled application."),
        Err(e) => return internal(e),
    };
    let redirect_uri = get("redirect_uri");
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        return error_page(
            StatusCode::BAD_REQUEST,
            "The application's redirect address is not registered.",
        );
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
        return redirect_error(&req, "unsupported_response_type", "only response_type=code");
    }
    if req.state.is_empty() {
        return redirect_error(&req, "invalid_request", "state is required");
    }
    let Some(ch) = Challenge::parse(get("code_challenge"), get("code_challenge_method")) else {
        return redirect_error(
            &req,
            "invalid_request",
            "PKCE with code_challenge_method=S256 is required",
        );
    };
    req.challenge = ch.as_str().to_owned();
    if get("aud") != st.fhir_base {
        return redirect_error(
            &req,
            "invalid_request",
            "aud must be this server's FHIR base URL",
        );
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
        return redirect_error(
            &req,
            "invalid_scope",
            "no requested resource scope can be granted",
        );
    }
    // Already signed in (session cookie, MFA done, account still active)?
    if let Some(sess) = get_cookie(&h, SESSION_COOKIE) {
        if let Ok(Some((_, s))) = st.grants.get::<Session>(Kind::Session, sess, now).await {
            if let Ok(Some(user)) = st.accounts.load(&s.user_id).await {
                if user.status() == Some(Status::Active) {
                    let idle = (now + st.config.auth.session_idle_secs).min(s.absolute);
                    if st.grants.touch(Kind::Session, sess, idle).await.is_ok() {
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
                }
            }
        }
    }
    let p = Pending {
        req,
        stage: Stage::Password,
        user_id: None,
        amr: Vec::new(),
        auth_time: None,
        resumed: false,
    };
    let (csrf, c) = match new_pending(&st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut page = Page::new(StatusCode::OK, "Sign in", login_form(&csrf, None));
    page.cookies.push(c);
    page.into_response()
}

async fn login_again(
    st: &AppState,
    p: Pending,
    msg: &str,
    status: StatusCode,
    now: i64,
) -> Response {
    let (csrf, c) = match new_pending(st, &p, now).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut page = Page::new(status, "Sign in", login_form(&csrf, Some(msg)));
    page.cookies.push(c);
    page.into_response()
}

const BAD_LOGIN: &str =
    "The username or password is not right, or this account cannot sign in now.";

/// POST /auth/login
pub async fn login(
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
    let mut p = match take_pending(&st, &h, &form, now).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !matches!(p.stage, Stage::Password) {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Unexpected step; start again from the app.",
        );
    }
    let username = form.get("username").map(String::as_str).unwrap_or("");
    let password = form.get("password").map(String::as_str).unwrap_or("");
    let ip_key = format!("ip:{}", peer(&ext));
    // Keyed on the name as sign-in matches it (NFKC, trimmed, lower-case):
    // `ｖｉｃｔｉｍ５` is `victim5` here too. A name that cannot be one
    // (empty, too long) is throttled as typed.
    let canonical = crate::data::accounts::normalize_username(username)
        .unwrap_or_else(|_| username.trim().to_lowercase());
    let acct_key = format!(
        "user:{}",
        st.accounts.keyed("throttle", canonical.as_bytes())
    );
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
    let user = match st.accounts.find(username).await {
        Ok(u) => u,
        Err(e) => return internal(e),
    };
    // Always one Argon2id verification, known user or not; when every
    // Argon2id slot stays busy, 503 with Retry-After (not counted as a
    // failure: the password was never checked).
    let verdict = match st.accounts.verify_password(user.as_ref(), password).await {
        Ok(v) => v,
        Err(_) => {
            let mut r = login_again(
                &st,
                p,
                "Too many sign-ins at once. Try again in a few seconds.",
                StatusCode::SERVICE_UNAVAILABLE,
                now,
            )
            .await;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            return r;
        }
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
        if let Some(u) = &user {
            // Counted in the background so the answer takes the same time
            // for known and unknown users.
            let accounts = st.accounts.clone();
            let id = u.id().to_owned();
            let threshold = st.config.auth.lockout_threshold;
            let lockout_secs = st.config.auth.lockout_secs;
            let audit = st.audit.clone();
            let ip = peer_ip(&ext);
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
        tracing::info!(
            event = "auth.failure",
            stage = "password",
            user_id = user.as_ref().map(|u| u.id()).unwrap_or("-"),
            peer = %peer(&ext),
            "sign-in refused"
        );
        if let Err(r) = audit_auth(
            &st,
            &ext,
            EventKind::Login,
            Action::Execute,
            Outcome::MinorFailure,
            if user.is_some() {
                "password refused"
            } else {
                "unknown user or password refused"
            },
            user.as_ref(),
            Some(&p.req.client_id),
        )
        .await
        {
            return r;
        }
        return login_again(&st, p, BAD_LOGIN, StatusCode::UNAUTHORIZED, now).await;
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

fn mfa_required(st: &AppState, user: &User) -> bool {
    !st.config.auth.mfa_optional_roles.contains(&user.rec.role)
}

/// After the password: the second factor, enrollment, or (where a role
/// may go without) straight on.
async fn second_step(
    st: &AppState,
    ext: &axum::http::Extensions,
    mut p: Pending,
    user: &User,
    now: i64,
) -> Response {
    if user.has_mfa() {
        return mfa_page(st, p, user, None, StatusCode::OK, now).await;
    }
    if mfa_required(st, user) {
        let t = match st.accounts.new_totp() {
            Ok(t) => t,
            Err(e) => return internal(e),
        };
        p.stage = Stage::EnrollTotp {
            secret: Accounts::totp_to_b64(&t),
            passkey: None,
        };
        return enrollment_page(st, p, user, &t, None, now).await;
    }
    after_sign_in(st, ext, p, user, Vec::new(), now).await
}

/// Does this user's role require user verification (PIN, biometric) on
/// passkeys?
fn uv_required(st: &AppState, user: &User) -> bool {
    st.config.auth.uv_required_roles.contains(&user.rec.role)
}

/// The second-factor page, with a fresh passkey ceremony (its own
/// challenge) when the user has passkeys.
async fn mfa_page(
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

async fn enrollment_page(
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
async fn after_sign_in(
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

fn add_cookies(r: &mut Response, cookies: &[String]) {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
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

/// A passkey registration on offer on the account page: the WebAuthn
/// options, and the reference to the ceremony kept server-side.
struct AddPasskey {
    options: String,
    ceremony: String,
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

fn account_body(
    csrf: &str,
    message: Option<&str>,
    user: &User,
    add: Option<&AddPasskey>,
) -> Markup {
    html! {
        (alert(message))
        p {
            "Signed in as " strong { (user.username()) } ". Authenticator app: "
            (if user.has_totp() { "on" } else { "off" })
            ". Recovery codes left: " (user.recovery_left()) "."
        }
        h2 { "Passkeys" }
        @if user.passkeys().is_empty() {
            p { "No passkeys yet." }
        }
        ul {
            @for pk in user.passkeys() {
                (passkey_item(csrf, pk))
            }
        }
        @if let Some(add) = add {
            // The add form also names its ceremony and action.
            (passkey_block(
                csrf,
                PasskeyMode::Create,
                &add.options,
                "/auth/account/passkeys",
                "Add a passkey",
                html! { (hidden("action", "add")) (hidden("ceremony", &add.ceremony)) },
            ))
        } @else {
            p {
                "To add or remove passkeys, sign in again (with your second factor) from your app; \
                 changes need a sign-in from the last few minutes."
            }
        }
        form method="post" action="/auth/logout" {
            (hidden("csrf", csrf))
            p { button type="submit" { "Sign out" } }
        }
    }
}

/// One passkey on the account page, with its rename and remove forms.
fn passkey_item(csrf: &str, pk: &Passkey) -> Markup {
    use base64::Engine;
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&pk.cred.id);
    html! {
        li {
            strong { (pk.cred.name) }
            @if pk.flagged { " — refused: it looked copied" }
            " (added " (date(pk.cred.created_at))
            @if let Some(t) = pk.cred.last_used { ", last used " (date(t)) }
            ")"
            form method="post" action="/auth/account/passkeys" {
                (hidden("csrf", csrf))
                (hidden("cred", &id))
                input type="hidden" name="action" value="rename";
                label { "New name " input name="name" maxlength="64" required; }
                " "
                button type="submit" { "Rename" }
            }
            form method="post" action="/auth/account/passkeys" {
                (hidden("csrf", csrf))
                (hidden("cred", &id))
                input type="hidden" name="action" value="remove";
                button type="submit" { "Remove" }
            }
        }
    }
}

fn date(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
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
    let mut page = Page::new(
        StatusCode::OK,
        "Signed out",
        html! { p { "You are signed out." } },
    );
    page.cookies.push(clear_cookie(SESSION_COOKIE));
    page.into_response()
}

fn enroll_form(token: &str, message: Option<&str>) -> Markup {
    html! {
        (alert(message))
        p {
            "Choose a password of at least 15 characters. A few unrelated words make a good one. \
             No special characters are required."
        }
        form method="post" action="/auth/enroll" {
            (hidden("token", token))
            p {
                label {
                    "New password "
                    input type="password" name="password" autocomplete="new-password" minlength="15" required autofocus;
                }
            }
            p { label { "Repeat it " input type="password" name="password2" autocomplete="new-password" required; } }
            p { button type="submit" { "Set password" } }
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
            Page::new(
                StatusCode::OK,
                "Password set",
                html! {
                    p { "Your password is set. Sign in from your app; you will set up two-step sign-in next." }
                },
            )
            .into_response()
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

/// The passkey helper: reads the WebAuthn options the page carries, asks
/// the browser's authenticator, and posts the result. Served from our own
/// origin (the pages' CSP allows only that).
const PASSKEY_JS: &str = r#"// Phylax passkey helper. Needs a browser with WebAuthn JSON support.
(function () {
  var el = document.getElementById('passkey-options');
  var btn = document.getElementById('passkey-button');
  var form = document.getElementById('passkey-form');
  var err = document.getElementById('passkey-error');
  if (!el || !btn || !form || !window.PublicKeyCredential ||
      !PublicKeyCredential.parseRequestOptionsFromJSON) { return; }
  btn.hidden = false;
  btn.addEventListener('click', function () {
    var opts = JSON.parse(el.textContent);
    var p = el.dataset.mode === 'create'
      ? navigator.credentials.create({ publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(opts) })
      : navigator.credentials.get({ publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(opts) });
    p.then(function (cred) {
      form.elements.passkey.value = JSON.stringify(cred.toJSON());
      form.submit();
    }).catch(function (e) {
      err.textContent = 'The passkey was not used (' + e.name + '). Try again or use a code.';
    });
  });
})();
"#;

/// GET /auth/passkey.js
pub async fn passkey_js() -> Response {
    let mut r = (StatusCode::OK, PASSKEY_JS).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_escape_text_attributes_and_script_json() {
        let nasty = "<a href=\"x\">'&'</a>";
        let page = Page::new(StatusCode::OK, "Sign in", login_form(nasty, Some(nasty)))
            .html()
            .into_string();
        assert!(
            page.starts_with("<!doctype html><html lang=\"en\">"),
            "{page}"
        );
        assert!(
            page.contains("<strong>&lt;a href=&quot;x&quot;&gt;'&amp;'&lt;/a&gt;</strong>"),
            "{page}"
        );
        assert!(
            page.contains("name=\"csrf\" value=\"&lt;a href=&quot;x&quot;&gt;'&amp;'&lt;/a&gt;\">"),
            "{page}"
        );
        assert!(!page.contains(nasty));
        // JSON in a script element: no `<` (no `</script>`), quotes intact.
        let block = passkey_block(
            "c",
            PasskeyMode::Get,
            r#"{"name":"</script><b>"}"#,
            "/auth/mfa/passkey",
            "Use a passkey",
            html! {},
        )
        .into_string();
        assert!(
            block.contains(r#"data-mode="get">{"name":"\u003c/script>\u003cb>"}</script>"#),
            "{block}"
        );
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://app.example:8443/cb?x=1"),
            Some("https://app.example:8443")
        );
        assert_eq!(origin("http://127.0.0.1/cb"), Some("http://127.0.0.1"));
        assert_eq!(origin("nonsense"), None);
    }

    #[test]
    fn otpauth_uri_encodes_labels() {
        let u = otpauth_uri("Phylax", "dr.who@example", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            u,
            "otpauth://totp/Phylax:dr%2Ewho%40example?secret=JBSWY3DPEHPK3PXP&issuer=Phylax&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(params(b"a=1&a=2").is_err());
        assert_eq!(params(b"a=1&b=%20").unwrap()["b"], " ");
    }
}
