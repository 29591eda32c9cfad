//! `phylax-bench`: measures Phylax the way a client sees it.
//!
//! # Layout
//! This file is the benchmark. It starts a real instance in a temporary directory (SQLite, or
//! PostgreSQL with `--database-url`), served over HTTPS on 127.0.0.1 with
//! TLS, token authentication, validation, encryption and the audit pipeline
//! all on, registers a SMART Backend Services client, gets a token, and
//! then runs each scenario at each concurrency for a fixed time, printing
//! requests/s and p50/p99 latency as a Markdown table. It also measures the
//! disk's fsync rate, which bounds durable writes.
//!
//! Client and server share the machine (and its cores): the numbers are a
//! floor, not a ceiling. See docs/PERFORMANCE.md.
//!
//!     cargo run --release -p phylax-bench -- --duration 10 --concurrency 1,8,32
//!
//! Modules: [`synth`], the Synthea-shaped synthetic patients loaded as
//! transaction Bundles for the search scenarios; [`keys`], the KEK
//! rotation benchmark (`--kek-rotation N`); [`backup`], a backup while
//! reads go on, then its verify and restore (`--backup`); [`scope`], an
//! incident's scope over the audit log (`--incident-scope`).

mod backup;
mod keys;
mod scope;
mod synth;

use anyhow::{bail, Context, Result};
use clap::Parser;
use phylax_server::instance::{InitOptions, Instance};
use phylax_server::{http::serve, state::AppState};
use rand::Rng;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Benchmark Phylax over HTTPS with authentication")]
struct Args {
    /// Seconds per scenario and concurrency.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Comma-separated concurrency levels.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Scenarios to run: read, create (a Patient), create-observation,
    /// update; with --patients also search-identifier, search-family,
    /// search-obs-code-date.
    #[arg(
        long,
        default_value = "read,create,create-observation,update",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// Benchmark against this PostgreSQL database instead of SQLite.
    #[arg(long, env = "PHYLAX_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Write the server's JSON logs (access log and audit lines) to this file,
    /// so that their cost is included. Without it, logging is off.
    #[arg(long)]
    log_file: Option<std::path::PathBuf>,
    /// Patients pre-loaded for the read and create-observation scenarios
    /// (only when one of them runs: with `--keep-instance`, every run
    /// would otherwise add them to the store, and their index entries
    /// set off autovacuum inside the measurement).
    #[arg(long, default_value_t = 2000)]
    preload: usize,
    /// Synthetic (Synthea-shaped) patients to load as transaction Bundles
    /// before the scenarios; ingest speed is reported. Needed by the
    /// search-* scenarios.
    #[arg(long, default_value_t = 0)]
    patients: usize,
    /// Encounters per synthetic patient (each with 6 Observations, and a
    /// Condition and MedicationRequest one time in three).
    #[arg(long, default_value_t = 4)]
    encounters: usize,
    /// Concurrent transactions while loading.
    #[arg(long, default_value_t = 8)]
    load_concurrency: usize,
    /// Seconds to wait after loading before measuring, so that background
    /// work the load set off (PostgreSQL's autovacuum, a WAL checkpoint)
    /// does not land inside the first measurement.
    #[arg(long, default_value_t = 0)]
    settle: u64,
    /// Measure without recording reads in the audit log (writes still
    /// record theirs), to compare with the default audited run. Only the
    /// benchmark can do this, and only when built with its `danger-bench`
    /// feature.
    #[cfg(feature = "danger-bench")]
    #[arg(long)]
    danger_no_audit: bool,
    /// Seconds to run each cell unmeasured before measuring it, so that
    /// the numbers are the steady state rather than the first touch of
    /// pages that are no longer cached (see docs/PERFORMANCE.md: this VM
    /// pages out file cache that has not been touched for a minute).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// The audit log's sealing interval (`[audit] checkpoint_secs`).
    #[arg(long, default_value_t = 10)]
    checkpoint_secs: u64,
    /// Keep the instance (its data directory and key) in this directory
    /// instead of a temporary one. If it already holds one from an earlier
    /// run with `--patients`, that instance and its loaded patients are
    /// used again and nothing is loaded: search experiments at 1M then
    /// take seconds instead of a load. Loaded data stays on disk: this is
    /// for benchmarking machines only.
    #[arg(long)]
    keep_instance: Option<std::path::PathBuf>,
    /// Instead of the HTTP scenarios: back the instance up (after
    /// `--patients` loading, or a `--keep-instance` one) while reads go
    /// on, then verify and restore the backup.
    #[arg(long)]
    backup: bool,
    /// Instead of the HTTP scenarios: time an incident's scope over the
    /// loaded instance's audit log (after `--patients` loading, or a
    /// `--keep-instance` one).
    #[arg(long)]
    incident_scope: bool,
    /// Instead of the HTTP scenarios: store this many data keys and time a
    /// KEK rotation that re-wraps them all.
    #[arg(long)]
    kek_rotation: Option<usize>,
    /// Instead of the HTTP scenarios: store this many resource versions,
    /// then measure reads and creates (`--duration` seconds each, at the
    /// first `--concurrency`) before and while a data-key rotation
    /// re-encrypts them all.
    #[arg(long)]
    data_key_rotation: Option<usize>,
    /// With --data-key-rotation: the rotation's `--max-rate` (versions
    /// per second; 0 for no limit; by default the backend's default,
    /// as in `phylax keys rotate`). With --backup: megabytes a second, as
    /// `phylax backup create --max-rate`.
    #[arg(long)]
    max_rate: Option<u32>,
    /// With --data-key-rotation: the control run, the same windows
    /// measured this many times with no rotation (what the store's growth
    /// alone does to the rates). With --backup: instead of a backup, this
    /// many windows with none (the noise of one window on this machine).
    #[arg(long)]
    control_windows: Option<usize>,
    /// With --kek-rotation: the KEK in this PKCS#11 module's token
    /// (--hsm-token, --hsm-pin-file) instead of a key file.
    #[arg(long)]
    hsm_module: Option<std::path::PathBuf>,
    #[arg(long)]
    hsm_token: Option<String>,
    #[arg(long)]
    hsm_pin_file: Option<std::path::PathBuf>,
}

