//! Router, shared state and middleware.
//!
//! Middleware, outermost first: request id (a fresh UUID per request, in the
//! `X-Request-Id` response header and every OperationOutcome) → access log
//! (route template, status, latency: never a query string or body) →
//! security headers → error normalisation (any bare error response becomes
//! an OperationOutcome) → CORS (only when origins are configured) → routes.
//! FHIR routes other than `metadata` and the SMART discovery document also
//! pass the bearer-token check.

use crate::base::config::Config;
use crate::data::accounts::Accounts;
use crate::data::grants::Grants;
use crate::data::keyring::KeyRing;
use crate::data::repo::Repo;
use crate::data::revocations::Revoked;
use crate::instance::Instance;
use crate::rest::error::{outcome_response, ApiError, REQUEST_ID};
use crate::rest::pipeline::RequestCtx;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use phylax_auth::assertion::Verifier;
use phylax_auth::policy::Principal;
use phylax_auth::throttle::Throttle;
use phylax_auth::{ScopeSet, TokenIssuer};
use phylax_crypto::signing::SigningKey;
use phylax_crypto::MacKey;
use phylax_fhir::{Issue, IssueCode, OperationOutcome};
use phylax_store::DynStore;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    /// The instance's data directory (relative paths in the config).
    pub data_dir: std::path::PathBuf,
    pub fhir_base: String,
    pub repo: Repo,
    pub store: DynStore,
    pub tokens: TokenIssuer,
    pub verifier: Arc<Verifier>,
    pub cursor_key: MacKey,
    pub audit: Arc<crate::audit::log::AuditLog>,
    pub capability: serde_json::Value,
    pub smart_config: serde_json::Value,
    /// Clients disabled in the database, refreshed every few seconds so that
    /// disabling a client also stops its unexpired tokens without a database
    /// read per request.
    pub disabled_clients: parking_lot::RwLock<HashSet<String>>,
    /// Revoked users, grant families and tokens (same refresh cycle).
    pub revoked: parking_lot::RwLock<Revoked>,
    pub accounts: Accounts,
    pub grants: Grants,
    /// Growing delays after failed sign-ins, per client IP and per account.
    pub throttle: Throttle,
    /// Request rate limits per user, client and address (`[rate]`).
    pub rate: phylax_auth::rate::RateLimiter,
    /// `id_token` signing keys, oldest first; the last one signs.
    pub signing: parking_lot::RwLock<Vec<Arc<SigningKey>>>,
    pub keys: Arc<KeyRing>,
    /// The WebAuthn relying party (RP id and origins) for passkeys.
    pub passkeys: phylax_auth::passkey::RelyingParty,
    /// Built-in and configured roles.
    pub roles: Arc<phylax_auth::roles::Roles>,
    /// Counters for `GET /metrics`.
    pub metrics: crate::base::metrics::Metrics,
    /// Care relationships per user, briefly reused (see `access`).
    pub care_cache: crate::access::reach::CareCache,
    /// Patients' privacy consents as deny rules (see `consent`).
    pub consents: crate::access::consent::Consents,
    /// Flagged (VIP) patients, for the `vip-access` rule.
    pub vip: crate::audit::detect::VipSet,
    /// The `_security` index hashes of `access.restricted_labels`
    /// (computed once: every search by a caller without the label
    /// permission carries them).
    pub label_hashes: std::sync::OnceLock<Vec<Vec<u8>>>,
}

/// How often the flagged (VIP) patient list is refreshed.
pub const VIP_REFRESH: Duration = Duration::from_secs(5);

/// How often the disabled-client list is refreshed.
pub const DISABLED_REFRESH: Duration = Duration::from_secs(3);

