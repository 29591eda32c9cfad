//! [`AuthnState`]: what the sign-in pages and the token endpoint receive.
//! It holds accounts, grants, clients, the token issuer, revocations,
//! throttles and passkey settings; it holds no repository and no access
//! layer, so a sign-in page cannot read or write a resource. (It holds the
//! audit log, whose records a sign-in step writes; outside the audit
//! modules the log offers only reads.) The sign-in routes are a router of
//! their own whose state is [`Authn`], so a sign-in handler cannot ask for
//! the application state.

use super::AppState;
use crate::base::config::Config;
use crate::data::accounts::Accounts;
use crate::data::clients::Clients;
use crate::data::grants::Grants;
use crate::data::revocations::Revoked;
use phylax_auth::assertion::Verifier;
use phylax_auth::throttle::Throttle;
use phylax_auth::TokenIssuer;
use phylax_crypto::signing::SigningKey;
use std::sync::Arc;

#[derive(Debug)]
pub struct AuthnState {
    pub config: Arc<Config>,
    pub fhir_base: String,
    pub accounts: Accounts,
    pub grants: Grants,
    pub clients: Clients,
    /// Growing delays after failed sign-ins, per client IP and per account.
    pub throttle: Throttle,
    /// The WebAuthn relying party (RP id and origins) for passkeys.
    pub passkeys: phylax_auth::passkey::RelyingParty,
    pub audit: Arc<crate::audit::log::AuditLog>,
    pub tokens: TokenIssuer,
    pub verifier: Arc<Verifier>,
    pub smart_config: serde_json::Value,
    /// Revoked users, grant families and tokens, refreshed from the shared
    /// feed every few seconds (`AppState::refresh_disabled`).
    pub revoked: parking_lot::RwLock<Revoked>,
    /// Request rate limits per user, client and address (`[rate]`).
    pub rate: phylax_auth::rate::RateLimiter,
    /// `id_token` signing keys, oldest first; the last one signs.
    pub signing: parking_lot::RwLock<Vec<Arc<SigningKey>>>,
    /// Built-in and configured roles.
    pub roles: Arc<phylax_auth::roles::Roles>,
    /// Counters for `GET /metrics`.
    pub metrics: Arc<crate::base::metrics::Metrics>,
}

impl AuthnState {
    /// The key that signs new `id_token`s.
    pub fn current_signing_key(&self) -> Option<Arc<SigningKey>> {
        self.signing.read().last().cloned()
    }
}

/// What the sign-in handlers extract (`State<Authn>`): the sign-in state
/// of the application's state, and nothing else of it.
#[derive(Debug, Clone)]
pub struct Authn(pub Arc<AuthnState>);

impl std::ops::Deref for Authn {
    type Target = AuthnState;
    fn deref(&self) -> &AuthnState {
        &self.0
    }
}

impl axum::extract::FromRef<Arc<AppState>> for Authn {
    fn from_ref(st: &Arc<AppState>) -> Authn {
        Authn(st.authn.clone())
    }
}
