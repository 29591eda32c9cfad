//! Creating and opening a Phylax instance.
//!
//! Layout of an instance (see docs/OPERATIONS.md):
//! ```text
//! DIR/phylax.toml        configuration (no secrets)
//! DIR/phylax.db          SQLite store (sealed rows only)
//! DIR/tls/ca.pem         the CA clients must trust
//! DIR/tls/server.pem     the server certificate chain
//! KEYS/kek               the key-encryption key (0600)      KEYS defaults to DIR-keys/
//!                        (or the KEK is in an HSM, `[hsm]`; docs/KEYS.md)
//! KEYS/tls-server-key.pem, KEYS/tls-ca-key.pem (0600)
//! ```
//! Keys live outside the data directory so that a copy of the data
//! directory (or a backup of it) does not carry the means to read it.

use crate::base::config::{Backend, Config, ConfigError, HsmSettings, TlsConfig, CONFIG_FILE};
use crate::data::keyring::KeyRing;
use crate::net::tls::{self, TlsError};
use phylax_crypto::kek::hsm::HsmConfig;
use phylax_crypto::kek::KekSpec;
use phylax_crypto::{BlindIndexKey, CryptoError, Kek, MacKey, Secret};
use phylax_store::{DynStore, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const META_KEK_CHECK: &str = "kek_check";
const META_INSTANCE_ID: &str = "instance_id";
/// A random key wrapped under the KEK: opening an instance unwraps it, so
/// the wrong KEK (or a missing generation) fails at start, whatever
/// provider holds the KEK. Re-wrapped by every rotation like any key.
pub const CANARY_ROW: &str = "kek:canary";
pub const CANARY_PURPOSE: &str = "kek-canary";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{0} already holds a Phylax instance")]
    AlreadyInitialized(String),
    #[error("{0} is not a Phylax instance (no {CONFIG_FILE}); run `phylax init` first")]
    NotInitialized(String),
    #[error("the key file must be outside the data directory")]
    KeyInsideDataDir,
    #[error("this instance uses PostgreSQL: pass --database-url (or set PHYLAX_DATABASE_URL)")]
    DatabaseUrlRequired,
    #[error("this instance uses the embedded SQLite store; --database-url does not apply")]
    DatabaseUrlNotApplicable,
    #[error("the KEK does not match this instance's data (wrong key file, PHYLAX_KEK or HSM key)")]
    WrongKek,
    #[error(
        "the key file belongs to the instance in {0}; give this instance its own (--key-file)"
    )]
    KeyFileOwned(String),
    #[error("PHYLAX_KEK is set but this instance's KEK is in an HSM ([hsm] in phylax.toml): unset PHYLAX_KEK")]
    KekAmbiguous,
    #[error("HSM PIN: {0}")]
    HsmPin(String),
    #[error("the database is not initialised for this instance; run `phylax init` against it")]
    DatabaseNotInitialized,
    #[error("file system: {0}")]
    Io(String),
    #[error("keys: {0}")]
    Keys(String),
    #[error("accounts: {0}")]
    Accounts(String),
    #[error("the audit log: {0}")]
    Audit(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Not `#[from]`: that would also make the store error this one's
    /// source, and the CLI (which prints the chain) would say it twice.
    #[error("database: {0}")]
    Store(StoreError),
}

impl From<StoreError> for InstanceError {
    fn from(e: StoreError) -> Self {
        InstanceError::Store(e)
    }
}

/// Options for `phylax init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub data_dir: PathBuf,
    pub key_file: Option<PathBuf>,
    pub listen: String,
    pub public_url: Option<String>,
    pub database_url: Option<String>,
    /// Extra DNS names or IP addresses for the server certificate.
    pub tls_names: Vec<String>,
    /// Keep the KEK in this HSM instead of a key file.
    pub hsm: Option<HsmSettings>,
}

/// An open instance: everything the server and the CLI need.
#[derive(Debug)]
pub struct Instance {
    pub data_dir: PathBuf,
    pub config: Config,
    pub store: DynStore,
    pub keys: Arc<KeyRing>,
    /// The access-token key, and the previous one while tokens it MACed
    /// may still be alive.
    pub token_key: MacKey,
    pub previous_token_key: Option<(MacKey, i64)>,
    pub cursor_keys: crate::data::cursor_keys::CursorSet,
    /// The sign-in key's live generations: hash bearer grants, recovery
    /// codes, enrollment links, usernames and CSRF tags.
    pub auth_keys: Arc<crate::data::auth_keys::AuthKeys>,
    pub blind_key: BlindIndexKey,
    /// The audit log service (its group-commit writer runs on the runtime
    /// that opened the instance).
    pub audit: Arc<crate::audit::log::AuditLog>,
}

