//! History paging, sealed cursors, `_since` and `_count`, type search paging.

use super::*;

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