/// Where the instance lives: a temporary directory removed at exit, or
/// one kept for later runs.
enum InstanceDir {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl InstanceDir {
    fn path(&self) -> &std::path::Path {
        match self {
            InstanceDir::Temp(t) => t.path(),
            InstanceDir::Kept(p) => p,
        }
    }

    /// The synthetic patients' ids saved by an earlier run, if any.
    fn saved_patients(&self) -> Result<Option<Vec<String>>> {
        let f = self.path().join("synthetic-ids.txt");
        match (self, std::fs::read_to_string(&f)) {
            (InstanceDir::Kept(_), Ok(text)) => Ok(Some(text.lines().map(str::to_owned).collect())),
            (InstanceDir::Kept(_), Err(e)) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot read {}", f.display()))
            }
            _ => Ok(None),
        }
    }

    fn save_patients(&self, ids: &[String]) -> Result<()> {
        if let InstanceDir::Kept(p) = self {
            std::fs::write(p.join("synthetic-ids.txt"), ids.join("\n"))?;
        }
        Ok(())
    }
}

struct Env {
    fhir: String,
    token: std::sync::RwLock<String>,
    client: reqwest::Client,
    base: String,
    client_id: String,
    key_pem: Vec<u8>,
}

impl Env {
    fn token(&self) -> String {
        self.token.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Tokens live at most 15 minutes; long loads fetch a new one.
    async fn refresh(&self) -> Result<()> {
        let t = fetch_token(&self.client, &self.base, &self.client_id, &self.key_pem).await?;
        if let Ok(mut w) = self.token.write() {
            *w = t;
        }
        Ok(())
    }
}

async fn fetch_token(
    client: &reqwest::Client,
    base: &str,
    client_id: &str,
    key_pem: &[u8],
) -> Result<String> {
    let assertion = phylax_auth::client_key::sign_assertion(
        key_pem,
        None,
        client_id,
        &format!("{base}/auth/token"),
        chrono::Utc::now().timestamp(),
    )?;
    let v: Value = client
        .post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.cruds"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await?
        .json()
        .await?;
    Ok(v["access_token"].as_str().context("no token")?.to_owned())
}

fn patient(i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": format!("BENCH-{i:08}")}],
        "name": [{"family": format!("Benchfamily{}", i % 997), "given": ["Synthetic", "Person"]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("19{:02}-{:02}-{:02}", 30 + i % 70, 1 + i % 12, 1 + i % 28),
        "telecom": [{"system": "phone", "value": format!("555-{:04}", i % 10_000)}],
        "address": [{"line": [format!("{} Example Street", i % 500)], "city": "Testville", "postalCode": "99999"}]
    })
}

fn fsync_rate() -> Result<f64> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("fsync"))?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        f.write_all(&[0u8; 512])?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn setup(
    db: Option<&str>,
    no_audit: bool,
    checkpoint_secs: u64,
    keep: Option<&std::path::Path>,
) -> Result<(Env, InstanceDir, tokio::sync::oneshot::Sender<()>)> {
    let dir = match keep {
        Some(p) => InstanceDir::Kept(p.to_owned()),
        None => InstanceDir::Temp(tempfile::tempdir()?),
    };
    let data = dir.path().join("data");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    if !data.exists() {
        Instance::init(&InitOptions {
            data_dir: data.clone(),
            key_file: Some(dir.path().join("keys/kek")),
            listen: addr.to_string(),
            public_url: None,
            database_url: db.map(str::to_owned),
            tls_names: vec![],
            hsm: None,
        })
        .await?;
    }
    let mut cfg = phylax_server::base::config::Config::load(&data)?;
    cfg.audit.checkpoint_secs = checkpoint_secs;
    // One client drives thousands of requests a second: the per-client
    // limit would measure the limiter, not the server.
    cfg.rate.client_per_minute = 0;
    cfg.rate.token_per_minute = 0;
    // A kept instance was made for an earlier run's port.
    cfg.listen = addr.to_string();
    cfg.public_url = format!("https://{addr}");
    cfg.save(&data)?;
    let inst = Instance::open(&data, db).await?;
    let tls = phylax_server::net::tls::server_config(&inst.cert_path(), &inst.config.tls.key)?;
    let ca = std::fs::read(inst.ca_path())?;
    let key = phylax_auth::client_key::generate()?;
    let client_id = uuid::Uuid::new_v4().to_string();
    inst.store
        .add_client(&phylax_store::ClientRecord {
            id: client_id.clone(),
            name: "bench".into(),
            scope: "system/*.cruds".into(),
            jwks: key.jwks.clone(),
            disabled: false,
            created_at: 0,
            redirect_uris: vec![],
            public: false,
            first_party: false,
            cert_bound: false,
        })
        .await?;
    let st = AppState::new(inst)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    #[cfg(feature = "danger-bench")]
    if no_audit {
        st.audit.danger_disable_for_benchmark();
    }
    #[cfg(not(feature = "danger-bench"))]
    let _ = no_audit;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = serve(st, listener, Some(tls), async {
            let _ = rx.await;
        })
        .await;
    });
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .http1_only()
        .pool_max_idle_per_host(1024)
        .build()?;
    let base = format!("https://{addr}");
    // The bench's own throwaway key, generated for this run only.
    let key_pem = key.private_pem.expose().to_vec();
    let token = fetch_token(&client, &base, &client_id, &key_pem).await?;
    Ok((
        Env {
            fhir: format!("{base}/fhir"),
            token: std::sync::RwLock::new(token),
            client,
            base,
            client_id,
            key_pem,
        },
        dir,
        tx,
    ))
}