fn io(e: std::io::Error) -> InstanceError {
    InstanceError::Io(e.to_string())
}

fn absolute(p: &Path) -> Result<PathBuf, InstanceError> {
    std::path::absolute(p).map_err(io)
}

/// Where the key file goes when `--key-file` is not given: beside the data
/// directory, never inside it.
pub fn default_key_file(data_dir: &Path) -> Result<PathBuf, InstanceError> {
    let abs = absolute(data_dir)?;
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "phylax".into());
    Ok(abs.with_file_name(format!("{name}-keys")).join("kek"))
}

fn database_url(
    data_dir: &Path,
    backend: Backend,
    given: Option<&str>,
) -> Result<String, InstanceError> {
    match (backend, given) {
        (Backend::Sqlite, None) => Ok(format!("sqlite:{}", data_dir.join("phylax.db").display())),
        (Backend::Sqlite, Some(_)) => Err(InstanceError::DatabaseUrlNotApplicable),
        (Backend::Postgres, Some(u)) => Ok(u.to_owned()),
        (Backend::Postgres, None) => Err(InstanceError::DatabaseUrlRequired),
    }
}

/// The HSM's settings with its PIN, read from the 0600 file or the
/// environment variable the configuration names.
pub fn hsm_config(h: &HsmSettings) -> Result<HsmConfig, InstanceError> {
    use std::os::unix::fs::PermissionsExt;
    let pin = match (&h.pin_file, &h.pin_env) {
        (Some(f), None) => {
            let meta = std::fs::metadata(f)
                .map_err(|e| InstanceError::HsmPin(format!("{}: {}", f.display(), e.kind())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(InstanceError::HsmPin(format!(
                    "{} must not be readable by group or others (chmod 600)",
                    f.display()
                )));
            }
            let raw =
                Secret::new(std::fs::read(f).map_err(|e| {
                    InstanceError::HsmPin(format!("{}: {}", f.display(), e.kind()))
                })?);
            let trimmed = raw.expose().trim_ascii().to_vec();
            Secret::new(trimmed)
        }
        (None, Some(var)) => Secret::new(
            std::env::var(var)
                .map_err(|_| InstanceError::HsmPin(format!("{var} is not set")))?
                .into_bytes(),
        ),
        _ => {
            return Err(InstanceError::HsmPin(
                "give exactly one of pin_file and pin_env".into(),
            ))
        }
    };
    if pin.is_empty() {
        return Err(InstanceError::HsmPin("the PIN is empty".into()));
    }
    Ok(HsmConfig {
        module: h.module.clone(),
        token: h.token.clone(),
        pin,
        key_label: h.key_label.clone(),
    })
}

/// Every provider the configuration names: `PHYLAX_KEK` replaces the key
/// file (as it always has); an HSM adds to the key file (while a KEK moves
/// into it) but never to `PHYLAX_KEK`, which would be ambiguous.
pub fn load_kek(config: &Config) -> Result<Kek, InstanceError> {
    let env = std::env::var("PHYLAX_KEK")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| Secret::new(v.into_bytes()));
    if env.is_some() && config.hsm.is_some() {
        return Err(InstanceError::KekAmbiguous);
    }
    let hsm = config.hsm.as_ref().map(hsm_config).transpose()?;
    let key_file = if env.is_some() {
        None
    } else {
        config.key_file.clone()
    };
    Ok(Kek::open(KekSpec { key_file, env, hsm })?)
}

