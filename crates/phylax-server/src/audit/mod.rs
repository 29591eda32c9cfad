//! The audit trail: recording, journal, sealing, export and detection.
//!
//! # Layout
//! - [`alert`]: alerts and the detector's handle (what raising one needs).
//! - [`journal`]: the local write-ahead journal that group-commits read
//!   records.
//! - [`log`]: the audit log service: sealed AuditEvents, group commit, the
//!   Merkle sealer and its signed checkpoints, verification.
//! - [`export`]: the log as JSON lines for a SIEM.
//! - [`detect`]: detection rules on the audit stream, alerts, the signed
//!   webhook and automatic responses.

pub mod alert;
pub mod detect;
pub mod export;
pub mod journal;
pub mod log;
