//! People signing in through the real HTTP pages, on both backends:
//! enrollment link → password → TOTP enrollment (codes from an independent
//! implementation, Python `pyotp`) → recovery codes → authorization code →
//! PKCE token exchange → FHIR read; a patient's standalone launch with
//! consent; and the hostile cases: wrong and reused codes, replayed codes
//! and refresh tokens, PKCE mismatch, open redirects, CSRF, expired links,
//! lockout, throttling, idle sessions, disabled users across nodes.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use base64::Engine;
use common::{now, TestServer};
use phylax_server::data::grants::Kind;
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

async fn next_step() -> i64 {
    let t = now();
    let wait = 30 - t % 30;
    tokio::time::sleep(std::time::Duration::from_millis(wait as u64 * 1000 + 200)).await;
    now()
}

async fn exchange(s: &TestServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = s.http.post(s.token_url()).form(form).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

async fn verify_id_token_result(
    s: &TestServer,
    token: &str,
    aud: &str,
) -> Result<Value, jsonwebtoken::errors::Error> {
    let jwks: jsonwebtoken::jwk::JwkSet = s
        .http
        .get(format!("{}/auth/jwks", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = jsonwebtoken::decode_header(token)?.kid.unwrap();
    let jwk = jwks.find(&kid).expect("kid published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[aud]);
    v.set_issuer(&[format!("{}/auth", s.base)]);
    jsonwebtoken::decode::<Value>(token, &key, &v).map(|d| d.claims)
}

async fn verify_id_token(s: &TestServer, token: &str, aud: &str) -> Value {
    verify_id_token_result(s, token, aud).await.unwrap()
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

// ------------------------------------------------------------ the tests

both!(clinician_password_totp_code_token_fhir_read);
async fn clinician_password_totp_code_token_fhir_read(s: &TestServer) {
    make_patient(s, "p1").await;
    enrolled_user(s, "dr.grey", "clinician", None).await;
    let app = add_app(s, "user/*.cruds openid fhirUser offline_access", true).await;
    let scope = "user/Patient.rs openid fhirUser offline_access";

    let mut b = Browser::new(s);
    let p = pkce();
    let unknown = sign_in_refuses_wrong_password_and_forgery(s, &mut b, &app, scope, &p).await;
    let totp = first_sign_in_enrolls_totp(&mut b, &unknown).await;
    pkce_mismatch_burns_the_code(s, &app, &totp.code1, &p).await;
    session_signs_in_without_password(s, &mut b, &app, scope).await;
    let rt1 = refresh_rotation_detects_reuse(s, &mut b, &app, scope).await;
    totp_and_recovery_codes_work_once(s, &app, scope, &totp).await;
    stolen_database_holds_no_secret(s, &b, &totp, &rt1);
    sign_in_steps_are_audited(s).await;
    idle_session_signs_no_one_in(s, &mut b, &app, scope).await;
}

/// What the clinician's first sign-in (TOTP enrollment) produced.
struct Enrolled {
    uri: String,
    secret_b32: String,
    enroll_code: String,
    recovery: Vec<String>,
    code1: String,
}

/// Sign in: the login page, wrong password, unknown user. Returns the
/// unknown-user page (its CSRF token carries the sign-in on).
async fn sign_in_refuses_wrong_password_and_forgery(
    s: &TestServer,
    b: &mut Browser,
    app: &str,
    scope: &str,
    p: &Pkce,
) -> Resp {
    let page = b.get(&authorize_url(s, app, scope, "st-1", p)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("name=\"username\"") && page.body.contains("name=\"password\""));
    let wrong = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.grey"),
                ("password", "not the password at all"),
            ],
        )
        .await;
    assert_eq!(wrong.status, 401);
    let unknown = b
        .post(
            "/auth/login",
            &[
                ("csrf", &wrong.csrf()),
                ("username", "nobody"),
                ("password", "not the password at all"),
            ],
        )
        .await;
    assert_eq!(unknown.status, 401);
    let strip = |r: &Resp| r.body.replace(&r.csrf(), "");
    assert_eq!(strip(&wrong), strip(&unknown), "no enumeration: same page");
    // A stale stage cookie (each stage's cookie works once) and a forged
    // CSRF token are refused.
    let forged = b
        .post(
            "/auth/login",
            &[
                ("csrf", "forged"),
                ("username", "dr.grey"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(forged.status, 403);
    let mut nocookie = Browser::new(s);
    let r = nocookie
        .post(
            "/auth/login",
            &[
                ("csrf", &unknown.csrf()),
                ("username", "dr.grey"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 400, "no sign-in cookie");
    unknown
}

/// Right password: MFA is mandatory, so enrollment comes first.
async fn first_sign_in_enrolls_totp(b: &mut Browser, unknown: &Resp) -> Enrolled {
    let enroll = b
        .post(
            "/auth/login",
            &[
                ("csrf", &unknown.csrf()),
                ("username", "Dr.Grey "),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(enroll.status, 200, "{}", enroll.body);
    assert!(
        enroll.body.contains("data:image/svg+xml;base64,"),
        "QR code"
    );
    let uri = otpauth_from(&enroll.body);
    assert!(
        uri.starts_with("otpauth://totp/Phylax:dr%2Egrey?secret="),
        "{uri}"
    );
    assert!(uri.contains("algorithm=SHA1&digits=6&period=30"));
    // Phylax and pyotp agree on codes at arbitrary times.
    let secret_b32 = form_urlencoded::parse(uri.split_once('?').unwrap().1.as_bytes())
        .find(|(k, _)| k == "secret")
        .unwrap()
        .1
        .into_owned();
    let ours = phylax_crypto::totp::Totp::from_secret(phylax_crypto::Secret::new(
        data_encoding::BASE32_NOPAD
            .decode(secret_b32.as_bytes())
            .unwrap(),
    ))
    .unwrap();
    for t in [59, 1_111_111_109, 2_000_000_000, now()] {
        assert_eq!(totp_at(&uri, t), ours.code_at(t as u64), "t={t}");
    }
    let bad = b
        .post(
            "/auth/mfa/enroll",
            &[("csrf", &enroll.csrf()), ("code", "000000")],
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(otpauth_from(&bad.body), uri, "same secret offered again");
    let enroll_code = totp_at(&uri, now());
    let codes_page = b
        .post(
            "/auth/mfa/enroll",
            &[("csrf", &bad.csrf()), ("code", &enroll_code)],
        )
        .await;
    assert_eq!(codes_page.status, 200, "{}", codes_page.body);
    let recovery: Vec<String> = codes_page
        .body
        .split("<li><code>")
        .skip(1)
        .map(|x| x[..x.find('<').unwrap()].to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);
    let done = b
        .post("/auth/continue", &[("csrf", &codes_page.csrf())])
        .await;
    assert_eq!(done.status, 303);
    assert!(done.location.as_deref().unwrap().starts_with(REDIRECT));
    assert_eq!(done.param("state").as_deref(), Some("st-1"));
    let code1 = done.param("code").unwrap();
    assert!(b.jar.contains_key("__Host-phylax-session"));
    Enrolled {
        uri,
        secret_b32,
        enroll_code,
        recovery,
        code1,
    }
}

/// PKCE mismatch burns the code; the replay then revokes its family.
async fn pkce_mismatch_burns_the_code(s: &TestServer, app: &str, code1: &str, p: &Pkce) {
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", code1),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &pkce().verifier),
        ],
    )
    .await;
    assert_eq!((st, v["error"].as_str()), (400, Some("invalid_grant")));
    let (st, _) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", code1),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &p.verifier),
        ],
    )
    .await;
    assert_eq!(st, 400, "a code works once");
}

/// The session signs the next authorization in without a password.
async fn session_signs_in_without_password(
    s: &TestServer,
    b: &mut Browser,
    app: &str,
    scope: &str,
) {
    let p2 = pkce();
    let r = b.get(&authorize_url(s, app, scope, "st-2", &p2)).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let code2 = r.param("code").unwrap();
    let good = [
        ("grant_type", "authorization_code"),
        ("code", code2.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", app),
        ("code_verifier", p2.verifier.as_str()),
    ];
    // A code presented by another client or with another redirect URI is
    // refused (and burned).
    let other_app = add_app(s, "user/*.cruds", true).await;
    for (k, v) in [
        ("client_id", other_app.as_str()),
        ("redirect_uri", "http://127.0.0.1:9/other"),
    ] {
        let pb = pkce();
        let r = b.get(&authorize_url(s, app, scope, "st-x", &pb)).await;
        let code = r.param("code").unwrap();
        let mut f = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", pb.verifier.as_str()),
        ];
        f.retain(|(n, _)| *n != k);
        f.push((k, v));
        let (st, e) = exchange(s, &f).await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "{k}"
        );
    }
    let (st, v) = exchange(s, &good).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["scope"], "openid fhirUser offline_access user/Patient.rs");
    // The workforce user's linked Practitioner is their fhirUser (token
    // response and id_token).
    let practitioner = format!("{}/Practitioner/{CARE_PRACTITIONER}", s.fhir);
    assert_eq!(v["fhirUser"], practitioner);
    assert_eq!(
        claims(v["id_token"].as_str().unwrap())["fhirUser"],
        practitioner
    );
    assert!(v["expires_in"].as_i64().unwrap() <= 600);
    let at = v["access_token"].as_str().unwrap().to_owned();
    let c = claims(&at);
    assert_eq!(c["role"], "clinician");
    assert_eq!(c["acr"], "urn:phylax:acr:mfa");
    assert_eq!(c["amr"], serde_json::json!(["pwd", "otp"]));
    assert_eq!(
        fhir_get(s, &at, "/Patient/p1").await,
        200,
        "FHIR read with the user's token"
    );
    assert_eq!(
        fhir_get(s, &at, "/Observation?code=x").await,
        403,
        "outside the granted scopes"
    );
    // Replaying code2 revokes everything minted from it.
    let (st, _) = exchange(s, &good).await;
    assert_eq!(st, 400);
    assert_eq!(
        fhir_get(s, &at, "/Patient/p1").await,
        401,
        "family revoked at once on this node"
    );
}

/// Refresh rotation with reuse detection. Returns the first refresh token.
async fn refresh_rotation_detects_reuse(
    s: &TestServer,
    b: &mut Browser,
    app: &str,
    scope: &str,
) -> String {
    let p3 = pkce();
    let r = b.get(&authorize_url(s, app, scope, "st-3", &p3)).await;
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &r.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &p3.verifier),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let rt1 = v["refresh_token"].as_str().unwrap().to_owned();
    let (st, v2) = exchange(
        s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("client_id", app),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v2}");
    let rt2 = v2["refresh_token"].as_str().unwrap().to_owned();
    let at2 = v2["access_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2, "rotated");
    assert_eq!(fhir_get(s, &at2, "/Patient/p1").await, 200);
    let (st, _) = exchange(
        s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("client_id", app),
        ],
    )
    .await;
    assert_eq!(st, 400, "rotated-out token replayed");
    let (st, _) = exchange(
        s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt2),
            ("client_id", app),
        ],
    )
    .await;
    assert_eq!(st, 400, "the replay revoked the whole family");
    assert_eq!(fhir_get(s, &at2, "/Patient/p1").await, 401);
    rt1
}

/// A new browser: the enrollment's TOTP code cannot be used again, wrong
/// codes fail, a recovery code works once and says what is left.
async fn totp_and_recovery_codes_work_once(s: &TestServer, app: &str, scope: &str, e: &Enrolled) {
    let Enrolled {
        uri,
        enroll_code,
        recovery,
        ..
    } = e;
    let mut b2 = Browser::new(s);
    let page = b2.get(&authorize_url(s, app, scope, "st-4", &pkce())).await;
    let mfa = b2
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.grey"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(mfa.status, 200);
    assert!(mfa.body.contains("name=\"code\""));
    let replay = b2
        .post("/auth/mfa", &[("csrf", &mfa.csrf()), ("code", enroll_code)])
        .await;
    assert_eq!(replay.status, 401, "a TOTP code works once");
    let wrong = b2
        .post("/auth/mfa", &[("csrf", &replay.csrf()), ("code", "12345")])
        .await;
    assert_eq!(wrong.status, 401);
    let rec = b2
        .post(
            "/auth/mfa",
            &[
                ("csrf", &wrong.csrf()),
                ("code", &recovery[3].to_uppercase()),
            ],
        )
        .await;
    assert_eq!(rec.status, 200, "{}", rec.body);
    assert!(
        rec.body.contains("<strong>9</strong> recovery codes left"),
        "{}",
        rec.body
    );
    let r = b2.post("/auth/continue", &[("csrf", &rec.csrf())]).await;
    assert_eq!(r.status, 303);
    // The same recovery code again, in yet another browser: refused.
    let mut b3 = Browser::new(s);
    let page = b3.get(&authorize_url(s, app, scope, "st-5", &pkce())).await;
    let mfa = b3
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.grey"),
                ("password", PASSWORD),
            ],
        )
        .await;
    let again = b3
        .post(
            "/auth/mfa",
            &[("csrf", &mfa.csrf()), ("code", &recovery[3])],
        )
        .await;
    assert_eq!(again.status, 401);
    // A fresh TOTP code from pyotp (next step) works.
    let t = next_step().await;
    let ok = b3
        .post(
            "/auth/mfa",
            &[("csrf", &again.csrf()), ("code", &totp_at(uri, t))],
        )
        .await;
    assert_eq!(ok.status, 303, "{}", ok.body);
}

