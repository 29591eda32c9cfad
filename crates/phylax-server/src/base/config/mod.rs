//! The instance configuration, `DIR/phylax.toml`. It holds paths and
//! settings, never secrets: the KEK lives in its own key file (or the
//! `PHYLAX_KEK` environment variable) and a PostgreSQL URL, which may carry
//! a password, is given at each start (`--database-url` or
//! `PHYLAX_DATABASE_URL`).
//!
//! # Layout
//! - this file: the settings, their defaults, loading and saving;
//! - [`check`]: the bounds every setting must stay within;
//! - [`secrets`]: `phylax config check`, secrets where they must not be.

mod check;
pub mod secrets;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "phylax.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// The externally visible base URL (scheme, host, port), without a
    /// trailing slash; FHIR URLs are `{public_url}/fhir/…`.
    pub public_url: String,
    /// Path to the KEK file (kept outside the data directory). Absent when
    /// the KEK is only in an HSM; ignored when `PHYLAX_KEK` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The KEK in a PKCS#11 hardware security module (docs/KEYS.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm: Option<HsmSettings>,
    #[serde(default)]
    pub keys: KeysConfig,
    /// `sqlite` or `postgres`.
    pub backend: Backend,
    pub tls: TlsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub detect: DetectConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub rate: RateConfig,
    #[serde(default)]
    pub backup: BackupConfig,
    /// Custom roles, in addition to the built-in ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<RoleConfig>,
}

/// `[hsm]`: where the KEK lives in a hardware security module. The PIN is
/// never in this file: `pin_file` names a 0600 file holding it, or
/// `pin_env` an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HsmSettings {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
    /// KEK generations are key objects labelled `{key_label}-{N}`.
    #[serde(default = "default_key_label")]
    pub key_label: String,
}

fn default_key_label() -> String {
    "phylax-kek".into()
}

/// `[keys]`: key lifetimes (docs/KEYS.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// A key older than this is due for rotation: `phylax keys status`
    /// marks it and the server warns at start (days, 1–3650).
    pub max_age_days: u32,
    /// Records younger than this are inside the retention period: erasing
    /// a patient with such records needs `--override-retention` (years,
    /// 0–100; default six, as HIPAA's documentation retention).
    pub retention_years: u32,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            max_age_days: 365,
            retention_years: 6,
        }
    }
}

/// `[backup]`: where backups go and how often they are proven to
/// restore (docs/BACKUP.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// The directory `backup drill` takes the newest backup from (and
    /// where scheduled backups go). Outside the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// A restore drill older than this is a warning (days, 1–365).
    pub drill_interval_days: u32,
    /// Scheduled backups by the serving node: `hourly`, `daily`, or
    /// `every N` with a unit `m`, `h` or `d` (at least 15 minutes).
    /// Needs `dir` and `recipients_file`. The RPO is this interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The age recipients scheduled backups are encrypted to (`age1…`,
    /// one per line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients_file: Option<PathBuf>,
    /// Scheduled backups kept: the newest `keep` (1–10000) …
    pub keep: u32,
    /// … none older than this (days, 1–3650); the newest always stays.
    pub keep_days: u32,
    /// A backup reads and writes at most this many megabytes a second
    /// (0: no limit), so that the servers keep their throughput while it
    /// runs (docs/PERFORMANCE.md, "Backups"). `backup create --max-rate`
    /// overrides it.
    pub max_mb_per_sec: u32,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: None,
            drill_interval_days: 30,
            schedule: None,
            recipients_file: None,
            keep: 14,
            keep_days: 35,
            max_mb_per_sec: 40,
        }
    }
}

impl BackupConfig {
    /// The rate limit in bytes a second (`None`: no limit).
    pub fn max_rate(&self) -> Option<u64> {
        (self.max_mb_per_sec > 0).then(|| u64::from(self.max_mb_per_sec) << 20)
    }

