//! FHIR search over sealed data, on both backends.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{get, TestServer, FJ};
use serde_json::{json, Value};

async fn create(s: &TestServer, tok: &str, body: Value) -> String {
    let t = body["resourceType"].as_str().unwrap().to_owned();
    let r = s
        .http
        .post(s.url(&format!("/{t}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Ids of the matches, sorted; asserts the search succeeded and `total` agrees.
async fn ids(s: &TestServer, tok: &str, q: &str) -> Vec<String> {
    let (st, b) = get(s, tok, q).await;
    assert_eq!(st, 200, "{q}: {b}");
    let mut out: Vec<String> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(b["total"], json!(out.len()), "{q}");
    out.sort();
    out
}

fn sorted(mut v: Vec<&String>) -> Vec<String> {
    v.sort();
    v.into_iter().cloned().collect()
}

both!(patient_demographics_search_blind);
async fn patient_demographics_search_blind(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let p = demographics_patients(s, &tok).await;
    strings_match_prefix_case_and_accents(s, &tok, &p).await;
    tokens_match_system_and_code(s, &tok, &p).await;
    birth_dates_are_blind(s, &tok, &p).await;
    id_and_last_updated(s, &tok, &p).await;
    updates_and_deletes_move_results(s, &tok, &p).await;
}

/// The patients of [`patient_demographics_search_blind`].
struct Patients {
    a: String,
    b: String,
    c: String,
}

/// Anna Müller-Brandt, Ben Mueller and Zoë Smith.
async fn demographics_patients(s: &TestServer, tok: &str) -> Patients {
    let a = create(s, tok, json!({"resourceType":"Patient","gender":"female","birthDate":"1970-05-06",
        "name":[{"family":"Müller-Brandt","given":["Anna","Sophie"]}],
        "identifier":[{"system":"urn:mrn","value":"A-1"}],
        "telecom":[{"system":"phone","value":"555-0101"},{"system":"email","value":"anna@example.org"}],
        "address":[{"line":["1 Elm Street"],"city":"Springfield"}]})).await;
    let b = create(
        s,
        tok,
        json!({"resourceType":"Patient","gender":"male","birthDate":"1970-11",
        "name":[{"family":"Mueller","given":["Ben"]}],
        "identifier":[{"system":"urn:other","value":"A-1"}],
        "address":[{"city":"Shelbyville"}]}),
    )
    .await;
    let c = create(
        s,
        tok,
        json!({"resourceType":"Patient","gender":"female","birthDate":"1985",
        "name":[{"family":"Smith","given":["Zoë"]}]}),
    )
    .await;
    Patients { a, b, c }
}

/// Strings: prefix, case- and accent-insensitive; :exact.
async fn strings_match_prefix_case_and_accents(s: &TestServer, tok: &str, p: &Patients) {
    let Patients { a, b, c } = p;
    assert_eq!(ids(s, tok, "/Patient?family=mul").await, vec![a.clone()]);
    assert_eq!(
        ids(s, tok, "/Patient?family=MÜLLER-br").await,
        vec![a.clone()]
    );
    assert_eq!(ids(s, tok, "/Patient?family=mu").await, sorted(vec![a, b]));
    assert_eq!(
        ids(s, tok, "/Patient?family:exact=M%C3%BCller-Brandt").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?family:exact=m%C3%BCller-brandt").await,
        Vec::<String>::new()
    );
    assert_eq!(ids(s, tok, "/Patient?given=zoe").await, vec![c.clone()]);
    assert_eq!(ids(s, tok, "/Patient?name=soph").await, vec![a.clone()]);
    // `name` finds family and given names (stored once, under those
    // parameters) as well as name parts only `name` covers.
    assert_eq!(ids(s, tok, "/Patient?name=smi").await, vec![c.clone()]);
    assert_eq!(
        ids(s, tok, "/Patient?name:exact=Ben").await,
        vec![b.clone()]
    );
    assert_eq!(ids(s, tok, "/Patient?name:missing=false").await.len(), 3);
    assert_eq!(ids(s, tok, "/Patient?name:missing=true").await.len(), 0);
    assert_eq!(
        ids(s, tok, "/Patient?address=shelby").await,
        vec![b.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?address:missing=true").await,
        vec![c.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?address-city=spring").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?address=1%20elm").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?address=elm").await,
        Vec::<String>::new(),
        "starts-with, per field, as FHIR says"
    );
}

/// Tokens: system|code, |code, system|, code; OR with commas; AND repeated.
async fn tokens_match_system_and_code(s: &TestServer, tok: &str, p: &Patients) {
    let Patients { a, b, c } = p;
    assert_eq!(
        ids(s, tok, "/Patient?identifier=urn:mrn|A-1").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?identifier=A-1").await,
        sorted(vec![a, b])
    );
    assert_eq!(
        ids(s, tok, "/Patient?identifier=urn:other|").await,
        vec![b.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?identifier=|A-1").await,
        Vec::<String>::new(),
        "both have a system"
    );
    assert_eq!(
        ids(s, tok, "/Patient?gender=female").await,
        sorted(vec![a, c])
    );
    assert_eq!(
        ids(s, tok, "/Patient?gender:not=female").await,
        vec![b.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?gender=male,female&family=mu").await,
        sorted(vec![a, b])
    );
    assert_eq!(
        ids(s, tok, "/Patient?gender=female&family=mu").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?phone=555-0101").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?email=anna@example.org").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?telecom:missing=true").await,
        sorted(vec![b, c])
    );
}

/// Birth dates are blind: equality at year, month or day precision.
async fn birth_dates_are_blind(s: &TestServer, tok: &str, p: &Patients) {
    let Patients { a, b, c } = p;
    assert_eq!(
        ids(s, tok, "/Patient?birthdate=1970").await,
        sorted(vec![a, b])
    );
    assert_eq!(
        ids(s, tok, "/Patient?birthdate=1970-05").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?birthdate=1970-05-06").await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Patient?birthdate=1970-11-01").await,
        Vec::<String>::new(),
        "month precision is not a day"
    );
    assert_eq!(
        ids(s, tok, "/Patient?birthdate=ne1970").await,
        vec![c.clone()]
    );
    let (st, oo) = get(s, tok, "/Patient?birthdate=ge1970").await;
    assert_eq!(st, 400);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("blind"),
        "{oo}"
    );
}

/// _id and _lastUpdated.
async fn id_and_last_updated(s: &TestServer, tok: &str, p: &Patients) {
    let Patients { a, c, .. } = p;
    assert_eq!(
        ids(s, tok, &format!("/Patient?_id={a},{c}")).await,
        sorted(vec![a, c])
    );
    assert_eq!(
        ids(s, tok, "/Patient?_lastUpdated=gt2000-01-01")
            .await
            .len(),
        3
    );
    assert_eq!(
        ids(s, tok, "/Patient?_lastUpdated=lt2000-01-01")
            .await
            .len(),
        0
    );
}

/// Updates move a resource in and out of results; deletes remove it.
async fn updates_and_deletes_move_results(s: &TestServer, tok: &str, p: &Patients) {
    let Patients { a, c, .. } = p;
    let r = s
        .http
        .get(s.url(&format!("/Patient/{c}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let mut body: Value = r.json().await.unwrap();
    body["name"][0]["family"] = json!("Jones");
    s.http
        .put(s.url(&format!("/Patient/{c}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        ids(s, tok, "/Patient?family=smith").await,
        Vec::<String>::new()
    );
    assert_eq!(ids(s, tok, "/Patient?family=jon").await, vec![c.clone()]);
    s.http
        .delete(s.url(&format!("/Patient/{c}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ids(s, tok, "/Patient?family=jon").await,
        Vec::<String>::new()
    );
    assert_eq!(ids(s, tok, "/Patient?gender=female").await, vec![a.clone()]);
}

both!(clinical_search_references_dates_quantities);
async fn clinical_search_references_dates_quantities(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let p = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let q = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let obs = |pat: &str, code: &str, date: &str, kg: f64| {
        json!({"resourceType":"Observation","status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":code}],"text":"Body weight"},
        "subject":{"reference":format!("Patient/{pat}")}, "effectiveDateTime": date,
        "valueQuantity":{"value":kg,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"}})
    };
    let o1 = create(s, &tok, obs(&p, "29463-7", "2024-01-15T10:00:00Z", 72.5)).await;
    let o2 = create(s, &tok, obs(&p, "29463-7", "2024-03-01", 70.0)).await;
    let o3 = create(s, &tok, obs(&q, "8302-2", "2023-12-31", 180.0)).await;
    let w = Weights { p, q, o1, o2, o3 };
    references_by_type_id_and_url(s, &tok, &w).await;
    codes_and_text(s, &tok, &w).await;
    dates_with_prefixes_and_precision(s, &tok, &w).await;
    quantities_with_units_and_prefixes(s, &tok, &w).await;
}

/// Two patients and their body weight (p) and height (q) observations.
struct Weights {
    p: String,
    q: String,
    o1: String,
    o2: String,
    o3: String,
}

/// References: Type/id, id, absolute URL to this server, :Type modifier.
async fn references_by_type_id_and_url(s: &TestServer, tok: &str, w: &Weights) {
    let Weights { p, q, o1, o2, o3 } = w;
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject=Patient/{p}")).await,
        sorted(vec![o1, o2])
    );
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject={p}")).await,
        sorted(vec![o1, o2])
    );
    // A bare id is looked up under each of a parameter's few targets, and
    // still finds a reference to a type outside them (R4 does not forbid
    // one here) or on a parameter that may point anywhere (`focus`).
    let org = create(s, tok, json!({"resourceType":"Organization"})).await;
    let o4 = create(
        s,
        tok,
        json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":format!("Organization/{org}")},
            "focus":[{"reference":format!("Patient/{q}")}]}),
    )
    .await;
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject={org}")).await,
        vec![o4.clone()]
    );
    assert_eq!(
        ids(s, tok, &format!("/Observation?focus={q}")).await,
        vec![o4.clone()]
    );
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject={q},{org}")).await,
        sorted(vec![o3, &o4])
    );
    s.http
        .delete(s.url(&format!("/Observation/{o4}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ids(
            s,
            tok,
            &format!("/Observation?patient={}/Patient/{p}", s.fhir)
        )
        .await,
        sorted(vec![o1, o2])
    );
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject:Patient={q}")).await,
        vec![o3.clone()]
    );
    assert_eq!(
        ids(s, tok, &format!("/Observation?subject:Group={q}")).await,
        Vec::<String>::new()
    );
}

/// Codes and :text.
async fn codes_and_text(s: &TestServer, tok: &str, w: &Weights) {
    let Weights { o1, o2, o3, .. } = w;
    assert_eq!(
        ids(s, tok, "/Observation?code=http://loinc.org|29463-7").await,
        sorted(vec![o1, o2])
    );
    assert_eq!(
        ids(s, tok, "/Observation?code=8302-2").await,
        vec![o3.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?code:text=body").await.len(),
        3,
        "a whole word"
    );
    assert_eq!(
        ids(s, tok, "/Observation?code:text=body%20WEIGHT")
            .await
            .len(),
        3,
        "the whole text"
    );
    assert_eq!(
        ids(s, tok, "/Observation?code:text=bod").await.len(),
        0,
        ":text matches words, not prefixes"
    );
}

/// Dates with prefixes and precision.
async fn dates_with_prefixes_and_precision(s: &TestServer, tok: &str, w: &Weights) {
    let Weights { o1, o2, o3, .. } = w;
    assert_eq!(
        ids(s, tok, "/Observation?date=2024").await,
        sorted(vec![o1, o2])
    );
    assert_eq!(
        ids(s, tok, "/Observation?date=2024-01").await,
        vec![o1.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?date=ge2024-02-01").await,
        vec![o2.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?date=lt2024").await,
        vec![o3.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?date=ge2024-01-01&date=le2024-01-31").await,
        vec![o1.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?date=sa2024-02").await,
        vec![o2.clone()]
    );
}

/// Quantities with units and prefixes; implicit precision; and a
/// patient's observations of one code in a date range.
async fn quantities_with_units_and_prefixes(s: &TestServer, tok: &str, w: &Weights) {
    let Weights { p, o1, o2, o3, .. } = w;
    assert_eq!(
        ids(s, tok, "/Observation?value-quantity=72.5").await,
        vec![o1.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?value-quantity=72").await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?value-quantity=gt71|http://unitsofmeasure.org|kg"
        )
        .await,
        sorted(vec![o1, o3])
    );
    assert_eq!(
        ids(s, tok, "/Observation?value-quantity=gt71||lb").await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s, tok, "/Observation?value-quantity=ap70").await,
        sorted(vec![o1, o2])
    );
    // A patient's observations of one code in a date range.
    assert_eq!(
        ids(
            s,
            tok,
            &format!("/Observation?patient={p}&code=29463-7&date=ge2024-02-01")
        )
        .await,
        vec![o2.clone()]
    );
}

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

/// Data written before the index existed gets indexed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_data_is_reindexed_at_start() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let tok = s.token("system/*.cruds").await;
    let id = create(
        &s,
        &tok,
        json!({"resourceType":"Patient","name":[{"family":"Reindexson"}]}),
    )
    .await;
    {
        let c = rusqlite::Connection::open(s.data_dir.join("phylax.db")).unwrap();
        c.execute_batch(
            "DELETE FROM search_entries; DELETE FROM meta WHERE key = 'search_index_v1';",
        )
        .unwrap();
    }
    assert_eq!(
        ids(&s, &tok, "/Patient?family=reindex").await,
        Vec::<String>::new()
    );
    let inst = phylax_server::instance::Instance::open(&s.data_dir, None)
        .await
        .unwrap();
    // Starting the server builds the index...
    let st = phylax_server::state::AppState::new(inst).await.unwrap();
    drop(st);
    let inst = phylax_server::instance::Instance::open(&s.data_dir, None)
        .await
        .unwrap();
    let repo = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        inst.blind_key,
        s.fhir.clone(),
    );
    // ... once.
    assert_eq!(
        repo.reindex_if_needed().await.unwrap(),
        0,
        "done once, at start"
    );
    let q = phylax_store::SearchQuery {
        rtype: "Patient".into(),
        and: phylax_server::data::search::parse(
            repo.blind_key(),
            &s.fhir,
            &phylax_fhir::ResourceType::parse("Patient").unwrap(),
            &[("family".into(), "reindex".into())],
        )
        .unwrap()
        .and,
        before_seq: None,
        limit: 10,
    };
    let found = repo.search_unconfined(&q).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id.as_str(), id);
}

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

both!(include_and_revinclude_respect_the_policy);
async fn include_and_revinclude_respect_the_policy(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let p = create(s, &tok, json!({"resourceType":"Patient","gender":"other"})).await;
    let obs = |code: &str| {
        json!({"resourceType":"Observation","status":"final","code":{"coding":[{"code":code}]},
        "subject":{"reference":format!("Patient/{p}")}})
    };
    let o1 = create(s, &tok, obs("inc-1")).await;
    let o2 = create(s, &tok, obs("inc-2")).await;
    let entries = |b: &Value, mode: &str| -> Vec<String> {
        let mut v: Vec<String> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == mode)
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                )
            })
            .collect();
        v.sort();
        v
    };
    // _include: the patient once, however many matches point at it.
    let (st, b) = get(
        s,
        &tok,
        "/Observation?code=inc-1,inc-2&_include=Observation:subject",
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(entries(&b, "match").len(), 2);
    assert_eq!(entries(&b, "include"), vec![format!("Patient/{p}")]);
    assert_eq!(b["total"], 2, "included resources do not count");
    let (_, b) = get(
        s,
        &tok,
        "/Observation?code=inc-1&_include=Observation:subject:Group",
    )
    .await;
    assert!(entries(&b, "include").is_empty(), "target type filter");
    // _revinclude: resources pointing at the matches.
    let (_, b) = get(
        s,
        &tok,
        &format!("/Patient?_id={p}&_revinclude=Observation:subject"),
    )
    .await;
    assert_eq!(entries(&b, "include"), {
        let mut v = vec![format!("Observation/{o1}"), format!("Observation/{o2}")];
        v.sort();
        v
    });
    // What the caller may not read is silently left out.
    let obs_only = s.token("system/Observation.rs").await;
    let (st, b) = get(
        s,
        &obs_only,
        "/Observation?code=inc-1&_include=Observation:subject",
    )
    .await;
    assert_eq!(st, 200);
    assert!(entries(&b, "include").is_empty());
    let pat_only = s.token("system/Patient.rs").await;
    let (st, b) = get(
        s,
        &pat_only,
        &format!("/Patient?_id={p}&_revinclude=Observation:subject"),
    )
    .await;
    assert_eq!(st, 200);
    assert!(entries(&b, "include").is_empty());
    // Bad specifications.
    assert_eq!(
        get(s, &tok, "/Observation?_include=Patient:organization")
            .await
            .0,
        400
    );
    assert_eq!(
        get(s, &tok, "/Observation?_include=Observation:code")
            .await
            .0,
        400
    );
    assert_eq!(
        get(s, &tok, "/Observation?_include=Observation").await.0,
        400
    );
    assert_eq!(
        get(s, &tok, "/Observation?_include=Nope:subject").await.0,
        400
    );
}

both!(include_iterate_follows_chains_and_ends_loops);
async fn include_iterate_follows_chains_and_ends_loops(s: &TestServer) {
    // Patients with a GP and an organization: the relationship feed.
    let tok = s.feed_token("system/*.cruds");
    let org = create(
        s,
        &tok,
        json!({"resourceType":"Organization","name":"Clinic"}),
    )
    .await;
    let dr = create(
        s,
        &tok,
        json!({"resourceType":"Practitioner","name":[{"family":"Doc"}]}),
    )
    .await;
    let p = create(
        s,
        &tok,
        json!({"resourceType":"Patient","generalPractitioner":[{"reference":format!("Practitioner/{dr}")}],
            "managingOrganization":{"reference":format!("Organization/{org}")}}),
    )
    .await;
    let o = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":format!("Patient/{p}")}}),
    )
    .await;
    let entries = |b: &Value, mode: &str| -> Vec<String> {
        let mut v: Vec<String> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == mode)
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                )
            })
            .collect();
        v.sort();
        v
    };
    // Observation → its patient → the patient's practitioner (iterate).
    let (st, b) = get(
        s,
        &tok,
        &format!("/Observation?_id={o}&_include=Observation:subject&_include:iterate=Patient:general-practitioner"),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        entries(&b, "include"),
        sorted(vec![&format!("Patient/{p}"), &format!("Practitioner/{dr}")])
    );
    // Without :iterate the second hop does not happen.
    let (_, b) = get(
        s,
        &tok,
        &format!("/Observation?_id={o}&_include=Observation:subject&_include=Patient:general-practitioner"),
    )
    .await;
    assert_eq!(
        b["resourceType"], "OperationOutcome",
        "plain _include must start at the searched type"
    );
    // Reverse, then forward: organization ← patients ← observations.
    let (_, b) = get(
        s,
        &tok,
        &format!("/Organization?_id={org}&_revinclude=Patient:organization&_revinclude:iterate=Observation:subject"),
    )
    .await;
    assert_eq!(
        entries(&b, "include"),
        sorted(vec![&format!("Observation/{o}"), &format!("Patient/{p}")])
    );
    // A loop of links ends, each resource once.
    let a = create(s, &tok, json!({"resourceType":"Patient"})).await;
    let bb = create(
        s,
        &tok,
        json!({"resourceType":"Patient","link":[{"other":{"reference":format!("Patient/{a}")},"type":"seealso"}]}),
    )
    .await;
    let r = s
        .http
        .put(s.url(&format!("/Patient/{a}")))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .body(
            json!({"resourceType":"Patient","id":a,"link":[{"other":{"reference":format!("Patient/{bb}")},"type":"seealso"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, b) = get(
        s,
        &tok,
        &format!("/Patient?_id={a}&_include:iterate=Patient:link"),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(entries(&b, "match"), vec![format!("Patient/{a}")]);
    assert_eq!(entries(&b, "include"), vec![format!("Patient/{bb}")]);
}

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

both!(chaining_and_reverse_chaining);
async fn chaining_and_reverse_chaining(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let pa = create(
        s,
        &tok,
        json!({"resourceType":"Patient","name":[{"family":"Okafor"}],
            "identifier":[{"system":"urn:mrn","value":"A-1"}]}),
    )
    .await;
    let pb = create(
        s,
        &tok,
        json!({"resourceType":"Patient","name":[{"family":"Lindqvist"}],
            "identifier":[{"system":"urn:mrn","value":"B-2"}]}),
    )
    .await;
    let obs = |p: &str, code: &str| {
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":code}]},
            "subject":{"reference":format!("Patient/{p}")}})
    };
    let oa1 = create(s, &tok, obs(&pa, "1-1")).await;
    let oa2 = create(s, &tok, obs(&pa, "2-2")).await;
    let ob1 = create(s, &tok, obs(&pb, "1-1")).await;
    assert_eq!(
        ids(s, &tok, "/Observation?subject:Patient.name=okaf").await,
        sorted(vec![&oa1, &oa2])
    );
    assert_eq!(
        ids(s, &tok, "/Observation?subject.family=lindq").await,
        vec![ob1.clone()],
        "the target type is inferred from the parameter"
    );
    assert_eq!(
        ids(
            s,
            &tok,
            "/Observation?patient.identifier=urn:mrn|A-1&code=2-2"
        )
        .await,
        vec![oa2.clone()]
    );
    assert_eq!(
        ids(s, &tok, "/Observation?patient.identifier=urn:mrn|Z-9").await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s, &tok, "/Patient?_has:Observation:patient:code=2-2").await,
        vec![pa.clone()]
    );
    assert_eq!(
        ids(s, &tok, "/Patient?_has:Observation:subject:code=1-1").await,
        sorted(vec![&pa, &pb])
    );
    assert_eq!(
        ids(s, &tok, "/Patient?_has:Observation:patient:code=9-9").await,
        Vec::<String>::new()
    );
    // POST _search carries chains too.
    let r = s
        .http
        .post(s.url("/Observation/_search"))
        .bearer_auth(&tok)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("subject:Patient.name=Okafor")
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 2);
    // Hostile and unsupported.
    for (q, want) in [
        ("/Observation?subject:Patient.organization.name=x", 501),
        ("/Observation?status.name=x", 400),
        ("/Observation?subject:Nope.name=x", 400),
        ("/Observation?subject:Patient.nope=x", 400),
        ("/Patient?_has:Observation:patient=x", 400),
        ("/Patient?_has:Observation:code:code=x", 400),
        (
            "/Patient?_has:Observation:patient:_has:Observation:patient:code=x",
            501,
        ),
        ("/Observation?subject:Patient.name='%20OR%201=1--", 200),
    ] {
        assert_eq!(get(s, &tok, q).await.0, want, "{q}");
    }
    let many = ["subject.name=x"; 9].join("&");
    assert_eq!(get(s, &tok, &format!("/Observation?{many}")).await.0, 400);
    // A chain through a type the caller may not search: 403, and an
    // unnamed target it may not search is skipped.
    let narrow = s.token("system/Observation.rs").await;
    assert_eq!(
        get(s, &narrow, "/Observation?subject:Patient.name=okaf")
            .await
            .0,
        403
    );
    assert_eq!(
        ids(s, &narrow, "/Observation?subject.family=okaf").await,
        Vec::<String>::new()
    );
    assert_eq!(
        get(s, &narrow, "/Observation?_has:Observation:subject:code=1-1")
            .await
            .0,
        200
    );
}

