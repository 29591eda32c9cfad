//! `_include`, `_revinclude` (and `:iterate`) under the access policy, chains and reverse chains.

use super::*;

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
