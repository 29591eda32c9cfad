//! Key administration (`phylax keys …`, `phylax patient …`), for the
//! operator's CLI only (no HTTP route reaches it): what each
//! key protects and how old it is, KEK rotation (and moving the KEK into
//! an HSM, which is a rotation into a new provider), crypto-shredding a
//! patient's data, legal holds. docs/KEYS.md explains the hierarchy and
//! the procedures.
//!
//! Other nodes learn of key events (a KEK generation added or retired, a
//! patient erased) from append-only `keys_event_v1:N` records, which every
//! server polls each second (`data::key_events`): they reload the KEK's
//! providers and, after an erasure, forget their unwrapped data keys.
//!
//! # Layout
//! - this file: [`KeyAdmin`], key status, KEK rotation;
//! - [`erase`]: crypto-shredding a patient, legal holds;
//! - [`data`]: data-key rotation (every resource version re-encrypted);
//! - [`index`]: search index key rotation (the index rebuilt under it);
//! - [`rotate`]: the keys that rotate by generation alone: access tokens,
//!   paging cursors, the audit checkpoint key;
//! - [`sign_in`]: the sign-in key (usernames re-hashed; generations kept
//!   while grants, recovery codes or enrollment links depend on them);
//! - [`escrow`]: the KEK encrypted with age to its custodians.

pub mod data;
pub mod erase;
pub mod escrow;
pub mod index;
pub mod rotate;
pub mod sign_in;

use crate::audit::log::AuditLog;
use crate::instance::{CANARY_PURPOSE, CANARY_ROW};
use phylax_audit::event::Action;
use phylax_crypto::kek::{Kek, Retired};
use phylax_store::{DynStore, StoreError, WRAP_HEAD};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] phylax_crypto::CryptoError),
    #[error("not recorded in the audit log, so not done: {0}")]
    Audit(String),
    #[error("{count} stored {kind} key(s) could not be unwrapped; nothing was retired (docs/KEYS.md, \"Recovery\")")]
    Unreadable { kind: String, count: u64 },
    #[error("a stored key of an unknown kind ({0}); nothing was retired")]
    UnknownKind(String),
    #[error("keys under retired generations remain after re-wrapping; nothing was retired")]
    NotConverged,
    #[error("escrow: {0}")]
    Escrow(String),
    #[error("patient id: {0}")]
    BadId(String),
    #[error(
        "the patient is under legal hold: release the hold first (`phylax patient hold --release`)"
    )]
    LegalHold,
    #[error("no data is sealed under this patient's key")]
    NothingToErase,
    #[error("the patient has records from the last {years} years (the retention period, [keys] retention_years): pass --override-retention once the legal basis is checked")]
    WithinRetention { years: u32 },
    #[error("the KEK is already in an HSM ([hsm] in phylax.toml): rotate it with `phylax keys rotate --kek`")]
    AlreadyInHsm,
    #[error("the HSM's KEK generation is not newer than the key file's")]
    HsmNotNewer,
    #[error("configuration: {0}")]
    Config(String),
    #[error("the patient's data is deleted, but the KEK rotation that makes older copies unreadable failed ({0}); fix that and run the same `phylax patient erase` again to finish")]
    ErasurePending(Box<KeysError>),
    #[error("the KEK in {file} belongs to the instance in {owner}, not this one: a copy of an instance must get its own KEK before it changes it, or its rotations destroy the original's (docs/KEYS.md, \"Copies of an instance\")")]
    NotOwner { file: String, owner: String },
    #[error("a reason is required, without control characters (it goes into the audit log; do not put PHI in it)")]
    NoReason,
    #[error(transparent)]
    Instance(#[from] Box<crate::instance::InstanceError>),
    #[error("rebuilding the search index: {0}")]
    Index(String),
    #[error("the audit checkpoint keys: {0}")]
    Checkpoint(String),
    #[error("re-encrypting resource versions: {0}")]
    DataKeys(String),
    #[error("the sign-in key: {0}")]
    SignIn(String),
}

