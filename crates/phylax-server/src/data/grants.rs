//! Bearer grants over the store: authorization codes, sign-in sessions,
//! refresh tokens and sign-ins in progress.
//!
//! A grant's bearer secret (in a cookie, a redirect or a token response) is
//! 256 random bits; the store keeps only its HMAC under the instance's
//! sign-in key, so a database reader can neither use nor recognise one.
//! Details are sealed under the `grants` data key and bound to the grant's
//! kind and hash (a sealed blob moved to another grant does not open).
//!
//! New grants are hashed under the newest sign-in key generation; a
//! lookup tries every live generation ([`crate::data::auth_keys`]), and a
//! session found under an older one moves to the newest when its idle
//! time is extended, so that only grants that simply run out depend on an
//! old generation.

use crate::data::auth_keys::AuthKeys;
use crate::data::keyring::KeyRing;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_crypto::Secret;
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
    fn parse(s: &str) -> Option<Kind> {
        [Kind::Pending, Kind::Session, Kind::Code, Kind::Refresh]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

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
    auth_keys: Arc<AuthKeys>,
}

/// A fresh 256-bit bearer secret, base64url.
pub fn new_secret() -> Result<String, GrantError> {
    Ok(
        URL_SAFE_NO_PAD
            .encode(phylax_crypto::random_array::<32>().map_err(|_| GrantError::Random)?),
    )
}

