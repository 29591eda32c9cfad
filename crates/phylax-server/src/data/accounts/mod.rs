//! User accounts: creation, enrollment links, passwords, TOTP, recovery
//! codes, lockout and the ends of sessions. Shared by the CLI and the
//! sign-in pages.
//!
//! What the database holds per user (see docs/AUTHENTICATION.md):
//! - `username_hash`: HMAC of the normalised username under the instance's
//!   sign-in key (its newest generation once a rotation has re-hashed
//!   it), for lookups; the username itself is only inside `sealed`.
//! - `role`, `status`, `rev`, `created_at`: not identifying. The role and
//!   status are also inside `sealed`: a row whose plain role or status
//!   differs from the sealed one (edited in the database) does not open.
//! - `sealed`: the [`Account`] below as JSON, AES-256-GCM under the
//!   `accounts` data key, bound to the user id and revision (a sealed blob
//!   copied to another row, or an older blob restored under the current
//!   revision, does not open). It holds the Argon2id hash, the TOTP secret,
//!   the last accepted TOTP step, hashes of unused recovery codes, the
//!   patient link, the failure counter and the enrollment-link hash. A
//!   stolen database therefore yields neither usernames nor password hashes
//!   to crack offline.
//!
//! Updates are compare-and-swap on `rev` ([`Accounts::modify`] retries), so
//! a TOTP step or recovery code is accepted once even when two nodes race.
//!
//! # Layout
//! - this file: the account types, the service, sealing and opening
//!   records, creation, lookups, role/status/link changes, enrollment
//!   links, ending sessions;
//! - [`password`]: hashing, verification, first password, lockout;
//! - [`second_factor`]: TOTP and recovery codes;
//! - [`passkeys`]: WebAuthn registration, sign-in and management;
//! - [`key_gens`]: keyed hashes under the sign-in key generations, what
//!   accounts hold under each generation,
//!   re-hashing usernames under the newest, binding older accounts to
//!   their role and status.

mod key_gens;
mod passkeys;
mod password;
mod second_factor;

pub use key_gens::GenerationUse;

use crate::data::auth_keys::AuthKeys;
use crate::data::keyring::KeyRing;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_auth::passkey::{Ceremony, PasskeyError, RelyingParty, StoredPasskey, USER_HANDLE_LEN};
use phylax_auth::password_policy::{PasswordPolicy, PasswordProblem};
use phylax_auth::roles::Roles;
use phylax_crypto::password::{Password, PasswordHasher, PasswordParams, Verified};
use phylax_crypto::totp::Totp;
use phylax_crypto::Secret;
use phylax_store::{AccountStore, GrantStore, StoreError, UserRecord};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use unicode_normalization::UnicodeNormalization;

/// The data-key scope that seals account details.
const KEY_SCOPE: &str = "accounts";
/// Recovery codes per set.
pub const RECOVERY_CODES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Disabled,
    Locked,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "disabled" => Some(Status::Disabled),
            "locked" => Some(Status::Locked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Disabled => "disabled",
            Status::Locked => "locked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("usernames are 1 to 64 characters without spaces or control characters")]
    BadUsername,
    #[error("unknown role {0} (built-in: admin, auditor, billing, clinician, front-desk, nurse, patient, researcher; or one from [[roles]] in phylax.toml)")]
    BadRole(String),
    #[error("a patient account needs --patient ID, and only patients have one")]
    PatientLink,
    #[error("only workforce users link to a Practitioner, given as a valid resource id")]
    PractitionerLink,
    #[error("that username is taken")]
    Taken,
    #[error("no such user")]
    NoSuchUser,
    #[error("{0}")]
    Password(#[from] PasswordProblem),
    #[error("the enrollment link is invalid, used or expired; ask an administrator for a new one")]
    BadEnrollment,
    #[error("account data could not be opened (wrong key or altered row)")]
    Sealed,
    #[error("the account changed repeatedly while updating; try again")]
    Contended,
    #[error("passkey: {0}")]
    Passkey(PasskeyError),
    #[error("at most {MAX_PASSKEYS} passkeys per user")]
    TooManyPasskeys,
    #[error("no such passkey")]
    NoSuchPasskey,
    #[error("that is your last second factor; add another before removing it")]
    LastFactor,
    #[error("names are 1 to 64 characters without control characters")]
    BadName,
    #[error(
        "this change needs a recent sign-in with your second factor; sign in again from your app"
    )]
    StepUp,
    #[error("crypto: {0}")]
    Crypto(#[from] phylax_crypto::CryptoError),
    #[error("keys: {0}")]
    Keys(String),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// Every Argon2id slot stayed taken for `auth.argon2_queue_secs`.
    #[error("too many sign-ins at once; try again in a few seconds")]
    Busy,
}

