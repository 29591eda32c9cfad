//! The pages: maud templates and the [`Page`] response (HTML, CSP,
//! cookies). Nothing else in the sign-in builds HTML.
//!
//! Every page is a maud template: text and attribute values are escaped as
//! they are inserted, so no page is assembled from strings by hand.

use crate::data::accounts::{Passkey, User};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, Render};
use phylax_auth::smart::SmartScopes;

/// The doctype: a fixed constant, the only `PreEscaped` on any page.
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
pub(super) fn origin(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + end])
}

pub(super) struct Page {
    status: StatusCode,
    title: &'static str,
    body: Markup,
    pub(super) cookies: Vec<String>,
    /// Extra `form-action` source (the app's redirect origin).
    pub(super) redirect_origin: Option<String>,
    /// The page loads `/auth/passkey.js`.
    pub(super) scripts: bool,
}

impl Page {
    pub(super) fn new(status: StatusCode, title: &'static str, body: Markup) -> Page {
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

/// The page a refused or failed step gets (`SigninError` renders it).
pub(super) fn error_page(status: StatusCode, msg: &str) -> Page {
    Page::new(status, "Cannot sign in", html! { p { (msg) } })
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

pub(super) fn login_form(csrf: &str, message: Option<&str>) -> Markup {
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

pub(super) fn mfa_form(csrf: &str, message: Option<&str>, passkey: Option<&str>) -> Markup {
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

pub(super) fn enroll_totp_form(
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

pub(super) fn continue_form(csrf: &str, before: Markup) -> Markup {
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
pub(super) fn enrolled_note(codes: Option<&[String]>) -> Markup {
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
pub(super) fn recovery_used_note(left: usize) -> Markup {
    html! {
        p {
            "Recovery code accepted. You have " strong { (left) } " recovery code"
            @if left != 1 { "s" }
            " left."
            @if left <= 3 { " Ask an administrator to reset your two-step sign-in soon." }
        }
    }
}

pub(super) fn consent_form(csrf: &str, app: &str, granted: &SmartScopes) -> Markup {
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

/// A passkey registration on offer on the account page: the WebAuthn
/// options, and the reference to the ceremony kept server-side.
pub(super) struct AddPasskey {
    pub(super) options: String,
    pub(super) ceremony: String,
}

pub(super) fn account_body(
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

pub(super) fn enroll_form(token: &str, message: Option<&str>) -> Markup {
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

/// After the enrollment link set a password.
pub(super) fn password_set() -> Markup {
    html! {
        p { "Your password is set. Sign in from your app; you will set up two-step sign-in next." }
    }
}

pub(super) fn signed_out() -> Markup {
    html! { p { "You are signed out." } }
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
}