impl Grants {
    pub fn new(store: Arc<dyn GrantStore>, keys: Arc<KeyRing>, auth_keys: Arc<AuthKeys>) -> Grants {
        Grants {
            store,
            keys,
            auth_keys,
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

    fn hash_msg(kind: Kind, secret: &str) -> Vec<u8> {
        let mut msg = format!("grant\0{}\0", kind.as_str()).into_bytes();
        msg.extend_from_slice(secret.as_bytes());
        msg
    }

    /// The hash a new grant is stored under (the newest generation).
    pub fn hash(&self, kind: Kind, secret: &str) -> Vec<u8> {
        self.auth_keys.sign(&Self::hash_msg(kind, secret)).to_vec()
    }

    /// The hashes a grant may be stored under, newest generation first.
    fn candidates(&self, kind: Kind, secret: &str) -> Vec<(u32, Vec<u8>)> {
        self.auth_keys
            .sign_all(&Self::hash_msg(kind, secret))
            .into_iter()
            .map(|(n, h)| (n, h.to_vec()))
            .collect()
    }

    fn csrf_msg(secret: &str) -> Vec<u8> {
        let mut msg = b"csrf\0".to_vec();
        msg.extend_from_slice(secret.as_bytes());
        msg
    }

    /// A keyed tag of `secret` for CSRF tokens: forms carry
    /// `csrf(cookie secret)`, which a cross-site page cannot compute.
    pub fn csrf(&self, secret: &str) -> String {
        URL_SAFE_NO_PAD.encode(&self.auth_keys.sign(&Self::csrf_msg(secret))[..24])
    }

    /// Whether `given` is the tag of `secret` under any live generation (a
    /// form rendered before a rotation still posts).
    pub fn csrf_ok(&self, secret: &str, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.auth_keys
            .sign_all(&Self::csrf_msg(secret))
            .iter()
            .any(|(_, tag)| {
                URL_SAFE_NO_PAD
                    .encode(&tag[..24])
                    .as_bytes()
                    .ct_eq(given.as_bytes())
                    .into()
            })
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
        let json = Secret::new(serde_json::to_vec(details).map_err(|_| GrantError::Sealed)?);
        let sealed = self
            .keys
            .seal_current(KEY_SCOPE, &Self::aad(kind, &hash), json.expose())
            .await
            .map_err(|e| GrantError::Keys(e.to_string()))?;
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
        let plain = self.open_raw(kind, g).await?;
        serde_json::from_slice(plain.expose()).map_err(|_| GrantError::Sealed)
    }

    /// A grant's sealed details, opened with the data key of the
    /// generation the record names.
    async fn open_raw(&self, kind: Kind, g: &GrantRecord) -> Result<Secret, GrantError> {
        let key = self
            .keys
            .for_record(KEY_SCOPE, &g.sealed)
            .await
            .map_err(|e| GrantError::Keys(e.to_string()))?
            .ok_or(GrantError::Sealed)?;
        Ok(Secret::new(
            key.open(&Self::aad(kind, &g.key_hash), &g.sealed)
                .map_err(|_| GrantError::Sealed)?,
        ))
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
        let Some((_, g)) = self.find(kind, secret, now).await? else {
            return Ok(None);
        };
        let d = self.open(kind, &g).await?;
        Ok(Some((g, d)))
    }

    /// The unexpired grant of `secret` and the generation it was found
    /// under.
    async fn find(
        &self,
        kind: Kind,
        secret: &str,
        now: i64,
    ) -> Result<Option<(u32, GrantRecord)>, GrantError> {
        for (n, hash) in self.candidates(kind, secret) {
            if let Some(g) = self.store.get_grant(kind.as_str(), &hash, now).await? {
                return Ok(Some((n, g)));
            }
        }
        Ok(None)
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
        for (_, hash) in self.candidates(kind, secret) {
            match self.store.use_grant(kind.as_str(), &hash, now).await? {
                GrantUse::Fresh(g) => {
                    let d = self.open(kind, &g).await?;
                    return Ok(Taken::Fresh(g, d));
                }
                GrantUse::Reused(g) => return Ok(Taken::Reused(g)),
                GrantUse::Missing => {}
            }
        }
        Ok(Taken::Missing)
    }

    /// Delete the grant of `secret` under every generation, oldest first:
    /// a session moving to the newest one meanwhile puts its new row
    /// before it deletes the old one, so it is deleted too (or notices the
    /// old row gone and deletes what it put).
    pub async fn delete(&self, kind: Kind, secret: &str) -> Result<(), GrantError> {
        for (_, hash) in self.candidates(kind, secret).into_iter().rev() {
            self.store.delete_grant(kind.as_str(), &hash).await?;
        }
        Ok(())
    }

    /// Extend an unexpired grant (a session's idle time). One found under
    /// an older sign-in key generation moves to the newest instead: the
    /// same secret, hashed and sealed again, so that an old generation is
    /// not kept alive by sessions in use (docs/KEYS.md).
    pub async fn touch(
        &self,
        kind: Kind,
        secret: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), GrantError> {
        let Some((n, g)) = self.find(kind, secret, now).await? else {
            return Ok(());
        };
        if n == self.auth_keys.current().0 {
            self.store
                .touch_grant(kind.as_str(), &g.key_hash, expires_at)
                .await?;
            return Ok(());
        }
        let plain = self.open_raw(kind, &g).await?;
        let hash = self.hash(kind, secret);
        let sealed = self
            .keys
            .seal_current(KEY_SCOPE, &Self::aad(kind, &hash), plain.expose())
            .await
            .map_err(|e| GrantError::Keys(e.to_string()))?;
        let moved = GrantRecord {
            key_hash: hash,
            sealed,
            expires_at,
            ..g.clone()
        };
        match self.store.put_grant(&moved, now).await {
            // Another node moved it first.
            Ok(()) | Err(StoreError::Duplicate) => {}
            Err(e) => return Err(e.into()),
        }
        // The old one already gone means it was signed out or revoked
        // meanwhile (or another node moved it): do not let the move bring
        // it back. The worst case of the last is one more sign-in.
        if !self.store.delete_grant(kind.as_str(), &g.key_hash).await? {
            self.store
                .delete_grant(kind.as_str(), &moved.key_hash)
                .await?;
        }
        Ok(())
    }

    /// Seal every live grant's details again under the data-key
    /// generation in force (a data-key rotation), each only if unchanged
    /// meanwhile. Returns how many still name another generation (sealed
    /// by a node that had not followed yet, or changed meanwhile).
    pub async fn reseal_all(&self, now: i64) -> Result<u64, GrantError> {
        let g = self.keys.data_generation();
        let mut left = 0;
        for r in self.store.live_grants(now).await? {
            if phylax_crypto::datakey::record_generation(&r.sealed) == Some(g) {
                continue;
            }
            let Some(kind) = Kind::parse(&r.kind) else {
                left += 1;
                continue;
            };
            let plain = self.open_raw(kind, &r).await.map_err(|e| {
                GrantError::Keys(format!(
                    "a live {} grant of family {} does not open ({e}); end it with its family (or wait for it to expire)",
                    r.kind, r.family
                ))
            })?;
            let sealed = self
                .keys
                .seal_current(KEY_SCOPE, &Self::aad(kind, &r.key_hash), plain.expose())
                .await
                .map_err(|e| GrantError::Keys(e.to_string()))?;
            if !self
                .store
                .reseal_grant(&r.kind, &r.key_hash, &r.sealed, &sealed)
                .await?
            {
                left += 1;
            }
        }
        Ok(left)
    }

    /// Revoke a whole family (a replayed refresh token or code) on every
    /// node: its grants are deleted and its access tokens refused.
    pub async fn revoke_family(&self, family: &str, now: i64) -> Result<(), GrantError> {
        self.store.delete_family(family).await?;
        self.store.add_revocation("family", family, now).await?;
        Ok(())
    }
}
