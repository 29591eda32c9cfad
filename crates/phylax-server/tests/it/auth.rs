//! SMART Backend Services authentication and scope enforcement, end to end.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{TestServer, FJ};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

both!(no_token_no_data);
async fn no_token_no_data(s: &TestServer) {
    for (m, p) in [
        ("GET", "/Patient"),
        ("GET", "/Patient/x"),
        ("POST", "/Patient"),
        ("GET", "/_history"),
        ("DELETE", "/Patient/x"),
        ("GET", "/Nope/x"),
    ] {
        let r = s
            .http
            .request(m.parse().unwrap(), s.url(p))
            .send()
            .await
            .unwrap();
        // Even an unknown type answers 401: without a token, nothing is said.
        assert_eq!(r.status().as_u16(), 401, "{m} {p}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["code"], "login");
    }
    for bad in ["garbage", "a.b.c", "", "eyJhbGciOiJub25lIn0.e30."] {
        let r = s
            .http
            .get(s.url("/Patient"))
            .header("authorization", format!("Bearer {bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    let r = s
        .http
        .get(s.url("/Patient"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

both!(a_token_from_another_instance_is_refused);
async fn a_token_from_another_instance_is_refused(s: &TestServer) {
    let other = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let foreign = other.token("system/*.cruds").await;
    let r = s
        .http
        .get(s.url("/Patient"))
        .bearer_auth(&foreign)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The same token is fine where it was issued.
    let r = other
        .http
        .get(other.url("/Patient"))
        .bearer_auth(&foreign)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

both!(scopes_are_enforced_per_type_and_interaction);
async fn scopes_are_enforced_per_type_and_interaction(s: &TestServer) {
    let admin = s.token("system/*.cruds").await;
    let r = s
        .http
        .post(s.url("/Patient"))
        .bearer_auth(&admin)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Patient"}).to_string())
        .send()
        .await
        .unwrap();
    let pid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s
        .http
        .post(s.url("/Observation"))
        .bearer_auth(&admin)
        .header("content-type", FJ)
        .body(
            json!({"resourceType":"Observation","status":"final","code":{"text":"x"}}).to_string(),
        )
        .send()
        .await
        .unwrap();
    let oid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let reader = s.token("system/Patient.rs").await;
    let get = |p: String, t: String| async move {
        s.http
            .get(s.url(&p))
            .bearer_auth(t)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get(format!("/Patient/{pid}"), reader.clone()).await, 200);
    assert_eq!(get("/Patient".into(), reader.clone()).await, 200);
    assert_eq!(
        get(format!("/Patient/{pid}/_history"), reader.clone()).await,
        200
    );
    assert_eq!(
        get(format!("/Observation/{oid}"), reader.clone()).await,
        403
    );
    assert_eq!(get("/Observation".into(), reader.clone()).await, 403);
    assert_eq!(
        get("/_history".into(), reader.clone()).await,
        403,
        "system history needs system/*.rs"
    );
    // A forbidden read answers the same whether or not the resource exists.
    assert_eq!(
        get("/Observation/does-not-exist".into(), reader.clone()).await,
        403
    );
    let put = s
        .http
        .put(s.url(&format!("/Patient/{pid}")))
        .bearer_auth(&reader)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Patient","id":pid}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 403);
    let del = s
        .http
        .delete(s.url(&format!("/Patient/{pid}")))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 403);
    let post = s
        .http
        .post(s.url("/Patient"))
        .bearer_auth(&reader)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Patient"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 403);
    // v1 scopes work too; update-only cannot create through PUT.
    let v1 = s.token("system/Observation.read").await;
    assert_eq!(get(format!("/Observation/{oid}"), v1.clone()).await, 200);
    let u_only = s.token("system/Organization.u").await;
    let r = s
        .http
        .put(s.url("/Organization/new-org"))
        .bearer_auth(&u_only)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Organization","id":"new-org"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

both!(token_endpoint_hostile_cases);
async fn token_endpoint_hostile_cases(s: &TestServer) {
    let (id, key) = s.register("system/Patient.rs").await;
    an_assertion_works_once_within_the_registered_scope(s, &id, &key).await;
    forged_keys_and_unknown_clients_look_alike(s, &id, &key).await;
    wrong_audience_and_times_are_refused(s, &id, &key).await;
    malformed_requests_are_refused(s).await;
}

/// Works once, and a replayed assertion (same jti) is refused; scope
/// escalation is cut to what was registered.
async fn an_assertion_works_once_within_the_registered_scope(s: &TestServer, id: &str, key: &[u8]) {
    let a = s.assertion(id, key);
    let (st, v) = s.token_request(&a, "system/Patient.rs").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["token_type"], "bearer");
    assert!(v["expires_in"].as_i64().unwrap() <= 900);
    assert_eq!(v["scope"], "system/Patient.rs");
    // …and a replayed assertion (same jti) is refused.
    let (st, v) = s.token_request(&a, "system/Patient.rs").await;
    assert_eq!((st, v["error"].as_str()), (401, Some("invalid_client")));
    // Scope escalation is cut to what was registered; nothing grantable is an error.
    let (st, v) = s
        .token_request(&s.assertion(id, key), "system/*.cruds")
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["scope"], "system/Patient.rs");
    let (st, v) = s
        .token_request(&s.assertion(id, key), "system/Observation.rs")
        .await;
    assert_eq!((st, v["error"].as_str()), (400, Some("invalid_scope")));
}

/// Unknown client and a forged key look the same as each other.
async fn forged_keys_and_unknown_clients_look_alike(s: &TestServer, id: &str, key: &[u8]) {
    let (other_id, other_key) = s.register("system/Patient.rs").await;
    let forged = s.assertion(id, &other_key);
    let (st1, v1) = s.token_request(&forged, "system/Patient.rs").await;
    let unknown = s.assertion("no-such-client", key);
    let (st2, v2) = s.token_request(&unknown, "system/Patient.rs").await;
    assert_eq!((st1, st2), (401, 401));
    assert_eq!(
        v1["error_description"], v2["error_description"],
        "no hint which check failed"
    );
    let _ = other_id;
}

/// Wrong audience; expired, too far in the future; RFC 7523's nbf and iat.
async fn wrong_audience_and_times_are_refused(s: &TestServer, id: &str, key: &[u8]) {
    // Wrong audience.
    let wrong_aud = phylax_auth::client_key::sign_assertion(
        key,
        None,
        id,
        "https://elsewhere/token",
        chrono::Utc::now().timestamp(),
    )
    .unwrap();
    assert_eq!(
        s.token_request(&wrong_aud, "system/Patient.rs").await.0,
        401
    );
    // Expired, and too far in the future.
    let now = chrono::Utc::now().timestamp();
    let k = EncodingKey::from_ec_pem(key).unwrap();
    let sign = |exp: i64| {
        jsonwebtoken::encode(&Header::new(Algorithm::ES384),
        &json!({"iss": id, "sub": id, "aud": s.token_url(), "exp": exp, "jti": uuid::Uuid::new_v4().to_string()}), &k).unwrap()
    };
    assert_eq!(
        s.token_request(&sign(now - 600), "system/Patient.rs")
            .await
            .0,
        401
    );
    assert_eq!(
        s.token_request(&sign(now + 3600), "system/Patient.rs")
            .await
            .0,
        401
    );
    // RFC 7523: not before `nbf`; no `iat` in the future or longer than
    // five minutes before `exp`.
    let sign_with = |extra: Value| {
        let mut c = json!({"iss": id, "sub": id, "aud": s.token_url(), "exp": now + 200,
            "jti": uuid::Uuid::new_v4().to_string()});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        jsonwebtoken::encode(&Header::new(Algorithm::ES384), &c, &k).unwrap()
    };
    for (extra, want) in [
        (json!({"nbf": now + 3600}), 401),
        (json!({"nbf": now + 86400}), 401),
        (json!({"iat": now + 3600}), 401),
        (json!({"iat": now - 3600}), 401),
        (json!({"nbf": now - 10, "iat": now - 10}), 200),
    ] {
        assert_eq!(
            s.token_request(&sign_with(extra.clone()), "system/Patient.rs")
                .await
                .0,
            want,
            "{extra}"
        );
    }
    assert_eq!(
        s.token_request(&sign(now + 200), "system/Patient.rs")
            .await
            .0,
        200
    );
}

/// Malformed requests.
async fn malformed_requests_are_refused(s: &TestServer) {
    let r = s
        .http
        .post(s.token_url())
        .form(&[("grant_type", "password"), ("username", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
    let r = s
        .http
        .post(s.token_url())
        .form(&[("grant_type", "client_credentials"), ("scope", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(s.token_url())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(s.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_assertion={}",
            "a".repeat(20_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["cache-control"], "no-store");
}

both!(disabling_a_client_stops_it);
async fn disabling_a_client_stops_it(s: &TestServer) {
    let (id, key) = s.register("system/Patient.rs").await;
    let (_, v) = s
        .token_request(&s.assertion(&id, &key), "system/Patient.rs")
        .await;
    let tok = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        s.http
            .get(s.url("/Patient"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(s.store.set_client_disabled(&id, true).await.unwrap());
    assert_eq!(
        s.token_request(&s.assertion(&id, &key), "system/Patient.rs")
            .await
            .0,
        401,
        "no new tokens"
    );
    // Unexpired tokens stop working within the refresh interval.
    let deadline = std::time::Instant::now() + phylax_server::state::DISABLED_REFRESH * 3;
    loop {
        let st = s
            .http
            .get(s.url("/Patient"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap()
            .status();
        if st == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token still accepted after disable"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs384_clients_work_end_to_end() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let k = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS384",
        "n": URL_SAFE_NO_PAD.encode(k.n().to_bytes_be()), "e": URL_SAFE_NO_PAD.encode(k.e().to_bytes_be())}]});
    s.store
        .add_client(&phylax_store::ClientRecord {
            id: "rsa-client".into(),
            name: "r".into(),
            scope: "system/Patient.r".into(),
            jwks: jwks.to_string(),
            disabled: false,
            created_at: 0,
            redirect_uris: vec![],
            public: false,
            first_party: false,
            cert_bound: false,
        })
        .await
        .unwrap();
    let mut h = Header::new(Algorithm::RS384);
    h.kid = Some("k1".into());
    let pem = k.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
    let a = jsonwebtoken::encode(
        &h,
        &json!({"iss":"rsa-client","sub":"rsa-client","aud": s.token_url(),
        "exp": chrono::Utc::now().timestamp() + 120, "jti": "j-1"}),
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let (st, v) = s.token_request(&a, "system/Patient.r").await;
    assert_eq!(st, 200, "{v}");
}

both!(expired_and_foreign_audience_tokens_are_401);
async fn expired_and_foreign_audience_tokens_are_401(s: &TestServer) {
    let scopes = phylax_auth::ScopeSet::parse_lenient("system/*.cruds");
    let now = chrono::Utc::now().timestamp();
    // Issued by this server's own key, but 20 minutes ago: expired.
    let (old, _) = s
        .state
        .authn
        .tokens
        .issue("some-client", &scopes, now - 1200)
        .unwrap();
    let r = s
        .http
        .get(s.url("/Patient"))
        .bearer_auth(&old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["issue"][0]["code"],
        "login"
    );
    // A fresh one from the same key works (the check above is about time).
    let (fresh, _) = s
        .state
        .authn
        .tokens
        .issue("some-client", &scopes, now)
        .unwrap();
    assert_eq!(
        s.http
            .get(s.url("/Patient"))
            .bearer_auth(&fresh)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Issued for another audience with the same key: refused.
    let key = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap()
        .token_key;
    let other = phylax_auth::TokenIssuer::new(
        key,
        "https://x/auth".into(),
        "https://elsewhere/fhir".into(),
        300,
    );
    let (foreign, _) = other.issue("some-client", &scopes, now).unwrap();
    assert_eq!(
        s.http
            .get(s.url("/Patient"))
            .bearer_auth(&foreign)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}