/// Check that this KEK is the instance's: unwrap the canary. An instance
/// from before the canary is checked by its fingerprint (generation 1 as
/// a software key), then given one.
async fn verify_kek(store: &DynStore, kek: &Kek) -> Result<(), InstanceError> {
    if let Some(w) = store.get_wrapped_key(CANARY_ROW).await? {
        return match kek.unwrap(CANARY_PURPOSE, "", &w) {
            Ok(_) => Ok(()),
            Err(e @ CryptoError::UnknownGeneration(_)) => Err(e.into()),
            Err(_) => Err(InstanceError::WrongKek),
        };
    }
    match store.get_meta(META_KEK_CHECK).await? {
        None => return Err(InstanceError::DatabaseNotInitialized),
        Some(c) if Some(c.as_slice()) != kek.check_value().as_ref().map(|c| &c[..]) => {
            return Err(InstanceError::WrongKek)
        }
        Some(_) => {}
    }
    plant_canary(store, kek).await
}

async fn plant_canary(store: &DynStore, kek: &Kek) -> Result<(), InstanceError> {
    let fresh = kek.wrap(
        CANARY_PURPOSE,
        "",
        &Secret::new(phylax_crypto::random_array::<32>()?.to_vec()),
    )?;
    let stored = store
        .put_wrapped_key_if_absent(CANARY_ROW, &fresh, crate::base::clock::now_secs())
        .await?;
    kek.unwrap(CANARY_PURPOSE, "", &stored)
        .map(|_| ())
        .map_err(|_| InstanceError::WrongKek)
}

/// A KEK-wrapped key by row name, created (race-safely) on first use.
async fn wrapped(
    store: &DynStore,
    row: &str,
    make: impl FnOnce() -> Result<Vec<u8>, CryptoError>,
) -> Result<Vec<u8>, InstanceError> {
    if let Some(w) = store.get_wrapped_key(row).await? {
        return Ok(w);
    }
    let fresh = make()?;
    Ok(store
        .put_wrapped_key_if_absent(row, &fresh, crate::base::clock::now_secs())
        .await?)
}

async fn mac_key(store: &DynStore, kek: &Kek, purpose: &str) -> Result<MacKey, InstanceError> {
    let w = wrapped(store, &format!("mac:{purpose}"), || {
        MacKey::generate_wrapped(kek, purpose).map(|(_, w)| w)
    })
    .await?;
    MacKey::unwrap(kek, purpose, &w).map_err(|_| InstanceError::WrongKek)
}

/// The access-token keys: the newest (`mac:token@N`, or `mac:token` before
/// any rotation) and the one before, with the time until which tokens it
/// MACed can still be alive (docs/KEYS.md, "Rotating").
pub async fn token_keys(
    store: &DynStore,
    kek: &Kek,
) -> Result<(MacKey, Option<(MacKey, i64)>), InstanceError> {
    let n = token_generation(store).await?;
    let purpose = |n: u32| {
        if n == 1 {
            "token".to_owned()
        } else {
            format!("token@{n}")
        }
    };
    let current = mac_key(store, kek, &purpose(n)).await?;
    if n == 1 {
        return Ok((current, None));
    }
    let added = store
        .wrapped_key_created(&format!("mac:{}", purpose(n)))
        .await?
        .unwrap_or(0);
    let previous = match store
        .get_wrapped_key(&format!("mac:{}", purpose(n - 1)))
        .await?
    {
        Some(w) => Some((
            MacKey::unwrap(kek, &purpose(n - 1), &w).map_err(|_| InstanceError::WrongKek)?,
            added + phylax_auth::token::MAX_LIFETIME_SECS + 60,
        )),
        None => None,
    };
    Ok((current, previous))
}

pub use crate::data::key_events::{
    index_generation, index_key_row, token_generation, token_key_row, AUDIT_PATIENT_KEY,
    INDEX_KEY_DONE,
};

/// The search index key in force: the newest generation, with the one
/// before it while the index is being rebuilt (docs/KEYS.md, "Rotating").
pub async fn search_key(store: &DynStore, kek: &Kek) -> Result<BlindIndexKey, InstanceError> {
    let n = index_generation(store).await?;
    let done = store
        .get_meta(&format!("{INDEX_KEY_DONE}{n}"))
        .await?
        .is_some();
    // A key the index was rebuilt under is never made again: without it
    // every search would silently find nothing (fail closed instead).
    if n > 1 && done && store.get_wrapped_key(&index_key_row(n)).await?.is_none() {
        return Err(InstanceError::Io(format!(
            "the search index key {} is missing from the database (searches would find nothing): restore its wrapped_keys row from a backup (docs/KEYS.md, \"Recovery\")",
            index_key_row(n)
        )));
    }
    let w = wrapped(store, &index_key_row(n), || {
        BlindIndexKey::generate_wrapped_gen(kek, n).map(|(_, w)| w)
    })
    .await?;
    let current = BlindIndexKey::unwrap_gen(kek, n, &w).map_err(|_| InstanceError::WrongKek)?;
    if n == 1 || done {
        return Ok(current);
    }
    Ok(match store.get_wrapped_key(&index_key_row(n - 1)).await? {
        Some(w) => current.with_previous(
            BlindIndexKey::unwrap_gen(kek, n - 1, &w).map_err(|_| InstanceError::WrongKek)?,
        ),
        None => current,
    })
}

