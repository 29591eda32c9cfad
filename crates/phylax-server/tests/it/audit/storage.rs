//! How records are stored: retention, compression, patient key collisions.

use super::*;

// Retention: bodies of sealed records older than `retention_days` are
// emptied, their leaf hashes kept; the log still verifies, the records are
// gone from searches (410 when read), the pruning is recorded, and a body
// emptied too early is caught.
both!(retention_prunes_bodies_and_the_log_still_verifies);
async fn retention_prunes_bodies_and_the_log_still_verifies(s: &TestServer) {
    let tok = s.token(ALL).await;
    some_traffic(s, &tok).await;
    // Seven years on: every record so far is past the six-year retention.
    // (A pruned record's age is judged by the signed time of the first
    // checkpoint that covers it, so the clock is moved, not the records.)
    let later = chrono::Utc::now().timestamp_millis() + 7 * 365 * 86_400_000_i64;
    let mut old_ids = Vec::new();
    let mut old = Vec::new();
    for i in 0..2 {
        let row = s.state.audit.draft(&facts(100 + i)).unwrap();
        old_ids.push(row.event_id.clone());
        old.push(row);
    }
    s.store.append_audit(old).await.unwrap();
    s.state.audit.seal_pending().await.unwrap();
    let before = s.state.audit.verify(&[], None).await.unwrap();
    let n = s.state.audit.prune(later).await.unwrap();
    assert_eq!(n, before.sealed, "every record sealed so far");
    s.state.audit.seal_pending().await.unwrap();
    let after = s.state.audit.verify_at(&[], None, later).await.unwrap();
    assert_eq!(after.pruned, n);
    assert_eq!(
        after.sealed,
        before.sealed + 1,
        "plus the prune's own record"
    );
    assert_eq!(records_of(s, "audit-prune", 10).await.len(), 1);
    let auditor = s.token("system/AuditEvent.rs").await;
    let r = s
        .http
        .get(s.url(&format!("/AuditEvent/{}", old_ids[0])))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let (_, b) = send(
        s,
        &auditor,
        reqwest::Method::GET,
        "/AuditEvent?_count=1000",
        None,
    )
    .await;
    assert!(!b.to_string().contains(&old_ids[1]));
    // Only emptying a sealed body is allowed, nothing else.
    let (empty, bad) = match s.backend {
        common::Backend::Sqlite => ("x''", "x'01'"),
        common::Backend::Postgres => ("''::bytea", "'\\x01'::bytea"),
    };
    s.state.audit.seal_pending().await.unwrap();
    let recent = records_of(s, "read", 1).await[0].event_id.clone();
    for sql in [
        format!("UPDATE audit_log SET sealed = {empty}, agent = 'x' WHERE event_id = '{recent}'"),
        format!("UPDATE audit_log SET sealed = {bad} WHERE event_id = '{recent}'"),
    ] {
        assert!(s.try_sql(&sql).await.is_err(), "{sql}");
    }
    // Emptying a recent body passes the database, but not verification.
    s.try_sql(&format!(
        "UPDATE audit_log SET sealed = {empty} WHERE event_id = '{recent}'"
    ))
    .await
    .unwrap();
    let e = s.state.audit.verify(&[], None).await.unwrap_err();
    assert!(
        e.to_string().contains("pruned before its retention ended"),
        "{e}"
    );
}

