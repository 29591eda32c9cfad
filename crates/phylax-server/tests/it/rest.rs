//! The FHIR REST core over real HTTPS, on both backends.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{TestServer, ALL, FJ};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

async fn send(
    s: &TestServer,
    tok: &str,
    m: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut r = s.http.request(m, s.url(path)).bearer_auth(tok);
    if let Some(b) = body {
        r = r.header("content-type", FJ).body(b.to_string());
    }
    r.send().await.unwrap()
}

fn oo_expressions(v: &Value) -> Vec<String> {
    v["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
}

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

both!(validation_at_the_door);
async fn validation_at_the_door(s: &TestServer) {
    let tok = s.token(ALL).await;
    structure_and_content_errors(s, &tok).await;
    malformed_and_oversized_bodies(s, &tok).await;
    media_types(s, &tok).await;
    unknown_types_and_nothing_stored(s, &tok).await;
}

/// POST `body` to /Patient as `ct`.
async fn post_raw(s: &TestServer, tok: &str, body: String, ct: &'static str) -> reqwest::Response {
    s.http
        .post(s.url("/Patient"))
        .bearer_auth(tok)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Unknown element, wrong type: 400 naming the FHIRPath location.
/// Content rules (format, cardinality): 422.
async fn structure_and_content_errors(s: &TestServer, tok: &str) {
    use reqwest::Method as M;
    let r = send(
        s,
        tok,
        M::POST,
        "/Patient",
        Some(&json!({"resourceType":"Patient","nmae":[{"family":"x"}],"active":"yes"})),
    )
    .await;
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    let ex = oo_expressions(&oo);
    assert!(
        ex.contains(&"Patient.nmae".to_string()) && ex.contains(&"Patient.active".to_string()),
        "{oo}"
    );
    assert_eq!(
        oo["id"].as_str().unwrap().len(),
        36,
        "correlation id present"
    );
    // Content rules (format, cardinality): 422.
    let r = send(s, tok, M::POST, "/Observation", Some(&json!({"resourceType":"Observation","code":{"text":"x"},"effectiveDateTime":"2020-02-30"}))).await;
    assert_eq!(r.status(), 422);
    let ex = oo_expressions(&r.json().await.unwrap());
    assert!(
        ex.contains(&"Observation.status".to_string())
            && ex.contains(&"Observation.effectiveDateTime".to_string()),
        "{ex:?}"
    );
}

/// Malformed JSON, duplicate keys, nesting bombs, not an object; an
/// oversized body.
async fn malformed_and_oversized_bodies(s: &TestServer, tok: &str) {
    for bad in [
        "{",
        "{\"resourceType\":\"Patient\",\"resourceType\":\"Patient\"}",
        "[]",
        "null",
        "\"x\"",
        "",
    ] {
        let r = post_raw(s, tok, bad.to_string(), FJ).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["resourceType"],
            "OperationOutcome"
        );
    }
    let bomb = format!(
        "{{\"resourceType\":\"Patient\",\"extension\":{}{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    assert_eq!(post_raw(s, tok, bomb, FJ).await.status(), 400);
    // Oversized body: 413 (default limit 8 MiB).
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"{}\"}}",
        "a".repeat(9 * 1024 * 1024)
    );
    let r = post_raw(s, tok, big, FJ).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["issue"][0]["code"],
        "too-long"
    );
}

/// Media types.
async fn media_types(s: &TestServer, tok: &str) {
    assert_eq!(
        post_raw(s, tok, "{}".into(), "text/plain").await.status(),
        415
    );
    assert_eq!(
        post_raw(s, tok, "<Patient/>".into(), "application/fhir+xml")
            .await
            .status(),
        415
    );
    let r = s
        .http
        .get(s.url("/Patient"))
        .bearer_auth(tok)
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 406);
    let r = s
        .http
        .get(s.url("/Patient?_format=xml"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 406);
    // application/json is accepted too.
    assert_eq!(
        post_raw(
            s,
            tok,
            json!({"resourceType":"Patient"}).to_string(),
            "application/json"
        )
        .await
        .status(),
        201
    );
}

