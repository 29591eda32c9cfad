//! `phylax-bench --backup`: a backup of the loaded instance (use
//! `--patients` and `--keep-instance` for a store of realistic size,
//! search index and audit log included) while reads go on: the read rate
//! before (three windows) and in every window the backup covers, the
//! backup's time and size, then how long verifying and restoring it take
//! (docs/PERFORMANCE.md, "Backups").

use anyhow::Result;
use phylax_crypto::archive::Identities;
use phylax_crypto::kek::Recipients;
use phylax_server::backup::{create, restore};
use phylax_server::instance::Instance;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn backup(
    env: Arc<crate::Env>,
    dir: &Path,
    db: Option<&str>,
    ids: Arc<Vec<String>>,
    (secs, conc): (u64, usize),
    max_mb: Option<u32>,
    control: Option<usize>,
) -> Result<()> {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let to = Recipients::parse([id.to_public().to_string().as_str()])?;
    let identity = Identities::parse(id.to_string().expose_secret())?;
    let measure = || {
        let (env, ids) = (env.clone(), ids.clone());
        async move {
            env.refresh().await?;
            crate::run(
                env,
                "read",
                conc,
                Duration::from_secs(secs),
                ids,
                Arc::new(Vec::new()),
            )
            .await
            .map(|o| o.rps)
        }
    };
    let mut before = 0.0;
    for _ in 0..3 {
        before += measure().await? / 3.0;
    }
    if let Some(n) = control {
        // The control run: the same windows with no backup, so a window's
        // percentage can be read against what the machine does alone.
        println!("| window (no backup) | reads/s | % of before |");
        println!("|---|---:|---:|");
        println!("| before | {before:.0} | 100 |");
        for i in 0..n {
            let r = measure().await?;
            println!("| control {} | {r:.0} | {:.0} |", i + 1, 100.0 * r / before);
        }
        return Ok(());
    }
    let out = dir.join(format!("bench-{}.age", uuid::Uuid::new_v4().simple()));
    let op = Arc::new(Instance::open(&dir.join("data"), db).await?);
    let task = {
        let (op, out) = (op.clone(), out.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            // As `phylax backup create`: `--max-rate` MB/s, 0 for none,
            // else `[backup] max_mb_per_sec`.
            let rate = match max_mb {
                Some(0) => None,
                Some(mb) => Some(u64::from(mb) << 20),
                None => op.config.backup.max_rate(),
            };
            let c = create::create((&*op).into(), &to, &out, rate, &|_, _, _| {}).await;
            (c, t.elapsed().as_secs_f64())
        })
    };
    let mut during = Vec::new();
    while !task.is_finished() {
        let r = measure().await?;
        eprintln!(
            "window {}: reads {r:.0}/s ({:.0}%)",
            during.len() + 1,
            100.0 * r / before
        );
        if !task.is_finished() {
            during.push(r);
        }
    }
    let (c, took) = task.await?;
    let c = c?;
    let backend = if db.is_some() { "postgres" } else { "sqlite" };
    println!(
        "Backup ({backend}): {} resources, {} versions, {} audit records; {:.1} GB archive in {took:.1} s ({:.0} MB/s)",
        c.resources,
        c.versions,
        c.audit_records,
        c.bytes as f64 / 1e9,
        c.bytes as f64 / 1e6 / took
    );
    println!("| window | reads/s | % of before |");
    println!("|---|---:|---:|");
    println!("| before | {before:.0} | 100 |");
    for (i, r) in during.iter().enumerate() {
        println!("| during {} | {r:.0} | {:.0} |", i + 1, 100.0 * r / before);
    }
    let t = Instant::now();
    restore::verify(
        &out,
        &identity,
        &op.audit.verifier_keys(),
        &[],
        &|_, _, _| {},
    )?;
    println!("verify: {:.1} s", t.elapsed().as_secs_f64());
    drop(op);
    // The restore's own database: a SQLite file beside, or for PostgreSQL
    // the URL in PHYLAX_BENCH_RESTORE_URL (an empty schema named as the
    // instance's, in another database).
    let restore_url = std::env::var("PHYLAX_BENCH_RESTORE_URL").ok();
    if db.is_none() || restore_url.is_some() {
        let dest = dir.join(format!("restored-{}", uuid::Uuid::new_v4().simple()));
        let t = Instant::now();
        let r = restore::restore(
            restore::RestoreOptions {
                from: &out,
                ids: &identity,
                data_dir: &dest,
                database_url: restore_url.as_deref(),
                kek: restore::KekFrom::KeyFile(&dir.join("keys/kek")),
                trust: &[],
                outside: &[],
                other_instance: false,
                erasures: &[],
                scratch: true,
            },
            &|_, _, _| {},
        )
        .await?;
        println!(
            "restore (RTO): {:.1} s, {} versions decrypted",
            t.elapsed().as_secs_f64(),
            r.versions_decrypted
        );
        let _ = std::fs::remove_dir_all(&dest);
    }
    let _ = std::fs::remove_file(&out);
    Ok(())
}
