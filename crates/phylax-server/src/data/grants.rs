//! Bearer grants over the store: authorization codes, sign-in sessions,
//! refresh tokens and sign-ins in progress.
//!
//! A grant's bearer secret (in a cookie, a redirect or a token response) is
//! 256 random bits; the store keeps only its HMAC under the instance's auth
//! key, so a database reader can neither use nor recognise one. Details are
//! sealed under the `grants` data key and bound to the grant's kind and
//! hash (a sealed blob moved to another grant does not open).

use crate::data::keyring::KeyRing;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_crypto::{MacKey, Secret};
use phylax_store::{GrantRecord, GrantStore, GrantUse, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

const KEY_SCOPE: &str = "grants";

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("keys: {0}")]
    Keys(String),
    #[error("grant details could not be opened")]
    Sealed,
    #[error("random number generator failed")]
    Random,
}

/// The kinds of grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A sign-in in progress (cookie), one per stage.
    Pending,
    /// A signed-in browser session (cookie).
    Session,
    /// An authorization code (redirect), single use.
    Code,
    /// A refresh token, single use (rotated on every use).
    Refresh,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pending => "pending",
            Kind::Session => "session",
            Kind::Code => "code",
            Kind::Refresh => "refresh",
        }
    }
}

/// How taking a single-use grant went.
#[derive(Debug)]
pub enum Taken<T> {
    Fresh(GrantRecord, T),
    /// Used before: a replay. The family should be revoked.
    Reused(GrantRecord),
    Missing,
}

#[derive(Debug, Clone)]
pub struct Grants {
    store: Arc<dyn GrantStore>,
    keys: Arc<KeyRing>,
    auth_key: Arc<MacKey>,
}

/// A fresh 256-bit bearer secret, base64url.
pub fn new_secret() -> Result<String, GrantError> {
    Ok(
        URL_SAFE_NO_PAD
            .encode(phylax_crypto::random_array::<32>().map_err(|_| GrantError::Random)?),
    )
}

impl Grants {
    pub fn new(store: Arc<dyn GrantStore>, keys: Arc<KeyRing>, auth_key: Arc<MacKey>) -> Grants {
        Grants {
            store,
            keys,
            auth_key,
        }
    }

    /// Everything revoked recently, from the shared feed (every node
    /// refuses it; see [`crate::data::revocations`]).
    pub async fn revoked(&self, now: i64) -> Result<crate::data::revocations::Revoked, StoreError> {
        crate::data::revocations::Revoked::load(&*self.store, now).await
    }

    /// Publish a revocation (`kind`: `token`, `family` or `user`) every
    /// node applies within seconds.
    pub async fn publish_revocation(
        &self,
        kind: &str,
        key: &str,
        at: i64,
    ) -> Result<i64, StoreError> {
        self.store.add_revocation(kind, key, at).await
    }

    pub fn hash(&self, kind: Kind, secret: &str) -> Vec<u8> {
        let mut msg = format!("grant\0{}\0", kind.as_str()).into_bytes();
        msg.extend_from_slice(secret.as_bytes());
        self.auth_key.sign(&msg).to_vec()
    }

    /// A keyed tag of `secret` for CSRF tokens: forms carry
    /// `csrf(cookie secret)`, which a cross-site page cannot compute.
    pub fn csrf(&self, secret: &str) -> String {
        let mut msg = b"csrf\0".to_vec();
        msg.extend_from_slice(secret.as_bytes());
        URL_SAFE_NO_PAD.encode(&self.auth_key.sign(&msg)[..24])
    }

    pub fn csrf_ok(&self, secret: &str, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.csrf(secret).as_bytes().ct_eq(given.as_bytes()).into()
    }

    fn aad(kind: Kind, hash: &[u8]) -> Vec<u8> {
        let mut a = format!("grant/{}/", kind.as_str()).into_bytes();
        a.extend_from_slice(hash);
        a
    }

    /// Store a new grant; returns its bearer secret.
    pub async fn create<T: Serialize>(
        &self,
        kind: Kind,
        family: &str,
        user_id: &str,
        details: &T,
        expires_at: i64,
        now: i64,
    ) -> Result<String, GrantError> {
        let secret = new_secret()?;
        let hash = self.hash(kind, &secret);
        let key = self
            .keys
            .for_write(KEY_SCOPE)
            .await
            .map_err(|e| GrantError::Keys(e.to_string()))?;
        let json = Secret::new(serde_json::to_vec(details).map_err(|_| GrantError::Sealed)?);
        let sealed = key
            .seal(&Self::aad(kind, &hash), json.expose())
            .map_err(|_| GrantError::Random)?;
        self.store
            .put_grant(
                &GrantRecord {
                    kind: kind.as_str().into(),
                    key_hash: hash,
                    family: family.into(),
                    user_id: user_id.into(),
                    sealed,
                    expires_at,
                    used_at: None,
                },
                now,
            )
            .await?;
        Ok(secret)
    }

    async fn open<T: DeserializeOwned>(
        &self,
        kind: Kind,
        g: &GrantRecord,
    ) -> Result<T, GrantError> {
        let key = self
            .keys
            .for_read(KEY_SCOPE)
            .await
            .map_err(|e| GrantError::Keys(e.to_string()))?;
        let plain = Secret::new(
            key.open(&Self::aad(kind, &g.key_hash), &g.sealed)
                .map_err(|_| GrantError::Sealed)?,
        );
        serde_json::from_slice(plain.expose()).map_err(|_| GrantError::Sealed)
    }

    /// An unexpired grant and its details. Secrets that are not even the
    /// right shape are simply absent.
    pub async fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        secret: &str,
        now: i64,
    ) -> Result<Option<(GrantRecord, T)>, GrantError> {
        if secret.len() != 43 {
            return Ok(None);
        }
        let Some(g) = self
            .store
            .get_grant(kind.as_str(), &self.hash(kind, secret), now)
            .await?
        else {
            return Ok(None);
        };
        let d = self.open(kind, &g).await?;
        Ok(Some((g, d)))
    }

    /// Consume a single-use grant.
    pub async fn take<T: DeserializeOwned>(
        &self,
        kind: Kind,
        secret: &str,
        now: i64,
    ) -> Result<Taken<T>, GrantError> {
        if secret.len() != 43 {
            return Ok(Taken::Missing);
        }
        match self
            .store
            .use_grant(kind.as_str(), &self.hash(kind, secret), now)
            .await?
        {
            GrantUse::Fresh(g) => {
                let d = self.open(kind, &g).await?;
                Ok(Taken::Fresh(g, d))
            }
            GrantUse::Reused(g) => Ok(Taken::Reused(g)),
            GrantUse::Missing => Ok(Taken::Missing),
        }
    }

    pub async fn delete(&self, kind: Kind, secret: &str) -> Result<(), GrantError> {
        self.store
            .delete_grant(kind.as_str(), &self.hash(kind, secret))
            .await?;
        Ok(())
    }

    pub async fn touch(&self, kind: Kind, secret: &str, expires_at: i64) -> Result<(), GrantError> {
        self.store
            .touch_grant(kind.as_str(), &self.hash(kind, secret), expires_at)
            .await?;
        Ok(())
    }

    /// Revoke a whole family (a replayed refresh token or code) on every
    /// node: its grants are deleted and its access tokens refused.
    pub async fn revoke_family(&self, family: &str, now: i64) -> Result<(), GrantError> {
        self.store.delete_family(family).await?;
        self.store.add_revocation("family", family, now).await?;
        Ok(())
    }
}
