//! The application state: every subsystem, assembled once at start
//! ([`AppState::new`]) from an opened [`Instance`], and the background
//! tasks that keep its caches fresh.
//!
//! # Layout
//! - [`fhir`]: [`FhirState`], what the FHIR REST handlers receive: the
//!   access layer and the wire's needs, no accounts, clients or tokens.
//! - [`authn`]: [`AuthnState`], what the sign-in pages and the token
//!   endpoint receive (and nothing else: no repository, no access layer).
//! - this file: [`AppState`], which the middleware, the operator tasks
//!   (`crate::ops`) and the background tasks receive; it holds both
//!   states above and what only the middleware needs.

mod authn;
mod fhir;

pub use authn::{Authn, AuthnState};
pub use fhir::FhirState;

use crate::access::gate::Gate;
use crate::base::config::Config;
use crate::base::error::Failure;
use crate::data::accounts::Accounts;
use crate::data::clients::Clients;
use crate::data::grants::Grants;
use crate::data::keyring::KeyRing;
use crate::data::repo::Repo;
use crate::data::revocations::Revoked;
use crate::instance::Instance;
use phylax_auth::assertion::Verifier;
use phylax_auth::throttle::Throttle;
use phylax_auth::TokenIssuer;
use phylax_store::MetaStore;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// The whole application: what the middleware and the operator tasks
/// receive. Handlers receive one of its parts ([`FhirState`],
/// [`AuthnState`]), never this.
#[derive(Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    /// The instance's data directory (relative paths in the config).
    pub data_dir: std::path::PathBuf,
    pub fhir_base: String,
    /// The access layer: it owns the resource repository. The FHIR
    /// handlers hold it through [`FhirState`].
    pub gate: Arc<Gate>,
    /// The database backend's name ("sqlite", "postgres"), for logs.
    pub backend: &'static str,
    /// Registered clients (the raw store is held only by the subsystems
    /// that own its tables; see docs/ARCHITECTURE.md).
    pub clients: Clients,
    pub audit: Arc<crate::audit::log::AuditLog>,
    /// Clients disabled in the database, refreshed every few seconds so that
    /// disabling a client also stops its unexpired tokens without a database
    /// read per request.
    pub disabled_clients: parking_lot::RwLock<HashSet<String>>,
    pub accounts: Accounts,
    pub keys: Arc<KeyRing>,
    /// Built-in and configured roles.
    pub roles: Arc<phylax_auth::roles::Roles>,
    /// Counters for `GET /metrics`.
    pub metrics: Arc<crate::base::metrics::Metrics>,
    /// Sign-in and tokens: what the `authn` handlers receive. The token
    /// middleware uses its issuer, revocations and rate limits too.
    pub authn: Arc<AuthnState>,
    /// What the FHIR handlers receive.
    pub fhir: Arc<FhirState>,
    /// Flagged (VIP) patients, for the `vip-access` rule.
    pub vip: crate::audit::detect::VipSet,
    /// The breach register (`phylax incident …`).
    pub incidents: crate::data::incidents::Incidents,
    /// Addresses refused on every route (incident containment).
    pub blocks: crate::data::blocks::Blocks,
    /// Other processes' key events (rotations, erasures) to follow.
    key_watch: Arc<(phylax_store::DynStore, crate::data::key_events::KeyEvents)>,
    /// The sign-in key generations the accounts and grants hash under
    /// (reloaded when a rotation adds or retires one).
    auth_keys: Arc<crate::data::auth_keys::AuthKeys>,
    /// Key kinds whose reload after an event failed: tried again at the
    /// next poll.
    reload_pending: parking_lot::Mutex<Vec<String>>,
}

/// How often the flagged (VIP) patient list is refreshed.
pub const VIP_REFRESH: Duration = Duration::from_secs(5);

/// How often the disabled-client list is refreshed.
pub const DISABLED_REFRESH: Duration = Duration::from_secs(3);

