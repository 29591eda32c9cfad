//! Authentication endpoints: the sign-in pages and the token endpoint.
//!
//! # Layout
//! - [`signin`]: the server-rendered sign-in, MFA, enrollment and consent
//!   pages of the authorization endpoint.
//! - [`token`]: token, revocation, introspection, discovery.

pub mod signin;
pub mod token;
