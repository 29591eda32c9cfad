//! Authentication and authorization decisions for Phylax.
//!
//! # Layout
//! - [`scopes`]: SMART App Launch v2 scopes (and v1 `read`/`write`), their
//!   intersection, and the per-interaction check.
//! - [`assertion`]: SMART Backend Services client authentication: a
//!   `private_key_jwt` client assertion (RS384, ES384) verified against the
//!   client's registered JWKS, with `iss`/`sub`/`aud`/`exp`/`jti` checks.
//! - [`token`]: Phylax's own short-lived access tokens (HMAC-SHA-256 JWTs,
//!   verified without a database round trip).
//! - [`policy`]: the single authorization decision every FHIR interaction
//!   passes through.
//! - [`roles`]: roles as data (built-in least-privilege roles, custom roles
//!   from configuration) intersected with scopes in the decision.
//! - [`password_policy`]: which passwords may be chosen (NIST SP 800-63B
//!   rev. 4 lengths, a dictionary-backed guessability estimate).
//! - [`passkey`]: WebAuthn registration and authentication ceremonies
//!   (challenge, origin, RP ID, user verification, signature counter).
//! - [`pkce`]: RFC 7636 S256 code challenges.
//! - [`smart`]: SMART App Launch scope requests and grants for users.
//! - [`throttle`]: growing delays after failed sign-ins.
//! - [`rate`]: request rate limits per user, client and address (token
//!   buckets).
//! - [`client_key`]: developer helpers: an ES384 client key pair and a
//!   signed client assertion.
//! - [`consent`]: patient privacy consents read as deny rules and
//!   delegations.

pub mod assertion;
pub mod client_key;
pub mod consent;
pub mod passkey;
pub mod password_policy;
pub mod pkce;
pub mod policy;
pub mod rate;
pub mod roles;
pub mod scopes;
pub mod smart;
pub mod throttle;
pub mod token;

pub use policy::{Decision, Interaction, Principal};
pub use scopes::{Scope, ScopeSet};
pub use token::{AccessClaims, TokenIssuer};

/// Authentication failures. The `Display` text is for server logs; callers
/// answer clients with [`AuthError::oauth_error`] and a generic description
/// that reveals nothing about which check failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid client: {0}")]
    InvalidClient(&'static str),
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("invalid scope: {0}")]
    InvalidScope(&'static str),
    #[error("unsupported grant type")]
    UnsupportedGrantType,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("invalid grant: {0}")]
    InvalidGrant(&'static str),
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
    #[error("crypto: {0}")]
    Crypto(#[from] phylax_crypto::CryptoError),
    /// Over a rate limit; retry after this many seconds.
    #[error("too many requests")]
    RateLimited(u64),
}

impl AuthError {
    /// The RFC 6749 §5.2 error code.
    pub fn oauth_error(&self) -> &'static str {
        match self {
            AuthError::InvalidClient(_) | AuthError::InvalidToken(_) => "invalid_client",
            AuthError::InvalidRequest(_) | AuthError::InvalidJwks(_) => "invalid_request",
            AuthError::InvalidScope(_) => "invalid_scope",
            AuthError::InvalidGrant(_) => "invalid_grant",
            AuthError::UnsupportedGrantType => "unsupported_grant_type",
            AuthError::Crypto(_) => "server_error",
            AuthError::RateLimited(_) => "temporarily_unavailable",
        }
    }
}