/// A stolen database file holds no username, password, TOTP secret,
/// recovery code or bearer secret (SQLite: the file and its WAL).
fn stolen_database_holds_no_secret(s: &TestServer, b: &Browser, e: &Enrolled, rt1: &str) {
    let Enrolled {
        secret_b32,
        recovery,
        ..
    } = e;
    if s.backend == common::Backend::Sqlite {
        let mut db = std::fs::read(s.data_dir.join("phylax.db")).unwrap();
        if let Ok(w) = std::fs::read(s.data_dir.join("phylax.db-wal")) {
            db.extend(w);
        }
        let raw_secret = data_encoding::BASE32_NOPAD
            .decode(secret_b32.as_bytes())
            .unwrap();
        let session = b.jar["__Host-phylax-session"].clone();
        let mut needles: Vec<Vec<u8>> = vec![
            b"dr.grey".to_vec(),
            PASSWORD.as_bytes().to_vec(),
            b"$argon2id$".to_vec(),
            secret_b32.as_bytes().to_vec(),
            raw_secret,
            session.into_bytes(),
            rt1.as_bytes().to_vec(),
        ];
        needles.extend(recovery.iter().map(|c| c.clone().into_bytes()));
        for n in needles {
            assert!(
                !db.windows(n.len()).any(|w| w == n.as_slice()),
                "{} found in the database",
                String::from_utf8_lossy(&n)
            );
        }
    }
}