impl AppState {
    pub async fn new(inst: Instance) -> Result<Arc<AppState>, Failure> {
        let accounts = inst
            .accounts()
            .map_err(|e| Failure::Internal(e.to_string()))?;
        let Instance {
            config,
            store,
            keys,
            token_key,
            previous_token_key,
            cursor_keys,
            blind_key,
            auth_keys,
            audit,
            data_dir,
            ..
        } = inst;
        let grants = Grants::new(store.clone(), keys.clone(), auth_keys.clone());
        let passkeys = config
            .passkey_party()
            .map_err(|e| Failure::Internal(e.to_string()))?;
        let roles = Arc::new(config.roles().map_err(Failure::Internal)?);
        let signing = keys
            .signing_keys()
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?
            .into_iter()
            .map(Arc::new)
            .collect();
        let fhir_base = config.fhir_base();
        let verifier =
            Verifier::new(config.token_url()).map_err(|e| Failure::Internal(e.to_string()))?;
        let tokens = TokenIssuer::new(
            token_key,
            format!("{}/auth", config.public_url),
            fhir_base.clone(),
            config.auth.token_lifetime_secs,
        )
        .with_previous(previous_token_key);
        let capability = crate::base::capability::capability_statement(&config);
        let smart_config = crate::base::capability::smart_configuration(&config);
        let config = Arc::new(config);
        let metrics: Arc<crate::base::metrics::Metrics> = Arc::default();
        let clients = Clients::new(store.clone());
        let authn = Arc::new(AuthnState {
            config: config.clone(),
            fhir_base: fhir_base.clone(),
            accounts: accounts.clone(),
            grants,
            clients: clients.clone(),
            throttle: Throttle::new(),
            passkeys,
            audit: audit.clone(),
            tokens,
            verifier: Arc::new(verifier),
            smart_config,
            revoked: parking_lot::RwLock::new(Revoked::default()),
            rate: phylax_auth::rate::RateLimiter::new(),
            signing: parking_lot::RwLock::new(signing),
            roles: roles.clone(),
            metrics: metrics.clone(),
        });
        let gate = Arc::new(Gate::new(
            Repo::new(store.clone(), keys.clone(), blind_key, fhir_base.clone())
                .with_aliases(&config.http.base_aliases),
            store.clone(),
            keys.clone(),
            accounts.clone(),
            audit.clone(),
            config.access.clone(),
        ));
        let eraser = Arc::new(crate::keys::erase::Eraser::new(
            store.clone(),
            keys.clone(),
            audit.clone(),
            data_dir.clone(),
            config.clone(),
        ));
        let fhir = Arc::new(FhirState {
            config: config.clone(),
            fhir_base: fhir_base.clone(),
            gate: gate.clone(),
            cursors: crate::data::cursor_keys::CursorKeys::new(cursor_keys),
            keys: keys.clone(),
            audit: audit.clone(),
            capability,
            metrics: metrics.clone(),
            eraser,
        });
        let st = Arc::new(AppState {
            incidents: crate::data::incidents::Incidents::new(store.clone(), keys.clone()),
            blocks: crate::data::blocks::Blocks::new(store.clone()),
            gate,
            backend: store.backend(),
            clients,
            fhir_base,
            audit,
            disabled_clients: parking_lot::RwLock::new(HashSet::new()),
            accounts,
            keys,
            roles,
            config,
            data_dir,
            metrics,
            authn,
            fhir,
            vip: Default::default(),
            auth_keys,
            reload_pending: Default::default(),
            key_watch: Arc::new((
                store.clone(),
                crate::data::key_events::KeyEvents::new(&store)
                    .await
                    .map_err(|e| Failure::Unavailable(e.to_string()))?,
            )),
        });
        st.start(&store).await?;
        Ok(st)
    }

    /// What a new state does before it serves: the disabled-client list,
    /// the configuration-change record, the search index of data written
    /// before it existed.
    async fn start(&self, store: &phylax_store::DynStore) -> Result<(), Failure> {
        self.refresh_disabled()
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        self.record_config_change(&**store).await?;
        let n = crate::access::maintenance::start(&self.gate).await?;
        if n > 0 {
            tracing::info!(resources = n, "search index built for existing resources");
        }
        Ok(())
    }