// Records are compressed before they are sealed: a search's record, which
// names every patient returned, is stored in a fraction of its JSON, and
// reads back as exactly the JSON its leaf hash covers. Records sealed
// before compression (the JSON itself under the seal) still open and
// verify beside them.
both!(records_are_stored_compressed_and_earlier_ones_still_open);
async fn records_are_stored_compressed_and_earlier_ones_still_open(s: &TestServer) {
    let mut many = facts(0);
    many.patients = (0..40).map(|i| format!("patient-{i:04}")).collect();
    s.state.audit.record(&many).await.unwrap();
    // An earlier version's record: the same kind of facts, its JSON
    // sealed as it is, under the same key and binding.
    let mut old = facts(1);
    old.patients = (0..40).map(|i| format!("earlier-{i:04}")).collect();
    let mut row = s.state.audit.draft(&old).unwrap();
    let json = old.to_json().unwrap();
    let key = s.state.keys.for_write("audit").await.unwrap();
    row.sealed = key
        .seal(format!("phylax/audit/v1\0{}", old.id).as_bytes(), &json)
        .unwrap();
    s.store.append_audit(vec![row]).await.unwrap();
    s.state.audit.flush().await.unwrap();

    let new_row = s.store.audit_get(&many.id).await.unwrap().unwrap();
    let new_json = s.state.audit.leaf_bytes(&new_row).unwrap();
    assert_eq!(new_json, many.to_json().unwrap());
    assert!(
        new_row.sealed.len() * 3 < new_json.len(),
        "a 40-patient record of {} bytes was stored in {}",
        new_json.len(),
        new_row.sealed.len()
    );
    let old_row = s.store.audit_get(&old.id).await.unwrap().unwrap();
    assert!(old_row.sealed.len() > json.len());
    assert_eq!(s.state.audit.leaf_bytes(&old_row).unwrap(), json);
    let v = s.state.audit.open_row(&old_row).unwrap();
    assert_eq!(v, serde_json::from_slice::<Value>(&json).unwrap());
    s.state.audit.seal_pending().await.unwrap();
    s.state.audit.verify(&[], None).await.unwrap();
}

// The store finds a patient's records by the first 64 bits of their keyed
// hash (`phylax_store::query::patient_key`), so a record about another
// patient whose hash shares them comes back from the store too. The API
// never shows it for this patient.
both!(a_patient_key_collision_shows_no_other_patients_record);
async fn a_patient_key_collision_shows_no_other_patients_record(s: &TestServer) {
    let mine = facts(0);
    s.state.audit.record(&mine).await.unwrap();
    s.state.audit.flush().await.unwrap();
    // A record about p1 whose entry collides with p0's key: p0's hash,
    // changed after its eighth byte.
    let other = facts(1);
    let mut row = s.state.audit.draft(&other).unwrap();
    let mut h = s.state.audit.patient_hash("p0");
    h[8..].fill(0xEE);
    row.patients = vec![h];
    s.store.append_audit(vec![row]).await.unwrap();
    s.state.audit.flush().await.unwrap();
    let stored = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            patient: Some(s.state.audit.patient_hash("p0")),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 2, "the store returns both records");
    let siem = s.token("system/AuditEvent.rs").await;
    for q in ["patient=p0", "entity=Patient/p0", "patient=p0&_count=1"] {
        let (st, b) = send(
            s,
            &siem,
            reqwest::Method::GET,
            &format!("/AuditEvent?{q}"),
            None,
        )
        .await;
        assert_eq!(st, 200, "{b}");
        let urls: Vec<&str> = b["entry"]
            .as_array()
            .map(|es| es.iter().filter_map(|e| e["fullUrl"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            urls.iter().all(|u| !u.ends_with(&other.id)),
            "{q}: another patient's record shown: {urls:?}"
        );
        if q.ends_with("_count=1") {
            // The newest record is the other patient's: this page is empty,
            // and the next one still leads to this patient's record.
            assert!(urls.is_empty(), "{urls:?}");
            let next = b["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .unwrap();
            let next = next.split_once("/fhir").unwrap().1;
            let (st, b) = send(s, &siem, reqwest::Method::GET, next, None).await;
            assert_eq!(st, 200, "{b}");
            assert!(b["entry"][0]["fullUrl"]
                .as_str()
                .unwrap()
                .ends_with(&mine.id));
        } else {
            assert_eq!(urls.len(), 1, "{q}: {urls:?}");
            assert!(urls[0].ends_with(&mine.id));
        }
    }
}