/// Every step is in the audit log, with no secret or name in it.
async fn sign_in_steps_are_audited(s: &TestServer) {
    let evs = audit_events(s).await;
    for (sub, out) in [
        ("login", "0"),
        ("login", "4"),
        ("mfa", "0"),
        ("token", "0"),
        ("token", "4"),
        ("token-replay", "4"),
    ] {
        assert!(has_event(&evs, sub, out), "no {sub}/{out} record");
    }
    let login = evs
        .iter()
        .find(|(st, o, _)| st == "login" && o == "0")
        .unwrap();
    assert_eq!(login.2["type"]["code"], "110114");
    assert!(login.2["outcomeDesc"].as_str().unwrap().contains("otp"));
    assert_eq!(
        login.2["agent"][0]["role"][0]["coding"][0]["code"],
        "clinician"
    );
    let text = serde_json::to_string(&evs.iter().map(|e| &e.2).collect::<Vec<_>>()).unwrap();
    assert!(
        !text.contains(PASSWORD) && !text.contains("dr.grey"),
        "secret or username in the log"
    );
}

/// An idle session no longer signs anyone in.
async fn idle_session_signs_no_one_in(s: &TestServer, b: &mut Browser, app: &str, scope: &str) {
    let sess = b.jar["__Host-phylax-session"].clone();
    let h = s.state.authn.grants.hash(Kind::Session, &sess);
    s.store.touch_grant("session", &h, now() - 1).await.unwrap();
    let r = b.get(&authorize_url(s, app, scope, "st-6", &pkce())).await;
    assert_eq!(r.status, 200, "sign-in page again after the idle timeout");
    assert!(r.body.contains("name=\"password\""));
}

