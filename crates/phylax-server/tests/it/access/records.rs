//! Tampered index rows, patient attribution, private access logs, type history, canonical refs.

use super::*;

// Search index entries are not authenticated: someone with the database
// moves obs-gp's entries onto obs-other (another patient's), so that a
// clinician's search for their patient's observations matches it. The
// resource is checked again after decryption: nothing of it is served, the
// request fails, and an `index-tamper` alert is raised.
on_both!(a_tampered_index_row_is_caught_after_decryption);
async fn a_tampered_index_row_is_caught_after_decryption(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    assert_eq!(
        search(s, &a, "/Observation?subject=Patient/pa-gp").await,
        vec!["Observation/obs-gp"]
    );
    s.sql(
        "UPDATE search_entries SET seq = \
           (SELECT seq FROM resources WHERE rtype = 'Observation' AND id = 'obs-other') \
         WHERE seq = (SELECT seq FROM resources WHERE rtype = 'Observation' AND id = 'obs-gp')",
    )
    .await;
    for path in [
        "/Observation?subject=Patient/pa-gp",
        "/Observation?code=http://loinc.org|8867-4",
        "/Patient/pa-gp/Observation",
        "/Patient/pa-gp/$everything",
        "/Patient?_id=pa-gp&_revinclude=Observation:subject",
    ] {
        let (st, b) = send(s, &a, M::GET, path, None).await;
        assert_eq!(st, 500, "{path}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome", "{path}");
        assert!(!b.to_string().contains("obs-other"), "{path}: {b}");
    }
    assert!(wait_alerts(s, "index-tamper", 1).await >= 1);
}

// Every patient a returned resource names is attributed in the audit
// record (a Group of two patients, read by a backend client), and a
// patient's own `$access-log` shows only what concerns them: not the other
// patients a search record names, nor what was searched for.
on_both!(every_named_patient_is_attributed_and_access_logs_stay_private);
async fn every_named_patient_is_attributed_and_access_logs_stay_private(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    put(
        s,
        &l,
        json!({"resourceType": "Group", "id": "grp-2", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/pa-gp"}},
                       {"entity": {"reference": "Patient/pa-other"}}]}),
    )
    .await;
    assert_eq!(get(s, &l, "/Group/grp-2").await, 200);
    let (st, _) = send(s, &l, M::GET, "/Patient?_id=pa-gp,pa-other", None).await;
    assert_eq!(st, 200);
    let b = audit_of(s, "pa-other").await;
    let names_group = |action: &str| names(&b, Some(action), "Group/grp-2");
    assert!(names_group("C") || names_group("U"), "the Group write: {b}");
    assert!(
        names_group("R"),
        "the Group read is attributed to its second patient too"
    );
    // pa-gp's own access log: the two-patient search is there, without
    // pa-other and without the query entity.
    let me = user(
        s,
        "pat",
        "patient",
        None,
        Some("pa-gp"),
        "patient/*.rs",
        None,
    )
    .await;
    let (st, log) = send(
        s,
        &me,
        M::GET,
        "/Patient/pa-gp/$access-log?_count=200",
        None,
    )
    .await;
    assert_eq!(st, 200, "{log}");
    let text = log.to_string();
    assert!(!text.contains("pa-other"), "{text}");
    assert!(
        !text.contains("\"code\":\"24\""),
        "query entity shown: {text}"
    );
    assert!(text.contains("Patient/pa-gp"));
}

// Type history for a caller limited to some patients pages through their
// patients' versions only: another patient's writes neither fill pages
// (volume, timing) nor get decrypted.
on_both!(type_history_pages_only_through_reached_patients);
async fn type_history_pages_only_through_reached_patients(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    let mut url = s.url("/Observation/_history?_count=1");
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        pages += 1;
        assert!(pages < 10, "runaway paging");
        let r = s.http.get(&url).bearer_auth(&a).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        seen.extend(ids(&b));
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(n) => url = n["url"].as_str().unwrap().to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, vec!["Observation/obs-gp"]);
    // pa-gp's two versions (one hidden by its label), not pa-other's two.
    assert!(
        pages <= 2,
        "{pages} pages: other patients' versions were paged through"
    );
}

// Data written before references were made canonical: an Observation of
// pa-gp whose subject is an absolute URL to this server (so it was sealed
// under the tenant key and reached by nobody limited to patients). The
// start-up job gives it a new version in canonical form, under pa-gp's
// key, audited; run again it finds nothing.
on_both!(absolute_references_stored_earlier_are_made_canonical);
async fn absolute_references_stored_earlier_are_made_canonical(s: &TestServer) {
    load(s).await;
    let inst = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    // A repository that knows another base: it stores our base as it is.
    let old = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        inst.blind_key,
        "https://elsewhere.example/fhir".into(),
    );
    let t = phylax_fhir::ResourceType::parse("Observation").unwrap();
    let v = old
        .create(
            &t,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "old"},
                "subject": {"reference": format!("{}/Patient/pa-gp", s.fhir)}}),
            None,
        )
        .await
        .unwrap();
    let id = v.id.to_string();
    // One that names pa-gp already and pa-other only by an absolute URL:
    // made canonical it would enter pa-other's record, which its writer
    // was never checked for. It is left as it is, for review.
    let held = old
        .create(
            &t,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "held"},
                "subject": {"reference": "Patient/pa-gp"},
                "performer": [{"reference": format!("{}/Patient/pa-other", s.fhir)}]}),
            None,
        )
        .await
        .unwrap()
        .id
        .to_string();
    let row = s
        .store
        .read_current("Observation", &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.key_scope, "tenant");
    let a = clinician(s, "dr.a", "pr-a").await;
    assert_eq!(get(s, &a, &format!("/Observation/{id}")).await, 404);
    let n = phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
        .await
        .unwrap();
    assert_eq!(n, 0, "done once per instance, at the first start");
    // As at the first start after an upgrade: forget that it ran.
    s.sql("DELETE FROM meta WHERE key LIKE 'canonical_refs_v1_%'")
        .await;
    let n = phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let row = s
        .store
        .read_current("Observation", &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.key_scope, "patient:pa-gp");
    assert_eq!(row.version, 2);
    let kept = s
        .store
        .read_current("Observation", &held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        kept.version, 1,
        "not rewritten into another patient's record"
    );
    let (st, b) = send(s, &a, M::GET, &format!("/Observation/{id}"), None).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["subject"]["reference"], "Patient/pa-gp");
    assert!(search(s, &a, "/Observation?subject=Patient/pa-gp")
        .await
        .contains(&format!("Observation/{id}")));
    s.sql("DELETE FROM meta WHERE key LIKE 'canonical_refs_v1_%'")
        .await;
    assert_eq!(
        phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
            .await
            .unwrap(),
        0,
        "nothing left to rewrite"
    );
}
