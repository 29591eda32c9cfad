//! Backups and restores (docs/BACKUP.md), on both backends: a backup taken
//! while writes run restores to a copy whose every version is the
//! source's, byte for byte once decrypted, whose audit log verifies and
//! agrees with the checkpoint kept outside the database; crypto-shredding
//! holds against a backup taken before the erasure; a restore drill is
//! recorded; a restore never overwrites.

use crate::common;
use common::{Backend, TestServer, ALL, FJ};
use phylax_crypto::archive::Identities;
use phylax_crypto::kek::Recipients;
use phylax_server::backup::restore::KekFrom;
use phylax_server::backup::{create, drill, restore, BackupError};
use phylax_server::instance::Instance;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

async fn put(s: &TestServer, tok: &str, r: &Value) -> u16 {
    let url = format!(
        "{}/{}/{}",
        s.fhir,
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

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

fn obs(id: &str, patient: &str, v: u64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": v},
        "subject": {"reference": format!("Patient/{patient}")}})
}

/// An age identity and its recipient (a custodian's `age-keygen`).
fn custodian() -> (Identities, Recipients) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let r = Recipients::parse([id.to_public().to_string().as_str()]).unwrap();
    let ids = Identities::parse(id.to_string().expose_secret()).unwrap();
    (ids, r)
}

/// A place to restore a PostgreSQL backup into: a database of its own
/// whose search path is the source's schema (a dump restores into a
/// schema of the same name). `None` for SQLite.
async fn restore_url(s: &TestServer) -> Option<String> {
    let url = s.db_url.as_deref()?;
    let base = common::pg_url().unwrap();
    let db = format!("phylax_r_{}", uuid::Uuid::new_v4().simple());
    let (c, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // Same user, host and schema option; another database.
    let (head, query) = url.split_once('?').unwrap();
    let (server, _) = head.rsplit_once('/').unwrap();
    Some(format!("{server}/{db}?{query}"))
}

/// Every stored version, by (type, id, version): its key scope and body
/// decrypted under the instance's own keys.
async fn bodies(inst: &Instance) -> BTreeMap<(String, String, u64), (String, Vec<u8>)> {
    let repo = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        phylax_server::instance::search_key(&inst.store, inst.keys.kek())
            .await
            .unwrap(),
        inst.config.fhir_base(),
    );
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = inst
            .store
            .sealed_versions(u32::MAX, after, 500)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        for v in page {
            let plain = repo
                .plaintext(&v)
                .await
                .unwrap()
                .expect("every version opens");
            out.insert(
                (v.rtype.clone(), v.id.clone(), v.version),
                (v.key_scope.clone(), plain.to_vec()),
            );
        }
    }
    out
}

fn no_progress() -> impl Fn(&str, u64, u64) + Sync {
    |_: &str, _: u64, _: u64| {}
}

async fn operator(s: &TestServer) -> Instance {
    Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap()
}

/// Let the server seal what it has (a checkpoint, published to the
/// outside file too).
async fn seal(s: &TestServer) {
    s.state.audit.flush().await.unwrap();
    s.state.audit.seal_pending().await.unwrap();
}

