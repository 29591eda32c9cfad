//! The Phylax HTTP server.
//!
//! # Layout
//! Folders are layers; a module imports only modules in its own layer's
//! lower files or in layers listed before it (`scripts/module-graph`
//! checks there are no cycles). Bottom first:
//! - [`net`]: sockets, the accept loop and its limits, TLS.
//! - [`base`]: clock, configuration, logging, metrics counters.
//! - [`data`]: keys, resources and their search index, accounts, grants,
//!   revocations: the tables and the services that own them.
//! - [`audit`]: the audit log, its journal, sealing, export and detection.
//! - [`access`]: who reaches whom, consents, break-the-glass, the scoped
//!   repository.
//! - [`instance`]: creating (`init`) and opening an instance: directories,
//!   KEK, local CA and server certificate, database and its keys.
//! - [`keys`]: key administration for the operator's CLI (no route
//!   reaches it): key status, KEK rotation and moves, crypto-shredding a
//!   patient, legal holds.
//! - [`backup`]: backups and restores for the operator's CLI (no route
//!   reaches them): a consistent snapshot in an age-encrypted, signed
//!   archive; verify, restore, restore drills.
//! - [`state`]: the application state, assembled once from the subsystems
//!   below, and the background tasks that keep its caches fresh.
//! - [`rest`]: the FHIR REST API handlers and their wire helpers.
//! - [`authn`]: sign-in pages and the token endpoint.
//! - [`ops`]: what operators reach: access explain and review (the CLI),
//!   the metrics scrape.
//! - [`http`]: the router and middleware (request ids,
//!   security headers, CORS, bearer tokens), and `serve`.

pub mod access;
pub mod audit;
pub mod authn;
pub mod backup;
pub mod base;
pub mod data;
pub mod http;
pub mod instance;
pub mod keys;
pub mod net;
pub mod ops;
pub mod rest;
pub mod state;

pub use instance::{InitOptions, Instance};