fn observation(i: usize, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": format!("2024-{:02}-{:02}T10:00:00Z", 1 + i % 12, 1 + i % 28),
        "valueQuantity": {"value": 50 + (i % 50), "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}
    })
}

async fn create(env: &Env, body: &Value) -> Result<String> {
    create_typed(env, "Patient", body).await
}

async fn create_typed(env: &Env, rtype: &str, body: &Value) -> Result<String> {
    let r = env
        .client
        .post(format!("{}/{rtype}", env.fhir))
        .bearer_auth(env.token())
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await?;
    if r.status() != 201 {
        bail!("create: {}", r.status());
    }
    let v: Value = r.json().await?;
    Ok(v["id"].as_str().context("id")?.to_owned())
}

struct Outcome {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    /// CPU time per request in microseconds: the whole machine's and this
    /// process's (server and client) share of it; `None` without `/proc`.
    cpu_us: Option<(f64, f64)>,
}

/// Busy CPU time so far, in clock ticks: the whole machine's (user, nice,
/// system, irq and softirq from `/proc/stat`; not idle, I/O wait or
/// steal) and this process's (`utime + stime`). On this VM throughput
/// moves ±10% between identical runs; CPU per request moves less, so the
/// cells report both. `None` where `/proc` is not there.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let machine = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    let own = own_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some((machine, own))
}

