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
use phylax_server::backup::{create, drill, restore, BackupError};
use phylax_server::instance::Instance;
use serde_json::{json, Value};
use std::collections::BTreeMap;
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
    let c = create::create(&op, &to, &out, &no_progress())
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
            key_file: None,
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
    // A restore never overwrites: the same place again is refused, and so
    // is (for PostgreSQL) a schema that holds tables.
    let again = restore::restore(
        restore::RestoreOptions {
            from: &out,
            ids: &ids,
            data_dir: &dest,
            database_url: url.as_deref(),
            key_file: None,
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
                key_file: None,
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
    create::create(&op, &to, &old, &no_progress())
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

    // With the KEK as it is now, the older backup does not open at all.
    let url = restore_url(s).await;
    let e = restore::restore(
        restore::RestoreOptions {
            from: &old,
            ids: &ids,
            data_dir: &s.dir.path().join("r-now"),
            database_url: url.as_deref(),
            key_file: None,
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
            key_file: Some(&kek_then),
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
    create::create(&op, &to, &new, &no_progress())
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
            key_file: None,
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
    create::create(&op, &to, &dir.join("one.age"), &no_progress())
        .await
        .unwrap();
    let newest = drill::newest_backup(&dir).unwrap();
    let url = restore_url(s).await;
    let d = drill::drill(
        &op,
        drill::DrillOptions {
            from: &newest,
            ids: &ids,
            scratch_url: url.as_deref(),
            other_instance: false,
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
        },
        &no_progress(),
    )
    .await;
    assert!(e.is_err());
    assert!(!drill::last_drill(&op.store).await.unwrap().unwrap().ok);
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
