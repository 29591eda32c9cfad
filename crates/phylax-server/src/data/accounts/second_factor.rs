//! Second factors other than passkeys: TOTP enrollment and verification, recovery codes, and resetting them.

use super::*;

impl Accounts {
    /// A new TOTP secret for enrollment (not yet stored).
    pub fn new_totp(&self) -> Result<Totp, AccountError> {
        Ok(Totp::generate()?)
    }

    pub fn totp_from_b64(b64: &str) -> Option<Totp> {
        let raw = URL_SAFE_NO_PAD.decode(b64).ok()?;
        Totp::from_secret(Secret::new(raw)).ok()
    }

    pub fn totp_to_b64(t: &Totp) -> String {
        URL_SAFE_NO_PAD.encode(t.secret().expose())
    }

    /// Finish TOTP enrollment: `code` must match the new secret. Stores the
    /// secret, marks the step used, and returns fresh recovery codes (shown
    /// once; only their hashes are kept).
    pub async fn enroll_totp(
        &self,
        id: &str,
        secret_b64: &str,
        code: &str,
        now: i64,
    ) -> Result<Option<Vec<String>>, AccountError> {
        let Some(t) = Self::totp_from_b64(secret_b64) else {
            return Ok(None);
        };
        let Some(step) = t.verify(code, now.max(0) as u64, None) else {
            return Ok(None);
        };
        let codes = recovery_codes()?;
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| self.keyed_stored("recovery", normalize_recovery(c).as_bytes()))
            .collect();
        let secret = secret_b64.to_owned();
        self.modify(id, |u| {
            u.acct.totp = Some(secret.clone());
            u.acct.totp_last_step = Some(step);
            u.acct.recovery = hashes.clone();
            u.acct.mfa_enrolled_at = Some(now);
            Ok(())
        })
        .await?;
        Ok(Some(codes))
    }

    /// Check a TOTP code or a recovery code. Each TOTP step and each
    /// recovery code is accepted once (compare-and-swap on the account).
    pub async fn second_factor(
        &self,
        id: &str,
        code: &str,
        now: i64,
    ) -> Result<SecondFactor, AccountError> {
        let trimmed = code.trim();
        let digits_only = trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_whitespace());
        let (_, r) = self
            .modify(id, |u| {
                if digits_only {
                    let Some(t) = u.acct.totp.as_deref().and_then(Self::totp_from_b64) else {
                        return Ok(SecondFactor::Refused);
                    };
                    match t.verify(trimmed, now.max(0) as u64, u.acct.totp_last_step) {
                        Some(step) => {
                            u.acct.totp_last_step = Some(step);
                            Ok(SecondFactor::Totp)
                        }
                        None => Ok(SecondFactor::Refused),
                    }
                } else {
                    let typed = normalize_recovery(trimmed);
                    let before = u.acct.recovery.len();
                    u.acct
                        .recovery
                        .retain(|x| !self.keyed_matches("recovery", typed.as_bytes(), x));
                    if u.acct.recovery.len() < before {
                        Ok(SecondFactor::Recovery(u.acct.recovery.len()))
                    } else {
                        Ok(SecondFactor::Refused)
                    }
                }
            })
            .await?;
        Ok(r)
    }

    /// Remove the second factor and recovery codes; the user enrolls again
    /// at the next sign-in. Ends their sessions.
    pub async fn reset_mfa(&self, id: &str, now: i64) -> Result<User, AccountError> {
        let (u, ()) = self
            .modify(id, |u| {
                clear_second_factors(u);
                Ok(())
            })
            .await?;
        self.end_sessions(id, now).await?;
        Ok(u)
    }

    /// Containment of a compromised account (`phylax incident contain`):
    /// disabled, its password, second factors, recovery codes and any
    /// pending enrollment link cleared, every session and token ended on
    /// every node. It comes back only when an administrator enables it
    /// and issues a new enrollment link (`phylax user reset-password`):
    /// nothing the attacker may have learnt works again.
    pub async fn contain(&self, id: &str, now: i64) -> Result<User, AccountError> {
        let (u, ()) = self
            .modify(id, |u| {
                u.rec.status = Status::Disabled.as_str().into();
                u.acct.password = None;
                u.acct.enrollment = None;
                clear_second_factors(u);
                Ok(())
            })
            .await?;
        self.end_sessions(id, now).await?;
        Ok(u)
    }
}

/// Every second factor and recovery code of `u` gone (a reset, a
/// containment).
fn clear_second_factors(u: &mut User) {
    u.acct.totp = None;
    u.acct.totp_last_step = None;
    u.acct.passkeys.clear();
    u.acct.recovery.clear();
    u.acct.mfa_enrolled_at = None;
}
