//! `POST /fhir`: batch and transaction Bundles.
//!
//! **Transaction** (all or nothing). Entries are processed in the order the
//! specification prescribes, whatever their order in the Bundle: DELETE,
//! then POST, then PUT, then GET. Every entry is decided by the policy
//! first; one denied entry refuses the whole Bundle (403) before anything is
//! read or written. Server ids are assigned to POST entries, conditional
//! operations and references (`Patient?identifier=…`) are resolved, and
//! every reference to an entry's `fullUrl` (`urn:uuid:…`) is rewritten to
//! the id it received. Only then are the resources sealed, and every write
//! is committed in **one database transaction** ([`crate::access::scoped::Scoped::commit`]): when any
//! entry fails, or a concurrent writer moved a resource in between (409),
//! nothing is stored. GET entries run after the commit.
//!
//! **Batch** (independent entries). Each entry is dispatched through the
//! same FHIR routes as a standalone request, with the Bundle's caller, so it
//! gets the same validation, policy decision and audit record, and its own
//! status in the response; one entry failing does not affect the others.
//!
//! Both are bounded by the body limit and `http.max_bundle_entries`.
//!
//! # Layout
//! Bottom first:
//! - [`entry`]: a Bundle's entries parsed into typed requests.
//! - [`routing`]: running an entry through the FHIR routes as if it had
//!   arrived on its own ([`routing::EntryRoutes`]), and its response entry.
//! - [`batch`]: independent entries.
//! - [`transaction`]: all or nothing, in one database transaction.
//! - [`handler`]: `POST /fhir`.

mod batch;
mod entry;
mod handler;
mod routing;
mod transaction;

pub use handler::system_post;
pub use routing::EntryRoutes;
