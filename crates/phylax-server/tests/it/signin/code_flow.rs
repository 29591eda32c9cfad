//! A clinician's whole path: password, TOTP, recovery codes, code, PKCE, refresh, sessions.

use super::*;
use phylax_server::data::grants::Kind;

async fn next_step() -> i64 {
    let t = now();
    let wait = 30 - t % 30;
    tokio::time::sleep(std::time::Duration::from_millis(wait as u64 * 1000 + 200)).await;
    now()
}

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
