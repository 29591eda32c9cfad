//! The audit log end to end, on both backends: every interaction leaves a
//! BALP AuditEvent naming the patients concerned and no PHI; the log is
//! readable only by auditors and never writable; a request whose record
//! cannot be written fails with 503 and leaks nothing (and a write is then
//! not stored); checkpoints are signed; and every kind of tampering with
//! the stored log is caught by `verify`.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{TestServer, ALL, FJ};
use serde_json::{json, Value};

const FAMILY: &str = "Quixotequeue";

async fn send(
    s: &TestServer,
    tok: &str,
    m: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = s.http.request(m, s.url(path)).bearer_auth(tok);
    if let Some(b) = body {
        r = r.header("content-type", FJ).body(b.to_string());
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A patient with an Observation, read and searched; returns (patient id,
/// observation id).
async fn some_traffic(s: &TestServer, tok: &str) -> (String, String) {
    use reqwest::Method as M;
    let (st, p) = send(
        s,
        tok,
        M::POST,
        "/Patient",
        Some(&json!({
        "resourceType": "Patient", "name": [{"family": FAMILY, "given": ["Ada"]}],
        "birthDate": "1961-07-04"})),
    )
    .await;
    assert_eq!(st, 201);
    let pid = p["id"].as_str().unwrap().to_owned();
    let (st, o) = send(
        s,
        tok,
        M::POST,
        "/Observation",
        Some(&json!({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{pid}")}})),
    )
    .await;
    assert_eq!(st, 201);
    let oid = o["id"].as_str().unwrap().to_owned();
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{pid}"), None)
            .await
            .0,
        200
    );
    let (st, b) = send(
        s,
        tok,
        M::GET,
        &format!("/Observation?subject=Patient/{pid}&code=8867-4"),
        None,
    )
    .await;
    assert_eq!((st, b["entry"].as_array().unwrap().len()), (200, 1));
    let (st, _) = send(s, tok, M::GET, &format!("/Patient?family={FAMILY}"), None).await;
    assert_eq!(st, 200);
    (pid, oid)
}

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
        phylax_audit::checkpoint::open_signed(&note, s.state.audit.verifier_key()).unwrap();
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

/// The SIEM export: JSON lines, each the exact leaf a checkpoint signs,
/// resumed from a saved position (no gaps, no repeats), rotated by size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_verifiable_json_lines() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.audit.export_file = Some("siem/audit.jsonl".into());
    })
    .await
    .unwrap();
    std::fs::create_dir_all(s.data_dir.join("siem")).unwrap();
    let tok = s.token(ALL).await;
    some_traffic(&s, &tok).await;
    let cp = s.state.audit.seal_pending().await.unwrap().unwrap();
    // The node's own exporter picks the sealed records up.
    let file = s.data_dir.join("siem/audit.jsonl");
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() as u64 >= cp.size {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(lines.len() as u64, cp.size);
    // Each line is the leaf: hashing the lines rebuilds the signed root.
    let leaves: Vec<_> = lines
        .iter()
        .map(|l| phylax_audit::merkle::leaf_hash(l.as_bytes()))
        .collect();
    assert_eq!(phylax_audit::merkle::root(&leaves), cp.root);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["resourceType"], "AuditEvent");
    assert!(!lines.iter().any(|l| l.contains(FAMILY)));

    // A separate export with a tiny size limit: rotation, and a second
    // pass writes only what is new.
    let cfg = phylax_server::audit::export::ExportConfig {
        file: s.dir.path().join("small.jsonl"),
        max_bytes: 4096,
        keep: 2,
    };
    let n = s.state.audit.export_pass(&cfg).await.unwrap();
    assert_eq!(n, cp.size);
    assert_eq!(
        s.state.audit.export_pass(&cfg).await.unwrap(),
        0,
        "no repeats"
    );
    some_traffic(&s, &tok).await;
    let cp2 = s.state.audit.seal_pending().await.unwrap().unwrap();
    let n2 = s.state.audit.export_pass(&cfg).await.unwrap();
    assert_eq!(n + n2, cp2.size, "no gaps");
    let rotated: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("small.jsonl.") && !n.ends_with(".pos")
        })
        .collect();
    assert!(
        !rotated.is_empty() && rotated.len() <= 2,
        "{}",
        rotated.len()
    );
}

