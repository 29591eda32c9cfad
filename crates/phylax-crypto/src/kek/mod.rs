//! The key-encryption key (KEK), in generations.
//!
//! The KEK only ever wraps other keys (data keys, MAC keys, signing keys),
//! with AES-256-GCM, a random 96-bit nonce and additional data naming the
//! wrapped key's purpose and scope (and the KEK generation), so a wrapped
//! key cannot be swapped for another or moved to another generation. It
//! never touches the database.
//!
//! A KEK has generations, numbered from 1. New wraps use the newest one;
//! every wrapped key names the generation it was wrapped under, so a
//! rotation adds a generation, re-wraps every stored key under it and only
//! then retires the old one (docs/KEYS.md). Generations come from
//! providers, which may be combined while moving between them:
//! - a key file (`N:BASE64` per line, mode 0600, refused if group- or
//!   world-readable, kept outside the data directory; [`text`]);
//! - the `PHYLAX_KEK` environment variable, same text (fixed for the
//!   life of the process: adding or retiring a generation is the
//!   operator's edit);
//! - a PKCS#11 HSM, where each generation is a non-extractable key object
//!   and wrapping happens inside the device ([`hsm`]).
//!
//! # Layout
//! - this file: [`Kek`], generations, wrap and unwrap;
//! - [`text`]: the key-file and environment text format;
//! - [`hsm`]: the PKCS#11 provider;
//! - [`escrow`]: the software generations encrypted with age to the
//!   recipients who keep the KEK recoverable (`phylax keys escrow`).
//!
//! A KEK generation wraps few keys (one per patient plus a handful), far
//! below the 2^32 random-nonce limit for one GCM key.

mod escrow;
pub mod hsm;
mod text;

pub use escrow::Recipients;

use crate::datakey::DataKey;
use crate::secret::Secret;
use crate::{random_array, CryptoError};
use hsm::{Hsm, HsmConfig};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Wrap format 1: `0x01 || nonce(12) || ciphertext+tag`, generation 1.
const WRAP_V1: u8 = 1;
/// Wrap format 2: `0x02 || generation(u32 BE) || nonce(12) || ciphertext+tag`.
const WRAP_V2: u8 = 2;
const TAG: usize = 16;

/// Where a KEK generation is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    File,
    Env,
    Hsm,
    Memory,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::File => "file",
            Provider::Env => "env",
            Provider::Hsm => "pkcs11",
            Provider::Memory => "memory",
        }
    }
}

enum Material {
    Soft(Box<LessSafeKey>),
    Hsm(Arc<Hsm>, cryptoki::object::ObjectHandle),
}

struct Generation {
    material: Material,
    provider: Provider,
}

enum Source {
    File(PathBuf),
    Env(Secret),
    Hsm(Arc<Hsm>),
    Memory(Mutex<BTreeMap<u32, Secret>>),
}

impl Source {
    /// The generations' key bytes, for a provider that holds them in
    /// software (not an HSM).
    fn software(&self) -> Result<Option<BTreeMap<u32, Secret>>, CryptoError> {
        Ok(match self {
            Source::File(p) => Some(text::read_file(p)?),
            Source::Env(v) => Some(text::parse(
                std::str::from_utf8(v.expose()).map_err(|_| CryptoError::MalformedKey)?,
            )?),
            Source::Memory(m) => Some(lock(m)?.clone()),
            Source::Hsm(_) => None,
        })
    }

    fn provider(&self) -> Provider {
        match self {
            Source::File(_) => Provider::File,
            Source::Env(_) => Provider::Env,
            Source::Hsm(_) => Provider::Hsm,
            Source::Memory(_) => Provider::Memory,
        }
    }

