//! `Patient/{id}/$erase`: only a privacy officer, with the scope, a recent
//! second factor and a reason; never a backend client or another role,
//! however wide their access; a legal hold and the retention period
//! still apply; afterwards the data is gone and the erasure finishes its
//! rotations in the background.

use super::*;

on_both!(erasure_through_the_api);
async fn erasure_through_the_api(s: &TestServer) {
    let feed = loader(s);
    put(s, &feed, patient("pe", json!({}))).await;
    put(s, &feed, obs("oe", "pe", None)).await;
    put(s, &feed, patient("pk", json!({}))).await;
    let ask = |override_retention: bool| {
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "reason", "valueString": "GDPR Art. 17 request 2026-113"},
            {"name": "overrideRetention", "valueBoolean": override_retention}]})
    };
    let erase = |tok: String, body: Value| async move {
        send(s, &tok, M::POST, "/Patient/pe/$erase", Some(&body)).await
    };
    // Insiders with wide access who may not: a backend client with every
    // system scope, a clinician and an administrator with every user
    // scope and a fresh second factor.
    assert_eq!(erase(feed.clone(), ask(true)).await.0, 403);
    for (name, role) in [("dr.e", "clinician"), ("adm.e", "admin")] {
        let tok = user(s, name, role, None, None, "user/*.cruds", Some(30)).await;
        let (st, b) = erase(tok, ask(true)).await;
        assert_eq!(st, 403, "{role}: {b}");
        assert!(b.to_string().contains("role does not allow"), "{b}");
    }
    // The privacy officer needs the scope, a recent factor and a reason.
    let narrow = user(
        s,
        "po",
        "privacy-officer",
        None,
        None,
        "user/Patient.r",
        Some(30),
    )
    .await;
    assert_eq!(erase(narrow, ask(true)).await.0, 403);
    let id = s.state.accounts.find("po").await.unwrap().unwrap().rec.id;
    let stale = token_for(
        s,
        &id,
        "privacy-officer",
        None,
        "user/Patient.d",
        Some(3600),
    );
    let (st, b) = erase(stale, ask(true)).await;
    assert_eq!(st, 400, "{b}");
    assert!(b.to_string().contains("recent second factor"));
    let po = token_for(s, &id, "privacy-officer", None, "user/Patient.d", Some(30));
    let (st, _) = erase(
        po.clone(),
        json!({"resourceType": "Parameters", "parameter": []}),
    )
    .await;
    assert_eq!(st, 400, "a reason is required");
    // Control characters (terminal escapes, forged lines) are refused.
    let (st, _) = erase(
        po.clone(),
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "reason", "valueString": "ok\u{1b}[2J\nREVIEW CLOSED"},
            {"name": "overrideRetention", "valueBoolean": true}]}),
    )
    .await;
    assert_eq!(st, 400, "control characters");
    // The officer reads nothing.
    assert_eq!(get(s, &po, "/Patient/pe").await, 403);
    // A legal hold (the operator's) blocks it; so does the retention
    // period, unless overridden.
    let op = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let admin = phylax_server::keys::KeyAdmin::of(&op, std::time::Duration::ZERO);
    admin
        .set_legal_hold("pe", true, "litigation")
        .await
        .unwrap();
    let (st, b) = erase(po.clone(), ask(true)).await;
    assert_eq!(st, 422, "{b}");
    assert!(b.to_string().contains("legal hold"), "{b}");
    admin.set_legal_hold("pe", false, "settled").await.unwrap();
    let (st, b) = erase(po.clone(), ask(false)).await;
    assert_eq!(st, 422, "{b}");
    assert!(b.to_string().contains("retention"), "{b}");
    assert_eq!(
        get(s, &feed, "/Patient/pe").await,
        200,
        "nothing erased yet"
    );

    let (st, b) = erase(po.clone(), ask(true)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["parameter"][0]["valueInteger"], 2, "{b}");
    for p in ["/Patient/pe", "/Observation/oe"] {
        let st = get(s, &feed, p).await;
        assert!(st == 404 || st == 410, "{p}: {st}");
    }
    assert_eq!(get(s, &feed, "/Patient/pk").await, 200);
    // The rotations finish in the background: the erasure stops being
    // pending, and the old KEK generation is gone.
    let mut waited = 0;
    while !phylax_server::keys::erase::pending_erasures(&s.store, s.state.keys.kek())
        .await
        .unwrap()
        .is_empty()
    {
        waited += 1;
        assert!(waited < 60, "the erasure's rotations did not finish");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(s
        .store
        .get_wrapped_key("mac:blind-index")
        .await
        .unwrap()
        .is_none());
    assert!(!s
        .state
        .keys
        .kek()
        .generations()
        .iter()
        .any(|(n, _)| *n == 1));
    // Recorded: the request as the officer's, the erasure's steps with
    // the same request id.
    let log = audit_of(s, "pe").await.to_string();
    assert!(log.contains(&id), "the officer is named");
    assert!(log.contains("erasure done"), "{log}");
    assert!(!log.contains("Sharedname"));
    // Again: nothing left.
    assert_eq!(erase(po, ask(true)).await.0, 404);
}
