//! Validation at the door (structure, content, bodies, media types) and every resource type served.

use super::*;

fn oo_expressions(v: &Value) -> Vec<String> {
    v["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
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