/// The audit log's patient index key: its own (`mac:audit-patient`), or
/// on an instance made before it existed the first search index key,
/// which then is never retired.
pub async fn audit_patient_key(
    store: &DynStore,
    kek: &Kek,
) -> Result<BlindIndexKey, InstanceError> {
    let (purpose, w) = match store.get_wrapped_key(AUDIT_PATIENT_KEY).await? {
        Some(w) => (phylax_crypto::blind::AUDIT_PURPOSE, w),
        None => (
            phylax_crypto::blind::PURPOSE,
            store
                .get_wrapped_key(&index_key_row(1))
                .await?
                .ok_or(InstanceError::DatabaseNotInitialized)?,
        ),
    };
    BlindIndexKey::unwrap_as(kek, purpose, &w).map_err(|_| InstanceError::WrongKek)
}

/// The new instance's KEK: created in the HSM, or the key file given (an
/// existing one is reused) or created; claimed for this data directory.
fn init_kek(
    hsm: Option<&HsmConfig>,
    key_file: &Path,
    data_dir: &Path,
) -> Result<Kek, InstanceError> {
    // A new key label in the HSM; else reuse a key file the operator
    // provides, or make one. Either names this instance as the one whose
    // rotations may change it (docs/KEYS.md); a key file another instance
    // owns is not taken over.
    let me = std::fs::canonicalize(data_dir)
        .unwrap_or_else(|_| data_dir.to_path_buf())
        .display()
        .to_string();
    let kek = match hsm {
        Some(h) => Kek::hsm_create(h, 1)?,
        None if key_file.exists() => Kek::from_file(key_file)?,
        None => Kek::create_file(key_file)?,
    };
    match kek.owner()? {
        Some((_, Some(owner))) if owner != me => Err(InstanceError::KeyFileOwned(owner)),
        _ => {
            kek.claim(&me)?;
            Ok(kek)
        }
    }
}

