//! KEK generations inside a PKCS#11 hardware security module.
//!
//! Each generation is an AES-256 secret key object on the token, labelled
//! `{label}-{N}`, created inside the HSM with `CKA_SENSITIVE` true and
//! `CKA_EXTRACTABLE` false: its bytes never leave the device. Wrapping and
//! unwrapping are `CKM_AES_GCM` operations in the HSM, with the same
//! random 96-bit IV and additional data as a software KEK, so the wrapped
//! format is the same whichever provider holds a generation. A key object
//! that is extractable or not sensitive is refused rather than used.
//!
//! One PKCS#11 context per module per process (a second `C_Initialize` of
//! the same module fails, and dropping a context finalizes the module for
//! every user of it), shared by every [`Hsm`] opened on that module.

use crate::secret::Secret;
use crate::CryptoError;
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Where the KEK lives in an HSM. The PIN is read by the caller from a
/// file or an environment variable, never from the configuration.
pub struct HsmConfig {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The user PIN.
    pub pin: Secret,
    /// Key objects are labelled `{key_label}-{generation}`.
    pub key_label: String,
}

impl std::fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

fn hsm_err(what: &str, e: cryptoki::error::Error) -> CryptoError {
    CryptoError::Hsm(format!("{what}: {e}"))
}

fn context(module: &Path) -> Result<Pkcs11, CryptoError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| CryptoError::Hsm("context lock poisoned".into()))?;
    let key = std::fs::canonicalize(module)
        .map_err(|e| CryptoError::Hsm(format!("module {}: {}", module.display(), e.kind())))?;
    if let Some(c) = map.get(&key) {
        return Ok(c.clone());
    }
    let ctx = Pkcs11::new(&key).map_err(|e| hsm_err("loading the module", e))?;
    ctx.initialize(CInitializeArgs::OsThreads)
        .map_err(|e| hsm_err("C_Initialize", e))?;
    map.insert(key, ctx.clone());
    Ok(ctx)
}

/// An open, logged-in session on the token that holds the KEK.
pub(super) struct Hsm {
    session: Mutex<Session>,
    key_label: String,
    pub(super) token: String,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm").field("token", &self.token).finish()
    }
}

