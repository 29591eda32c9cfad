//! `phylax-bench --incident-scope`: how long an incident's scope takes on
//! the loaded instance's audit log (use `--patients` and
//! `--keep-instance` for a log of a million records): verifying the log
//! alone, then a scope of every principal and of one client, each of
//! which verifies the log in the same pass (docs/PERFORMANCE.md,
//! "Incident scope").

use anyhow::Result;
use phylax_server::data::incidents::{Severity, Step};
use phylax_server::instance::Instance;
use phylax_server::ops::incident::{self as response, scope};
use phylax_server::state::AppState;
use std::path::Path;
use std::time::Instant;

pub async fn incident_scope(dir: &Path, db: Option<&str>) -> Result<()> {
    let i = Instance::open(&dir.join("data"), db).await?;
    let st = AppState::new(i)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (sealed, pending) = st.audit.sizes().await?;
    let t = Instant::now();
    st.audit.verify(&[], None).await?;
    let verify = t.elapsed().as_secs_f64();
    let now = chrono::Utc::now().timestamp_millis();
    let inc = response::open(&st, "benchmark", Severity::Low, now, "bench").await?;
    let t = Instant::now();
    let all = response::scope(
        &st,
        &inc.id,
        &scope::Who::All,
        scope::Window::default(),
        &[],
        "bench",
    )
    .await?;
    let all_s = t.elapsed().as_secs_f64();
    // The principal with the most records (the benchmark's client).
    let busiest = all
        .principals
        .iter()
        .find(|p| !p.starts_with("user:") && *p != "phylax-cli")
        .cloned()
        .unwrap_or_default();
    let t = Instant::now();
    let one = response::scope(
        &st,
        &inc.id,
        &scope::Who::Client(busiest.clone()),
        scope::Window::default(),
        &[],
        "bench",
    )
    .await?;
    let one_s = t.elapsed().as_secs_f64();
    response::step(
        &st,
        &inc.id,
        Step::Closed {
            by: "bench".into(),
            resolution: "benchmark".into(),
        },
    )
    .await?;
    let backend = if db.is_some() { "postgres" } else { "sqlite" };
    println!(
        "Incident scope ({backend}): audit log of {} records ({sealed} sealed, {pending} pending)",
        sealed + pending
    );
    println!("| step | seconds | records matched | individuals |");
    println!("|---|---:|---:|---:|");
    println!("| audit verify alone | {verify:.1} | | |");
    println!(
        "| scope, all principals | {all_s:.1} | {} | {} |",
        all.records, all.individuals
    );
    println!(
        "| scope, one client ({busiest}) | {one_s:.1} | {} | {} |",
        one.records, one.individuals
    );
    Ok(())
}
