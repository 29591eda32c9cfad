//! FHIR search handlers: type search (GET and `POST _search`), Patient
//! compartment search, `$everything`, and what they share: sealed paging
//! cursors, result control (`_sort`, `_summary`, `_elements`, `_total`),
//! includes with `:iterate`, chaining and `_has`. Parameters become store
//! conditions in `crate::data::search`; the store plans and runs them.
//!
//! # Layout
//! Bottom first; each imports only modules listed before it.
//! - [`cursor`]: sealed paging cursors.
//! - [`include`]: `_include`/`_revinclude` with `:iterate`.
//! - [`chain`]: chained parameters and `_has`.
//! - [`control`]: `_sort`, `_summary`, `_elements`, `_total`.
//! - [`query`]: a type-level search, parameters to Bundle page.
//! - [`everything`]: the `Patient/{id}/$everything` operation.
//! - [`handlers`]: the search routes.

mod chain;
mod control;
mod cursor;
mod everything;
mod handlers;
mod include;
mod query;

pub(crate) use control::ResultControl;
pub use handlers::{compartment_search, search_post, search_type};
