//! `phylax-bench --kek-rotation N`: how fast a KEK rotation re-wraps
//! stored keys (docs/PERFORMANCE.md, "Key rotation"). Creates an instance
//! (SQLite, or PostgreSQL with `--database-url`; the KEK in a key file, or
//! with `--hsm-*` in a PKCS#11 token), stores N data keys wrapped under
//! the KEK as the server would (one per patient), then times
//! `phylax keys rotate --kek`'s work without its grace wait for other nodes.
//! `--data-key-rotation N`: reads and writes before and during a data-key
//! rotation of N resource versions.

use anyhow::Result;
use phylax_server::instance::{InitOptions, Instance};
use phylax_server::keys::KeyAdmin;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn kek_rotation(
    n: usize,
    db: Option<&str>,
    hsm: Option<phylax_server::base::config::HsmSettings>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    Instance::init(&InitOptions {
        data_dir: data.clone(),
        key_file: Some(dir.path().join("keys/kek")),
        listen: "127.0.0.1:0".into(),
        public_url: None,
        database_url: db.map(str::to_owned),
        tls_names: vec![],
        hsm: hsm.clone(),
    })
    .await?;
    let inst = Arc::new(Instance::open(&data, db).await?);
    let t = Instant::now();
    let mut tasks = Vec::new();
    let per = n.div_ceil(32);
    for w in 0..32 {
        let inst = inst.clone();
        tasks.push(tokio::spawn(async move {
            for i in w * per..((w + 1) * per).min(n) {
                inst.keys.for_write(&format!("patient:bench{i:08}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seeded = t.elapsed().as_secs_f64();
    let admin = KeyAdmin::of(&inst, Duration::ZERO);
    let t = Instant::now();
    let r = admin.rotate_kek(&|_, _| {}).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "KEK rotation ({}, KEK {}): {} keys re-wrapped in {secs:.2} s = {:.0} keys/s (seeding {n} keys took {seeded:.1} s)",
        if db.is_some() { "postgres" } else { "sqlite" },
        r.provider,
        r.rewrapped,
        r.rewrapped as f64 / secs
    );
    Ok(())
}

/// Windows (each way) whose mean is the normal rate.
const BEFORE: usize = 3;

/// `phylax-bench --data-key-rotation N`: reads and writes over HTTPS
/// before and during a data-key rotation of N stored resource versions
/// (docs/PERFORMANCE.md, "Key rotation"). The versions are stored straight
/// into the database, sealed as the server seals them (ten per patient,
/// so N/10 patient keys), since loading a million through the API would
/// take longer than the measurement.
pub async fn data_key_rotation(
    n: usize,
    db: Option<&str>,
    secs: u64,
    conc: usize,
    max_rate: Option<u32>,
    control: Option<usize>,
) -> Result<()> {
    let (env, dir, _stop) = crate::setup(db, false, 10, None).await?;
    let env = Arc::new(env);
    let mut ids = Vec::new();
    for i in 0..2000 {
        ids.push(crate::create(&env, &crate::patient(i)).await?);
    }
    let ids = Arc::new(ids);
    let op = Arc::new(Instance::open(&dir.path().join("data"), db).await?);
    let t = Instant::now();
    seed_versions(&op, n).await?;
    let seeded = t.elapsed().as_secs_f64();
    env.refresh().await?;
    let measure = |scenario: &'static str| {
        let (env, ids) = (env.clone(), ids.clone());
        async move {
            // A fresh token each window: a long rotation outlasts one.
            env.refresh().await?;
            crate::run(
                env,
                scenario,
                conc,
                Duration::from_secs(secs),
                ids,
                Arc::new(Vec::new()),
            )
            .await
            .map(|o| o.rps)
        }
    };
    // The normal rate: the mean of three windows each way (one 10 s window
    // on this VM varies by a fifth on its own; the control run shows it).
    let (mut read0, mut write0) = (0.0, 0.0);
    for _ in 0..BEFORE {
        read0 += measure("read").await? / BEFORE as f64;
        write0 += measure("create").await? / BEFORE as f64;
    }
    let mut during = Vec::new();
    let rotating = match control {
        Some(_) => None,
        None => {
            let op = op.clone();
            Some(tokio::spawn(async move {
                let t = Instant::now();
                let r = KeyAdmin::of(&op, Duration::from_secs(2))
                    .with_max_rate(max_rate)
                    .rotate_data_keys(&|_, _| {})
                    .await;
                (r, t.elapsed().as_secs_f64())
            }))
        }
    };
    let running = |during: &Vec<(f64, f64)>| match (&rotating, control) {
        (Some(r), _) => !r.is_finished(),
        (None, Some(k)) => during.len() < k,
        (None, None) => false,
    };
    while running(&during) {
        let r = measure("read").await?;
        let w = measure("create").await?;
        // Progress with the time, to line windows up with the database's
        // own log (checkpoints, autovacuum).
        eprintln!(
            "window {} ended at unix {}: reads {r:.0}/s ({:.0}%), creates {w:.0}/s ({:.0}%)",
            during.len() + 1,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            100.0 * r / read0,
            100.0 * w / write0
        );
        // Only windows the rotation covered whole.
        if running(&during) {
            during.push((r, w));
        }
    }
    let backend = if db.is_some() { "postgres" } else { "sqlite" };
    match rotating {
        Some(rotating) => {
            let (r, took) = rotating.await?;
            let effective = match max_rate {
                None => phylax_server::keys::data::default_max_rate(backend),
                Some(r) => (r > 0).then_some(r),
            };
            let r = r?;
            println!(
                "Data-key rotation ({backend}, max rate {effective:?}): {} versions re-encrypted in {took:.1} s = {:.0} versions/s (seeding {n} versions took {seeded:.1} s)",
                r.resealed,
                r.resealed as f64 / took
            );
        }
        None => println!(
            "Control run ({backend}): no rotation, {} windows (seeding {n} versions took {seeded:.1} s)",
            during.len()
        ),
    }
    println!("| window | reads/s | % of before | creates/s | % of before |");
    println!("|---|---:|---:|---:|---:|");
    println!("| before | {read0:.0} | 100 | {write0:.0} | 100 |");
    for (i, (r, w)) in during.iter().enumerate() {
        println!(
            "| during {} | {r:.0} | {:.0} | {w:.0} | {:.0} |",
            i + 1,
            100.0 * r / read0,
            100.0 * w / write0
        );
    }
    Ok(())
}

/// N Observation versions, ten per patient, sealed under generation 1.
async fn seed_versions(op: &Arc<Instance>, n: usize) -> Result<()> {
    use phylax_store::{NewVersion, Precondition};
    let body = br#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"valueQuantity":{"value":72,"unit":"/min"}}"#;
    let mut tasks = Vec::new();
    let per = n.div_ceil(8);
    for w in 0..8 {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut batch = Vec::with_capacity(1000);
            for i in w * per..((w + 1) * per).min(n) {
                let scope = format!("patient:dk{:07}", i / 10);
                let id = format!("dk{i:08}");
                let key = op.keys.for_write(&scope).await?;
                let aad = phylax_server::data::repo::aad("Observation", &id, 1, &scope);
                batch.push((
                    NewVersion {
                        rtype: "Observation".into(),
                        id,
                        version: 1,
                        last_updated: 0,
                        deleted: false,
                        key_scope: scope,
                        sealed: Some(key.seal(&aad, body)?),
                        index: Vec::new(),
                    },
                    Precondition::Absent,
                ));
                if batch.len() == 1000 {
                    op.store
                        .append_versions(std::mem::take(&mut batch), Vec::new())
                        .await?;
                }
            }
            if !batch.is_empty() {
                op.store.append_versions(batch, Vec::new()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
