//! `phylax`: the command-line interface.
//!
//! # Layout
//! - this file: clap definitions, then one function per command;
//! - [`keys`]: `phylax keys …` and `phylax patient …` (key status and
//!   rotation, the KEK into an HSM, erasure, legal holds);
//! - [`config_cmd`]: `phylax config check`;
//! - [`backup`]: `phylax backup create|verify|drill` and `phylax restore`
//!   (docs/BACKUP.md);
//! - [`incident`]: `phylax incident …`, the breach register and an
//!   incident's scope (docs/INCIDENT_RESPONSE.md).
//!
//! Every
//! command that works on an instance takes `--data-dir DIR` (and
//! `--database-url` when the instance stores its data in PostgreSQL).
//! Errors print as one line (`error: …`) and exit with status 1.

mod backup;
mod config_cmd;
mod incident;
mod keys;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use phylax_audit::event::Action;
use phylax_auth::assertion::parse_jwks;
use phylax_auth::scopes::Context as ScopeContext;
use phylax_auth::smart::SmartScopes;
use phylax_auth::ScopeSet;
use phylax_server::instance::{InitOptions, Instance};
use phylax_server::{http::serve, state::AppState};
use phylax_store::ClientRecord;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(name = "phylax", version, about = "Phylax: a security-first FHIR R4 server", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an instance in ./phylax-data if there is none, then serve HTTPS on 127.0.0.1:8443.
    Quickstart {
        #[arg(long, default_value = "phylax-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
    },
    /// Create a new instance (keys, local CA and server certificate, database).
    Init(InitArgs),
    /// Serve the FHIR API over HTTPS.
    Serve(ServeArgs),
    /// Manage OAuth clients: SMART Backend Services clients and apps.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage keys.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Patients' data rights: erasure (crypto-shredding) and legal holds.
    #[command(subcommand)]
    Patient(keys::PatientCmd),
    /// The configuration file.
    #[command(subcommand)]
    Config(config_cmd::ConfigCmd),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Encrypted, signed backups of the instance; verify them; restore
    /// drills (docs/BACKUP.md).
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Restore a backup into a new, empty place and prove it.
    Restore(backup::RestoreArgs),
    /// Security incidents: the breach register, an incident's scope from
    /// the audit log (docs/INCIDENT_RESPONSE.md).
    #[command(subcommand)]
    Incident(incident::IncidentCmd),
    /// Access control: explain a decision, review accounts, close
    /// break-the-glass reviews.
    #[command(subcommand)]
    Access(AccessCmd),
}

