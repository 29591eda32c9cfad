//! The instance configuration, `DIR/phylax.toml`. It holds paths and
//! settings, never secrets: the KEK lives in its own key file (or the
//! `PHYLAX_KEK` environment variable) and a PostgreSQL URL, which may carry
//! a password, is given at each start (`--database-url` or
//! `PHYLAX_DATABASE_URL`).

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
    /// Path to the KEK file (kept outside the data directory).
    pub key_file: PathBuf,
    /// `sqlite` or `postgres`.
    pub backend: Backend,
    pub tls: TlsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub log: LogConfig,
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Access token lifetime in seconds (at most 900).
    pub token_lifetime_secs: i64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_lifetime_secs: 300,
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
        std::fs::write(&p, text)
            .map_err(|e| ConfigError::Write(p.display().to_string(), e.to_string()))
    }

    fn check(&self) -> Result<(), String> {
        if !(self.public_url.starts_with("https://") || self.public_url.starts_with("http://"))
            || self.public_url.ends_with('/')
        {
            return Err("public_url must be an http(s) URL without a trailing slash".into());
        }
        if self.http.max_body_bytes < 1024 {
            return Err("http.max_body_bytes must be at least 1024".into());
        }
        if self.http.max_page_size == 0
            || self.http.default_page_size == 0
            || self.http.default_page_size > self.http.max_page_size
        {
            return Err(
                "page sizes must be positive and default_page_size <= max_page_size".into(),
            );
        }
        if !(1..=900).contains(&self.auth.token_lifetime_secs) {
            return Err("auth.token_lifetime_secs must be between 1 and 900".into());
        }
        Ok(())
    }

    pub fn fhir_base(&self) -> String {
        format!("{}/fhir", self.public_url)
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.public_url)
    }
}