/// A pending enrollment link: only its keyed hash is kept.
#[derive(Clone, Serialize, Deserialize)]
struct Enrollment {
    hash: String,
    expires: i64,
}

/// The sealed part of a user. Holds secrets: `Debug` is redacted, there is
/// no `Display`, and the secret strings are wiped on drop.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Account {
    username: String,
    #[serde(default)]
    password: Option<String>,
    /// TOTP secret, base64url.
    #[serde(default)]
    totp: Option<String>,
    #[serde(default)]
    totp_last_step: Option<u64>,
    /// Hex keyed hashes of the unused recovery codes.
    #[serde(default)]
    recovery: Vec<String>,
    #[serde(default)]
    patient: Option<String>,
    /// For workforce users: their `Practitioner` resource id, from which
    /// their care relationships are found (docs/ACCESS_CONTROL.md).
    #[serde(default)]
    practitioner: Option<String>,
    #[serde(default)]
    failures: u32,
    #[serde(default)]
    enrollment: Option<Enrollment>,
    #[serde(default)]
    last_sign_in: Option<i64>,
    #[serde(default)]
    mfa_enrolled_at: Option<i64>,
    /// WebAuthn user handle (16 random bytes, base64url), made at the first
    /// passkey registration.
    #[serde(default)]
    user_handle: Option<String>,
    #[serde(default)]
    passkeys: Vec<Passkey>,
    /// Until when (s) a lock after repeated failures lasts; `None` for a
    /// lock an administrator or a detector set (it lasts until unlocked).
    #[serde(default)]
    locked_until: Option<i64>,
    /// Automatic lockouts since the last successful sign-in: each one
    /// lasts twice as long as the one before.
    #[serde(default)]
    lockouts: u32,
    /// The row's role and status when this was sealed: a role or status
    /// changed in the database alone, without the key, does not open
    /// (`None` only in accounts sealed before this existed, until the
    /// first start of a release with it binds them).
    #[serde(default)]
    bound: Option<Bound>,
}

/// What of the plain row the sealed part vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Bound {
    role: String,
    status: String,
}

/// Meta key recording that every account is bound to its role and status
/// (after which an unbound one is refused).
pub const ACCOUNTS_BOUND: &str = "accounts_bound_v1";

/// The longest automatic lockout.
pub const MAX_LOCKOUT_SECS: i64 = 86_400;

/// A registered passkey and whether it has been flagged (its signature
/// counter went backwards: a cloned authenticator). Flagged passkeys are
/// refused until removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Passkey {
    pub cred: StoredPasskey,
    #[serde(default)]
    pub flagged: bool,
}

/// At most this many passkeys per user.
pub const MAX_PASSKEYS: usize = 10;