    /// The schedule's interval, parsed (`None` without one).
    pub fn interval(&self) -> Result<Option<std::time::Duration>, String> {
        let Some(s) = self.schedule.as_deref() else {
            return Ok(None);
        };
        let bad = || {
            format!("backup.schedule {s:?}: use hourly, daily or every N with m, h or d (e.g. every 6h)")
        };
        let secs: u64 = match s.trim() {
            "hourly" => 3600,
            "daily" => 86_400,
            other => {
                let n = other.strip_prefix("every ").ok_or_else(bad)?.trim();
                let (num, unit) = n.split_at(n.len().saturating_sub(1));
                let k: u64 = num.trim().parse().map_err(|_| bad())?;
                let unit = match unit {
                    "m" => 60,
                    "h" => 3600,
                    "d" => 86_400,
                    _ => return Err(bad()),
                };
                k.checked_mul(unit).ok_or_else(bad)?
            }
        };
        if secs < 900 {
            return Err("backup.schedule must be at least every 15m".into());
        }
        Ok(Some(std::time::Duration::from_secs(secs)))
    }
}

/// A custom role (`[[roles]]` in phylax.toml).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub grants: Vec<RoleGrantConfig>,
    /// `care-relationships` (default: only the patients the user cares
    /// for) or `everyone`.
    #[serde(default = "default_role_reach")]
    pub reach: String,
    /// May see restricted-label data without break-the-glass.
    #[serde(default)]
    pub labelled: bool,
    /// May ask for break-the-glass emergency access.
    #[serde(default)]
    pub break_glass: bool,
    /// May erase a patient's record through the API (`Patient/{id}/$erase`).
    #[serde(default)]
    pub erase: bool,
    /// May change who reaches whom: care teams, practitioner roles,
    /// encounter participants, a patient's GP and organization, consents
    /// (docs/ACCESS_CONTROL.md, "Relationships are privileged data").
    #[serde(default)]
    pub relationships: bool,
    /// The purpose of use its requests carry (HL7 v3 ActReason code).
    #[serde(default = "default_role_purpose")]
    pub purpose: String,
    /// Elements removed from every resource the role receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<String>,
}

fn default_role_purpose() -> String {
    "TREAT".into()
}

fn default_role_reach() -> String {
    "care-relationships".into()
}

/// `[rate]`: request rate limits, per node (docs/OPERATIONS.md
/// "Connections and limits"). Each is a sustained rate per minute and a
/// burst; 0 per minute turns a limit off. Past one: 429 with Retry-After.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// FHIR requests per signed-in user (whatever app they use).
    pub user_per_minute: u32,
    pub user_burst: u32,
    /// FHIR requests per backend client.
    pub client_per_minute: u32,
    pub client_burst: u32,
    /// Tokens issued per client (counted once the client authenticated).
    pub token_per_minute: u32,
    pub token_burst: u32,
    /// Requests to the token endpoint per network address (before any
    /// work: assertions are costly to check).
    pub token_ip_per_minute: u32,
    pub token_ip_burst: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            user_per_minute: 1_200,
            user_burst: 300,
            client_per_minute: 60_000,
            client_burst: 5_000,
            token_per_minute: 120,
            token_burst: 30,
            token_ip_per_minute: 600,
            token_ip_burst: 100,
        }
    }
}

impl RateConfig {
    pub fn user(&self) -> phylax_auth::rate::Limit {
        phylax_auth::rate::Limit {
            per_minute: self.user_per_minute,
            burst: self.user_burst,
        }
    }
    pub fn client(&self) -> phylax_auth::rate::Limit {
        phylax_auth::rate::Limit {
            per_minute: self.client_per_minute,
            burst: self.client_burst,
        }
    }
    pub fn token(&self) -> phylax_auth::rate::Limit {
        phylax_auth::rate::Limit {
            per_minute: self.token_per_minute,
            burst: self.token_burst,
        }
    }
    pub fn token_ip(&self) -> phylax_auth::rate::Limit {
        phylax_auth::rate::Limit {
            per_minute: self.token_ip_per_minute,
            burst: self.token_ip_burst,
        }
    }
}

