//! Tampering with the stored log is caught: verify, the sealing edge, damaged records, forged rows.

use super::*;

/// Remove the append-only guards, as someone with database access could.
async fn drop_guards(s: &TestServer) {
    match s.backend {
        common::Backend::Sqlite => {
            s.sql(
                "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; \
                 DROP TRIGGER audit_leaf_no_update; DROP TRIGGER audit_leaf_no_delete;",
            )
            .await
        }
        common::Backend::Postgres => {
            s.sql(
                "ALTER TABLE audit_log DISABLE TRIGGER audit_append_only; \
                 ALTER TABLE audit_leaf DISABLE TRIGGER audit_leaf_append_only",
            )
            .await
        }
    }
}

both!(tampering_is_detected);
async fn tampering_is_detected(s: &TestServer) {
    let tok = s.token(ALL).await;
    some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    let first = s.store.latest_checkpoint().await.unwrap().unwrap().note;
    some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    s.state
        .audit
        .verify(std::slice::from_ref(&first), None)
        .await
        .unwrap();
    // The guards refuse edits and deletes outright.
    let c = s.store.audit_by_index(0, 1).await.unwrap();
    assert!(!c.is_empty());
    drop_guards(s).await;
    s.sql(
        "CREATE TABLE audit_copy AS SELECT * FROM audit_log WHERE 1 = 0; \
         CREATE TABLE leaf_copy AS SELECT * FROM audit_leaf WHERE 1 = 0",
    )
    .await;
    let n = s.store.audit_counts().await.unwrap().1 as i64;
    // The record at tree position k.
    let at = |k: i64| format!("(SELECT audit_id FROM audit_leaf WHERE leaf_index = {k})");
    let cases: Vec<(&str, String)> = vec![
        ("edited column", format!("UPDATE audit_log SET agent = 'user:someone-else' WHERE id = {}", at(1))),
        ("edited body", format!("UPDATE audit_log SET sealed = leaf_hash WHERE id = {}", at(2))),
        ("reordered", "UPDATE audit_leaf SET leaf_index = -1 WHERE leaf_index = 0; UPDATE audit_leaf SET leaf_index = 0 WHERE leaf_index = 1; UPDATE audit_leaf SET leaf_index = 1 WHERE leaf_index = -1".into()),
        ("record deleted", format!("DELETE FROM audit_log WHERE id = {}", at(3))),
        ("record and position deleted", format!("DELETE FROM audit_log WHERE id = {}; DELETE FROM audit_leaf WHERE leaf_index = 3", at(3))),
        ("position pointed elsewhere", "UPDATE audit_leaf SET audit_id = audit_id + 1000000 WHERE leaf_index = 4".into()),
        ("inserted", format!("INSERT INTO audit_log (event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) SELECT 'forged', recorded, agent, action, subtype, outcome, leaf_hash, sealed FROM audit_log WHERE id = {}; INSERT INTO audit_leaf (leaf_index, audit_id) SELECT {n}, id FROM audit_log WHERE event_id = 'forged'", at(0))),
        ("truncated", format!("DELETE FROM audit_log WHERE id IN (SELECT audit_id FROM audit_leaf WHERE leaf_index >= {m}); DELETE FROM audit_leaf WHERE leaf_index >= {m}", m = n - 2)),
    ];
    for (what, sql) in cases {
        // Each case on a pristine copy of the log: save, tamper, check,
        // restore.
        s.sql(
            "DELETE FROM audit_copy; INSERT INTO audit_copy SELECT * FROM audit_log; \
             DELETE FROM leaf_copy; INSERT INTO leaf_copy SELECT * FROM audit_leaf",
        )
        .await;
        s.sql(&sql).await;
        let plain = s.state.audit.verify(&[], None).await;
        let outside = s
            .state
            .audit
            .verify(std::slice::from_ref(&first), None)
            .await;
        s.sql(
            "DELETE FROM audit_log; INSERT INTO audit_log SELECT * FROM audit_copy; \
             DELETE FROM audit_leaf; INSERT INTO audit_leaf SELECT * FROM leaf_copy",
        )
        .await;
        assert!(
            plain.is_err() && outside.is_err(),
            "{what} went unnoticed: {plain:?}"
        );
        s.state
            .audit
            .verify(std::slice::from_ref(&first), None)
            .await
            .unwrap();
    }
    // A forged outside checkpoint (signed by another key) is refused.
    let forged = first.replacen('\u{2014}', "-", 1);
    assert!(s.state.audit.verify(&[forged], None).await.is_err());
}

