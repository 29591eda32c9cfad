//! Paging through sealed cursors, POST search, hostile input, previous links, bounded pages.

use super::*;

both!(paging_post_search_and_hostile_input);
async fn paging_post_search_and_hostile_input(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let mut all = Vec::new();
    for i in 0..7 {
        all.push(
            create(
                s,
                &tok,
                json!({"resourceType":"Patient","name":[{"family":format!("Pagerson{i}")}]}),
            )
            .await,
        );
    }
    all.sort();
    paging_through_sealed_cursors(s, &tok, &all).await;
    tampered_or_foreign_cursors_are_refused(s, &tok).await;
    post_search_keeps_the_terms_out_of_links(s, &tok).await;
    unknown_and_bad_parameters(s, &tok).await;
    odd_values_and_limits(s, &tok).await;
}

/// Paging through sealed cursors: next links never show the search term.
async fn paging_through_sealed_cursors(s: &TestServer, tok: &str, all: &[String]) {
    let (_, b) = get(s, tok, "/Patient?family=pagerson&_count=3").await;
    assert_eq!(b["total"], 7);
    let mut seen: Vec<String> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    let mut next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap().to_owned());
    while let Some(url) = next {
        assert!(
            !url.to_lowercase().contains("pagerson"),
            "search term in a next link: {url}"
        );
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
        seen.extend(
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned()),
        );
        next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, all);
}

/// Tampered or foreign cursors are refused.
async fn tampered_or_foreign_cursors_are_refused(s: &TestServer, tok: &str) {
    let (_, b) = get(s, tok, "/Patient?family=pagerson&_count=3").await;
    let url = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let cursor = url.split("_cursor=").nth(1).unwrap().to_owned();
    let mut t = cursor.clone().into_bytes();
    t[10] = if t[10] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        get(
            s,
            tok,
            &format!("/Patient?_cursor={}", String::from_utf8(t).unwrap())
        )
        .await
        .0,
        400
    );
    assert_eq!(
        get(s, tok, &format!("/Observation?_cursor={cursor}"))
            .await
            .0,
        400,
        "cursor bound to its type"
    );
    assert_eq!(get(s, tok, "/Patient?_cursor=AAAA").await.0, 400);
}