    fn load(&self, out: &mut BTreeMap<u32, Arc<Generation>>) -> Result<(), CryptoError> {
        let soft = |gens: BTreeMap<u32, Secret>| -> Result<Vec<(u32, Material)>, CryptoError> {
            gens.into_iter()
                .map(|(n, k)| Ok((n, Material::Soft(Box::new(aead_key(&k)?)))))
                .collect()
        };
        let found = match self {
            Source::File(p) => soft(text::read_file(p)?)?,
            Source::Env(v) => soft(text::parse(
                std::str::from_utf8(v.expose()).map_err(|_| CryptoError::MalformedKey)?,
            )?)?,
            Source::Memory(m) => soft(lock(m)?.clone())?,
            Source::Hsm(h) => h
                .generations()?
                .into_iter()
                .map(|(n, o)| (n, Material::Hsm(h.clone(), o)))
                .collect(),
        };
        for (n, material) in found {
            let g = Arc::new(Generation {
                material,
                provider: self.provider(),
            });
            if out.insert(n, g).is_some() {
                return Err(CryptoError::DuplicateGeneration(n));
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, CryptoError> {
    m.lock().map_err(|_| CryptoError::MalformedKey)
}

fn aead_key(bytes: &Secret) -> Result<LessSafeKey, CryptoError> {
    if bytes.len() != 32 {
        return Err(CryptoError::MalformedKey);
    }
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, bytes.expose()).map_err(|_| CryptoError::MalformedKey)?,
    ))
}

/// Where the KEK's generations come from when an instance opens.
#[derive(Debug, Default)]
pub struct KekSpec {
    pub key_file: Option<PathBuf>,
    /// The text of `PHYLAX_KEK`.
    pub env: Option<Secret>,
    pub hsm: Option<HsmConfig>,
}

/// What retiring a generation left for the operator to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The generation is destroyed (file rewritten, HSM object destroyed).
    Destroyed,
    /// The generation is in `PHYLAX_KEK`, which only the operator can edit.
    RemoveFromEnvironment,
}

pub struct Kek {
    sources: Vec<Source>,
    gens: RwLock<BTreeMap<u32, Arc<Generation>>>,
    /// HMAC of generation 1 under itself when it is a software key: the
    /// check value instances created before generations existed store.
    legacy_check: Option<[u8; 32]>,
    last_reload: Mutex<Option<std::time::Instant>>,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

fn legacy_check(gens: &BTreeMap<u32, Secret>) -> Option<[u8; 32]> {
    let k = gens.get(&1)?;
    // A public fingerprint, stored in the database so that starting with
    // the wrong KEK fails clearly instead of failing every read. It is an
    // HMAC under the key itself and reveals nothing about it.
    let mac = hmac::Key::new(hmac::HMAC_SHA256, k.expose());
    let tag = hmac::sign(&mac, b"phylax/kek-check/v1");
    let mut check = [0u8; 32];
    check.copy_from_slice(tag.as_ref());
    Some(check)
}

impl Kek {
    fn from_sources(sources: Vec<Source>) -> Result<Kek, CryptoError> {
        let mut gens = BTreeMap::new();
        let mut legacy = None;
        for s in &sources {
            s.load(&mut gens)?;
            if let Some(c) = s.software()?.as_ref().and_then(legacy_check) {
                legacy = Some(c);
            }
        }
        if gens.is_empty() {
            return Err(CryptoError::NoKek);
        }
        Ok(Kek {
            sources,
            gens: RwLock::new(gens),
            legacy_check: legacy,
            last_reload: Mutex::new(None),
        })
    }

    /// Open the KEK from every provider the instance names.
    pub fn open(spec: KekSpec) -> Result<Kek, CryptoError> {
        let mut sources = Vec::new();
        if let Some(h) = &spec.hsm {
            sources.push(Source::Hsm(Arc::new(Hsm::open(h)?)));
        }
        if let Some(v) = spec.env {
            sources.push(Source::Env(v));
        }
        if let Some(p) = spec.key_file {
            // Through a symbolic link to the file itself: a rotation
            // rewrites (and destroys generations in) the real file, not the
            // link.
            sources.push(Source::File(std::fs::canonicalize(&p).unwrap_or(p)));
        }
        Kek::from_sources(sources)
    }

    /// Open an HSM and create generation `first` inside it (`init
    /// --hsm-…`, `keys move-kek`). Refuses a label that already holds a
    /// generation: it belongs to another instance (or an earlier attempt),
    /// and sharing it would let one instance's rotation destroy the other's
    /// KEK.
    pub fn hsm_create(cfg: &HsmConfig, first: u32) -> Result<Kek, CryptoError> {
        let hsm = Hsm::open(cfg)?;
        if !hsm.generations()?.is_empty() {
            return Err(CryptoError::Hsm(format!(
                "the token already holds keys labelled {}-N (another instance's, or an earlier attempt's): choose another key label",
                cfg.key_label
            )));
        }
        hsm.generate(first)?;
        Kek::from_sources(vec![Source::Hsm(Arc::new(hsm))])
    }