    /// Reread the flagged (VIP) patients: Patients carrying one of
    /// `detect.vip_tags` in `meta.tag` or `meta.security`.
    pub async fn refresh_vip(&self) -> Result<(), Failure> {
        let flagged = self
            .gate
            .flagged_patients(&self.config.detect.vip_tags)
            .await?;
        if let Some(ids) = flagged {
            *self.vip.write() = ids;
        }
        Ok(())
    }

    pub async fn refresh_disabled(&self) -> Result<(), phylax_store::StoreError> {
        let set = self.clients.disabled().await?;
        *self.disabled_clients.write() = set;
        let revoked = self
            .authn
            .grants
            .revoked(crate::base::clock::now_secs())
            .await?;
        *self.authn.revoked.write() = revoked;
        self.blocks.refresh().await?;
        // A signing key added on another node (or by the CLI).
        let known = self.authn.signing.read().len();
        if self.keys.signing_key_added(known).await.unwrap_or(false) {
            match self.keys.signing_keys().await {
                Ok(k) => *self.authn.signing.write() = k.into_iter().map(Arc::new).collect(),
                Err(e) => tracing::error!(error = %e, "could not load the new signing key"),
            }
        }
        Ok(())
    }

    /// The alert webhook, if configured: its HMAC secret (a 0600 file of at
    /// least 32 bytes) and an HTTPS client trusting only the given CA.
    fn webhook(&self) -> Result<Option<crate::audit::detect::Webhook>, String> {
        use std::os::unix::fs::PermissionsExt;
        let d = &self.config.detect;
        let Some(url) = &d.webhook_url else {
            return Ok(None);
        };
        let secret_path = d
            .webhook_secret_file
            .as_ref()
            .ok_or("detect.webhook_secret_file is required")?;
        let meta = std::fs::metadata(secret_path).map_err(|e| e.to_string())?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err("the webhook secret file must not be readable by group or others".into());
        }
        let raw = std::fs::read(secret_path).map_err(|e| e.to_string())?;
        let key =
            phylax_crypto::MacKey::shared(&phylax_crypto::Secret::new(raw.trim_ascii().to_vec()))
                .map_err(|_| "the webhook secret must be at least 32 bytes".to_string())?;
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .timeout(Duration::from_secs(10));
        if let Some(ca) = &d.webhook_ca_file {
            let pem = std::fs::read(self.data_dir.join(ca)).map_err(|e| e.to_string())?;
            b = b.tls_built_in_root_certs(false);
            for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
                b = b.add_root_certificate(c);
            }
        }
        Ok(Some(crate::audit::detect::Webhook {
            url: url.clone(),
            key: Arc::new(key),
            client: b.build().map_err(|e| e.to_string())?,
            spool: self.data_dir.join("alert-spool"),
        }))
    }

    /// The syslog collector, if configured.
    fn syslog_config(&self) -> Result<Option<crate::audit::export::SyslogConfig>, String> {
        let a = &self.config.audit;
        let (Some(target), Some(ca)) = (&a.syslog_tls, &a.syslog_ca_file) else {
            return Ok(None);
        };
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
            .ok_or("audit.syslog_tls must be host:port")?;
        let pem = std::fs::read(self.data_dir.join(ca)).map_err(|e| e.to_string())?;
        let hostname = url_host(&self.config.public_url)
            .unwrap_or("phylax")
            .to_owned();
        Ok(Some(crate::audit::export::SyslogConfig {
            host,
            port,
            pos_file: self.data_dir.join("audit-syslog.pos"),
            hostname,
            tls: crate::audit::export::syslog_tls(&pem)?,
        }))
    }

    /// Where the audit log is exported, if configured (relative paths are
    /// under the data directory).
    pub fn export_config(&self) -> Option<crate::audit::export::ExportConfig> {
        let a = &self.config.audit;
        a.export_file
            .as_ref()
            .map(|f| crate::audit::export::ExportConfig {
                file: self.data_dir.join(f),
                max_bytes: a.export_max_bytes,
                keep: a.export_keep,
            })
    }

    /// Record a configuration this instance has not run with before (the
    /// first node to start with it records it; fail closed: a node whose
    /// record cannot be written does not start).
    async fn record_config_change(&self, meta: &dyn MetaStore) -> Result<(), Failure> {
        let text = toml::to_string(&*self.config).map_err(|e| Failure::Internal(e.to_string()))?;
        let hash = hex::encode(phylax_audit::merkle::sha256(text.as_bytes()));
        let mine = crate::audit::log::new_event_id();
        let stored = meta
            .put_meta_if_absent(&format!("config_seen:{hash}"), mine.as_bytes())
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        if stored != mine.as_bytes() {
            return Ok(());
        }
        let ev = crate::audit::log::AuthEvent {
            kind: phylax_audit::event::EventKind::Security("config"),
            action: phylax_audit::event::Action::Update,
            outcome: phylax_audit::event::Outcome::Success,
            detail: format!("started with a new configuration (sha256 {hash})"),
            user: None,
            client: Some("phylax-server".into()),
            ip: None,
        };
        self.audit
            .record_auth(ev)
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))
    }

    /// Keep the disabled-client list fresh until the process ends.
    pub fn spawn_background(self: &Arc<Self>) {
        self.audit
            .spawn_sealer(Duration::from_secs(self.config.audit.checkpoint_secs));
        crate::backup::schedule::spawn(crate::backup::schedule::Node {
            store: self.key_store().clone(),
            audit: self.audit.clone(),
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
        });
        if self.config.detect.enabled {
            match self.webhook() {
                Ok(webhook) => {
                    let weak = Arc::downgrade(self);
                    let r = crate::audit::detect::Responder {
                        audit: self.audit.clone(),
                        accounts: self.accounts.clone(),
                        metrics: Arc::new(move |rule, sev| {
                            if let Some(st) = weak.upgrade() {
                                st.metrics.alert(rule, sev);
                            }
                        }),
                        webhook,
                        incidents: self.incidents.clone(),
                    };
                    let d = crate::audit::detect::start(
                        self.config.detect.clone(),
                        r,
                        self.vip.clone(),
                    );
                    if !self.config.detect.vip_tags.is_empty() {
                        let weak = Arc::downgrade(self);
                        tokio::spawn(async move {
                            loop {
                                let Some(st) = weak.upgrade() else { return };
                                if let Err(e) = st.refresh_vip().await {
                                    tracing::warn!(error = ?e, "could not refresh the flagged-patient list");
                                }
                                drop(st);
                                tokio::time::sleep(VIP_REFRESH).await;
                            }
                        });
                    }
                    self.audit.set_detector(d);
                }
                Err(e) => {
                    tracing::error!(error = %e, "alert webhook not configured correctly; detection runs without it")
                }
            }
        }
        if let Some(cfg) = self.export_config() {
            self.audit.spawn_exporter(cfg, Duration::from_secs(2));
        }
        match self.syslog_config() {
            Ok(Some(cfg)) => self.audit.spawn_syslog(cfg, Duration::from_secs(2)),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "audit syslog not configured correctly; not sending")
            }
        }
        self.gate.spawn_consent_poller();
        self.spawn_key_watch();
        let st = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DISABLED_REFRESH).await;
                let Some(st) = st.upgrade() else { return };
                if let Err(e) = st.refresh_disabled().await {
                    tracing::warn!(error = %e, "could not refresh the disabled-client list");
                }
            }
        });
    }
}