impl AppState {
    pub async fn new(inst: Instance) -> Result<Arc<AppState>, ApiError> {
        let accounts = inst
            .accounts()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let Instance {
            config,
            store,
            keys,
            token_key,
            cursor_key,
            blind_key,
            auth_key,
            audit,
            data_dir,
            ..
        } = inst;
        let grants = Grants::new(store.clone(), keys.clone(), auth_key);
        let passkeys = config
            .passkey_party()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let roles = Arc::new(config.roles().map_err(ApiError::Internal)?);
        let signing = keys
            .signing_keys()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .into_iter()
            .map(Arc::new)
            .collect();
        let fhir_base = config.fhir_base();
        let verifier =
            Verifier::new(config.token_url()).map_err(|e| ApiError::Internal(e.to_string()))?;
        let tokens = TokenIssuer::new(
            token_key,
            format!("{}/auth", config.public_url),
            fhir_base.clone(),
            config.auth.token_lifetime_secs,
        );
        let capability = crate::rest::capability::capability_statement(&config);
        let smart_config = crate::authn::token::smart_configuration(&config);
        let st = Arc::new(AppState {
            repo: Repo::new(store.clone(), keys.clone(), blind_key, fhir_base.clone())
                .with_aliases(&config.http.base_aliases),
            store,
            fhir_base,
            tokens,
            verifier: Arc::new(verifier),
            cursor_key,
            audit,
            capability,
            smart_config,
            disabled_clients: parking_lot::RwLock::new(HashSet::new()),
            revoked: parking_lot::RwLock::new(Revoked::default()),
            accounts,
            grants,
            throttle: Throttle::new(),
            rate: phylax_auth::rate::RateLimiter::new(),
            signing: parking_lot::RwLock::new(signing),
            keys,
            passkeys,
            roles,
            config,
            data_dir,
            metrics: Default::default(),
            care_cache: Default::default(),
            consents: Default::default(),
            vip: Default::default(),
            label_hashes: Default::default(),
        });
        st.refresh_disabled()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        st.record_config_change().await?;
        let n = st.repo.reindex_if_needed().await.map_err(ApiError::from)?;
        // Not fatal: a record that fails to open is reported, and the job
        // runs again at the next start.
        if let Err(e) = crate::maintenance::canonicalize_stored_references(&st).await {
            tracing::error!(error = ?e, "references to this server could not all be made canonical; retried at the next start");
        }
        // Consents are enforced from the first request: no index, no start.
        st.consents.refresh(&st.repo).await?;
        if n > 0 {
            tracing::info!(resources = n, "search index built for existing resources");
        }
        Ok(st)
    }

    /// Reread the flagged (VIP) patients: Patients carrying one of
    /// `detect.vip_tags` in `meta.tag` or `meta.security`.
    pub async fn refresh_vip(&self) -> Result<(), ApiError> {
        let key = self.repo.blind_key();
        let mut group = Vec::new();
        for t in &self.config.detect.vip_tags {
            if let Some((sys, code)) = t.split_once('|') {
                for param in ["_tag", "_security"] {
                    group.push(phylax_store::Cond::Hash {
                        param: param.into(),
                        hashes: vec![crate::data::search::token_hash(key, param, sys, code)],
                    });
                }
            }
        }
        if group.is_empty() {
            return Ok(());
        }
        let rows = self
            .repo
            .search_unconfined(&phylax_store::SearchQuery {
                rtype: "Patient".into(),
                and: vec![group],
                before_seq: None,
                limit: 100_000,
            })
            .await?;
        *self.vip.write() = rows.iter().map(|v| v.id.to_string()).collect();
        Ok(())
    }