    /// Generate a new random in-memory KEK (tests, benchmarks). Returns
    /// its key-file text as well.
    pub fn generate() -> Result<(Kek, Secret), CryptoError> {
        let mut gens = BTreeMap::new();
        gens.insert(1, Secret::new(random_array::<32>()?.to_vec()));
        let text = Secret::new(
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                gens[&1].expose(),
            )
            .into_bytes(),
        );
        Ok((
            Kek::from_sources(vec![Source::Memory(Mutex::new(gens))])?,
            text,
        ))
    }

    /// Create a new key file with mode 0600 and a fresh KEK (generation
    /// 1). Refuses to overwrite an existing file: losing a KEK loses the data.
    pub fn create_file(path: &Path) -> Result<Kek, CryptoError> {
        let mut gens = BTreeMap::new();
        gens.insert(1, Secret::new(random_array::<32>()?.to_vec()));
        text::write_file(path, &gens, true, None)?;
        Kek::from_file(path)
    }

    /// Load a KEK from a key file, refusing files readable by group or others.
    pub fn from_file(path: &Path) -> Result<Kek, CryptoError> {
        Kek::from_sources(vec![Source::File(
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        )])
    }

    /// Where new generations go (the HSM if there is one, else the key
    /// file; `None` for `PHYLAX_KEK`), and the owner recorded there: the
    /// data directory of the one instance whose rotations may destroy
    /// generations in it.
    pub fn owner(&self) -> Result<Option<(String, Option<String>)>, CryptoError> {
        for s in &self.sources {
            if let Source::Hsm(h) = s {
                return Ok(Some((format!("HSM token {:?}", h.token), h.owner()?)));
            }
        }
        for s in &self.sources {
            if let Source::File(p) = s {
                if p.exists() {
                    return Ok(Some((p.display().to_string(), text::owner(p)?)));
                }
            }
        }
        Ok(None)
    }

