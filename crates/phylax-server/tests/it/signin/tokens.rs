//! Refresh after a narrowed registration, disabled users across nodes, revocation, introspection.

use super::*;

/// Sign a clinician in with TOTP; returns (access token, refresh token).
async fn signed_in_tokens(s: &TestServer, name: &str) -> (String, String) {
    let (_, at, rt) = signed_in_tokens_for(s, name).await;
    (at, rt)
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
