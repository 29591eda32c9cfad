//! `phylax keys …` and `phylax patient …`: key status, rotation, moving
//! the KEK into an HSM, crypto-shredding a patient, legal holds
//! (docs/KEYS.md).

use crate::{admin_audit, InstanceArgs};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use phylax_audit::event::Action;
use phylax_server::base::config::HsmSettings;
use phylax_server::instance::Instance;
use phylax_server::keys::KeyAdmin;
use std::path::PathBuf;
use std::time::Duration;

/// How long every node gets to notice a key event (they look each second).
const GRACE: Duration = Duration::from_secs(3);

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Every key: what it protects, how old it is, when rotation is due;
    /// every KEK generation with its provider.
    Status {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Rotate keys while the servers keep serving.
    Rotate {
        #[command(flatten)]
        inst: InstanceArgs,
        /// The KEK: a new generation (in the HSM, or the key file), every
        /// stored key re-wrapped under it, the old generations destroyed.
        #[arg(long)]
        kek: bool,
        /// The id_token signing key: a new key signs, the old one stays in
        /// the JWKS so issued tokens verify.
        #[arg(long)]
        signing: bool,
        /// The access-token MAC key: servers issue with the new key within
        /// a second; tokens MACed with the previous one verify until they
        /// expire (at most 15 minutes).
        #[arg(long)]
        tokens: bool,
        /// The search index key: every current resource is indexed again
        /// under a new key while searches keep working (they look under
        /// both keys until the rebuild is done), then the old key is deleted.
        #[arg(long)]
        index: bool,
        /// The paging-cursor keys: servers issue cursors under the new
        /// ones within a second; cursors issued before still open (until
        /// the next rotation).
        #[arg(long)]
        cursors: bool,
        /// The audit-log checkpoint key: servers sign with the new one
        /// within a second; the old private key is destroyed, its public
        /// half kept so older checkpoints still verify. Give outside
        /// verifiers the new verifier key it prints.
        #[arg(long)]
        checkpoint: bool,
        /// The sign-in key (hashes of grants, recovery codes, enrollment
        /// links, usernames, CSRF tags): servers hash under the new
        /// generation within a second and keep accepting the older ones;
        /// usernames are re-hashed (progress bar); older generations are
        /// deleted once nothing depends on them (else `keys retire` later).
        #[arg(long)]
        sign_in: bool,
        /// The data keys: a new generation of every patient's (and the
        /// tenant's, the accounts' and the grants') data key; every
        /// resource version, account and live grant is re-encrypted under
        /// it in the background (progress bar) while the servers keep
        /// serving, then the older keys are deleted.
        #[arg(long)]
        data_keys: bool,
        /// With --data-keys: re-encrypt at most this many versions per
        /// second (on top of the rest after each page); 0 for no limit.
        /// Default: 600 on PostgreSQL, none on SQLite (docs/KEYS.md).
        #[arg(long, value_name = "VERSIONS_PER_SEC")]
        max_rate: Option<u32>,
        /// Every rotation available.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete older key generations nothing depends on any more (the
    /// sign-in key's: kept while grants, recovery codes or enrollment
    /// links made under them can still be used); list what keeps the rest.
    Retire {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write the KEK, encrypted with age to each custodian's recipient
    /// (`age1…`; any one of them recovers it with `age -d -i ID FILE`),
    /// to a new file kept apart from the instance and its backups.
    Escrow {
        #[command(flatten)]
        inst: InstanceArgs,
        /// An age X25519 recipient (`age1…`); repeat for several custodians.
        #[arg(long = "recipient", value_name = "AGE_RECIPIENT")]
        recipients: Vec<String>,
        /// A file of recipients, one per line (`#` comments allowed).
        #[arg(long)]
        recipients_file: Option<PathBuf>,
        /// The file to write; must not exist.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Move the KEK from the key file (or PHYLAX_KEK) into a PKCS#11 HSM.
    /// Stop the servers first; start them again afterwards.
    MoveKek {
        #[command(flatten)]
        inst: InstanceArgs,
        /// Required: the destination is an HSM.
        #[arg(long)]
        to_hsm: bool,
        #[command(flatten)]
        hsm: HsmArgs,
        #[arg(long)]
        json: bool,
    },
    /// Add a new id_token signing key (the same as `rotate --signing`).
    RotateSigning {
        #[command(flatten)]
        inst: InstanceArgs,
    },
}

/// Where the KEK is kept in an HSM. The PIN is read from a file or an
/// environment variable, never given on the command line.
#[derive(Args, Debug, Clone)]
pub struct HsmArgs {
    /// The PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long = "hsm-module")]
    pub module: Option<PathBuf>,
    /// The token's label.
    #[arg(long = "hsm-token")]
    pub token: Option<String>,
    /// A file (mode 0600) holding the user PIN.
    #[arg(long = "hsm-pin-file")]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[arg(long = "hsm-pin-env")]
    pub pin_env: Option<String>,
    /// KEK generations are key objects labelled LABEL-N. Default: a label
    /// of this instance's own (`phylax-kek-` and 8 random hex digits), so
    /// that two instances on one token never share (or retire) each
    /// other's KEK.
    #[arg(long = "hsm-key-label")]
    pub key_label: Option<String>,
}

impl HsmArgs {
    /// The `[hsm]` settings, if any HSM option was given.
    pub fn settings(&self) -> Result<Option<HsmSettings>> {
        let (Some(module), Some(token)) = (&self.module, &self.token) else {
            if self.module.is_some()
                || self.token.is_some()
                || self.pin_file.is_some()
                || self.pin_env.is_some()
            {
                bail!("an HSM needs --hsm-module and --hsm-token, and --hsm-pin-file or --hsm-pin-env");
            }
            return Ok(None);
        };
        if self.pin_file.is_some() == self.pin_env.is_some() {
            bail!("give exactly one of --hsm-pin-file and --hsm-pin-env");
        }
        Ok(Some(HsmSettings {
            module: std::path::absolute(module)?,
            token: token.clone(),
            pin_file: self
                .pin_file
                .as_deref()
                .map(std::path::absolute)
                .transpose()?,
            pin_env: self.pin_env.clone(),
            key_label: match &self.key_label {
                Some(l) if l.is_empty() || l.len() > 64 => {
                    bail!("--hsm-key-label must be 1–64 characters")
                }
                Some(l) => l.clone(),
                None => format!(
                    "phylax-kek-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
            },
        }))
    }
}

#[derive(Subcommand, Debug)]
pub enum PatientCmd {
    /// Crypto-shred a patient (GDPR Art. 17): destroy the compartment's
    /// data key and every version sealed under it, then rotate the KEK so
    /// copies from before the erasure cannot be read either.
    Erase {
        #[command(flatten)]
        inst: InstanceArgs,
        /// The Patient's id.
        #[arg(long)]
        id: String,
        /// Why (recorded in the audit log; no PHI).
        #[arg(long)]
        reason: String,
        /// Erase although the patient has records inside the retention
        /// period ([keys] retention_years), once the legal basis is checked.
        #[arg(long)]
        override_retention: bool,
        #[arg(long)]
        json: bool,
    },
    /// Place (or with --release, lift) a legal hold: erasure is refused
    /// while it holds.
    Hold {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        release: bool,
    },
    /// The patients under legal hold.
    Holds {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn progress_bar(what: &'static str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what);
    pb
}

/// What a long key operation reports its progress (done, total) to.
pub(crate) fn on_progress(pb: &indicatif::ProgressBar) -> impl Fn(u64, u64) + Sync + '_ {
    move |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    }
}

/// age recipients from `--recipient` and a `--recipients-file` (one per
/// line, `#` comments allowed), as the escrow and backups take them.
pub fn recipients_from(
    mut lines: Vec<String>,
    file: Option<&std::path::Path>,
) -> Result<phylax_crypto::kek::Recipients> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
        lines.extend(text.lines().map(str::to_owned));
    }
    Ok(phylax_crypto::kek::Recipients::parse(
        lines.iter().map(String::as_str),
    )?)
}

async fn open(inst: &InstanceArgs) -> Result<Instance> {
    Ok(Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?)
}

fn print_json(v: impl Into<serde_json::Value>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v.into())?);
    Ok(())
}

