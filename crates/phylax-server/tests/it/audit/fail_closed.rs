//! A request whose record cannot be written fails closed; journaled records survive a crash.

use super::*;

/// This node's journal directory (the only one under `audit-journal/`).
fn journal_dir(s: &TestServer) -> std::path::PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(s.data_dir.join("audit-journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

/// Make the audit log refuse every new record, as a full or broken disk
/// would (real refusals, not mocks): the database refuses audit rows
/// (writes commit theirs in their own transaction) and the journal's
/// directory disappears, as an unmounted or failed disk would (reads'
/// records go through the journal). Returns where the journal was.
async fn break_audit(s: &TestServer) -> std::path::PathBuf {
    s.state.audit.flush().await.unwrap();
    let dir = journal_dir(s);
    std::fs::rename(&dir, s.data_dir.join("journal-away")).unwrap();
    match s.backend {
        common::Backend::Sqlite => {
            s.sql("CREATE TRIGGER audit_broken BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'disk full'); END;").await
        }
        common::Backend::Postgres => {
            s.sql("ALTER TABLE audit_log ADD CONSTRAINT audit_broken CHECK (id < 0) NOT VALID").await
        }
    }
    dir
}

async fn mend_audit(s: &TestServer, journal: &std::path::Path) {
    std::fs::rename(s.data_dir.join("journal-away"), journal).unwrap();
    match s.backend {
        common::Backend::Sqlite => s.sql("DROP TRIGGER audit_broken").await,
        common::Backend::Postgres => {
            s.sql("ALTER TABLE audit_log DROP CONSTRAINT audit_broken")
                .await
        }
    }
}

both!(an_unwritable_audit_log_fails_closed);
async fn an_unwritable_audit_log_fails_closed(s: &TestServer) {
    use reqwest::Method as M;
    let tok = s.token(ALL).await;
    let (pid, _) = some_traffic(s, &tok).await;
    let journal = break_audit(s).await;
    // Reads and searches: 503, an OperationOutcome, nothing of the data.
    for path in [
        format!("/Patient/{pid}"),
        format!("/Patient?family={FAMILY}"),
        format!("/Patient/{pid}/$everything"),
    ] {
        let (st, v) = send(s, &tok, M::GET, &path, None).await;
        assert_eq!(st, 503, "{path}");
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert!(!v.to_string().contains(FAMILY), "{v}");
    }
    // Writes: 503 and not stored (the record shares the write's transaction).
    let (st, _) = send(
        s,
        &tok,
        M::POST,
        "/Patient",
        Some(&json!({"resourceType": "Patient", "name": [{"family": "Unrecorded"}]})),
    )
    .await;
    assert_eq!(st, 503);
    let (st, _) = send(
        s,
        &tok,
        M::PUT,
        &format!("/Patient/{pid}"),
        Some(&json!({"resourceType": "Patient", "id": pid, "active": false})),
    )
    .await;
    assert_eq!(st, 503);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Unrecorded"}]}, "request": {"method": "POST", "url": "Patient"}}]});
    assert_eq!(send(s, &tok, M::POST, "", Some(&tx)).await.0, 503);
    // No token is issued without its record either.
    let (id, key) = s.register(ALL).await;
    let (st, v) = s.token_request(&s.assertion(&id, &key), ALL).await;
    assert_ne!(st, 200);
    assert!(v.get("access_token").is_none(), "{v}");
    mend_audit(s, &journal).await;
    let (_, b) = send(s, &tok, M::GET, "/Patient?family=Unrecorded", None).await;
    assert!(
        b["entry"].as_array().unwrap().is_empty(),
        "a write without its record was stored"
    );
    let (_, p) = send(s, &tok, M::GET, &format!("/Patient/{pid}"), None).await;
    assert_eq!(
        p["meta"]["versionId"], "1",
        "the refused update was not stored"
    );
}

// A node that dies with records in its journal loses none of them: the
// next start moves them into the database, exactly once, ignoring a torn
// last batch (never acknowledged), even when a segment is replayed twice.
both!(journaled_records_survive_a_crash);
async fn journaled_records_survive_a_crash(s: &TestServer) {
    use phylax_server::audit::journal::Journal;
    let root = s.dir.path().join("crash-journal");
    let j = Journal::open(&root, s.store.clone()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let row = s.state.audit.draft(&facts(i)).unwrap();
        ids.push(row.event_id.clone());
        j.append(row).await.unwrap();
    }
    let dead = std::fs::read_dir(&root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // The crash: the writer stops (its lock goes), mid-way through a batch.
    drop(j);
    let current = dead.join("current.log");
    for _ in 0..50 {
        if std::fs::OpenOptions::new()
            .write(true)
            .open(dead.join("lock"))
            .unwrap()
            .try_lock()
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut torn =
        phylax_server::audit::journal::encode(&s.state.audit.draft(&facts(99)).unwrap(), 0);
    torn.truncate(torn.len() / 2);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&current)
        .unwrap();
    std::io::Write::write_all(&mut f, &torn).unwrap();
    drop(f);
    let saved = std::fs::read(&current).unwrap();
    let stored = |id: String| async move { s.store.audit_get(&id).await.unwrap().is_some() };
    for id in &ids {
        assert!(
            !stored(id.clone()).await,
            "not in the database before recovery"
        );
    }
    // The next start recovers.
    let j2 = Journal::open(&root, s.store.clone()).await.unwrap();
    for id in &ids {
        assert!(stored(id.clone()).await, "recovered");
    }
    assert!(!dead.exists(), "the dead node's journal is gone");
    let count = || async {
        s.store
            .audit_search(&phylax_store::AuditQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .iter()
            .filter(|r| ids.contains(&r.event_id))
            .count()
    };
    assert_eq!(count().await, 5);
    // The same segment replayed again (a crash between commit and delete):
    // still exactly once.
    let again = root.join("replayed");
    std::fs::create_dir_all(&again).unwrap();
    std::fs::write(again.join("seg-00000000000000000001-1.log"), &saved).unwrap();
    drop(j2);
    let _j3 = Journal::open(&root, s.store.clone()).await.unwrap();
    assert_eq!(count().await, 5);
    assert!(!again.exists());
    // And the log still verifies, recovered records included.
    s.state.audit.seal_pending().await.unwrap();
    s.state.audit.verify(&[], None).await.unwrap();
}