async fn backup_while_writing_restores_every_version(s: &TestServer) {
    let tok = s.token(ALL).await;
    for p in 0..5 {
        assert_eq!(
            put(s, &tok, &patient(&format!("p{p}"), "Before")).await,
            201
        );
        for o in 0..4 {
            assert_eq!(
                put(s, &tok, &obs(&format!("o{p}-{o}"), &format!("p{p}"), o)).await,
                201
            );
        }
    }
    seal(s).await;
    let op = operator(s).await;
    let kek = s.dir.path().join("keys/kek");
    let before = bodies(&op).await;
    let (ids, to) = custodian();
    let out = s.dir.path().join("b1.age");

    // Writes (new versions and new resources) go on during the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let (http, fhir, tok) = (s.http.clone(), s.fhir.clone(), tok.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = obs(&format!("w{n}"), &format!("p{}", n % 5), n);
                let st = http
                    .put(format!("{fhir}/Observation/w{n}"))
                    .bearer_auth(&tok)
                    .header("content-type", FJ)
                    .body(r.to_string())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                assert_eq!(st, 201, "a write during the backup failed");
                acked.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Paced (4 MB/s: the copy is taken in steps over a second or so),
    // so that writes land between the steps; the copy must still be
    // one instant's view.
    let c = create::create((&op).into(), &to, &out, Some(4 << 20), &no_progress())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        acked.load(Ordering::Relaxed) > 0,
        "writes ran during the backup"
    );
    assert!(c.versions >= before.len() as u64);
    seal(s).await;

    // Verify without restoring; the signer is the instance's key.
    let trust = op.audit.verifier_keys();
    let checked = restore::verify(&out, &ids, &trust, &[], &no_progress()).unwrap();
    assert_eq!(checked.manifest.versions, c.versions);
    assert_eq!(checked.manifest.backend, s.store.backend());

    // Restore, with the checkpoint kept outside the database now (newer
    // than the backup) and the one the backup carries.
    let outside = std::fs::read_to_string(s.data_dir.join("checkpoint.txt")).unwrap();
    let dest = s.dir.path().join("restored");
    let url = restore_url(s).await;
    let r = restore::restore(
        restore::RestoreOptions {
            from: &out,
            ids: &ids,
            data_dir: &dest,
            database_url: url.as_deref(),
            kek: KekFrom::KeyFile(&kek),
            trust: &trust,
            outside: &[outside],
            other_instance: false,
            erasures: &[],
            scratch: false,
        },
        &no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(r.versions_decrypted, c.versions);
    assert!(
        r.outside_checkpoints.iter().any(|(_, ok)| ok.is_none()),
        "the outside checkpoint is newer"
    );

    // Every version of the copy is the source's, decrypted; everything
    // written before the backup is in it.
    let copy = Instance::open(&dest, url.as_deref()).await.unwrap();
    let restored = bodies(&copy).await;
    let now = bodies(&op).await;
    assert_eq!(restored.len() as u64, c.versions);
    for (k, v) in &restored {
        assert_eq!(now.get(k), Some(v), "{k:?} differs from the source");
    }
    for k in before.keys() {
        assert!(
            restored.contains_key(k),
            "{k:?}, written before the backup, is missing"
        );
    }
    // Its audit log verifies on its own and holds the backup's start.
    let report = copy.audit.verify(&[], None).await.unwrap();
    assert!(report.records >= c.audit_records);
    // It starts cleanly and serves what it holds (the same certificate,
    // clients and token key as the source: the source's token works).
    let tls =
        phylax_server::net::tls::server_config(&copy.cert_path(), &copy.config.tls.key).unwrap();
    let st = phylax_server::state::AppState::new(copy).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        phylax_server::http::serve(st, listener, Some(tls), async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    let got = s
        .http
        .get(format!("https://{addr}/fhir/Patient/p0"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status().as_u16(), 200);
    let _ = stop_tx.send(());
    // A restore never overwrites: the same place again is refused, and so
    // is (for PostgreSQL) a schema that holds tables.
    let again = restore::restore(
        restore::RestoreOptions {
            from: &out,
            ids: &ids,
            data_dir: &dest,
            database_url: url.as_deref(),
            kek: KekFrom::KeyFile(&kek),
            trust: &trust,
            outside: &[],
            other_instance: false,
            erasures: &[],
            scratch: false,
        },
        &no_progress(),
    )
    .await;
    assert!(matches!(again, Err(BackupError::Refused(_))), "{again:?}");
    if let Some(u) = &url {
        let e = restore::restore(
            restore::RestoreOptions {
                from: &out,
                ids: &ids,
                data_dir: &s.dir.path().join("elsewhere"),
                database_url: Some(u),
                kek: KekFrom::KeyFile(&kek),
                trust: &trust,
                outside: &[],
                other_instance: false,
                erasures: &[],
                scratch: false,
            },
            &no_progress(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("never over data"), "{e}");
        assert!(!s.dir.path().join("elsewhere").exists());
    }
    // Another instance's trusted key: refused before anything is written.
    let (stranger, _) = custodian();
    assert!(restore::verify(&out, &stranger, &trust, &[], &no_progress()).is_err());
    let other_key = phylax_audit::checkpoint::VerifierKey::new("phylax/other", [7u8; 32]).unwrap();
    let e = restore::verify(&out, &ids, &[other_key], &[], &no_progress()).unwrap_err();
    assert!(e.to_string().contains("not a key you trust"), "{e}");
    // The server goes on serving what the copy holds.
    let (st, _) = common::get(s, &tok, "/Patient/p0").await;
    assert_eq!(st, 200);
}

async fn crypto_shredding_holds_against_an_older_backup(s: &TestServer) {
    let tok = s.token(ALL).await;
    for r in [
        patient("gone", "Erased"),
        obs("g1", "gone", 1),
        patient("kept", "Kept"),
        obs("k1", "kept", 2),
    ] {
        assert_eq!(put(s, &tok, &r).await, 201);
    }
    seal(s).await;
    let op = operator(s).await;
    let (ids, to) = custodian();
    let old = s.dir.path().join("before.age");
    create::create((&op).into(), &to, &old, None, &no_progress())
        .await
        .unwrap();
    // A copy of the KEK as it was (an escrow someone kept).
    let kek_then = s.dir.path().join("kek-then");
    std::fs::copy(s.dir.path().join("keys/kek"), &kek_then).unwrap();

    phylax_server::keys::KeyAdmin::of(&op, std::time::Duration::from_millis(1500))
        .erase_patient("gone", "GDPR Art. 17 request", 6, true, &|_, _| {})
        .await
        .unwrap();
    drop(op);
    let op = operator(s).await;
    let kek = s.dir.path().join("keys/kek");

    // With the KEK as it is now, the older backup does not open at all.
    let url = restore_url(s).await;
    let e = restore::restore(
        restore::RestoreOptions {
            from: &old,
            ids: &ids,
            data_dir: &s.dir.path().join("r-now"),
            database_url: url.as_deref(),
            kek: KekFrom::KeyFile(&kek),
            trust: &[],
            outside: &[],
            other_instance: false,
            erasures: &[],
            scratch: false,
        },
        &no_progress(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no longer holds"), "{e}");
    assert!(!s.dir.path().join("r-now").exists());

    // Even with the old KEK, the live register's erasure is re-applied:
    // the patient's data does not come back; the other patient's does.
    let erased = create::erased_patients(&op.store).await.unwrap();
    assert_eq!(erased, vec!["gone".to_string()]);
    let dest = s.dir.path().join("r-old-kek");
    let r = restore::restore(
        restore::RestoreOptions {
            from: &old,
            ids: &ids,
            data_dir: &dest,
            database_url: url.as_deref(),
            kek: KekFrom::KeyFile(&kek_then),
            trust: &[],
            outside: &[],
            other_instance: false,
            erasures: &erased,
            scratch: false,
        },
        &no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(r.erasures_reapplied, vec!["gone".to_string()]);
    let copy = Instance::open(&dest, url.as_deref()).await.unwrap();
    let b = bodies(&copy).await;
    assert!(b.values().all(|(scope, _)| scope != "patient:gone"));
    assert!(b.keys().any(|(t, id, _)| t == "Observation" && id == "k1"));
    assert!(copy
        .store
        .get_wrapped_key("data:patient:gone")
        .await
        .unwrap()
        .is_none());

    // A backup taken after the erasure restores with today's KEK, without
    // the patient.
    let new = s.dir.path().join("after.age");
    create::create((&op).into(), &to, &new, None, &no_progress())
        .await
        .unwrap();
    let url2 = restore_url(s).await;
    let dest2 = s.dir.path().join("r-after");
    restore::restore(
        restore::RestoreOptions {
            from: &new,
            ids: &ids,
            data_dir: &dest2,
            database_url: url2.as_deref(),
            kek: KekFrom::KeyFile(&kek),
            trust: &[],
            outside: &[],
            other_instance: false,
            erasures: &[],
            scratch: false,
        },
        &no_progress(),
    )
    .await
    .unwrap();
    let copy2 = Instance::open(&dest2, url2.as_deref()).await.unwrap();
    let b2 = bodies(&copy2).await;
    assert!(b2.values().all(|(scope, _)| scope != "patient:gone"));
    assert!(b2.keys().any(|(_, id, _)| id == "k1"));
}

async fn a_restore_drill_is_timed_and_recorded(s: &TestServer) {
    let tok = s.token(ALL).await;
    assert_eq!(put(s, &tok, &patient("d1", "Drill")).await, 201);
    seal(s).await;
    let op = operator(s).await;
    let (ids, to) = custodian();
    let dir = s.dir.path().join("backups");
    std::fs::create_dir(&dir).unwrap();
    create::create(
        (&op).into(),
        &to,
        &dir.join("one.age"),
        None,
        &no_progress(),
    )
    .await
    .unwrap();
    // Something planted in the directory, newer by its time, is not what
    // a drill takes: only what the instance recorded.
    let planted = dir.join("phylax-99999999T000000.000Z.age");
    std::fs::write(&planted, b"junk").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&planted)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(86_400 * 365))
        .unwrap();
    let newest = drill::newest_backup(&op.store, Some(&dir)).await.unwrap();
    assert_eq!(
        std::path::Path::new(&newest.file),
        dir.join("one.age").canonicalize().unwrap()
    );
    let newest_id = newest.id.clone();
    let newest = PathBuf::from(newest.file);
    let url = restore_url(s).await;
    let d = drill::drill(
        &op,
        drill::DrillOptions {
            from: &newest,
            ids: &ids,
            scratch_url: url.as_deref(),
            other_instance: false,
            expect: Some(&newest_id),
        },
        &no_progress(),
    )
    .await
    .unwrap();
    assert!(d.record.ok);
    println!(
        "restore drill ({:?}): restore {:.2} s, backup age {:.2} s",
        s.backend, d.record.rto_secs, d.record.rpo_secs
    );
    let last = drill::last_drill(&op.store).await.unwrap().unwrap();
    assert_eq!(last, d.record);
    // In the live audit log.
    op.audit.flush().await.unwrap();
    let hits = op
        .audit
        .search(&phylax_store::AuditQuery {
            subtype: Some("backup-drill".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!hits.is_empty(), "the drill is in the audit log");
    // Nothing of the scratch copy is left.
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("phylax-drill-"))
        .filter(|e| {
            e.path().join("phylax.toml").exists()
                && std::fs::read_to_string(e.path().join("phylax.toml"))
                    .map(|t| t.contains(&s.data_dir.display().to_string()))
                    .unwrap_or(false)
        })
        .count();
    assert_eq!(leftovers, 0);
    // An older archive put where the newest recorded backup was: the
    // drill fails (and says so) instead of proving the wrong backup.
    create::create(
        (&op).into(),
        &to,
        &dir.join("two.age"),
        None,
        &no_progress(),
    )
    .await
    .unwrap();
    let two = drill::newest_backup(&op.store, Some(&dir)).await.unwrap();
    assert_ne!(two.id, newest_id);
    std::fs::copy(&newest, &two.file).unwrap();
    let e = drill::drill(
        &op,
        drill::DrillOptions {
            from: std::path::Path::new(&two.file),
            ids: &ids,
            scratch_url: url.as_deref(),
            other_instance: false,
            expect: Some(&two.id),
        },
        &no_progress(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(!drill::last_drill(&op.store).await.unwrap().unwrap().ok);
    // A failed drill is recorded as failed (a backup of nothing).
    let bad = dir.join("bad.age");
    std::fs::write(&bad, b"not an archive").unwrap();
    let e = drill::drill(
        &op,
        drill::DrillOptions {
            from: &bad,
            ids: &ids,
            scratch_url: url.as_deref(),
            other_instance: false,
            expect: None,
        },
        &no_progress(),
    )
    .await;
    assert!(e.is_err());
    assert!(!drill::last_drill(&op.store).await.unwrap().unwrap().ok);
}

/// A serving node takes scheduled backups into `[backup] dir`, and keeps
/// only as many as the retention says (the newest always).
async fn scheduled_backups_are_taken_and_pruned(s: &TestServer) {
    let (ids, _) = custodian();
    let dir = s.dir.path().join("scheduled");
    let mut files = Vec::new();
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        files = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        if files
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "age"))
        {
            break;
        }
    }
    let b = files
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "age"))
        .expect("a scheduled backup within ten seconds");
    let op = operator(s).await;
    restore::verify(
        b,
        &ids_for(s),
        &op.audit.verifier_keys(),
        &[],
        &no_progress(),
    )
    .unwrap();
    let _ = ids;
    // Retention: only backups the instance recorded, by their recorded
    // time; files planted in the directory (even named like backups, even
    // dated in the future) are never deleted and push nothing out.
    let now = common::now() * 1000;
    let day = 86_400_000;
    let mut recorded = create::recorded(&op.store).await.unwrap();
    assert_eq!(recorded.len(), 1);
    for i in 1..=4i64 {
        let f = dir.join(format!("phylax-old{i}.age"));
        std::fs::write(&f, b"x").unwrap();
        recorded.push((
            now - i * day - 1000,
            create::Recorded {
                id: format!("old{i}"),
                file: f.canonicalize().unwrap().display().to_string(),
            },
        ));
    }
    for i in 0..3 {
        let f = dir.join(format!("phylax-planted{i}.age"));
        std::fs::write(&f, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(
                std::time::SystemTime::now() + std::time::Duration::from_secs(86_400 * 365),
            )
            .unwrap();
    }
    let newest = b.canonicalize().unwrap();
    let deleted = phylax_server::backup::schedule::prune(&dir, &recorded, &newest, 3, 35, now);
    assert_eq!(
        deleted,
        vec!["phylax-old3.age", "phylax-old4.age"],
        "{deleted:?}"
    );
    assert!(b.exists(), "the newest stays");
    let deleted = phylax_server::backup::schedule::prune(&dir, &recorded, &newest, 10, 1, now);
    assert_eq!(
        deleted,
        vec!["phylax-old1.age", "phylax-old2.age"],
        "older than a day: {deleted:?}"
    );
    assert!(b.exists());
    for i in 0..3 {
        assert!(
            dir.join(format!("phylax-planted{i}.age")).exists(),
            "a planted file was deleted"
        );
    }
}

/// The identity scheduled backups in `s` are encrypted to.
fn ids_for(s: &TestServer) -> Identities {
    Identities::parse(&std::fs::read_to_string(s.dir.path().join("backup-id.txt")).unwrap())
        .unwrap()
}

/// The server, and the directory holding its recipients file (kept as
/// long as the server runs).
async fn with_schedule(backend: Backend) -> Option<(TestServer, tempfile::TempDir)> {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    // Written before the server starts: its first backup is due at once.
    let holder = tempfile::tempdir().unwrap();
    let rf = holder.path().join("recipients");
    std::fs::write(&rf, format!("{}\n", id.to_public())).unwrap();
    let idf = holder.path().join("id");
    std::fs::write(&idf, id.to_string().expose_secret()).unwrap();
    let s = TestServer::start_with(backend, |c| {
        c.backup.schedule = Some("every 1d".into());
        c.backup.dir = Some("../scheduled".into());
        c.backup.recipients_file = Some(rf.clone());
    })
    .await?;
    std::fs::copy(&idf, s.dir.path().join("backup-id.txt")).unwrap();
    Some((s, holder))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_sqlite() {
    let (s, _holder) = with_schedule(Backend::Sqlite).await.unwrap();
    scheduled_backups_are_taken_and_pruned(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_postgres() {
    if let Some((s, _holder)) = with_schedule(Backend::Postgres).await {
        scheduled_backups_are_taken_and_pruned(&s).await;
    }
}

/// With the newest checkpoint also kept outside the database.
async fn with_outside_checkpoint(backend: Backend) -> Option<TestServer> {
    TestServer::start_with(backend, |c| {
        c.audit.checkpoint_file = Some("checkpoint.txt".into());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_writing_sqlite() {
    let s = with_outside_checkpoint(Backend::Sqlite).await.unwrap();
    backup_while_writing_restores_every_version(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_writing_postgres() {
    if let Some(s) = with_outside_checkpoint(Backend::Postgres).await {
        backup_while_writing_restores_every_version(&s).await;
    }
}

both!(crypto_shredding_holds_against_an_older_backup);
both!(a_restore_drill_is_timed_and_recorded);

/// A PostgreSQL cluster of the test's own, run with PostgreSQL's tools
/// (as the `postgres` user when the tests run as root, as PostgreSQL
/// requires).
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn bin() -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        found.sort();
        found.pop()
    }

    fn run(&self, tool: &str, args: &[&str]) -> String {
        let path = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let o = cmd.args(args).current_dir(&self.dir).output().unwrap();
        assert!(
            o.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    fn sql(&self, q: &str) -> String {
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "phylax",
                "-Atqc",
                q,
            ],
        )
    }

    fn start(&self, data: &str) {
        let d = self.dir.join(data);
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                d.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    fn stop(&self, data: &str) {
        let d = self.dir.join(data);
        self.run(
            "pg_ctl",
            &["-D", d.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for Cluster {
    /// A failed test leaves no server running.
    fn drop(&mut self) {
        for data in ["data", "base"] {
            let d = self.dir.join(data);
            if d.join("postmaster.pid").exists() {
                let mut cmd = if is_root() {
                    let mut c = std::process::Command::new("runuser");
                    c.args(["-u", "postgres", "--"])
                        .arg(self.bin.join("pg_ctl"));
                    c
                } else {
                    std::process::Command::new(self.bin.join("pg_ctl"))
                };
                let _ = cmd
                    .args(["-D"])
                    .arg(&d)
                    .args(["-m", "immediate", "stop"])
                    .output();
            }
        }
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Point-in-time recovery with PostgreSQL's own tools (docs/BACKUP.md):
/// WAL archiving and a base backup; two writes with a moment between;
/// recovery to that moment; `backup check` proves the result (audit log,
/// keys, every version), and the later write is absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_postgres() {
    if common::pg_url().is_none() {
        return;
    }
    let Some(bin) = Cluster::bin() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs the PostgreSQL server tools (initdb, pg_ctl, pg_basebackup)"
        );
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("pg");
    std::fs::create_dir_all(dir.join("archive")).unwrap();
    if is_root() {
        let o = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Cluster {
        bin,
        dir: dir.clone(),
        port,
    };
    c.run(
        "initdb",
        &["-D", "data", "-U", "postgres", "--auth=trust", "--no-sync"],
    );
    let archive = dir.join("archive");
    let conf = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\nfsync = off\n\
         wal_level = replica\narchive_mode = on\n\
         archive_command = 'test ! -f {a}/%f && cp %p {a}/%f'\n",
        d = dir.display(),
        a = archive.display()
    );
    let pg_conf = dir.join("data/postgresql.conf");
    let mut text = std::fs::read_to_string(&pg_conf).unwrap();
    text.push_str(&conf);
    std::fs::write(&pg_conf, text).unwrap();
    c.start("data");
    c.run(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-qc",
            "CREATE DATABASE phylax",
        ],
    );
    let url = format!("postgres://postgres@127.0.0.1:{port}/phylax");

    let s = TestServer::start_on(url.clone(), |cfg| {
        cfg.audit.checkpoint_file = Some("checkpoint.txt".into());
    })
    .await;
    let tok = s.token(ALL).await;
    assert_eq!(put(&s, &tok, &patient("first", "Before")).await, 201);
    c.run(
        "pg_basebackup",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-D",
            "base",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    );
    assert_eq!(put(&s, &tok, &patient("a", "Kept")).await, 201);
    seal(&s).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let target = c.sql("SELECT now()");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(put(&s, &tok, &patient("b", "Later")).await, 201);
    seal(&s).await;
    let segment = c.sql("SELECT pg_walfile_name(pg_switch_wal())");
    for _ in 0..100 {
        if archive.join(&segment).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        archive.join(&segment).exists(),
        "the WAL segment was archived"
    );
    let data_dir = s.data_dir.clone();
    let _kept = s.shut_down();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.stop("data");

    // PostgreSQL's own recovery, to the moment between the writes.
    std::fs::write(dir.join("base/recovery.signal"), "").unwrap();
    let auto = dir.join("base/postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&format!(
        "restore_command = 'cp {a}/%f %p'\nrecovery_target_time = '{target}'\nrecovery_target_action = 'promote'\n",
        a = archive.display()
    ));
    std::fs::write(&auto, text).unwrap();
    if is_root() {
        std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .output()
            .unwrap();
    }
    c.start("base");
    for _ in 0..100 {
        if c.sql("SELECT pg_is_in_recovery()") == "f" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(c.sql("SELECT pg_is_in_recovery()"), "f");

    // Phylax proves what came back: it opens under the KEK, its audit log
    // verifies (the outside checkpoint is newer: what came after is
    // lost), every version decrypts; the earlier write is there, the
    // later one is not.
    let inst = Instance::open(&data_dir, Some(&url)).await.unwrap();
    let outside = std::fs::read_to_string(data_dir.join("checkpoint.txt")).unwrap();
    let check = restore::check(&inst, &[outside], &no_progress())
        .await
        .unwrap();
    assert!(check.versions_decrypted >= 2);
    assert_eq!(check.outside_newer.len(), 1, "{check:?}");
    assert!(inst
        .store
        .read_current("Patient", "first")
        .await
        .unwrap()
        .is_some());
    assert!(inst
        .store
        .read_current("Patient", "a")
        .await
        .unwrap()
        .is_some());
    assert!(inst
        .store
        .read_current("Patient", "b")
        .await
        .unwrap()
        .is_none());
    drop(inst);
    c.stop("base");
}

/// An older backup restored in the instance's place cannot quietly erase
/// the evidence that a longer log existed: the restore reports the
/// outside checkpoint as newer, and the copy never writes its smaller
/// checkpoint over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_copy_does_not_overwrite_the_outside_checkpoint() {
    let holder = tempfile::tempdir().unwrap();
    let outside_file = holder.path().join("outside-checkpoint");
    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.audit.checkpoint_file = Some(outside_file.clone());
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    assert_eq!(put(&s, &tok, &patient("r1", "Early")).await, 201);
    seal(&s).await;
    let op = operator(&s).await;
    let kek = s.dir.path().join("keys/kek");
    let (ids, to) = custodian();
    let old = s.dir.path().join("old.age");
    create::create((&op).into(), &to, &old, None, &no_progress())
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            put(&s, &tok, &patient(&format!("later{i}"), "Later")).await,
            201
        );
    }
    seal(&s).await;
    let before = std::fs::read_to_string(&outside_file).unwrap();
    let dest = s.dir.path().join("rolled-back");
    let r = restore::restore(
        restore::RestoreOptions {
            from: &old,
            ids: &ids,
            data_dir: &dest,
            database_url: None,
            kek: KekFrom::KeyFile(&kek),
            trust: &[],
            outside: &[],
            other_instance: false,
            erasures: &[],
            scratch: false,
        },
        &no_progress(),
    )
    .await
    .unwrap();
    assert!(
        r.outside_checkpoints.iter().any(|(_, ok)| ok.is_none()),
        "the restore reports the newer outside checkpoint: {:?}",
        r.outside_checkpoints
    );
    let copy = Instance::open(&dest, None).await.unwrap();
    copy.audit.flush().await.unwrap();
    copy.audit.seal_pending().await.unwrap();
    assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), before);
    // Nor once the copy's own log (a fork) has grown past that size.
    for i in 0..20 {
        copy.audit
            .record_admin(
                "backup",
                phylax_audit::event::Action::Read,
                format!("fork {i}"),
            )
            .await
            .unwrap();
    }
    copy.audit.seal_pending().await.unwrap();
    let (records, _) = copy.audit.sizes().await.unwrap();
    let outside_size =
        phylax_audit::checkpoint::open_signed_any(&before, &copy.audit.verifier_keys())
            .unwrap()
            .size;
    assert!(
        records > outside_size,
        "the fork grew past the outside checkpoint"
    );
    assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), before);
    // The live instance still verifies against it.
    let live = op
        .audit
        .verify(std::slice::from_ref(&before), None)
        .await
        .unwrap();
    assert_eq!(live.external, 1);
}
