//! Break-the-glass: the grant, its record, alert and review, its expiry.

use super::*;

on_both!(break_the_glass);
async fn break_the_glass(s: &TestServer) {
    load(s).await;
    glass_breaks_with_fresh_factor_reason_and_role(s).await;
    let open = grant_is_recorded_alerted_and_queued(s).await;
    review_is_closed_by_an_auditor_once(s, &open).await;
    expired_grant_gives_nothing(s).await;
}

/// Breaking the glass needs a recent second factor, a reason, a listed
/// purpose and a role that may; then it opens this patient only.
async fn glass_breaks_with_fresh_factor_reason_and_role(s: &TestServer) {
    let btg = |tok: String, body: Value| async move {
        send(
            s,
            &tok,
            M::POST,
            "/Patient/pa-other/$break-the-glass",
            Some(&body),
        )
        .await
    };
    let reason = json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "unconscious in the emergency department"},
        {"name": "purpose", "valueCode": "ETREAT"}]});
    // Needs a recent second factor.
    let stale = user(
        s,
        "dr.a",
        "clinician",
        Some("pr-a"),
        None,
        "user/*.cruds",
        Some(3600),
    )
    .await;
    let (st, b) = btg(stale, reason.clone()).await;
    assert_eq!(st, 400, "{b}");
    assert!(b.to_string().contains("recent second factor"));
    let id = s.state.accounts.find("dr.a").await.unwrap().unwrap().rec.id;
    let a = token_for(s, &id, "clinician", None, "user/*.cruds", Some(30));
    // Needs a reason, and a purpose from the list.
    let (st, _) = btg(
        a.clone(),
        json!({"resourceType": "Parameters", "parameter": []}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = btg(
        a.clone(),
        json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "x"}, {"name": "purpose", "valueCode": "HMARKT"}]}),
    )
    .await;
    assert_eq!(st, 400);
    // Roles without it are refused; unknown patients are not found.
    let fd = user(
        s,
        "desk",
        "front-desk",
        None,
        None,
        "user/*.cruds",
        Some(30),
    )
    .await;
    assert_eq!(btg(fd, reason.clone()).await.0, 403);
    let (st, _) = send(
        s,
        &a,
        M::POST,
        "/Patient/nobody/$break-the-glass",
        Some(&reason),
    )
    .await;
    assert_eq!(st, 404);

    assert_eq!(get(s, &a, "/Patient/pa-other").await, 404);
    let (st, b) = btg(a.clone(), reason.clone()).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["parameter"][1]["valueInstant"].is_string());
    // Access now, labelled data included, for this patient only.
    assert_eq!(get(s, &a, "/Patient/pa-other").await, 200);
    assert_eq!(get(s, &a, "/Observation/obs-other-psy").await, 200);
    assert_eq!(
        get(s, &a, "/Observation/obs-psy").await,
        404,
        "not another patient's label"
    );
    assert_eq!(get(s, &a, "/Patient/pa-org").await, 404);
}