/// `utime + stime` from a `/proc/<pid>/stat` line.
fn own_ticks(stat: &str) -> Option<u64> {
    // The fields after the command name, which is in parentheses and may
    // hold spaces and parentheses: the state (field 3) first, then utime
    // and stime (fields 14 and 15).
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let g: Vec<&str> = rest.split_whitespace().collect();
    Some(g.get(11)?.parse::<u64>().ok()? + g.get(12)?.parse::<u64>().ok()?)
}

/// Load `n` synthetic patients as transactions; returns their server ids
/// and the number of resources written.
async fn load_synthetic(
    env: Arc<Env>,
    n: usize,
    encounters: usize,
    conc: usize,
) -> Result<(Vec<String>, usize)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc.max(1) {
        let env = env.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut resources = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (bundle, count) = synth::patient_bundle(i, encounters);
                let body = bundle.to_string();
                let post = || {
                    env.client
                        .post(&env.fhir)
                        .bearer_auth(env.token())
                        .header("content-type", "application/fhir+json")
                        .header("prefer", "return=minimal")
                        .body(body.clone())
                        .send()
                };
                let mut r = post().await?;
                if r.status() == 401 {
                    env.refresh().await?;
                    r = post().await?;
                }
                if r.status() != 200 {
                    bail!("transaction {i}: {}", r.status());
                }
                let v: Value = r.json().await?;
                let loc = v["entry"][0]["response"]["location"]
                    .as_str()
                    .context("no location")?;
                let id = loc.split('/').nth(1).context("bad location")?.to_owned();
                out.push((i, id));
                resources += count;
            }
            Ok::<_, anyhow::Error>((out, resources))
        }));
    }
    let mut ids = vec![String::new(); n];
    let mut total = 0;
    for t in tasks {
        let (out, r) = t.await??;
        total += r;
        for (i, id) in out {
            ids[i] = id;
        }
    }
    Ok((ids, total))
}

/// What the client checks in a search answer. The resources themselves are
/// skipped, not built into a tree: the client shares the server's two
/// cores, and building a `Value` for every resource of every answer cost
/// it about a tenth of the machine in a profile of the family search.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(rename = "resourceType")]
    resource_type: String,
    total: Option<u64>,
    #[serde(default)]
    entry: Vec<serde::de::IgnoredAny>,
}

/// A search request and whether it answered 200 with a Bundle of at least
/// `min_entries` entries and, if given, the expected total.
async fn search_ok(env: &Env, url: String, want_total: Option<u64>, min_entries: usize) -> bool {
    match env.client.get(url).bearer_auth(env.token()).send().await {
        Ok(r) if r.status() == 200 => match r.bytes().await {
            Ok(b) => match serde_json::from_slice::<Answer>(&b) {
                Ok(a) => {
                    a.resource_type == "Bundle"
                        && a.entry.len() >= min_entries
                        && want_total.is_none_or(|w| a.total == Some(w))
                }
                Err(_) => false,
            },
            Err(_) => false,
        },
        _ => false,
    }
}

