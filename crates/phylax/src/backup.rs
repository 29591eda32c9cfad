//! `phylax backup create|verify|drill` and `phylax restore`
//! (docs/BACKUP.md).

use crate::InstanceArgs;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use phylax_audit::checkpoint::VerifierKey;
use phylax_crypto::archive::Identities;
use phylax_server::backup::{create, drill, restore};
use phylax_server::instance::Instance;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back the instance up while it serves: a consistent snapshot of the
    /// database, the configuration, the TLS certificates, the audit
    /// journal and newest checkpoint, in one age-encrypted archive with a
    /// signed manifest. The KEK is never inside.
    Create {
        #[command(flatten)]
        inst: InstanceArgs,
        /// The file to write (must not exist), or a directory to write
        /// `phylax-<time>.age` in; default: `[backup] dir`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// An age X25519 recipient (`age1…`) who can decrypt the archive;
        /// repeat for several.
        #[arg(long = "recipient", value_name = "AGE_RECIPIENT")]
        recipients: Vec<String>,
        /// A file of recipients, one per line (`#` comments allowed).
        #[arg(long)]
        recipients_file: Option<PathBuf>,
        /// Read and write at most this many megabytes a second (0: no
        /// limit); default `[backup] max_mb_per_sec` (40), which keeps the
        /// servers' throughput while the backup runs.
        #[arg(long, value_name = "MB_PER_SEC")]
        max_rate: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Check a backup without restoring it: it decrypts to its end, its
    /// manifest's signature, every file's SHA-256, the audit tree against
    /// its signed checkpoint and any outside checkpoint.
    Verify {
        /// The archive.
        path: PathBuf,
        #[command(flatten)]
        check: CheckArgs,
        #[arg(long)]
        json: bool,
    },
    /// Prove an instance as a restore does: its audit log verifies and
    /// agrees with the outside checkpoints, every stored version decrypts.
    /// For a database brought back by PostgreSQL's own point-in-time
    /// recovery (docs/BACKUP.md).
    Check {
        #[command(flatten)]
        inst: InstanceArgs,
        /// More outside checkpoints (`[audit] checkpoint_file` is read
        /// anyway); repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// A restore drill: restore the newest backup (or --from) into a
    /// scratch place, prove it, time it, record the result in the audit
    /// log and the metrics, and throw the copy away.
    Drill {
        #[command(flatten)]
        inst: InstanceArgs,
        /// An age identity file (`age-keygen` output, mode 0600).
        #[arg(long)]
        identity: PathBuf,
        /// The backup to drill (default: the newest this instance recorded,
        /// in `[backup] dir` when set).
        #[arg(long)]
        from: Option<PathBuf>,
        /// PostgreSQL: an empty schema, named as the instance's, in another
        /// database, to restore into (emptied afterwards).
        #[arg(long, env = "PHYLAX_SCRATCH_DATABASE_URL", hide_env_values = true)]
        scratch_database_url: Option<String>,
        /// Drill a backup of another instance.
        #[arg(long)]
        other_instance: bool,
        #[arg(long)]
        json: bool,
    },
}

/// What a backup's signature and audit tree are checked against.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// An age identity file (`age-keygen` output, mode 0600).
    #[arg(long)]
    identity: PathBuf,
    /// A checkpoint verifier key the manifest must be signed by (`phylax
    /// audit key`); repeat for retired ones. Without it, any key is
    /// accepted and named.
    #[arg(long = "key", value_name = "VERIFIER_KEY")]
    keys: Vec<String>,
    /// A checkpoint saved outside the database (`[audit]
    /// checkpoint_file`, or one published elsewhere); repeatable.
    #[arg(long = "checkpoint", value_name = "FILE")]
    checkpoints: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The archive.
    #[arg(long)]
    from: PathBuf,
    #[command(flatten)]
    check: CheckArgs,
    /// The new data directory (absent or empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// PostgreSQL: the database to restore into (an empty schema named as
    /// the backup's).
    #[arg(long, env = "PHYLAX_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The KEK: the instance's key file, or one recovered from its escrow
    /// (or set PHYLAX_KEK, or name its HSM with the --hsm-* options).
    /// Never taken from the archive.
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    hsm: crate::keys::HsmArgs,
    /// A data directory whose erasure register to re-apply (the live
    /// instance, when restoring an older backup beside it).
    #[arg(long)]
    erasures_from: Option<PathBuf>,
    /// PostgreSQL: the live instance's database, for --erasures-from.
    #[arg(long, requires = "erasures_from", hide_env_values = true)]
    erasures_database_url: Option<String>,
    /// Restore although the KEK belongs to another instance's data
    /// directory.
    #[arg(long)]
    other_instance: bool,
    #[arg(long)]
    json: bool,
}