/// `[access]`: the resource-level half of authorization (docs/
/// ACCESS_CONTROL.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Clinicians and nurses reach only the patients they have a care
    /// relationship with. On by default.
    pub care_relationships: bool,
    /// Roles (built-in or custom) that see restricted-label data of the
    /// patients they reach without break-the-glass.
    pub labelled_roles: Vec<String>,
    /// Backend clients (client ids) that see restricted-label data.
    pub labelled_clients: Vec<String>,
    /// Roles (built-in or custom) that may change who reaches whom, on top
    /// of those that hold the permission already (`front-desk`, `admin`,
    /// custom roles with `relationships = true`).
    pub relationship_roles: Vec<String>,
    /// Backend clients (client ids) that may change who reaches whom: the
    /// ADT, scheduling and directory feeds. Other clients' writes that
    /// would are refused (403), whatever their scopes.
    pub relationship_clients: Vec<String>,
    /// A user without the relationships permission may create a Patient
    /// naming only themselves as general practitioner (and so start caring
    /// for them). Off by default: registering patients is front desk work.
    pub self_registration: bool,
    /// Security labels that make a resource restricted, as `system|code`.
    pub restricted_labels: Vec<String>,
    /// How long a break-the-glass grant lasts.
    pub break_glass_minutes: u32,
    /// Break-the-glass needs a sign-in (with its second factor) at most
    /// this long ago.
    pub break_glass_mfa_max_age_secs: u64,
    /// Most patients a care-relationship user may reach; beyond it their
    /// requests are refused with a clear reason (the set becomes part of
    /// every query) rather than served slowly.
    pub max_reach: usize,
}

/// HL7 v3 confidentiality and sensitivity codes.
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