/// `/metrics`: off unless a token hash is configured; then only for that
/// token; counters by interaction and status, audit and key gauges, and
/// no patient or user ids anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_protected_and_free_of_ids() {
    let token = "scrape-token-for-tests-only-0123456789";
    let hash = phylax_audit::merkle::sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.metrics.token_sha256 = Some(hash);
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    let (pid, oid) = some_traffic(&s, &tok).await;
    // A refused token request counts as an authentication failure.
    let (id, _) = s.register(ALL).await;
    let other = phylax_auth::client_key::generate().unwrap();
    let (st, _) = s
        .token_request(&s.assertion(&id, other.private_pem.expose()), ALL)
        .await;
    assert_eq!(st, 401);
    s.state.audit.seal_pending().await.unwrap();
    let url = format!("{}/metrics", s.base);
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.http.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let body = r.text().await.unwrap();
    for want in [
        "phylax_requests_total{interaction=\"read\",status=\"200\"} 1",
        "phylax_requests_total{interaction=\"create\",status=\"201\"} 2",
        "phylax_request_duration_seconds_bucket{interaction=\"search-type\",le=\"+Inf\"} 2",
        "phylax_auth_failures_total{kind=\"token\"} 1",
        "phylax_audit_records{state=\"sealed\"}",
        "phylax_audit_checkpoint_age_seconds",
        "phylax_audit_journal_syncs_total",
        "phylax_audit_journal_records_total",
        "phylax_key_age_seconds{purpose=\"checkpoint\"}",
        "phylax_key_age_seconds{purpose=\"id_token_signing\"}",
    ] {
        assert!(body.contains(want), "{want} missing:\n{body}");
    }
    // The record counts come from the tree size and the waiting queue,
    // not a count of the log; they agree with one.
    let gauge = |state: &str| -> u64 {
        let prefix = format!("phylax_audit_records{{state=\"{state}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{body}"))
    };
    let (all, sealed) = (gauge("all"), gauge("sealed"));
    let (counted, tree) = s.store.audit_counts().await.unwrap();
    assert!(sealed > 0 && sealed <= all, "{sealed} sealed of {all}");
    assert!(sealed <= tree, "{sealed} sealed, the tree has {tree}");
    assert!(all <= counted, "{all} records shown, {counted} stored");
    assert!(!body.contains(&pid) && !body.contains(&oid) && !body.contains(FAMILY));
    // Without a configured token the endpoint does not exist.
    let plain = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let r = plain
        .http
        .get(format!("{}/metrics", plain.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A scripted scraping run raises an alert: recorded as an AuditEvent and
/// delivered to a webhook receiver over HTTPS with an HMAC signature, and
/// retried from the spool after the receiver first refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_signed_webhook_and_survive_a_refusal() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    // The receiver: HTTPS with its own CA; refuses the first delivery.
    let rdir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = receiver_tls(rdir.path());
    let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let got2 = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap, body: axum::body::Bytes| {
            let got = got2.clone();
            async move {
                let mut g = got.lock().unwrap();
                let status = if g.is_empty() { 503 } else { 200 };
                let sig = h
                    .get("x-phylax-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                g.push((status, sig, body.to_vec()));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = phylax_server::net::tls::server_config(&cert, &key).unwrap();
    tokio::spawn(phylax_server::net::tls::serve_tls(
        listener,
        tls,
        app,
        std::future::pending(),
    ));

    let secret = b"0123456789abcdef0123456789abcdef-test-secret";
    let secret_file = rdir.path().join("webhook.secret");
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.detect.scraping_patients = 3;
        c.detect.webhook_url = Some(format!("https://127.0.0.1:{}/hook", addr.port()));
        c.detect.webhook_ca_file = Some(ca.clone());
        c.detect.webhook_secret_file = Some(secret_file.clone());
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    use reqwest::Method as M;
    for i in 0..3 {
        let (st, p) = send(
            &s,
            &tok,
            M::POST,
            "/Patient",
            Some(&json!({"resourceType": "Patient", "gender": "other", "id": format!("x{i}")})),
        )
        .await;
        assert_eq!(st, 201);
        let id = p["id"].as_str().unwrap().to_owned();
        assert_eq!(
            send(&s, &tok, M::GET, &format!("/Patient/{id}"), None)
                .await
                .0,
            200
        );
    }
    // Delivered after one refusal and a retry.
    let mut ok = None;
    for _ in 0..100 {
        if let Some(x) = got.lock().unwrap().iter().find(|x| x.0 == 200).cloned() {
            ok = Some(x);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, sig, body) = ok.expect("the alert was delivered");
    assert!(
        got.lock().unwrap()[0].0 == 503,
        "the first attempt was refused"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let want = format!(
        "sha256={}",
        hex_encode(ring::hmac::sign(&key, &body).as_ref())
    );
    assert_eq!(sig, want, "signed with the shared secret");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["rule"].as_str(), v["severity"].as_str()),
        (Some("scraping"), Some("high"))
    );
    assert_eq!(v["auditEvent"]["resourceType"], "AuditEvent");
    // Spool emptied; the alert is in the audit log.
    for _ in 0..50 {
        let left = std::fs::read_dir(s.data_dir.join("alert-spool"))
            .map(|d| d.count())
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_dir(s.data_dir.join("alert-spool"))
            .unwrap()
            .count(),
        0
    );
    let rows = records_of(&s, "alert", 10).await;
    assert_eq!(rows.len(), 1, "one alert per window");
    let ev = s.state.audit.open_row(&rows[0]).unwrap();
    assert!(ev["outcomeDesc"]
        .as_str()
        .unwrap()
        .starts_with("scraping [high]"));
}

/// What the test receiver saw: (status it answered, signature, body).
type Delivery = (u16, String, Vec<u8>);

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Syslog over TLS: records produced while the collector is down arrive
/// once it is up (the database is the spool), as RFC 5424 messages in
/// RFC 5425 octet-counted frames, each carrying the exact leaf JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_tls_catches_up_after_an_outage() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    let rdir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = receiver_tls(rdir.path());
    // A port with nothing listening yet: the collector is down.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.audit.syslog_tls = Some(format!("localhost:{port}"));
        c.audit.syslog_ca_file = Some(ca.clone());
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    some_traffic(&s, &tok).await;
    let cp = s.state.audit.seal_pending().await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // The collector comes up.
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        phylax_server::net::tls::server_config(&cert, &key).unwrap(),
    );
    let got2 = got.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = Vec::new();
            let _ = tls.read_to_end(&mut buf).await;
            got2.lock().unwrap().extend(buf);
        }
    });
    let mut frames: Vec<String> = Vec::new();
    for _ in 0..100 {
        frames.clear();
        let data = got.lock().unwrap().clone();
        let mut rest = &data[..];
        while let Some(sp) = rest.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
            let msg = &rest[sp + 1..sp + 1 + len];
            frames.push(String::from_utf8(msg.to_vec()).unwrap());
            rest = &rest[sp + 1 + len..];
        }
        if frames.len() as u64 >= cp.size {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        frames.len() as u64,
        cp.size,
        "every sealed record arrived once"
    );
    let leaves: Vec<_> = frames
        .iter()
        .map(|f| {
            assert!(f.starts_with("<110>1 20"), "{f}");
            let json = &f[f.find("phylax - audit - ").unwrap() + "phylax - audit - ".len()..];
            phylax_audit::merkle::leaf_hash(json.as_bytes())
        })
        .collect();
    assert_eq!(phylax_audit::merkle::root(&leaves), cp.root);
}

