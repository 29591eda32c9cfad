//! Who may see and change what: care relationships, consents,
//! break-the-glass, and the scoped repository every read goes through.
//!
//! # Layout
//! - [`reach`]: the patients a caller reaches, the checks on every version
//!   read or written, and [`reach::Scoped`], the repository as one caller
//!   may see it.
//! - [`consent`]: patients' privacy consents as deny rules.
//! - [`break_glass`]: emergency access grants, their review queue.

pub mod break_glass;
pub mod consent;
pub mod reach;
