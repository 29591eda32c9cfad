//! Passkeys (WebAuthn): registration, sign-in, renaming and removal.

use super::*;

impl Accounts {
    /// Start registering a passkey: makes the user's WebAuthn handle if
    /// needed, and excludes the passkeys they already have.
    pub async fn passkey_registration(
        &self,
        rp: &RelyingParty,
        id: &str,
        require_uv: bool,
    ) -> Result<(Ceremony, String), AccountError> {
        let mut user = self.load(id).await?.ok_or(AccountError::NoSuchUser)?;
        if user.user_handle().is_none() {
            let h = URL_SAFE_NO_PAD.encode(phylax_crypto::random_array::<USER_HANDLE_LEN>()?);
            user = self
                .modify(id, |u| {
                    if u.acct.user_handle.is_none() {
                        u.acct.user_handle = Some(h.clone());
                    }
                    Ok(())
                })
                .await?
                .0;
        }
        let handle = user.user_handle().ok_or(AccountError::Sealed)?;
        let existing: Vec<StoredPasskey> =
            user.acct.passkeys.iter().map(|p| p.cred.clone()).collect();
        rp.start_registration(&handle, user.username(), &existing, require_uv)
            .map_err(AccountError::Passkey)
    }

    /// Finish registering a passkey named `name`. Returns how many the
    /// user now has. The first one also gives the user recovery codes
    /// (returned) if they had none.
    pub async fn add_passkey(
        &self,
        rp: &RelyingParty,
        id: &str,
        state: &Ceremony,
        response: &[u8],
        name: &str,
        now: i64,
    ) -> Result<Option<Vec<String>>, AccountError> {
        let name = clean_name(name)?;
        let cred = rp
            .finish_registration(state, response, &name, now)
            .map_err(AccountError::Passkey)?;
        let codes = recovery_codes()?;
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| self.keyed_stored("recovery", normalize_recovery(c).as_bytes()))
            .collect();
        let (_, fresh_codes) = self
            .modify(id, |u| {
                if u.acct.passkeys.len() >= MAX_PASSKEYS {
                    return Err(AccountError::TooManyPasskeys);
                }
                if u.acct.passkeys.iter().any(|p| p.cred.id == cred.id) {
                    return Err(AccountError::Passkey(PasskeyError::Registration(
                        "already registered".into(),
                    )));
                }
                u.acct.passkeys.push(Passkey {
                    cred: cred.clone(),
                    flagged: false,
                });
                if u.acct.mfa_enrolled_at.is_none() {
                    u.acct.mfa_enrolled_at = Some(now);
                }
                if u.acct.recovery.is_empty() && u.acct.totp.is_none() {
                    u.acct.recovery = hashes.clone();
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
        Ok(fresh_codes.then_some(codes))
    }

    /// Start a passkey sign-in for a user with passkeys (unflagged ones).
    pub fn passkey_challenge(
        &self,
        rp: &RelyingParty,
        user: &User,
        require_uv: bool,
    ) -> Result<Option<(Ceremony, String)>, AccountError> {
        let creds = user.acct.usable_passkeys();
        if creds.is_empty() {
            return Ok(None);
        }
        rp.start_authentication(&creds, require_uv)
            .map(Some)
            .map_err(AccountError::Passkey)
    }

    /// Check a passkey assertion. The counter and flags are stored
    /// (compare-and-swap); a counter regression flags the passkey.
    pub async fn passkey_sign_in(
        &self,
        rp: &RelyingParty,
        id: &str,
        state: &Ceremony,
        response: &[u8],
        now: i64,
    ) -> Result<SecondFactor, AccountError> {
        let (_, r) = self
            .modify(id, |u| {
                let Some(handle) = u.user_handle() else {
                    return Ok(SecondFactor::Refused);
                };
                let mut creds = u.acct.usable_passkeys();
                match rp.finish_authentication(state, response, &handle, &mut creds, now) {
                    Ok(i) => {
                        let updated = creds[i].clone();
                        let pos = u
                            .acct
                            .passkeys
                            .iter()
                            .position(|p| p.cred.id == updated.id)
                            .ok_or(AccountError::Sealed)?;
                        u.acct.passkeys[pos].cred = updated;
                        Ok(SecondFactor::Passkey(pos))
                    }
                    Err(PasskeyError::CounterRegression) => {
                        // Flag every passkey the response could name: the
                        // one whose counter went backwards.
                        if let Ok(j) = phylax_auth::passkey::credential_id(response) {
                            for p in u.acct.passkeys.iter_mut().filter(|p| p.cred.id == j) {
                                p.flagged = true;
                            }
                        }
                        Ok(SecondFactor::PasskeyCloned)
                    }
                    Err(_) => Ok(SecondFactor::Refused),
                }
            })
            .await?;
        Ok(r)
    }

    /// Rename a passkey (by credential id, base64url).
    pub async fn rename_passkey(
        &self,
        id: &str,
        cred: &str,
        name: &str,
    ) -> Result<(), AccountError> {
        let name = clean_name(name)?;
        let raw = URL_SAFE_NO_PAD
            .decode(cred)
            .map_err(|_| AccountError::NoSuchPasskey)?;
        self.modify(id, |u| {
            let p = u
                .acct
                .passkeys
                .iter_mut()
                .find(|p| p.cred.id == raw)
                .ok_or(AccountError::NoSuchPasskey)?;
            p.cred.name = name.clone();
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Remove a passkey. Refused if it is the user's last second factor and
    /// their role requires one (they would be locked out of MFA).
    pub async fn remove_passkey(
        &self,
        id: &str,
        cred: &str,
        mfa_required: bool,
    ) -> Result<(), AccountError> {
        let raw = URL_SAFE_NO_PAD
            .decode(cred)
            .map_err(|_| AccountError::NoSuchPasskey)?;
        self.modify(id, |u| {
            let before = u.acct.passkeys.len();
            let mut rest = u.acct.passkeys.clone();
            rest.retain(|p| p.cred.id != raw);
            if rest.len() == before {
                return Err(AccountError::NoSuchPasskey);
            }
            let left = rest.iter().any(|p| !p.flagged) || u.acct.totp.is_some();
            if mfa_required && !left {
                return Err(AccountError::LastFactor);
            }
            u.acct.passkeys = rest;
            Ok(())
        })
        .await?;
        Ok(())
    }
}
