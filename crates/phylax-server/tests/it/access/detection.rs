//! Detection rules that need access data; consent denials and over-reach refused and recorded.

use super::*;

on_both!(detection_rules_that_need_access_data);
async fn detection_rules_that_need_access_data(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    // Dr A shares a family name with her patients (Sharedname).
    put(
        s,
        &l,
        json!({"resourceType": "Practitioner", "id": "pr-a", "name": [{"family": "SHAREDNAME"}]}),
    )
    .await;
    put(s, &l, patient("pa-vip", json!({"generalPractitioner": [{"reference": "Practitioner/pr-b"}],
        "meta": {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-PatientImportance", "code": "VIP"}]}})))
    .await;
    s.state.refresh_vip().await.unwrap();
    let a = clinician(s, "dr.a", "pr-a").await;
    let b = clinician(s, "dr.b", "pr-b").await;
    assert_eq!(alerts(s, "vip-access").await, 0);
    // A flagged record: Dr B cares for the VIP and reads the record; the
    // alert says so (once per user and patient within the window).
    assert_eq!(get(s, &b, "/Patient/pa-vip").await, 200);
    assert_eq!(get(s, &b, "/Patient/pa-vip").await, 200);
    assert_eq!(wait_alerts(s, "vip-access", 1).await, 1);
    // Probing: Dr A tries three patients she does not care for.
    for p in ["pa-org", "pa-other", "pa-vip"] {
        assert_eq!(get(s, &a, &format!("/Patient/{p}")).await, 404);
    }
    assert_eq!(wait_alerts(s, "outside-care", 1).await, 1);
    // Dr B refused twice raises nothing.
    assert_eq!(alerts(s, "own-family-name").await, 0);
    // Her own family name: a search that returns a namesake.
    assert_eq!(
        search(s, &a, "/Patient?_id=pa-gp").await,
        vec!["Patient/pa-gp"]
    );
    assert_eq!(wait_alerts(s, "own-family-name", 1).await, 1);
    // Dr B has no family name on file: nothing.
    assert_eq!(get(s, &b, "/Patient/pa-org").await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(alerts(s, "own-family-name").await, 1);
    assert_eq!(alerts(s, "outside-care").await, 1);
}

/// The newest record of a refusal while establishing a caller's access
/// (interaction `access`), opened.
async fn last_access_refusal(s: &TestServer) -> Value {
    s.state.audit.flush().await.unwrap();
    let rows = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some("access".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    s.state.audit.open_row(&rows[0]).unwrap()
}

on_both!(too_many_consent_denials_are_refused_and_recorded);
/// A caller denied by more patients' consents than a query can carry
/// (`access::MAX_DENIED`) is refused with a reason, recorded, rather than
/// served without the denials or with a query the database cannot take.
async fn too_many_consent_denials_are_refused_and_recorded(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let fd = user(s, "desk", "front-desk", None, None, "user/*.rs", None).await;
    assert_eq!(get(s, &fd, "/Patient/pa-gp").await, 200);
    // One more patient than the limit denies every requester (one
    // transaction: the consent index is reread once, not per consent).
    let n = phylax_server::access::reach::MAX_DENIED + 1;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({"resource": consent(&format!("cd-{i}"), &format!("pd-{i}"), json!({"type": "deny"})),
                "request": {"method": "PUT", "url": format!("Consent/cd-{i}")}})
        })
        .collect();
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let (st, b) = send(s, &l, M::POST, "", Some(&tx)).await;
    assert_eq!(st, 200, "{b}");
    // Applied within the consent poller's second (a transaction is not a
    // Consent write of its own type).
    let mut refused = None;
    for _ in 0..50 {
        let (st, b) = send(s, &fd, M::GET, "/Patient/pa-gp", None).await;
        if st == 403 {
            refused = Some(b);
            break;
        }
        assert_eq!(st, 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let b = refused.expect("refused once the consents apply");
    assert!(!b.to_string().contains("Sharedname"), "no data: {b}");
    // The reason is about the caller, not a resource: it is stated.
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("more patients' consents deny this caller"),
        "{b}"
    );
    let ev = last_access_refusal(s).await;
    assert!(
        ev["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("more patients' consents deny this caller than a query can carry"),
        "{ev}"
    );
    // A patient reaches only their own compartment: not affected.
    let pat = user(
        s,
        "pat",
        "patient",
        None,
        Some("pa-gp"),
        "patient/*.rs",
        None,
    )
    .await;
    let (st, b) = send(s, &pat, M::GET, "/Patient/pa-gp", None).await;
    assert_eq!(st, 200, "{b}");
}

/// A clinician whose care relationships exceed `access.max_reach` is
/// refused with a reason, and the refusal is recorded.
async fn over_max_reach_is_refused_and_recorded(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    let (st, b) = send(s, &a, M::GET, "/Patient/pa-gp", None).await;
    assert_eq!(st, 403, "{b}");
    assert!(!b.to_string().contains("Sharedname"));
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("care relationships exceed access.max_reach"),
        "{b}"
    );
    let ev = last_access_refusal(s).await;
    assert!(
        ev["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("denied by reach: care relationships exceed access.max_reach"),
        "{ev}"
    );
    // Dr B (one patient) is unaffected.
    let b = clinician(s, "dr.b", "pr-b").await;
    assert_eq!(get(s, &b, "/Patient/pa-org").await, 200);
}

mod over_max_reach {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.access.max_reach = 2;
            c.access.labelled_clients = vec!["loader".into()];
            // … and the care relationships (the ADT feed).
            c.access.relationship_clients = vec!["loader".into()];
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::over_max_reach_is_refused_and_recorded(&server(Backend::Sqlite).await.unwrap())
            .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::over_max_reach_is_refused_and_recorded(&s).await;
        }
    }
}
