//! Create, read, update, delete, versions and history of one resource; update as create; Prefer.

use super::*;
use reqwest::StatusCode;

both!(crud_lifecycle);
async fn crud_lifecycle(s: &TestServer) {
    let tok = s.token(ALL).await;
    let (id, created) = create_assigns_id_and_version(s, &tok).await;
    read_returns_fhir_json(s, &tok, &id).await;
    let upd = update_checks_if_match(s, &tok, &id, &created).await;
    version_reads(s, &tok, &id).await;
    delete_is_idempotent_then_gone(s, &tok, &id).await;
    instance_history_newest_first(s, &tok, &id).await;
    update_after_delete_revives(s, &tok, &id, &upd).await;
}

/// Create: the server assigns the id and version 1, and keeps client meta.
/// Returns the id and the created resource.
async fn create_assigns_id_and_version(s: &TestServer, tok: &str) -> (String, Value) {
    use reqwest::Method as M;
    let p = json!({"resourceType": "Patient", "id": "ignored-on-create", "name": [{"family": "Alpha"}], "gender": "female",
                   "meta": {"tag": [{"system": "http://example.org/tags", "code": "t1"}]}});
    let r = send(s, tok, M::POST, "/Patient", Some(&p)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_ne!(id, "ignored-on-create", "server assigns ids on create");
    assert_eq!(loc, s.url(&format!("/Patient/{id}/_history/1")));
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(
        created["meta"]["tag"][0]["code"], "t1",
        "client meta elements are kept"
    );
    (id, created)
}

/// Read: the resource as FHIR JSON.
async fn read_returns_fhir_json(s: &TestServer, tok: &str, id: &str) {
    use reqwest::Method as M;
    let r = send(s, tok, M::GET, &format!("/Patient/{id}"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/fhir+json; charset=utf-8"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["name"][0]["family"],
        "Alpha"
    );
}

/// Update with the right If-Match, then a stale one. Returns the update.
async fn update_checks_if_match(s: &TestServer, tok: &str, id: &str, created: &Value) -> Value {
    let mut upd = created.clone();
    upd["name"][0]["family"] = json!("Beta");
    let r = s
        .http
        .put(s.url(&format!("/Patient/{id}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .header("if-match", "W/\"1\"")
        .body(upd.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    let r = s
        .http
        .put(s.url(&format!("/Patient/{id}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .header("if-match", "W/\"1\"")
        .body(upd.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = s
        .http
        .put(s.url(&format!("/Patient/{id}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .header("if-match", "garbage")
        .body(upd.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    upd
}

/// Version reads: old versions stay readable; unknown ones are not found.
async fn version_reads(s: &TestServer, tok: &str, id: &str) {
    use reqwest::Method as M;
    let r = send(s, tok, M::GET, &format!("/Patient/{id}/_history/1"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["name"][0]["family"],
        "Alpha"
    );
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{id}/_history/9"), None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{id}/_history/x"), None)
            .await
            .status(),
        404
    );
}

/// Delete: idempotent, then the resource is gone (410), its old versions
/// still readable.
async fn delete_is_idempotent_then_gone(s: &TestServer, tok: &str, id: &str) {
    use reqwest::Method as M;
    let r = send(s, tok, M::DELETE, &format!("/Patient/{id}"), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["etag"], "W/\"3\"");
    assert_eq!(
        send(s, tok, M::DELETE, &format!("/Patient/{id}"), None)
            .await
            .status(),
        204,
        "idempotent"
    );
    let r = send(s, tok, M::GET, &format!("/Patient/{id}"), None).await;
    assert_eq!(r.status(), StatusCode::GONE);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{id}/_history/3"), None)
            .await
            .status(),
        410
    );
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{id}/_history/2"), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        send(s, tok, M::DELETE, "/Patient/never-existed", None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(s, tok, M::GET, "/Patient/never-existed", None)
            .await
            .status(),
        404
    );
}

/// Instance history: newest first, tombstone included.
async fn instance_history_newest_first(s: &TestServer, tok: &str, id: &str) {
    use reqwest::Method as M;
    let h: Value = send(s, tok, M::GET, &format!("/Patient/{id}/_history"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["type"], "history");
    let e = h["entry"].as_array().unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0]["request"]["method"], "DELETE");
    assert!(e[0].get("resource").is_none());
    assert_eq!(e[1]["resource"]["meta"]["versionId"], "2");
    assert_eq!(e[2]["response"]["status"], "201");
}

/// Update after delete revives the resource with the next version.
async fn update_after_delete_revives(s: &TestServer, tok: &str, id: &str, upd: &Value) {
    use reqwest::Method as M;
    let mut again = upd.clone();
    again["name"][0]["family"] = json!("Gamma");
    let r = send(s, tok, M::PUT, &format!("/Patient/{id}"), Some(&again)).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"4\"");
}

both!(update_as_create_and_id_rules);
async fn update_as_create_and_id_rules(s: &TestServer) {
    use reqwest::Method as M;
    let tok = s.token(ALL).await;
    let b = json!({"resourceType": "Organization", "id": "org-1", "name": "Clinic"});
    let r = send(s, &tok, M::PUT, "/Organization/org-1", Some(&b)).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        send(s, &tok, M::PUT, "/Organization/org-1", Some(&b))
            .await
            .status(),
        200
    );
    let r = send(s, &tok, M::PUT, "/Organization/org-2", Some(&b)).await;
    assert_eq!(r.status(), 400, "body id must match URL");
    let no_id = json!({"resourceType": "Organization", "name": "x"});
    assert_eq!(
        send(s, &tok, M::PUT, "/Organization/org-1", Some(&no_id))
            .await
            .status(),
        400
    );
    let wrong = json!({"resourceType": "Patient", "id": "org-1"});
    assert_eq!(
        send(s, &tok, M::PUT, "/Organization/org-1", Some(&wrong))
            .await
            .status(),
        400
    );
    assert_eq!(
        send(s, &tok, M::POST, "/Organization", Some(&wrong))
            .await
            .status(),
        400
    );
    let bad = json!({"resourceType": "Organization", "id": "a b"});
    assert_eq!(
        send(s, &tok, M::PUT, "/Organization/a%20b", Some(&bad))
            .await
            .status(),
        400
    );
    // If-Match on a resource that does not exist is a conflict, not a create.
    let r = s
        .http
        .put(s.url("/Organization/org-9"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .header("if-match", "W/\"1\"")
        .body(json!({"resourceType":"Organization","id":"org-9"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_as_create_can_be_disabled() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.allow_update_create = false
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    let b = json!({"resourceType": "Organization", "id": "o1"});
    let r = send(&s, &tok, reqwest::Method::PUT, "/Organization/o1", Some(&b)).await;
    assert_eq!(r.status(), 405);
    let cap: Value = s
        .http
        .get(s.url("/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cap["rest"][0]["resource"][0]["updateCreate"], false);
}

both!(prefer_return);
async fn prefer_return(s: &TestServer) {
    let tok = s.token(ALL).await;
    let b = json!({"resourceType": "Basic", "code": {"text": "x"}});
    let r = s
        .http
        .post(s.url("/Basic"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .header("prefer", "return=minimal")
        .body(b.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("location"));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = s
        .http
        .post(s.url("/Basic"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .header("prefer", "return=OperationOutcome")
        .body(b.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["severity"], "information");
    let r = s
        .http
        .post(s.url("/Basic"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .header("prefer", "return=representation")
        .body(b.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["resourceType"], "Basic");
}
