//! FHIR search over sealed data: index entries on write, and search
//! parameters turned into store conditions on read.
//!
//! Index scheme (docs/ARCHITECTURE.md, "Search"): every string, token,
//! reference and uri value becomes keyed blind hashes (never plaintext);
//! strings get one hash per normalised prefix up to [`MAX_PREFIX`]
//! characters, so the default "starts with" search is an equality lookup;
//! demographic dates (birth and death dates) are blind at year, month and
//! day precision; other dates are stored as plaintext `[lo, hi)` ranges and
//! numbers and quantity values as plaintext numbers (with blind units), so
//! range prefixes work on clinical data.
//!
//! # Layout
//! - [`index`]: the index entries a resource gets when it is written.
//! - [`parse`]: search parameters turned into store conditions.

mod index;
mod parse;

pub use index::{index_rows, MAX_PARAMS, MAX_PREFIX, MAX_VALUES};
pub use parse::{
    compartment_condition, parse, references_to, token_hash, ParsedSearch, COMPARTMENT_PARAM,
};
