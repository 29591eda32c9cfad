//! `_sort`, `_summary`, `_elements` and `_total`.

use super::*;

both!(sort_summary_elements_total);
async fn sort_summary_elements_total(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let mk = |family: &str, given: &str, birth: &str| {
        json!({"resourceType":"Patient","active":true,"name":[{"family":family,"given":[given]}],
            "birthDate":birth,"contact":[{"name":{"family":"Contact"}}],
            "text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">n</div>"}})
    };
    let c = create(s, &tok, mk("Cole", "Ann", "1990-05-01")).await;
    let a = create(s, &tok, mk("Abbot", "Zed", "1970-01-01")).await;
    let b2 = create(s, &tok, mk("Berg", "Bea", "2001-12-31")).await;
    let b1 = create(s, &tok, mk("Berg", "Al", "1985-06-15")).await;
    let order = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, b) = get(s, &tok, "/Patient?active=true&_sort=birthdate").await;
    assert_eq!(
        order(&b),
        vec![a.clone(), b1.clone(), c.clone(), b2.clone()]
    );
    let (_, b) = get(s, &tok, "/Patient?active=true&_sort=-birthdate").await;
    assert_eq!(
        order(&b),
        vec![b2.clone(), c.clone(), b1.clone(), a.clone()]
    );
    let (_, b) = get(s, &tok, "/Patient?active=true&_sort=family,-given").await;
    assert_eq!(
        order(&b),
        vec![a.clone(), b2.clone(), b1.clone(), c.clone()]
    );
    let (_, b) = get(s, &tok, "/Patient?active=true&_sort=-_lastUpdated").await;
    assert_eq!(
        order(&b),
        vec![b1.clone(), b2.clone(), a.clone(), c.clone()],
        "natural order: newest first"
    );
    let (_, b) = get(s, &tok, "/Patient?active=true&_sort=_lastUpdated").await;
    assert_eq!(
        order(&b),
        vec![c.clone(), a.clone(), b2.clone(), b1.clone()]
    );
    // Sorted paging: offsets in sealed cursors, no term in the next link.
    let mut got = Vec::new();
    let mut url = s.url("/Patient?active=true&_sort=family,given&_count=3");
    loop {
        let r: Value = s
            .http
            .get(&url)
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["total"], 4);
        got.extend(order(&r));
        match r["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => {
                url = l["url"].as_str().unwrap().to_owned();
                assert!(!url.contains("family"));
            }
            None => break,
        }
    }
    assert_eq!(got, vec![a.clone(), b1.clone(), b2.clone(), c.clone()]);
    // Unknown sort parameter, bad _summary/_total/_elements: 400.
    for q in [
        "/Patient?_sort=nope",
        "/Patient?_sort=birthdate;drop",
        "/Patient?_summary=maybe",
        "/Patient?_total=lots",
        "/Patient?_elements=name,x'--",
        "/Patient?_summary=true&_elements=name",
    ] {
        assert_eq!(get(s, &tok, q).await.0, 400, "{q}");
    }
    // _summary=true keeps summary elements and marks the result SUBSETTED.
    let (_, b) = get(s, &tok, &format!("/Patient?_id={a}&_summary=true")).await;
    let r = &b["entry"][0]["resource"];
    assert!(r.get("name").is_some() && r.get("birthDate").is_some());
    assert!(r.get("contact").is_none() && r.get("text").is_none());
    assert!(r["meta"]["tag"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["code"] == "SUBSETTED"));
    let (_, b) = get(s, &tok, &format!("/Patient?_id={a}&_summary=data")).await;
    let r = &b["entry"][0]["resource"];
    assert!(r.get("contact").is_some() && r.get("text").is_none());
    let (_, b) = get(s, &tok, &format!("/Patient?_id={a}&_summary=text")).await;
    let r = &b["entry"][0]["resource"];
    assert!(r.get("text").is_some() && r.get("name").is_none());
    let (_, b) = get(s, &tok, "/Patient?active=true&_summary=count").await;
    assert_eq!(b["total"], 4);
    assert!(b["entry"].as_array().is_none_or(|e| e.is_empty()));
    let (_, b) = get(s, &tok, &format!("/Patient?_id={a}&_elements=birthDate")).await;
    let r = &b["entry"][0]["resource"];
    assert_eq!(r["birthDate"], "1970-01-01");
    assert!(r.get("name").is_none() && r.get("contact").is_none());
    // On read too.
    let (st, r) = get(s, &tok, &format!("/Patient/{a}?_elements=name")).await;
    assert_eq!(st, 200);
    assert!(r.get("name").is_some() && r.get("birthDate").is_none());
    // _total=none leaves the total out.
    let (_, b) = get(s, &tok, "/Patient?active=true&_total=none").await;
    assert!(b.get("total").is_none());
    let (_, b) = get(s, &tok, "/Patient?active=true&_total=estimate").await;
    assert_eq!(b["total"], 4);
}
