//! Transport: sockets and TLS, below everything that speaks HTTP.
//!
//! # Layout
//! - [`conn`]: the accept loop (TLS, or plaintext on loopback) and its
//!   limits: connection cap, header, idle and body timeouts.
//! - [`certs`]: the server certificate: checks that refuse a weak one,
//!   OCSP stapling, reloading while serving.
//! - [`tls`]: rustls configuration over it, and certificate generation.

pub mod certs;
pub mod conn;
pub mod tls;