fn day(secs: i64) -> String {
    phylax_server::base::clock::format_instant(secs * 1000)
        .chars()
        .take(10)
        .collect()
}

pub async fn keys_cmd(c: KeysCmd) -> Result<()> {
    match c {
        KeysCmd::Status { inst, json } => {
            let i = open(&inst).await?;
            let st = KeyAdmin::of(&i, GRACE)
                .status(i.config.keys.max_age_days)
                .await?;
            if json {
                return print_json(serde_json::to_value(&st)?);
            }
            println!("KEK (maximum age {} days):", st.max_age_days);
            for g in &st.kek {
                println!(
                    "  generation {}{}  {:<7} added {}  wraps {} keys{}",
                    g.generation,
                    if g.current { " (current)" } else { "" },
                    g.provider,
                    g.added.map(day).unwrap_or_else(|| "unknown".into()),
                    g.wraps,
                    if g.overdue { "  ROTATION DUE" } else { "" }
                );
            }
            println!("Keys:");
            for k in &st.keys {
                println!(
                    "  {:<11} {:<18} {:>8} key(s)  oldest {}  due {}{}  — {}",
                    k.kind,
                    k.id,
                    k.count,
                    day(k.created),
                    day(k.rotation_due),
                    if k.overdue { " OVERDUE" } else { "" },
                    k.protects
                );
            }
            Ok(())
        }
        KeysCmd::Rotate {
            inst,
            kek,
            signing,
            tokens,
            index,
            cursors,
            checkpoint,
            sign_in,
            data_keys,
            max_rate,
            all,
            json,
        } => {
            if max_rate.is_some() && !(data_keys || all) {
                bail!("--max-rate applies to --data-keys");
            }
            if !(kek
                || signing
                || tokens
                || index
                || cursors
                || checkpoint
                || sign_in
                || data_keys
                || all)
            {
                bail!(
                    "name what to rotate: --kek, --data-keys, --signing, --tokens, --index, --cursors, --checkpoint, --sign-in or --all"
                );
            }
            let i = open(&inst).await?;
            let mut out = serde_json::Map::new();
            if signing || all {
                let kid = rotate_signing(&i).await?;
                out.insert("signing".into(), serde_json::json!({ "kid": kid }));
                if !json {
                    println!("signing: new key {kid}; nodes switch to it within seconds");
                }
            }
            if tokens || all {
                let r = KeyAdmin::of(&i, GRACE).rotate_tokens().await?;
                if !json {
                    println!(
                        "tokens: new key {}; tokens from the previous key verify until {}",
                        r.key,
                        phylax_server::base::clock::format_instant(r.previous_valid_until * 1000)
                    );
                }
                out.insert("tokens".into(), serde_json::to_value(&r)?);
            }
            if cursors || all {
                let r = KeyAdmin::of(&i, GRACE).rotate_cursors().await?;
                if !json {
                    println!(
                        "cursors: generation {}; cursors issued before still open; retired {:?}",
                        r.generation, r.retired
                    );
                }
                out.insert("cursors".into(), serde_json::to_value(&r)?);
            }
            if checkpoint || all {
                let r = KeyAdmin::of(&i, GRACE).rotate_checkpoint().await?;
                if !json {
                    println!(
                        "checkpoint: generation {} signs; verifier key {} (give it to outside verifiers); private keys destroyed: {:?}",
                        r.generation, r.verifier_key, r.retired
                    );
                }
                out.insert("checkpoint".into(), serde_json::to_value(&r)?);
            }
            if data_keys || all {
                let admin = KeyAdmin::of(&i, GRACE).with_max_rate(max_rate);
                let pb = progress_bar("re-encrypting");
                // Say why a PostgreSQL rotation goes no faster.
                if let Some(rate) = admin.max_rate {
                    pb.set_message(format!("re-encrypting (at most {rate}/s; --max-rate)"));
                }
                let r = admin.rotate_data_keys(&on_progress(&pb)).await;
                pb.finish_and_clear();
                let r = r?;
                if !json {
                    println!(
                        "data keys: generation {}; {} versions and {} accounts re-encrypted, {} live grants on it; {} older keys deleted",
                        r.generation, r.resealed, r.accounts, r.grants, r.retired
                    );
                }
                out.insert("data_keys".into(), serde_json::to_value(&r)?);
            }
            if index || all {
                let pb = progress_bar("re-indexing");
                let r = KeyAdmin::of(&i, GRACE)
                    .rotate_index(&on_progress(&pb))
                    .await;
                pb.finish_and_clear();
                let r = r?;
                if !json {
                    println!(
                        "index: new key {}; {} resources indexed again; retired {:?}",
                        r.key, r.reindexed, r.retired
                    );
                }
                out.insert("index".into(), serde_json::to_value(&r)?);
            }
            if kek || all {
                let pb = progress_bar("re-wrapping");
                let r = KeyAdmin::of(&i, GRACE).rotate_kek(&on_progress(&pb)).await;
                pb.finish_and_clear();
                let r = r?;
                if !json {
                    print_kek(&r);
                }
                out.insert("kek".into(), serde_json::to_value(&r)?);
            }
            // Last: it can stop on accounts an operator must sort out
            // (two with one name), which should not hold the others back.
            if sign_in || all {
                let pb = progress_bar("re-hashing usernames");
                let r = KeyAdmin::of(&i, GRACE)
                    .rotate_sign_in(&on_progress(&pb))
                    .await;
                pb.finish_and_clear();
                let r = r?;
                if !json {
                    println!(
                        "sign-in: generation {}; {} usernames re-hashed",
                        r.generation, r.usernames_rehashed
                    );
                    print_retired(&r.retire);
                }
                out.insert("sign_in".into(), serde_json::to_value(&r)?);
            }
            if json {
                print_json(out)?;
            }
            Ok(())
        }
        KeysCmd::Retire { inst, json } => {
            let i = open(&inst).await?;
            let r = KeyAdmin::of(&i, GRACE).retire_sign_in().await?;
            if json {
                let mut out = serde_json::Map::new();
                out.insert("sign_in".into(), serde_json::to_value(&r)?);
                return print_json(out);
            }
            print_retired(&r);
            Ok(())
        }
        KeysCmd::Escrow {
            inst,
            recipients,
            recipients_file,
            out,
            json,
        } => {
            let to = recipients_from(recipients, recipients_file.as_deref())?;
            let i = open(&inst).await?;
            let r = KeyAdmin::of(&i, GRACE).escrow_kek(&to, &out).await?;
            if json {
                let mut o = serde_json::Map::new();
                o.insert("escrow".into(), serde_json::to_value(&r)?);
                return print_json(o);
            }
            println!(
                "KEK generations {:?} written to {}, encrypted to {} age recipient(s); recover with: age -d -i IDENTITY {} > kek",
                r.generations, r.file, r.recipients, r.file
            );
            Ok(())
        }
        KeysCmd::MoveKek {
            inst,
            to_hsm,
            hsm,
            json,
        } => {
            if !to_hsm {
                bail!("--to-hsm is required (the only destination)");
            }
            let Some(settings) = hsm.settings()? else {
                bail!(
                    "--to-hsm needs --hsm-module, --hsm-token and --hsm-pin-file or --hsm-pin-env"
                );
            };
            let i = open(&inst).await?;
            let pb = progress_bar("moving into the HSM");
            let r =
                phylax_server::keys::move_kek_to_hsm(&i, settings, GRACE, &on_progress(&pb)).await;
            pb.finish_and_clear();
            let r = r?;
            if json {
                return print_json(serde_json::to_value(&r)?);
            }
            print_kek(&r);
            println!("phylax.toml now names the HSM; start the servers again");
            Ok(())
        }
        KeysCmd::RotateSigning { inst } => {
            let i = open(&inst).await?;
            let kid = rotate_signing(&i).await?;
            println!("new signing key {kid}; nodes switch to it within seconds");
            Ok(())
        }
    }
}