    /// Record `owner` (an instance's data directory) in the HSM and the
    /// key file this KEK uses.
    pub fn claim(&self, owner: &str) -> Result<(), CryptoError> {
        for s in &self.sources {
            match s {
                Source::File(p) if p.exists() => {
                    let gens = text::read_file(p)?;
                    text::write_file(p, &gens, false, Some(owner))?;
                }
                Source::Hsm(h) => h.set_owner(owner)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Load a KEK from the text of an environment variable.
    pub fn from_env_value(value: &str) -> Result<Kek, CryptoError> {
        Kek::from_sources(vec![Source::Env(Secret::new(value.as_bytes().to_vec()))])
    }

    /// The check value of a pre-generation instance (see `legacy_check`),
    /// if generation 1 is a software key here.
    pub fn check_value(&self) -> Option<[u8; 32]> {
        self.legacy_check
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<Generation>>> {
        // A poisoned lock means a panic while swapping a map that is
        // always whole: the data is still good.
        self.gens.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Generations held, oldest first, with their providers.
    pub fn generations(&self) -> Vec<(u32, Provider)> {
        self.read().iter().map(|(n, g)| (*n, g.provider)).collect()
    }

    /// The generation new wraps use: the newest.
    pub fn current(&self) -> u32 {
        self.read().keys().next_back().copied().unwrap_or(0)
    }

    /// The generation a stored wrapped key names.
    pub fn generation_of(wrapped: &[u8]) -> Option<u32> {
        match *wrapped.first()? {
            WRAP_V1 => Some(1),
            WRAP_V2 => Some(u32::from_be_bytes(wrapped.get(1..5)?.try_into().ok()?)),
            _ => None,
        }
    }

    /// Read the providers again (another process added a generation). At
    /// most once a second unless `force`.
    pub fn reload(&self, force: bool) -> Result<(), CryptoError> {
        {
            let mut last = lock(&self.last_reload)?;
            if !force && last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let mut gens = BTreeMap::new();
        for s in &self.sources {
            s.load(&mut gens)?;
        }
        if gens.is_empty() {
            return Err(CryptoError::NoKek);
        }
        *self.gens.write().unwrap_or_else(|p| p.into_inner()) = gens;
        Ok(())
    }

    /// Add a generation numbered above both `after` (the highest ever used,
    /// from the instance's records) and every one held, in the newest
    /// provider (an HSM if one is configured, else the key file). The
    /// environment cannot be written: there the operator adds it.
    pub fn add_generation(&self, after: u32) -> Result<u32, CryptoError> {
        let n = after
            .max(self.current())
            .checked_add(1)
            .filter(|n| *n <= text::MAX_GENERATION)
            .ok_or(CryptoError::MalformedKey)?;
        let target = self
            .sources
            .iter()
            .find(|s| matches!(s, Source::Hsm(_)))
            .or_else(|| self.sources.iter().find(|s| !matches!(s, Source::Env(_))))
            .ok_or(CryptoError::EnvironmentKek)?;
        match target {
            Source::Hsm(h) => {
                h.generate(n)?;
            }
            Source::File(p) => {
                let mut gens = text::read_file(p)?;
                gens.insert(n, Secret::new(random_array::<32>()?.to_vec()));
                text::write_file(p, &gens, false, None)?;
            }
            Source::Memory(m) => {
                lock(m)?.insert(n, Secret::new(random_array::<32>()?.to_vec()));
            }
            Source::Env(_) => return Err(CryptoError::EnvironmentKek),
        }
        self.reload(true)?;
        Ok(n)
    }

    /// Destroy generation `n` wherever it is held. The caller has made sure
    /// nothing is wrapped under it any more.
    pub fn retire(&self, n: u32) -> Result<Retired, CryptoError> {
        if self.read().len() < 2 {
            return Err(CryptoError::LastGeneration);
        }
        let mut outcome = Retired::Destroyed;
        for s in &self.sources {
            match s {
                Source::Hsm(h) => {
                    if let Some(o) = h.generations()?.get(&n) {
                        h.destroy(*o)?;
                    }
                }
                Source::File(p) => {
                    let mut gens = text::read_file(p)?;
                    if gens.remove(&n).is_some() {
                        if gens.is_empty() {
                            // The last file generation is gone (the KEK
                            // moved to an HSM): so is the file.
                            std::fs::remove_file(p)
                                .map_err(|e| CryptoError::KeyFileIo(e.kind().to_string()))?;
                        } else {
                            text::write_file(p, &gens, false, None)?;
                        }
                    }
                }
                Source::Memory(m) => {
                    lock(m)?.remove(&n);
                }
                Source::Env(v) => {
                    let gens = text::parse(
                        std::str::from_utf8(v.expose()).map_err(|_| CryptoError::MalformedKey)?,
                    )?;
                    if gens.contains_key(&n) {
                        outcome = Retired::RemoveFromEnvironment;
                    }
                }
            }
        }
        // The process forgets it at once, even where the operator has yet
        // to edit the environment.
        self.gens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&n);
        Ok(outcome)
    }

    fn aad(version: u8, gen: u32, purpose: &str, scope: &str) -> Vec<u8> {
        let mut a = Vec::with_capacity(40 + purpose.len() + scope.len());
        if version == WRAP_V1 {
            a.extend_from_slice(b"phylax/wrap/v1\0");
        } else {
            a.extend_from_slice(b"phylax/wrap/v2\0");
            a.extend_from_slice(&gen.to_be_bytes());
        }
        a.extend_from_slice(purpose.as_bytes());
        a.push(0);
        a.extend_from_slice(scope.as_bytes());
        a
    }

    /// Wrap secret bytes for storage under the newest generation.
    /// `purpose` and `scope` are bound as additional data and must be given
    /// again to unwrap.
    pub fn wrap(
        &self,
        purpose: &str,
        scope: &str,
        secret: &Secret,
    ) -> Result<Vec<u8>, CryptoError> {
        let (gen, g) = {
            let gens = self.read();
            let (n, g) = gens.iter().next_back().ok_or(CryptoError::NoKek)?;
            (*n, g.clone())
        };
        let nonce = random_array::<NONCE_LEN>()?;
        let aad = Self::aad(WRAP_V2, gen, purpose, scope);
        let sealed = match &g.material {
            Material::Soft(k) => {
                let mut buf = secret.expose().to_vec();
                let r = k.seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut buf,
                );
                if r.is_err() {
                    zeroize::Zeroize::zeroize(&mut buf);
                    return Err(CryptoError::Random);
                }
                buf
            }
            Material::Hsm(h, o) => h.seal(*o, &nonce, &aad, secret.expose())?,
        };
        let mut out = Vec::with_capacity(5 + NONCE_LEN + sealed.len());
        out.push(WRAP_V2);
        out.extend_from_slice(&gen.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn generation(&self, n: u32) -> Result<Arc<Generation>, CryptoError> {
        if let Some(g) = self.read().get(&n) {
            return Ok(g.clone());
        }
        // Another process may have added it (a rotation under way).
        self.reload(false)?;
        self.read()
            .get(&n)
            .cloned()
            .ok_or(CryptoError::UnknownGeneration(n))
    }

    /// Unwrap bytes produced by [`Kek::wrap`] with the same purpose and scope.
    pub fn unwrap(
        &self,
        purpose: &str,
        scope: &str,
        wrapped: &[u8],
    ) -> Result<Secret, CryptoError> {
        let (version, gen, rest) = match wrapped.first() {
            Some(&WRAP_V1) => (WRAP_V1, 1, &wrapped[1..]),
            Some(&WRAP_V2) if wrapped.len() >= 5 => (
                WRAP_V2,
                u32::from_be_bytes([wrapped[1], wrapped[2], wrapped[3], wrapped[4]]),
                &wrapped[5..],
            ),
            _ => return Err(CryptoError::Decrypt),
        };
        if rest.len() < NONCE_LEN + TAG {
            return Err(CryptoError::Decrypt);
        }
        let g = self.generation(gen)?;
        let aad = Self::aad(version, gen, purpose, scope);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        match &g.material {
            Material::Soft(k) => {
                let mut n = [0u8; NONCE_LEN];
                n.copy_from_slice(nonce);
                let mut buf = body.to_vec();
                let out = k
                    .open_in_place(Nonce::assume_unique_for_key(n), Aad::from(aad), &mut buf)
                    .map(|p| Secret::new(p.to_vec()))
                    .map_err(|_| CryptoError::Decrypt);
                zeroize::Zeroize::zeroize(&mut buf);
                out
            }
            Material::Hsm(h, o) => h.open_sealed(*o, nonce, &aad, body),
        }
    }

    /// Unwrap and wrap again under the newest generation (rotation).
    pub fn rewrap(
        &self,
        purpose: &str,
        scope: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let secret = self.unwrap(purpose, scope, wrapped)?;
        self.wrap(purpose, scope, &secret)
    }

    /// Wrap a data key.
    pub fn wrap_data_key(&self, scope: &str, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.wrap("data-key", scope, key.secret())
    }

    /// Unwrap a data key wrapped for `scope`.
    pub fn unwrap_data_key(&self, scope: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        DataKey::from_secret(self.unwrap("data-key", scope, wrapped)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_file_roundtrip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys/kek");
        let k1 = Kek::create_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = Kek::from_file(&p).unwrap();
        assert_eq!(k1.check_value(), k2.check_value());
        assert!(matches!(
            Kek::create_file(&p),
            Err(CryptoError::KeyFileExists(_))
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::from_file(&p),
            Err(CryptoError::KeyFilePermissions(_))
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Kek::from_file(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Kek::from_file(&p).is_ok());
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(Kek::from_env_value("not base64!").is_err());
        assert!(Kek::from_env_value(&STANDARD.encode([0u8; 16])).is_err());
        assert!(Kek::from_env_value(&STANDARD.encode([7u8; 32])).is_ok());
    }

    #[test]
    fn wrap_binds_purpose_and_scope_and_detects_tampering() {
        let (kek, _) = Kek::generate().unwrap();
        let (other, _) = Kek::generate().unwrap();
        let dk = DataKey::generate().unwrap();
        let w = kek.wrap_data_key("patient:1", &dk).unwrap();
        let back = kek.unwrap_data_key("patient:1", &w).unwrap();
        assert_eq!(back.secret().expose(), dk.secret().expose());
        assert!(kek.unwrap_data_key("patient:2", &w).is_err());
        assert!(kek.unwrap("token-key", "patient:1", &w).is_err());
        assert!(other.unwrap_data_key("patient:1", &w).is_err());
        for i in 0..w.len() {
            let mut t = w.clone();
            t[i] ^= 1;
            assert!(kek.unwrap_data_key("patient:1", &t).is_err(), "byte {i}");
        }
        assert!(kek.unwrap_data_key("patient:1", &w[..w.len() - 1]).is_err());
        // Two wraps of the same key differ (fresh nonce).
        assert_ne!(w, kek.wrap_data_key("patient:1", &dk).unwrap());
        assert!(!format!("{kek:?}").contains(&format!("{:?}", dk.secret().expose())));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod generation_tests {
    use super::*;

    /// A wrap in the format written before generations existed.
    fn wrap_v1(raw: &[u8; 32], purpose: &str, scope: &str, secret: &[u8]) -> Vec<u8> {
        let k = aead_key(&Secret::new(raw.to_vec())).unwrap();
        let nonce = [9u8; NONCE_LEN];
        let mut buf = secret.to_vec();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(Kek::aad(WRAP_V1, 1, purpose, scope)),
            &mut buf,
        )
        .unwrap();
        let mut out = vec![WRAP_V1];
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    #[test]
    fn old_wraps_open_and_rotation_moves_them_to_the_new_generation() {
        use base64::Engine;
        let raw = [5u8; 32];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .unwrap();
            std::io::Write::write_all(
                &mut f,
                base64::engine::general_purpose::STANDARD
                    .encode(raw)
                    .as_bytes(),
            )
            .unwrap();
        }
        let kek = Kek::from_file(&p).unwrap();
        assert!(kek.check_value().is_some());
        let old = wrap_v1(&raw, "data-key", "patient:1", &[0x42; 32]);
        assert_eq!(Kek::generation_of(&old), Some(1));
        assert_eq!(
            kek.unwrap("data-key", "patient:1", &old).unwrap().expose(),
            &[0x42; 32]
        );
        // Rotate: add generation 2 (written to the file), re-wrap, retire 1.
        assert_eq!(kek.add_generation(1).unwrap(), 2);
        let second = Kek::from_file(&p).unwrap();
        assert_eq!(second.generations().len(), 2);
        let new = kek.rewrap("data-key", "patient:1", &old).unwrap();
        assert_eq!(Kek::generation_of(&new), Some(2));
        // A process that opened the file before the rotation finds the new
        // generation by reloading.
        assert!(second.unwrap("data-key", "patient:1", &new).is_ok());
        assert_eq!(kek.retire(1).unwrap(), Retired::Destroyed);
        assert!(kek.unwrap("data-key", "patient:1", &old).is_err());
        let after = Kek::from_file(&p).unwrap();
        assert_eq!(after.generations(), vec![(2, Provider::File)]);
        assert!(after.unwrap("data-key", "patient:1", &old).is_err());
        assert!(after.unwrap("data-key", "patient:1", &new).is_ok());
        assert!(matches!(after.retire(2), Err(CryptoError::LastGeneration)));
        // Generation numbers never go back, even past retired ones.
        assert_eq!(after.add_generation(7).unwrap(), 8);
        assert!(after.add_generation(text::MAX_GENERATION).is_err());
    }

    /// A key file reached through a symbolic link is rewritten where it
    /// really is: a retired generation is gone from the real file, not
    /// only from a replaced link.
    #[test]
    fn rotation_through_a_symlink_rewrites_the_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("vault/kek");
        Kek::create_file(&real).unwrap();
        let link = dir.path().join("kek");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let kek = Kek::from_file(&link).unwrap();
        kek.add_generation(1).unwrap();
        kek.retire(1).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let text = std::fs::read_to_string(&real).unwrap();
        assert!(
            text.starts_with("2:") && text.lines().count() == 1,
            "{text}"
        );
        // The owner line survives rewrites.
        kek.claim("/srv/a").unwrap();
        kek.add_generation(2).unwrap();
        let text = std::fs::read_to_string(&real).unwrap();
        assert!(text.starts_with("# owner: /srv/a\n"), "{text}");
        assert_eq!(kek.owner().unwrap().unwrap().1.as_deref(), Some("/srv/a"));
        assert_eq!(Kek::from_file(&link).unwrap().generations().len(), 2);
    }

    #[test]
    fn the_generation_is_authenticated() {
        let (kek, _) = Kek::generate().unwrap();
        kek.add_generation(0).unwrap();
        let w = kek.wrap("token", "", &Secret::new(vec![1; 32])).unwrap();
        assert_eq!(Kek::generation_of(&w), Some(2));
        // Claiming another generation (or the old format) fails, even
        // though generation 1 exists.
        let mut moved = w.clone();
        moved[4] = 1;
        assert!(kek.unwrap("token", "", &moved).is_err());
        let mut v1 = vec![WRAP_V1];
        v1.extend_from_slice(&w[5..]);
        assert!(kek.unwrap("token", "", &v1).is_err());
        // Environment KEKs are fixed: the operator adds generations.
        let env = Kek::from_env_value(&format!(
            "1:{},2:{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32]),
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [2u8; 32])
        ))
        .unwrap();
        assert_eq!(env.current(), 2);
        assert!(matches!(
            env.add_generation(2),
            Err(CryptoError::EnvironmentKek)
        ));
        assert_eq!(env.retire(1).unwrap(), Retired::RemoveFromEnvironment);
        assert_eq!(env.generations(), vec![(2, Provider::Env)]);
    }
}