both!(authorization_requests_that_must_fail);
async fn authorization_requests_that_must_fail(s: &TestServer) {
    let app = add_app(s, "user/*.rs", true).await;
    let mut b = Browser::new(s);
    let p = pkce();
    let ok = authorize_url(s, &app, "user/*.rs", "x", &p);
    // Open redirects: unregistered, prefix-extended, other port or path.
    for evil in [
        "https://evil.example/cb",
        "http://127.0.0.1:9/callbackx",
        "http://127.0.0.1:9/callback/../x",
        "http://127.0.0.1:10/callback",
        "http://127.0.0.1:9/callback?x=1",
    ] {
        let url = ok.replace(
            &form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
            &form_urlencoded::byte_serialize(evil.as_bytes()).collect::<String>(),
        );
        let r = b.get(&url).await;
        assert_eq!(r.status, 400, "{evil}");
        assert!(r.location.is_none(), "never redirected to {evil}");
    }
    // Unknown client: error page, no redirect.
    let r = b.get(&ok.replace(&app, "no-such-client")).await;
    assert_eq!((r.status, r.location.is_none()), (400, true));
    // Repeated parameters.
    let r = b.get(&format!("{ok}&state=y")).await;
    assert_eq!(r.status, 400);
    // Errors after the redirect URI is known go back to the app.
    let cases = [
        (ok.replace("&state=x", ""), "invalid_request"),
        (
            ok.replace("code_challenge_method=S256", "code_challenge_method=plain"),
            "invalid_request",
        ),
        (
            ok.replace(
                &format!("code_challenge={}", p.challenge),
                "code_challenge=short",
            ),
            "invalid_request",
        ),
        (
            ok.replace("response_type=code", "response_type=token"),
            "unsupported_response_type",
        ),
        (ok.replace("scope=user", "scope=system"), "invalid_scope"),
        (
            ok.replace(
                &form_urlencoded::byte_serialize(s.fhir.as_bytes()).collect::<String>(),
                "https%3A%2F%2Fother.example%2Ffhir",
            ),
            "invalid_request",
        ),
    ];
    for (url, err) in cases {
        let r = b.get(&url).await;
        assert_eq!(r.status, 303, "{url}");
        assert!(r.location.as_deref().unwrap().starts_with(REDIRECT));
        assert_eq!(r.param("error").as_deref(), Some(err), "{url}");
    }
    // Expired enrollment link.
    let (_, link) = s
        .state
        .accounts
        .add("late", "clinician", None, 300, now() - 600)
        .await
        .unwrap();
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
    assert_eq!(r.status, 400);
    // A tampered link.
    let (_, link) = s
        .state
        .accounts
        .add("tamper", "clinician", None, 3600, now())
        .await
        .unwrap();
    let mut t = link.clone();
    t.pop();
    t.push(if link.ends_with('A') { 'B' } else { 'A' });
    let r = b
        .post(
            "/auth/enroll",
            &[
                ("token", &t),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    // Token endpoint: a confidential-looking exchange without a client.
    let (st, v) = exchange(s, &[("grant_type", "authorization_code"), ("code", "x")]).await;
    assert_eq!((st, v["error"].as_str()), (401, Some("invalid_client")));
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", "x"),
            ("client_id", &app),
        ],
    )
    .await;
    assert_eq!((st, v["error"].as_str()), (400, Some("invalid_grant")));
    let (st, v) = exchange(s, &[("grant_type", "password"), ("client_id", &app)]).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
}

async fn lockout_body(s: &TestServer) {
    enrolled_user(s, "nurse.joy", "clinician", None).await;
    let app = add_app(s, "user/*.rs", true).await;
    let mut b = Browser::new(s);
    let mut page = b
        .get(&authorize_url(s, &app, "user/*.rs", "s", &pkce()))
        .await;
    // The same account however its name is typed: full-width letters
    // are the same name after NFKC, for the lock and for the delay.
    for name in ["nurse.joy", "ＮＵＲＳＥ.ＪＯＹ", " Nurse.Joy"] {
        page = b
            .post(
                "/auth/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", name),
                    ("password", "wrong wrong wrong wrong"),
                ],
            )
            .await;
        assert_eq!(page.status, 401);
    }
    let acct_key = format!(
        "user:{}",
        s.state.accounts.keyed("throttle", "nurse.joy".as_bytes())
    );
    // The failures were counted under the name as sign-in matches it (an
    // entry exists: asked "as of the epoch", its wait is positive).
    assert!(
        s.state.authn.throttle.wait(&acct_key, 0) > 0,
        "the per-account delay counts every spelling"
    );
    // The failure count is written in the background; wait for the lock.
    let mut locked = false;
    for _ in 0..50 {
        let u = s.state.accounts.find("nurse.joy").await.unwrap().unwrap();
        if u.rec.status == "locked" {
            locked = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(locked, "locked after three failures");
    // The lockout is recorded (after the failure's response, in the
    // background), as are the failed sign-ins.
    let mut recorded = false;
    for _ in 0..50 {
        if has_event(&audit_events(s).await, "lockout", "0") {
            recorded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recorded, "lockout audited");
    assert!(has_event(&audit_events(s).await, "login", "4"));
    let r = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(
        r.status, 401,
        "the right password does not open a locked account"
    );
    assert!(r.body.contains("cannot sign in now"));
    // Four failures from this address: the next attempt must wait.
    let r2 = b
        .post(
            "/auth/login",
            &[
                ("csrf", &r.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r2.status, 429, "{}", r2.body);
    assert!(r2.body.contains("Too many attempts"));
    // Unlocked by an administrator, after the delay the password works
    // (and the second factor is next).
    let id = s
        .state
        .accounts
        .find("nurse.joy")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    s.state
        .accounts
        .set_status(&id, phylax_server::data::accounts::Status::Active, now())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r3 = b
        .post(
            "/auth/login",
            &[
                ("csrf", &r2.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r3.status, 200, "{}", r3.body);
    assert!(r3.body.contains("otpauth://"));
}

mod lockout {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| c.auth.lockout_threshold = 3).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::lockout_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::lockout_body(&s).await;
        }
    }
}

async fn patient_launch_body(s: &TestServer) {
    make_patient(s, "pat-1").await;
    make_patient(s, "pat-2").await;
    enrolled_user(s, "jane", "patient", Some("pat-1")).await;
    let app = add_app(
        s,
        "patient/*.rs launch/patient openid fhirUser offline_access",
        false,
    )
    .await;
    let scope = "launch/patient patient/Patient.rs patient/Observation.rs openid fhirUser";
    let mut b = Browser::new(s);
    let p = pkce();
    let v = patient_consents_to_the_launch(s, &mut b, &app, scope, &p).await;
    let at = v["access_token"].as_str().unwrap();
    assert_eq!(claims(at)["acr"], "urn:phylax:acr:pwd");
    access_log_and_id_token(s, &v, at, &app).await;
    signing_key_rotation(s, &mut b, &app, scope, &v).await;
    confidential_app_must_authenticate(s, &mut b).await;
    patient_reaches_only_their_compartment(s, at).await;
}

/// The patient signs in and decides on the third-party app's consent:
/// denied first, then allowed. Returns the token response.
async fn patient_consents_to_the_launch(
    s: &TestServer,
    b: &mut Browser,
    app: &str,
    scope: &str,
    p: &Pkce,
) -> Value {
    let page = b.get(&authorize_url(s, app, scope, "pl", p)).await;
    let consent = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "jane"),
                ("password", PASSWORD),
            ],
        )
        .await;
    // Patients may go without a second factor here (configured), and a
    // third-party app needs the patient's consent.
    assert_eq!(consent.status, 200, "{}", consent.body);
    assert!(
        consent.body.contains("Test &lt;App&gt;"),
        "escaped app name"
    );
    assert!(consent.body.contains("patient/Observation.rs"));
    // Denying sends the app an error.
    let denied = b
        .post(
            "/auth/consent",
            &[("csrf", &consent.csrf()), ("decision", "deny")],
        )
        .await;
    assert_eq!(denied.status, 303);
    assert_eq!(denied.param("error").as_deref(), Some("access_denied"));
    assert_eq!(denied.param("state").as_deref(), Some("pl"));
    // Again (the session now exists), allowing this time.
    let consent = b.get(&authorize_url(s, app, scope, "pl2", p)).await;
    assert_eq!(consent.status, 200, "consent again");
    let allowed = b
        .post(
            "/auth/consent",
            &[("csrf", &consent.csrf()), ("decision", "allow")],
        )
        .await;
    assert_eq!(allowed.status, 303);
    let (st, v) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &allowed.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &p.verifier),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["patient"], "pat-1", "launch context");
    assert_eq!(v["fhirUser"], format!("{}/Patient/pat-1", s.fhir));
    assert!(
        v.get("refresh_token").is_none(),
        "offline_access was not requested"
    );
    v
}