async fn rotate_signing(i: &Instance) -> Result<String> {
    let kid = i.keys.rotate_signing().await?;
    admin_audit(i, "key", Action::Create, format!("signing key {kid} added")).await?;
    Ok(kid)
}

fn print_retired(r: &phylax_server::keys::sign_in::SignInRetired) {
    if !r.retired.is_empty() {
        println!("sign-in: generations {:?} retired", r.retired);
    }
    for k in &r.kept {
        let until = k
            .grants_until
            .map(|t| phylax_server::base::clock::format_instant(t * 1000))
            .unwrap_or_else(|| "unknown (rotation not finished)".into());
        println!(
            "sign-in: generation {} kept: grants until {until}; {} usernames, {} users' recovery codes, {} enrollment links{}",
            k.generation,
            k.accounts.usernames,
            k.accounts.recovery_code_sets,
            k.accounts.enrollment_links,
            if k.accounts.users.is_empty() {
                String::new()
            } else {
                format!(" (users {})", k.accounts.users.join(", "))
            }
        );
    }
    if !r.kept.is_empty() {
        println!("run `phylax keys retire` again after that; recovery codes under an old generation stay valid until used or replaced (`phylax user reset-mfa` replaces them at the next sign-in; `phylax user list` maps ids to names)");
    }
}

