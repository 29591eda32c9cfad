//! The foundation every other layer may use; imports nothing above it.
//!
//! # Layout
//! - [`clock`]: the time in milliseconds and seconds.
//! - [`config`]: the instance configuration file (`DIR/phylax.toml`).
//! - [`logging`]: the log filter, with PHI-prone dependency targets capped.
//! - [`metrics`]: counters for `GET /metrics`, no PHI in labels.

pub mod clock;
pub mod config;
pub mod logging;
pub mod metrics;