/// The patient's own access log, and the id_token, checked independently.
async fn access_log_and_id_token(s: &TestServer, v: &Value, at: &str, app: &str) {
    // "Who looked at my record": the patient's own access log, without
    // the staff's network details; not another patient's.
    let r = s
        .http
        .get(s.url("/Patient/pat-1/$access-log"))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log: Value = r.json().await.unwrap();
    assert!(!log["entry"].as_array().unwrap().is_empty(), "{log}");
    assert!(
        !log.to_string().contains("\"network\""),
        "forensic fields stripped"
    );
    assert_eq!(fhir_get(s, at, "/Patient/pat-2/$access-log").await, 403);
    // The id_token verifies against the published JWKS (an independent
    // JWT library), for this app, with the nonce and fhirUser.
    let idt = verify_id_token(s, v["id_token"].as_str().unwrap(), app).await;
    assert_eq!(idt["nonce"], "n-pl2");
    assert_eq!(idt["fhirUser"], format!("{}/Patient/pat-1", s.fhir));
    assert_eq!(idt["iss"], format!("{}/auth", s.base));
    assert!(
        verify_id_token_result(s, v["id_token"].as_str().unwrap(), "another-app")
            .await
            .is_err()
    );
}

/// Rotation: a new key signs, the old one stays published.
async fn signing_key_rotation(s: &TestServer, b: &mut Browser, app: &str, scope: &str, v: &Value) {
    s.state.keys.rotate_signing().await.unwrap();
    s.state.refresh_disabled().await.unwrap();
    let jwks: Value = s
        .http
        .get(format!("{}/auth/jwks", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec!["sig-2", "sig-1"]);
    let p2 = pkce();
    let again = b.get(&authorize_url(s, app, scope, "pl3", &p2)).await;
    let allowed = b
        .post(
            "/auth/consent",
            &[("csrf", &again.csrf()), ("decision", "allow")],
        )
        .await;
    let (_, v2) = exchange(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &allowed.param("code").unwrap()),
            ("redirect_uri", REDIRECT),
            ("client_id", app),
            ("code_verifier", &p2.verifier),
        ],
    )
    .await;
    let t2 = v2["id_token"].as_str().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t2.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], "sig-2");
    verify_id_token(s, t2, app).await;
    verify_id_token(s, v["id_token"].as_str().unwrap(), app).await;
}

/// A confidential app must authenticate with its private_key_jwt
/// assertion; its client_id alone is not enough.
async fn confidential_app_must_authenticate(s: &TestServer, b: &mut Browser) {
    let g = phylax_auth::client_key::generate().unwrap();
    let conf = uuid::Uuid::new_v4().to_string();
    s.store
        .add_client(&phylax_store::ClientRecord {
            id: conf.clone(),
            name: "Confidential".into(),
            scope: "patient/*.rs launch/patient".into(),
            jwks: g.jwks.clone(),
            disabled: false,
            created_at: 0,
            redirect_uris: vec![REDIRECT.into()],
            public: false,
            first_party: true,
        })
        .await
        .unwrap();
    let p4 = pkce();
    let r = b
        .get(&authorize_url(
            s,
            &conf,
            "patient/Patient.rs launch/patient",
            "c1",
            &p4,
        ))
        .await;
    assert_eq!(r.status, 303, "first-party: no consent; {}", r.body);
    let code = r.param("code").unwrap();
    let mut form = vec![
        ("grant_type".to_owned(), "authorization_code".to_owned()),
        ("code".to_owned(), code),
        ("redirect_uri".to_owned(), REDIRECT.to_owned()),
        ("client_id".to_owned(), conf.clone()),
        ("code_verifier".to_owned(), p4.verifier.clone()),
    ];
    let send = |f: Vec<(String, String)>| {
        let http = s.http.clone();
        let url = s.token_url();
        async move {
            let r = http.post(url).form(&f).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, e) = send(form.clone()).await;
    assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")));
    form.push((
        "client_assertion_type".into(),
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
    ));
    form.push((
        "client_assertion".into(),
        s.assertion(&conf, g.private_pem.expose()),
    ));
    let (st, v3) = send(form).await;
    assert_eq!(st, 200, "{v3}");
    assert_eq!(v3["patient"], "pat-1");
}

/// The patient's token reaches their own compartment only.
async fn patient_reaches_only_their_compartment(s: &TestServer, at: &str) {
    assert_eq!(fhir_get(s, at, "/Patient/pat-1").await, 200);
    assert_eq!(
        fhir_get(s, at, "/Patient/pat-2").await,
        404,
        "another patient: answered as if it did not exist"
    );
    // Searches reach the patient's own compartment only: both patients
    // match the name, the patient finds themselves alone.
    let found: Value = s
        .http
        .get(s.url("/Patient?name=Testperson"))
        .bearer_auth(at)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = found["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["pat-1"]);
    assert_eq!(fhir_get(s, at, "/Patient/pat-1/_history").await, 200);
    assert_eq!(fhir_get(s, at, "/Patient/pat-2/_history").await, 404);
    assert_eq!(fhir_get(s, at, "/Patient/pat-1/$everything").await, 200);
    assert_eq!(fhir_get(s, at, "/Patient/pat-2/$everything").await, 404);
    // Types outside the compartment that can hold anyone's data: refused.
    assert_eq!(fhir_get(s, at, "/Binary?_count=1").await, 403);
}

mod patient_launch {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| c.auth.mfa_optional_roles = vec!["patient".into()]).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::patient_launch_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::patient_launch_body(&s).await;
        }
    }
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

