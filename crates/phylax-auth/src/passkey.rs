//! Passkeys (WebAuthn Level 3) as a relying party, over the pure-Rust
//! `webauthn_rp` crate (no OpenSSL, which `deny.toml` bans).
//!
//! What the ceremonies check (in `webauthn_rp`, configured here):
//! - the **challenge** is the one this server issued, once (the server
//!   state is single use and expires after five minutes);
//! - the **origin** in the client data is one of ours, not cross-origin;
//! - the **RP ID hash** in the authenticator data is ours;
//! - **user verification** (PIN or biometric) when the caller requires it
//!   (privileged roles);
//! - the **signature** over the authenticator data and client data, with
//!   the credential's registered public key;
//! - the **signature counter** never goes backwards: a counter that does not
//!   increase (except authenticators that always report 0) means a cloned
//!   authenticator, and the ceremony fails.
//!
//! The server state of a ceremony in progress is serialised
//! ([`Ceremony`] bytes) so any node can finish it; callers seal and store
//! it. Credentials are stored as [`StoredPasskey`].
//!
//! With the `soft-authenticator` feature, [`soft`] provides a software
//! authenticator for tests (never enabled in the shipped binary).

#[cfg(any(test, feature = "soft-authenticator"))]
pub mod soft;

use webauthn_rp::bin::{Decode, Encode};
use webauthn_rp::request::auth::{
    AllowedCredential, AllowedCredentials, AuthenticationVerificationOptions,
    NonDiscoverableCredentialRequestOptions, SignatureCounterEnforcement,
};
use webauthn_rp::request::register::{
    PublicKeyCredentialCreationOptions, PublicKeyCredentialUserEntity,
    RegistrationVerificationOptions, UserHandle, Username,
};
use webauthn_rp::request::{
    AsciiDomain, Credentials, PublicKeyCredentialDescriptor, RpId, UserVerificationRequirement,
};
use webauthn_rp::response::register::{CompressedPubKey, DynamicState, StaticState};
use webauthn_rp::response::{AuthTransports, CredentialId};
use webauthn_rp::{
    AuthenticatedCredential, NonDiscoverableAuthentication16,
    NonDiscoverableAuthenticationServerState, Registration, RegistrationServerState,
};

/// User handles are 16 random bytes per user (never derived from the
/// username: the handle is visible to the authenticator and the browser).
pub const USER_HANDLE_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    #[error("the relying party id is not a valid domain")]
    BadRpId,
    #[error("the ceremony could not be started: {0}")]
    Start(String),
    #[error("the ceremony state is unreadable or expired")]
    State,
    #[error("the authenticator's response is malformed")]
    Malformed,
    #[error("registration refused: {0}")]
    Registration(String),
    #[error("authentication refused: {0}")]
    Authentication(String),
    /// The signature counter went backwards: the authenticator may have
    /// been cloned. The credential should be flagged and refused.
    #[error("signature counter regression (possible cloned authenticator)")]
    CounterRegression,
    #[error("the stored credential is unreadable")]
    Stored,
}

/// A registered credential as Phylax stores it (inside the sealed account).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredPasskey {
    /// The credential id.
    pub id: Vec<u8>,
    /// The public key and static extension outputs (`webauthn_rp` binary).
    pub static_state: Vec<u8>,
    /// Signature counter, UV and backup flags (`webauthn_rp` binary).
    pub dynamic_state: Vec<u8>,
    /// Transports hint for the browser.
    pub transports: u8,
    /// The user's name for it ("work laptop").
    pub name: String,
    pub created_at: i64,
    #[serde(default)]
    pub last_used: Option<i64>,
}

/// A ceremony in progress, serialised: seal it and store it until the
/// browser answers.
#[derive(Debug, Clone)]
pub struct Ceremony(pub Vec<u8>);

/// The relying party: RP ID (a domain) and the origins pages come from.
#[derive(Debug)]
pub struct RelyingParty {
    rp_id: RpId,
    origins: Vec<String>,
}

fn uv(required: bool) -> UserVerificationRequirement {
    if required {
        UserVerificationRequirement::Required
    } else {
        UserVerificationRequirement::Preferred
    }
}

impl RelyingParty {
    /// `rp_id` is a registrable domain (or `localhost`); `origins` are the
    /// exact origins (`https://host[:port]`) sign-in pages are served from.
    pub fn new(rp_id: &str, origins: Vec<String>) -> Result<RelyingParty, PasskeyError> {
        let d = AsciiDomain::try_from(rp_id.to_owned()).map_err(|_| PasskeyError::BadRpId)?;
        Ok(RelyingParty {
            rp_id: RpId::Domain(d),
            origins,
        })
    }