both!(composite_parameters_pair_values_from_the_same_element);
async fn composite_parameters_pair_values_from_the_same_element(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    // Blood pressure: two components, each a code with a quantity.
    let bp = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},
            "component":[
                {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},
                 "valueQuantity":{"value":150,"unit":"mm[Hg]"}},
                {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},
                 "valueQuantity":{"value":85,"unit":"mm[Hg]"}}]}),
    )
    .await;
    let weight = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"29463-7"}]},
            "valueQuantity":{"value":72.5,"unit":"kg"}}),
    )
    .await;
    let smoker = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"72166-2"}]},
            "valueCodeableConcept":{"coding":[{"system":"http://snomed.info/sct","code":"449868002"}]},
            "effectiveDateTime":"2024-03-01"}),
    )
    .await;
    let obs = Composites { bp, weight, smoker };
    pairs_come_from_the_same_component(s, &tok, &obs).await;
    combo_parameters_answer_from_their_parts(s, &tok, &obs).await;
    malformed_composites_and_the_capability_statement(s, &tok).await;
}

/// A blood pressure, a body weight and a smoking status.
struct Composites {
    bp: String,
    weight: String,
    smoker: String,
}

/// A composite pairs a code with a value of the same component.
async fn pairs_come_from_the_same_component(s: &TestServer, tok: &str, obs: &Composites) {
    let Composites { bp, weight, smoker } = obs;
    let none: Vec<String> = Vec::new();
    // Systolic above 140: the blood pressure.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=http://loinc.org|8480-6$gt140"
        )
        .await,
        vec![bp.clone()]
    );
    // Diastolic above 140: no — 150 belongs to the other component.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=http://loinc.org|8462-4$gt140"
        )
        .await,
        none
    );
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=8462-4$lt90"
        )
        .await,
        vec![bp.clone()]
    );
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?code-value-quantity=http://loinc.org|29463-7$ge70"
        )
        .await,
        vec![weight.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-quantity=29463-7$lt70").await,
        none
    );
    // combo: the observation's own code and value, or a component's.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?combo-code-value-quantity=8480-6$150,29463-7$72.5"
        )
        .await,
        sorted(vec![bp, weight])
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|449868002").await,
        vec![smoker.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-concept=72166-2$8517006").await,
        none
    );
}