impl Default for AccessConfig {
    fn default() -> Self {
        let mut restricted: Vec<String> = ["R", "V"]
            .iter()
            .map(|c| format!("{CONFIDENTIALITY}|{c}"))
            .collect();
        // Sensitivity categories (v3 ActCode, _InformationSensitivityPolicy):
        // substance use, HIV/AIDS, psychiatry and behavioural health,
        // sickle cell, sexual and domestic violence, sexuality and
        // reproductive health, sexually transmitted disease.
        restricted.extend(
            [
                "ETH", "ETHUD", "SUD", "HIV", "PSY", "PSYTHPN", "BH", "MH", "SCA", "SDV", "SEX",
                "STD",
            ]
            .iter()
            .map(|c| format!("{ACT_CODE}|{c}")),
        );
        AccessConfig {
            care_relationships: true,
            labelled_roles: Vec::new(),
            labelled_clients: Vec::new(),
            relationship_roles: Vec::new(),
            relationship_clients: Vec::new(),
            self_registration: false,
            restricted_labels: restricted,
            break_glass_minutes: 60,
            break_glass_mfa_max_age_secs: 900,
            max_reach: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleGrantConfig {
    /// Resource type names, or `["*"]` for every type except audit records.
    pub types: Vec<String>,
    /// Letters of `cruds`, in that order.
    pub perms: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM), relative to the data directory.
    pub cert: PathBuf,
    /// Server private key (PEM, 0600), outside the data directory.
    pub key: PathBuf,
    /// The CA clients must trust, relative to the data directory.
    pub ca: PathBuf,
    /// An OCSP response (DER) for the server certificate, refreshed by the
    /// operator; stapled to every handshake (relative to the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocsp: Option<PathBuf>,
    /// Mutual TLS: the CA (PEM) that issues client certificates, relative
    /// to the data directory. With it a client may present a certificate
    /// (clients without one still connect); clients registered
    /// `--cert-bound` must, and their tokens are bound to it (RFC 8705).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request body accepted (bytes); larger ones get 413.
    pub max_body_bytes: usize,
    /// Origins allowed by CORS. Empty: CORS is off (no CORS headers at all).
    pub cors_origins: Vec<String>,
    /// Allow PUT to create a resource with a client-chosen id.
    pub allow_update_create: bool,
    /// Default and maximum page sizes for history and search.
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Most entries in one batch or transaction Bundle.
    pub max_bundle_entries: usize,
    /// Other FHIR bases that name this server (an old host name, an
    /// internal address), e.g. `https://old-name.example/fhir`: references
    /// absolute to them are stored relative, like those to `public_url`'s.
    pub base_aliases: Vec<String>,
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Most connections from one address (0: no limit); more are closed.
    pub max_connections_per_ip: usize,
    /// Largest answer assembled in memory for a batch: entries past it are
    /// not run (each says so).
    pub max_response_bytes: usize,
    /// The TLS handshake, and a request's headers (from its first byte),
    /// must complete within this.
    pub header_timeout_secs: u64,
    /// A connection with nothing in flight and no bytes moving is closed
    /// after this.
    pub idle_timeout_secs: u64,
    /// A request's whole body must arrive within this (408 otherwise).
    pub body_timeout_secs: u64,
}

impl HttpConfig {
    /// The connection limits of [`crate::net::conn`].
    pub fn limits(&self) -> crate::net::conn::Limits {
        crate::net::conn::Limits {
            max_connections: self.max_connections,
            max_per_ip: self.max_connections_per_ip,
            // The TLS handshake gets as long as the headers do.
            handshake_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 8 * 1024 * 1024,
            cors_origins: Vec::new(),
            allow_update_create: true,
            default_page_size: 50,
            max_page_size: 1000,
            max_bundle_entries: 5000,
            base_aliases: Vec::new(),
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_response_bytes: 64 * 1024 * 1024,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            body_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Access-token lifetime (1–900 s).
    pub token_lifetime_secs: i64,
    /// Lifetime of a refresh token granted with `offline_access`.
    pub offline_refresh_secs: i64,
    /// Sign-in session idle timeout (automatic logoff) and absolute lifetime.
    pub session_idle_secs: i64,
    pub session_max_secs: i64,
    /// Failed sign-ins in a row before the account locks (1–100).
    pub lockout_threshold: u32,
    /// How long the first automatic lockout lasts; each further one
    /// (before a successful sign-in) twice as long, at most a day.
    pub lockout_secs: i64,
    /// Minimum password length once MFA is enrolled (8–15; 15 applies
    /// while the account has no second factor).
    pub password_min_length: usize,
    /// Roles that may sign in without a second factor. Empty by default:
    /// every role needs one.
    pub mfa_optional_roles: Vec<String>,
    /// How recent a second factor must be for sensitive operations.
    pub step_up_secs: i64,
    /// How long an enrollment link from `phylax user add` stays valid.
    pub enrollment_secs: i64,
    /// Roles whose passkeys must verify the user (PIN, biometric), not just
    /// their presence.
    pub uv_required_roles: Vec<String>,
    /// WebAuthn relying-party id (a domain); default: the host of
    /// `public_url`.
    pub passkey_rp_id: Option<String>,
    /// Origins sign-in pages are served from; default: `public_url`'s.
    pub passkey_origins: Vec<String>,
    /// Argon2id memory (KiB), passes and lanes; at least 19456, 2, 1.
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Most Argon2id computations at once (each takes `argon2_memory_kib`
    /// and a core); more sign-ins wait up to `argon2_queue_secs`, then
    /// get 503 with Retry-After. Bounds memory under a sign-in flood.
    pub argon2_max_concurrent: usize,
    pub argon2_queue_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_lifetime_secs: 600,
            offline_refresh_secs: 30 * 24 * 3600,
            session_idle_secs: 15 * 60,
            session_max_secs: 12 * 3600,
            lockout_threshold: 10,
            lockout_secs: 900,
            password_min_length: 12,
            mfa_optional_roles: Vec::new(),
            step_up_secs: 5 * 60,
            enrollment_secs: 24 * 3600,
            uv_required_roles: vec!["admin".into(), "clinician".into()],
            passkey_rp_id: None,
            passkey_origins: Vec::new(),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            argon2_max_concurrent: 4,
            argon2_queue_secs: 5,
        }
    }
}

/// Real-time detection rules and alert delivery (docs/AUDIT.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub enabled: bool,
    /// The sliding window of the sign-in rules.
    pub window_secs: u64,
    pub failed_logins_per_account: u32,
    pub failed_logins_per_ip: u32,
    /// Distinct accounts failing from one address (password spraying).
    pub spray_accounts: u32,
    pub mfa_failures: u32,
    /// Distinct patients one user or client may touch within the window.
    pub scraping_patients: u32,
    pub scraping_window_secs: u64,
    /// `[from, to)` hours (UTC) of normal work; patient data touched
    /// outside raises `off-hours`. Unset: the rule is off.
    pub business_hours_utc: Option<(u8, u8)>,
    /// Refusals for patients outside a user's care relationships within
    /// `window_secs` that raise `outside-care`.
    pub outside_care_denials: u32,
    /// Labels (`system|code`, in `meta.tag` or `meta.security` of a
    /// Patient) that flag a record: any workforce access raises
    /// `vip-access`.
    pub vip_tags: Vec<String>,
    /// A sign-in after this many days without one raises `dormant-account`.
    pub dormant_days: u32,
    /// Rules whose alert also locks the user's account.
    pub lock_on: Vec<String>,
    /// Rules whose alert opens an incident in the breach register, or
    /// joins the open one the same rule opened for the same user
    /// (docs/INCIDENT_RESPONSE.md).
    pub incident_on: Vec<String>,
    /// HTTPS URL that receives each alert as signed JSON.
    pub webhook_url: Option<String>,
    /// The CA certificates (PEM bundle, e.g. the system's
    /// `/etc/ssl/certs/ca-certificates.crt`) the receiver's certificate
    /// must chain to.
    pub webhook_ca_file: Option<PathBuf>,
    /// The shared HMAC secret (≥ 32 bytes, mode 0600, outside the data
    /// directory): `X-Phylax-Signature: sha256=<hex HMAC of the body>`.
    pub webhook_secret_file: Option<PathBuf>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            enabled: true,
            window_secs: 300,
            failed_logins_per_account: 5,
            failed_logins_per_ip: 20,
            spray_accounts: 5,
            mfa_failures: 5,
            scraping_patients: 200,
            scraping_window_secs: 600,
            business_hours_utc: None,
            outside_care_denials: 3,
            vip_tags: vec!["http://terminology.hl7.org/CodeSystem/v3-PatientImportance|VIP".into()],
            dormant_days: 90,
            lock_on: vec!["scraping".into()],
            incident_on: vec![
                "scraping".into(),
                "audit-verification".into(),
                "token-replay".into(),
                "cloned-passkey".into(),
            ],
            webhook_url: None,
            webhook_ca_file: None,
            webhook_secret_file: None,
        }
    }
}

