//! Authorization and token requests that must fail: redirects, scopes, clients, CSRF, grants.

use super::*;

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
