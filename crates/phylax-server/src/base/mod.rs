//! The foundation every other layer may use; imports nothing above it.
//!
//! # Layout
//! - [`capability`]: what the server announces: the CapabilityStatement
//!   and the SMART configuration, computed from the configuration.
//! - [`clock`]: the time in milliseconds and seconds.
//! - [`config`]: the instance configuration file (`DIR/phylax.toml`).
//! - [`request`]: the current request's id (a task-local set by the
//!   request-id middleware).
//! - [`error`]: [`error::Failure`], why a request failed, shared by every
//!   layer (the REST layer maps it to HTTP).
//! - [`logging`]: the log filter, with PHI-prone dependency targets capped.
//! - [`metrics`]: counters for `GET /metrics`, no PHI in labels.

pub mod capability;
pub mod clock;
pub mod config;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod request;