/// Sign a clinician in with TOTP; returns (access token, refresh token).
async fn signed_in_tokens(s: &TestServer, name: &str) -> (String, String) {
    let (_, at, rt) = signed_in_tokens_for(s, name).await;
    (at, rt)
}

/// [`signed_in_tokens`], with the app's client id first.
async fn signed_in_tokens_for(s: &TestServer, name: &str) -> (String, String, String) {
    enrolled_user(s, name, "clinician", None).await;
    let app = add_app(s, "user/*.rs offline_access", true).await;
    let mut b = Browser::new(s);
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
    )
}

// A refresh follows the app's registration as it is now: narrowed, the new
// token is narrowed too; without offline access, the grant ends.
both!(refresh_follows_a_narrowed_registration);
async fn refresh_follows_a_narrowed_registration(s: &TestServer) {
    make_patient(s, "p8").await;
    let (app, _, rt) = signed_in_tokens_for(s, "dr.narrow").await;
    s.sql(&format!(
        "UPDATE clients SET scope = 'user/Patient.rs offline_access' WHERE id = '{app}'"
    ))
    .await;
    let (st, v) = refresh_with(s, &app, &rt).await;
    assert_eq!(st, 200, "{v}");
    let scope = v["scope"].as_str().unwrap();
    assert!(
        scope.contains("user/Patient.rs") && !scope.contains("user/*"),
        "{scope}"
    );
    let at = v["access_token"].as_str().unwrap();
    assert_eq!(fhir_get(s, at, "/Patient/p8").await, 200);
    assert_eq!(fhir_get(s, at, "/Observation?code=x").await, 403);
    s.sql(&format!(
        "UPDATE clients SET scope = 'user/Patient.rs' WHERE id = '{app}'"
    ))
    .await;
    let (st, v2) = refresh_with(s, &app, v["refresh_token"].as_str().unwrap()).await;
    assert_eq!(st, 400, "offline access withdrawn: {v2}");
}