impl Account {
    /// The passkeys that may still be used (not flagged as cloned).
    fn usable_passkeys(&self) -> Vec<StoredPasskey> {
        self.passkeys
            .iter()
            .filter(|p| !p.flagged)
            .map(|p| p.cred.clone())
            .collect()
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(p) = self.password.as_mut() {
            p.zeroize();
        }
        if let Some(t) = self.totp.as_mut() {
            t.zeroize();
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("has_password", &self.password.is_some())
            .field("has_totp", &self.totp.is_some())
            .field("recovery_left", &self.recovery.len())
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// A user as loaded: the row and its opened details.
#[derive(Debug, Clone)]
pub struct User {
    pub rec: UserRecord,
    pub acct: Account,
}

impl User {
    pub fn id(&self) -> &str {
        &self.rec.id
    }
    pub fn role(&self) -> &str {
        &self.rec.role
    }
    /// The account's status now: a lock after repeated failures ends by
    /// itself at `locked_until` (an attacker who knows a username cannot
    /// keep its owner out for longer than the back-off); a lock set by an
    /// administrator or a detector lasts until it is lifted.
    pub fn status(&self) -> Option<Status> {
        match Status::parse(&self.rec.status) {
            Some(Status::Locked)
                if self
                    .acct
                    .locked_until
                    .is_some_and(|t| crate::base::clock::now_secs() >= t) =>
            {
                Some(Status::Active)
            }
            s => s,
        }
    }

    /// Until when an automatic lockout lasts (s since the epoch), if the
    /// account is locked by one.
    pub fn locked_until(&self) -> Option<i64> {
        (Status::parse(&self.rec.status) == Some(Status::Locked))
            .then_some(self.acct.locked_until)
            .flatten()
    }
    /// The username, for the account's owner and administrators. It is
    /// identifying: never log it.
    pub fn username(&self) -> &str {
        &self.acct.username
    }
    pub fn patient(&self) -> Option<&str> {
        self.acct.patient.as_deref()
    }
    pub fn practitioner(&self) -> Option<&str> {
        self.acct.practitioner.as_deref()
    }
    pub fn has_password(&self) -> bool {
        self.acct.password.is_some()
    }
    /// The password hash's algorithm and cost (`argon2id m=19456,t=2,p=1`),
    /// never the salt or hash: lets operators see which accounts still carry
    /// hashes made under older settings.
    pub fn password_scheme(&self) -> Option<String> {
        let phc = self.acct.password.as_deref()?;
        let mut parts = phc.split('$').skip(1);
        let alg = parts.next()?;
        let _version = parts.next()?;
        let params = parts.next()?;
        Some(format!("{alg} {params}"))
    }
    pub fn has_totp(&self) -> bool {
        self.acct.totp.is_some()
    }
    /// A second factor is enrolled. A flagged (possibly cloned) passkey
    /// still counts: the account must not fall back to enrolling a new
    /// factor with the password alone; recovery codes or an administrator's
    /// `reset-mfa` get the user back in.
    pub fn has_mfa(&self) -> bool {
        self.has_totp() || !self.acct.passkeys.is_empty()
    }
    /// A usable (unflagged) passkey.
    pub fn has_passkey(&self) -> bool {
        self.acct.passkeys.iter().any(|p| !p.flagged)
    }
    pub fn passkeys(&self) -> &[Passkey] {
        &self.acct.passkeys
    }
    /// The WebAuthn user handle, if one was made.
    pub fn user_handle(&self) -> Option<[u8; USER_HANDLE_LEN]> {
        let raw = URL_SAFE_NO_PAD
            .decode(self.acct.user_handle.as_deref()?)
            .ok()?;
        raw.try_into().ok()
    }
    pub fn recovery_left(&self) -> usize {
        self.acct.recovery.len()
    }
    pub fn failures(&self) -> u32 {
        self.acct.failures
    }
    pub fn last_sign_in(&self) -> Option<i64> {
        self.acct.last_sign_in
    }
    pub fn enrollment_pending(&self, now: i64) -> bool {
        self.acct
            .enrollment
            .as_ref()
            .is_some_and(|e| e.expires > now)
    }
}

/// Outcome of checking a second-factor code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondFactor {
    Totp,
    /// A passkey (index into the user's passkeys).
    Passkey(usize),
    /// A passkey whose signature counter went backwards: now flagged.
    PasskeyCloned,
    /// A recovery code; this many remain.
    Recovery(usize),
    Refused,
}

/// Normalise a username: NFKC, trimmed, lower-case. Refuses empty, long,
/// spaced or control-character names.
pub fn normalize_username(s: &str) -> Result<String, AccountError> {
    let n: String = s.trim().nfkc().collect::<String>().to_lowercase();
    let len = n.chars().count();
    if len == 0 || len > 64 || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AccountError::BadUsername);
    }
    Ok(n)
}

/// The account service.
#[derive(Debug, Clone)]
pub struct Accounts {
    store: Arc<dyn AccountStore>,
    /// The whole store, for the sign-in key generations it records.
    key_store: phylax_store::DynStore,
    /// Ending a user's sessions: their grants, and a revocation every node
    /// applies.
    grants: Arc<dyn GrantStore>,
    keys: Arc<KeyRing>,
    auth_keys: Arc<AuthKeys>,
    hasher: Arc<PasswordHasher>,
    policy: PasswordPolicy,
    roles: Arc<Roles>,
    /// Argon2id computations at once (`auth.argon2_max_concurrent`), and
    /// how long one waits for a slot.
    argon2_slots: Arc<tokio::sync::Semaphore>,
    argon2_wait: std::time::Duration,
}

