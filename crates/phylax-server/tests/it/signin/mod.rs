//! People signing in through the real HTTP pages, on both backends:
//! enrollment link → password → TOTP enrollment (codes from an independent
//! implementation, Python `pyotp`) → recovery codes → authorization code →
//! PKCE token exchange → FHIR read; a patient's standalone launch with
//! consent; and the hostile cases: wrong and reused codes, replayed codes
//! and refresh tokens, PKCE mismatch, open redirects, CSRF, expired links,
//! lockout, throttling, idle sessions, disabled users across nodes.
//!
//! # Layout
//! - [`code_flow`]: a clinician's whole path: password, TOTP enrollment,
//!   recovery codes, authorization code, PKCE, refresh rotation, sessions,
//!   what the database holds.
//! - [`authorize`]: authorization and token requests that must fail: open
//!   redirects, bad scopes and clients, CSRF, wrong grants.
//! - [`launch`]: a patient's standalone launch with consent, the id token,
//!   signing key rotation, confidential apps.
//! - [`tokens`]: refresh after a narrowed registration, disabled users across
//!   nodes, revocation and introspection.
//! - [`passkeys`]: passkeys: enrollment, sign-in, cloned authenticators, the
//!   account page.
//! - [`password_rehash`]: password hashes made under old settings are
//!   replaced at sign-in.
//! - [`role_reach`]: roles that may skip the second factor, and what each
//!   role reaches.
//! - [`key_rotation`]: the sign-in key rotates while people sign in;
//!   what was made before keeps working until its generation is retired.
//! - [`throttling`]: lockout, scraping, dormant accounts, sign-in floods,
//!   back-off and token rate limits.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use base64::Engine;
use common::{now, TestServer};
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const PASSWORD: &str = "glacier tulip orbit 47 saffron";

/// A browser: its own cookie jar, no automatic redirects.
struct Browser {
    http: reqwest::Client,
    base: String,
    jar: HashMap<String, String>,
}

struct Resp {
    status: u16,
    location: Option<String>,
    body: String,
}

impl Resp {
    fn csrf(&self) -> String {
        field(&self.body, "csrf").unwrap_or_else(|| panic!("no csrf in {}", self.body))
    }
    fn param(&self, k: &str) -> Option<String> {
        let loc = self.location.as_deref()?;
        let q = loc.split_once('?')?.1;
        form_urlencoded::parse(q.as_bytes())
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    }
}

/// The value of a hidden input.
fn field(html: &str, name: &str) -> Option<String> {
    let pat = format!("name=\"{name}\" value=\"");
    let i = html.find(&pat)? + pat.len();
    Some(html[i..i + html[i..].find('"')?].to_owned())
}

fn ca(s: &TestServer) -> Vec<u8> {
    std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap()
}

impl Browser {
    fn new(s: &TestServer) -> Browser {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca(s)).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Browser {
            http,
            base: s.base.clone(),
            jar: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn finish(&mut self, r: reqwest::Response) -> Resp {
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            assert!(
                v.contains("Secure") && v.contains("HttpOnly") && v.contains("SameSite="),
                "{v}"
            );
            let (kv, _) = v.split_once(';').unwrap();
            let (k, val) = kv.split_once('=').unwrap();
            if val.is_empty() || v.contains("Max-Age=0") {
                self.jar.remove(k);
            } else {
                self.jar.insert(k.to_owned(), val.to_owned());
            }
        }
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        if status == 200 || status == 401 {
            let csp = r
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            if r.headers()
                .get("content-type")
                .is_some_and(|c| c.to_str().unwrap().starts_with("text/html"))
            {
                assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
            }
        }
        let body = r.text().await.unwrap();
        Resp {
            status,
            location,
            body,
        }
    }

    async fn get(&mut self, path_and_query: &str) -> Resp {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(r).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(r).await
    }
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let verifier = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(phylax_crypto::random_array::<32>().unwrap());
    let d = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    Pkce {
        challenge: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref()),
        verifier,
    }
}

