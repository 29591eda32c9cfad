//! What operators reach: the access administration the CLI runs and the
//! Prometheus scrape. These receive the whole application state
//! ([`crate::state::AppState`]); nothing here is reachable with a FHIR
//! token. (Key administration works on the raw store, so it is its own
//! layer below: [`crate::keys`].)
//!
//! # Layout
//! - [`access`]: `phylax access explain` and `phylax access review`: one
//!   decision explained, the periodic access review.
//! - [`incident`]: `phylax incident …`: the breach register's incidents,
//!   their scope from the audit log.
//! - [`metrics`]: `GET /metrics` in Prometheus text format (its own bearer
//!   token, `[metrics] token_sha256`).

pub mod access;
pub mod incident;
pub mod metrics;
