//! `phylax-bench --kek-rotation N`: how fast a KEK rotation re-wraps
//! stored keys (docs/PERFORMANCE.md, "Key rotation"). Creates an instance
//! (SQLite, or PostgreSQL with `--database-url`; the KEK in a key file, or
//! with `--hsm-*` in a PKCS#11 token), stores N data keys wrapped under
//! the KEK as the server would (one per patient), then times
//! `phylax keys rotate --kek`'s work without its grace wait for other nodes.

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