/// The local CA and server certificate (in the data directory) and their
/// private keys (0600, in the key directory); returns the server key's path.
/// A new local CA and server certificate in `data_dir/tls`, their keys in
/// `key_dir` under the name of `named` (the data directory they serve;
/// a restore writes into a directory renamed afterwards).
pub(crate) fn write_tls(
    data_dir: &Path,
    named: &Path,
    key_dir: &Path,
    names: &[String],
) -> Result<PathBuf, InstanceError> {
    let tls_key = key_dir.join(format!(
        "{}-tls-server-key.pem",
        named
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let ca_key = tls_key.with_file_name(
        tls_key
            .file_name()
            .map(|n| n.to_string_lossy().replace("server-key", "ca-key"))
            .unwrap_or_default(),
    );
    let generated = tls::generate(names)?;
    std::fs::write(data_dir.join("tls/ca.pem"), &generated.ca_cert_pem).map_err(io)?;
    std::fs::write(
        data_dir.join("tls/server.pem"),
        format!("{}{}", generated.server_cert_pem, generated.ca_cert_pem),
    )
    .map_err(io)?;
    if !tls_key.exists() {
        tls::write_private(&tls_key, generated.server_key_pem.expose())?;
        tls::write_private(&ca_key, generated.ca_key_pem.expose())?;
    } else {
        // A re-init after a removed config: keep the key file pair in
        // step with the new certificates.
        std::fs::write(&tls_key, generated.server_key_pem.expose()).map_err(io)?;
        std::fs::write(&ca_key, generated.ca_key_pem.expose()).map_err(io)?;
    }
    Ok(tls_key)
}

/// The account service over `store` with the configured hashing
/// parameters, hashing under `auth_keys`.
pub fn accounts_for(
    config: &Config,
    store: &DynStore,
    keys: &Arc<KeyRing>,
    auth_keys: Arc<crate::data::auth_keys::AuthKeys>,
) -> Result<crate::data::accounts::Accounts, InstanceError> {
    let a = &config.auth;
    let params = phylax_crypto::password::PasswordParams::new(
        a.argon2_memory_kib,
        a.argon2_iterations,
        a.argon2_parallelism,
    )?;
    let roles = config.roles().map_err(InstanceError::Io)?;
    crate::data::accounts::Accounts::new(
        store.clone(),
        keys.clone(),
        auth_keys,
        params,
        a.password_min_length,
        std::sync::Arc::new(roles),
    )
    .map(|acc| {
        acc.with_argon2_limit(
            a.argon2_max_concurrent,
            std::time::Duration::from_secs(a.argon2_queue_secs),
        )
    })
    .map_err(|e| InstanceError::Io(e.to_string()))
}

impl Instance {
    /// The account service (users, passwords, second factors) for this
    /// instance, with its configured hashing parameters.
    pub fn accounts(&self) -> Result<crate::data::accounts::Accounts, InstanceError> {
        accounts_for(
            &self.config,
            &self.store,
            &self.keys,
            self.auth_keys.clone(),
        )
    }

    /// Create a new instance. Refuses to touch an existing one.
    pub async fn init(opts: &InitOptions) -> Result<Config, InstanceError> {
        use std::os::unix::fs::PermissionsExt;
        let data_dir = absolute(&opts.data_dir)?;
        if data_dir.join(CONFIG_FILE).exists() {
            return Err(InstanceError::AlreadyInitialized(
                data_dir.display().to_string(),
            ));
        }
        let key_file = match &opts.key_file {
            Some(k) => absolute(k)?,
            None => default_key_file(&data_dir)?,
        };
        if key_file.starts_with(&data_dir) {
            return Err(InstanceError::KeyInsideDataDir);
        }
        // The HSM's PIN and token are checked before anything is written.
        let hsm = opts.hsm.as_ref().map(hsm_config).transpose()?;
        let key_dir = key_file
            .parent()
            .map(Path::to_path_buf)
            .ok_or(InstanceError::KeyInsideDataDir)?;
        std::fs::create_dir_all(data_dir.join("tls")).map_err(io)?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        std::fs::create_dir_all(&key_dir).map_err(io)?;
        std::fs::set_permissions(&key_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;

        let kek = init_kek(hsm.as_ref(), &key_file, &data_dir)?;

        let tls_key = write_tls(&data_dir, &data_dir, &key_dir, &opts.tls_names)?;

        let backend = if opts.database_url.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let config = Config {
            listen: opts.listen.clone(),
            public_url: opts
                .public_url
                .clone()
                .unwrap_or_else(|| format!("https://{}", opts.listen)),
            key_file: if hsm.is_some() {
                None
            } else {
                Some(key_file.clone())
            },
            hsm: opts.hsm.clone(),
            keys: Default::default(),
            backend,
            tls: TlsConfig {
                cert: PathBuf::from("tls/server.pem"),
                key: tls_key,
                ca: PathBuf::from("tls/ca.pem"),
                ocsp: None,
                client_ca: None,
            },
            http: Default::default(),
            auth: Default::default(),
            log: Default::default(),
            roles: Vec::new(),
            audit: Default::default(),
            metrics: Default::default(),
            detect: Default::default(),
            access: Default::default(),
            rate: Default::default(),
            backup: Default::default(),
        };
        let url = database_url(&data_dir, backend, opts.database_url.as_deref())?;
        let store = phylax_store::open(&url).await?;
        if store.get_wrapped_key(CANARY_ROW).await?.is_some() {
            verify_kek(&store, &kek).await?;
        } else if let Some(check) = kek.check_value() {
            let stored = store.put_meta_if_absent(META_KEK_CHECK, &check).await?;
            if stored != check {
                return Err(InstanceError::WrongKek);
            }
        }
        plant_canary(&store, &kek).await?;
        store
            .put_meta_if_absent(
                &format!("kek_generation:{}", kek.current()),
                crate::base::clock::now_secs().to_string().as_bytes(),
            )
            .await?;
        store
            .put_meta_if_absent(
                META_INSTANCE_ID,
                uuid::Uuid::new_v4().to_string().as_bytes(),
            )
            .await?;
        mac_key(&store, &kek, "token").await?;
        mac_key(&store, &kek, "cursor").await?;
        mac_key(&store, &kek, "auth").await?;
        // The audit's patient index key first: a search index key alone
        // would mark the instance as one made before it existed.
        wrapped(&store, AUDIT_PATIENT_KEY, || {
            BlindIndexKey::generate_wrapped_as(&kek, phylax_crypto::blind::AUDIT_PURPOSE)
                .map(|(_, w)| w)
        })
        .await?;
        search_key(&store, &kek).await?;
        // Written last: an instance is initialised only when all of the above
        // succeeded, so a failed init can simply be run again.
        config.save(&data_dir)?;
        Ok(config)
    }

    /// Open an existing instance: configuration, KEK, store, keys. Fails
    /// closed on a wrong KEK, loose key-file permissions or a missing database.
    pub async fn open(
        data_dir: &Path,
        database_url_arg: Option<&str>,
    ) -> Result<Instance, InstanceError> {
        let data_dir = absolute(data_dir)?;
        if !data_dir.join(CONFIG_FILE).exists() {
            return Err(InstanceError::NotInitialized(
                data_dir.display().to_string(),
            ));
        }
        let config = Config::load(&data_dir)?;
        let kek = load_kek(&config)?;
        let url = database_url(&data_dir, config.backend, database_url_arg)?;
        let store = phylax_store::open(&url).await?;
        verify_kek(&store, &kek).await?;
        let (token_key, previous_token_key) = token_keys(&store, &kek).await?;
        let cursor_keys =
            crate::data::cursor_keys::load(&store, &kek)
                .await
                .map_err(|e| match e {
                    crate::data::cursor_keys::CursorKeyError::Store(e) => InstanceError::Store(e),
                    _ => InstanceError::WrongKek,
                })?;
        let auth_keys = Arc::new(
            crate::data::auth_keys::AuthKeys::load(&store, &kek)
                .await
                .map_err(|e| match e {
                    crate::data::auth_keys::AuthKeyError::Store(e) => InstanceError::Store(e),
                    crate::data::auth_keys::AuthKeyError::Unwrap(_) => InstanceError::WrongKek,
                    e => InstanceError::Keys(e.to_string()),
                })?,
        );
        let blind_key = search_key(&store, &kek).await?;
        let audit_blind = Arc::new(audit_patient_key(&store, &kek).await?);
        let keys = Arc::new(KeyRing::new(kek, store.clone()));
        keys.set_data_generation(crate::data::key_events::data_generation(&store).await?);
        let instance_id = store
            .get_meta(META_INSTANCE_ID)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or(InstanceError::DatabaseNotInitialized)?;
        let checkpoint_file = config
            .audit
            .checkpoint_file
            .as_ref()
            .map(|p| data_dir.join(p));
        let audit = crate::audit::log::AuditLog::open(
            store.clone(),
            &keys,
            audit_blind,
            format!("phylax/{instance_id}"),
            checkpoint_file,
            config.audit.retention_days,
        )
        .await
        .map_err(|e| InstanceError::Audit(e.to_string()))?;
        // Accounts sealed before they named their role and status are
        // bound once, before anything reads them.
        accounts_for(&config, &store, &keys, auth_keys.clone())?
            .bind_all()
            .await
            .map_err(|e| InstanceError::Accounts(e.to_string()))?;
        Ok(Instance {
            data_dir,
            config,
            store,
            keys,
            token_key,
            previous_token_key,
            cursor_keys,
            auth_keys,
            blind_key,
            audit,
        })
    }

    /// The TLS files the server loads (`[tls]`), as paths.
    pub fn cert_files(&self) -> crate::net::certs::CertFiles {
        let at = |p: &PathBuf| self.data_dir.join(p);
        crate::net::certs::CertFiles {
            cert: self.cert_path(),
            key: self.config.tls.key.clone(),
            ocsp: self.config.tls.ocsp.as_ref().map(at),
            client_ca: self.config.tls.client_ca.as_ref().map(at),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join(&self.config.tls.ca)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.data_dir.join(&self.config.tls.cert)
    }
}