fn authorize_url(s: &TestServer, client: &str, scope: &str, state: &str, p: &Pkce) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", client)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", state)
        .append_pair("aud", &s.fhir)
        .append_pair("code_challenge", &p.challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("nonce", &format!("n-{state}"))
        .finish();
    format!("/auth/authorize?{q}")
}

async fn add_app(s: &TestServer, scope: &str, first_party: bool) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    s.store
        .add_client(&phylax_store::ClientRecord {
            id: id.clone(),
            name: "Test <App>".into(),
            scope: scope.into(),
            jwks: String::new(),
            disabled: false,
            created_at: 0,
            redirect_uris: vec![REDIRECT.into()],
            public: true,
            first_party,
            cert_bound: false,
        })
        .await
        .unwrap();
    id
}

/// Create a user and set their password through the enrollment link page.
async fn enrolled_user(s: &TestServer, name: &str, role: &str, patient: Option<&str>) {
    let now = chrono::Utc::now().timestamp();
    let (_, link) = s
        .state
        .accounts
        .add_linked(
            name,
            role,
            patient,
            patient.is_none().then_some(CARE_PRACTITIONER),
            3600,
            now,
        )
        .await
        .unwrap();
    let mut b = Browser::new(s);
    let page = b.get(&format!("/auth/enroll?token={link}")).await;
    assert_eq!(page.status, 200);
    assert_eq!(field(&page.body, "token").as_deref(), Some(link.as_str()));
    // Short, common and username-based passwords are refused with a reason.
    for (bad, why) in [
        ("short one", "at least 15"),
        ("passwordpassword1", "too easy"),
        (&format!("{name}{name}{name}{name}")[..], "too easy"),
    ] {
        let r = b
            .post(
                "/auth/enroll",
                &[("token", &link), ("password", bad), ("password2", bad)],
            )
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.body.contains(why), "{bad}: {}", r.body);
        assert!(!r.body.contains(bad), "the password is never echoed");
    }
    let r = b
        .post(
            "/auth/enroll",
            &[
                ("token", &link),
                ("password", PASSWORD),
                ("password2", "different"),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = b
        .post(
            "/auth/enroll",
            &[
                ("token", &link),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Single use.
    let again = b
        .post(
            "/auth/enroll",
            &[
                ("token", &link),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(again.status, 400);
    assert!(again.body.contains("invalid, used or expired"));
}

// ------------------------------------------------------------ TOTP peers

/// The interpreter with pyotp, or None outside CI (then Rust computes the
/// codes, and the interop half is skipped with a note).
fn pyotp() -> Option<String> {
    let py = std::env::var("PHYLAX_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import pyotp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {py} cannot import pyotp: run scripts/test"
    );
    eprintln!("note: pyotp not available; TOTP codes computed in Rust instead (run scripts/test)");
    None
}

/// The code for `uri` at `t` (seconds), from pyotp when available.
fn totp_at(uri: &str, t: i64) -> String {
    if let Some(py) = pyotp() {
        let out = Command::new(py)
            .args([
                "-c",
                "import sys, pyotp; print(pyotp.parse_uri(sys.argv[1]).at(int(sys.argv[2])))",
                uri,
                &t.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap().trim().to_owned();
    }
    let q = uri.split_once('?').unwrap().1;
    let secret = form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "secret")
        .unwrap()
        .1
        .into_owned();
    let raw = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .unwrap();
    phylax_crypto::totp::Totp::from_secret(phylax_crypto::Secret::new(raw))
        .unwrap()
        .code_at(t as u64)
}

fn otpauth_from(html: &str) -> String {
    let i = html.find("href=\"otpauth://").unwrap() + 6;
    let raw = &html[i..i + html[i..].find('"').unwrap()];
    raw.replace("&amp;", "&")
}

/// The next 30-second step's start, so a test can use a code that was not
/// used yet.
/// The audit log's records as (subtype, outcome, AuditEvent), newest first.
async fn audit_events(s: &TestServer) -> Vec<(String, String, Value)> {
    s.state.audit.flush().await.unwrap();
    let rows = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.subtype.clone(),
                r.outcome.clone(),
                s.state.audit.open_row(r).unwrap(),
            )
        })
        .collect()
}

fn has_event(evs: &[(String, String, Value)], subtype: &str, outcome: &str) -> bool {
    evs.iter().any(|(st, o, _)| st == subtype && o == outcome)
}

async fn exchange(s: &TestServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = s.http.post(s.token_url()).form(form).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

fn claims(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap()
}

async fn fhir_get(s: &TestServer, token: &str, path: &str) -> u16 {
    s.http
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The Practitioner every test workforce user is linked to and every
/// `make_patient` patient names as general practitioner: the care
/// relationship clinicians need (tests of reach make their own).
const CARE_PRACTITIONER: &str = "pr-care";

async fn make_patient(s: &TestServer, id: &str) {
    // A GP is a care relationship: the relationship feed writes it.
    let admin = s.feed_token("system/*.cruds");
    let r = s
        .http
        .put(s.url(&format!("/Patient/{id}")))
        .bearer_auth(&admin)
        .header("content-type", "application/fhir+json")
        .body(format!(
            r#"{{"resourceType":"Patient","id":"{id}","name":[{{"family":"Testperson"}}],"generalPractitioner":[{{"reference":"Practitioner/{CARE_PRACTITIONER}"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// A refresh-token grant for public app `app`.
async fn refresh_with(s: &TestServer, app: &str, rt: &str) -> (u16, Value) {
    exchange(
        s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", app),
        ],
    )
    .await
}

/// [`signed_in_tokens`], with the app's client id first.
async fn signed_in_tokens_for(s: &TestServer, name: &str) -> (String, String, String) {
    let (app, at, rt, _) = signed_in_browser(s, &mut Browser::new(s), name).await;
    (app, at, rt)
}

/// A clinician signed in through `b` (which keeps the session): TOTP
/// enrolled, an authorization code exchanged. Returns (app, access token,
/// refresh token, recovery codes).
async fn signed_in_browser(
    s: &TestServer,
    b: &mut Browser,
    name: &str,
) -> (String, String, String, Vec<String>) {
    enrolled_user(s, name, "clinician", None).await;
    let app = add_app(s, "user/*.rs offline_access", true).await;
    let p = pkce();
    let page = b
        .get(&authorize_url(s, &app, "user/*.rs offline_access", "q", &p))
        .await;
    let enroll = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", name),
                ("password", PASSWORD),
            ],
        )
        .await;
    let uri = otpauth_from(&enroll.body);
    let codes = b
        .post(
            "/auth/mfa/enroll",
            &[("csrf", &enroll.csrf()), ("code", &totp_at(&uri, now()))],
        )
        .await;
    let recovery: Vec<String> = codes
        .body
        .split("<li><code>")
        .skip(1)
        .map(|x| x[..x.find('<').unwrap()].to_owned())
        .collect();
    let r = b.post("/auth/continue", &[("csrf", &codes.csrf())]).await;
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &r.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", &app),
            ("code_verifier", &p.verifier),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    (
        app,
        v["access_token"].as_str().unwrap().to_owned(),
        v["refresh_token"].as_str().unwrap().to_owned(),
        recovery,
    )
}

// ------------------------------------------------------------ roles

/// Sign a user whose role may skip the second factor in, and return their
/// access token for `scope`.
async fn password_only_token(s: &TestServer, name: &str, role: &str, scope: &str) -> String {
    enrolled_user(s, name, role, None).await;
    password_sign_in(s, name, scope).await
}

/// Sign an enrolled user (whose role may skip the second factor) in
/// through the pages; returns the access token.
async fn password_sign_in(s: &TestServer, name: &str, scope: &str) -> String {
    let app = add_app(s, "user/*.cruds", true).await;
    let mut b = Browser::new(s);
    let p = pkce();
    let page = b.get(&authorize_url(s, &app, scope, "ro", &p)).await;
    let r = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", name),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &r.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", &app),
            ("code_verifier", &p.verifier),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

mod authorize;
mod code_flow;
mod key_rotation;
mod launch;
mod passkeys;
mod password_rehash;
mod role_reach;
mod throttling;
mod tokens;