    pub async fn refresh_disabled(&self) -> Result<(), phylax_store::StoreError> {
        let set: HashSet<String> = self
            .store
            .list_clients()
            .await?
            .into_iter()
            .filter(|c| c.disabled)
            .map(|c| c.id)
            .collect();
        *self.disabled_clients.write() = set;
        let revoked = Revoked::load(&self.store, crate::base::clock::now_secs()).await?;
        *self.revoked.write() = revoked;
        // A signing key added on another node (or by the CLI).
        let known = self.signing.read().len();
        if self.keys.signing_key_added(known).await.unwrap_or(false) {
            match self.keys.signing_keys().await {
                Ok(k) => *self.signing.write() = k.into_iter().map(Arc::new).collect(),
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
    async fn record_config_change(&self) -> Result<(), ApiError> {
        let text = toml::to_string(&self.config).map_err(|e| ApiError::Internal(e.to_string()))?;
        let hash = hex::encode(phylax_audit::merkle::sha256(text.as_bytes()));
        let mine = crate::audit::log::new_event_id();
        let stored = self
            .store
            .put_meta_if_absent(&format!("config_seen:{hash}"), mine.as_bytes())
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
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
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// The key that signs new `id_token`s.
    pub fn current_signing_key(&self) -> Option<Arc<SigningKey>> {
        self.signing.read().last().cloned()
    }

    /// Keep the disabled-client list fresh until the process ends.
    pub fn spawn_background(self: &Arc<Self>) {
        self.audit
            .spawn_sealer(Duration::from_secs(self.config.audit.checkpoint_secs));
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
        crate::access::consent::Consents::spawn_poller(self);
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

/// The authenticated FHIR routes. Handlers expect a [`RequestCtx`] in the
/// request extensions: the token middleware attaches it, and batch
/// entries reuse their Bundle's.
pub fn fhir_routes() -> Router<Arc<AppState>> {
    use crate::rest::{bundle, fhir as fhir_api, search as search_api};
    Router::new()
        .route("/fhir", post(bundle::system_post))
        // Clients commonly post Bundles to the base with a trailing slash.
        .route("/fhir/", post(bundle::system_post))
        .route("/fhir/_history", get(fhir_api::history_system))
        .route(
            "/fhir/{rtype}",
            get(search_api::search_type)
                .post(fhir_api::create)
                .put(fhir_api::conditional_update)
                .delete(fhir_api::conditional_delete),
        )
        .route("/fhir/{rtype}/_history", get(fhir_api::history_type))
        .route("/fhir/{rtype}/_search", post(search_api::search_post))
        .route(
            "/fhir/{rtype}/{id}",
            get(fhir_api::read)
                .put(fhir_api::update)
                .delete(fhir_api::delete),
        )
        .route(
            "/fhir/{rtype}/{id}/_history",
            get(fhir_api::history_instance),
        )
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(fhir_api::vread))
        .route(
            "/fhir/{rtype}/{id}/{ctype}",
            get(search_api::compartment_search).post(crate::access::break_glass::request),
        )
}

/// Build the application router.
pub fn router(st: Arc<AppState>) -> Router {
    use crate::authn::token as auth_api;
    use crate::rest::fhir as fhir_api;
    let protected =
        fhir_routes().route_layer(middleware::from_fn_with_state(st.clone(), require_token));
    let public = Router::new()
        .route("/fhir/metadata", get(fhir_api::metadata))
        .route(
            "/fhir/.well-known/smart-configuration",
            get(auth_api::smart_config),
        )
        .route(
            "/.well-known/smart-configuration",
            get(auth_api::smart_config),
        )
        .route("/metrics", get(crate::base::metrics::metrics))
        .route("/auth/token", post(auth_api::token))
        .route("/auth/revoke", post(auth_api::revoke))
        .route("/auth/jwks", get(auth_api::jwks))
        .route(
            "/auth/.well-known/openid-configuration",
            get(auth_api::openid_config),
        )
        .route("/auth/introspect", post(auth_api::introspect))
        .route("/auth/authorize", get(crate::authn::signin::authorize))
        .route("/auth/login", post(crate::authn::signin::login))
        .route("/auth/mfa", post(crate::authn::signin::mfa))
        .route("/auth/mfa/enroll", post(crate::authn::signin::mfa_enroll))
        .route("/auth/mfa/passkey", post(crate::authn::signin::mfa_passkey))
        .route(
            "/auth/mfa/enroll-passkey",
            post(crate::authn::signin::mfa_enroll_passkey),
        )
        .route("/auth/passkey.js", get(crate::authn::signin::passkey_js))
        .route("/auth/account", get(crate::authn::signin::account))
        .route(
            "/auth/account/passkeys",
            post(crate::authn::signin::account_passkeys),
        )
        .route("/auth/continue", post(crate::authn::signin::proceed))
        .route("/auth/consent", post(crate::authn::signin::consent))
        .route("/auth/logout", post(crate::authn::signin::logout))
        .route(
            "/auth/enroll",
            get(crate::authn::signin::enroll_page).post(crate::authn::signin::enroll_submit),
        );
    let mut app = public
        .merge(protected)
        .fallback(|| async { ApiError::UnknownType })
        .with_state(st.clone());
    if !st.config.http.cors_origins.is_empty() {
        app = app.layer(cors(&st.config.http.cors_origins));
    }
    app.layer(middleware::from_fn(normalize_errors))
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::from_fn(access_log))
        .layer(middleware::from_fn(request_id))
}

fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            HeaderName::from_static("prefer"),
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::LAST_MODIFIED,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}

async fn request_id(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    // The route template (`/fhir/{rtype}/{id}`), never the concrete path or
    // query string: search terms in a query can be PHI.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let rid = crate::rest::error::request_id().unwrap_or_default();
    tracing::info!(
        target: "phylax::access",
        request_id = %rid,
        method = %method,
        route = route.as_deref().unwrap_or("(unmatched)"),
        status = resp.status().as_u16(),
        latency_us = start.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    set(
        h,
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    );
    set(h, "cache-control", "no-store");
    set(h, "pragma", "no-cache");
    set(h, "x-content-type-options", "nosniff");
    // Sign-in pages set their own policy (they need forms and a QR image).
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(
            h,
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        );
    }
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(h, "cross-origin-resource-policy", "same-origin");
    resp
}

/// Any error response that is not already JSON (axum's own 405s, extractor
/// rejections) becomes an OperationOutcome, so clients always get FHIR.
pub(crate) async fn normalize_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    // JSON (FHIR, OAuth errors) and the sign-in pages' HTML are already
    // meant for their readers.
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json") || v.starts_with("text/html"));
    if is_json {
        return resp;
    }
    let (code, msg) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            IssueCode::NotSupported,
            "method not allowed on this endpoint",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (IssueCode::TooLong, "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (IssueCode::NotSupported, "unsupported media type"),
        s if s.is_server_error() => (IssueCode::Exception, "internal error"),
        _ => (IssueCode::Invalid, "the request could not be processed"),
    };
    let mut out = outcome_response(status, &OperationOutcome::single(Issue::error(code, msg)));
    for k in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = resp.headers().get(&k) {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}

/// Bearer-token authentication for FHIR routes.
async fn require_token(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::Unauthorized.into_response();
    };
    let claims = match st.tokens.verify(token, crate::base::clock::now_secs()) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(reason = %e, "bearer token rejected");
            return ApiError::Unauthorized.into_response();
        }
    };
    if st.disabled_clients.read().contains(&claims.client_id) || st.revoked.read().refuses(&claims)
    {
        return ApiError::Unauthorized.into_response();
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let scopes = ScopeSet::parse_lenient(&claims.scope);
    let principal = match claims.role {
        Some(role) => {
            // The role as defined now; a role that no longer exists grants
            // nothing (fail closed).
            let Some(def) = st.roles.get(&role) else {
                return ApiError::Unauthorized.into_response();
            };
            let mfa_at = (claims.acr.as_deref() == Some(phylax_auth::token::ACR_MFA))
                .then_some(claims.auth_time)
                .flatten();
            Principal::User {
                user_id: claims.sub,
                role: def.clone(),
                client_id: claims.client_id,
                scopes,
                patient: claims.patient,
                token_id: claims.jti,
                mfa_at,
            }
        }
        None => Principal::Client {
            client_id: claims.client_id,
            scopes,
            token_id: claims.jti,
        },
    };
    // Per-user and per-client rate limits, before any work for the
    // request (`[rate]`).
    let (key, limit) = match &principal {
        Principal::User { user_id, .. } => (format!("u:{user_id}"), st.config.rate.user()),
        Principal::Client { client_id, .. } => (format!("c:{client_id}"), st.config.rate.client()),
    };
    if let Err(secs) = st.rate.take(&key, limit, crate::base::clock::now_ms()) {
        st.metrics.rate_limited("fhir");
        return ApiError::TooManyRequests(secs).into_response();
    }
    // Which patients' data this request reaches; unknown means refused.
    let access = match crate::access::reach::access_for(&st, &principal).await {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::warn!(reason = ?e.denied_by(), "access could not be established; request refused");
            // A policy refusal is recorded like any other (the caller
            // reaches nothing while it is recorded); a failure to look the
            // facts up is a 503 either way.
            if let Some(rule) = e.denied_by() {
                let ctx = RequestCtx {
                    request_id: crate::rest::error::request_id().unwrap_or_default(),
                    principal,
                    peer,
                    access: Arc::new(phylax_auth::policy::Access {
                        reach: phylax_auth::policy::Reach::Patients(Default::default()),
                        labelled: false,
                        relationships: false,
                        ..phylax_auth::policy::Access::unrestricted()
                    }),
                };
                let status = e.status().as_u16();
                let refs = crate::rest::pipeline::AuditRefs::default();
                if let Err(a) =
                    crate::rest::pipeline::record(&st, &ctx, "access", refs, status, Some(rule))
                        .await
                {
                    return a.into_response();
                }
            }
            return e.into_response();
        }
    };
    let ctx = RequestCtx {
        request_id: crate::rest::error::request_id().unwrap_or_default(),
        principal,
        peer,
        access,
    };
    req.extensions_mut().insert(ctx);
    next.run(req).await
}