async fn run(
    env: Arc<Env>,
    scenario: &str,
    conc: usize,
    dur: Duration,
    ids: Arc<Vec<String>>,
    synthetic: Arc<Vec<String>>,
) -> Result<Outcome> {
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for w in 0..conc {
        let env = env.clone();
        let ids = ids.clone();
        let synthetic = synthetic.clone();
        let scenario = scenario.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = w * 1_000_000;
            // Each update worker owns one resource and keeps it current.
            let mut own: Option<(String, Value)> = None;
            if scenario == "update" {
                let body = patient(i);
                if let Ok(id) = create(&env, &body).await {
                    let mut b = body.clone();
                    b["id"] = json!(id);
                    own = Some((id, b));
                }
            }
            while Instant::now() < deadline {
                i += 1;
                let t = Instant::now();
                let ok = match scenario.as_str() {
                    "read" => {
                        let id = &ids[rand::thread_rng().gen_range(0..ids.len())];
                        match env
                            .client
                            .get(format!("{}/Patient/{id}", env.fhir))
                            .bearer_auth(env.token())
                            .send()
                            .await
                        {
                            Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                            Err(_) => false,
                        }
                    }
                    "create" => create(&env, &patient(i)).await.is_ok(),
                    "create-observation" => {
                        let subject = &ids[i % ids.len()];
                        create_typed(&env, "Observation", &observation(i, subject))
                            .await
                            .is_ok()
                    }
                    "update" => match &mut own {
                        Some((id, body)) => {
                            body["gender"] = json!(if i.is_multiple_of(2) {
                                "female"
                            } else {
                                "male"
                            });
                            match env
                                .client
                                .put(format!("{}/Patient/{id}", env.fhir))
                                .bearer_auth(env.token())
                                .header("content-type", "application/fhir+json")
                                .header("prefer", "return=minimal")
                                .body(body.to_string())
                                .send()
                                .await
                            {
                                Ok(r) => r.status() == 200,
                                Err(_) => false,
                            }
                        }
                        None => false,
                    },
                    "search-identifier" if !synthetic.is_empty() => {
                        let k = rand::thread_rng().gen_range(0..synthetic.len());
                        let url = format!(
                            "{}/Patient?identifier={}|{}",
                            env.fhir,
                            synth::MRN_SYSTEM,
                            synth::mrn(k)
                        );
                        search_ok(&env, url, Some(1), 1).await
                    }
                    "search-family" if !synthetic.is_empty() => {
                        let k = rand::thread_rng().gen_range(0..synthetic.len());
                        let prefix: String = synth::family(k).chars().take(6).collect();
                        let url = format!("{}/Patient?family={prefix}", env.fhir);
                        // Patient k matches its own family name's prefix.
                        search_ok(&env, url, None, 1).await
                    }
                    "search-obs-code-date" if !synthetic.is_empty() => {
                        let k = rand::thread_rng().gen_range(0..synthetic.len());
                        let url = match std::env::var("PHYLAX_BENCH_OBS_QUERY") {
                            // For experiments: `{id}` is the patient id.
                            Ok(q) => format!("{}/{}", env.fhir, q.replace("{id}", &synthetic[k])),
                            Err(_) => format!(
                                "{}/Observation?subject=Patient/{}&code=http://loinc.org|{}&date=ge2015-01-01&date=lt2030-01-01",
                                env.fhir,
                                synthetic[k],
                                synth::SEARCH_CODE
                            ),
                        };
                        search_ok(&env, url, None, 0).await
                    }
                    _ => false,
                };
                if ok {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let start = Instant::now();
    let cpu_before = cpu_ticks();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64().max(dur.as_secs_f64());
    let tick_us = 1e6 / rustix::param::clock_ticks_per_second() as f64;
    let cpu_us = match (cpu_before, cpu_ticks()) {
        (Some((m0, p0)), Some((m1, p1))) if !all.is_empty() => {
            let per = |t: u64| t as f64 * tick_us / all.len() as f64;
            Some((per(m1.saturating_sub(m0)), per(p1.saturating_sub(p0))))
        }
        _ => None,
    };
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    Ok(Outcome {
        rps: all.len() as f64 / secs,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
        cpu_us,
    })
}

/// The allocator the `phylax` binary uses, so that the numbers are those
/// of what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.data_key_rotation {
        let conc = args.concurrency.first().copied().unwrap_or(8);
        return keys::data_key_rotation(
            n,
            args.database_url.as_deref(),
            args.duration,
            conc,
            args.max_rate,
            args.control_windows,
        )
        .await;
    }
    if let Some(n) = args.kek_rotation {
        let hsm = match (&args.hsm_module, &args.hsm_token, &args.hsm_pin_file) {
            (Some(m), Some(t), Some(p)) => Some(phylax_server::base::config::HsmSettings {
                module: m.clone(),
                token: t.clone(),
                pin_file: Some(std::path::absolute(p)?),
                pin_env: None,
                key_label: format!("bench-{}", uuid::Uuid::new_v4().simple()),
            }),
            (None, None, None) => None,
            _ => bail!("--hsm-module, --hsm-token and --hsm-pin-file go together"),
        };
        return keys::kek_rotation(n, args.database_url.as_deref(), hsm).await;
    }
    if let Some(path) = &args.log_file {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::sync::Mutex::new(std::io::BufWriter::new(f)))
            .init();
    }
    let fsync = fsync_rate()?;
    let (env, dir, _stop) = setup(
        args.database_url.as_deref(),
        danger_no_audit(&args),
        args.checkpoint_secs,
        args.keep_instance.as_deref(),
    )
    .await?;
    let env = Arc::new(env);
    let needs_ids = args
        .scenarios
        .iter()
        .any(|s| s == "read" || s == "create-observation");
    let preload = if needs_ids { args.preload } else { 0 };
    if needs_ids && preload == 0 {
        bail!("--preload must be at least 1 for the read and create-observation scenarios");
    }
    let mut ids = Vec::with_capacity(preload);
    for i in 0..preload {
        ids.push(create(&env, &patient(i)).await?);
    }
    let ids = Arc::new(ids);
    let mut ingest = None;
    let synthetic = if let Some(saved) = dir.saved_patients()? {
        saved
    } else if args.patients > 0 {
        let t = Instant::now();
        let (s, resources) = load_synthetic(
            env.clone(),
            args.patients,
            args.encounters,
            args.load_concurrency,
        )
        .await?;
        ingest = Some((resources, t.elapsed().as_secs_f64()));
        dir.save_patients(&s)?;
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        env.refresh().await?;
        s
    } else {
        Vec::new()
    };
    let synthetic = Arc::new(synthetic);
    if args.incident_scope {
        if let Some((n, t)) = ingest {
            println!("loaded {n} resources in {t:.0} s");
        }
        return scope::incident_scope(dir.path(), args.database_url.as_deref()).await;
    }
    if args.backup {
        let conc = args.concurrency.first().copied().unwrap_or(8);
        if let Some((n, t)) = ingest {
            println!("loaded {n} resources in {t:.0} s");
        }
        return backup::backup(
            env,
            dir.path(),
            args.database_url.as_deref(),
            ids,
            (args.duration, conc),
            args.max_rate,
            args.control_windows,
        )
        .await;
    }
    println!(
        "Phylax benchmark: backend {}, {} cores, fsync rate {:.0}/s, {} s per cell after {} s of warm-up, logging {}",
        if args.database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fsync,
        args.duration,
        args.warmup,
        if args.log_file.is_some() {
            "on (JSON to file)"
        } else {
            "off"
        }
    );
    if let Some((resources, secs)) = ingest {
        println!(
            "Ingest: {} synthetic patients, {resources} resources as transactions ({} concurrent) in {secs:.1} s: {:.0} resources/s",
            args.patients,
            args.load_concurrency,
            resources as f64 / secs
        );
    }
    println!();
    println!(
        "| scenario | concurrency | requests/s | p50 ms | p99 ms | errors | CPU µs/req | of which this process |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in &args.scenarios {
        for &c in &args.concurrency {
            if args.warmup > 0 {
                run(
                    env.clone(),
                    s,
                    c,
                    Duration::from_secs(args.warmup),
                    ids.clone(),
                    synthetic.clone(),
                )
                .await?;
            }
            let o = run(
                env.clone(),
                s,
                c,
                Duration::from_secs(args.duration),
                ids.clone(),
                synthetic.clone(),
            )
            .await?;
            let (cpu, own) = match o.cpu_us {
                Some((m, p)) => (format!("{m:.0}"), format!("{p:.0}")),
                None => ("–".to_owned(), "–".to_owned()),
            };
            println!(
                "| {s} | {c} | {:.0} | {:.2} | {:.2} | {} | {cpu} | {own} |",
                o.rps, o.p50, o.p99, o.errors
            );
        }
    }
    Ok(())
}

/// `--danger-no-audit`, which exists only with the `danger-bench` feature.
fn danger_no_audit(args: &Args) -> bool {
    #[cfg(feature = "danger-bench")]
    {
        args.danger_no_audit
    }
    #[cfg(not(feature = "danger-bench"))]
    {
        let _ = args;
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    #[test]
    fn own_ticks_reads_utime_and_stime_after_the_command_name() {
        let line = "4242 (tokio (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 17 5 0 0 20 0 9 0";
        assert_eq!(super::own_ticks(line), Some(22));
        assert_eq!(super::own_ticks("4242 (cut"), None);
        assert_eq!(super::own_ticks("4242 (x) S 1 2"), None);
    }

    #[test]
    fn cpu_ticks_count_this_process() {
        let (_, p0) = super::cpu_ticks().unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let (_, p1) = super::cpu_ticks().unwrap();
        assert!(p1 > p0, "100 ms of work shows in the process's ticks");
    }
}
