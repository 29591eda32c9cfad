//! Rotations of the keys that rotate by generation alone (docs/KEYS.md,
//! "Rotating"): a new generation is stored and announced, servers use it
//! within a second, the ones before are kept while something still
//! depends on them (tokens and cursors issued under the previous one; the
//! public halves of checkpoint keys), then deleted.

use super::{now, KeyAdmin, KeysError};
use phylax_audit::event::Action;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TokensRotated {
    /// The new key's row (`mac:token@N`).
    pub key: String,
    /// Tokens MACed with the key before it verify until then (seconds).
    pub previous_valid_until: i64,
    /// Older key rows deleted (nothing verifies with them any more).
    pub retired: Vec<String>,
}

impl KeyAdmin<'_> {
    /// A new access-token key: servers issue with it within a second and
    /// keep verifying the previous one for a token lifetime; keys before
    /// the previous one are deleted (no server verifies with them).
    pub async fn rotate_tokens(&self) -> Result<TokensRotated, KeysError> {
        let row = crate::instance::token_key_row;
        let n = crate::instance::token_generation(self.store).await?;
        let next = n + 1;
        self.audit(
            "key-rotate",
            Action::Update,
            format!("access-token key {} added", row(next)),
        )
        .await?;
        crate::data::key_events::record_generation(self.store, "tokens", next).await?;
        let (_, wrapped) =
            phylax_crypto::MacKey::generate_wrapped(self.kek, &format!("token@{next}"))?;
        self.store
            .put_wrapped_key_if_absent(&row(next), &wrapped, now())
            .await?;
        self.event("tokens").await?;
        let mut retired = Vec::new();
        for old in 1..n {
            if self.store.delete_wrapped_key(&row(old)).await? {
                retired.push(row(old));
            }
        }
        Ok(TokensRotated {
            key: row(next),
            previous_valid_until: now() + phylax_auth::token::MAX_LIFETIME_SECS + 60,
            retired,
        })
    }
}

/// What a cursor key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct CursorsRotated {
    /// The new generation (`mac:cursor@N`, `data:cursor@N`).
    pub generation: u32,
    /// Older generations' rows deleted (cursors under them no longer open).
    pub retired: Vec<String>,
}

impl KeyAdmin<'_> {
    /// New paging-cursor keys (`data::cursor_keys`): servers issue
    /// cursors under them within a second and still open those issued
    /// under the generation before; generations older than that are
    /// deleted, and cursors issued under them are refused.
    pub async fn rotate_cursors(&self) -> Result<CursorsRotated, KeysError> {
        use crate::data::cursor_keys::{data_scope, mac_purpose, mac_row};
        let n = crate::data::key_events::newest_generation(self.store, "cursors", mac_row).await?;
        let next = n + 1;
        self.audit(
            "key-rotate",
            Action::Update,
            format!("cursor keys generation {next} added"),
        )
        .await?;
        crate::data::key_events::record_generation(self.store, "cursors", next).await?;
        let (_, wrapped) = phylax_crypto::MacKey::generate_wrapped(self.kek, &mac_purpose(next))?;
        self.store
            .put_wrapped_key_if_absent(&mac_row(next), &wrapped, now())
            .await?;
        self.event("cursors").await?;
        let mut retired = Vec::new();
        for old in 1..n {
            for row in [mac_row(old), format!("data:{}", data_scope(old))] {
                if self.store.delete_wrapped_key(&row).await? {
                    retired.push(row);
                }
            }
        }
        Ok(CursorsRotated {
            generation: next,
            retired,
        })
    }
}

/// What a checkpoint key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRotated {
    pub generation: u32,
    /// The new verifier key (`note` format), for outside verifiers.
    pub verifier_key: String,
    /// Generations whose private key was destroyed (their public halves
    /// stay, wrapped by the KEK, to verify older checkpoints).
    pub retired: Vec<u32>,
}

impl KeyAdmin<'_> {
    /// A new audit-log checkpoint key: servers sign with it within a
    /// second; then the older private keys are destroyed and only their
    /// public halves kept (wrapped by the KEK, so that a public key cannot
    /// be slipped in through the database), so checkpoints signed before
    /// still verify, by this instance and by outside verifiers holding
    /// the old verifier key.
    pub async fn rotate_checkpoint(&self) -> Result<CheckpointRotated, KeysError> {
        use crate::data::keyring::{checkpoint_row, retired_checkpoint_row};
        use phylax_crypto::log_signing::CheckpointKey;
        let current = self
            .keys
            .checkpoint_keys(false)
            .await
            .map_err(|e| KeysError::Checkpoint(e.to_string()))?;
        let next = current.generation + 1;
        self.audit(
            "key-rotate",
            Action::Update,
            format!("audit checkpoint key generation {next} added"),
        )
        .await?;
        let (key, wrapped) =
            CheckpointKey::generate_wrapped(self.kek, &format!("checkpoint-{next}"))?;
        self.store
            .put_wrapped_key_if_absent(&checkpoint_row(next), &wrapped, now())
            .await?;
        self.event("checkpoint").await?;
        // Every server signs with the new key before the old ones go.
        tokio::time::sleep(self.grace).await;
        let mut retired = Vec::new();
        for old in 1..next {
            let Some(w) = self.store.get_wrapped_key(&checkpoint_row(old)).await? else {
                continue;
            };
            let scope = format!("checkpoint-{old}");
            let public = CheckpointKey::unwrap(self.kek, &scope, &w)?.public();
            let kept = CheckpointKey::wrap_public(self.kek, &format!("retired-{scope}"), &public)?;
            // The public half first: a crash between the two leaves both,
            // never neither.
            self.store
                .put_wrapped_key_if_absent(&retired_checkpoint_row(old), &kept, now())
                .await?;
            if self.store.delete_wrapped_key(&checkpoint_row(old)).await? {
                retired.push(old);
            }
        }
        self.event("checkpoint").await?;
        // This process signs with the new key too (its own records).
        self.audit
            .reload_checkpoint_keys(self.keys)
            .await
            .map_err(|e| KeysError::Checkpoint(e.to_string()))?;
        let verifier_key =
            phylax_audit::checkpoint::VerifierKey::new(self.audit.origin(), key.public())
                .map_err(|e| KeysError::Checkpoint(e.to_string()))?
                .encode();
        self.audit(
            "key-rotate",
            Action::Update,
            format!("audit checkpoint key generation {next} signs; private keys of generations {retired:?} destroyed"),
        )
        .await?;
        Ok(CheckpointRotated {
            generation: next,
            verifier_key,
            retired,
        })
    }
}
