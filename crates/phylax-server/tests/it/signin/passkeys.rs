//! Passkeys: enrollment, sign-in, cloned authenticators, the account page.

use super::*;
use phylax_auth::passkey::soft::SoftAuthenticator;

/// The WebAuthn options a page carries for its script.
fn passkey_options(html: &str, mode: &str) -> String {
    let tag = format!("id=\"passkey-options\" data-mode=\"{mode}\">");
    let i = html
        .find(&tag)
        .unwrap_or_else(|| panic!("no {mode} options in {html}"))
        + tag.len();
    html[i..i + html[i..].find("</script>").unwrap()].to_owned()
}

/// Start a sign-in for dr.pk up to the second-factor page.
async fn pk_sign_in(s: &TestServer, app: &str, scope: &str) -> (Browser, Resp, Pkce) {
    let mut b = Browser::new(s);
    let p = pkce();
    let page = b.get(&authorize_url(s, app, scope, "k2", &p)).await;
    let mfa = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.pk"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(mfa.status, 200, "{}", mfa.body);
    (b, mfa, p)
}

async fn passkey_sign_in_body(s: &TestServer) {
    enrolled_user(s, "dr.pk", "clinician", None).await;
    let app = add_app(s, "user/*.rs", true).await;
    let scope = "user/*.rs";
    let mut b = Browser::new(s);
    let mut laptop = passkey_enrollment(s, &mut b, &app, scope).await;
    let clone = laptop.clone();
    passkey_signs_in(s, &app, scope, &mut laptop).await;
    cloned_authenticator_is_refused(s, &app, scope, clone).await;
    let mut key = account_page_manages_passkeys(s, &mut b, &laptop).await;
    remaining_passkey_signs_in(s, &app, scope, &mut key).await;
}

/// First sign-in: the passkey script, phishing and missing user
/// verification refused, then the laptop's passkey enrolled. Returns it.
async fn passkey_enrollment(
    s: &TestServer,
    b: &mut Browser,
    app: &str,
    scope: &str,
) -> SoftAuthenticator {
    let page = b.get(&authorize_url(s, app, scope, "k1", &pkce())).await;
    let enroll = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.pk"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(enroll.status, 200);
    assert!(enroll
        .body
        .contains("<script src=\"/auth/passkey.js\"></script>"));
    // The helper script is served from our origin.
    let js = b.get("/auth/passkey.js").await;
    assert_eq!(js.status, 200);
    assert!(js.body.contains("navigator.credentials.get"));
    // A registration relayed through another origin (phishing) fails.
    let mut phish = SoftAuthenticator::new("https://phylax.example.evil");
    let resp = phish.register(&passkey_options(&enroll.body, "create"));
    let again = b
        .post(
            "/auth/mfa/enroll-passkey",
            &[
                ("csrf", &enroll.csrf()),
                ("passkey", &resp),
                ("name", "evil"),
            ],
        )
        .await;
    assert_eq!(again.status, 401, "{}", again.body);
    // A clinician's passkey must verify the user (PIN or biometric).
    let mut no_uv = SoftAuthenticator::new(&s.base);
    no_uv.uv = false;
    let resp = no_uv.register(&passkey_options(&again.body, "create"));
    let again = b
        .post(
            "/auth/mfa/enroll-passkey",
            &[
                ("csrf", &again.csrf()),
                ("passkey", &resp),
                ("name", "no uv"),
            ],
        )
        .await;
    assert_eq!(again.status, 401);
    // The real thing.
    let mut laptop = SoftAuthenticator::new(&s.base);
    let resp = laptop.register(&passkey_options(&again.body, "create"));
    let codes = b
        .post(
            "/auth/mfa/enroll-passkey",
            &[
                ("csrf", &again.csrf()),
                ("passkey", &resp),
                ("name", "Laptop"),
            ],
        )
        .await;
    assert_eq!(codes.status, 200, "{}", codes.body);
    assert_eq!(
        codes.body.matches("<li><code>").count(),
        10,
        "recovery codes with the first passkey"
    );
    let done = b.post("/auth/continue", &[("csrf", &codes.csrf())]).await;
    assert_eq!(done.status, 303);
    laptop
}

/// Sign in with the passkey from another browser.
async fn passkey_signs_in(s: &TestServer, app: &str, scope: &str, laptop: &mut SoftAuthenticator) {
    let (mut b2, mfa, p2) = pk_sign_in(s, app, scope).await;
    let opts = passkey_options(&mfa.body, "get");
    // Wrong origin and missing user verification are refused.
    let mut bad = laptop.clone();
    bad.origin = "https://phylax.example.evil".into();
    let r = b2
        .post(
            "/auth/mfa/passkey",
            &[("csrf", &mfa.csrf()), ("passkey", &bad.authenticate(&opts))],
        )
        .await;
    assert_eq!(r.status, 401);
    let opts = passkey_options(&r.body, "get");
    let mut bad = laptop.clone();
    bad.uv = false;
    let r = b2
        .post(
            "/auth/mfa/passkey",
            &[("csrf", &r.csrf()), ("passkey", &bad.authenticate(&opts))],
        )
        .await;
    assert_eq!(r.status, 401);
    // An answer to an old challenge (the previous page's) is refused.
    let stale = laptop.authenticate(&opts);
    let r = b2
        .post(
            "/auth/mfa/passkey",
            &[("csrf", &r.csrf()), ("passkey", &stale)],
        )
        .await;
    assert_eq!(r.status, 401, "stale challenge");
    let resp = laptop.authenticate(&passkey_options(&r.body, "get"));
    let ok = b2
        .post(
            "/auth/mfa/passkey",
            &[("csrf", &r.csrf()), ("passkey", &resp)],
        )
        .await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &ok.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &p2.verifier),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(c["amr"], serde_json::json!(["pwd", "hwk"]));
    assert_eq!(c["acr"], "urn:phylax:acr:mfa");
}

