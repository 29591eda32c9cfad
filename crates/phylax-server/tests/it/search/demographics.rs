//! Patient demographics: strings, tokens, birth dates, ids, and updates and deletes.

use super::*;

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
