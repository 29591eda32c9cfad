//! [`FhirState`]: what the FHIR REST handlers receive. It holds the access
//! layer ([`Gate`], through which alone resources are reached, as the
//! caller may see them), the audit log (whose records the interaction
//! pipeline writes), the counters, and what the wire needs (limits, base
//! URL, the cursor and capability). The gate and the audit log also have
//! methods for operators and start-up (approving held relationships,
//! pruning, administrative records) that the types do not keep from a
//! handler; review does (docs/ARCHITECTURE.md, "What the types do not
//! prevent"). It holds no accounts, clients, grants, roles or token
//! issuer: a FHIR handler cannot sign anyone in or change who may do what.
//! The FHIR routes are a router whose state is `Arc<FhirState>`, so a FHIR
//! handler cannot ask for the application state.

use crate::access::ctx::RequestCtx;
use crate::access::gate::Gate;
use crate::access::scoped::Scoped;
use crate::base::config::Config;
use crate::data::keyring::KeyRing;
use std::sync::Arc;

#[derive(Debug)]
pub struct FhirState {
    pub config: Arc<Config>,
    pub fhir_base: String,
    /// The access layer: it owns the resource repository; handlers reach
    /// resources through [`FhirState::scoped`] only.
    pub gate: Arc<Gate>,
    /// MACs `_history` paging cursors and names the data key that seals
    /// search cursors (current and previous generation).
    pub cursors: crate::data::cursor_keys::CursorKeys,
    /// Data keys (search cursors are sealed under the `cursor` keys).
    pub keys: Arc<KeyRing>,
    pub audit: Arc<crate::audit::log::AuditLog>,
    /// The CapabilityStatement served at `GET /fhir/metadata`.
    pub capability: serde_json::Value,
    /// Counters for `GET /metrics`.
    pub metrics: Arc<crate::base::metrics::Metrics>,
    /// `Patient/{id}/$erase` (a role with the erase permission only).
    pub eraser: Arc<crate::keys::erase::Eraser>,
}

impl FhirState {
    /// The resource repository as the caller of `ctx` may see and change
    /// it: the only way handlers reach resources.
    pub fn scoped<'a>(&'a self, ctx: &'a RequestCtx) -> Scoped<'a> {
        Scoped::new(&self.gate, ctx)
    }
}
