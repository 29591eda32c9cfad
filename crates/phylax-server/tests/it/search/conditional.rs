//! Conditional create, update and delete.

use super::*;

both!(conditional_create_update_delete);
async fn conditional_create_update_delete(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let pat =
        |v: &str| json!({"resourceType":"Patient","identifier":[{"system":"urn:cond","value":v}]});
    let post_if = |body: Value, cond: &str| {
        let (tok, cond) = (tok.clone(), cond.to_owned());
        async move {
            let r = s
                .http
                .post(s.url("/Patient"))
                .bearer_auth(tok)
                .header("content-type", FJ)
                .header("if-none-exist", cond)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or_default())
        }
    };
    // Conditional create: the first creates, the second returns the match.
    let (st, a) = post_if(pat("c-1"), "identifier=urn:cond|c-1").await;
    assert_eq!(st, 201);
    let (st, again) = post_if(pat("c-1"), "identifier=urn:cond|c-1").await;
    assert_eq!(st, 200);
    assert_eq!(again["id"], a["id"]);
    create(s, &tok, pat("c-1")).await; // now two match
    assert_eq!(post_if(pat("c-1"), "identifier=urn:cond|c-1").await.0, 412);
    assert_eq!(
        post_if(pat("c-2"), "").await.0,
        400,
        "criteria are required"
    );
    assert_eq!(
        post_if(pat("c-2"), "nonsense=1").await.0,
        400,
        "unknown criteria are not ignored"
    );
    // Conditional update.
    let put = |q: &str, body: Value| {
        let (tok, q) = (tok.clone(), q.to_owned());
        async move {
            let r = s
                .http
                .put(s.url(&format!("/Patient?{q}")))
                .bearer_auth(tok)
                .header("content-type", FJ)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or_default())
        }
    };
    let (st, u1) = put("identifier=urn:cond|u-1", pat("u-1")).await;
    assert_eq!(st, 201, "no match: create");
    let mut b = pat("u-1");
    b["gender"] = json!("female");
    let (st, u2) = put("identifier=urn:cond|u-1", b).await;
    assert_eq!(st, 200, "one match: update it");
    assert_eq!(u2["id"], u1["id"]);
    assert_eq!(u2["meta"]["versionId"], "2");
    let mut wrong = pat("u-1");
    wrong["id"] = json!("someone-else");
    assert_eq!(put("identifier=urn:cond|u-1", wrong).await.0, 400);
    assert_eq!(put("identifier=urn:cond|c-1", pat("c-1")).await.0, 412);
    let mut taken = pat("u-9");
    taken["id"] = u1["id"].clone();
    assert_eq!(
        put("identifier=urn:cond|u-9", taken).await.0,
        409,
        "an existing id the criteria do not select"
    );
    // Conditional delete.
    let del = |q: &str| {
        let (tok, q) = (tok.clone(), q.to_owned());
        async move {
            s.http
                .delete(s.url(&format!("/Patient?{q}")))
                .bearer_auth(tok)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(del("identifier=urn:cond|c-1").await, 412);
    assert_eq!(del("identifier=urn:cond|u-1").await, 204);
    let id = u1["id"].as_str().unwrap();
    assert_eq!(get(s, &tok, &format!("/Patient/{id}")).await.0, 410);
    assert_eq!(del("identifier=urn:cond|nothing").await, 204);
    assert_eq!(del("").await, 400);
    // Conditional operations need the search permission too.
    let no_search = s.token("system/Patient.cud").await;
    let r = s
        .http
        .delete(s.url("/Patient?identifier=urn:cond|c-1"))
        .bearer_auth(&no_search)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