/// What every stored key kind protects, by row prefix.
fn protects(row: &str) -> Option<(&'static str, &'static str)> {
    let kind = row.split(':').next().unwrap_or("");
    if row == "mac:token" || row.starts_with("mac:token@") {
        return Some(("tokens", "access tokens (HMAC-SHA-256)"));
    }
    Some(match (kind, row) {
        (_, r) if r == "mac:cursor" || r.starts_with("mac:cursor@") => {
            ("cursors", "_history paging cursors (HMAC-SHA-256)")
        }
        (_, r) if r == "data:cursor" || r.starts_with("data:cursor@") => {
            ("cursors", "search paging cursors (sealed: they carry the search terms)")
        }
        (_, r) if r == "mac:auth" || r.starts_with("mac:auth@") => (
            "sign-in",
            "hashes of grants, recovery codes, enrollment links, usernames and CSRF tokens",
        ),
        (_, "mac:blind-index") => (
            "index",
            "the blind search index (and, on instances made before mac:audit-patient, the audit patient index)",
        ),
        (_, r) if r.starts_with("mac:blind-index@") => ("index", "the blind search index"),
        (_, crate::instance::AUDIT_PATIENT_KEY) => (
            "audit-index",
            "the audit log's patient index (which records name a patient)",
        ),
        ("sig", _) => ("signing", "id_token signatures (ES256)"),
        (_, r) if r.starts_with("log:retired-checkpoint-") => (
            "checkpoint",
            "the public half of a retired checkpoint key (verifies older checkpoints)",
        ),
        ("log", _) => ("checkpoint", "audit-log checkpoint signatures (Ed25519)"),
        ("data", _) => (
            "data-keys",
            "resource bodies (one key per patient compartment), audit records, accounts",
        ),
        (_, CANARY_ROW) => ("kek-check", "nothing (proves the KEK at start)"),
        _ => return None,
    })
}

/// The purpose and scope a stored row was wrapped with.
fn purpose_of(row: &str) -> Option<(&str, &str)> {
    let (kind, rest) = row.split_once(':')?;
    Some(match kind {
        "data" => ("data-key", rest),
        "mac" => (rest, ""),
        "sig" => ("signing", rest),
        "log" => ("audit-checkpoint", rest),
        "kek" if row == CANARY_ROW => (CANARY_PURPOSE, ""),
        _ => return None,
    })
}

use crate::data::key_events::{next_event, EVENT};
const KEK_GEN: &str = "kek_generation:";
/// Keys re-wrapped per database round trip.
const PAGE: u32 = 5000;

