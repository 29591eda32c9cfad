//! The Phylax HTTP server.
//!
//! # Layout
//! - [`config`]: the instance configuration file (`DIR/phylax.toml`).
//! - [`instance`]: creating (`init`) and opening an instance: directories,
//!   KEK, local CA and server certificate, database and its keys.
//! - [`accounts`]: users: enrollment links, passwords, TOTP, recovery
//!   codes, lockout, ending sessions (shared by the CLI and sign-in pages).
//! - [`grants`]: bearer grants (codes, sessions, refresh tokens) stored as
//!   keyed hashes with sealed details; [`revocations`]: what every node
//!   refuses, refreshed from the shared feed every few seconds.
//! - [`keyring`]: data keys per patient compartment, created on demand and
//!   cached unwrapped in memory; MAC keys for tokens and cursors.
//! - [`repo`]: resources over the store: seal on write, open on read,
//!   versioning rules. The only code that turns sealed rows into JSON.
//! - [`search`]: search index entries on write (keyed blind hashes) and
//!   search parameters turned into store conditions on read.
//! - [`audit`]: the audit log service: sealed AuditEvents, group commit,
//!   the Merkle sealer and its signed checkpoints; [`audit_export`]: the
//!   log as JSON lines for a SIEM.
//! - [`pipeline`]: the one place every FHIR interaction passes: who is
//!   asking (authentication), may they (the policy decision), and the audit
//!   record of what happened.
//! - [`error`]: `ApiError` → HTTP status + OperationOutcome with the request
//!   id; causes are logged once, server-side.
//! - [`fhir_api`] (REST interactions), [`search_api`] (search,
//!   compartments, `$everything`), [`bundle`] (batch and transaction),
//!   [`audit_api`] (the read-only AuditEvent API and `$access-log`),
//!   [`auth_api`] (token, revocation, introspection, discovery),
//!   [`signin`] (the server-rendered sign-in, MFA, enrollment and consent
//!   pages of the authorization endpoint), [`capability`]: the HTTP handlers.
//! - [`http`]: router and middleware (request ids, security headers, CORS).
//! - [`detect`]: detection rules on the audit stream, alerts, the signed
//!   webhook and automatic responses.
//! - [`maintenance`]: jobs a node runs at start over data written by
//!   earlier releases (references made canonical).
//! - [`metrics`]: `GET /metrics` in Prometheus text format, no PHI in labels.
//! - [`logging`]: the log filter, with PHI-prone dependency targets capped.
//! - [`tls`]: rustls configuration and certificate generation.
//! - [`conn`]: the accept loop (TLS, or plaintext on loopback) and its
//!   limits: connection cap, header, idle and body timeouts.

pub mod access;
pub mod access_admin;
pub mod accounts;
pub mod audit;
pub mod audit_api;
pub mod audit_export;
pub mod audit_journal;
pub mod auth_api;
pub mod break_glass;
pub mod bundle;
pub mod capability;
pub mod config;
pub mod conn;
pub mod consent;
pub mod detect;
pub mod error;
pub mod fhir_api;
pub mod grants;
pub mod http;
pub mod instance;
pub mod keyring;
pub mod logging;
pub mod maintenance;
pub mod mask;
pub mod metrics;
pub mod pipeline;
pub mod repo;
pub mod revocations;
pub mod search;
pub mod search_api;
pub mod signin;
pub mod tls;

pub use instance::{InitOptions, Instance};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}