impl Hsm {
    pub(super) fn open(cfg: &HsmConfig) -> Result<Hsm, CryptoError> {
        let ctx = context(&cfg.module)?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| hsm_err("listing slots", e))?;
        let slot = slots
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| t.label().trim() == cfg.token)
                    .unwrap_or(false)
            })
            .ok_or_else(|| CryptoError::Hsm(format!("no token labelled {:?}", cfg.token)))?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| hsm_err("opening a session", e))?;
        let pin = std::str::from_utf8(cfg.pin.expose())
            .map_err(|_| CryptoError::Hsm("the PIN is not UTF-8".into()))?
            .trim_end_matches(['\n', '\r']);
        match session.login(UserType::User, Some(&AuthPin::new(pin.to_owned()))) {
            Ok(()) => {}
            // Logging in is per application and token: another session of
            // this process already did.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => return Err(hsm_err("logging in", e)),
        }
        Ok(Hsm {
            session: Mutex::new(session),
            key_label: cfg.key_label.clone(),
            token: cfg.token.clone(),
        })
    }

    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>, CryptoError> {
        self.session
            .lock()
            .map_err(|_| CryptoError::Hsm("session lock poisoned".into()))
    }

    fn label(&self, n: u32) -> String {
        format!("{}-{n}", self.key_label)
    }

    /// The KEK generations on the token. Refuses key objects that could
    /// leave the HSM.
    pub(super) fn generations(&self) -> Result<BTreeMap<u32, ObjectHandle>, CryptoError> {
        let s = self.session()?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ])
            .map_err(|e| hsm_err("finding keys", e))?;
        let prefix = format!("{}-", self.key_label);
        let mut out = BTreeMap::new();
        for h in found {
            let attrs = match s.get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                ],
            ) {
                Ok(a) => a,
                // Destroyed between the search and now: a generation
                // another process retired, or another instance's key on
                // a shared token. Not there is not ours.
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::ObjectHandleInvalid,
                    _,
                )) => continue,
                Err(e) => return Err(hsm_err("reading key attributes", e)),
            };
            let (mut gen, mut extractable, mut sensitive) = (None, true, false);
            for a in attrs {
                match a {
                    Attribute::Label(l) => {
                        gen = String::from_utf8(l)
                            .ok()
                            .and_then(|l| l.strip_prefix(&prefix).map(str::to_owned))
                            .and_then(|n| n.parse::<u32>().ok())
                            .filter(|n| *n > 0);
                    }
                    Attribute::Extractable(b) => extractable = b,
                    Attribute::Sensitive(b) => sensitive = b,
                    _ => {}
                }
            }
            let Some(gen) = gen else { continue };
            if extractable || !sensitive {
                return Err(CryptoError::Hsm(format!(
                    "key {} can leave the HSM (extractable or not sensitive); refusing it",
                    self.label(gen)
                )));
            }
            if out.insert(gen, h).is_some() {
                return Err(CryptoError::Hsm(format!(
                    "two keys labelled {}",
                    self.label(gen)
                )));
            }
        }
        Ok(out)
    }

    /// Create generation `n` inside the HSM (non-extractable).
    pub(super) fn generate(&self, n: u32) -> Result<ObjectHandle, CryptoError> {
        let label = self.label(n).into_bytes();
        self.session()?
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Id(label.clone()),
                    Attribute::Label(label),
                ],
            )
            .map_err(|e| hsm_err("generating a key", e))
    }

    /// The owner recorded on the token (a data object labelled
    /// `{label}-owner`): the data directory of the instance whose
    /// rotations may destroy this label's generations.
    pub(super) fn owner(&self) -> Result<Option<String>, CryptoError> {
        let s = self.session()?;
        let label = format!("{}-owner", self.key_label).into_bytes();
        let found = s
            .find_objects(&[Attribute::Class(ObjectClass::DATA), Attribute::Label(label)])
            .map_err(|e| hsm_err("finding the owner record", e))?;
        let Some(h) = found.first() else {
            return Ok(None);
        };
        for a in s
            .get_attributes(*h, &[AttributeType::Value])
            .map_err(|e| hsm_err("reading the owner record", e))?
        {
            if let Attribute::Value(v) = a {
                return Ok(String::from_utf8(v).ok());
            }
        }
        Ok(None)
    }

    /// Record `owner` on the token, replacing any earlier record.
    pub(super) fn set_owner(&self, owner: &str) -> Result<(), CryptoError> {
        let s = self.session()?;
        let label = format!("{}-owner", self.key_label).into_bytes();
        for h in s
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Label(label.clone()),
            ])
            .map_err(|e| hsm_err("finding the owner record", e))?
        {
            s.destroy_object(h)
                .map_err(|e| hsm_err("replacing the owner record", e))?;
        }
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Application(b"phylax".to_vec()),
            Attribute::Label(label),
            Attribute::Value(owner.as_bytes().to_vec()),
        ])
        .map_err(|e| hsm_err("writing the owner record", e))?;
        Ok(())
    }

    pub(super) fn destroy(&self, h: ObjectHandle) -> Result<(), CryptoError> {
        self.session()?
            .destroy_object(h)
            .map_err(|e| hsm_err("destroying a key", e))
    }

    pub(super) fn seal(
        &self,
        h: ObjectHandle,
        iv: &[u8],
        aad: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut iv = iv.to_vec();
        let params =
            GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| hsm_err("GCM parameters", e))?;
        self.session()?
            .encrypt(&Mechanism::AesGcm(params), h, plain)
            .map_err(|e| hsm_err("wrapping", e))
    }

    pub(super) fn open_sealed(
        &self,
        h: ObjectHandle,
        iv: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Secret, CryptoError> {
        let mut iv = iv.to_vec();
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(|_| CryptoError::Decrypt)?;
        self.session()?
            .decrypt(&Mechanism::AesGcm(params), h, sealed)
            .map(Secret::new)
            .map_err(|_| CryptoError::Decrypt)
    }
}
