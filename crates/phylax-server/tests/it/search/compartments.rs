//! Patient compartment search and `$everything`.

use super::*;

both!(patient_compartment_search);
async fn patient_compartment_search(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let p = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let other = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let obs = |subject: &str, performer: Option<&str>| {
        let mut o = json!({"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"1-1"}]},
            "subject":{"reference":format!("Patient/{subject}")}});
        if let Some(pf) = performer {
            o["performer"] = json!([{"reference": format!("Patient/{pf}")}]);
        }
        o
    };
    let o1 = create(s, &tok, obs(&p, None)).await;
    let o2 = create(s, &tok, obs(&other, Some(&p))).await;
    let _o3 = create(s, &tok, obs(&other, None)).await;
    let c1 = create(
        s,
        &tok,
        json!({"resourceType":"Condition","subject":{"reference":format!("Patient/{p}")}}),
    )
    .await;
    // Observation is in the compartment through subject or performer.
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Observation")).await,
        sorted(vec![&o1, &o2])
    );
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Condition")).await,
        vec![c1.clone()]
    );
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Patient")).await,
        vec![p.clone()]
    );
    // Other parameters still apply; paging keeps the compartment.
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Observation?code=1-1")).await,
        sorted(vec![&o1, &o2])
    );
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Observation?code=2-2")).await,
        Vec::<String>::new()
    );
    let (_, b) = get(s, &tok, &format!("/Patient/{p}/Observation?_count=1")).await;
    assert_eq!(b["total"], 2);
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !next.contains(&p),
        "the patient id rides in the sealed cursor"
    );
    let b2: Value = s
        .http
        .get(&next)
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b2["entry"].as_array().unwrap().len(), 1);
    // A type outside the compartment matches nothing; a client cannot smuggle
    // the internal compartment parameter into a plain search.
    assert_eq!(
        ids(s, &tok, &format!("/Patient/{p}/Organization")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(
            s,
            &tok,
            &format!("/Observation?_compartment=Patient/{other}")
        )
        .await
        .len(),
        3
    );
    assert_eq!(
        get(s, &tok, &format!("/Encounter/{p}/Observation")).await.0,
        501
    );
    // Scopes apply to the target type.
    let pat_only = s.token("system/Patient.rs").await;
    assert_eq!(
        get(s, &pat_only, &format!("/Patient/{p}/Observation"))
            .await
            .0,
        403
    );
}

/// All match/include entries of `$everything`, following `next` links.
async fn everything_pages(s: &TestServer, tok: &str, first: &str) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut url = s.url(first);
    let mut pages = 0;
    loop {
        let r = s.http.get(&url).bearer_auth(tok).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        pages += 1;
        for e in b["entry"].as_array().unwrap() {
            let r = format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            );
            // A match appears once across pages; a referenced resource
            // rides along with every page that cites it.
            if e["search"]["mode"] == "match" {
                assert!(!out.contains(&r), "{r} matched twice");
            }
            if !out.contains(&r) {
                out.push(r);
            }
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => url = l["url"].as_str().unwrap().to_owned(),
            None => break,
        }
        assert!(pages < 50, "paging terminates");
    }
    out.sort();
    (out, pages)
}

both!(patient_everything);
async fn patient_everything(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let p = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let other = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let dr = create(s, &tok, json!({"resourceType":"Practitioner"})).await;
    let obs = |subject: &str| {
        json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":format!("Patient/{subject}")},
            "performer":[{"reference":format!("Practitioner/{dr}")}]})
    };
    let o1 = create(s, &tok, obs(&p)).await;
    let o2 = create(s, &tok, obs(&p)).await;
    let _o3 = create(s, &tok, obs(&other)).await;
    let enc = create(
        s,
        &tok,
        json!({"resourceType":"Encounter","status":"finished","class":{"code":"AMB"},
            "subject":{"reference":format!("Patient/{p}")}}),
    )
    .await;
    let cond = create(
        s,
        &tok,
        json!({"resourceType":"Condition","subject":{"reference":format!("Patient/{p}")}}),
    )
    .await;
    let all = {
        let mut v = vec![
            format!("Patient/{p}"),
            format!("Observation/{o1}"),
            format!("Observation/{o2}"),
            format!("Encounter/{enc}"),
            format!("Condition/{cond}"),
            format!("Practitioner/{dr}"),
        ];
        v.sort();
        v
    };
    let (got, pages) = everything_pages(s, &tok, &format!("/Patient/{p}/$everything")).await;
    assert_eq!(got, all);
    assert_eq!(pages, 1);
    // Paged two at a time: the same set, no duplicates.
    let (got, pages) =
        everything_pages(s, &tok, &format!("/Patient/{p}/$everything?_count=2")).await;
    assert_eq!(got, all);
    assert!(pages >= 3);
    // _type and _since.
    let (got, _) = everything_pages(
        s,
        &tok,
        &format!("/Patient/{p}/$everything?_type=Observation,Condition"),
    )
    .await;
    let mut want = vec![
        format!("Observation/{o1}"),
        format!("Observation/{o2}"),
        format!("Condition/{cond}"),
        format!("Practitioner/{dr}"),
    ];
    want.sort();
    assert_eq!(got, want);
    let (got, _) = everything_pages(
        s,
        &tok,
        &format!("/Patient/{p}/$everything?_since=2999-01-01T00:00:00Z"),
    )
    .await;
    assert!(got.is_empty());
    // Hostile: unknown parameter, bad _type, bad _since, unknown patient,
    // a tampered cursor, another patient's cursor.
    for (q, want) in [
        (format!("/Patient/{p}/$everything?name=x"), 400),
        (format!("/Patient/{p}/$everything?_type=Nope"), 400),
        (format!("/Patient/{p}/$everything?_since=yesterday"), 400),
        ("/Patient/no-such-patient/$everything".to_owned(), 404),
        (format!("/Patient/{p}/$everything?_cursor=AAAA"), 400),
    ] {
        assert_eq!(get(s, &tok, &q).await.0, want, "{q}");
    }
    let (_, b) = get(s, &tok, &format!("/Patient/{p}/$everything?_count=1")).await;
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let cursor = next.split("_cursor=").nth(1).unwrap();
    assert_eq!(
        get(
            s,
            &tok,
            &format!("/Patient/{other}/$everything?_cursor={cursor}")
        )
        .await
        .0,
        400,
        "a cursor is bound to its patient"
    );
    // Policy: types the caller may not search are left out silently;
    // without read on Patient, 403.
    let narrow = s.token("system/Patient.rs system/Condition.rs").await;
    let (got, _) = everything_pages(s, &narrow, &format!("/Patient/{p}/$everything")).await;
    let mut want = vec![format!("Patient/{p}"), format!("Condition/{cond}")];
    want.sort();
    assert_eq!(got, want);
    let no_patient = s.token("system/Observation.rs").await;
    assert_eq!(
        get(s, &no_patient, &format!("/Patient/{p}/$everything"))
            .await
            .0,
        403
    );
}
