//! The FHIR REST API: its handlers and their wire helpers. Handlers
//! receive [`crate::state::FhirState`] (`scripts/module-graph` refuses the
//! application state here).
//!
//! # Layout
//! - [`error`]: `Failure` → HTTP status + OperationOutcome with the
//!   request id; causes are logged once, server-side.
//! - [`pipeline`]: the one place every FHIR interaction passes: the policy
//!   decision and the audit record of what happened.
//! - [`wire`]: what every handler shares on the wire: typed inputs, FHIR
//!   JSON and Bundles out, paging cursors, conditional matching.
//! - [`mask`]: field masking of responses by role.
//! - [`fhir`]: REST interactions (read, vread, create, update, delete,
//!   history, metadata).
//! - [`search`]: search, compartments, `$everything`.
//! - [`bundle`]: batch and transaction.
//! - [`break_glass`]: the `$break-the-glass` operation.
//! - [`erase`]: the `Patient/{id}/$erase` operation (crypto-shredding).
//! - [`audit_api`]: the read-only AuditEvent API and `$access-log`.
//! - [`routes`]: the authenticated FHIR routes (batch entries are routed
//!   through them too).
pub mod audit_api;
pub mod break_glass;
pub mod bundle;
pub mod erase;
pub mod error;
pub mod fhir;
pub mod mask;
pub mod pipeline;
pub mod routes;
pub mod search;
pub mod wire;