both!(disabling_a_user_ends_tokens_on_every_node);
async fn disabling_a_user_ends_tokens_on_every_node(s: &TestServer) {
    make_patient(s, "p9").await;
    let (at, rt) = signed_in_tokens(s, "dr.house").await;
    let (node2, _stop) = s.second_node().await;
    let read2 = |tok: String| {
        let http = s.http.clone();
        let url = format!("{node2}/Patient/p9");
        async move {
            http.get(url)
                .bearer_auth(tok)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(fhir_get(s, &at, "/Patient/p9").await, 200);
    assert_eq!(
        read2(at.clone()).await,
        200,
        "the other node accepts it too (care relationships found there too)"
    );
    // The CLI's path: disable through the account service.
    let id = s
        .state
        .accounts
        .find("dr.house")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    s.state
        .accounts
        .set_status(&id, phylax_server::data::accounts::Status::Disabled, now())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let a = fhir_get(s, &at, "/Patient/p9").await;
        let b = read2(at.clone()).await;
        if a == 401 && b == 401 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 10,
            "revocation took too long ({a}, {b})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let app_refresh = exchange(
        s,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
    )
    .await;
    assert_ne!(app_refresh.0, 200, "refresh tokens are gone too");
}

both!(revocation_and_introspection);
async fn revocation_and_introspection(s: &TestServer) {
    make_patient(s, "p5").await;
    // A backend client introspects and revokes its own access token.
    let (id, key) = s.register("system/*.rs").await;
    let (st, v) = s
        .token_request(&s.assertion(&id, &key), "system/*.rs")
        .await;
    assert_eq!(st, 200);
    let at = v["access_token"].as_str().unwrap().to_owned();
    let auth = |s: &TestServer| {
        vec![
            (
                "client_assertion_type".to_owned(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
            ("client_assertion".to_owned(), s.assertion(&id, &key)),
        ]
    };
    let post = |path: &'static str, mut f: Vec<(String, String)>, tok: String| {
        f.push(("token".into(), tok));
        let http = s.http.clone();
        let url = format!("{}{path}", s.base);
        async move {
            let r = http.post(url).form(&f).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = post("/auth/introspect", auth(s), at.clone()).await;
    assert_eq!((st, v["active"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(v["client_id"], id.as_str());
    let (st, v) = post("/auth/introspect", auth(s), "garbage".into()).await;
    assert_eq!((st, v["active"].as_bool()), (200, Some(false)));
    // Without client authentication: refused.
    let (st, _) = post("/auth/introspect", vec![], at.clone()).await;
    assert_eq!(st, 401);
    // Another client cannot revoke or inspect it.
    let (id2, key2) = s.register("system/*.rs").await;
    let other = || {
        vec![
            (
                "client_assertion_type".to_owned(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
            ("client_assertion".to_owned(), s.assertion(&id2, &key2)),
        ]
    };
    let (_, v) = post("/auth/introspect", other(), at.clone()).await;
    assert_eq!(v["active"], false);
    // Each assertion works once: a replayed one is refused.
    let once = other();
    let (st, _) = post("/auth/revoke", once.clone(), at.clone()).await;
    assert_eq!(st, 200);
    let (st, _) = post("/auth/revoke", once, at.clone()).await;
    assert_eq!(st, 401, "assertion replayed");
    let (st, _) = post("/auth/revoke", other(), at.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(
        fhir_get(s, &at, "/Patient/p5").await,
        200,
        "not revoked by a stranger"
    );
    let (st, _) = post("/auth/revoke", auth(s), at.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(fhir_get(s, &at, "/Patient/p5").await, 401, "revoked");
    let (_, v) = post("/auth/introspect", auth(s), at.clone()).await;
    assert_eq!(v["active"], false);

    // A public app revokes its refresh token; the refresh then fails.
    let (uat, rt) = signed_in_tokens(s, "dr.who").await;
    let app = claims(&uat)["client_id"].as_str().unwrap().to_owned();
    let r = s
        .http
        .post(format!("{}/auth/revoke", s.base))
        .form(&[("token", rt.as_str()), ("client_id", app.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (st, _) = exchange(
        s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", &app),
        ],
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(
        fhir_get(s, &uat, "/Patient/p5").await,
        401,
        "the family's access token too"
    );
    assert!(
        has_event(&audit_events(s).await, "token-revoke", "0"),
        "revocation audited"
    );
}

// ------------------------------------------------------------ passkeys

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

// ------------------------------------------------------------ rehash

/// A hash made under the old Argon2id settings is replaced, at the next
/// successful sign-in, by one under the current settings (here: a node
/// started after the operator raised the memory cost).
async fn rehash_body(s: &TestServer) {
    enrolled_user(s, "dr.old", "clinician", None).await;
    let scheme = |s: &TestServer| {
        let accounts = s.state.accounts.clone();
        async move {
            accounts
                .find("dr.old")
                .await
                .unwrap()
                .unwrap()
                .password_scheme()
                .unwrap()
        }
    };
    assert_eq!(scheme(s).await, "argon2id m=19456,t=2,p=1");
    // The operator raises the cost; a node started now uses it.
    let mut cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    cfg.auth.argon2_memory_kib = 24 * 1024;
    cfg.save(&s.data_dir).unwrap();
    let (fhir2, _stop) = s.second_node().await;
    let app = add_app(s, "user/*.rs", true).await;
    let mut b = Browser::new(s);
    b.base = fhir2.trim_end_matches("/fhir").to_owned();
    let page = b
        .get(&authorize_url(s, &app, "user/*.rs", "r", &pkce()))
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let next = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.old"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(
        scheme(s).await,
        "argon2id m=24576,t=2,p=1",
        "upgraded at sign-in"
    );
    // A wrong password changes nothing.
    let mut b2 = Browser::new(s);
    b2.base = b.base.clone();
    let page = b2
        .get(&authorize_url(s, &app, "user/*.rs", "r", &pkce()))
        .await;
    b2.post(
        "/auth/login",
        &[
            ("csrf", &page.csrf()),
            ("username", "dr.old"),
            ("password", "wrong wrong wrong wrong"),
        ],
    )
    .await;
    assert_eq!(scheme(s).await, "argon2id m=24576,t=2,p=1");
}

mod rehash {
    use super::common::{Backend, TestServer};
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let s = TestServer::start(Backend::Sqlite).await.unwrap();
        super::rehash_body(&s).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = TestServer::start(Backend::Postgres).await {
            super::rehash_body(&s).await;
        }
    }
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

async fn roles_body(s: &TestServer) {
    make_patient(s, "pr-1").await;
    let admin = s.token("system/*.cruds").await;
    let r = s
        .http
        .put(s.url("/Observation/ob-1"))
        .bearer_auth(&admin)
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Observation","id":"ob-1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/pr-1"}}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // The same wide scopes; the role decides.
    let fd = password_only_token(s, "desk.one", "front-desk", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &fd, "/Patient/pr-1").await, 200);
    assert_eq!(fhir_get(s, &fd, "/Observation/ob-1").await, 403);
    assert_eq!(
        fhir_get(s, &fd, "/Observation?subject=Patient/pr-1").await,
        403
    );
    let au = password_only_token(s, "audit.one", "auditor", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &au, "/Patient/pr-1").await, 403);
    assert_eq!(fhir_get(s, &au, "/AuditEvent?_count=1").await, 200);
    // A custom role from phylax.toml.
    let lab = password_only_token(s, "lab.one", "lab-tech", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &lab, "/Observation/ob-1").await, 200);
    assert_eq!(fhir_get(s, &lab, "/Patient/pr-1").await, 403);
    // A role changed by an administrator: the old token stops working.
    let id = s
        .state
        .accounts
        .find("lab.one")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    s.state
        .accounts
        .set_role(&id, "front-desk", chrono::Utc::now().timestamp())
        .await
        .unwrap();
    s.state.refresh_disabled().await.unwrap();
    assert_eq!(fhir_get(s, &lab, "/Observation/ob-1").await, 401);
}

mod roles {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.auth.mfa_optional_roles =
                vec!["front-desk".into(), "auditor".into(), "lab-tech".into()];
            c.roles = vec![phylax_server::base::config::RoleConfig {
                name: "lab-tech".into(),
                description: "Laboratory".into(),
                grants: vec![phylax_server::base::config::RoleGrantConfig {
                    types: vec!["Observation".into(), "Specimen".into()],
                    perms: "crus".into(),
                }],
                reach: "everyone".into(),
                labelled: false,
                break_glass: false,
                relationships: false,
                purpose: "TREAT".into(),
                masks: Vec::new(),
            }];
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::roles_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::roles_body(&s).await;
        }
    }
}

/// Automatic response: a user who reads many patients' records in a short
/// time is locked by the `scraping` rule, and their token stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_locks_the_account() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.mfa_optional_roles = vec!["clinician".into()];
        c.detect.scraping_patients = 3;
    })
    .await
    .unwrap();
    for i in 0..4 {
        make_patient(&s, &format!("scr-{i}")).await;
    }
    let tok = password_only_token(&s, "nosy", "clinician", "user/Patient.rs").await;
    for i in 0..3 {
        assert_eq!(fhir_get(&s, &tok, &format!("/Patient/scr-{i}")).await, 200);
    }
    // The lock ends the user's tokens on every node within seconds.
    let mut refused = false;
    for _ in 0..60 {
        if fhir_get(&s, &tok, "/Patient/scr-3").await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(refused, "the scraper's token still works");
    let u = s.state.accounts.find("nosy").await.unwrap().unwrap();
    assert_eq!(u.rec.status, "locked");
    let evs = audit_events(&s).await;
    assert!(has_event(&evs, "alert", "0"));
    assert!(evs.iter().any(
        |(st, _, e)| st == "lockout" && e["outcomeDesc"].as_str().unwrap().contains("scraping")
    ));
}

/// `dormant-account`: a sign-in after `detect.dormant_days` without one
/// raises an alert; an ordinary sign-in does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_account_sign_in_alerts() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.mfa_optional_roles = vec!["front-desk".into()];
    })
    .await
    .unwrap();
    let count = || async {
        audit_events(&s)
            .await
            .iter()
            .filter(|(sub, _, ev)| {
                sub == "alert"
                    && ev["outcomeDesc"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("dormant-account ["))
            })
            .count()
    };
    password_only_token(&s, "returner", "front-desk", "user/Patient.rs").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        count().await,
        0,
        "a first sign-in of a new account is not dormant"
    );
    let id = s
        .state
        .accounts
        .find("returner")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    let long_ago = chrono::Utc::now().timestamp() - 120 * 86_400;
    s.state
        .accounts
        .record_success(&id, long_ago)
        .await
        .unwrap();
    password_sign_in(&s, "returner", "user/Patient.rs").await;
    let mut n = 0;
    for _ in 0..50 {
        n = count().await;
        if n > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1);
}

/// A sign-in flood: Argon2id runs at most `auth.argon2_max_concurrent` at
/// once, so memory stays bounded; sign-ins that find no slot in
/// `auth.argon2_queue_secs` get 503 with Retry-After, and the FHIR API
/// keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_flood_is_bounded() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.argon2_max_concurrent = 2;
        c.auth.argon2_queue_secs = 1;
        // 64 MiB each: 48 at once would take 3 GiB.
        c.auth.argon2_memory_kib = 64 * 1024;
    })
    .await
    .unwrap();
    let app = add_app(&s, "user/*.rs", true).await;
    let mut pages = Vec::new();
    for i in 0..48 {
        let mut b = Browser::new(&s);
        let page = b
            .get(&authorize_url(
                &s,
                &app,
                "user/*.rs",
                &format!("s{i}"),
                &pkce(),
            ))
            .await;
        pages.push((b, page.csrf()));
    }
    let before = common::rss_kib();
    let floods = pages.into_iter().enumerate().map(|(i, (mut b, csrf))| {
        tokio::spawn(async move {
            let r = b
                .post(
                    "/auth/login",
                    &[
                        ("csrf", csrf.as_str()),
                        ("username", &format!("nobody{i}")),
                        ("password", "wrong wrong wrong wrong"),
                    ],
                )
                .await;
            r.status
        })
    });
    let floods: Vec<_> = floods.collect();
    // The API answers while the flood waits for Argon2id.
    let tok = s.token("system/Patient.rs").await;
    let t = std::time::Instant::now();
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    let mut statuses = Vec::new();
    for f in floods {
        statuses.push(f.await.unwrap());
    }
    let busy = statuses.iter().filter(|s| **s == 503).count();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(busy + refused, statuses.len(), "{statuses:?}");
    assert!(busy > 0 && refused > 0, "{statuses:?}");
    let after = common::rss_kib();
    // 48 concurrent Argon2id runs would take 3 GiB; two at a time 128 MiB.
    assert!(after < before + 400 * 1024, "RSS {before} -> {after} KiB");
}

