//! Batch and transaction Bundles, on both backends.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{get, TestServer, FJ};
use serde_json::{json, Value};

async fn post_bundle(s: &TestServer, tok: &str, b: &Value) -> (u16, Value) {
    let r = s
        .http
        .post(s.url(""))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(b.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn total(s: &TestServer, tok: &str, q: &str) -> u64 {
    let (st, b) = get(s, tok, q).await;
    assert_eq!(st, 200, "{q}: {b}");
    b["total"].as_u64().unwrap()
}

/// Every version ever written, across all types (system history).
async fn versions_written(s: &TestServer, tok: &str) -> u64 {
    let (st, b) = get(s, tok, "/_history?_count=1000").await;
    assert_eq!(st, 200);
    b["entry"].as_array().map_or(0, |e| e.len() as u64)
}

fn tx(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn obs(subject: &str, code: &str) -> Value {
    json!({"resourceType":"Observation","status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":code}]},
        "subject":{"reference":subject}})
}

fn post(full_url: &str, resource: Value) -> Value {
    let t = resource["resourceType"].as_str().unwrap().to_owned();
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": t}})
}

fn status(e: &Value) -> &str {
    e["response"]["status"].as_str().unwrap()
}

both!(transaction_resolves_references_and_commits_together);
async fn transaction_resolves_references_and_commits_together(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    // An existing patient to delete and one to update, by id.
    let (_, old) = post_bundle(
        s,
        &tok,
        &tx(vec![
            post(
                "urn:uuid:00000000-0000-4000-8000-000000000001",
                json!({"resourceType":"Patient","active":true}),
            ),
            post(
                "urn:uuid:00000000-0000-4000-8000-000000000002",
                json!({"resourceType":"Patient","active":true}),
            ),
        ]),
    )
    .await;
    let old_id = |i: usize| {
        old["entry"][i]["resource"]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (doomed, kept) = (old_id(0), old_id(1));
    let pid = references_resolve_and_writes_commit_together(s, &tok, &doomed, &kept).await;
    conditional_create_and_conditional_reference(s, &tok, &pid).await;
    return_minimal_leaves_the_resources_out(s, &tok).await;
}

/// One transaction creates a patient and observations referring to it by
/// urn:uuid, updates one existing patient and deletes another; a GET in it
/// runs after the writes. Returns the new patient's id.
async fn references_resolve_and_writes_commit_together(
    s: &TestServer,
    tok: &str,
    doomed: &str,
    kept: &str,
) -> String {
    let pat = "urn:uuid:5f1c9e2a-0b7e-4d4f-9d2a-6c1d2b3a4e5f";
    let bundle = tx(vec![
        // Listed first, run last (GET after the writes): sees the new patient.
        json!({"request": {"method": "GET", "url": "Patient?identifier=http://example.org/mrn|T-1"}}),
        post(
            "urn:uuid:00000000-0000-4000-8000-000000000003",
            obs(pat, "1-1"),
        ),
        post(
            "urn:uuid:00000000-0000-4000-8000-000000000004",
            obs(pat, "2-2"),
        ),
        post(
            pat,
            json!({"resourceType":"Patient","identifier":[{"system":"http://example.org/mrn","value":"T-1"}]}),
        ),
        json!({"fullUrl": format!("{}/Patient/{kept}", s.url("")),
               "resource": {"resourceType":"Patient","id":kept,"active":false},
               "request": {"method": "PUT", "url": format!("Patient/{kept}"), "ifMatch": "W/\"1\""}}),
        json!({"request": {"method": "DELETE", "url": format!("Patient/{doomed}")}}),
    ]);
    let (st, b) = post_bundle(s, tok, &bundle).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["type"], "transaction-response");
    let e = b["entry"].as_array().unwrap();
    assert_eq!(e.len(), 6, "one response per entry, in the Bundle's order");
    assert_eq!(status(&e[0]), "200 OK");
    assert_eq!(e[0]["resource"]["total"], 1, "the GET ran after the POSTs");
    assert_eq!(status(&e[1]), "201 Created");
    assert_eq!(status(&e[3]), "201 Created");
    assert_eq!(status(&e[4]), "200 OK");
    assert_eq!(e[4]["response"]["etag"], "W/\"2\"");
    assert_eq!(status(&e[5]), "204 No Content");
    let pid = e[3]["resource"]["id"].as_str().unwrap().to_owned();
    assert!(e[3]["response"]["location"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Patient/{pid}/_history/1")));
    // urn:uuid references now point at the server id.
    for i in [1, 2] {
        assert_eq!(
            e[i]["resource"]["subject"]["reference"],
            format!("Patient/{pid}")
        );
    }
    // Stored that way: the patient's compartment has both observations.
    assert_eq!(
        total(s, tok, &format!("/Patient/{pid}/Observation")).await,
        2
    );
    assert_eq!(get(s, tok, &format!("/Patient/{doomed}")).await.0, 410);
    let (_, k) = get(s, tok, &format!("/Patient/{kept}")).await;
    assert_eq!(k["active"], false);
    pid
}

/// Conditional create and a conditional reference to an existing patient.
async fn conditional_create_and_conditional_reference(s: &TestServer, tok: &str, pid: &str) {
    let bundle = tx(vec![
        json!({"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000005",
               "resource": {"resourceType":"Patient","identifier":[{"system":"http://example.org/mrn","value":"T-1"}]},
               "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://example.org/mrn|T-1"}}),
        post(
            "urn:uuid:00000000-0000-4000-8000-000000000006",
            obs("urn:uuid:00000000-0000-4000-8000-000000000005", "3-3"),
        ),
        post(
            "urn:uuid:00000000-0000-4000-8000-000000000007",
            obs("Patient?identifier=http://example.org/mrn|T-1", "4-4"),
        ),
    ]);
    let (st, b) = post_bundle(s, tok, &bundle).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(status(&b["entry"][0]), "200 OK", "matched: not created");
    assert_eq!(b["entry"][0]["resource"]["id"], pid);
    for i in [1, 2] {
        assert_eq!(
            b["entry"][i]["resource"]["subject"]["reference"],
            format!("Patient/{pid}")
        );
    }
    assert_eq!(
        total(s, tok, &format!("/Patient/{pid}/Observation")).await,
        4
    );
    assert_eq!(
        total(s, tok, "/Patient?identifier=http://example.org/mrn|T-1").await,
        1
    );
}

/// Prefer: return=minimal leaves the resources out.
async fn return_minimal_leaves_the_resources_out(s: &TestServer, tok: &str) {
    let r = s
        .http
        .post(s.url(""))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .header("prefer", "return=minimal")
        .body(
            tx(vec![post(
                "urn:uuid:00000000-0000-4000-8000-000000000008",
                json!({"resourceType":"Patient"}),
            )])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert!(b["entry"][0].get("resource").is_none());
    assert_eq!(status(&b["entry"][0]), "201 Created");
}

both!(failed_transactions_leave_nothing_behind);
async fn failed_transactions_leave_nothing_behind(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let (_, b) = post_bundle(
        s,
        &tok,
        &tx(vec![post(
            "urn:uuid:00000000-0000-4000-8000-000000000009",
            json!({"resourceType":"Patient"}),
        )]),
    )
    .await;
    let pid = b["entry"][0]["resource"]["id"].as_str().unwrap().to_owned();
    let before = versions_written(s, &tok).await;
    let cases = failing_transactions(&pid);
    for (want, bundle) in cases {
        let (st, b) = post_bundle(s, &tok, &bundle).await;
        assert_eq!(st, want, "{bundle}\n→ {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
        assert_eq!(
            versions_written(s, &tok).await,
            before,
            "nothing was written by {bundle}"
        );
    }
    an_error_names_the_entry(s, &tok).await;
    wrong_bundles_are_refused(s, &tok, before).await;
}

/// A valid Observation of the patient created as urn:uuid ...11.
fn good() -> Value {
    post(
        "urn:uuid:00000000-0000-4000-8000-000000000010",
        obs("urn:uuid:00000000-0000-4000-8000-000000000011", "1-1"),
    )
}

/// A valid new Patient, fullUrl urn:uuid ...11.
fn p2() -> Value {
    post(
        "urn:uuid:00000000-0000-4000-8000-000000000011",
        json!({"resourceType":"Patient"}),
    )
}

/// Transactions that must fail as a whole, with the status they fail with.
fn failing_transactions(pid: &str) -> Vec<(u16, Value)> {
    vec![
        // The last entry is invalid (Observation without status).
        (
            422,
            tx(vec![
                p2(),
                good(),
                post(
                    "urn:uuid:00000000-0000-4000-8000-000000000012",
                    json!({"resourceType":"Observation","code":{"text":"x"}}),
                ),
            ]),
        ),
        // A stale ifMatch on an update.
        (
            412,
            tx(vec![
                p2(),
                good(),
                json!({"resource": {"resourceType":"Patient","id":pid},
                       "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"7\""}}),
            ]),
        ),
        // A reference to a fullUrl no entry has.
        (
            400,
            tx(vec![
                p2(),
                post(
                    "urn:uuid:00000000-0000-4000-8000-000000000013",
                    obs("urn:uuid:00000000-0000-4000-8000-000000000014", "1-1"),
                ),
            ]),
        ),
        // The same resource twice.
        (
            400,
            tx(vec![
                json!({"resource": {"resourceType":"Patient","id":pid}, "request": {"method": "PUT", "url": format!("Patient/{pid}")}}),
                json!({"request": {"method": "DELETE", "url": format!("Patient/{pid}")}}),
            ]),
        ),
        // A conditional reference that matches nothing.
        (
            412,
            tx(vec![
                p2(),
                post(
                    "urn:uuid:00000000-0000-4000-8000-000000000015",
                    obs("Patient?identifier=nobody|none", "1-1"),
                ),
            ]),
        ),
        // Deleting what never existed.
        (
            404,
            tx(vec![
                p2(),
                json!({"request": {"method": "DELETE", "url": "Patient/never-was"}}),
            ]),
        ),
        // A type mismatch between the URL and the resource.
        (
            400,
            tx(vec![
                json!({"resource": {"resourceType":"Patient"}, "request": {"method": "POST", "url": "Observation"}}),
            ]),
        ),
        // SQL metacharacters in a URL: not even a valid URI.
        (
            422,
            tx(vec![
                p2(),
                json!({"request": {"method": "DELETE", "url": "Patient/x'; DROP TABLE resources;--"}}),
            ]),
        ),
        // Unicode in an id: not a FHIR id.
        (
            400,
            tx(vec![
                p2(),
                json!({"request": {"method": "DELETE", "url": "Patient/Müller-Straße"}}),
            ]),
        ),
        // Unknown method, missing request.
        (
            400,
            tx(vec![
                json!({"resource": {"resourceType":"Patient"}, "request": {"method": "PATCH", "url": "Patient/1"}}),
            ]),
        ),
        (
            400,
            tx(vec![json!({"resource": {"resourceType":"Patient"}})]),
        ),
    ]
}

/// An error names the entry.
async fn an_error_names_the_entry(s: &TestServer, tok: &str) {
    let (_, b) = post_bundle(
        s,
        tok,
        &tx(vec![
            p2(),
            post(
                "urn:uuid:00000000-0000-4000-8000-000000000012",
                json!({"resourceType":"Observation","code":{"text":"x"}}),
            ),
        ]),
    )
    .await;
    assert!(b.to_string().contains("Bundle.entry[1]"), "{b}");
}

/// A Bundle of the wrong type, or not a Bundle at all; too many entries.
async fn wrong_bundles_are_refused(s: &TestServer, tok: &str, before: u64) {
    let (st, _) = post_bundle(
        s,
        tok,
        &json!({"resourceType":"Bundle","type":"collection","entry":[]}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = post_bundle(s, tok, &json!({"resourceType":"Patient"})).await;
    assert_eq!(st, 400);
    let r = s
        .http
        .post(s.url(""))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body("{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Too many entries.
    let many: Vec<Value> = (0..5001)
        .map(|i| {
            post(
                &format!("urn:uuid:00000000-0000-4000-8000-{i:012}"),
                json!({"resourceType":"Basic","code":{"text":"x"}}),
            )
        })
        .collect();
    let (st, _) = post_bundle(s, tok, &tx(many)).await;
    assert_eq!(st, 400);
    assert_eq!(versions_written(s, tok).await, before);
}

both!(transaction_needs_every_entrys_permission);
async fn transaction_needs_every_entrys_permission(s: &TestServer) {
    let admin = s.token("system/*.cruds").await;
    let before = versions_written(s, &admin).await;
    let tok = s.token("system/Patient.c").await;
    let (st, b) = post_bundle(
        s,
        &tok,
        &tx(vec![
            post(
                "urn:uuid:00000000-0000-4000-8000-000000000009",
                json!({"resourceType":"Patient"}),
            ),
            post(
                "urn:uuid:00000000-0000-4000-8000-000000000017",
                obs("urn:uuid:00000000-0000-4000-8000-000000000009", "1-1"),
            ),
        ]),
    )
    .await;
    assert_eq!(st, 403, "{b}");
    assert_eq!(versions_written(s, &admin).await, before);
    // Without a token: 401.
    let r = s
        .http
        .post(s.url(""))
        .header("content-type", FJ)
        .body(tx(vec![]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

both!(batch_entries_succeed_or_fail_on_their_own);
async fn batch_entries_succeed_or_fail_on_their_own(s: &TestServer) {
    let tok = s.token("system/Patient.cruds system/Observation.rs").await;
    let bundle = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"resource": {"resourceType":"Patient","active":true}, "request": {"method":"POST","url":"Patient"}},
        {"resource": {"resourceType":"Observation","status":"final","code":{"text":"x"}}, "request": {"method":"POST","url":"Observation"}},
        {"resource": {"resourceType":"Patient","birthDate":"not a date"}, "request": {"method":"POST","url":"Patient"}},
        {"request": {"method":"GET","url":"Patient/does-not-exist"}},
        {"request": {"method":"GET","url":"Patient?active=true"}},
        {"resource": {"resourceType":"Bundle","type":"batch"}, "request": {"method":"POST","url":"/"}},
    ]});
    let (st, b) = post_bundle(s, &tok, &bundle).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["type"], "batch-response");
    let e = b["entry"].as_array().unwrap();
    assert_eq!(status(&e[0]), "201 Created");
    assert!(e[0]["response"]["location"]
        .as_str()
        .unwrap()
        .contains("/Patient/"));
    assert_eq!(
        status(&e[1]),
        "403 Forbidden",
        "no create scope on Observation"
    );
    assert!(status(&e[2]).starts_with("4"), "{}", e[2]);
    assert_eq!(
        e[2]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(status(&e[3]), "404 Not Found");
    assert_eq!(status(&e[4]), "200 OK");
    assert_eq!(e[4]["resource"]["total"], 1, "the first entry's patient");
    assert!(status(&e[5]).starts_with("400"), "{}", e[5]);
}

/// A batch's answer is bounded (`http.max_response_bytes`): once it passes
/// the bound, the remaining entries are not run, each answered 422
/// `too-costly`, and a write among them did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_are_bounded() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.max_response_bytes = 8 * 1024
    })
    .await
    .unwrap();
    let tok = s.token("system/*.cruds").await;
    for i in 0..20 {
        let r = s
            .http
            .post(s.url("/Patient"))
            .bearer_auth(&tok)
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Patient", "name": [{"family": format!("Bound{i}"), "given": ["A".repeat(200)]}]}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mut entries: Vec<Value> = (0..10)
        .map(|_| json!({"request": {"method": "GET", "url": "Patient?_count=20"}}))
        .collect();
    entries.push(
        json!({"resource": {"resourceType": "Patient", "name": [{"family": "NeverWritten"}]},
        "request": {"method": "POST", "url": "Patient"}}),
    );
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let r = s
        .http
        .post(s.fhir.clone())
        .bearer_auth(&tok)
        .header("content-type", "application/fhir+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    let statuses: Vec<String> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
        .collect();
    assert!(statuses[0].starts_with("200"), "{statuses:?}");
    assert!(statuses.last().unwrap().starts_with("422"), "{statuses:?}");
    let cut = b["entry"].as_array().unwrap().last().unwrap();
    assert_eq!(cut["response"]["outcome"]["issue"][0]["code"], "too-costly");
    let r = s
        .http
        .get(s.url("/Patient?family=NeverWritten"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let found: Value = r.json().await.unwrap();
    assert_eq!(found["total"], 0, "the write past the bound did not happen");
}