fn print_kek(r: &phylax_server::keys::KekRotated) {
    println!(
        "KEK: generation {} ({}) in force; {} keys re-wrapped; generations {:?} destroyed",
        r.to, r.provider, r.rewrapped, r.retired
    );
    if !r.remove_from_environment.is_empty() {
        println!(
            "  remove generation(s) {:?} from PHYLAX_KEK on every node, then restart them",
            r.remove_from_environment
        );
    }
}

pub async fn patient_cmd(c: PatientCmd) -> Result<()> {
    match c {
        PatientCmd::Erase {
            inst,
            id,
            reason,
            override_retention,
            json,
        } => {
            let i = open(&inst).await?;
            let pb = progress_bar("re-keying the index and the KEK");
            let r = KeyAdmin::of(&i, GRACE)
                .erase_patient(
                    &id,
                    &reason,
                    i.config.keys.retention_years,
                    override_retention,
                    &on_progress(&pb),
                )
                .await;
            pb.finish_and_clear();
            let r = r?;
            if json {
                return print_json(serde_json::to_value(&r)?);
            }
            println!(
                "erased Patient/{}: {} versions of {} resources; its data key is destroyed",
                r.patient, r.versions, r.resources
            );
            if r.retention_overridden {
                println!("  (inside the retention period, overridden)");
            }
            if let Some(ix) = &r.index_rotation {
                println!(
                    "  search index rebuilt under {}: older copies' index entries no longer match today's keys",
                    ix.key
                );
            }
            match (&r.kek_rotation, &r.pending) {
                (_, Some(p)) => println!("  PENDING: {p}"),
                (Some(k), None) => println!(
                    "  KEK rotated to generation {}: copies from before the erasure can no longer be read",
                    k.to
                ),
                (None, None) => {}
            }
            Ok(())
        }
        PatientCmd::Hold {
            inst,
            id,
            reason,
            release,
        } => {
            let i = open(&inst).await?;
            KeyAdmin::of(&i, GRACE)
                .set_legal_hold(&id, !release, &reason)
                .await?;
            println!(
                "legal hold {} for Patient/{id}",
                if release { "released" } else { "placed" }
            );
            Ok(())
        }
        PatientCmd::Holds { inst, json } => {
            let i = open(&inst).await?;
            let held = phylax_server::keys::erase::legal_holds(&i.store).await?;
            if json {
                return print_json(serde_json::to_value(&held)?);
            }
            if held.is_empty() {
                println!("no patient is under legal hold");
            }
            for h in held {
                println!("Patient/{h}");
            }
            Ok(())
        }
    }
}
