//! FHIR R4 (4.0.1) knowledge for Phylax. Pure: no I/O, no clocks, no keys.
//!
//! # Layout
//! - [`defs`]: the official R4 definitions, compiled in from the generated
//!   table `data/r4.json` (see `scripts/gen-fhir-defs.py`).
//! - [`json`]: strict JSON parsing (duplicate keys, nesting depth, size are
//!   refused before anything else looks at the input).
//! - [`ids`]: typed resource types, ids and version ids (parse, don't validate).
//! - [`narrative`]: the XHTML of narratives, parsed and checked against
//!   FHIR's allow-list (used by [`validate`]).
//! - [`validate`]: structural validation of a resource against the
//!   StructureDefinitions, reporting each problem by its FHIRPath location.
//! - [`reference`]: one canonical form for literal references to this
//!   server's resources (relative, absolute to its base, versioned).
//! - [`compartment`]: which Patient compartment a resource belongs to
//!   (reads references through [`reference`]).
//! - [`outcome`]: `OperationOutcome` construction.
//! - [`search`]: the values each SearchParameter selects, typed and
//!   normalised for indexing (a FHIRPath subset evaluator), and sort keys.
//! - [`subset`]: `_summary` and `_elements`.

pub mod compartment;
pub mod defs;
pub mod ids;
pub mod json;
pub mod narrative;
pub mod outcome;
pub mod reference;
pub mod search;
pub mod subset;
pub mod validate;

pub use ids::{ResourceId, ResourceType, VersionId};
pub use outcome::{Issue, IssueCode, OperationOutcome, Severity};