/// Unknown type; type/URL mismatch; nothing invalid was stored.
async fn unknown_types_and_nothing_stored(s: &TestServer, tok: &str) {
    use reqwest::Method as M;
    assert_eq!(send(s, tok, M::GET, "/Patiant/1", None).await.status(), 404);
    assert_eq!(
        send(
            s,
            tok,
            M::POST,
            "/Observation",
            Some(&json!({"resourceType":"Patient"}))
        )
        .await
        .status(),
        400
    );
    // Nothing invalid was stored.
    let b: Value = send(s, tok, M::GET, "/Observation", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 0);
}

/// A minimal valid instance of a structure: every required element filled
/// with the simplest value of its first type, recursively.
fn minimal(structure: &str) -> Value {
    let d = phylax_fhir::defs::definitions();
    let els = d.structure(structure).unwrap();
    let mut obj = serde_json::Map::new();
    let mut names: Vec<_> = els.iter().filter(|(_, e)| e.min > 0).collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, e) in names {
        let t = &e.types[0];
        let v = if d.is_primitive(t) {
            match t.as_str() {
                "boolean" => json!(true),
                "integer" | "unsignedInt" | "positiveInt" | "decimal" => json!(1),
                "date" => json!("2020-01-01"),
                "dateTime" | "instant" => json!("2020-01-01T00:00:00Z"),
                "time" => json!("10:00:00"),
                "base64Binary" => json!("AAAA"),
                "oid" => json!("urn:oid:1.2.3"),
                "uuid" => json!("urn:uuid:0a3f1c2e-1111-4222-8333-444455556666"),
                "xhtml" => json!("<div>x</div>"),
                "id" => json!("x1"),
                _ => json!("x"),
            }
        } else if t == "Resource" {
            json!({"resourceType": "Basic", "code": {"text": "x"}})
        } else {
            minimal(t)
        };
        let key = if e.choice {
            let mut c = t.chars();
            let f = c.next().unwrap();
            format!("{name}{}{}", f.to_uppercase(), c.as_str())
        } else {
            name.clone()
        };
        obj.insert(key, if e.many { json!([v]) } else { v });
    }
    if obj.is_empty() {
        obj.insert("id".into(), json!("x1"));
    }
    Value::Object(obj)
}

