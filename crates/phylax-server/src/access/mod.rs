//! Who may see and change what: care relationships, consents,
//! break-the-glass, and the scoped repository every read goes through.
//!
//! # Layout
//! Bottom first:
//! - [`ctx`]: who is calling ([`ctx::RequestCtx`]), what a response
//!   touched, and the audit facts built from them.
//! - [`holds`]: relationship data from before the relationships
//!   permission, held until an operator approves it.
//! - [`consent`]: patients' privacy consents as deny rules.
//! - [`gate`]: [`gate::Gate`], the layer's state; it owns the repository.
//! - [`break_glass`]: emergency access grants and their review queue.
//! - [`care`]: care relationships (whose patients a clinician cares for,
//!   how a user is known in the data), break-the-glass grants in force.
//! - [`reach`]: the patients a caller reaches and the checks on every
//!   version read or written.
//! - [`write`]: the checks and audit record of one caller's writes (the
//!   repository's `WriteGuard`).
//! - [`scoped`]: [`scoped::Scoped`], the repository as one caller may see
//!   and change it: the only way the layers above reach resources.
//! - [`maintenance`]: jobs a node runs at start over data written by
//!   earlier releases (references made canonical, relationship data
//!   held).
//! - [`notify`]: what breach notification reads from patients' records
//!   (the state of their address, whom a letter goes to), for the
//!   operator's incident commands only.

pub mod break_glass;
pub mod care;
pub mod consent;
pub mod ctx;
pub mod gate;
pub mod holds;
pub mod maintenance;
pub mod notify;
pub mod reach;
pub mod scoped;
pub mod write;