#[derive(Subcommand, Debug)]
enum AccessCmd {
    /// Would this user or client be allowed this interaction on this
    /// resource, and by which rule? Prints rules and counts, never data.
    Explain {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        user: Option<String>,
        #[arg(long)]
        client: Option<String>,
        /// The scopes of the app the user signs in through (default: all
        /// their role allows).
        #[arg(long, requires = "user")]
        scope: Option<String>,
        /// `Type/id`.
        #[arg(long)]
        resource: String,
        /// read, vread, history, search, create, update, delete or everything.
        #[arg(long, default_value = "read")]
        interaction: String,
        #[arg(long)]
        json: bool,
    },
    /// The periodic access review: every user and client with role or
    /// scopes, second factor, last activity, dormant accounts and
    /// permissions unused in the period.
    Review {
        #[command(flatten)]
        inst: InstanceArgs,
        /// The period, in days.
        #[arg(long, default_value_t = 90)]
        dormant_days: u32,
        #[arg(long)]
        json: bool,
    },
    /// The break-the-glass review queue.
    #[command(subcommand)]
    BreakGlass(BreakGlassCmd),
    /// Relationship data written before the relationships permission,
    /// held: it opens no patient until approved (`Type/id/version`; ids
    /// only, never content).
    Held {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Approve held relationship data after review: every held version
    /// (--all) or those of the resources named.
    Approve {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(
            long,
            conflicts_with = "resource",
            required_unless_present = "resource"
        )]
        all: bool,
        /// `Type/id` (repeatable).
        #[arg(long)]
        resource: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum BreakGlassCmd {
    /// List grants waiting for review (with --all, every grant). Shows each
    /// grant's reason: it may hold PHI.
    List {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Close a grant's review (the reviewer must hold the auditor role).
    Close {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        id: String,
        /// The reviewing auditor's username.
        #[arg(long)]
        reviewer: String,
        /// What the review found.
        #[arg(long)]
        note: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check the whole log: every record against its key and leaf hash,
    /// every signed checkpoint against the tree, outside checkpoints for
    /// consistency, and optionally one record's inclusion proof.
    Verify {
        #[command(flatten)]
        inst: InstanceArgs,
        /// A checkpoint saved earlier outside the database (signed-note
        /// text); repeatable.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
        /// Prove that this AuditEvent id is in the newest checkpoint.
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Seal pending records now and print the new signed checkpoint (to
    /// keep somewhere the database's administrators cannot rewrite).
    Checkpoint {
        #[command(flatten)]
        inst: InstanceArgs,
    },
    /// Print the keys that verify checkpoints (the `note` verifier key
    /// format), for outside verifiers: the one that signs now first, one
    /// per line, then those of older checkpoints (after rotations).
    Key {
        #[command(flatten)]
        inst: InstanceArgs,
    },
    /// Empty the bodies of sealed records older than `[audit]
    /// retention_days` (default six years); their leaf hashes stay, so the
    /// log still verifies. The pruning is recorded.
    Prune {
        #[command(flatten)]
        inst: InstanceArgs,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a user; prints a one-time enrollment link that expires.
    Add {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        username: String,
        /// A role: clinician, nurse, front-desk, billing, researcher, auditor,
        /// admin, patient, or a custom one from [[roles]] in phylax.toml.
        #[arg(long)]
        role: String,
        /// For patients: the id of their Patient resource.
        #[arg(long)]
        patient: Option<String>,
        /// For workforce users: the id of their Practitioner resource (care
        /// relationships are found from it).
        #[arg(long)]
        practitioner: Option<String>,
    },
    /// List users (role, status, second factor, last sign-in).
    List {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Disable a user: ends all their sessions and tokens at once.
    Disable(UserArgs),
    /// Re-enable a disabled user.
    Enable(UserArgs),
    /// Unlock a user locked after failed sign-ins.
    Unlock(UserArgs),
    /// Remove a user's second factors (authenticator app, passkeys) and recovery codes; they enroll again at the next sign-in.
    ResetMfa(UserArgs),
    /// Print a new one-time link for the user to set a new password.
    ResetPassword(UserArgs),
    /// Link a workforce user to their Practitioner resource (care
    /// relationships follow from it); ends their sessions and tokens.
    SetPractitioner {
        #[command(flatten)]
        user: UserArgs,
        /// The Practitioner resource id; omit with --none to unlink.
        #[arg(long, required_unless_present = "none")]
        practitioner: Option<String>,
        #[arg(long, conflicts_with = "practitioner")]
        none: bool,
    },
    /// Change a user's role; ends their sessions and tokens.
    SetRole {
        #[command(flatten)]
        user: UserArgs,
        /// The new role (a patient account stays a patient; workforce stays workforce).
        #[arg(long)]
        role: String,
    },
}

#[derive(Args, Debug)]
struct UserArgs {
    #[command(flatten)]
    inst: InstanceArgs,
    #[arg(long)]
    username: String,
}

#[derive(Args, Debug)]
pub(crate) struct InstanceArgs {
    /// The instance's data directory.
    #[arg(long)]
    pub(crate) data_dir: PathBuf,
    /// PostgreSQL URL, for instances that store their data in PostgreSQL.
    #[arg(long, env = "PHYLAX_DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,
}

#[derive(Args, Debug)]
struct InitArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Where the key-encryption key is (or will be) kept; must be outside
    /// the data directory. Default: DIR-keys/kek beside the data directory.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// Public base URL (default https://LISTEN).
    #[arg(long)]
    public_url: Option<String>,
    /// Store data in this PostgreSQL database instead of embedded SQLite.
    #[arg(long, env = "PHYLAX_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Extra DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Keep the KEK in a PKCS#11 HSM instead of a key file (docs/KEYS.md).
    #[command(flatten)]
    hsm: keys::HsmArgs,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    inst: InstanceArgs,
    /// Override the configured listen address.
    #[arg(long)]
    listen: Option<String>,
    /// DANGER: serve plaintext HTTP instead of HTTPS. Refused unless the
    /// listen address is loopback. For local debugging only.
    #[arg(long)]
    danger_plaintext: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum ClientCmd {
    /// Register a client; prints its client_id. Backend Services clients
    /// give --jwks and system/ scopes; apps give --redirect-uri (exact,
    /// repeatable) with patient/ or user/ scopes, and either --jwks
    /// (confidential, private_key_jwt) or --public (PKCE only).
    Add {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        name: String,
        /// Space-separated SMART scopes, e.g. "system/Patient.rs" for a
        /// backend client or "patient/*.rs launch/patient openid fhirUser offline_access" for an app.
        #[arg(long)]
        scope: String,
        /// A JSON Web Key Set with the client's public keys (RS384 or ES384).
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// An app's redirect URI (https, or http on a loopback address); matched exactly.
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// A public app (no credentials; PKCE protects its codes).
        #[arg(long)]
        public: bool,
        /// An app run by the same organisation: users are not asked to consent.
        #[arg(long)]
        first_party: bool,
        /// RFC 8705: bind its access tokens to the TLS client certificate
        /// (from `[tls] client_ca`) its token request comes with; without
        /// one its token requests are refused, and its tokens work only
        /// over a connection with that same certificate.
        #[arg(long)]
        cert_bound: bool,
    },
    /// List registered clients.
    List {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Disable a client: no new tokens, and its unexpired tokens stop working within seconds.
    Disable {
        #[command(flatten)]
        inst: InstanceArgs,
        client_id: String,
    },
    /// Re-enable a disabled client.
    Enable {
        #[command(flatten)]
        inst: InstanceArgs,
        client_id: String,
    },
    /// Developer helper: generate an ES384 key pair for a client (private key 0600 + JWKS).
    Keygen {
        /// Directory to write client-key.pem and client-jwks.json into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Developer helper: print a signed client assertion for the token endpoint.
    Assertion {
        #[arg(long)]
        client_id: String,
        /// The client's private key (PKCS#8 PEM, ES384), e.g. from `phylax client keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The token endpoint URL (from /fhir/.well-known/smart-configuration).
        #[arg(long, default_value = "https://127.0.0.1:8443/auth/token")]
        token_url: String,
    },
}

fn init_logging(json: bool) {
    let user = std::env::var("PHYLAX_LOG").unwrap_or_else(|_| "info".into());
    let filter = phylax_server::base::logging::filter(&user);
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

/// mimalloc in its secure mode (guard pages, encrypted free lists,
/// randomised allocation, double-free detection): glibc's allocator showed
/// as a fifth of Phylax's CPU on searches that return many resources, with
/// tasks allocating on one thread and freeing on another
/// (docs/PERFORMANCE.md, "Allocation").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// No core dumps, and no reading this process's memory by other processes
/// of the same user: a dump or a `ptrace` of a Phylax process would hold
/// the KEK and every data key it has unwrapped (docs/OPERATIONS.md,
/// "Keys in memory"). Both are unprivileged calls; if either fails, the
/// process does not go on to load keys.
fn no_core_dumps() -> std::io::Result<()> {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

fn main() {
    if let Err(e) = no_core_dumps() {
        eprintln!("error: cannot turn core dumps off (keys would be in them): {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Quickstart { data_dir, listen } => quickstart(&data_dir, &listen).await,
        Cmd::Init(a) => {
            let cfg = Instance::init(&InitOptions {
                data_dir: a.data_dir.clone(),
                key_file: a.key_file,
                listen: a.listen,
                public_url: a.public_url,
                database_url: a.database_url,
                tls_names: a.tls_names,
                hsm: a.hsm.settings()?,
            })
            .await?;
            println!("initialised {}", a.data_dir.display());
            match (&cfg.key_file, &cfg.hsm) {
                (Some(k), _) => println!(
                    "  key file (keep it safe, outside backups of the data): {}",
                    k.display()
                ),
                (None, Some(h)) => println!(
                    "  KEK: inside the HSM token {:?} as {}-1 (non-extractable)",
                    h.token, h.key_label
                ),
                (None, None) => {}
            }
            println!(
                "  CA certificate for clients: {}",
                a.data_dir.join(&cfg.tls.ca).display()
            );
            Ok(())
        }
        Cmd::Serve(a) => {
            // JSON logs when asked on the command line or in phylax.toml.
            let cfg_json = phylax_server::base::config::Config::load(&a.inst.data_dir)
                .map(|c| c.log.json)
                .unwrap_or(false);
            init_logging(a.log_json || cfg_json);
            serve_cmd(
                &a.inst.data_dir,
                a.inst.database_url.as_deref(),
                a.listen,
                a.danger_plaintext,
            )
            .await
        }
        Cmd::Client(c) => client_cmd(c).await,
        Cmd::User(c) => user_cmd(c).await,
        Cmd::Audit(c) => audit_cmd(c).await,
        Cmd::Access(c) => access_cmd(c).await,
        Cmd::Keys(c) => keys::keys_cmd(c).await,
        Cmd::Patient(c) => keys::patient_cmd(c).await,
        Cmd::Config(c) => config_cmd::config_cmd(c),
        Cmd::Backup(c) => backup::backup_cmd(c).await,
        Cmd::Restore(a) => backup::restore_cmd(a).await,
        Cmd::Incident(c) => incident::incident_cmd(c).await,
    }
}

async fn audit_cmd(c: AuditCmd) -> Result<()> {
    match c {
        AuditCmd::Verify {
            inst,
            checkpoints,
            event,
            json,
        } => {
            let mut notes = Vec::new();
            for p in &checkpoints {
                notes.push(
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
                );
            }
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            // The copy kept outside the database, where the configuration
            // says, is always checked too.
            if let Some(f) = &i.config.audit.checkpoint_file {
                if let Ok(n) = std::fs::read_to_string(i.data_dir.join(f)) {
                    notes.push(n);
                }
            }
            match i.audit.verify(&notes, event.as_deref()).await {
                Ok(r) => {
                    let latest = r.latest.as_ref();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "ok": true,
                                "records": r.records,
                                "sealed": r.sealed,
                                "checkpoints": r.checkpoints,
                                "latest_size": latest.map(|c| c.size),
                                "latest_time_ms": latest.map(|c| c.time_ms),
                                "outside_checkpoints": r.external,
                                "pruned": r.pruned,
                                "inclusion": r.inclusion.map(|(i, size, len)| serde_json::json!({"index": i, "tree_size": size, "proof_hashes": len})),
                            })
                        );
                    } else {
                        println!(
                            "audit log OK: {} records ({} sealed, {} awaiting the next checkpoint); {} signed checkpoints verified; {} outside checkpoints consistent",
                            r.records,
                            r.sealed,
                            r.records - r.sealed,
                            r.checkpoints,
                            r.external
                        );
                        if r.pruned > 0 {
                            println!(
                                "{} records pruned after retention (their leaf hashes verified)",
                                r.pruned
                            );
                        }
                        if let Some((idx, size, len)) = r.inclusion {
                            println!("record is leaf {idx} of checkpoint {size} ({len}-hash inclusion proof verified)");
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "error": e.to_string()})
                        );
                    }
                    anyhow::bail!("audit log verification FAILED: {e}")
                }
            }
        }
        AuditCmd::Prune { inst } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let n = i
                .audit
                .prune(chrono::Utc::now().timestamp_millis())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{n} audit records older than {} days pruned (leaf hashes kept)",
                i.config.audit.retention_days
            );
            Ok(())
        }
        AuditCmd::Checkpoint { inst } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            i.audit.seal_pending().await?;
            match i.store.latest_checkpoint().await? {
                Some(c) => print!("{}", c.note),
                None => println!("the audit log is empty"),
            }
            Ok(())
        }
        AuditCmd::Key { inst } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            // The key that signs now first, then those of older
            // checkpoints (after rotations).
            for k in i.audit.verifier_keys() {
                println!("{}", k.encode());
            }
            Ok(())
        }
    }
}

async fn quickstart(data_dir: &Path, listen: &str) -> Result<()> {
    let fresh = !data_dir
        .join(phylax_server::base::config::CONFIG_FILE)
        .exists();
    if fresh {
        Instance::init(&InitOptions {
            data_dir: data_dir.to_path_buf(),
            key_file: None,
            listen: listen.to_owned(),
            public_url: None,
            database_url: None,
            tls_names: vec![],
            hsm: None,
        })
        .await?;
    }
    let inst = Instance::open(data_dir, None).await?;
    let ca = inst.ca_path();
    let base = inst.config.public_url.clone();
    let dd = data_dir.display();
    println!(
        "Phylax {} instance in {dd} (KEK: {})\n\
         \n\
         Next steps, in another terminal:\n\
         1. Trust the local CA:         {ca}\n\
         2. Make a client key pair:     cargo run --release -- client keygen --out ./my-client\n\
         3. Register the client:        cargo run --release -- client add --data-dir {dd} --name my-app \\\n\
         \x20                                --scope \"system/*.cruds\" --jwks ./my-client/client-jwks.json\n\
         4. Get a token (SMART Backend Services, client_credentials + private_key_jwt):\n\
         \x20    A=$(cargo run -q --release -- client assertion --client-id CLIENT_ID --key ./my-client/client-key.pem --token-url {base}/auth/token)\n\
         \x20    curl --cacert {ca} {base}/auth/token -d grant_type=client_credentials -d scope='system/*.cruds' \\\n\
         \x20         -d client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer -d client_assertion=$A\n\
         5. Use it:                     curl --cacert {ca} -H \"Authorization: Bearer TOKEN\" {base}/fhir/metadata\n",
        if fresh { "created a new" } else { "reusing the" },
        inst.config
            .key_file
            .as_ref()
            .map(|k| k.display().to_string())
            .unwrap_or_else(|| "in the HSM".into()),
        ca = ca.display(),
    );
    drop(inst);
    init_logging(false);
    serve_cmd(data_dir, None, Some(listen.to_owned()), false).await
}

async fn serve_cmd(
    data_dir: &Path,
    db: Option<&str>,
    listen: Option<String>,
    plaintext: bool,
) -> Result<()> {
    let inst = Instance::open(data_dir, db).await?;
    let listen = listen.unwrap_or_else(|| inst.config.listen.clone());
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("invalid listen address {listen}"))?;
    if plaintext && !addr.ip().is_loopback() {
        bail!("--danger-plaintext is only allowed on a loopback address (got {addr})");
    }
    let tls = if plaintext {
        tracing::warn!("DANGER: serving plaintext HTTP on {addr} (--danger-plaintext)");
        None
    } else {
        let (cfg, cert) = phylax_server::net::tls::server_tls(inst.cert_files())?;
        // New certificate files (or SIGHUP) take effect for new
        // connections without a restart.
        cert.watch();
        Some(cfg)
    };
    let st = AppState::new(inst)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(
        "Phylax listening on {}://{addr} (store: {})",
        if plaintext { "http" } else { "https" },
        st.backend
    );
    serve(st, listener, tls, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

async fn client_cmd(c: ClientCmd) -> Result<()> {
    match c {
        ClientCmd::Add {
            inst,
            name,
            scope,
            jwks,
            redirect_uris,
            public,
            first_party,
            cert_bound,
        } => {
            if name.trim().is_empty() || name.len() > 200 {
                bail!("--name must be 1 to 200 characters");
            }
            let app = !redirect_uris.is_empty();
            let scope = if app {
                SmartScopes::parse_registration(&scope)
                    .map_err(|e| anyhow::anyhow!("--scope: {e}"))?
                    .to_string()
            } else {
                if public || first_party {
                    bail!("--public and --first-party are for apps: give --redirect-uri");
                }
                ScopeSet::parse_strict(&scope, ScopeContext::System)
                    .map_err(|e| anyhow::anyhow!("--scope: {e} (apps need --redirect-uri)"))?
                    .to_string()
            };
            for u in &redirect_uris {
                check_redirect_uri(u)?;
            }
            let text = match (&jwks, public) {
                (Some(_), true) => bail!("a --public client has no keys: drop --jwks"),
                (None, false) => {
                    bail!("--jwks is required (or --public for an app without credentials)")
                }
                (None, true) => String::new(),
                (Some(p), false) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    parse_jwks(&text).map_err(|e| anyhow::anyhow!("--jwks: {e}"))?;
                    text
                }
            };
            if cert_bound && public {
                bail!("--cert-bound is for clients with credentials, not --public apps");
            }
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            if cert_bound && i.config.tls.client_ca.is_none() {
                bail!("--cert-bound needs [tls] client_ca in phylax.toml (the CA of client certificates)");
            }
            let id = uuid::Uuid::new_v4().to_string();
            i.store
                .add_client(&ClientRecord {
                    id: id.clone(),
                    name,
                    scope,
                    jwks: text,
                    disabled: false,
                    created_at: chrono::Utc::now().timestamp(),
                    redirect_uris,
                    public,
                    first_party,
                    cert_bound,
                })
                .await?;
            admin_audit(
                &i,
                "client",
                Action::Create,
                format!("client {id} registered"),
            )
            .await?;
            println!("{id}");
            Ok(())
        }
        ClientCmd::List { inst, json } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let clients = i.store.list_clients().await?;
            if json {
                let v: Vec<serde_json::Value> = clients
                    .iter()
                    .map(|c| serde_json::json!({"client_id": c.id, "name": c.name, "scope": c.scope, "disabled": c.disabled, "created_at": c.created_at, "redirect_uris": c.redirect_uris, "public": c.public, "first_party": c.first_party, "cert_bound": c.cert_bound}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<36}  {:<8}  {:<24}  SCOPE",
                    "CLIENT_ID", "STATUS", "NAME"
                );
                for c in clients {
                    println!(
                        "{:<36}  {:<8}  {:<24}  {}",
                        c.id,
                        if c.disabled { "disabled" } else { "active" },
                        c.name,
                        c.scope
                    );
                }
            }
            Ok(())
        }
        ClientCmd::Disable { inst, client_id } => set_disabled(inst, &client_id, true).await,
        ClientCmd::Enable { inst, client_id } => set_disabled(inst, &client_id, false).await,
        ClientCmd::Keygen { out } => {
            let g = phylax_auth::client_key::generate()?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let key_path = out.join("client-key.pem");
            write_private(&key_path, g.private_pem.expose())?;
            std::fs::write(out.join("client-jwks.json"), &g.jwks)?;
            println!(
                "wrote {} (private, 0600) and {}",
                key_path.display(),
                out.join("client-jwks.json").display()
            );
            Ok(())
        }
        ClientCmd::Assertion {
            client_id,
            key,
            token_url,
        } => {
            let pem =
                std::fs::read(&key).with_context(|| format!("cannot read {}", key.display()))?;
            let kid = None;
            let a = phylax_auth::client_key::sign_assertion(
                &pem,
                kid,
                &client_id,
                &token_url,
                chrono::Utc::now().timestamp(),
            )?;
            println!("{a}");
            Ok(())
        }
    }
}

/// Redirect URIs: absolute https, or http only on a loopback address
/// (native apps, RFC 8252 §7.3); no fragment, no whitespace.
fn check_redirect_uri(u: &str) -> Result<()> {
    let ok_scheme = u.starts_with("https://")
        || ["http://127.0.0.1", "http://[::1]", "http://localhost"]
            .iter()
            .any(|p| {
                u.strip_prefix(p)
                    .is_some_and(|r| r.is_empty() || r.starts_with([':', '/']))
            });
    if !ok_scheme {
        bail!("--redirect-uri {u}: use https (http only on 127.0.0.1, [::1] or localhost)");
    }
    let host_part = u.split_once("://").map(|x| x.1).unwrap_or("");
    if host_part.is_empty() || host_part.starts_with('/') {
        bail!("--redirect-uri {u}: no host");
    }
    if u.contains('#') || u.chars().any(|c| c.is_whitespace() || c.is_control()) || u.len() > 1000 {
        bail!("--redirect-uri {u}: no fragment, spaces or control characters; at most 1000 characters");
    }
    Ok(())
}

async fn user_cmd(c: UserCmd) -> Result<()> {
    use phylax_server::data::accounts::Status;
    let now = chrono::Utc::now().timestamp();
    match c {
        UserCmd::Add {
            inst,
            username,
            role,
            patient,
            practitioner,
        } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let ttl = i.config.auth.enrollment_secs;
            let (u, link) = accounts
                .add_linked(
                    &username,
                    &role,
                    patient.as_deref(),
                    practitioner.as_deref(),
                    ttl,
                    now,
                )
                .await?;
            admin_audit(
                &i,
                "user",
                Action::Create,
                format!("user {} created with role {}", u.id(), u.rec.role),
            )
            .await?;
            println!("created user {} ({})", u.id(), u.rec.role);
            println!(
                "one-time enrollment link (valid {} h; give it to the user privately):",
                ttl / 3600
            );
            println!("{}/auth/enroll?token={link}", i.config.public_url);
            Ok(())
        }
        UserCmd::List { inst, json } => {
            let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
            let users = i.accounts()?.list().await?;
            if json {
                let v: Vec<serde_json::Value> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "id": u.id(), "username": u.username(), "role": u.rec.role,
                            "status": u.rec.status, "mfa": u.has_mfa(),
                            "totp": u.has_totp(), "passkeys": u.passkeys().len(),
                            "passkeys_flagged": u.passkeys().iter().filter(|p| p.flagged).count(),
                            "recovery_codes_left": u.recovery_left(),
                            "password_set": u.has_password(),
                            "password_scheme": u.password_scheme(),
                            "enrollment_pending": u.enrollment_pending(now),
                            "last_sign_in": u.last_sign_in(), "created_at": u.rec.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<24}  {:<10}  {:<8}  {:<16}  {:<8}  LAST SIGN-IN",
                    "USERNAME", "ROLE", "STATUS", "MFA", "RECOVERY"
                );
                for u in users {
                    let last = u
                        .last_sign_in()
                        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                        .unwrap_or_else(|| {
                            if u.has_password() {
                                "never"
                            } else {
                                "not enrolled"
                            }
                            .into()
                        });
                    println!(
                        "{:<24}  {:<10}  {:<8}  {:<16}  {:<8}  {last}",
                        u.username(),
                        u.rec.role,
                        u.rec.status,
                        match (u.has_totp(), u.passkeys().len()) {
                            (false, 0) => "none".to_owned(),
                            (true, 0) => "totp".to_owned(),
                            (false, n) => format!("passkey×{n}"),
                            (true, n) => format!("totp+passkey×{n}"),
                        },
                        u.recovery_left()
                    );
                }
            }
            Ok(())
        }
        UserCmd::Disable(a) => user_status(a, Status::Disabled, now).await,
        UserCmd::Enable(a) => user_status(a, Status::Active, now).await,
        UserCmd::Unlock(a) => {
            let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let u = find_user(&accounts, &a.username).await?;
            if u.status() != Some(Status::Locked) {
                bail!("{} is not locked (status: {})", a.username, u.rec.status);
            }
            accounts.set_status(u.id(), Status::Active, now).await?;
            admin_audit(
                &i,
                "user",
                Action::Update,
                format!("user {} unlocked", u.id()),
            )
            .await?;
            println!("{} is unlocked", a.username);
            Ok(())
        }
        UserCmd::ResetMfa(a) => {
            let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let u = find_user(&accounts, &a.username).await?;
            accounts.reset_mfa(u.id(), now).await?;
            admin_audit(
                &i,
                "user",
                Action::Update,
                format!("user {}: second factors reset", u.id()),
            )
            .await?;
            println!("second factor removed; the user enrolls again at the next sign-in (sessions ended)");
            Ok(())
        }
        UserCmd::SetPractitioner {
            user: a,
            practitioner,
            none: _,
        } => {
            let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let u = find_user(&accounts, &a.username).await?;
            accounts
                .set_practitioner(u.id(), practitioner.as_deref(), now)
                .await?;
            let what = match &practitioner {
                Some(p) => format!("user {} linked to Practitioner/{p}", u.id()),
                None => format!("user {} unlinked from their Practitioner", u.id()),
            };
            admin_audit(&i, "user", Action::Update, what).await?;
            match practitioner {
                Some(p) => println!(
                    "{} is linked to Practitioner/{p} (sessions and tokens ended)",
                    a.username
                ),
                None => println!("{} is unlinked (sessions and tokens ended)", a.username),
            }
            Ok(())
        }
        UserCmd::SetRole { user: a, role } => {
            let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let u = find_user(&accounts, &a.username).await?;
            accounts.set_role(u.id(), &role, now).await?;
            admin_audit(
                &i,
                "role",
                Action::Update,
                format!("user {} role set to {role}", u.id()),
            )
            .await?;
            println!("{} is now {role} (sessions and tokens ended)", a.username);
            Ok(())
        }
        UserCmd::ResetPassword(a) => {
            let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
            let accounts = i.accounts()?;
            let u = find_user(&accounts, &a.username).await?;
            let ttl = i.config.auth.enrollment_secs;
            let link = accounts.new_enrollment(u.id(), ttl, now).await?;
            admin_audit(
                &i,
                "user",
                Action::Update,
                format!("user {}: password reset link issued", u.id()),
            )
            .await?;
            println!(
                "one-time link to set a new password (valid {} h):",
                ttl / 3600
            );
            println!("{}/auth/enroll?token={link}", i.config.public_url);
            Ok(())
        }
    }
}

