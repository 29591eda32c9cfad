//! Phylax server integration tests: one test binary (one link, one set of
//! dependencies built once), one module per area. Each module runs its
//! cells on both backends (SQLite always; PostgreSQL when
//! `PHYLAX_TEST_DATABASE_URL` is set, and always under `CI=true`).
//!
//! `tests/logs.rs` is the one test kept apart: it installs a process-wide
//! TRACE log subscriber, which would capture (and slow) every other test.
//!
//! # Layout
//! - [`common`]: the test server (a real instance on a real TLS socket,
//!   either backend), tokens, clients, SQL access for tampering tests, and
//!   the `both!` macro.
//! - [`rest`]: the FHIR REST interactions, versioning, conditional
//!   interactions, errors as OperationOutcomes.
//! - [`search`]: search parameters, modifiers, chains, includes, paging.
//! - [`bundle`]: batch and transaction.
//! - [`auth`]: the token endpoint, SMART backend services, revocation.
//! - [`signin`]: the sign-in pages: passwords, TOTP, passkeys, lockout,
//!   consent, enrollment, sessions.
//! - [`access`]: least privilege end to end: care relationships, labels,
//!   consents, break-the-glass, masks, insider attacks.
//! - [`audit`]: the audit log: records, sealing, verification, export.
//! - [`sealed`]: encryption at rest: what the database holds, tampering.
//! - [`keys`]: the key hierarchy under operation: KEK rotation under load
//!   (key file and SoftHSM2), tampered keys, crypto-shredding, legal holds.
//! - [`backup`]: backups taken while writing, restored and compared
//!   version by version; crypto-shredding against an older backup;
//!   restore drills.
//! - [`incident`]: the breach register; an incident's scope from the
//!   audit log names exactly what each principal touched.
//! - [`interop`]: a real FHIR client library (fhirpy) against the server.
//! - [`mtls`]: mutual TLS and certificate-bound access tokens (RFC 8705).
//! - [`tls`]: the server certificate: weak ones refused, reloading while
//!   serving, OCSP stapling, an external scanner (sslyze).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

#[macro_use]
mod common;

mod access;
mod audit;
mod auth;
mod backup;
mod bundle;
mod incident;
mod interop;
mod keys;
mod mtls;
mod rest;
mod sealed;
mod search;
mod signin;
mod tls;