/// combo-* parameters are answered from their parts (no entries of
/// their own): the observation's own values or a component's.
async fn combo_parameters_answer_from_their_parts(s: &TestServer, tok: &str, obs: &Composites) {
    let Composites { bp, weight, smoker } = obs;
    let none: Vec<String> = Vec::new();
    assert_eq!(
        ids(s, tok, "/Observation?combo-code=8480-6,29463-7").await,
        sorted(vec![bp, weight])
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-value-quantity=gt100").await,
        vec![bp.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:missing=true").await,
        none
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-value-quantity:missing=true").await,
        vec![smoker.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:not=29463-7").await,
        sorted(vec![bp, smoker]),
        ":not holds for the observation's code and every component's"
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:not=8480-6").await,
        sorted(vec![weight, smoker])
    );
}

/// Malformed composite values: a clear 400. The CapabilityStatement lists
/// the composites it supports, and not MolecularSequence's
/// three-component coordinates.
async fn malformed_composites_and_the_capability_statement(s: &TestServer, tok: &str) {
    for q in [
        "/Observation?code-value-quantity=29463-7",
        "/Observation?code-value-quantity=$70",
        "/Observation?code-value-quantity=29463-7$heavy",
    ] {
        assert_eq!(get(s, tok, q).await.0, 400, "{q}");
    }
    // The CapabilityStatement lists the composites it supports, and not
    // MolecularSequence's three-component coordinates.
    let (_, cap) = get(s, tok, "/metadata").await;
    let params = |t: &str| -> Vec<String> {
        cap["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == t)
            .unwrap()["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(params("Observation").contains(&"component-code-value-quantity".to_string()));
    assert!(!params("MolecularSequence").contains(&"chromosome-window-coordinate".to_string()));
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