    /// Start registering a new passkey for a user. `existing` credentials
    /// are excluded so an authenticator does not register twice. Returns
    /// the state to keep and the options (JSON) for
    /// `navigator.credentials.create`.
    pub fn start_registration(
        &self,
        user_handle: &[u8; USER_HANDLE_LEN],
        username: &str,
        existing: &[StoredPasskey],
        require_uv: bool,
    ) -> Result<(Ceremony, String), PasskeyError> {
        let handle = UserHandle::<USER_HANDLE_LEN>::decode(*user_handle)
            .map_err(|_| PasskeyError::Start("user handle".into()))?;
        let name =
            Username::try_from(username).map_err(|_| PasskeyError::Start("username".into()))?;
        let user = PublicKeyCredentialUserEntity {
            name,
            id: &handle,
            display_name: None,
        };
        let mut exclude = Vec::with_capacity(existing.len());
        for c in existing {
            exclude.push(descriptor(c)?);
        }
        let mut opts = PublicKeyCredentialCreationOptions::passkey(&self.rp_id, user, exclude);
        opts.authenticator_selection.user_verification = uv(require_uv);
        // No credProtect demand: user verification is enforced by this
        // server at every authentication where the role requires it, and
        // many authenticators do not report the extension.
        opts.extensions = Default::default();
        let (server, client) = opts
            .start_ceremony()
            .map_err(|e| PasskeyError::Start(e.to_string()))?;
        keep(server.encode().ok(), &client)
    }

    /// Finish a registration: verify the browser's response (the JSON of
    /// `PublicKeyCredential`) against the kept state.
    pub fn finish_registration(
        &self,
        state: &Ceremony,
        response_json: &[u8],
        name: &str,
        now: i64,
    ) -> Result<StoredPasskey, PasskeyError> {
        let server = RegistrationServerState::<USER_HANDLE_LEN>::decode(state.0.as_slice())
            .map_err(|_| PasskeyError::State)?;
        let reg =
            Registration::from_json_relaxed(response_json).map_err(|_| PasskeyError::Malformed)?;
        let origins: Vec<&str> = self.origins.iter().map(String::as_str).collect();
        let opts = RegistrationVerificationOptions::<&str, &str> {
            allowed_origins: &origins,
            ..Default::default()
        };
        let cred = server
            .verify(&self.rp_id, &reg, &opts)
            .map_err(|e| PasskeyError::Registration(e.to_string()))?;
        let (id, transports, _user, static_state, dynamic_state, _meta) = cred.into_parts();
        Ok(StoredPasskey {
            id: id.as_ref().to_vec(),
            static_state: static_state.encode().map_err(|_| PasskeyError::Stored)?,
            dynamic_state: dynamic_state
                .encode()
                .map_err(|_| PasskeyError::Stored)?
                .to_vec(),
            transports: transports.encode().map_err(|_| PasskeyError::Stored)?,
            name: name.to_owned(),
            created_at: now,
            last_used: None,
        })
    }

    /// Start authenticating a known user with one of their passkeys.
    pub fn start_authentication(
        &self,
        creds: &[StoredPasskey],
        require_uv: bool,
    ) -> Result<(Ceremony, String), PasskeyError> {
        let mut allowed = AllowedCredentials::with_capacity(creds.len());
        for c in creds {
            let d = descriptor(c)?;
            allowed.push(AllowedCredential::from(d));
        }
        let mut opts = NonDiscoverableCredentialRequestOptions::second_factor(&self.rp_id, allowed)
            .map_err(|_| PasskeyError::Start("no credentials".into()))?;
        opts.options().user_verification = uv(require_uv);
        let (server, client) = opts
            .start_ceremony()
            .map_err(|e| PasskeyError::Start(e.to_string()))?;
        keep(server.encode().ok(), &client)
    }