impl AppState {
    /// Follow other processes' key events (`ops::keys::spawn_key_watch`
    /// polls this each second).
    pub async fn follow_key_events(&self) -> Result<(), crate::data::key_events::KeyEventError> {
        let (store, events) = &*self.key_watch;
        let mut seen = events.poll(store, &self.keys).await?;
        // Kinds whose reload failed before are tried again until it works
        // (the event that announced them is not seen twice).
        seen.extend(std::mem::take(&mut *self.reload_pending.lock()));
        let failed = |kind: &str| self.reload_pending.lock().push(kind.to_owned());
        if seen.iter().any(|k| k == "tokens") {
            // A new access-token key: issue with it, keep verifying the
            // previous one for a token lifetime.
            match crate::instance::token_keys(store, self.keys.kek()).await {
                Ok((current, previous)) => self.authn.tokens.set_keys(current, previous),
                Err(e) => {
                    failed("tokens");
                    tracing::error!(error = %e, "could not load the new access-token key")
                }
            }
        }
        if seen.iter().any(|k| k == crate::data::auth_keys::KIND) {
            // A sign-in key generation added (hash new grants under it) or
            // retired (stop trying it).
            match crate::data::auth_keys::AuthKeys::load(store, self.keys.kek()).await {
                Ok(set) => self.auth_keys.replace(set),
                Err(e) => {
                    failed(crate::data::auth_keys::KIND);
                    tracing::error!(error = %e, "could not load the sign-in keys")
                }
            }
        }
        if seen.iter().any(|k| k == "cursors") {
            // New cursors under the new generation; those issued before
            // still open under the previous one.
            match crate::data::cursor_keys::load(store, self.keys.kek()).await {
                Ok(set) => self.fhir.cursors.replace(set),
                Err(e) => {
                    failed("cursors");
                    tracing::error!(error = %e, "could not load the new cursor keys")
                }
            }
        }
        if seen.iter().any(|k| k == "data-keys") {
            // A new data-key generation seals new versions from now on.
            match crate::data::key_events::data_generation(store).await {
                Ok(n) => {
                    self.keys.set_data_generation(n);
                    // Keys a rotation deleted must not go on sealing or
                    // opening from memory.
                    self.keys.forget_data_keys();
                }
                Err(e) => {
                    failed("data-keys");
                    tracing::error!(error = %e, "could not read the data-key generation")
                }
            }
        }
        if seen.iter().any(|k| k == "checkpoint") {
            // A new checkpoint key signs from now on; older ones verify.
            if let Err(e) = self.audit.reload_checkpoint_keys(&self.keys).await {
                failed("checkpoint");
                tracing::error!(error = %e, "could not load the new checkpoint key");
            }
        }
        if seen.iter().any(|k| k == "index") {
            // A search index key added (write under it, search under it
            // and the one before) or its rebuild finished (only it).
            match crate::instance::search_key(store, self.keys.kek()).await {
                Ok(key) => self.gate.set_search_key(key),
                Err(e) => {
                    failed("index");
                    tracing::error!(error = %e, "could not load the new search index key")
                }
            }
        }
        Ok(())
    }