/// POST _search with a form body gives the same answer; the terms stay
/// out of every link.
async fn post_search_keeps_the_terms_out_of_links(s: &TestServer, tok: &str) {
    let r = s
        .http
        .post(s.url("/Patient/_search"))
        .bearer_auth(tok)
        .form(&[("family", "pagerson"), ("_count", "100")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 7);
    // The terms stay out of every link: self (and next, previous) are
    // sealed cursors, and the self link gives the same page again.
    let r = s
        .http
        .post(s.url("/Patient/_search"))
        .bearer_auth(tok)
        .form(&[("family", "pagerson"), ("_count", "3")])
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    let links = b["link"].as_array().unwrap();
    assert!(links.len() >= 2, "{b}");
    for l in links {
        let u = l["url"].as_str().unwrap();
        assert!(!u.contains("pagerson") && !u.contains("family"), "{u}");
        assert!(u.contains("_cursor="), "{u}");
    }
    let self_url = links[0]["url"].as_str().unwrap();
    let again: Value = s
        .http
        .get(self_url)
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["entry"], b["entry"]);
    let next_url = links[1]["url"].as_str().unwrap();
    let page2: Value = s
        .http
        .get(next_url)
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for l in page2["link"].as_array().unwrap() {
        let u = l["url"].as_str().unwrap();
        assert!(!u.contains("pagerson") && u.contains("_cursor="), "{u}");
    }
    let r = s
        .http
        .post(s.url("/Patient/_search"))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

/// Unknown parameters: ignored with a warning, or 400 when strict; bad
/// modifiers and values: 400.
async fn unknown_and_bad_parameters(s: &TestServer, tok: &str) {
    let (st, b) = get(s, tok, "/Patient?nonsense=x&family=pagerson0").await;
    assert_eq!(st, 200);
    assert_eq!(b["total"], 1);
    assert_eq!(
        b["entry"].as_array().unwrap().last().unwrap()["search"]["mode"],
        "outcome"
    );
    let r = s
        .http
        .get(s.url("/Patient?nonsense=x"))
        .bearer_auth(tok)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for bad in [
        "/Patient?family:contains=x",
        "/Patient?family:missing=maybe",
        "/Patient?family=",
        "/Observation?date=not-a-date",
        "/Observation?value-quantity=abc",
        "/Observation?subject:nonsense=1",
        "/Patient?_lastUpdated=yesterday",
        // Multi-byte characters where a date or number is expected.
        "/Observation?date=abc%C3%A912",
        "/Patient?birthdate=ab%C3%A9d",
        "/Observation?value-quantity=%C3%A9",
    ] {
        let (st, b) = get(s, tok, bad).await;
        assert_eq!(st, 400, "{bad}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
    let long = "a".repeat(100);
    assert_eq!(get(s, tok, &format!("/Patient?family={long}")).await.0, 400);
}

/// SQL metacharacters and odd Unicode are just values; too many values or
/// parameters are a clear 400; unsupported composites are reported.
async fn odd_values_and_limits(s: &TestServer, tok: &str) {
    // SQL metacharacters and odd Unicode are just values.
    for v in [
        "'%20OR%20'1'='1",
        "%22%3B%20DROP%20TABLE%20resources%3B%20--",
        "%E2%80%AE%F0%9F%98%80",
        "%25",
        "_",
        "\\",
    ] {
        let (st, b) = get(s, tok, &format!("/Patient?family={v}")).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(b["total"], 0, "{v}");
    }
    // Too many values or parameters: a clear 400, not a database error.
    let many = vec!["x"; 101].join(",");
    assert_eq!(get(s, tok, &format!("/Patient?family={many}")).await.0, 400);
    assert_eq!(get(s, tok, &format!("/Patient?_id={many}")).await.0, 400);
    let lots: String = (0..65).map(|i| format!("gender=x{i}&")).collect();
    assert_eq!(get(s, tok, &format!("/Patient?{lots}")).await.0, 400);
    let ok100 = vec!["x"; 100].join(",");
    assert_eq!(
        get(s, tok, &format!("/Patient?family={ok100}&given={ok100}"))
            .await
            .0,
        200
    );
    let (st, b) = get(s, tok, "/Patient?_count=999999999").await;
    assert_eq!(st, 200);
    assert_eq!(b["entry"].as_array().unwrap().len(), 7);
    // Three-component composites are not supported: reported, not guessed.
    let (_, b) = get(
        s,
        tok,
        "/MolecularSequence?chromosome-window-coordinate=1$lt22$gt5",
    )
    .await;
    assert_eq!(
        b["entry"].as_array().unwrap().last().unwrap()["search"]["mode"],
        "outcome"
    );
}

both!(previous_links_walk_back_through_the_same_pages);
async fn previous_links_walk_back_through_the_same_pages(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    for i in 0..7 {
        create(
            s,
            &tok,
            json!({"resourceType":"Patient","active":true,"birthDate":format!("19{}0-01-01", 2 + i)}),
        )
        .await;
    }
    let link = |b: &Value, rel: &str| -> Option<String> {
        b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == rel)
            .map(|l| l["url"].as_str().unwrap().to_owned())
    };
    let page_ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let tok = &tok;
    let fetch = |url: String| async move {
        let r = s.http.get(url).bearer_auth(tok).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    for first in [
        "/Patient?active=true&_count=2",
        "/Patient?active=true&_count=2&_sort=birthdate",
    ] {
        let mut b = fetch(s.url(first)).await;
        assert!(link(&b, "previous").is_none(), "no previous on page one");
        let mut forward = vec![page_ids(&b)];
        while let Some(next) = link(&b, "next") {
            b = fetch(next).await;
            forward.push(page_ids(&b));
        }
        assert_eq!(forward.len(), 4, "{first}");
        let mut backward = vec![page_ids(&b)];
        while let Some(prev) = link(&b, "previous") {
            assert!(!prev.contains("active"), "no search term in the link");
            b = fetch(prev).await;
            backward.push(page_ids(&b));
        }
        backward.reverse();
        assert_eq!(backward, forward, "{first}: previous retraces next");
        // Back on page one: a next link again, no previous.
        assert!(link(&b, "next").is_some() && link(&b, "previous").is_none());
    }
}

// A search page is cut once its resources pass `http.max_response_bytes`
// (at least one stays): the rest comes on the next pages, each match once,
// in natural and in sorted order.
mod bounded_pages {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| c.http.max_response_bytes = 4096).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::bounded_pages_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::bounded_pages_body(&s).await;
        }
    }
}

async fn bounded_pages_body(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    for i in 0..20 {
        create(
            s,
            &tok,
            json!({"resourceType": "Patient", "name": [{"family": "Pagebound", "given": [format!("{i}{}", "x".repeat(300))]}]}),
        )
        .await;
    }
    for first in [
        "/Patient?family=Pagebound&_count=50",
        "/Patient?family=Pagebound&_count=50&_sort=given",
    ] {
        let mut url = s.url(first);
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 30);
            let b: Value = s
                .http
                .get(&url)
                .bearer_auth(&tok)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let n = b["entry"].as_array().map_or(0, Vec::len);
            assert!((1..20).contains(&n), "{first}: a page of {n}");
            seen.extend(
                b["entry"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["resource"]["id"].as_str().unwrap().to_owned()),
            );
            match b["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next")
            {
                Some(l) => url = l["url"].as_str().unwrap().to_owned(),
                None => break,
            }
        }
        let mut uniq = seen.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!((seen.len(), uniq.len()), (20, 20), "{first}");
        assert!(pages > 1);
    }
}