/// `GET /metrics` (docs/OPERATIONS.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// SHA-256 (hex) of the bearer token scrapers send; unset: `/metrics`
    /// answers 404.
    pub token_sha256: Option<String>,
}

/// The audit log (docs/AUDIT.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often new records are sealed into the Merkle tree under a
    /// signed checkpoint (1–300 s): the longest a record is protected only
    /// by the database.
    pub checkpoint_secs: u64,
    /// Also write each new checkpoint here (outside the database; point it
    /// at storage the database's administrators cannot rewrite).
    pub checkpoint_file: Option<PathBuf>,
    /// How long records are kept, at least (days; default six years, the
    /// HIPAA documentation retention). Nothing is deleted before.
    pub retention_days: u32,
    /// Stream sealed records here as JSON lines, for a SIEM (on one node).
    pub export_file: Option<PathBuf>,
    /// Rotate the export file past this size.
    pub export_max_bytes: u64,
    /// Rotated export files to keep.
    pub export_keep: usize,
    /// Send sealed records to this syslog collector (`host:port`, TLS,
    /// RFC 5425 framing; port 6514 is the standard).
    pub syslog_tls: Option<String>,
    /// CA certificates (PEM) the collector's certificate must chain to.
    pub syslog_ca_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_secs: 10,
            checkpoint_file: None,
            retention_days: 6 * 365,
            export_file: None,
            export_max_bytes: 100 * 1024 * 1024,
            export_keep: 10,
            syslog_tls: None,
            syslog_ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Emit JSON log lines instead of text.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("invalid configuration in {0}: {1}")]
    Parse(String, String),
    #[error("cannot write {0}: {1}")]
    Write(String, String),
}

