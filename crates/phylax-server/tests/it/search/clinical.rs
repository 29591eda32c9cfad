//! Clinical parameters: references, codes and text, dates and quantities with prefixes.

use super::*;

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