both!(every_resource_type_is_served);
async fn every_resource_type_is_served(s: &TestServer) {
    use reqwest::Method as M;
    // The relationship feed: CareTeam, Consent, Group… are its to write.
    let tok = s.feed_token(ALL);
    let types = phylax_fhir::defs::definitions().resource_types().to_vec();
    assert_eq!(types.len(), 147);
    for t in &types {
        let mut body = minimal(t);
        body["resourceType"] = json!(t);
        body.as_object_mut().unwrap().remove("id");
        let r = send(s, &tok, M::POST, &format!("/{t}"), Some(&body)).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        if t == "AuditEvent" {
            // The audit log is written by the server only (and a wildcard
            // scope does not reach it): tests/audit.rs.
            assert_eq!(status, 403, "{v}");
            continue;
        }
        assert_eq!(status, 201, "{t}: {v} for {body}");
        let id = v["id"].as_str().unwrap();
        assert_eq!(
            send(s, &tok, M::GET, &format!("/{t}/{id}"), None)
                .await
                .status(),
            200,
            "{t}"
        );
        // And a bare instance either validates or names only required elements.
        let r = send(
            s,
            &tok,
            M::POST,
            &format!("/{t}"),
            Some(&json!({"resourceType": t})),
        )
        .await;
        if r.status() != 201 {
            assert_eq!(r.status(), 422, "{t}");
            let oo: Value = r.json().await.unwrap();
            assert!(
                oo["issue"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|i| i["code"] == "required"),
                "{t}: {oo}"
            );
        }
        let b: Value = send(s, &tok, M::GET, &format!("/{t}?_count=1"), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(b["type"], "searchset", "{t}");
    }
}

both!(history_paging_and_cursors);
async fn history_paging_and_cursors(s: &TestServer) {
    use reqwest::Method as M;
    let tok = s.token(ALL).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let r = send(
            s,
            &tok,
            M::POST,
            "/Device",
            Some(&json!({"resourceType":"Device","lotNumber": format!("lot{i}")})),
        )
        .await;
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let first_next = history_pages_through_everything(s, &tok, &ids).await;
    type_search_pages_too(s, &tok).await;
    tampered_and_replayed_cursors_are_refused(s, &tok, first_next).await;
    since_count_and_system_history(s, &tok).await;
    id_search_and_unknown_parameters(s, &tok, &ids).await;
}

/// Type history, page by page, oldest last. Returns the first next link.
async fn history_pages_through_everything(
    s: &TestServer,
    tok: &str,
    ids: &[String],
) -> Option<String> {
    let mut seen = Vec::new();
    let mut url = s.url("/Device/_history?_count=3");
    let mut pages = 0;
    let mut first_next = None;
    loop {
        let b: Value = s
            .http
            .get(&url)
            .bearer_auth(tok)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        for e in b["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_owned());
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(n) => {
                url = n["url"].as_str().unwrap().to_owned();
                first_next.get_or_insert(url.clone());
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    seen.reverse();
    assert_eq!(seen, ids);
    first_next
}

/// The same through type search paging.
async fn type_search_pages_too(s: &TestServer, tok: &str) {
    use reqwest::Method as M;
    let b: Value = send(s, tok, M::GET, "/Device?_count=5", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 7);
    assert_eq!(b["entry"].as_array().unwrap().len(), 5);
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let b2: Value = s
        .http
        .get(&next)
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b2["entry"].as_array().unwrap().len(), 2);
}

/// Tampered cursor, and a cursor replayed on another listing.
async fn tampered_and_replayed_cursors_are_refused(
    s: &TestServer,
    tok: &str,
    first_next: Option<String>,
) {
    let next = first_next.unwrap();
    let cursor = next.split("_cursor=").nth(1).unwrap().to_owned();
    let mut tampered = cursor.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    let t = String::from_utf8(tampered).unwrap();
    let r = s
        .http
        .get(s.url(&format!("/Device/_history?_count=3&_cursor={t}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .get(s.url(&format!("/Patient/_history?_count=3&_cursor={cursor}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "cursor bound to its listing");
    let r = s
        .http
        .get(s.url("/Device/_history?_cursor=garbage"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// _since, _count bounds, system history.
async fn since_count_and_system_history(s: &TestServer, tok: &str) {
    let r = s
        .http
        .get(s.url("/Device/_history?_since=not-a-date"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = s
        .http
        .get(s.url("/Device/_history?_since=2999-01-01T00:00:00Z"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().unwrap().len(), 0);
    let b: Value = s
        .http
        .get(s.url("/Device/_history?_count=100000"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().unwrap().len(), 7);
    assert_eq!(
        s.http
            .get(s.url("/Device/_history?_count=-1"))
            .bearer_auth(tok)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let b: Value = s
        .http
        .get(s.url("/_history"))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().unwrap().len(), 7);
}

/// _id search, unknown parameters lenient by default, strict on request.
async fn id_search_and_unknown_parameters(s: &TestServer, tok: &str, ids: &[String]) {
    use reqwest::Method as M;
    let b: Value = send(
        s,
        tok,
        M::GET,
        &format!("/Device?_id={},{}", ids[0], ids[1]),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(b["total"], 2);
    let b: Value = send(s, tok, M::GET, "/Device?foo=secret-value", None)
        .await
        .json()
        .await
        .unwrap();
    let last = b["entry"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["search"]["mode"], "outcome");
    assert!(
        !b.to_string().contains("secret-value"),
        "values are never echoed"
    );
    let r = s
        .http
        .get(s.url("/Device?foo=1"))
        .bearer_auth(tok)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

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

/// Two nodes over one PostgreSQL database: tokens issued by one are honoured
/// by the other, writes on one are read on the other, and concurrent updates
/// through both nodes never lose or duplicate a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_postgres() {
    let Some(a) = TestServer::start(common::Backend::Postgres).await else {
        return;
    };
    let (b_fhir, _stop) = a.second_node().await;
    let tok = a.token(ALL).await;
    let r = a
        .http
        .post(a.url("/Patient"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Patient","gender":"other"}).to_string())
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = a
        .http
        .get(format!("{b_fhir}/Patient/{id}"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "node B reads node A's write with node A's token"
    );
    let body: Value = r.json().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            a.url(&format!("/Patient/{id}"))
        } else {
            format!("{b_fhir}/Patient/{id}")
        };
        let (http, tok, mut body) = (a.http.clone(), tok.clone(), body.clone());
        body["gender"] = json!(if i % 3 == 0 { "male" } else { "female" });
        tasks.push(tokio::spawn(async move {
            http.put(url)
                .bearer_auth(tok)
                .header("content-type", FJ)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            409 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    let h: Value = a
        .http
        .get(format!("{b_fhir}/Patient/{id}/_history?_count=100"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<String> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        versions.len(),
        ok + 1,
        "every acknowledged update is a version, and only those"
    );
    let expect: Vec<String> = (1..=ok + 1).rev().map(|v| v.to_string()).collect();
    assert_eq!(versions, expect, "versions are consecutive");
}

/// A body sent without Content-Length (chunked) is cut off at the limit too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_oversized_body_is_413() {
    use tower::ServiceExt;
    let s = TestServer::start_with(common::Backend::Sqlite, |c| c.http.max_body_bytes = 4096)
        .await
        .unwrap();
    let tok = s.token(ALL).await;
    let app = phylax_server::http::router(s.state.clone());
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(b"{\"resourceType\":\"Patient\",\"id\":\"".to_vec()))
            .chain((0..100).map(|_| Ok(vec![b'a'; 100])))
            .chain(std::iter::once(Ok(b"\"}".to_vec())))
            .collect();
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    let req = axum::http::Request::post("/fhir/Patient")
        .header("authorization", format!("Bearer {tok}"))
        .header("content-type", FJ)
        .body(body)
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let small = axum::http::Request::post("/fhir/Patient")
        .header("authorization", format!("Bearer {tok}"))
        .header("content-type", FJ)
        .body(axum::body::Body::from_stream(futures_util::stream::iter(
            vec![
                Ok::<_, std::io::Error>(b"{\"resourceType\":".to_vec()),
                Ok(b"\"Patient\"}".to_vec()),
            ],
        )))
        .unwrap();
    let app = phylax_server::http::router(s.state.clone());
    assert_eq!(app.oneshot(small).await.unwrap().status(), 201);
}

/// A TLS client that trusts the instance's CA and speaks HTTP/1.1, for
/// tests that need the raw connection (slow and idle clients).
fn raw_tls(s: &TestServer) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn raw_connect(
    s: &TestServer,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = s.base.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tls.connect(name, tcp).await.unwrap()
}

/// Read until the server closes; what it sent, or None if it kept the
/// connection open past `secs`.
async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    secs: u64,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow and idle clients do not hold the server (slowloris): idle
/// connections, half-sent headers and trickled bodies are closed or
/// answered 408 within their timeouts; past `http.max_connections` new
/// connections wait, and the server keeps answering; memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.max_connections = 16;
        c.http.header_timeout_secs = 1;
        c.http.idle_timeout_secs = 1;
        c.http.body_timeout_secs = 2;
    })
    .await
    .unwrap();
    let tls = raw_tls(&s);
    // Idle after the handshake: closed.
    let mut idle = raw_connect(&s, &tls).await;
    assert!(
        read_until_closed(&mut idle, 5).await.is_some(),
        "idle connection kept"
    );
    // Headers half sent, then silence: closed.
    let mut half = raw_connect(&s, &tls).await;
    half.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut half, 5).await.is_some(),
        "slow headers kept"
    );
    // A body trickled in a byte at a time, keeping the bytes moving: 408
    // at the body deadline.
    let tok = s.token(ALL).await;
    let mut slow = raw_connect(&s, &tls).await;
    slow.write_all(
        format!(
            "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = tokio::io::split(slow);
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let answer = read_until_closed(&mut rd, 8).await;
    trickle.abort();
    let answer = answer.expect("slow body kept open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
    // Five times the connection cap, idle: the server still answers, and
    // drops them all; memory does not grow with them.
    let before = common::rss_kib();
    let mut held = Vec::new();
    for _ in 0..80 {
        let addr = s.base.trim_start_matches("https://").to_owned();
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.http.get(s.url("/metadata")).send(),
    )
    .await
    .expect("the server answers past the connection cap")
    .unwrap();
    assert_eq!(r.status(), 200);
    for mut c in held {
        assert!(read_until_closed(&mut c, 30).await.is_some());
    }
    let after = common::rss_kib();
    assert!(after < before + 64 * 1024, "RSS {before} -> {after} KiB");
}

/// A body over the limit answers 413 over HTTP/2 as over HTTP/1.1 (the
/// rest of it is read and dropped, so the client sees the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_over_http2_and_http1() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let tok = s.token(ALL).await;
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"{}\"}}",
        "a".repeat(9 * 1024 * 1024)
    );
    for h2 in [true, false] {
        let b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        let client = if h2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        }
        .build()
        .unwrap();
        for _ in 0..3 {
            let r = client
                .post(s.url("/Patient"))
                .bearer_auth(&tok)
                .header("content-type", FJ)
                .body(big.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("h2={h2}: {e:?}"));
            assert_eq!(
                r.version(),
                if h2 {
                    reqwest::Version::HTTP_2
                } else {
                    reqwest::Version::HTTP_11
                }
            );
            assert_eq!(r.status(), 413, "h2={h2}");
        }
    }
}

/// Per-client and per-user rate limits (`[rate]`): past the burst, 429
/// with Retry-After and an OperationOutcome; other callers are not
/// affected. The token endpoint limits each address before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.rate.client_per_minute = 60;
        c.rate.client_burst = 5;
        c.rate.token_ip_per_minute = 60;
        c.rate.token_ip_burst = 4;
    })
    .await
    .unwrap();
    // Tokens minted in-process: the token endpoint's own limit is below.
    let mint = |id: &str| {
        let scopes = phylax_auth::ScopeSet::parse_lenient(ALL);
        s.state
            .authn
            .tokens
            .issue(id, &scopes, chrono::Utc::now().timestamp())
            .unwrap()
            .0
    };
    let (a, b) = (mint("client-a"), mint("client-b"));
    for i in 0..5 {
        let r = s
            .http
            .get(s.url("/Patient?_count=1"))
            .bearer_auth(&a)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["issue"][0]["code"], "throttled");
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another client has its own budget");
    // The token endpoint: four requests from this address, then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = s
            .http
            .post(s.token_url())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        statuses.push((
            r.status().as_u16(),
            r.headers().get("retry-after").is_some(),
        ));
    }
    assert_eq!(
        statuses[..4].iter().filter(|x| x.0 == 429).count(),
        0,
        "{statuses:?}"
    );
    assert_eq!(statuses[4], (429, true), "{statuses:?}");
    let m = s.state.metrics.exposition();
    assert!(
        m.contains("phylax_rate_limited_total{kind=\"fhir\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("phylax_rate_limited_total{kind=\"token\"} 1"),
        "{m}"
    );
}

/// One address may hold at most `http.max_connections_per_ip`
/// connections: more are closed at once, the first ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.max_connections_per_ip = 3;
        c.http.header_timeout_secs = 30;
    })
    .await
    .unwrap();
    let addr = s.base.trim_start_matches("https://").to_owned();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        // Accepted in order: let the server count each one.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut over = held.split_off(3);
    for c in over.iter_mut() {
        assert!(
            read_until_closed(c, 3).await.is_some(),
            "a connection past the cap is closed at once"
        );
    }
    for c in held.iter_mut() {
        assert!(
            read_until_closed(c, 1).await.is_none(),
            "the first three stay open"
        );
    }
}