fn random_token() -> Result<String, AccountError> {
    Ok(URL_SAFE_NO_PAD.encode(phylax_crypto::random_array::<32>()?))
}

impl Accounts {
    /// `store`: the accounts use its users and, to end sessions, its
    /// grants and revocations (and hold only those two concerns).
    pub fn new(
        store: phylax_store::DynStore,
        keys: Arc<KeyRing>,
        auth_keys: Arc<AuthKeys>,
        params: PasswordParams,
        min_len_with_mfa: usize,
        roles: Arc<Roles>,
    ) -> Result<Accounts, AccountError> {
        Ok(Accounts {
            grants: store.clone(),
            key_store: store.clone(),
            store,
            keys,
            auth_keys,
            hasher: Arc::new(PasswordHasher::new(params)?),
            policy: PasswordPolicy::new(min_len_with_mfa),
            roles,
            argon2_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            argon2_wait: std::time::Duration::from_secs(5),
        })
    }

    /// At most `max` Argon2id computations at once; one waits at most
    /// `wait` for a slot, then fails with [`AccountError::Busy`].
    pub fn with_argon2_limit(mut self, max: usize, wait: std::time::Duration) -> Accounts {
        self.argon2_slots = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self.argon2_wait = wait;
        self
    }

    /// A slot for one Argon2id computation.
    async fn argon2_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, AccountError> {
        match tokio::time::timeout(self.argon2_wait, self.argon2_slots.clone().acquire_owned())
            .await
        {
            Ok(Ok(p)) => Ok(p),
            _ => Err(AccountError::Busy),
        }
    }

    fn aad(id: &str, rev: i64) -> Vec<u8> {
        format!("user/{id}/rev/{rev}").into_bytes()
    }

    async fn seal(&self, id: &str, rev: i64, a: &Account) -> Result<Vec<u8>, AccountError> {
        let json = Secret::new(serde_json::to_vec(a).map_err(|_| AccountError::Sealed)?);
        self.keys
            .seal_current(KEY_SCOPE, &Self::aad(id, rev), json.expose())
            .await
            .map_err(|e| AccountError::Keys(e.to_string()))
    }

    pub(super) async fn open(&self, rec: UserRecord) -> Result<User, AccountError> {
        let key = self
            .keys
            .for_record(KEY_SCOPE, &rec.sealed)
            .await
            .map_err(|e| AccountError::Keys(e.to_string()))?
            .ok_or(AccountError::Sealed)?;
        let plain = Secret::new(
            key.open(&Self::aad(&rec.id, rec.rev), &rec.sealed)
                .map_err(|_| AccountError::Sealed)?,
        );
        let acct: Account =
            serde_json::from_slice(plain.expose()).map_err(|_| AccountError::Sealed)?;
        let vouched = match &acct.bound {
            Some(b) => b.role == rec.role && b.status == rec.status,
            // Sealed before binding existed: only until every account is
            // bound (a row put back from then, with its role edited, is
            // refused after that).
            None => self.key_store.get_meta(ACCOUNTS_BOUND).await?.is_none(),
        };
        if !vouched {
            tracing::error!(
                user = %rec.id,
                "INTEGRITY FAILURE: a user's role or status in the database is not the one sealed with the account"
            );
            return Err(AccountError::Sealed);
        }
        Ok(User { rec, acct })
    }

    /// Create a user with a one-time enrollment link token (valid for
    /// `ttl` seconds). The returned token is shown once and never stored.
    pub async fn add(
        &self,
        username: &str,
        role: &str,
        patient: Option<&str>,
        ttl: i64,
        now: i64,
    ) -> Result<(User, String), AccountError> {
        self.add_linked(username, role, patient, None, ttl, now)
            .await
    }