// A starting node goes on sealing from the newest checkpoint's stored
// tree edge instead of rereading the tree; an edge that is missing (a
// checkpoint from before it was kept), cut short or altered is not
// trusted: the node rereads the tree once, and what it seals still
// verifies.
mod a_starting_node_seals_from_the_stored_edge {
    use super::common::{Backend, TestServer};
    // The background sealer waits the longest interval: every seal here
    // is the test's own, so the counts it checks are exact.
    async fn start(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| c.audit.checkpoint_secs = 300).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let s = start(Backend::Sqlite).await.unwrap();
        super::a_starting_node_seals_from_the_stored_edge(&s).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = start(Backend::Postgres).await {
            super::a_starting_node_seals_from_the_stored_edge(&s).await;
        }
    }
}
async fn a_starting_node_seals_from_the_stored_edge(s: &TestServer) {
    use phylax_server::instance::Instance;
    let tok = s.token(ALL).await;
    some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    let size = |s: &TestServer| {
        let store = s.store.clone();
        async move { store.audit_tree_size().await.unwrap() }
    };
    let latest = s.store.latest_checkpoint().await.unwrap().unwrap();
    assert_eq!(latest.size, size(s).await);
    assert_eq!(
        latest.frontier.len(),
        32 * latest.size.count_ones() as usize
    );
    let start = || async {
        Instance::open(&s.data_dir, s.db_url.as_deref())
            .await
            .unwrap()
            .audit
    };
    // A restart: nothing read back. (The running server's journal is
    // flushed into the database first: the new node has no journal.)
    some_traffic(s, &tok).await;
    s.state.audit.flush().await.unwrap();
    let node = start().await;
    node.seal_pending().await.unwrap().unwrap();
    assert_eq!(node.tree_records_read(), 0);
    s.state.audit.verify(&[], None).await.unwrap();
    // The first node catches up with what the second sealed by reading
    // just that.
    let before = s.state.audit.tree_records_read();
    let grown = size(s).await - latest.size;
    some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    assert_eq!(s.state.audit.tree_records_read() - before, grown);
    // Untrusted edges: each makes a starting node read the whole tree.
    let unguard = match s.backend {
        common::Backend::Sqlite => "DROP TRIGGER checkpoints_no_update",
        common::Backend::Postgres => {
            "ALTER TABLE audit_checkpoints DISABLE TRIGGER checkpoints_append_only"
        }
    };
    s.sql(unguard).await;
    let (flip, cut) = match s.backend {
        common::Backend::Sqlite => (
            "UPDATE audit_checkpoints SET frontier = CAST(CASE WHEN substr(frontier, 1, 1) = x'ff' THEN x'00' ELSE x'ff' END || substr(frontier, 2) AS BLOB)",
            "UPDATE audit_checkpoints SET frontier = substr(frontier, 33)",
        ),
        common::Backend::Postgres => (
            "UPDATE audit_checkpoints SET frontier = set_byte(frontier, 0, (get_byte(frontier, 0) + 1) % 256)",
            "UPDATE audit_checkpoints SET frontier = substring(frontier from 33)",
        ),
    };
    for (what, sql) in [
        ("altered", flip),
        ("cut short", cut),
        ("missing", "UPDATE audit_checkpoints SET frontier = NULL"),
    ] {
        some_traffic(s, &tok).await;
        s.state.audit.flush().await.unwrap();
        s.sql(sql).await;
        let tree = size(s).await;
        let node = start().await;
        node.seal_pending().await.unwrap().unwrap();
        assert_eq!(node.tree_records_read(), tree, "{what}");
        // What it sealed is right, and leaves a trusted edge behind.
        s.state.audit.verify(&[], None).await.unwrap();
        let l = s.store.latest_checkpoint().await.unwrap().unwrap();
        let again = start().await;
        some_traffic(s, &tok).await;
        s.state.audit.flush().await.unwrap();
        again.seal_pending().await.unwrap().unwrap();
        assert_eq!(again.tree_records_read(), 0, "{what}: edge at {}", l.size);
    }
}

