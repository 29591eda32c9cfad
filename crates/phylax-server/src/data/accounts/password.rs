//! Passwords: hashing (Argon2id, bounded concurrency), verification, the first password from an enrollment link, failures and lockout.

use super::*;

impl Accounts {
    /// Hash a password off the async workers, within the Argon2id limit.
    pub(super) async fn hash(&self, pw: Password) -> Result<String, AccountError> {
        let slot = self.argon2_slot().await?;
        let h = self.hasher.clone();
        tokio::task::spawn_blocking(move || {
            let r = h.hash(&pw);
            drop(slot);
            r
        })
        .await
        .map_err(|_| AccountError::Contended)?
        .map_err(AccountError::from)
    }

    /// Verify a password off the async workers, within the Argon2id limit
    /// ([`AccountError::Busy`] when no slot frees in time). `None`
    /// (unknown user) costs the same as a real check and never matches.
    pub async fn verify_password(
        &self,
        user: Option<&User>,
        typed: &str,
    ) -> Result<Verified, AccountError> {
        let slot = self.argon2_slot().await?;
        let stored = user.and_then(|u| u.acct.password.clone());
        let h = self.hasher.clone();
        let pw = Password::new(typed);
        Ok(tokio::task::spawn_blocking(move || {
            let r = h.verify(stored.as_deref(), &pw);
            drop(slot);
            r
        })
        .await
        .unwrap_or(Verified::Mismatch))
    }

    /// Check a password against the policy for this user.
    pub fn check_new_password(&self, user: &User, typed: &str) -> Result<(), AccountError> {
        let username = user.username().to_owned();
        let parts: Vec<&str> = username
            .split(|c: char| !c.is_alphanumeric())
            .filter(|p| !p.is_empty())
            .collect();
        let mut ctx = vec![username.as_str(), "phylax", "fhir"];
        ctx.extend(parts);
        self.policy
            .check(&Password::new(typed), user.has_mfa(), &ctx)
            .map_err(AccountError::from)
    }

    /// Redeem an enrollment link: set the first password. Single use.
    pub async fn enroll(&self, link: &str, password: &str, now: i64) -> Result<User, AccountError> {
        let (id, token) = link.split_once('.').ok_or(AccountError::BadEnrollment)?;
        let user = self
            .load(id)
            .await
            .map_err(|_| AccountError::BadEnrollment)?
            .ok_or(AccountError::BadEnrollment)?;
        let Some(want) = user
            .acct
            .enrollment
            .as_ref()
            .filter(|e| e.expires > now && self.keyed_matches("enroll", token.as_bytes(), &e.hash))
            .map(|e| e.hash.clone())
        else {
            return Err(AccountError::BadEnrollment);
        };
        if user.status() != Some(Status::Active) {
            return Err(AccountError::BadEnrollment);
        }
        self.check_new_password(&user, password)?;
        let phc = self.hash(Password::new(password)).await?;
        let (u, ()) = self
            .modify(id, |u| {
                // Re-check on the fresh copy: the link is single use.
                if u.acct.enrollment.as_ref().is_none_or(|e| e.hash != want) {
                    return Err(AccountError::BadEnrollment);
                }
                u.acct.enrollment = None;
                u.acct.password = Some(phc.clone());
                u.acct.failures = 0;
                Ok(())
            })
            .await?;
        Ok(u)
    }

    /// Store a rehash after a successful sign-in with old parameters.
    pub async fn upgrade_hash(&self, id: &str, typed: &str) -> Result<(), AccountError> {
        let phc = self.hash(Password::new(typed)).await?;
        self.modify(id, |u| {
            u.acct.password = Some(phc.clone());
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Count a failed sign-in; lock at `threshold`, which also ends the
    /// user's sessions and tokens. Returns the user after.
    /// Count a failed sign-in. At `threshold` failures in a row the
    /// account locks for `lockout_secs`, doubling with each further
    /// automatic lockout (up to [`MAX_LOCKOUT_SECS`]) until a successful
    /// sign-in; the lock ends by itself.
    pub async fn record_failure(
        &self,
        id: &str,
        threshold: u32,
        lockout_secs: i64,
        now: i64,
    ) -> Result<User, AccountError> {
        let (u, locked_now) = self
            .modify(id, |u| {
                // A lock that ran out starts the count again: a lockout is
                // renewed by `threshold` more failures, not by one.
                if u.acct.locked_until.is_some() && u.status() == Some(Status::Active) {
                    u.acct.failures = 0;
                    u.acct.locked_until = None;
                    u.rec.status = Status::Active.as_str().into();
                }
                u.acct.failures = u.acct.failures.saturating_add(1);
                if u.acct.failures >= threshold && u.status() == Some(Status::Active) {
                    let secs = lockout_secs
                        .saturating_mul(1_i64 << u.acct.lockouts.min(20))
                        .min(MAX_LOCKOUT_SECS);
                    u.rec.status = Status::Locked.as_str().into();
                    u.acct.locked_until = Some(now + secs);
                    u.acct.lockouts = u.acct.lockouts.saturating_add(1);
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
        if locked_now {
            self.end_sessions(id, now).await?;
        }
        Ok(u)
    }

    /// A complete sign-in: failures reset, time recorded.
    pub async fn record_success(&self, id: &str, now: i64) -> Result<(), AccountError> {
        self.modify(id, |u| {
            u.acct.failures = 0;
            u.acct.lockouts = 0;
            u.acct.last_sign_in = Some(now);
            if u.acct.locked_until.is_some() && u.status() == Some(Status::Active) {
                // An automatic lock that ran out.
                u.rec.status = Status::Active.as_str().into();
                u.acct.locked_until = None;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }
}