    /// Finish an authentication. On success the matched credential's stored
    /// state (signature counter, flags, last use) is updated in `creds` and
    /// its index returned; the caller stores the account.
    pub fn finish_authentication(
        &self,
        state: &Ceremony,
        response_json: &[u8],
        user_handle: &[u8; USER_HANDLE_LEN],
        creds: &mut [StoredPasskey],
        now: i64,
    ) -> Result<usize, PasskeyError> {
        let server = NonDiscoverableAuthenticationServerState::decode(state.0.as_slice())
            .map_err(|_| PasskeyError::State)?;
        let auth = NonDiscoverableAuthentication16::from_json_relaxed(response_json)
            .map_err(|_| PasskeyError::Malformed)?;
        let raw = auth.raw_id().as_ref().to_vec();
        let i = creds
            .iter()
            .position(|c| c.id == raw)
            .ok_or_else(|| PasskeyError::Authentication("unknown credential".into()))?;
        let handle = UserHandle::<USER_HANDLE_LEN>::decode(*user_handle)
            .map_err(|_| PasskeyError::Stored)?;
        let c = &creds[i];
        let id =
            CredentialId::<&[u8]>::decode(c.id.as_slice()).map_err(|_| PasskeyError::Stored)?;
        let st = StaticState::<CompressedPubKey<[u8; 32], [u8; 32], [u8; 48], Vec<u8>>>::decode(
            c.static_state.as_slice(),
        )
        .map_err(|_| PasskeyError::Stored)?;
        let dyn_bytes: [u8; 7] = c
            .dynamic_state
            .as_slice()
            .try_into()
            .map_err(|_| PasskeyError::Stored)?;
        let ds = DynamicState::decode(dyn_bytes).map_err(|_| PasskeyError::Stored)?;
        let mut cred =
            AuthenticatedCredential::new(id, &handle, st, ds).map_err(|_| PasskeyError::Stored)?;
        let origins: Vec<&str> = self.origins.iter().map(String::as_str).collect();
        let opts = AuthenticationVerificationOptions::<&str, &str> {
            allowed_origins: &origins,
            update_uv: true,
            sig_counter_enforcement: SignatureCounterEnforcement::Fail,
            ..Default::default()
        };
        match server.verify(&self.rp_id, &auth, &mut cred, &opts) {
            Ok(_) => {}
            Err(webauthn_rp::response::auth::error::AuthCeremonyErr::SignatureCounter) => {
                return Err(PasskeyError::CounterRegression)
            }
            Err(e) => return Err(PasskeyError::Authentication(e.to_string())),
        }
        let new_dyn = cred
            .dynamic_state()
            .encode()
            .map_err(|_| PasskeyError::Stored)?
            .to_vec();
        let c = &mut creds[i];
        c.dynamic_state = new_dyn;
        c.last_used = Some(now);
        Ok(i)
    }
}

/// The credential id a response names (`rawId`), without verifying it.
pub fn credential_id(response_json: &[u8]) -> Result<Vec<u8>, PasskeyError> {
    let auth = NonDiscoverableAuthentication16::from_json_relaxed(response_json)
        .map_err(|_| PasskeyError::Malformed)?;
    Ok(auth.raw_id().as_ref().to_vec())
}

/// Serialise a started ceremony: the server half to keep, the client half
/// (JSON) for the browser.
fn keep<C: serde::Serialize>(
    state: Option<Vec<u8>>,
    client: &C,
) -> Result<(Ceremony, String), PasskeyError> {
    let state = state.ok_or(PasskeyError::State)?;
    let json = serde_json::to_string(client).map_err(|e| PasskeyError::Start(e.to_string()))?;
    Ok((Ceremony(state), json))
}

fn descriptor(c: &StoredPasskey) -> Result<PublicKeyCredentialDescriptor<Vec<u8>>, PasskeyError> {
    Ok(PublicKeyCredentialDescriptor {
        id: CredentialId::<Vec<u8>>::decode(c.id.clone()).map_err(|_| PasskeyError::Stored)?,
        transports: AuthTransports::decode(c.transports).map_err(|_| PasskeyError::Stored)?,
    })
}

#[cfg(test)]
mod tests {
    use super::soft::SoftAuthenticator;
    use super::*;

    const ORIGIN: &str = "https://phylax.example:8443";

    fn rp() -> RelyingParty {
        RelyingParty::new("phylax.example", vec![ORIGIN.into()]).unwrap()
    }

    fn registered(uv: bool) -> (SoftAuthenticator, StoredPasskey) {
        let rp = rp();
        let mut a = SoftAuthenticator::new(ORIGIN);
        a.uv = uv;
        let (state, opts) = rp.start_registration(&[9; 16], "alice", &[], uv).unwrap();
        let resp = a.register(&opts);
        let c = rp
            .finish_registration(&state, resp.as_bytes(), "laptop", 100)
            .unwrap();
        (a, c)
    }

    #[test]
    fn register_then_authenticate() {
        let rp = rp();
        let (mut a, c) = registered(true);
        assert_eq!(c.id, a.cred_id);
        assert_eq!(c.name, "laptop");
        let mut creds = vec![c];
        for _ in 0..3 {
            let (state, opts) = rp.start_authentication(&creds, true).unwrap();
            let resp = a.authenticate(&opts);
            let i = rp
                .finish_authentication(&state, resp.as_bytes(), &[9; 16], &mut creds, 200)
                .unwrap();
            assert_eq!(i, 0);
        }
        assert_eq!(creds[0].last_used, Some(200));
    }