// A record damaged in the database (its sealed body replaced) is left out
// of an AuditEvent search with an OperationOutcome saying so and an
// `audit-tamper` alert: one bad row must not hide the rest of the log
// behind a 500.
both!(a_damaged_record_does_not_break_audit_search);
async fn a_damaged_record_does_not_break_audit_search(s: &TestServer) {
    let tok = s.token(ALL).await;
    some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    drop_guards(s).await;
    s.sql("UPDATE audit_log SET sealed = leaf_hash WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 1)")
        .await;
    let siem = s.token("system/AuditEvent.rs").await;
    let (st, b) = send(
        s,
        &siem,
        reqwest::Method::GET,
        "/AuditEvent?_count=500",
        None,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let entries = b["entry"].as_array().unwrap();
    let outcome = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("an OperationOutcome entry");
    assert!(outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("integrity"));
    assert!(
        entries
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .count()
            > 3
    );
    // The alert is in the log (sealed records are read back from it).
    let raised = alert_raised(s, "audit-tamper").await;
    assert!(raised, "audit-tamper alert");
}

// Someone with the database inserts a record (a copy of a real one under a
// new id) and queues it for sealing: the sealer refuses it (it does not
// open under its id), keeps it out of the tree, raises `audit-tamper`, and
// goes on sealing real records; `audit verify` names the stray row but the
// tree itself stays verifiable. Deleting a patient's per-patient entries
// (to empty their access log) is found by verify too, and verify reports
// every problem, not only the first.
both!(forged_pending_rows_and_deleted_patient_entries_are_found);
async fn forged_pending_rows_and_deleted_patient_entries_are_found(s: &TestServer) {
    let tok = s.token(ALL).await;
    let (pid, _) = some_traffic(s, &tok).await;
    s.state.audit.seal_pending().await.unwrap().unwrap();
    s.state.audit.verify(&[], None).await.unwrap();
    let size_before = s.store.audit_tree_size().await.unwrap();
    s.sql(
        "INSERT INTO audit_log (event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) \
         SELECT 'forged-1', recorded, agent, action, subtype, outcome, leaf_hash, sealed FROM audit_log \
         WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 0); \
         INSERT INTO audit_pending (audit_id) SELECT id FROM audit_log WHERE event_id = 'forged-1'; \
         INSERT INTO audit_pending (audit_id) VALUES (999999999); \
         INSERT INTO audit_pending (audit_id) SELECT audit_id FROM audit_leaf WHERE leaf_index = 0",
    )
    .await;
    // (Queue entries naming no record, or a sealed one, would stall a
    // sealer that sealed a range: they are cleaned away, with the alert.)
    // Real traffic after it still gets sealed.
    some_traffic(s, &tok).await;
    s.state.audit.flush().await.unwrap();
    let cp = s
        .state
        .audit
        .seal_pending()
        .await
        .unwrap()
        .expect("real records sealed");
    assert!(cp.size > size_before);
    // Not in the tree, and off the queue (other records, the alert's own
    // among them, may be pending by now).
    let forged = s.store.audit_get("forged-1").await.unwrap().unwrap();
    assert_eq!(forged.leaf_index, None, "the forged row is not in the tree");
    let pending = s.store.audit_unsealed(i64::MIN, 10_000).await.unwrap();
    assert!(pending.iter().all(|r| r.event_id != "forged-1"));
    let e = s
        .state
        .audit
        .verify(&[], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither in the tree"), "{e}");
    assert!(
        !e.contains("no longer match"),
        "the tree itself verifies: {e}"
    );
    // AuditEvent searches keep working.
    let siem = s.token("system/AuditEvent.rs").await;
    let (st, _) = send(
        s,
        &siem,
        reqwest::Method::GET,
        "/AuditEvent?_count=500",
        None,
    )
    .await;
    assert_eq!(st, 200);
    // The alert.
    let raised = alert_raised(s, "audit-tamper").await;
    assert!(raised, "audit-tamper alert for the forged row");
    // Emptying a patient's entries: found, beside the stray row.
    let key = phylax_store::query::patient_key(&s.state.audit.patient_hash(&pid));
    let del = match s.backend {
        common::Backend::Sqlite => {
            format!(
                "DROP TRIGGER IF EXISTS audit_patient_no_delete; DELETE FROM audit_patient WHERE patient = x'{}'",
                hex::encode(key)
            )
        }
        common::Backend::Postgres => format!(
            "ALTER TABLE audit_patient DISABLE TRIGGER USER; DELETE FROM audit_patient WHERE patient = {}",
            i64::from_be_bytes(key)
        ),
    };
    s.try_sql(&del).await.unwrap();
    let e = s
        .state
        .audit
        .verify(&[], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("per-patient index"), "{e}");
    assert!(e.contains("neither in the tree"), "every problem: {e}");
    assert!(e.starts_with("2 problem(s)"), "{e}");
}

/// Whether an alert of `rule` reached the audit log within five seconds
/// (alerts are recorded in the background).
async fn alert_raised(s: &TestServer, rule: &str) -> bool {
    let prefix = format!("{rule} [");
    for _ in 0..50 {
        s.state.audit.flush().await.unwrap();
        let rows = s
            .store
            .audit_search(&phylax_store::AuditQuery {
                subtype: Some("alert".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        if rows
            .iter()
            .filter_map(|r| s.state.audit.open_row(r).ok())
            .any(|e| {
                e["outcomeDesc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&prefix))
            })
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}
