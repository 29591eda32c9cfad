//! The authorization endpoint and its server-rendered pages: sign-in
//! (password), second factor (TOTP, a recovery code or a passkey), TOTP
//! enrollment with a QR code, passkeys, recovery codes, consent, the
//! account page, and the enrollment link that sets a first password.
//! Plain HTML forms; passkeys add one small script of our own.
//!
//! # Layout
//! Bottom first; a module imports only modules listed before it.
//! - [`pages`]: the maud templates and the `Page` response: nothing else builds HTML.
//! - [`flow`]: shared plumbing: cookies, forms, pending stages and CSRF, redirects, audit.
//! - [`consent`]: after sign-in: the session, consent and the authorization code.
//! - [`second_factor`]: TOTP, recovery code and passkey verification.
//! - [`enrollment`]: second-factor enrollment and the `phylax user add` enrollment link.
//! - [`login`]: the authorization request and the password.
//! - [`account`]: the account page, passkey management, sign-out.
//!
//! # Threats handled
//! docs/AUTHENTICATION.md has the full design.
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

mod account;
mod consent;
mod enrollment;
mod flow;
mod login;
mod pages;
mod second_factor;

pub use account::{account, account_passkeys, logout};
pub use consent::{consent, proceed};
pub use enrollment::{enroll_page, enroll_submit, mfa_enroll, mfa_enroll_passkey};
pub(crate) use flow::{parse_form, MAX_FORM};
pub use flow::{
    AuthzRequest, CodeDetails, Session, SigninError, CODE_TTL, PENDING_COOKIE, SESSION_COOKIE,
};
pub use login::{authorize, login};
pub use pages::passkey_js;
pub use second_factor::{mfa, mfa_passkey};