    /// [`Accounts::add`] with a workforce user's `Practitioner` link.
    pub async fn add_linked(
        &self,
        username: &str,
        role: &str,
        patient: Option<&str>,
        practitioner: Option<&str>,
        ttl: i64,
        now: i64,
    ) -> Result<(User, String), AccountError> {
        if practitioner.is_some_and(|p| patient.is_some() || !phylax_fhir::ids::is_valid_id(p)) {
            return Err(AccountError::PractitionerLink);
        }
        let username = normalize_username(username)?;
        let r = self
            .roles
            .get(role)
            .ok_or_else(|| AccountError::BadRole(role.to_owned()))?;
        if r.patient != patient.is_some() {
            return Err(AccountError::PatientLink);
        }
        if let Some(p) = patient {
            phylax_fhir::ids::ResourceId::parse(p).ok_or(AccountError::PatientLink)?;
        }
        // The generations as the database has them now (a process that
        // started before a rotation would hash under an old one), and the
        // name under every one of them: taken is taken.
        self.reload_auth_keys().await?;
        if self.find_normalized(&username).await?.is_some() {
            return Err(AccountError::Taken);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let token = random_token()?;
        let mut acct = Account::default();
        acct.username = username.clone();
        acct.patient = patient.map(str::to_owned);
        acct.practitioner = practitioner.map(str::to_owned);
        acct.enrollment = Some(Enrollment {
            hash: self.keyed_stored("enroll", token.as_bytes()),
            expires: now + ttl,
        });
        let rec = UserRecord {
            id: id.clone(),
            username_hash: self.username_hash(&username),
            role: r.name.clone(),
            status: Status::Active.as_str().into(),
            sealed: {
                acct.bound = Some(Bound {
                    role: r.name.clone(),
                    status: Status::Active.as_str().into(),
                });
                self.seal(&id, 0, &acct).await?
            },
            rev: 0,
            created_at: now,
        };
        match self.store.add_user(&rec).await {
            Err(StoreError::Duplicate) => return Err(AccountError::Taken),
            other => other?,
        }
        // A rotation that began meanwhile may have moved the name to a
        // newer generation's hash, where the unique index did not see
        // this row: look again with the generations as they are now.
        self.reload_auth_keys().await?;
        if self.holders(&username).await?.iter().any(|r| r.id != id) {
            self.store.delete_user(&id).await?;
            return Err(AccountError::Taken);
        }
        Ok((User { rec, acct }, format!("{id}.{token}")))
    }

    pub async fn load(&self, id: &str) -> Result<Option<User>, AccountError> {
        match self.store.get_user(id).await? {
            Some(r) => Ok(Some(self.open(r).await?)),
            None => Ok(None),
        }
    }

    /// Find by username (normalised first). Unknown → `None`.
    pub async fn find(&self, username: &str) -> Result<Option<User>, AccountError> {
        let Ok(n) = normalize_username(username) else {
            return Ok(None);
        };
        match self.find_normalized(&n).await? {
            Some(r) => Ok(Some(self.open(r).await?)),
            None => Ok(None),
        }
    }

    pub async fn list(&self) -> Result<Vec<User>, AccountError> {
        let mut out = Vec::new();
        for r in self.store.list_users().await? {
            out.push(self.open(r).await?);
        }
        Ok(out)
    }

    /// Apply `f` to the current user and store the result, retrying when
    /// another writer got there first. `f` may refuse (its error is
    /// returned, nothing is written) and sees fresh state on every retry.
    pub async fn modify<T>(
        &self,
        id: &str,
        mut f: impl FnMut(&mut User) -> Result<T, AccountError>,
    ) -> Result<(User, T), AccountError> {
        for _ in 0..8 {
            let mut u = self.load(id).await?.ok_or(AccountError::NoSuchUser)?;
            let out = f(&mut u)?;
            u.acct.bound = Some(Bound {
                role: u.rec.role.clone(),
                status: u.rec.status.clone(),
            });
            u.rec.sealed = self.seal(id, u.rec.rev + 1, &u.acct).await?;
            if self.store.update_user(&u.rec).await? {
                u.rec.rev += 1;
                return Ok((u, out));
            }
        }
        Err(AccountError::Contended)
    }

    /// Set a user's status. Disabling or locking ends every session and
    /// token of the user, on every node (a revocation entry).
    pub async fn set_status(
        &self,
        id: &str,
        status: Status,
        now: i64,
    ) -> Result<User, AccountError> {
        let (u, ()) = self
            .modify(id, |u| {
                u.rec.status = status.as_str().into();
                // An administrator's (or a detector's) lock lasts until
                // lifted; unlocking clears the back-off too.
                u.acct.locked_until = None;
                if status == Status::Active {
                    u.acct.failures = 0;
                    u.acct.lockouts = 0;
                }
                Ok(())
            })
            .await?;
        if status != Status::Active {
            self.end_sessions(id, now).await?;
        }
        Ok(u)
    }

    /// Change a user's role (a privilege change): their sessions and tokens
    /// end, so the next sign-in gets a new session with the new role.
    pub async fn set_role(&self, id: &str, role: &str, now: i64) -> Result<User, AccountError> {
        let r = self
            .roles
            .get(role)
            .ok_or_else(|| AccountError::BadRole(role.to_owned()))?;
        let (u, ()) = self
            .modify(id, |u| {
                if r.patient != u.acct.patient.is_some() {
                    return Err(AccountError::PatientLink);
                }
                u.rec.role = r.name.clone();
                Ok(())
            })
            .await?;
        self.end_sessions(id, now).await?;
        Ok(u)
    }

    /// Link a workforce user to their `Practitioner` resource (or unlink
    /// with `None`). Their care relationships follow from it, so their
    /// sessions and tokens end, as for a role change.
    pub async fn set_practitioner(
        &self,
        id: &str,
        practitioner: Option<&str>,
        now: i64,
    ) -> Result<User, AccountError> {
        if practitioner.is_some_and(|p| !phylax_fhir::ids::is_valid_id(p)) {
            return Err(AccountError::PractitionerLink);
        }
        let (u, ()) = self
            .modify(id, |u| {
                if u.acct.patient.is_some() {
                    return Err(AccountError::PractitionerLink);
                }
                u.acct.practitioner = practitioner.map(str::to_owned);
                Ok(())
            })
            .await?;
        self.end_sessions(id, now).await?;
        Ok(u)
    }

    /// A new enrollment link (e.g. a lost password); the old password stays
    /// until the link is used.
    pub async fn new_enrollment(
        &self,
        id: &str,
        ttl: i64,
        now: i64,
    ) -> Result<String, AccountError> {
        let token = random_token()?;
        let hash = self.keyed_stored("enroll", token.as_bytes());
        self.modify(id, |u| {
            u.acct.enrollment = Some(Enrollment {
                hash: hash.clone(),
                expires: now + ttl,
            });
            Ok(())
        })
        .await?;
        Ok(format!("{id}.{token}"))
    }

    /// Delete every grant of the user and publish a revocation so every
    /// node refuses their unexpired access tokens within seconds.
    pub async fn end_sessions(&self, id: &str, now: i64) -> Result<(), AccountError> {
        self.grants.delete_user_grants(id).await?;
        self.grants.add_revocation("user", id, now).await?;
        Ok(())
    }
}

/// Ten codes of ten base32 characters (50 bits each), shown as
/// `xxxxx-xxxxx`.
fn recovery_codes() -> Result<Vec<String>, AccountError> {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut out = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let raw = phylax_crypto::random_array::<10>()?;
        let s: String = raw
            .iter()
            .map(|b| ALPHABET[(b & 31) as usize] as char)
            .collect();
        out.push(format!("{}-{}", &s[..5], &s[5..]));
    }
    Ok(out)
}