/// Recorded: the grant (purpose, patient), the alert, and the access
/// made under it (purpose of use BTG). The reason stays out of the log.
/// Returns the open review queue.
async fn grant_is_recorded_alerted_and_queued(
    s: &TestServer,
) -> Vec<phylax_store::BreakGlassRecord> {
    let events = |subtype: &'static str| async move {
        s.state.audit.flush().await.unwrap();
        let rows = s
            .store
            .audit_search(&phylax_store::AuditQuery {
                subtype: Some(subtype.into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        rows.iter()
            .map(|r| s.state.audit.open_row(r).unwrap())
            .collect::<Vec<Value>>()
    };
    let grants = events("break-the-glass").await;
    let ok: Vec<&Value> = grants.iter().filter(|e| e["outcome"] == "0").collect();
    assert_eq!(ok.len(), 1, "{grants:?}");
    assert!(ok[0].to_string().contains("ETREAT"));
    assert!(ok[0].to_string().contains("Patient/pa-other"));
    assert!(!grants.iter().any(|e| e.to_string().contains("unconscious")));
    let reads = events("read").await;
    assert!(
        reads.iter().any(|e| e.to_string().contains("\"BTG\"")),
        "accesses under the grant are marked"
    );
    let mut alerted = false;
    for _ in 0..40 {
        if events("alert").await.iter().any(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.starts_with("break-the-glass [high]"))
        }) {
            alerted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(alerted, "a real-time alert");
    // In the review queue, with its sealed reason for the reviewer.
    let open = s.store.break_glass_list(true, 10).await.unwrap();
    assert_eq!(open.len(), 1);
    let d = phylax_server::access::break_glass::open_details(&s.state.keys, &open[0])
        .await
        .unwrap();
    assert_eq!(d.patient, "pa-other");
    assert!(d.reason.contains("unconscious"));
    open
}

/// Closing the review: auditors only, with a note, once.
async fn review_is_closed_by_an_auditor_once(
    s: &TestServer,
    open: &[phylax_store::BreakGlassRecord],
) {
    use phylax_server::access::break_glass::{close, queue, ReviewError};
    let gid = open[0].id.clone();
    user(s, "aud", "auditor", None, None, "user/AuditEvent.rs", None).await;
    assert!(matches!(
        close(&s.state.gate, &gid, "dr.a", "fine").await,
        Err(ReviewError::NotAuditor)
    ));
    assert!(matches!(
        close(&s.state.gate, &gid, "aud", "  ").await,
        Err(ReviewError::Note)
    ));
    assert!(matches!(
        close(&s.state.gate, "no-such", "aud", "x").await,
        Err(ReviewError::NotOpen)
    ));
    close(&s.state.gate, &gid, "aud", "confirmed with the ED log")
        .await
        .unwrap();
    assert!(matches!(
        close(&s.state.gate, &gid, "aud", "again").await,
        Err(ReviewError::NotOpen)
    ));
    assert!(queue(&s.state.gate, true).await.unwrap().is_empty());
    let all = queue(&s.state.gate, false).await.unwrap();
    assert_eq!(
        all[0].review_note.as_deref(),
        Some("confirmed with the ED log")
    );
    // The database refuses to rewrite a closed review or drop a grant.
    for sql in [
        format!("UPDATE break_glass SET expires = expires + 1 WHERE id = '{gid}'"),
        format!("UPDATE break_glass SET reviewer = 'someone' WHERE id = '{gid}'"),
        format!("DELETE FROM break_glass WHERE id = '{gid}'"),
    ] {
        let e = s.try_sql(&sql).await.unwrap_err();
        assert!(e.contains("kept"), "{sql}: {e}");
    }
}

/// An expired grant gives nothing: a fresh user with only a past grant.
async fn expired_grant_gives_nothing(s: &TestServer) {
    let c = user(
        s,
        "dr.c",
        "clinician",
        Some("pr-b"),
        None,
        "user/*.rs",
        Some(30),
    )
    .await;
    let cid = s.state.accounts.find("dr.c").await.unwrap().unwrap().rec.id;
    let gid = uuid::Uuid::new_v4().to_string();
    let details = phylax_server::access::break_glass::GrantDetails {
        patient: "pa-other".into(),
        reason: "old".into(),
        purpose: "ETREAT".into(),
    };
    let sealed = phylax_server::access::break_glass::seal(&s.state.keys, &gid, "grant", &details)
        .await
        .unwrap();
    let t = chrono::Utc::now().timestamp_millis();
    s.store
        .put_break_glass(&phylax_store::BreakGlassRecord {
            id: gid,
            user_id: cid,
            started: t - 7_200_000,
            expires: t - 3_600_000,
            sealed,
            reviewed_at: None,
            reviewer: None,
            review_sealed: None,
        })
        .await
        .unwrap();
    assert_eq!(get(s, &c, "/Patient/pa-other").await, 404);
}