/// Serve until `shutdown`: HTTPS normally, or plaintext HTTP only when the
/// caller passed `danger_plaintext` and the address is loopback.
pub async fn serve(
    st: Arc<AppState>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Refused before anything starts: a refused call must not take this
    // node's journal lock or start background work (a running server
    // asked to serve a second, bad listener once lost its journal lock to
    // it in a race).
    if tls.is_none() && !listener.local_addr()?.ip().is_loopback() {
        return Err(std::io::Error::other(
            "plaintext HTTP is only allowed on a loopback address",
        ));
    }
    // Reads' audit records go through this node's journal (recovering any
    // stopped node's first).
    st.audit
        .start_journal(&st.data_dir.join("audit-journal"))
        .await
        .map_err(|e| std::io::Error::other(format!("audit journal: {e}")))?;
    st.spawn_background();
    let app = router(st.clone());
    let served = serve_app(app, listener, tls, st.config.http.limits(), shutdown).await;
    // Everything acknowledged goes into the database before the node stops
    // (a crash instead leaves it for the next start).
    if let Err(e) = st.audit.flush().await {
        tracing::error!(error = %e, "audit journal not flushed at shutdown; the next start recovers it");
    }
    served
}

async fn serve_app(
    app: Router,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: crate::net::conn::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Plaintext is loopback only: checked by `serve` before anything started.
    crate::net::conn::serve(listener, tls, app, limits, shutdown).await
}

/// The host part of an `https://host:port` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let host = rest.split(['/', ':']).next()?;
    (!host.is_empty()).then_some(host)
}
