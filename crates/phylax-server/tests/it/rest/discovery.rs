//! Metadata and discovery documents, security headers, CORS.

use super::*;

both!(metadata_and_discovery_are_truthful);
async fn metadata_and_discovery_are_truthful(s: &TestServer) {
    let r = s.http.get(s.url("/metadata")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cap: Value = r.json().await.unwrap();
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.0.1");
    assert_eq!(cap["rest"][0]["resource"].as_array().unwrap().len(), 147);
    let patient = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    let names: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for n in [
        "_id",
        "_lastUpdated",
        "family",
        "birthdate",
        "identifier",
        "organization",
        "_tag",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let obs = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    let names: Vec<&str> = obs["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"code-value-quantity"),
        "two-component composites are claimed"
    );
    assert!(
        !names.contains(&"phonetic"),
        "phonetic is not (a prefix match is not phonetic)"
    );
    assert!(
        phylax_fhir::validate::validate_resource(&cap).is_ok(),
        "our CapabilityStatement is itself valid"
    );
    let token_uri = &cap["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"];
    assert_eq!(token_uri, &json!(s.token_url()));
    let sc: Value = s
        .http
        .get(s.url("/.well-known/smart-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sc["token_endpoint"], json!(s.token_url()));
    assert!(sc["token_endpoint_auth_signing_alg_values_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("ES384")));
    assert!(sc["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("client-confidential-asymmetric")));
}

both!(security_headers_on_every_response);
async fn security_headers_on_every_response(s: &TestServer) {
    let tok = s.token(ALL).await;
    for (path, auth) in [
        ("/metadata", false),
        ("/Patient", true),
        ("/Patient/none", true),
        ("/nope/x/y/z", false),
    ] {
        let mut rq = s.http.get(s.url(path));
        if auth {
            rq = rq.bearer_auth(&tok);
        }
        let r = rq.send().await.unwrap();
        let h = r.headers();
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(h["strict-transport-security"]
            .to_str()
            .unwrap()
            .contains("max-age="));
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'"));
        assert!(
            h.get("access-control-allow-origin").is_none(),
            "CORS off by default"
        );
        let rid = h["x-request-id"].to_str().unwrap().to_owned();
        if !r.status().is_success() {
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome", "{path}");
            assert_eq!(
                oo["id"],
                json!(rid),
                "OperationOutcome carries the request id"
            );
        }
    }
    // A method the endpoint does not support still answers FHIR.
    let r = s.http.patch(s.url("/metadata")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    let r = s
        .http
        .post(s.url(""))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "not a Bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_for_configured_origins() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.cors_origins = vec!["https://app.example".into()]
    })
    .await
    .unwrap();
    let r = s
        .http
        .get(s.url("/metadata"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let r = s
        .http
        .get(s.url("/metadata"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
