//! The audit log's pure parts: what an audit record is, how records form a
//! tamper-evident log, and how anyone can check it. No I/O and no secret
//! keys here (signing happens in `phylax-crypto`; storage in `phylax-store`).
//!
//! # Layout
//! - [`merkle`]: RFC 9162 hashing, tree heads, inclusion and consistency
//!   proofs, and the incremental [`merkle::Frontier`].
//! - [`checkpoint`]: signed tree heads in the C2SP `tlog-checkpoint` /
//!   `signed-note` text format with Ed25519, verifiable by outside tools.
//! - [`event`]: FHIR AuditEvents shaped after IHE Basic Audit Log Patterns
//!   (BALP), built from typed facts so no resource content can slip in.
//! - [`stored`]: the bytes sealed for a record (its JSON, LZ4-compressed).

pub mod checkpoint;
pub mod event;
pub mod merkle;
pub mod stored;
