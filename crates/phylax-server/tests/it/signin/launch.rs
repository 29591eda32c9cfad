//! A patient's standalone launch with consent, the id token, key rotation, confidential apps.

use super::*;

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
            cert_bound: false,
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