    #[test]
    fn hostile_registrations_fail() {
        let rp = rp();
        // Another origin (a phishing site relaying the ceremony).
        let mut a = SoftAuthenticator::new("https://phylax.example.evil:8443");
        let (state, opts) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        assert!(matches!(
            rp.finish_registration(&state, a.register(&opts).as_bytes(), "x", 1),
            Err(PasskeyError::Registration(_))
        ));
        // Another RP ID.
        let mut a = SoftAuthenticator::new(ORIGIN);
        a.rp_id_override = Some("evil.example".into());
        let (state, opts) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        assert!(matches!(
            rp.finish_registration(&state, a.register(&opts).as_bytes(), "x", 1),
            Err(PasskeyError::Registration(_))
        ));
        // No user verification where it is required.
        let mut a = SoftAuthenticator::new(ORIGIN);
        a.uv = false;
        let (state, opts) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        assert!(matches!(
            rp.finish_registration(&state, a.register(&opts).as_bytes(), "x", 1),
            Err(PasskeyError::Registration(_))
        ));
        // A response to another ceremony's challenge.
        let mut a = SoftAuthenticator::new(ORIGIN);
        let (_, opts1) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        let (state2, _) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        assert!(matches!(
            rp.finish_registration(&state2, a.register(&opts1).as_bytes(), "x", 1),
            Err(PasskeyError::Registration(_))
        ));
        // Garbage.
        let (state, _) = rp.start_registration(&[9; 16], "alice", &[], true).unwrap();
        assert!(matches!(
            rp.finish_registration(&state, b"{}", "x", 1),
            Err(PasskeyError::Malformed)
        ));
        assert!(rp
            .finish_registration(&Ceremony(vec![1, 2, 3]), b"{}", "x", 1)
            .is_err());
    }

    #[test]
    fn hostile_authentications_fail() {
        let rp = rp();
        let (a, c) = registered(true);
        let creds = vec![c];
        let try_with = |mut auth: SoftAuthenticator, uv: bool, creds: &mut Vec<StoredPasskey>| {
            let (state, opts) = rp.start_authentication(creds, uv).unwrap();
            let resp = auth.authenticate(&opts);
            rp.finish_authentication(&state, resp.as_bytes(), &[9; 16], creds, 300)
        };
        // Wrong origin, wrong RP, no UV where required.
        let mut bad = a.clone();
        bad.origin = "https://evil.example".into();
        assert!(matches!(
            try_with(bad, true, &mut creds.clone()),
            Err(PasskeyError::Authentication(_))
        ));
        let mut bad = a.clone();
        bad.rp_id_override = Some("evil.example".into());
        assert!(matches!(
            try_with(bad, true, &mut creds.clone()),
            Err(PasskeyError::Authentication(_))
        ));
        let mut bad = a.clone();
        bad.uv = false;
        assert!(matches!(
            try_with(bad, true, &mut creds.clone()),
            Err(PasskeyError::Authentication(_))
        ));
        // Another authenticator's key under the same credential id.
        let mut other = SoftAuthenticator::new(ORIGIN);
        other.cred_id = a.cred_id.clone();
        other.user_handle = a.user_handle.clone();
        assert!(matches!(
            try_with(other, true, &mut creds.clone()),
            Err(PasskeyError::Authentication(_))
        ));
        // Replaying a response (same challenge state used twice).
        let mut cs = creds.clone();
        let (state, opts) = rp.start_authentication(&cs, true).unwrap();
        let mut a2 = a.clone();
        let resp = a2.authenticate(&opts);
        rp.finish_authentication(&state, resp.as_bytes(), &[9; 16], &mut cs, 300)
            .unwrap();
        assert!(
            rp.finish_authentication(&state, resp.as_bytes(), &[9; 16], &mut cs, 300)
                .is_err(),
            "the counter did not advance: a replay"
        );
        // A clone: both copies start from the same counter; once the
        // original has moved ahead, the clone's lower counter is refused.
        let mut cs = creds.clone();
        let mut original = a.clone();
        let mut clone = a.clone();
        for _ in 0..3 {
            let (state, opts) = rp.start_authentication(&cs, true).unwrap();
            let r = original.authenticate(&opts);
            rp.finish_authentication(&state, r.as_bytes(), &[9; 16], &mut cs, 300)
                .unwrap();
        }
        let (state, opts) = rp.start_authentication(&cs, true).unwrap();
        let r = clone.authenticate(&opts);
        assert!(matches!(
            rp.finish_authentication(&state, r.as_bytes(), &[9; 16], &mut cs, 300),
            Err(PasskeyError::CounterRegression)
        ));
    }
}
