//! The JSON lines export and the metrics endpoint.

use super::*;

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
