//! Transport: sockets and TLS, below everything that speaks HTTP.
//!
//! # Layout
//! - [`conn`]: the accept loop (TLS, or plaintext on loopback) and its
//!   limits: connection cap, header, idle and body timeouts.
//! - [`tls`]: rustls configuration and certificate generation.

pub mod conn;
pub mod tls;