impl Config {
    pub fn load(data_dir: &Path) -> Result<Config, ConfigError> {
        let p = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ConfigError::Read(p.display().to_string(), e.to_string()))?;
        let c: Config = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(p.display().to_string(), e.message().to_owned()))?;
        c.check()
            .map_err(|m| ConfigError::Parse(p.display().to_string(), m))?;
        Ok(c)
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let p = data_dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Write(p.display().to_string(), e.to_string()))?;
        // Whole or not at all: a temporary file renamed over the old one
        // (a KEK move rewrites this file between its steps).
        let tmp = p.with_extension("toml.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| ConfigError::Write(p.display().to_string(), e.to_string()))
    }

    pub fn fhir_base(&self) -> String {
        format!("{}/fhir", self.public_url)
    }

    /// The role registry: built-in roles plus `[[roles]]`, validated.
    pub fn roles(&self) -> Result<phylax_auth::roles::Roles, String> {
        let custom: Vec<phylax_auth::roles::CustomRole> = self
            .roles
            .iter()
            .map(|r| phylax_auth::roles::CustomRole {
                name: r.name.clone(),
                description: r.description.clone(),
                grants: r
                    .grants
                    .iter()
                    .map(|g| (g.types.clone(), g.perms.clone()))
                    .collect(),
                reach: match r.reach.as_str() {
                    "everyone" => phylax_auth::roles::ReachRule::Everyone,
                    _ => phylax_auth::roles::ReachRule::CareRelationships,
                },
                labelled: r.labelled,
                break_glass: r.break_glass,
                erase: r.erase,
                relationships: r.relationships,
                purpose: r.purpose.clone(),
                masks: r.masks.clone(),
            })
            .collect();
        if let Some(r) = self
            .roles
            .iter()
            .find(|r| !matches!(r.reach.as_str(), "everyone" | "care-relationships"))
        {
            return Err(format!(
                "[[roles]]: role {}: reach must be \"care-relationships\" or \"everyone\"",
                r.name
            ));
        }
        phylax_auth::roles::Roles::new(&custom, |t| {
            phylax_fhir::ids::ResourceType::parse(t).is_some()
        })
        .map_err(|e| format!("[[roles]]: {e}"))?
        .with_access(
            self.access.care_relationships,
            &self.access.labelled_roles,
            &self.access.relationship_roles,
        )
    }

    /// The WebAuthn relying party: RP id and allowed origins.
    pub fn passkey_party(
        &self,
    ) -> Result<phylax_auth::passkey::RelyingParty, phylax_auth::passkey::PasskeyError> {
        let rest = self
            .public_url
            .split_once("://")
            .map(|x| x.1)
            .unwrap_or_default();
        let host_port = rest.split('/').next().unwrap_or_default();
        // Host without the port (IPv6 literals keep their brackets).
        let host = if host_port.starts_with('[') {
            host_port
                .split(']')
                .next()
                .unwrap_or_default()
                .trim_start_matches('[')
        } else {
            host_port.split(':').next().unwrap_or_default()
        };
        let rp_id = self
            .auth
            .passkey_rp_id
            .clone()
            .unwrap_or_else(|| host.to_owned());
        let origins = if self.auth.passkey_origins.is_empty() {
            let scheme = self.public_url.split("://").next().unwrap_or("https");
            vec![format!("{scheme}://{host_port}")]
        } else {
            self.auth.passkey_origins.clone()
        };
        phylax_auth::passkey::RelyingParty::new(&rp_id, origins)
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.public_url)
    }
}