/// A clone of the authenticator (same key, stale counter) is detected,
/// flagged and refused from then on; the password alone then opens
/// nothing (recovery codes remain).
async fn cloned_authenticator_is_refused(
    s: &TestServer,
    app: &str,
    scope: &str,
    clone: SoftAuthenticator,
) {
    let (mut b3, mfa, _) = pk_sign_in(s, app, scope).await;
    let mut clone = clone;
    let r = b3
        .post(
            "/auth/mfa/passkey",
            &[
                ("csrf", &mfa.csrf()),
                (
                    "passkey",
                    &clone.authenticate(&passkey_options(&mfa.body, "get")),
                ),
            ],
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("looks copied"), "{}", r.body);
    assert!(
        !r.body.contains("passkey-options"),
        "the flagged passkey is no longer offered"
    );
    assert!(
        !r.body.contains("otpauth://"),
        "no re-enrollment with the password alone"
    );
}

/// The account page: the first browser's session is fresh enough to
/// manage passkeys. It shows the flagged one; a second passkey is added,
/// renamed, and the flagged one removed; the last factor cannot go.
/// Returns the added passkey.
async fn account_page_manages_passkeys(
    s: &TestServer,
    b: &mut Browser,
    laptop: &SoftAuthenticator,
) -> SoftAuthenticator {
    let acct = b.get("/auth/account").await;
    assert_eq!(acct.status, 200, "{}", acct.body);
    assert!(acct.body.contains("Laptop") && acct.body.contains("looked copied"));
    let mut key = SoftAuthenticator::new(&s.base);
    let resp = key.register(&passkey_options(&acct.body, "create"));
    let ceremony = field(&acct.body, "ceremony").unwrap();
    let r = b
        .post(
            "/auth/account/passkeys",
            &[
                ("csrf", &acct.csrf()),
                ("action", "add"),
                ("ceremony", &ceremony),
                ("passkey", &resp),
                ("name", "Security key"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("Passkey added") && r.body.contains("Security key"),
        "{}",
        r.body
    );
    // The ceremony reference works once.
    let r2 = b
        .post(
            "/auth/account/passkeys",
            &[
                ("csrf", &acct.csrf()),
                ("action", "add"),
                ("ceremony", &ceremony),
                ("passkey", &resp),
                ("name", "Again"),
            ],
        )
        .await;
    assert!(r2.body.contains("no such passkey"), "{}", r2.body);
    let id_of = |who: &SoftAuthenticator| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&who.cred_id)
    };
    let r = b
        .post(
            "/auth/account/passkeys",
            &[
                ("csrf", &acct.csrf()),
                ("action", "rename"),
                ("cred", &id_of(&key)),
                ("name", "Blue <key>"),
            ],
        )
        .await;
    assert!(r.body.contains("Blue &lt;key&gt;"), "{}", r.body);
    let r = b
        .post(
            "/auth/account/passkeys",
            &[
                ("csrf", &acct.csrf()),
                ("action", "remove"),
                ("cred", &id_of(laptop)),
            ],
        )
        .await;
    assert!(r.body.contains("Removed."), "{}", r.body);
    let r = b
        .post(
            "/auth/account/passkeys",
            &[
                ("csrf", &acct.csrf()),
                ("action", "remove"),
                ("cred", &id_of(&key)),
            ],
        )
        .await;
    assert!(r.body.contains("last second factor"), "{}", r.body);
    // Forged CSRF, no session.
    let r = b
        .post(
            "/auth/account/passkeys",
            &[("csrf", "x"), ("action", "remove"), ("cred", &id_of(&key))],
        )
        .await;
    assert_eq!(r.status, 403);
    let r = Browser::new(s).get("/auth/account").await;
    assert_eq!(r.status, 401);
    key
}

/// The remaining passkey signs in.
async fn remaining_passkey_signs_in(
    s: &TestServer,
    app: &str,
    scope: &str,
    key: &mut SoftAuthenticator,
) {
    let (mut b4, mfa, _) = pk_sign_in(s, app, scope).await;
    let r = b4
        .post(
            "/auth/mfa/passkey",
            &[
                ("csrf", &mfa.csrf()),
                (
                    "passkey",
                    &key.authenticate(&passkey_options(&mfa.body, "get")),
                ),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
}

mod passkey_sign_in {
    use super::common::{Backend, TestServer};
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let s = TestServer::start(Backend::Sqlite).await.unwrap();
        super::passkey_sign_in_body(&s).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = TestServer::start(Backend::Postgres).await {
            super::passkey_sign_in_body(&s).await;
        }
    }
}