/// The age identities in `path`, refused unless only its owner can read
/// it (it opens every backup encrypted to it).
fn identities(path: &Path) -> Result<Identities> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} must not be readable by group or others (chmod 600): it opens every backup encrypted to it",
            path.display()
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
    );
    Ok(Identities::parse(&text)?)
}

impl CheckArgs {
    fn trust(&self) -> Result<Vec<VerifierKey>> {
        self.keys
            .iter()
            .map(|k| {
                VerifierKey::parse(k).map_err(|_| {
                    anyhow::anyhow!("--key is not a verifier key (`phylax audit key` prints one)")
                })
            })
            .collect()
    }

    fn outside(&self) -> Result<Vec<String>> {
        self.checkpoints
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
            })
            .collect()
    }
}

/// Progress on a terminal as a bar; otherwise, once the work has taken
/// ten seconds, a line on stderr at each new step and at most every ten
/// seconds (the log of a scheduled job). Short work prints nothing, so a
/// failure stays one line.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last: parking_lot::Mutex<(String, std::time::Instant)>,
}

impl Reporter {
    fn new() -> Reporter {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        });
        Reporter {
            bar,
            started: std::time::Instant::now(),
            last: parking_lot::Mutex::new((String::new(), std::time::Instant::now())),
        }
    }

    fn report(&self, step: &str, done: u64, total: u64) {
        if let Some(pb) = &self.bar {
            pb.set_message(step.to_owned());
            pb.set_length(total);
            pb.set_position(done);
            return;
        }
        let every = std::time::Duration::from_secs(10);
        if self.started.elapsed() < every {
            return;
        }
        let mut last = self.last.lock();
        if last.0 != step || last.1.elapsed() >= std::time::Duration::from_secs(10) {
            if total > 0 {
                eprintln!("progress: {step}: {done} of {total}");
            } else {
                eprintln!("progress: {step}");
            }
            *last = (step.to_owned(), std::time::Instant::now());
        }
    }

    fn done(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

/// An outside checkpoint's size in words (`u64::MAX`: signed by a
/// checkpoint key newer than the log, so its size is not checked).
fn records(size: u64) -> String {
    if size == u64::MAX {
        "a later checkpoint key".into()
    } else {
        format!("{size} records")
    }
}

fn print_json(v: impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Where `create` writes: the file named, or a new name in the directory.
fn out_path(out: Option<PathBuf>, i: &Instance) -> Result<PathBuf> {
    let out = match out.or_else(|| i.config.backup.dir.as_ref().map(|d| i.data_dir.join(d))) {
        Some(o) => o,
        None => bail!("name the file with --out, or set [backup] dir in phylax.toml"),
    };
    if out.is_dir() {
        let t = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        return Ok(out.join(format!("phylax-{t}.age")));
    }
    Ok(out)
}

/// A warning line when the newest drill is older than the interval.
async fn drill_warning(i: &Instance) -> Option<String> {
    let last = drill::last_drill(&i.store).await.ok()?;
    let days = i.config.backup.drill_interval_days;
    let now = phylax_server::base::clock::now_ms();
    match last {
        None => Some(format!("warning: no restore drill has run; run `phylax backup drill` (at least every {days} days)")),
        Some(d) if now - d.at_ms > i64::from(days) * 86_400_000 => Some(format!(
            "warning: the last restore drill is older than {days} days; run `phylax backup drill`"
        )),
        Some(d) if !d.ok => Some("warning: the last restore drill FAILED; see `phylax audit` and fix it".into()),
        _ => None,
    }
}

pub async fn backup_cmd(c: BackupCmd) -> Result<()> {
    match c {
        BackupCmd::Create {
            inst,
            out,
            recipients,
            recipients_file,
            max_rate,
            json,
        } => {
            let to = crate::keys::recipients_from(recipients, recipients_file.as_deref())?;
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let out = out_path(out, &i)?;
            let r = Reporter::new();
            let rate = match max_rate {
                Some(0) => None,
                Some(mb) => Some(u64::from(mb) << 20),
                None => i.config.backup.max_rate(),
            };
            let res =
                create::create((&i).into(), &to, &out, rate, &|s, d, t| r.report(s, d, t)).await;
            r.done();
            let c = res?;
            let warning = drill_warning(&i).await;
            if json {
                return print_json(serde_json::json!({"backup": c, "warning": warning}));
            }
            println!(
                "backup {} written to {} ({} bytes, {:.1} s): {} resources, {} versions, {} audit records; encrypted to {} age recipient(s)",
                c.backup_id, c.file, c.bytes, c.seconds, c.resources, c.versions, c.audit_records, c.recipients
            );
            if let Some(w) = warning {
                eprintln!("{w}");
            }
            Ok(())
        }
        BackupCmd::Verify { path, check, json } => {
            let ids = identities(&check.identity)?;
            let (trust, outside) = (check.trust()?, check.outside()?);
            let r = Reporter::new();
            let res = restore::verify(&path, &ids, &trust, &outside, &|s, d, t| r.report(s, d, t));
            r.done();
            let c = res?;
            let m = &c.manifest;
            let newer = c.outside.iter().filter(|(_, ok)| ok.is_none()).count();
            if json {
                return print_json(serde_json::json!({
                    "ok": true,
                    "backup_id": m.backup_id,
                    "instance_id": m.instance_id,
                    "created_ms": m.created_ms,
                    "backend": m.backend,
                    "schema_version": m.schema_version,
                    "resources": m.resources,
                    "versions": m.versions,
                    "audit_records": m.audit_records,
                    "audit_tree_size": m.tree_size,
                    "files": m.files.len(),
                    "signed_by": c.signer.encode(),
                    "signer_trusted": !trust.is_empty(),
                    "outside_checkpoints_matched": c.outside.len() - newer,
                    "outside_checkpoints_newer": newer,
                }));
            }
            println!("instance {}", m.instance_id);
            println!(
                "backup {} OK: {} files match the signed manifest; {} resources, {} versions, {} audit records (tree of {} verified against its signed checkpoint); taken {}",
                m.backup_id,
                m.files.len(),
                m.resources,
                m.versions,
                m.audit_records,
                m.tree_size,
                phylax_server::base::clock::format_instant(m.created_ms)
            );
            println!(
                "signed by {}{}",
                c.signer.encode(),
                if trust.is_empty() {
                    " (not checked against a trusted key: pass --key from `phylax audit key`)"
                } else {
                    " (trusted)"
                }
            );
            for (size, ok) in &c.outside {
                match ok {
                    Some(_) => println!("outside checkpoint of {size} records: consistent"),
                    None => println!("outside checkpoint of {}: newer than this backup (records after it are not in it)", records(*size)),
                }
            }
            Ok(())
        }
        BackupCmd::Check {
            inst,
            checkpoints,
            json,
        } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let mut notes = Vec::new();
            if let Some(f) = &i.config.audit.checkpoint_file {
                if let Ok(n) = std::fs::read_to_string(i.data_dir.join(f)) {
                    notes.push(n);
                }
            }
            for p in &checkpoints {
                notes.push(
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
                );
            }
            let r = Reporter::new();
            let res = restore::check(&i, &notes, &|s, d, t| r.report(s, d, t)).await;
            r.done();
            let c = res?;
            if json {
                return print_json(&c);
            }
            println!(
                "instance OK: {} versions decrypted; audit log verified ({} records, {} sealed, {} checkpoints); {} outside checkpoint(s) consistent",
                c.versions_decrypted,
                c.audit_records,
                c.audit_sealed,
                c.audit_checkpoints,
                c.outside_consistent.len()
            );
            for n in &c.outside_newer {
                println!("the outside checkpoint of {} is newer than this log: the records after the recovery point are not in it", records(*n));
            }
            Ok(())
        }
        BackupCmd::Drill {
            inst,
            identity,
            from,
            scratch_database_url,
            other_instance,
            json,
        } => {
            let ids = identities(&identity)?;
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let (from, expect) = match from {
                Some(f) => (f, None),
                // The newest backup the instance recorded (in `[backup]
                // dir`, when set): never a file someone else put there,
                // and it must still be the archive recorded.
                None => {
                    let dir = i.config.backup.dir.as_ref().map(|d| i.data_dir.join(d));
                    let r = drill::newest_backup(&i.store, dir.as_deref()).await?;
                    (PathBuf::from(r.file), Some(r.id))
                }
            };
            if i.store.backend() == "postgres" && scratch_database_url.is_none() {
                bail!("a PostgreSQL drill needs --scratch-database-url: an empty schema, named as the instance's, in another database");
            }
            let r = Reporter::new();
            let res = drill::drill(
                &i,
                drill::DrillOptions {
                    from: &from,
                    ids: &ids,
                    scratch_url: scratch_database_url.as_deref(),
                    other_instance,
                    expect: expect.as_deref(),
                },
                &|s, d, t| r.report(s, d, t),
            )
            .await;
            r.done();
            let d = res?;
            if json {
                return print_json(&d);
            }
            let rec = &d.record;
            println!(
                "restore drill PASSED: {} restored and proven in {:.1} s (RTO); the backup was {:.0} s old (RPO at this moment)",
                from.display(),
                rec.rto_secs,
                rec.rpo_secs
            );
            if let Some(r) = &d.restored {
                println!(
                    "  {} versions decrypted, {} audit records verified, {} erasure(s) re-applied",
                    r.versions_decrypted,
                    r.audit_records,
                    r.erasures_reapplied.len()
                );
            }
            Ok(())
        }
    }
}

pub async fn restore_cmd(a: RestoreArgs) -> Result<()> {
    let ids = identities(&a.check.identity)?;
    let (trust, outside) = (a.check.trust()?, a.check.outside()?);
    let erasures = match &a.erasures_from {
        Some(live) => {
            let i = Instance::open(live, a.erasures_database_url.as_deref()).await?;
            create::erased_patients(&i.store).await?
        }
        None => Vec::new(),
    };
    let hsm = a.hsm.settings()?;
    if hsm.is_some() && a.hsm.key_label.is_none() {
        bail!("--hsm-key-label: the instance's KEK label (`key_label` in its [hsm] settings)");
    }
    let kek = match (&a.key_file, &hsm, std::env::var_os("PHYLAX_KEK").is_some()) {
        (Some(k), None, false) => restore::KekFrom::KeyFile(k),
        (None, Some(h), false) => restore::KekFrom::Hsm(h),
        (None, None, true) => restore::KekFrom::Environment,
        (None, None, false) => bail!(
            "name the KEK: --key-file FILE (the instance's, or recovered from its escrow), PHYLAX_KEK, or the --hsm-* options; it is never taken from the archive"
        ),
        _ => bail!("name the KEK once: --key-file, PHYLAX_KEK or the --hsm-* options"),
    };
    let r = Reporter::new();
    let res = restore::restore(
        restore::RestoreOptions {
            from: &a.from,
            ids: &ids,
            data_dir: &a.data_dir,
            database_url: a.database_url.as_deref(),
            kek,
            trust: &trust,
            outside: &outside,
            other_instance: a.other_instance,
            erasures: &erasures,
            scratch: false,
        },
        &|s, d, t| r.report(s, d, t),
    )
    .await;
    r.done();
    let x = res?;
    if a.json {
        return print_json(&x);
    }
    println!(
        "restored backup {} of instance {} (taken {}, signed by {}) into {} in {:.1} s: {} versions decrypted, audit log verified ({} records, {} checkpoints)",
        x.backup_id,
        x.instance_id,
        phylax_server::base::clock::format_instant(x.backup_created_ms),
        x.signed_by,
        x.data_dir,
        x.seconds,
        x.versions_decrypted,
        x.audit_records,
        x.audit_checkpoints_verified
    );
    for (size, ok) in &x.outside_checkpoints {
        if ok.is_none() {
            println!("  the outside checkpoint of {} is newer than this backup: the records after the backup are not in it", records(*size));
        }
    }
    if !x.erasures_reapplied.is_empty() {
        println!("  erasures re-applied: {}", x.erasures_reapplied.len());
    }
    for w in &x.warnings {
        eprintln!("warning: {w}");
    }
    if x.tls_reissued {
        println!("  the TLS key was not at its configured path: a new local CA and server certificate were issued (clients must trust the new tls/ca.pem)");
    }
    Ok(())
}
