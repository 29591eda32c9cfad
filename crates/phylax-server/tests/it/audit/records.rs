//! Every interaction is recorded, readable by auditors only, free of PHI, never writable; signed.

use super::*;

both!(interactions_are_recorded_and_readable_by_auditors_only);
async fn interactions_are_recorded_and_readable_by_auditors_only(s: &TestServer) {
    use reqwest::Method as M;
    let tok = s.token(ALL).await;
    let (pid, oid) = some_traffic(s, &tok).await;
    assert_eq!(
        send(s, &tok, M::DELETE, &format!("/Observation/{oid}"), None)
            .await
            .0,
        204
    );
    // Another patient's id guessed: recorded as a failure, without the id.
    assert_eq!(
        send(s, &tok, M::GET, "/Patient/does-not-exist", None)
            .await
            .0,
        404
    );
    let (siem, first) = auditors_read_the_log_and_no_phi(s, &tok, &pid).await;
    let one = first["id"].as_str().unwrap();
    filters_records_and_cursors(s, &siem, one).await;
    the_log_is_never_writable(s, &siem, one, &first).await;
    access_log_for_auditors_only(s, &tok, &siem, &pid).await;
    checkpoints_are_signed_and_verified(s, &tok, one).await;
}

/// The clinical client cannot read the log; a SIEM connector can, and
/// finds every interaction with the patient, without PHI. Returns the
/// SIEM's token and the first of those records.
async fn auditors_read_the_log_and_no_phi(s: &TestServer, tok: &str, pid: &str) -> (String, Value) {
    use reqwest::Method as M;
    // The clinical client cannot read the log, even with system/*.
    let (st, _) = send(s, tok, M::GET, "/AuditEvent", None).await;
    assert_eq!(st, 403);
    // A SIEM connector can, with a scope that names AuditEvent.
    let siem = s.token("system/AuditEvent.rs").await;
    let (st, b) = send(
        s,
        &siem,
        M::GET,
        &format!("/AuditEvent?patient={pid}&_count=100"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let events: Vec<&Value> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let subtypes: Vec<&str> = events
        .iter()
        .map(|e| e["subtype"][0]["code"].as_str().unwrap())
        .collect();
    for want in ["create", "read", "search-type", "delete"] {
        assert!(subtypes.contains(&want), "{want} missing from {subtypes:?}");
    }
    // The name search returned the patient: it is in that record, the
    // search value is not.
    let text = b.to_string();
    assert!(
        !text.contains(FAMILY) && !text.contains("1961-07-04"),
        "PHI in the log"
    );
    assert!(
        text.contains("parameters: family"),
        "search parameter names are recorded"
    );
    for e in &events {
        assert_eq!(e["resourceType"], "AuditEvent");
        assert!(e["entity"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["what"]["reference"] == format!("Patient/{pid}")));
        assert!(e["agent"][0]["who"]["identifier"]["value"].is_string());
        assert!(e["meta"]["profile"][0].as_str().unwrap().contains("BALP"));
    }
    (siem, events[0].clone())
}

/// Filters: action, date, agent; unknown parameters are refused. The
/// failed read names no resource. One record by id, and paging with a
/// tamper-proof cursor.
async fn filters_records_and_cursors(s: &TestServer, siem: &str, one: &str) {
    use reqwest::Method as M;
    let (_, d) = send(s, siem, M::GET, "/AuditEvent?action=D", None).await;
    assert_eq!(d["entry"].as_array().unwrap().len(), 1);
    let (_, d) = send(
        s,
        siem,
        M::GET,
        "/AuditEvent?date=ge2000-01-01&date=lt2000-01-02",
        None,
    )
    .await;
    assert!(d["entry"].as_array().unwrap().is_empty());
    let (st, _) = send(s, siem, M::GET, "/AuditEvent?name=x", None).await;
    assert_eq!(st, 400);
    // The failed read names no resource.
    let (_, f) = send(s, siem, M::GET, "/AuditEvent?_count=500", None).await;
    let failed: Vec<&Value> = f["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|e| e["outcome"] == "4" && e["subtype"][0]["code"] == "read")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(!failed[0].to_string().contains("does-not-exist"));
    // One record by id, and paging with a tamper-proof cursor.
    let (st, r) = send(s, siem, M::GET, &format!("/AuditEvent/{one}"), None).await;
    assert_eq!((st, r["id"].as_str()), (200, Some(one)));
    let (_, p1) = send(s, siem, M::GET, "/AuditEvent?_count=2", None).await;
    let next = p1["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.http.get(&next).bearer_auth(siem).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .get(next.replace("_count=2", "action=R&_count=2"))
        .bearer_auth(siem)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a cursor is bound to its query");
}

/// Never writable: not by the SIEM client, not even with write scopes.
async fn the_log_is_never_writable(s: &TestServer, siem: &str, one: &str, first: &Value) {
    use reqwest::Method as M;
    let writer = s.token("system/AuditEvent.cruds").await;
    let ev = first.clone();
    assert_eq!(
        send(s, &writer, M::POST, "/AuditEvent", Some(&ev)).await.0,
        405
    );
    assert_eq!(
        send(s, &writer, M::PUT, &format!("/AuditEvent/{one}"), Some(&ev))
            .await
            .0,
        405
    );
    assert_eq!(
        send(s, &writer, M::DELETE, &format!("/AuditEvent/{one}"), None)
            .await
            .0,
        405
    );
    assert_eq!(
        send(s, siem, M::DELETE, &format!("/AuditEvent/{one}"), None)
            .await
            .0,
        403
    );
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": ev, "request": {"method": "POST", "url": "AuditEvent"}}]});
    assert_ne!(send(s, &writer, M::POST, "", Some(&tx)).await.0, 200);
}

/// Who looked at this patient: for auditors, not for the clinical app.
async fn access_log_for_auditors_only(s: &TestServer, tok: &str, siem: &str, pid: &str) {
    use reqwest::Method as M;
    let (st, log) = send(
        s,
        siem,
        M::GET,
        &format!("/Patient/{pid}/$access-log"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert!(log["entry"].as_array().unwrap().len() >= 4);
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{pid}/$access-log"), None)
            .await
            .0,
        403
    );
}

/// Sealing: a signed checkpoint over everything so far, and verify.
async fn checkpoints_are_signed_and_verified(s: &TestServer, tok: &str, one: &str) {
    let cp = s.state.audit.seal_pending().await.unwrap().unwrap();
    let note = s.store.latest_checkpoint().await.unwrap().unwrap().note;
    let opened =
        phylax_audit::checkpoint::open_signed(&note, &s.state.audit.verifier_key()).unwrap();
    assert_eq!(opened, cp);
    let rep = s
        .state
        .audit
        .verify(std::slice::from_ref(&note), Some(one))
        .await
        .unwrap();
    assert_eq!(rep.sealed, cp.size);
    assert!(rep.inclusion.is_some());
    // More traffic, another checkpoint; the earlier one is a prefix.
    some_traffic(s, tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    let rep = s.state.audit.verify(&[note], None).await.unwrap();
    assert_eq!((rep.external, rep.checkpoints), (1, 2));
}
