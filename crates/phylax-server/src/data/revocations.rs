//! What every node must refuse: access tokens of disabled users, of
//! revoked grant families, and individually revoked tokens.
//!
//! Access tokens are verified without a database read (a MAC and this
//! in-memory set). Each node re-reads the recent revocation feed every
//! [`crate::state::DISABLED_REFRESH`], so a revocation made anywhere (the
//! CLI, another node) takes effect everywhere within seconds. The feed is
//! read whole for the last token lifetime (older entries cannot matter:
//! every token they could cover has expired), which also tolerates
//! PostgreSQL sequence numbers committing out of order.

use phylax_auth::token::{AccessClaims, MAX_LIFETIME_SECS};
use phylax_store::{GrantStore, StoreError};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default)]
pub struct Revoked {
    /// user id → tokens issued at or before this time are refused.
    users: HashMap<String, i64>,
    families: HashSet<String>,
    tokens: HashSet<String>,
}

impl Revoked {
    /// Is this token revoked?
    pub fn refuses(&self, c: &AccessClaims) -> bool {
        if self.tokens.contains(&c.jti) {
            return true;
        }
        if c.fam.as_ref().is_some_and(|f| self.families.contains(f)) {
            return true;
        }
        c.role.is_some() && self.users.get(&c.sub).is_some_and(|at| c.iat <= *at)
    }

    pub fn add(&mut self, kind: &str, key: &str, at: i64) {
        match kind {
            "user" => {
                let e = self.users.entry(key.to_owned()).or_insert(at);
                *e = (*e).max(at);
            }
            "family" => {
                self.families.insert(key.to_owned());
            }
            "token" => {
                self.tokens.insert(key.to_owned());
            }
            _ => {}
        }
    }

    /// Rebuild from the store's recent feed.
    pub async fn load(store: &dyn GrantStore, now: i64) -> Result<Revoked, StoreError> {
        let mut r = Revoked::default();
        for e in store
            .revocations_since(0, now - MAX_LIFETIME_SECS - 60)
            .await?
        {
            r.add(&e.kind, &e.key, e.at);
        }
        Ok(r)
    }
}