/// The parts key administration works on.
#[derive(Debug, Clone, Copy)]
pub struct KeyAdmin<'a> {
    pub store: &'a DynStore,
    pub kek: &'a Kek,
    pub audit: &'a AuditLog,
    /// The instance's data directory: only the instance a key file names
    /// as its owner changes its KEK.
    pub data_dir: &'a std::path::Path,
    /// Time for every node to notice a key event (they poll each second).
    pub grace: Duration,
    /// The key ring (resources are opened to rebuild the search index).
    pub keys: &'a std::sync::Arc<crate::data::keyring::KeyRing>,
    pub config: &'a crate::base::config::Config,
    /// At most this many resource versions re-encrypted per second by a
    /// data-key rotation (`--max-rate`; by default
    /// [`data::default_max_rate`]); `None`: only the rest after each page
    /// limits it.
    pub max_rate: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub kek: Vec<KekGeneration>,
    pub keys: Vec<KeyInfo>,
    pub max_age_days: u32,
    /// Patients whose erasure still owes a KEK rotation (older copies can
    /// still be read): run `patient erase` for them again, or rotate.
    pub pending_erasures: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KekGeneration {
    pub generation: u32,
    pub provider: &'static str,
    pub current: bool,
    /// When it was added (seconds), if recorded.
    pub added: Option<i64>,
    pub age_days: Option<i64>,
    /// Stored keys wrapped under it.
    pub wraps: u64,
    pub rotation_due: Option<i64>,
    pub overdue: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// The `keys rotate` flag that rotates it.
    pub kind: &'static str,
    /// The stored row (`mac:token`, `sig:sig-2`…), or `data:*` for all
    /// data keys together.
    pub id: String,
    pub protects: &'static str,
    pub count: u64,
    /// The oldest key's creation (seconds).
    pub created: i64,
    pub age_days: i64,
    pub rotation_due: i64,
    pub overdue: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct KekRotated {
    pub from: Vec<u32>,
    pub to: u32,
    pub provider: &'static str,
    pub rewrapped: u64,
    /// Generations destroyed; `remove_from_environment` lists those the
    /// operator still has to delete from `PHYLAX_KEK`.
    pub retired: Vec<u32>,
    pub remove_from_environment: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Erasure {
    pub patient: String,
    pub versions: u64,
    pub resources: u64,
    pub retention_overridden: bool,
    /// The search index key rotation that leaves older copies' index
    /// entries keyed with a key that no longer exists.
    pub index_rotation: Option<index::IndexRotated>,
    /// The KEK rotation that makes copies from before the erasure
    /// unreadable; `None` when it could not run here (the KEK is in
    /// `PHYLAX_KEK`: the operator rotates, docs/KEYS.md).
    pub kek_rotation: Option<KekRotated>,
    pub pending: Option<String>,
}

/// The operating-system user running the command, for audit records
/// (who escrowed the KEK, who took a backup, who worked an incident).
pub fn os_uid() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn now() -> i64 {
    crate::base::clock::now_secs()
}

fn days(secs: i64) -> i64 {
    secs / 86_400
}

impl<'a> KeyAdmin<'a> {
    /// Key administration over an instance (the CLI), waiting `grace` for
    /// other nodes to follow each step.
    pub fn of(inst: &'a crate::instance::Instance, grace: Duration) -> KeyAdmin<'a> {
        KeyAdmin {
            store: &inst.store,
            kek: inst.keys.kek(),
            audit: &inst.audit,
            data_dir: &inst.data_dir,
            grace,
            keys: &inst.keys,
            config: &inst.config,
            max_rate: data::default_max_rate(inst.store.backend()),
        }
    }

    /// The same, re-encrypting at most `rate` versions per second
    /// (`Some(0)`: no limit but the rest after each page; `None`: the
    /// backend's default, [`data::default_max_rate`]).
    pub fn with_max_rate(self, rate: Option<u32>) -> KeyAdmin<'a> {
        match rate {
            None => self,
            Some(r) => KeyAdmin {
                max_rate: (r > 0).then_some(r),
                ..self
            },
        }
    }
}

impl KeyAdmin<'_> {
    pub(crate) async fn audit(
        &self,
        what: &'static str,
        action: Action,
        detail: String,
    ) -> Result<(), KeysError> {
        self.audit
            .record_admin(what, action, detail)
            .await
            .map_err(|e| KeysError::Audit(e.to_string()))
    }

    /// Record a key event for the other nodes.
    pub(crate) async fn event(&self, kind: &str) -> Result<(), KeysError> {
        let mut n = next_event(self.store).await?;
        let body = format!("{kind} {}", now());
        // Another process may take the number first: take the next.
        loop {
            let key = format!("{EVENT}{n}");
            if self.store.put_meta_if_absent(&key, body.as_bytes()).await? == body.as_bytes() {
                return Ok(());
            }
            n = match n.checked_add(1) {
                Some(n) => n,
                None => next_event(self.store).await?,
            };
        }
    }

    /// Every stored key, its kind, age and rotation due date; every KEK
    /// generation with its provider and how many keys it wraps.
    pub async fn status(&self, max_age_days: u32) -> Result<KeyStatus, KeysError> {
        let max_age = i64::from(max_age_days) * 86_400;
        let t = now();
        let stats = self.store.wrapped_key_stats().await?;
        let mut wraps: BTreeMap<u32, u64> = BTreeMap::new();
        let mut oldest_any = i64::MAX;
        for g in &stats {
            if let Some(n) = Kek::generation_of(&pad(&g.head)) {
                *wraps.entry(n).or_default() += g.count;
            }
            oldest_any = oldest_any.min(g.oldest);
        }
        let current = self.kek.current();
        let mut kek = Vec::new();
        for (n, p) in self.kek.generations() {
            let added = match self.store.get_meta(&format!("{KEK_GEN}{n}")).await? {
                Some(v) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
                // Generation 1 of an instance from before generations were
                // recorded is as old as its first key.
                None if n == 1 && oldest_any != i64::MAX => Some(oldest_any),
                None => None,
            };
            kek.push(KekGeneration {
                generation: n,
                provider: p.as_str(),
                current: n == current,
                added,
                age_days: added.map(|a| days(t - a)),
                wraps: wraps.get(&n).copied().unwrap_or(0),
                rotation_due: added.map(|a| a + max_age),
                overdue: n == current && added.is_some_and(|a| t - a > max_age),
            });
        }
        let mut keys = Vec::new();
        let data: Vec<_> = stats.iter().filter(|g| g.kind == "data").collect();
        if !data.is_empty() {
            // After a data-key rotation the resource keys are as old as
            // their generation (the audit, account and grant keys, which
            // do not rotate that way, would keep the oldest date forever).
            let generation = crate::data::key_events::data_generation(self.store).await?;
            let rotated = match generation {
                1 => None,
                g => self
                    .store
                    .get_meta(&format!("{}{g}", crate::data::key_events::DATA_KEYS))
                    .await?
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok()),
            };
            let created =
                rotated.unwrap_or_else(|| data.iter().map(|g| g.oldest).min().unwrap_or(t));
            keys.push(info(
                "data-keys",
                "data:*".into(),
                data.iter().map(|g| g.count).sum(),
                created,
                t,
                max_age,
            ));
        }
        // The few other keys, one by one.
        for r in self.store.wrapped_keys_except("data").await? {
            if let Some((kind, _)) = protects(&r.scope) {
                if kind != "kek-check" {
                    let mut k = info(kind, r.scope.clone(), 1, r.created_at, t, max_age);
                    // A retired checkpoint key's public half only verifies.
                    if r.scope.starts_with("log:retired-checkpoint-") {
                        k.overdue = false;
                    }
                    keys.push(k);
                }
            }
        }
        Ok(KeyStatus {
            kek,
            keys,
            max_age_days,
            pending_erasures: erase::pending_erasures(self.store, self.kek).await?,
        })
    }

    /// The highest KEK generation ever recorded (retired ones count:
    /// numbers are never reused). Generation 1 of an instance from before
    /// generations were recorded has no record.
    async fn highest_generation(&self) -> Result<u32, KeysError> {
        let mut n = 1;
        while self
            .store
            .get_meta(&format!("{KEK_GEN}{}", n + 1))
            .await?
            .is_some()
        {
            n += 1;
        }
        Ok(n)
    }

    /// Rotate the KEK: add a generation (in the HSM if one is configured,
    /// else in the key file), re-wrap every stored key under it while the
    /// servers keep serving, then retire every older generation.
    /// `progress(done, total)` is called as keys are re-wrapped.
    pub async fn rotate_kek(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<KekRotated, KeysError> {
        self.check_owner()?;
        let from: Vec<u32> = self.kek.generations().iter().map(|(n, _)| *n).collect();
        let after = self.highest_generation().await?;
        self.audit(
            "key-rotate",
            Action::Update,
            format!("KEK rotation started (generations {from:?} in use)"),
        )
        .await?;
        let to = if self.kek.current() > after && from.len() > 1 {
            // The operator added it to PHYLAX_KEK already.
            self.kek.current()
        } else {
            self.kek.add_generation(after)?
        };
        self.adopt(to, from, progress).await
    }

    /// Refuse to change a key file another instance owns (a copy of this
    /// one, restored elsewhere, pointing at the original's key file); claim
    /// one that names no owner yet (from before owners were recorded).
    pub fn check_owner(&self) -> Result<(), KeysError> {
        let me = owner_name(self.data_dir);
        match self.kek.owner()? {
            Some((file, Some(owner))) if owner != me => Err(KeysError::NotOwner { file, owner }),
            Some((_, None)) => Ok(self.kek.claim(&me)?),
            _ => Ok(()),
        }
    }

    /// Make generation `to` (already held) the one everything is wrapped
    /// under, then retire the others.
    async fn adopt(
        &self,
        to: u32,
        from: Vec<u32>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<KekRotated, KeysError> {
        self.store
            .put_meta_if_absent(&format!("{KEK_GEN}{to}"), now().to_string().as_bytes())
            .await?;
        self.event("kek-added").await?;
        // Every node reloads the providers within a second; wait for them
        // before re-wrapping, so none keeps wrapping new keys under an old
        // generation.
        tokio::time::sleep(self.grace).await;
        self.finish_rotation(to, from, progress).await
    }

    /// Re-wrap everything under `to`, check, retire the rest.
    pub(crate) async fn finish_rotation(
        &self,
        to: u32,
        from: Vec<u32>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<KekRotated, KeysError> {
        let total: u64 = self
            .store
            .wrapped_key_stats()
            .await?
            .iter()
            .map(|g| g.count)
            .sum();
        let mut rewrapped = 0;
        // Re-wrap everything, then make sure twice, a grace period apart,
        // that nothing is left under another generation: the second look
        // finds a key a lagging node wrapped under an old generation while
        // the pass ran (counted from the stored headers, one query).
        let mut clean = 0;
        for _ in 0..10 {
            self.rewrap_pass(to, total, &mut rewrapped, progress)
                .await?;
            clean = 0;
            while self.count_not_under(to).await? == 0 {
                clean += 1;
                if clean == 2 {
                    break;
                }
                tokio::time::sleep(self.grace.min(Duration::from_millis(500))).await;
            }
            if clean == 2 {
                break;
            }
        }
        if clean < 2 {
            return Err(KeysError::NotConverged);
        }
        let mut retired = Vec::new();
        let mut env = Vec::new();
        for (n, _) in self.kek.generations() {
            if n < to {
                match self.kek.retire(n)? {
                    Retired::Destroyed => retired.push(n),
                    Retired::RemoveFromEnvironment => env.push(n),
                }
            }
        }
        self.event("kek-retired").await?;
        let provider = self
            .kek
            .generations()
            .iter()
            .find(|(n, _)| *n == to)
            .map(|(_, p)| p.as_str())
            .unwrap_or("unknown");
        self.audit(
            "key-rotate",
            Action::Update,
            format!(
                "KEK generation {to} ({provider}) in force; {rewrapped} keys re-wrapped; generations {retired:?} destroyed{}",
                if env.is_empty() { String::new() } else { format!(", {env:?} to be removed from PHYLAX_KEK") }
            ),
        )
        .await?;
        Ok(KekRotated {
            from,
            to,
            provider,
            rewrapped,
            retired,
            remove_from_environment: env,
        })
    }

    /// Stored keys wrapped under a generation other than `to`.
    async fn count_not_under(&self, to: u32) -> Result<u64, KeysError> {
        Ok(self
            .store
            .wrapped_key_stats()
            .await?
            .iter()
            .filter(|g| Kek::generation_of(&pad(&g.head)) != Some(to))
            .map(|g| g.count)
            .sum())
    }

    /// One pass over every stored key: re-wrap those not under `to`.
    /// Returns how many changed and how many could not be swapped (changed
    /// meanwhile: the next pass looks again).
    async fn rewrap_pass(
        &self,
        to: u32,
        total: u64,
        rewrapped: &mut u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(u64, u64), KeysError> {
        let (mut changed, mut left, mut seen) = (0u64, 0u64, 0u64);
        let mut unreadable: BTreeMap<String, u64> = BTreeMap::new();
        let (mut page, mut at) = self.store.wrapped_keys_page(None, PAGE).await?;
        // A two-stage pipeline: the database writes one page while this
        // process re-wraps the next (and reads the one after).
        let mut writing: Option<(u64, tokio::task::JoinHandle<Result<u64, StoreError>>)> = None;
        while !page.is_empty() {
            seen += page.len() as u64;
            let batch = self.rewrap_page(to, page, &mut unreadable)?;
            let store = self.store.clone();
            let from = at.take();
            let next = async move {
                match from {
                    Some(f) => store.wrapped_keys_page(Some(&f), PAGE).await,
                    None => Ok((Vec::new(), None)),
                }
            };
            if let Some((n, w)) = writing.take() {
                let swapped = w.await.map_err(|e| KeysError::Config(e.to_string()))??;
                changed += swapped;
                left += n - swapped;
                *rewrapped += swapped;
            }
            let store = self.store.clone();
            let n = batch.len() as u64;
            writing = Some((
                n,
                tokio::spawn(async move { store.replace_wrapped_keys(batch).await }),
            ));
            (page, at) = next.await?;
            progress(seen.min(total), total);
        }
        if let Some((n, w)) = writing {
            let swapped = w.await.map_err(|e| KeysError::Config(e.to_string()))??;
            changed += swapped;
            left += n - swapped;
            *rewrapped += swapped;
        }
        if let Some((kind, count)) = unreadable.into_iter().next() {
            return Err(KeysError::Unreadable { kind, count });
        }
        Ok((changed, left))
    }

    /// Re-wrap a page's keys that are not under `to`, on every core
    /// (unwrap and wrap are a fifth of a rotation's time otherwise).
    #[allow(clippy::type_complexity)]
    fn rewrap_page(
        &self,
        to: u32,
        page: Vec<phylax_store::WrappedKeyRow>,
        unreadable: &mut BTreeMap<String, u64>,
    ) -> Result<Vec<(String, Vec<u8>, Vec<u8>)>, KeysError> {
        let todo: Vec<_> = page
            .into_iter()
            .filter(|r| Kek::generation_of(&r.wrapped) != Some(to))
            .collect();
        if let Some(r) = todo.iter().find(|r| purpose_of(&r.scope).is_none()) {
            return Err(KeysError::UnknownKind(kind_of(&r.scope)));
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = todo.len().div_ceil(threads).max(1);
        let kek = self.kek;
        let results: Vec<Vec<Result<Vec<u8>, ()>>> = tokio::task::block_in_place(|| {
            std::thread::scope(|sc| {
                let handles: Vec<_> = todo
                    .chunks(chunk)
                    .map(|part| {
                        sc.spawn(move || {
                            part.iter()
                                .map(|r| {
                                    let (purpose, scope) = purpose_of(&r.scope).ok_or(())?;
                                    kek.rewrap(purpose, scope, &r.wrapped).map_err(|_| ())
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        });
        let mut batch = Vec::with_capacity(todo.len());
        for (r, w) in todo.into_iter().zip(results.into_iter().flatten()) {
            match w {
                Ok(w) => batch.push((r.scope, r.wrapped, w)),
                Err(()) => *unreadable.entry(kind_of(&r.scope)).or_default() += 1,
            }
        }
        Ok(batch)
    }
}

fn kind_of(scope: &str) -> String {
    scope.split(':').next().unwrap_or("").to_owned()
}

/// Move an instance's KEK from its key file (or `PHYLAX_KEK`) into an
/// HSM: create a generation in the HSM, name the HSM in phylax.toml beside
/// the key file, re-wrap every key under the HSM generation, destroy the
/// file's generations (the key file is removed) and drop `key_file` from
/// phylax.toml. Every step leaves an instance that opens: a crash is
/// finished by running the command again. Servers must be stopped
/// (they read phylax.toml at start).
pub async fn move_kek_to_hsm(
    inst: &crate::instance::Instance,
    hsm: crate::base::config::HsmSettings,
    grace: Duration,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<KekRotated, KeysError> {
    use phylax_crypto::kek::KekSpec;
    let mut config = inst.config.clone();
    let admin = KeyAdmin::of(inst, grace);
    admin.check_owner()?;
    let hsm = match &config.hsm {
        Some(_) if config.key_file.is_none() => return Err(KeysError::AlreadyInHsm),
        // An earlier move stopped half-way: finish it with the HSM it
        // chose (its generation may already wrap keys), whatever is given now.
        Some(started) => started.clone(),
        None => {
            let cfg =
                crate::instance::hsm_config(&hsm).map_err(|e| KeysError::Config(e.to_string()))?;
            let after = admin
                .highest_generation()
                .await?
                .max(inst.keys.kek().current());
            drop(Kek::hsm_create(&cfg, after + 1)?);
            hsm
        }
    };
    let cfg = crate::instance::hsm_config(&hsm).map_err(|e| KeysError::Config(e.to_string()))?;
    let env = std::env::var("PHYLAX_KEK")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| phylax_crypto::Secret::new(v.into_bytes()));
    let combined = Kek::open(KekSpec {
        key_file: if env.is_some() {
            None
        } else {
            config.key_file.clone()
        },
        env,
        hsm: Some(cfg),
    })?;
    if !matches!(
        combined.generations().last(),
        Some((_, phylax_crypto::kek::Provider::Hsm))
    ) {
        return Err(KeysError::HsmNotNewer);
    }
    match combined.owner()? {
        Some((file, Some(owner))) if owner != owner_name(&inst.data_dir) => {
            return Err(KeysError::NotOwner { file, owner })
        }
        _ => combined.claim(&owner_name(&inst.data_dir))?,
    }
    config.hsm = Some(hsm);
    config
        .save(&inst.data_dir)
        .map_err(|e| KeysError::Config(e.to_string()))?;
    let from = inst
        .keys
        .kek()
        .generations()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    admin
        .audit(
            "key-rotate",
            Action::Update,
            "KEK move into the HSM started".into(),
        )
        .await?;
    let moved = KeyAdmin {
        kek: &combined,
        ..admin
    }
    .adopt(combined.current(), from, progress)
    .await?;
    config.key_file = None;
    config
        .save(&inst.data_dir)
        .map_err(|e| KeysError::Config(e.to_string()))?;
    Ok(moved)
}

/// How a data directory is named as a key file's owner: its canonical
/// path, so that `./data` and `/srv/data` are the same instance.
pub fn owner_name(data_dir: &std::path::Path) -> String {
    std::fs::canonicalize(data_dir)
        .unwrap_or_else(|_| data_dir.to_path_buf())
        .display()
        .to_string()
}

/// A stats group's head, padded so [`Kek::generation_of`] can read it.
fn pad(head: &[u8]) -> Vec<u8> {
    let mut h = head.to_vec();
    h.resize(WRAP_HEAD, 0);
    h
}

fn info(kind: &'static str, id: String, count: u64, created: i64, t: i64, max_age: i64) -> KeyInfo {
    let protects = protects(&id).map(|(_, p)| p).unwrap_or("");
    KeyInfo {
        kind,
        id,
        protects,
        count,
        created,
        age_days: days(t - created),
        rotation_due: created + max_age,
        overdue: t - created > max_age,
    }
}