/// A passkey's display name: trimmed, 1–64 characters, no control
/// characters.
fn clean_name(s: &str) -> Result<String, AccountError> {
    let n = s.trim();
    if n.is_empty() || n.chars().count() > 64 || n.chars().any(char::is_control) {
        return Err(AccountError::BadName);
    }
    Ok(n.to_owned())
}

/// Recovery codes compare without dashes, spaces or case.
fn normalize_recovery(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_normalise() {
        assert_eq!(normalize_username("  Alice ").unwrap(), "alice");
        assert_eq!(normalize_username("ＡＬＩＣＥ").unwrap(), "alice");
        assert!(normalize_username("").is_err());
        assert!(normalize_username("a b").is_err());
        assert!(normalize_username("a\u{0}b").is_err());
        assert!(normalize_username(&"a".repeat(65)).is_err());
    }

    #[test]
    fn recovery_codes_are_distinct_and_normalise() {
        let c = recovery_codes().unwrap();
        assert_eq!(c.len(), 10);
        let set: std::collections::HashSet<_> = c.iter().collect();
        assert_eq!(set.len(), 10);
        assert!(c.iter().all(|x| x.len() == 11 && &x[5..6] == "-"));
        assert_eq!(normalize_recovery(" ABCDE-fghij "), "abcdefghij");
    }

    #[test]
    fn account_debug_hides_secrets() {
        let mut a = Account::default();
        a.username = "alice".into();
        a.password = Some("$argon2id$secret".into());
        a.totp = Some("SECRETTOTP".into());
        let d = format!("{a:?}");
        assert!(!d.contains("alice") && !d.contains("secret") && !d.contains("SECRETTOTP"));
    }
}