fn instant(ms: i64) -> String {
    phylax_server::base::clock::format_instant(ms)
}

/// The server's state over an instance, for commands that make the same
/// decisions the server does (no listener, no background tasks).
async fn app_state(inst: &InstanceArgs) -> Result<std::sync::Arc<phylax_server::state::AppState>> {
    let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
    phylax_server::state::AppState::new(i)
        .await
        .map_err(|e| anyhow::anyhow!("{}", failure_line(e)))
}

/// `--resource Type/id`, parsed.
fn parse_resource(s: &str) -> Result<(phylax_fhir::ResourceType, phylax_fhir::ResourceId)> {
    s.split_once('/')
        .and_then(|(t, id)| {
            Some((
                phylax_fhir::ResourceType::parse(t)?,
                phylax_fhir::ResourceId::parse(id)?,
            ))
        })
        .ok_or_else(|| anyhow::anyhow!("--resource must be Type/id"))
}

/// A start-up failure as one line (its own message, not its debug form).
fn failure_line(e: phylax_server::base::error::Failure) -> String {
    use phylax_server::base::error::Failure;
    match e {
        Failure::Unavailable(m) => format!("unavailable: {m}"),
        Failure::Internal(m) => m,
        other => format!("{other:?}"),
    }
}

async fn access_cmd(c: AccessCmd) -> Result<()> {
    use phylax_server::ops::access as ops_access;
    match c {
        AccessCmd::Explain {
            inst,
            user,
            client,
            scope,
            resource,
            interaction,
            json,
        } => {
            let what = ops_access::parse_interaction(&interaction).ok_or_else(|| {
                anyhow::anyhow!("--interaction: one of read, vread, history, search, create, update, delete, everything")
            })?;
            let (t, id) = parse_resource(&resource)?;
            let subject = match (user, client) {
                (Some(username), None) => ops_access::Subject::User { username, scope },
                (None, Some(client_id)) => ops_access::Subject::Client { client_id },
                _ => anyhow::bail!("give --user or --client"),
            };
            let st = app_state(&inst).await?;
            let e = ops_access::explain(&st, &subject, &t, &id, what)
                .await
                .map_err(|e| match e {
                    phylax_server::base::error::Failure::NotFound => {
                        anyhow::anyhow!("no such user or client")
                    }
                    other => anyhow::anyhow!("{other:?}"),
                })?;
            // Asking is itself recorded: it reveals who may see what.
            st.audit
                .record_admin(
                    "access-explain",
                    Action::Execute,
                    format!("explained {interaction} on {t}: {}", e.rule),
                )
                .await
                .map_err(|e| anyhow::anyhow!("not recorded in the audit log: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                for s in &e.steps {
                    println!("  {s}");
                }
                println!(
                    "{}: {}",
                    if e.allowed { "ALLOWED" } else { "DENIED" },
                    e.rule
                );
            }
            Ok(())
        }
        AccessCmd::Held { inst, json } => {
            let st = app_state(&inst).await?;
            let held = ops_access::held(&st);
            if json {
                println!("{}", serde_json::to_string_pretty(&held)?);
            } else if held.is_empty() {
                println!("no relationship data is held");
            } else {
                for h in &held {
                    println!("{h}");
                }
                println!(
                    "{} held (approve after review: phylax access approve)",
                    held.len()
                );
            }
            Ok(())
        }
        AccessCmd::Approve {
            inst,
            all,
            resource,
        } => {
            let approval = if all {
                phylax_server::access::holds::Approval::All
            } else {
                for r in &resource {
                    parse_resource(r)?;
                }
                phylax_server::access::holds::Approval::Resources(resource)
            };
            let st = app_state(&inst).await?;
            let n = ops_access::approve(&st, approval)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{n} held version(s) approved; they open patients within a second on every node"
            );
            Ok(())
        }
        AccessCmd::Review {
            inst,
            dormant_days,
            json,
        } => {
            let st = app_state(&inst).await?;
            let now = chrono::Utc::now().timestamp_millis();
            let rows = ops_access::review(&st, dormant_days, now)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            st.audit
                .record_admin(
                    "access-review",
                    Action::Read,
                    format!("access review of {} accounts", rows.len()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("not recorded in the audit log: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<7} {:<24} {:<14} {:<9} {:<5} {:<24} {:<8} unused ({dormant_days} d)",
                "kind", "name", "role", "status", "mfa", "last active", "dormant"
            );
            for r in rows {
                println!(
                    "{:<7} {:<24} {:<14} {:<9} {:<5} {:<24} {:<8} {}",
                    r.kind,
                    r.name,
                    r.role.as_deref().unwrap_or("-"),
                    r.status,
                    r.mfa.map_or("-", |m| if m { "yes" } else { "NO" }),
                    r.last_active.map_or_else(|| "never".into(), instant),
                    if r.dormant { "DORMANT" } else { "" },
                    r.unused
                );
                if let Some(sc) = r.scopes {
                    println!("        scopes: {sc}");
                }
                if r.relationships {
                    println!("        may change care relationships (relationships permission)");
                }
            }
            Ok(())
        }
        AccessCmd::BreakGlass(BreakGlassCmd::List { inst, all, json }) => {
            let st = app_state(&inst).await?;
            let items = phylax_server::access::break_glass::queue(&st.gate, !all)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            st.audit
                .record_admin(
                    "break-the-glass-review",
                    Action::Read,
                    format!("break-the-glass queue listed ({} grants)", items.len()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("not recorded in the audit log: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(());
            }
            if items.is_empty() {
                println!("no grants waiting for review");
            }
            for g in items {
                println!(
                    "{}  user {}  patient {}  {} to {}  purpose {}",
                    g.id,
                    g.user_id,
                    g.patient,
                    instant(g.started),
                    instant(g.expires),
                    g.purpose
                );
                // Text users typed: escaped, so that control characters
                // cannot rewrite the operator's terminal or forge lines.
                println!("    reason: {}", g.reason.escape_debug());
                match (g.reviewed_at, g.reviewer, g.review_note) {
                    (Some(at), Some(by), note) => println!(
                        "    reviewed {} by user {by}: {}",
                        instant(at),
                        note.unwrap_or_default().escape_debug()
                    ),
                    _ => println!("    REVIEW OPEN"),
                }
            }
            Ok(())
        }
        AccessCmd::BreakGlass(BreakGlassCmd::Close {
            inst,
            id,
            reviewer,
            note,
        }) => {
            let st = app_state(&inst).await?;
            let by =
                phylax_server::access::break_glass::close(&st.gate, &id, &reviewer, &note).await?;
            st.audit
                .record_admin(
                    "break-the-glass-review",
                    Action::Update,
                    format!("break-the-glass grant {id} reviewed by user {by}"),
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the review was closed but could not be recorded in the audit log: {e}"
                    )
                })?;
            println!("review of {id} closed");
            Ok(())
        }
    }
}

/// Record a CLI change in the audit log; an unwritable log is an error.
pub(crate) async fn admin_audit(
    i: &Instance,
    what: &'static str,
    action: Action,
    detail: String,
) -> Result<()> {
    i.audit
        .record_admin(what, action, detail)
        .await
        .map_err(|e| {
            anyhow::anyhow!("the change was made but could not be recorded in the audit log: {e}")
        })
}

async fn find_user(
    accounts: &phylax_server::data::accounts::Accounts,
    username: &str,
) -> Result<phylax_server::data::accounts::User> {
    accounts
        .find(username)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no user named {username}"))
}

async fn user_status(
    a: UserArgs,
    status: phylax_server::data::accounts::Status,
    now: i64,
) -> Result<()> {
    let i = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
    let accounts = i.accounts()?;
    let u = find_user(&accounts, &a.username).await?;
    accounts.set_status(u.id(), status, now).await?;
    admin_audit(
        &i,
        "user",
        Action::Update,
        format!("user {} is now {}", u.id(), status.as_str()),
    )
    .await?;
    println!("{} is now {}", a.username, status.as_str());
    Ok(())
}

async fn set_disabled(inst: InstanceArgs, client_id: &str, disabled: bool) -> Result<()> {
    let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
    if !i.store.set_client_disabled(client_id, disabled).await? {
        bail!("no client with id {client_id}");
    }
    let state = if disabled { "disabled" } else { "enabled" };
    admin_audit(
        &i,
        "client",
        Action::Update,
        format!("client {client_id} {state}"),
    )
    .await?;
    println!(
        "{client_id} {}",
        if disabled { "disabled" } else { "enabled" }
    );
    Ok(())
}

fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(content)?;
    Ok(())
}