// An automatic lockout ends by itself, each further one (before a
// successful sign-in) lasting twice as long; an administrator's lock lasts
// until lifted. So knowing someone's username is not enough to keep them
// out for good, and the lockout alert still goes to the administrators.
both!(lockouts_expire_with_exponential_back_off);
async fn lockouts_expire_with_exponential_back_off(s: &TestServer) {
    use phylax_server::data::accounts::Status;
    enrolled_user(s, "dr.backoff", "clinician", None).await;
    let id = s
        .state
        .accounts
        .find("dr.backoff")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    let t0 = now();
    // One second for the first lockout (the configuration's minimum is a
    // minute; the accounts layer takes what it is given).
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t0)
        .await
        .unwrap();
    assert_eq!(u.status(), Some(Status::Locked));
    assert_eq!(u.locked_until(), Some(t0 + 1));
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let u = s.state.accounts.find("dr.backoff").await.unwrap().unwrap();
    assert_eq!(u.status(), Some(Status::Active), "the lock ran out");
    // The next failure locks again, twice as long.
    let t1 = now();
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t1)
        .await
        .unwrap();
    assert_eq!(u.locked_until(), Some(t1 + 2));
    // A successful sign-in clears the back-off (after the lock ran out).
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    s.state.accounts.record_success(&id, now()).await.unwrap();
    let t2 = now();
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t2)
        .await
        .unwrap();
    assert_eq!(u.locked_until(), Some(t2 + 1));
    // An administrator's lock does not run out.
    s.state
        .accounts
        .set_status(&id, Status::Locked, now())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let u = s.state.accounts.find("dr.backoff").await.unwrap().unwrap();
    assert_eq!(u.status(), Some(Status::Locked));
    assert_eq!(u.locked_until(), None);
}

// Over the client's token rate limit, nothing single-use is spent: the
// refresh token sent with the refused request still works afterwards (it
// is not taken for a replay).
mod token_limit_spends_nothing {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.rate.token_per_minute = 60;
            c.rate.token_burst = 2;
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::token_limit_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::token_limit_body(&s).await;
        }
    }
}

async fn token_limit_body(s: &TestServer) {
    // The code exchange takes the first of two.
    let (app, _, rt) = signed_in_tokens_for(s, "dr.limited").await;
    let (st, v) = refresh_with(s, &app, &rt).await;
    assert_eq!(st, 200, "{v}");
    let rt2 = v["refresh_token"].as_str().unwrap().to_owned();
    let (st, v) = refresh_with(s, &app, &rt2).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"], "temporarily_unavailable");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (st, v) = refresh_with(s, &app, &rt2).await;
    assert_eq!(st, 200, "the refused request spent nothing: {v}");
}
