//! The key hierarchy under operation (docs/KEYS.md): the KEK rotates while
//! reads and writes go on, with the KEK in a key file or a SoftHSM2 token,
//! on both backends; a tampered wrapped key is detected and stops a
//! rotation before anything is retired; a patient's erasure leaves a copy
//! of the database taken before it unreadable; legal holds and the
//! retention period block an erasure.

use crate::common;
use common::{Backend, TestServer, ALL, FJ};
use phylax_server::instance::Instance;
use phylax_server::keys::{KeyAdmin, KeysError};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Nodes look for key events each second.
const GRACE: Duration = Duration::from_millis(1500);

async fn put(s: &TestServer, base: &str, tok: &str, r: &Value) -> u16 {
    let url = format!(
        "{base}/{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    );
    s.http
        .put(url)
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(r.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn read(s: &TestServer, base: &str, tok: &str, path: &str) -> (u16, Value) {
    match s
        .http
        .get(format!("{base}{path}"))
        .bearer_auth(tok)
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, Value::Null),
    }
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "Testfamily"}]})
}

fn obs(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")}})
}

/// An operator's view of the instance (the CLI's), beside the server.
async fn operator(s: &TestServer) -> Instance {
    Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap()
}

/// Writes (new patients and observations) and reads (of what was written,
/// and searches) run while the KEK rotates; none fails, and afterwards a
/// node started from the rotated providers reads everything.
async fn kek_rotates_under_load(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..10 {
        assert_eq!(put(s, &s.fhir, &tok, &patient(&format!("p{p}"))).await, 201);
        assert_eq!(
            put(s, &s.fhir, &tok, &obs(&format!("o{p}"), &format!("p{p}"))).await,
            201
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let written = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for w in 0..3 {
        let (http, fhir, tok) = (s.http.clone(), s.fhir.clone(), tok.clone());
        let (stop, ok, failed, written) =
            (stop.clone(), ok.clone(), failed.clone(), written.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Each round a new patient (a new data key, wrapped under
                // whichever generation is current) and reads.
                let pid = format!("n{w}x{i}");
                let body = patient(&pid);
                let st = http
                    .put(format!("{fhir}/Patient/{pid}"))
                    .bearer_auth(&tok)
                    .header("content-type", FJ)
                    .body(body.to_string())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                let r1 = http
                    .get(format!("{fhir}/Observation/o{}", i % 10))
                    .bearer_auth(&tok)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                let r2 = http
                    .get(format!("{fhir}/Observation?subject=Patient/p{}", i % 10))
                    .bearer_auth(&tok)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                for (st, want) in [(st, 201), (r1, 200), (r2, 200)] {
                    if st == want {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed during rotation: {st}");
                    }
                }
                if st == 201 {
                    written.lock().push(pid);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let op = operator(s).await;
    let before = op.keys.kek().generations();
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_kek(&|_, _| {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(r.retired, vec![before[0].0]);
    assert!(r.rewrapped >= 10, "{r:?}");
    // Every stored key is under the new generation, and only it is held.
    let status = KeyAdmin::of(&op, GRACE).status(365).await.unwrap();
    assert_eq!(status.kek.len(), 1, "{:?}", status.kek);
    assert_eq!(status.kek[0].generation, r.to);
    let total: u64 = s
        .store
        .wrapped_key_stats()
        .await
        .unwrap()
        .iter()
        .map(|g| g.count)
        .sum();
    assert_eq!(status.kek[0].wraps, total);
    // A node started now, from the providers as they are, reads it all.
    let (node, _stop) = s.second_node().await;
    for p in 0..10 {
        let (st, _) = read(s, &node, &tok, &format!("/Observation/o{p}")).await;
        assert_eq!(st, 200);
    }
    let written: Vec<String> = written.lock().iter().take(50).cloned().collect();
    for pid in &written {
        let (st, b) = read(s, &node, &tok, &format!("/Patient/{pid}")).await;
        assert_eq!(st, 200, "{pid}: {b}");
    }
    // And so does the node that served throughout (its cached keys and,
    // after forgetting them, the re-wrapped ones).
    s.state.keys.forget_data_keys();
    let (st, _) = read(s, &s.fhir, &tok, "/Observation/o3").await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_under_load_sqlite() {
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    kek_rotates_under_load(&s).await;
    // The key file holds only the new generation.
    let text = std::fs::read_to_string(s.dir.path().join("keys/kek")).unwrap();
    let gens: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(gens.len(), 1);
    assert!(gens[0].starts_with("2:"), "generation 2 only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_under_load_postgres() {
    if let Some(s) = TestServer::start(Backend::Postgres).await {
        kek_rotates_under_load(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_under_load_hsm_sqlite() {
    if let Some(s) = TestServer::start_hsm(Backend::Sqlite).await {
        assert!(!s.dir.path().join("keys/kek").exists(), "no key file");
        kek_rotates_under_load(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_under_load_hsm_postgres() {
    if let Some(s) = TestServer::start_hsm(Backend::Postgres).await {
        kek_rotates_under_load(&s).await;
    }
}

both!(the_search_index_key_rotates_under_load);
/// Writes and searches run while the search index key rotates: no search
/// misses a resource (whether re-indexed yet or not), nothing written
/// meanwhile is lost to search, and afterwards a node started fresh (the
/// new key only) finds everything. Rotating again retires the key before.
async fn the_search_index_key_rotates_under_load(s: &TestServer) {
    let tok = s.token(ALL).await;
    let named =
        |id: &str| json!({"resourceType": "Patient", "id": id, "name": [{"family": "Rotfamily"}]});
    for p in 0..10 {
        assert_eq!(put(s, &s.fhir, &tok, &named(&format!("p{p}"))).await, 201);
        assert_eq!(
            put(s, &s.fhir, &tok, &obs(&format!("o{p}"), &format!("p{p}"))).await,
            201
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let written = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..3 {
        let (http, fhir, tok) = (s.http.clone(), s.fhir.clone(), tok.clone());
        let (stop, ok, failed, written) =
            (stop.clone(), ok.clone(), failed.clone(), written.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let pid = format!("n{w}x{i}");
                let st = http
                    .put(format!("{fhir}/Patient/{pid}"))
                    .bearer_auth(&tok)
                    .header("content-type", FJ)
                    .body(named(&pid).to_string())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if st == 201 {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                let total = |path: String| {
                    let (http, tok) = (http.clone(), tok.clone());
                    async move {
                        match http.get(path).bearer_auth(&tok).send().await {
                            Ok(r) if r.status() == 200 => r
                                .json::<Value>()
                                .await
                                .ok()
                                .and_then(|b| b["total"].as_u64()),
                            _ => None,
                        }
                    }
                };
                let by_ref = total(format!("{fhir}/Observation?subject=Patient/p{}", i % 10)).await;
                let by_name = total(format!("{fhir}/Patient?family=Rotfamily&_count=1")).await;
                for good in [st == 201, by_ref == Some(1), by_name.is_some_and(|n| n >= 10)] {
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("during the index rotation: write {st}, by reference {by_ref:?}, by name {by_name:?}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let op = operator(s).await;
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_index(&|_, _| {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed or missed"
    );
    assert!(ok.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(r.key, "mac:blind-index@2");
    assert!(r.reindexed >= 20, "{r:?}");
    // The first key is gone (the audit log has its own patient index key).
    assert_eq!(r.retired, vec!["mac:blind-index".to_owned()]);
    assert!(s
        .store
        .get_wrapped_key("mac:blind-index")
        .await
        .unwrap()
        .is_none());
    let everyone = 10 + written.load(Ordering::Relaxed);
    // The serving node and a node started now (the new key only) find
    // every patient, those written during the rotation too.
    let (node, _stop) = s.second_node().await;
    for base in [&s.fhir, &node] {
        let (st, b) = read(s, base, &tok, "/Patient?family=Rotfamily&_count=1").await;
        assert_eq!((st, b["total"].as_u64()), (200, Some(everyone)), "{b}");
        let (_, b) = read(s, base, &tok, "/Observation?subject=Patient/p3").await;
        assert_eq!(b["total"], 1, "{b}");
    }
    // The audit log still finds a patient's records by id.
    let siem = s.token("system/AuditEvent.rs").await;
    let (st, b) = read(s, &s.fhir, &siem, "/AuditEvent?patient=p3&_count=5").await;
    assert_eq!(st, 200, "{b}");
    assert!(b["entry"].as_array().is_some_and(|e| !e.is_empty()), "{b}");
    // Again: generation 3, generation 2 retired; searches still work.
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_index(&|_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (r.key.as_str(), r.retired.clone()),
        ("mac:blind-index@3", vec!["mac:blind-index@2".to_owned()])
    );
    let (_, b) = read(s, &s.fhir, &tok, "/Patient?family=Rotfamily&_count=1").await;
    assert_eq!(b["total"].as_u64(), Some(everyone), "{b}");
    // Both rotations are in the audit log.
    let (_, b) = read(s, &s.fhir, &siem, "/AuditEvent?_count=200").await;
    assert!(b
        .to_string()
        .contains("search index rebuilt under mac:blind-index@3"));
    // Twice more (the generations before are gone: @4 and @5 follow @3,
    // found from what is recorded, not by counting rows up from 1), then
    // a node started now, and an operator's view, search under @5.
    for want in ["mac:blind-index@4", "mac:blind-index@5"] {
        let r = KeyAdmin::of(&op, GRACE)
            .rotate_index(&|_, _| {})
            .await
            .unwrap();
        assert_eq!(r.key, want);
    }
    let (node, _stop2) = s.second_node().await;
    let (_, b) = read(s, &node, &tok, "/Patient?family=Rotfamily&_count=1").await;
    assert_eq!(b["total"].as_u64(), Some(everyone), "{b}");
    assert!(s
        .store
        .get_wrapped_key("mac:blind-index")
        .await
        .unwrap()
        .is_none());
    let rows: Vec<String> = s
        .store
        .list_wrapped_keys("mac:blind-index", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.scope)
        .filter(|r| r.starts_with("mac:blind-index"))
        .collect();
    assert_eq!(rows, vec!["mac:blind-index@5"]);
    // The key the index was rebuilt under, deleted: the instance does not
    // open (searches would find nothing), rather than make a new one.
    let w = s
        .store
        .get_wrapped_key("mac:blind-index@5")
        .await
        .unwrap()
        .unwrap();
    s.store
        .delete_wrapped_key("mac:blind-index@5")
        .await
        .unwrap();
    let e = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("search index key"), "{e}");
    s.store
        .put_wrapped_key_if_absent("mac:blind-index@5", &w, 0)
        .await
        .unwrap();
}

both!(the_data_keys_rotate_under_load);
/// Writes (new resources and new versions), reads and searches run while
/// every resource version is re-encrypted under a new data-key
/// generation: none fails; afterwards nothing is left under the old keys,
/// the old keys are gone, every version (old ones too) opens on the
/// serving node and on a node started now, and an erasure removes every
/// generation of the patient's key.
async fn the_data_keys_rotate_under_load(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..10 {
        assert_eq!(put(s, &s.fhir, &tok, &patient(&format!("p{p}"))).await, 201);
        let o = obs(&format!("o{p}"), &format!("p{p}"));
        assert_eq!(put(s, &s.fhir, &tok, &o).await, 201);
        assert_eq!(put(s, &s.fhir, &tok, &o).await, 200, "a second version");
    }
    let old_p0 = s
        .store
        .get_wrapped_key("data:patient:p0")
        .await
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for w in 0..3 {
        let (http, fhir, tok) = (s.http.clone(), s.fhir.clone(), tok.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let p = i % 10;
                let send = |m: reqwest::Method, url: String, body: Option<String>| {
                    let (http, tok) = (http.clone(), tok.clone());
                    async move {
                        let mut r = http.request(m, url).bearer_auth(&tok);
                        if let Some(b) = body {
                            r = r.header("content-type", FJ).body(b);
                        }
                        r.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
                    }
                };
                let new = send(
                    reqwest::Method::PUT,
                    format!("{fhir}/Patient/n{w}x{i}"),
                    Some(patient(&format!("n{w}x{i}")).to_string()),
                )
                .await;
                let update = send(
                    reqwest::Method::PUT,
                    format!("{fhir}/Observation/o{p}"),
                    Some(obs(&format!("o{p}"), &format!("p{p}")).to_string()),
                )
                .await;
                let old = send(
                    reqwest::Method::GET,
                    format!("{fhir}/Observation/o{p}/_history/1"),
                    None,
                )
                .await;
                let found = send(
                    reqwest::Method::GET,
                    format!("{fhir}/Observation?subject=Patient/p{p}"),
                    None,
                )
                .await;
                for (st, want) in [(new, 201), (update, 200), (old, 200), (found, 200)] {
                    if st == want {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed during the data-key rotation: {st}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let op = operator(s).await;
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_data_keys(&|_, _| {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(r.generation, 2);
    assert!(r.resealed >= 30, "{r:?}");
    assert!(r.retired >= 10, "{r:?}");
    // Nothing is left under generation 1; its keys are gone.
    assert!(s.store.sealed_versions(2, 0, 10).await.unwrap().is_empty());
    assert!(s
        .store
        .get_wrapped_key("data:patient:p0")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .store
        .get_wrapped_key("data:patient:p0@2")
        .await
        .unwrap()
        .is_some());
    assert!(
        op.keys.kek().unwrap_data_key("patient:p0", &old_p0).is_ok(),
        "the old key existed"
    );
    // Every version opens, here (without cached keys) and on a new node.
    s.state.keys.forget_data_keys();
    let (node, _stop) = s.second_node().await;
    for base in [&s.fhir, &node] {
        for p in 0..10 {
            for path in [
                format!("/Observation/o{p}/_history/1"),
                format!("/Observation/o{p}"),
                format!("/Patient/p{p}"),
            ] {
                let (st, b) = read(s, base, &tok, &path).await;
                assert_eq!(st, 200, "{path}: {b}");
            }
        }
    }
    // A second rotation finds the first's generation and moves on.
    let r2 = KeyAdmin::of(&op, GRACE)
        .rotate_data_keys(&|_, _| {})
        .await
        .unwrap();
    assert_eq!(r2.generation, 3);
    assert!(s
        .store
        .get_wrapped_key("data:patient:p0@2")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        read(s, &s.fhir, &tok, "/Observation/o0/_history/1").await.0,
        200
    );
    // An erasure takes every generation of the patient's key.
    KeyAdmin::of(&op, GRACE)
        .erase_patient("p1", "GDPR request", 6, true, &|_, _| {})
        .await
        .unwrap();
    for row in ["data:patient:p1", "data:patient:p1@2", "data:patient:p1@3"] {
        assert!(
            s.store.get_wrapped_key(row).await.unwrap().is_none(),
            "{row}"
        );
    }
    assert_eq!(read(s, &s.fhir, &tok, "/Patient/p2").await.0, 200);
}

/// The URL of a Bundle's `next` link.
fn next_link(b: &Value) -> String {
    b["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .unwrap_or_else(|| panic!("no next link: {b}"))
        .to_owned()
}

async fn follow(s: &TestServer, tok: &str, url: &str) -> u16 {
    s.http
        .get(url)
        .bearer_auth(tok)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

both!(the_cursor_keys_rotate_without_breaking_open_pages);
/// Search and history pages issued before a cursor key rotation still
/// open after it; after a second rotation the oldest are refused (their
/// keys are deleted) while the previous generation's still open.
async fn the_cursor_keys_rotate_without_breaking_open_pages(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..4 {
        assert_eq!(
            put(s, &s.fhir, &tok, &patient(&format!("cp{p}"))).await,
            201
        );
    }
    let pages = || async {
        let (_, search) = read(s, &s.fhir, &tok, "/Patient?family=Testfamily&_count=1").await;
        let (_, history) = read(s, &s.fhir, &tok, "/Patient/_history?_count=1").await;
        [next_link(&search), next_link(&history)]
    };
    let first = pages().await;
    let op = operator(s).await;
    let r = KeyAdmin::of(&op, GRACE).rotate_cursors().await.unwrap();
    assert_eq!((r.generation, r.retired.len()), (2, 0));
    tokio::time::sleep(GRACE).await;
    let second = pages().await;
    assert_ne!(first, second, "new cursors under the new keys");
    for url in first.iter().chain(&second) {
        assert_eq!(follow(s, &tok, url).await, 200, "{url}");
    }
    let r = KeyAdmin::of(&op, GRACE).rotate_cursors().await.unwrap();
    assert_eq!(r.generation, 3);
    assert_eq!(r.retired[0], "mac:cursor", "{r:?}");
    tokio::time::sleep(GRACE).await;
    // The first generation is gone: its cursors are refused, clearly.
    for url in &first {
        assert_eq!(follow(s, &tok, url).await, 400, "{url}");
    }
    // A third rotation: generation 4 (the first two are gone, the third
    // is the previous one).
    let r = KeyAdmin::of(&op, GRACE).rotate_cursors().await.unwrap();
    assert_eq!(r.generation, 4);
    tokio::time::sleep(GRACE).await;
    let fourth = pages().await;
    for url in &fourth {
        assert_eq!(follow(s, &tok, url).await, 200, "{url}");
    }
    for url in &second {
        assert_eq!(follow(s, &tok, url).await, 400, "{url}");
    }
    let second = fourth;
    // The newest still opens, on this node and on one started now.
    let (node, _stop) = s.second_node().await;
    for url in &second {
        assert_eq!(follow(s, &tok, url).await, 200, "{url}");
        let there = url.replace(&s.fhir, &node);
        assert_eq!(follow(s, &tok, &there).await, 200, "{there}");
    }
}

both!(the_checkpoint_key_rotates_and_older_checkpoints_still_verify);
/// Writes go on while the audit checkpoint key rotates; afterwards new
/// checkpoints carry the new key's signature only, the old private key is
/// gone, and the whole log, with a checkpoint saved outside before the
/// rotation, still verifies. A public key slipped in through the database
/// stops the instance from opening rather than being trusted.
async fn the_checkpoint_key_rotates_and_older_checkpoints_still_verify(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..5 {
        assert_eq!(
            put(s, &s.fhir, &tok, &patient(&format!("cp{p}"))).await,
            201
        );
    }
    s.state.audit.seal_pending().await.unwrap();
    let outside = s.store.latest_checkpoint().await.unwrap().unwrap().note;
    let old_key = s.state.audit.verifier_key();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (http, fhir, tok, stop, failed) = (
            s.http.clone(),
            s.fhir.clone(),
            tok.clone(),
            stop.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let st = http
                    .put(format!("{fhir}/Patient/w{i}"))
                    .bearer_auth(&tok)
                    .header("content-type", FJ)
                    .body(patient(&format!("w{i}")).to_string())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if st != 201 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            i
        })
    };
    let op = operator(s).await;
    let r = KeyAdmin::of(&op, GRACE).rotate_checkpoint().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no write failed");
    assert!(writes > 5, "the load ran");
    assert_eq!((r.generation, r.retired.clone()), (2, vec![1]));
    assert!(s
        .store
        .get_wrapped_key("log:checkpoint-1")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .store
        .get_wrapped_key("log:retired-checkpoint-1")
        .await
        .unwrap()
        .is_some());
    // The serving node signs with the new key now.
    assert_eq!(put(s, &s.fhir, &tok, &patient("after")).await, 201);
    s.state.audit.seal_pending().await.unwrap();
    let note = s.store.latest_checkpoint().await.unwrap().unwrap().note;
    let new_key = s.state.audit.verifier_key();
    assert_eq!(new_key.encode(), r.verifier_key);
    assert!(phylax_audit::checkpoint::open_signed(&note, &new_key).is_ok());
    assert!(phylax_audit::checkpoint::open_signed(&note, &old_key).is_err());
    // Everything verifies, from the server and from a fresh operator
    // view, the outside checkpoint from before the rotation included.
    s.state
        .audit
        .verify(std::slice::from_ref(&outside), None)
        .await
        .unwrap();
    let again = operator(s).await;
    assert_eq!(again.audit.verifier_keys().len(), 2);
    again
        .audit
        .verify(std::slice::from_ref(&outside), None)
        .await
        .unwrap();
    // An insider with the database deletes the retired key (a gap before
    // generation 2), or every checkpoint key: the instance refuses to
    // open, rather than make a new key that would sign whatever is there.
    let retired = s
        .store
        .get_wrapped_key("log:retired-checkpoint-1")
        .await
        .unwrap()
        .unwrap();
    s.store
        .delete_wrapped_key("log:retired-checkpoint-1")
        .await
        .unwrap();
    let e = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("checkpoint keys"), "{e}");
    let current = s
        .store
        .get_wrapped_key("log:checkpoint-2")
        .await
        .unwrap()
        .unwrap();
    s.store
        .delete_wrapped_key("log:checkpoint-2")
        .await
        .unwrap();
    let e = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("checkpoint keys"), "{e}");
    assert!(
        s.store
            .get_wrapped_key("log:checkpoint-1")
            .await
            .unwrap()
            .is_none(),
        "no new key made"
    );
    s.store
        .put_wrapped_key_if_absent("log:retired-checkpoint-1", &retired, 0)
        .await
        .unwrap();
    s.store
        .put_wrapped_key_if_absent("log:checkpoint-2", &current, 0)
        .await
        .unwrap();
    operator(s).await;
    // An insider with the database adds a "retired" public key of their
    // own (to make checkpoints they forge verify): it does not unwrap
    // under the KEK, and the instance refuses to open.
    s.store
        .put_wrapped_key_if_absent("log:retired-checkpoint-3", &[2u8; 60], 0)
        .await
        .unwrap();
    assert!(Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .is_err());
    s.store
        .delete_wrapped_key("log:retired-checkpoint-3")
        .await
        .unwrap();
}

both!(a_tampered_wrapped_key_is_detected_and_stops_rotation);
async fn a_tampered_wrapped_key_is_detected_and_stops_rotation(s: &TestServer) {
    let tok = s.token(ALL).await;
    assert_eq!(put(s, &s.fhir, &tok, &patient("tp")).await, 201);
    assert_eq!(put(s, &s.fhir, &tok, &patient("ok")).await, 201);
    // Flip a byte of tp's wrapped data key, as someone with the database
    // could.
    let flip = match s.backend {
        Backend::Sqlite => "UPDATE wrapped_keys SET wrapped = CAST(substr(wrapped, 1, 20) || x'00' || substr(wrapped, 22) AS BLOB) WHERE scope = 'data:patient:tp'",
        Backend::Postgres => "UPDATE wrapped_keys SET wrapped = set_byte(wrapped, 20, get_byte(wrapped, 20) # 1) WHERE scope = 'data:patient:tp'",
    };
    s.sql(flip).await;
    s.state.keys.forget_data_keys();
    let (st, b) = read(s, &s.fhir, &tok, "/Patient/tp").await;
    assert_eq!(st, 500, "{b}");
    assert_eq!(b["resourceType"], "OperationOutcome");
    assert_eq!(read(s, &s.fhir, &tok, "/Patient/ok").await.0, 200);
    // A rotation stops before retiring anything: the old generation is
    // still there for whoever repairs the row (docs/KEYS.md).
    let op = operator(s).await;
    let gens = op.keys.kek().generations().len();
    let e = KeyAdmin::of(&op, Duration::ZERO)
        .rotate_kek(&|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, KeysError::Unreadable { ref kind, count: 1 } if kind == "data"),
        "{e}"
    );
    assert_eq!(
        op.keys.kek().generations().len(),
        gens + 1,
        "nothing retired"
    );
    assert_eq!(read(s, &s.fhir, &tok, "/Patient/ok").await.0, 200);
}

/// The raw rows an older copy of the database holds for a patient: its
/// wrapped data key and its sealed bodies.
async fn raw_rows(s: &TestServer, scope: &str) -> (Vec<u8>, Vec<(String, String, i64, Vec<u8>)>) {
    let key = s
        .store
        .get_wrapped_key(&format!("data:{scope}"))
        .await
        .unwrap()
        .unwrap();
    let mut rows = Vec::new();
    for id in ["ep", "eo1", "eo2"] {
        let t = if id == "ep" { "Patient" } else { "Observation" };
        if let Some(v) = s.store.read_current(t, id).await.unwrap() {
            rows.push((
                t.to_owned(),
                id.to_owned(),
                v.version as i64,
                v.sealed.unwrap(),
            ));
        }
    }
    (key, rows)
}

/// Whether the copy's index (`old_index`) has the entry of "subject is
/// Patient/ep" under `key`.
async fn old_index_has(s: &TestServer, key: &phylax_crypto::blind::BlindIndexKey) -> bool {
    let phylax_store::Cond::Hash { hashes, .. } =
        phylax_server::data::search::references_to(key, "subject", &["Patient/ep".to_owned()])
    else {
        panic!("a reference condition");
    };
    let mut n = 0;
    for h in &hashes {
        n += s
            .sql_i64(&format!(
                "SELECT count(*) FROM old_index WHERE hash = {}",
                s.blob(h)
            ))
            .await;
    }
    n > 0
}

both!(erasure_shreds_a_patient_even_in_older_copies);
async fn erasure_shreds_a_patient_even_in_older_copies(s: &TestServer) {
    let tok = s.token(ALL).await;
    for r in [
        patient("ep"),
        obs("eo1", "ep"),
        obs("eo2", "ep"),
        patient("kp"),
        obs("ko", "kp"),
    ] {
        assert_eq!(put(s, &s.fhir, &tok, &r).await, 201);
    }
    let op = operator(s).await;
    let admin = KeyAdmin::of(&op, GRACE);
    // An older copy: for SQLite the whole database file; for both, the
    // rows that copy holds for the patient.
    let copy = s.dir.path().join("before-erasure.db");
    if s.backend == Backend::Sqlite {
        s.sql(&format!("VACUUM INTO '{}'", copy.display())).await;
    }
    let (old_key, old_rows) = raw_rows(s, "patient:ep").await;
    assert_eq!(old_rows.len(), 3);
    // The copy's search index, where the patient's values are entries
    // keyed with the search index key: today's keys test them.
    s.sql("CREATE TABLE old_index AS SELECT hash FROM search_entries")
        .await;
    let key_then = phylax_server::instance::search_key(&s.store, op.keys.kek())
        .await
        .unwrap();
    assert!(
        old_index_has(s, &key_then).await,
        "the copy's entry matches"
    );
    // The old copy is readable with today's KEK (that is the point of
    // an erasure: after it, it is not).
    assert!(op
        .keys
        .kek()
        .unwrap_data_key("patient:ep", &old_key)
        .is_ok());

    // A reason is required; a legal hold blocks; the retention period
    // needs an explicit override.
    assert!(matches!(
        admin.erase_patient("ep", " ", 6, true, &|_, _| {}).await,
        Err(KeysError::NoReason)
    ));
    admin
        .set_legal_hold("ep", true, "litigation 2026-17")
        .await
        .unwrap();
    assert!(matches!(
        admin
            .erase_patient("ep", "GDPR request", 6, true, &|_, _| {})
            .await,
        Err(KeysError::LegalHold)
    ));
    admin
        .set_legal_hold("ep", false, "litigation closed")
        .await
        .unwrap();
    assert!(matches!(
        admin
            .erase_patient("ep", "GDPR request", 6, false, &|_, _| {})
            .await,
        Err(KeysError::WithinRetention { years: 6 })
    ));
    assert!(matches!(
        admin
            .erase_patient("../x", "GDPR request", 6, true, &|_, _| {})
            .await,
        Err(KeysError::BadId(_))
    ));
    assert_eq!(
        read(s, &s.fhir, &tok, "/Patient/ep").await.0,
        200,
        "nothing erased yet"
    );

    let e = admin
        .erase_patient("ep", "GDPR Art. 17 request", 6, true, &|_, _| {})
        .await
        .unwrap();
    assert_eq!((e.versions, e.resources), (3, 3));
    assert!(e.retention_overridden && e.pending.is_none());
    let rotated = e.kek_rotation.as_ref().unwrap();

    // The live server: gone, not an error; the other patient untouched.
    for p in ["/Patient/ep", "/Observation/eo1"] {
        let (st, _) = read(s, &s.fhir, &tok, p).await;
        assert!(st == 404 || st == 410, "{p}: {st}");
    }
    let (_, b) = read(s, &s.fhir, &tok, "/Observation?subject=Patient/ep").await;
    assert_eq!(b["total"].as_u64().unwrap_or(0), 0, "{b}");
    assert_eq!(read(s, &s.fhir, &tok, "/Observation/ko").await.0, 200);
    assert!(s
        .store
        .get_wrapped_key("data:patient:ep")
        .await
        .unwrap()
        .is_none());

    // The older copy: its wrapped key names a generation that no longer
    // exists anywhere, and the current key file cannot open it either.
    let kek = phylax_server::instance::load_kek(&op.config).unwrap();
    assert!(!kek.generations().iter().any(|(n, _)| *n < rotated.to));
    assert!(kek.unwrap_data_key("patient:ep", &old_key).is_err());
    assert!(op
        .keys
        .kek()
        .unwrap_data_key("patient:ep", &old_key)
        .is_err());
    let text = std::fs::read_to_string(s.dir.path().join("keys/kek")).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with(&format!("{}:", rotated.from[0]))),
        "the old generation is gone from the key file"
    );
    // Nor can today's search index key test the copy's index entries:
    // the index was rebuilt under a new key, the old one deleted.
    let ix = e.index_rotation.as_ref().unwrap();
    assert!(ix.retired.contains(&"mac:blind-index".to_owned()), "{ix:?}");
    let key_now = phylax_server::instance::search_key(&s.store, &kek)
        .await
        .unwrap();
    assert!(!old_index_has(s, &key_now).await);
    // And the live server searches under the new key alone.
    let (_, b) = read(s, &s.fhir, &tok, "/Observation?subject=Patient/kp").await;
    assert_eq!(b["total"], 1, "{b}");
    if s.backend == Backend::Sqlite {
        // The whole copy, opened as an instance with today's keys: refused.
        let restored = s.dir.path().join("restored");
        std::fs::create_dir_all(&restored).unwrap();
        std::fs::copy(&copy, restored.join("phylax.db")).unwrap();
        std::fs::copy(s.data_dir.join("phylax.toml"), restored.join("phylax.toml")).unwrap();
        let err = Instance::open(&restored, None).await.unwrap_err();
        assert!(err.to_string().contains("KEK"), "{err}");
    }
    // The audit log keeps the fact, naming the patient by id only.
    let siem = s.token("system/AuditEvent.rs").await;
    let (st, b) = read(s, &s.fhir, &siem, "/AuditEvent?patient=ep&_count=100").await;
    assert_eq!(st, 200, "{b}");
    let text = b.to_string();
    assert!(text.contains("patient-erase"), "{text}");
    assert!(text.contains("legal-hold"), "{text}");
    assert!(!text.contains("Testfamily"));
    // Erasing again: nothing left.
    assert!(matches!(
        admin
            .erase_patient("ep", "again", 6, true, &|_, _| {})
            .await,
        Err(KeysError::NothingToErase)
    ));
}

both!(the_kek_moves_from_its_file_into_the_hsm);
async fn the_kek_moves_from_its_file_into_the_hsm(s: &TestServer) {
    let Some(hsm) = common::hsm_settings() else {
        return;
    };
    let tok = s.token(ALL).await;
    for r in [patient("mp"), obs("mo", "mp")] {
        assert_eq!(put(s, &s.fhir, &tok, &r).await, 201);
    }
    let key_file = s.dir.path().join("keys/kek");
    assert!(key_file.exists());
    let op = operator(s).await;
    let r = phylax_server::keys::move_kek_to_hsm(&op, hsm.clone(), GRACE, &|_, _| {})
        .await
        .unwrap();
    assert_eq!((r.provider, r.retired.clone()), ("pkcs11", vec![1]));
    // The key file is gone; phylax.toml names the HSM and no key file.
    assert!(!key_file.exists());
    let cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    assert_eq!(cfg.hsm.as_ref(), Some(&hsm));
    assert!(cfg.key_file.is_none());
    // A node started now has only the HSM, and reads everything.
    let (node, _stop) = s.second_node().await;
    assert_eq!(read(s, &node, &tok, "/Observation/mo").await.0, 200);
    assert_eq!(read(s, &node, &tok, "/Patient/mp").await.0, 200);
    let again = operator(s).await;
    assert_eq!(
        again.keys.kek().generations(),
        vec![(r.to, phylax_crypto::kek::Provider::Hsm)]
    );
    // Moving again is refused.
    assert!(matches!(
        phylax_server::keys::move_kek_to_hsm(&again, hsm, GRACE, &|_, _| {}).await,
        Err(KeysError::AlreadyInHsm)
    ));
}

both!(erasure_survives_what_an_operator_could_do);
/// What an operator with the database could try around an erasure: a
/// rotation that fails half-way (the erasure stays pending and finishes
/// when run again), a legal-hold list with a record removed (every
/// patient held), key events removed so a server misses the erasure (it
/// notices and forgets its keys), a version from before the resource
/// entered the compartment (erased with it).
async fn erasure_survives_what_an_operator_could_do(s: &TestServer) {
    let tok = s.token(ALL).await;
    let mut moved = json!({"resourceType": "Observation", "id": "mv", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}});
    assert_eq!(put(s, &s.fhir, &tok, &moved).await, 201);
    moved["subject"] = json!({"reference": "Patient/xp"});
    for r in [patient("xp"), moved, patient("yp")] {
        let st = put(s, &s.fhir, &tok, &r).await;
        assert!(st == 200 || st == 201, "{st}");
    }
    let op = operator(s).await;
    let admin = KeyAdmin::of(&op, GRACE);

    // Holds: two placed, the first record deleted: everyone is held.
    admin.set_legal_hold("yp", true, "case 1").await.unwrap();
    admin.set_legal_hold("zp", true, "case 2").await.unwrap();
    s.sql("DELETE FROM meta WHERE key = 'legal_hold_v1:1'")
        .await;
    assert_eq!(
        phylax_server::keys::erase::legal_holds(&s.store)
            .await
            .unwrap(),
        vec!["*".to_owned(), "zp".to_owned()]
    );
    assert!(matches!(
        admin.erase_patient("xp", "GDPR", 6, true, &|_, _| {}).await,
        Err(KeysError::LegalHold)
    ));
    s.sql("INSERT INTO meta (key, value) SELECT 'legal_hold_v1:1', value FROM meta WHERE key = 'legal_hold_v1:2'").await;

    // The server reads xp (its key is cached), then the key events are
    // removed, so that the erasure's events reuse numbers it has seen.
    assert_eq!(read(s, &s.fhir, &tok, "/Patient/xp").await.0, 200);
    let kept = s
        .store
        .read_current("Patient", "xp")
        .await
        .unwrap()
        .unwrap();
    s.sql("DELETE FROM meta WHERE key LIKE 'keys_event_v1:%'")
        .await;
    // A bad key row makes the erasure's rotation fail after the deletion.
    let bad = "02000000010000000000000000000000000000000000000000000000000000";
    s.sql(&match s.backend {
        Backend::Sqlite => format!("INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES ('mac:zz', x'{bad}', 0)"),
        Backend::Postgres => format!("INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES ('mac:zz', '\\x{bad}'::bytea, 0)"),
    })
    .await;
    let e = admin
        .erase_patient("xp", "GDPR", 6, true, &|_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, KeysError::ErasurePending(_)), "{e}");
    assert!(
        e.to_string()
            .contains("run the same `phylax patient erase` again"),
        "{e}"
    );
    let status = admin.status(365).await.unwrap();
    assert_eq!(status.pending_erasures, vec!["xp".to_owned()]);
    // The version from before the resource entered the compartment went too.
    assert!(s
        .store
        .read_version("Observation", "mv", 1)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        read(s, &s.fhir, &tok, "/Observation/mv/_history/1").await.0,
        404
    );
    // Putting the erased row back does not let the server open it with a
    // key it kept: it noticed the events were rewritten and forgot them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.store
        .append_version(
            phylax_store::NewVersion {
                rtype: "Patient".into(),
                id: "xp".into(),
                version: kept.version,
                last_updated: kept.last_updated,
                deleted: false,
                key_scope: "patient:xp".into(),
                sealed: kept.sealed.clone(),
                index: vec![],
            },
            phylax_store::Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    assert_ne!(read(s, &s.fhir, &tok, "/Patient/xp").await.0, 200);
    // Repaired, the same command finishes the erasure.
    s.sql("DELETE FROM wrapped_keys WHERE scope = 'mac:zz'")
        .await;
    let done = admin
        .erase_patient("xp", "GDPR", 6, true, &|_, _| {})
        .await
        .unwrap();
    assert!(done.kek_rotation.is_some() && done.pending.is_none());
    assert!(admin.status(365).await.unwrap().pending_erasures.is_empty());
}

both!(the_access_token_key_rotates_without_cutting_tokens_short);
/// A token issued before a rotation keeps working until it expires (the
/// previous key verifies for a token lifetime), new tokens use the new
/// key on every node, and keys older than the previous one are deleted.
async fn the_access_token_key_rotates_without_cutting_tokens_short(s: &TestServer) {
    let before = s.token(ALL).await;
    assert_eq!(read(s, &s.fhir, &before, "/Patient").await.0, 200);
    let op = operator(s).await;
    let r = KeyAdmin::of(&op, GRACE).rotate_tokens().await.unwrap();
    assert_eq!(r.key, "mac:token@2");
    assert!(r.retired.is_empty());
    tokio::time::sleep(GRACE).await;
    let after = s.token(ALL).await;
    assert_eq!(read(s, &s.fhir, &after, "/Patient").await.0, 200);
    assert_eq!(
        read(s, &s.fhir, &before, "/Patient").await.0,
        200,
        "inside the overlap"
    );
    // A node started now knows both.
    let (node, _stop) = s.second_node().await;
    assert_eq!(read(s, &node, &before, "/Patient").await.0, 200);
    assert_eq!(read(s, &node, &after, "/Patient").await.0, 200);
    // Once the overlap is over (simulated), the old token is refused and
    // the new one is not.
    let (current, previous) = phylax_server::instance::token_keys(&s.store, op.keys.kek())
        .await
        .unwrap();
    assert!(previous.is_some());
    s.state.authn.tokens.set_keys(current, None);
    assert_eq!(read(s, &s.fhir, &before, "/Patient").await.0, 401);
    assert_eq!(read(s, &s.fhir, &after, "/Patient").await.0, 200);
    // The next rotation deletes the first key: nothing verifies with it.
    let r = KeyAdmin::of(&op, GRACE).rotate_tokens().await.unwrap();
    assert_eq!(
        (r.key.as_str(), r.retired.clone()),
        ("mac:token@3", vec!["mac:token".to_owned()])
    );
    assert!(s
        .store
        .get_wrapped_key("mac:token")
        .await
        .unwrap()
        .is_none());
    // A KEK rotation re-wraps the new token keys like any other.
    KeyAdmin::of(&op, Duration::ZERO)
        .rotate_kek(&|_, _| {})
        .await
        .unwrap();
    tokio::time::sleep(GRACE).await;
    let last = s.token(ALL).await;
    assert_eq!(read(s, &s.fhir, &last, "/Patient").await.0, 200);
    // Once more (@2 is gone now): @4, not a new @3; a node started now
    // verifies tokens issued under it.
    let r = KeyAdmin::of(&op, GRACE).rotate_tokens().await.unwrap();
    assert_eq!(r.key, "mac:token@4");
    tokio::time::sleep(GRACE).await;
    let newest = s.token(ALL).await;
    let (node, _stop) = s.second_node().await;
    assert_eq!(read(s, &node, &newest, "/Patient").await.0, 200);
}

both!(a_resumed_data_key_rotation_loses_nothing);
/// A data-key rotation that stopped right after recording its generation
/// (before telling the servers) is resumed while a server keeps writing:
/// the resumed rotation announces the generation, so nothing is sealed
/// under keys it then deletes (insider review: versions and accounts
/// written meanwhile were lost). Every version opens on a node started
/// afterwards, and no first-generation patient key is left.
async fn a_resumed_data_key_rotation_loses_nothing(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..5 {
        assert_eq!(put(s, &s.fhir, &tok, &patient(&format!("r{p}"))).await, 201);
    }
    s.sql(&format!(
        "INSERT INTO meta (key, value) VALUES ('data_keys_v1:2', {})",
        s.blob(b"1")
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, s_fhir, http, tok) = (stop.clone(), s.fhir.clone(), s.http.clone(), tok.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let o = obs(&format!("ro{n}"), &format!("r{}", n % 5));
                let st = http
                    .put(format!("{s_fhir}/Observation/ro{n}"))
                    .bearer_auth(&tok)
                    .header("content-type", FJ)
                    .body(o.to_string())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                assert_eq!(st, 201);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    let op = operator(s).await;
    KeyAdmin::of(&op, GRACE)
        .rotate_data_keys(&|_, _| {})
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 10);
    tokio::time::sleep(GRACE).await;
    let (node, _stop) = s.second_node().await;
    for n in 1..=written {
        let (st, _) = read(s, &node, &tok, &format!("/Observation/ro{n}")).await;
        assert_eq!(st, 200, "ro{n} opens on a fresh node");
    }
    assert_eq!(
        s.sql_i64(
            "SELECT count(*) FROM wrapped_keys WHERE scope LIKE 'data:patient:%' AND scope NOT LIKE '%@%'"
        )
        .await,
        0,
        "no first-generation patient key left (or made again)"
    );
}