    /// The store, for key administration's read of key ages.
    pub fn key_store(&self) -> &phylax_store::DynStore {
        &self.key_watch.0
    }

    /// Warn once at start about keys older than `[keys] max_age_days`, then
    /// follow other processes' key events each second (a KEK generation added
    /// or retired: reload the providers; a patient erased: forget unwrapped
    /// data keys; a token or search index key added: use it).
    fn spawn_key_watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Some(s) = weak.upgrade() {
                warn_old_keys(&s).await;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = s.follow_key_events().await {
                    tracing::error!(error = %e, "could not follow a key event");
                }
            }
        });
    }
}

async fn warn_old_keys(st: &AppState) {
    let admin = crate::keys::KeyAdmin {
        store: st.key_store(),
        kek: st.keys.kek(),
        audit: &st.audit,
        data_dir: &st.data_dir,
        grace: Duration::ZERO,
        keys: &st.keys,
        config: &st.config,
        max_rate: None,
    };
    match admin.status(st.config.keys.max_age_days).await {
        Ok(status) => {
            for k in status.keys.iter().filter(|k| k.overdue) {
                tracing::warn!(key = %k.id, kind = k.kind, age_days = k.age_days, "key older than keys.max_age_days: rotate it (phylax keys rotate, docs/KEYS.md)");
            }
            for g in status.kek.iter().filter(|g| g.overdue) {
                tracing::warn!(generation = g.generation, age_days = ?g.age_days, "KEK older than keys.max_age_days: rotate it (phylax keys rotate --kek)");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read key ages"),
    }
}

/// The host part of an `https://host:port` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let host = rest.split(['/', ':']).next()?;
    (!host.is_empty()).then_some(host)
}