/// A node starting with a configuration the instance has not run with
/// records it once; the same configuration on another node does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_are_recorded() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let count = || async { records_of(&s, "config", 10).await.len() };
    assert_eq!(count().await, 1);
    let (_, stop) = s.second_node().await;
    let _ = stop.send(());
    assert_eq!(count().await, 1, "same configuration, no new record");
    let mut cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    cfg.http.default_page_size = 20;
    cfg.save(&s.data_dir).unwrap();
    let (_, stop) = s.second_node().await;
    let _ = stop.send(());
    assert_eq!(count().await, 2, "a changed configuration is recorded");
    let rows = records_of(&s, "config", 1).await;
    let ev = s.state.audit.open_row(&rows[0]).unwrap();
    assert!(ev["outcomeDesc"].as_str().unwrap().contains("sha256"));
}

/// Writes are shown to the detector too (their records commit with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_feed_the_detector() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.detect.scraping_patients = 2;
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    for _ in 0..2 {
        let (st, _) = send(
            &s,
            &tok,
            reqwest::Method::POST,
            "/Patient",
            Some(&json!({"resourceType": "Patient", "gender": "other"})),
        )
        .await;
        assert_eq!(st, 201);
    }
    let mut n = 0;
    for _ in 0..50 {
        n = records_of(&s, "alert", 10).await.len();
        if n > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1, "two creates for two patients crossed the threshold");
}

/// A receiver's TLS files (certificate, 0600 key, CA) from a fresh local CA.
fn receiver_tls(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let g = phylax_server::net::tls::generate(&[]).unwrap();
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &g.server_cert_pem).unwrap();
    phylax_server::net::tls::write_private(&key, g.server_key_pem.expose()).unwrap();
    std::fs::write(&ca, &g.ca_cert_pem).unwrap();
    (cert, key, ca)
}

/// The newest `limit` audit records of one subtype.
async fn records_of(s: &TestServer, subtype: &str, limit: u32) -> Vec<phylax_store::AuditRow> {
    s.state.audit.flush().await.unwrap();
    s.store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some(subtype.into()),
            limit,
            ..Default::default()
        })
        .await
        .unwrap()
}

fn facts(i: usize) -> phylax_audit::event::AuditFacts {
    use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome};
    AuditFacts {
        id: phylax_server::audit::log::new_event_id(),
        recorded_ms: chrono::Utc::now().timestamp_millis(),
        kind: EventKind::Rest("read"),
        action: Action::Read,
        outcome: Outcome::Success,
        outcome_desc: None,
        user: None,
        client: Some(format!("crash-test-{i}")),
        ip: None,
        token_id: None,
        request_id: String::new(),
        purpose: None,
        patients: vec![format!("p{i}")],
        resources: Vec::new(),
        query_params: Vec::new(),
        observer: "test".into(),
    }
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
