//! Crypto-shredding a patient's data (GDPR Art. 17) and the legal holds
//! that block it (docs/KEYS.md, "Erasing a patient"), and [`Eraser`], the
//! service behind the API's `Patient/{id}/$erase`.

use super::{now, Erasure, KeyAdmin, KeysError};
use phylax_audit::event::Action;
use phylax_store::{DynStore, Erased, StoreError};
use serde::Serialize;

const HOLD: &str = "legal_hold_v1:";
const ERASURE: &str = "erasure_v1:";

/// An erasure as recorded before it deletes anything: done once no KEK
/// generation up to `below` is held any more.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct PendingErasure {
    patient: String,
    below: u32,
}

/// Patients whose erasure still owes a KEK rotation: older copies of the
/// database can still unwrap their keys.
pub async fn pending_erasures(
    store: &DynStore,
    kek: &phylax_crypto::Kek,
) -> Result<Vec<String>, StoreError> {
    let oldest = kek.generations().first().map(|(n, _)| *n).unwrap_or(0);
    let mut out: Vec<String> = store
        .meta_with_prefix(ERASURE)
        .await?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<PendingErasure>(&v).ok())
        .filter(|e| oldest <= e.below)
        .map(|e| e.patient)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// A legal hold, as recorded.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct HoldEvent {
    pub patient: String,
    pub hold: bool,
    pub at: i64,
}

/// Every hold and release, in order. The list is read whole: a record
/// missing from the middle (deleted, or never written) or one that cannot
/// be read holds every patient (`*`) until an operator looks (fail closed).
pub async fn hold_events(store: &DynStore) -> Result<Vec<HoldEvent>, StoreError> {
    let mut numbered: Vec<(u64, Option<HoldEvent>)> = store
        .meta_with_prefix(HOLD)
        .await?
        .into_iter()
        .map(|(k, v)| {
            (
                k[HOLD.len()..].parse::<u64>().unwrap_or(0),
                serde_json::from_slice(&v).ok(),
            )
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let damaged = HoldEvent {
        patient: "*".into(),
        hold: true,
        at: 0,
    };
    let gap = numbered
        .iter()
        .enumerate()
        .any(|(i, (n, _))| *n != i as u64 + 1);
    let mut out: Vec<HoldEvent> = numbered
        .into_iter()
        .map(|(_, e)| e.unwrap_or_else(|| damaged.clone()))
        .collect();
    if gap {
        // Last, so that no release recorded after the gap lifts it.
        out.push(damaged);
    }
    Ok(out)
}

/// The patients under legal hold now (`*`: a damaged record, which holds
/// every patient).
pub async fn legal_holds(store: &DynStore) -> Result<Vec<String>, StoreError> {
    let mut held = std::collections::BTreeSet::new();
    for e in hold_events(store).await? {
        if e.hold {
            held.insert(e.patient);
        } else {
            held.remove(&e.patient);
        }
    }
    Ok(held.into_iter().collect())
}

/// An erasure whose data is deleted, with its rotations still to run.
#[derive(Debug, Clone, Serialize)]
pub struct ErasureStarted {
    pub patient: String,
    /// What the deletion removed (zero when resuming a pending erasure).
    #[serde(skip)]
    pub erased: Erased,
    pub retention_overridden: bool,
}

/// A reason is required, and printable: it goes into the audit log, which
/// operators read in terminals.
fn check_reason(reason: &str) -> Result<(), KeysError> {
    if reason.trim().is_empty() || reason.chars().any(char::is_control) {
        return Err(KeysError::NoReason);
    }
    Ok(())
}

fn parse_id(id: &str) -> Result<String, KeysError> {
    phylax_fhir::ResourceId::parse(id)
        .map(|i| i.as_str().to_owned())
        .ok_or_else(|| KeysError::BadId("1–64 of A–Z a–z 0–9 - .".into()))
}

impl KeyAdmin<'_> {
    /// Place or release a legal hold on a patient's data (an erasure is
    /// refused while it holds). Audited first.
    pub async fn set_legal_hold(
        &self,
        id: &str,
        hold: bool,
        reason: &str,
    ) -> Result<(), KeysError> {
        let id = parse_id(id)?;
        check_reason(reason)?;
        self.audit
            .record_admin_for(
                "legal-hold",
                Action::Update,
                format!(
                    "legal hold {}: {}",
                    if hold { "placed" } else { "released" },
                    reason.trim()
                ),
                vec![id.clone()],
            )
            .await
            .map_err(|e| KeysError::Audit(e.to_string()))?;
        let body = serde_json::to_vec(&HoldEvent {
            patient: id,
            hold,
            at: now(),
        })
        .map_err(|e| KeysError::Audit(e.to_string()))?;
        let mut n = hold_events(self.store).await?.len() + 1;
        loop {
            if self
                .store
                .put_meta_if_absent(&format!("{HOLD}{n}"), &body)
                .await?
                == body
            {
                return Ok(());
            }
            n += 1;
        }
    }

    /// Crypto-shredding (GDPR Art. 17): destroy the patient compartment's
    /// data key and every version sealed under it, let every node forget
    /// it, then rotate the KEK so that copies from before (old backups, a
    /// copy of the database file) can no longer unwrap it. Refused under
    /// a legal hold, and inside the retention period unless overridden.
    /// An erasure whose rotation did not finish is finished by running it
    /// again.
    pub async fn erase_patient(
        &self,
        id: &str,
        reason: &str,
        retention_years: u32,
        override_retention: bool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Erasure, KeysError> {
        let s = self
            .start_erasure(id, reason, retention_years, override_retention)
            .await?;
        self.finish_erasure(s.patient, s.erased, s.retention_overridden, progress)
            .await
    }

    /// The first part of an erasure: checks, the audit record, the
    /// pending-erasure record, the deletion (twice, a grace apart). What
    /// is left ([`KeyAdmin::finish_erasure`]) makes older copies
    /// unreadable; until it has run the erasure is pending. An erasure
    /// already pending is resumed (nothing left to delete).
    pub async fn start_erasure(
        &self,
        id: &str,
        reason: &str,
        retention_years: u32,
        override_retention: bool,
    ) -> Result<ErasureStarted, KeysError> {
        let id = parse_id(id)?;
        check_reason(reason)?;
        // Before anything is deleted: the rotation at the end must be able
        // to run.
        self.check_owner()?;
        let held = legal_holds(self.store).await?;
        if held.iter().any(|h| h == &id || h == "*") {
            return Err(KeysError::LegalHold);
        }
        let scope = format!("patient:{id}");
        let row = format!("data:{scope}");
        let (versions, newest) = self.store.key_scope_summary(&scope).await?;
        if versions == 0 && !self.has_key_rows(&scope).await? {
            if pending_erasures(self.store, self.kek).await?.contains(&id) {
                // Deleted before; the rotation that seals older copies is
                // still owed.
                return Ok(ErasureStarted {
                    patient: id,
                    erased: Erased::default(),
                    retention_overridden: false,
                });
            }
            return Err(KeysError::NothingToErase);
        }
        let retention_ms = i64::from(retention_years) * 365 * 86_400_000;
        let within = newest.is_some_and(|n| crate::base::clock::now_ms() - n < retention_ms);
        if within && !override_retention {
            return Err(KeysError::WithinRetention {
                years: retention_years,
            });
        }
        self.audit
            .record_admin_for(
                "patient-erase",
                Action::Delete,
                format!(
                    "erasure started: {versions} versions; retention period {retention_years} years, override: {within}; reason: {}",
                    reason.trim()
                ),
                vec![id.clone()],
            )
            .await
            .map_err(|e| KeysError::Audit(e.to_string()))?;
        // Recorded before anything is deleted: until a KEK rotation retires
        // every generation held now, the erasure is pending (`keys status`,
        // and running `patient erase` again finishes it).
        self.register_erasure(&id).await?;
        let mut erased = self.store.erase_key_scope(&scope, &row).await?;
        erased.key_rows += self.delete_later_key_rows(&scope).await?;
        self.event("erase").await?;
        // A node that still had the key may have sealed a write with it
        // until it saw the event: erase again once every node has.
        tokio::time::sleep(self.grace).await;
        let mut again: Erased = self.store.erase_key_scope(&scope, &row).await?;
        // The keys of the scope's later data-key generations too.
        again.key_rows += self.delete_later_key_rows(&scope).await?;
        erased.versions += again.versions;
        erased.resources += again.resources;
        Ok(ErasureStarted {
            patient: id,
            erased,
            retention_overridden: within,
        })
    }

    /// Erase, in a restored copy, a patient the register names (the live
    /// instance's, or the backup's own): the compartment's keys and every
    /// version sealed under them are deleted, and the register and the
    /// audit log of the copy say so. No rotation: the copy's older KEK
    /// generations are the live instance's concern.
    pub async fn reapply_erasure(&self, id: &str, why: &str) -> Result<Erased, KeysError> {
        let id = parse_id(id)?;
        let scope = format!("patient:{id}");
        let row = format!("data:{scope}");
        let mut erased = self.store.erase_key_scope(&scope, &row).await?;
        erased.key_rows += self.delete_later_key_rows(&scope).await?;
        if erased.versions == 0 && erased.key_rows == 0 && erased.resources == 0 {
            // Nothing of the patient in the copy (erased before the backup).
            return Ok(erased);
        }
        self.register_erasure(&id).await?;
        self.audit
            .record_admin_for(
                "patient-erase",
                Action::Delete,
                format!(
                    "erasure re-applied to a restored copy ({why}): {} versions, {} keys",
                    erased.versions, erased.key_rows
                ),
                vec![id],
            )
            .await
            .map_err(|e| KeysError::Audit(e.to_string()))?;
        Ok(erased)
    }

    /// Put the patient in the erasure register: pending until no KEK
    /// generation held now is held any more.
    async fn register_erasure(&self, id: &str) -> Result<(), KeysError> {
        let record = serde_json::to_vec(&PendingErasure {
            patient: id.to_owned(),
            below: self.kek.current(),
        })
        .map_err(|e| KeysError::Audit(e.to_string()))?;
        self.store
            .put_meta_if_absent(&format!("{ERASURE}{id}:{}", now()), &record)
            .await?;
        Ok(())
    }

    /// Whether any generation of `scope`'s data key is stored.
    async fn has_key_rows(&self, scope: &str) -> Result<bool, KeysError> {
        let upto = crate::data::key_events::data_generation(self.store).await?;
        for g in 1..=upto {
            let row = format!("data:{}", crate::data::keyring::key_name(scope, g));
            if self.store.get_wrapped_key(&row).await?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Delete `scope`'s data keys of generations 2 and later (the first is
    /// deleted with its versions).
    async fn delete_later_key_rows(&self, scope: &str) -> Result<u64, KeysError> {
        let upto = crate::data::key_events::data_generation(self.store).await?;
        let mut n = 0;
        for g in 2..=upto {
            let row = format!("data:{}", crate::data::keyring::key_name(scope, g));
            n += u64::from(self.store.delete_wrapped_key(&row).await?);
        }
        Ok(n)
    }

    /// The rotations that make copies from before an erasure unreadable
    /// (search index key, KEK), and the audit record that it is done.
    pub async fn finish_erasure(
        &self,
        id: String,
        erased: Erased,
        within: bool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Erasure, KeysError> {
        // The search index under a new key first: a copy from before the
        // erasure holds the patient's index entries, which today's keys
        // must not be able to test (keys/index.rs). Then the KEK, which
        // makes the copy's own keys unreadable.
        let index_rotation = self
            .rotate_index(progress)
            .await
            .map_err(|e| KeysError::ErasurePending(Box::new(e)))?;
        let (kek_rotation, pending) = match self.rotate_kek(progress).await {
            Ok(r) => {
                let pending = (!r.remove_from_environment.is_empty()).then(|| {
                    format!(
                        "remove KEK generation(s) {:?} from PHYLAX_KEK on every node: until then copies from before the erasure stay readable",
                        r.remove_from_environment
                    )
                });
                (Some(r), pending)
            }
            Err(KeysError::Crypto(phylax_crypto::CryptoError::EnvironmentKek)) => (
                None,
                Some("the KEK is in PHYLAX_KEK: add a new generation there and run `phylax keys rotate --kek` (docs/KEYS.md); until then copies from before the erasure stay readable".into()),
            ),
            Err(e) => return Err(KeysError::ErasurePending(Box::new(e))),
        };
        self.audit
            .record_admin_for(
                "patient-erase",
                Action::Delete,
                format!(
                    "erasure done: {} versions, {} resources; {}",
                    erased.versions,
                    erased.resources,
                    if pending.is_some() {
                        "KEK rotation pending"
                    } else {
                        "KEK rotated"
                    }
                ),
                vec![id.clone()],
            )
            .await
            .map_err(|e| KeysError::Audit(e.to_string()))?;
        Ok(Erasure {
            patient: id,
            versions: erased.versions,
            resources: erased.resources,
            retention_overridden: within,
            index_rotation: Some(index_rotation),
            kek_rotation,
            pending,
        })
    }
}

/// Erasure for the API (`Patient/{id}/$erase`): the deletion runs in the
/// request; the rotations that seal older copies run after it, one
/// erasure at a time, in the background. Until they finish the erasure is
/// pending (`phylax keys status`), and survives a restart: running
/// `phylax patient erase` for the patient finishes it.
#[derive(Debug)]
pub struct Eraser {
    // Private: the handler that holds an Eraser reaches the store only
    // through `erase`.
    store: DynStore,
    keys: std::sync::Arc<crate::data::keyring::KeyRing>,
    audit: std::sync::Arc<crate::audit::log::AuditLog>,
    data_dir: std::path::PathBuf,
    config: std::sync::Arc<crate::base::config::Config>,
    /// One erasure's rotations at a time on this node.
    running: tokio::sync::Mutex<()>,
}

/// Time for every node to notice a key event (they poll each second).
const GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl Eraser {
    pub fn new(
        store: DynStore,
        keys: std::sync::Arc<crate::data::keyring::KeyRing>,
        audit: std::sync::Arc<crate::audit::log::AuditLog>,
        data_dir: std::path::PathBuf,
        config: std::sync::Arc<crate::base::config::Config>,
    ) -> Eraser {
        Eraser {
            store,
            keys,
            audit,
            data_dir,
            config,
            running: tokio::sync::Mutex::new(()),
        }
    }

    fn admin(&self) -> KeyAdmin<'_> {
        KeyAdmin {
            store: &self.store,
            kek: self.keys.kek(),
            audit: &self.audit,
            data_dir: &self.data_dir,
            grace: GRACE,
            keys: &self.keys,
            config: &self.config,
            max_rate: None,
        }
    }

    /// Delete the patient's data now; rotate in the background.
    pub async fn erase(
        self: &std::sync::Arc<Self>,
        id: &str,
        reason: &str,
        override_retention: bool,
    ) -> Result<ErasureStarted, KeysError> {
        let started = self
            .admin()
            .start_erasure(
                id,
                reason,
                self.config.keys.retention_years,
                override_retention,
            )
            .await?;
        let (me, s) = (self.clone(), started.clone());
        let rid = crate::base::request::request_id().unwrap_or_default();
        // Under the request's id: its audit records link to the request.
        tokio::spawn(crate::base::request::REQUEST_ID.scope(rid, async move {
            let _one = me.running.lock().await;
            match me
                .admin()
                .finish_erasure(s.patient, s.erased, s.retention_overridden, &|_, _| {})
                .await
            {
                Ok(e) if e.pending.is_none() => tracing::info!("erasure finished"),
                Ok(_) => tracing::warn!("erasure pending: the KEK could not be rotated here (phylax keys status)"),
                Err(e) => tracing::error!(error = %e, "erasure pending: finish it with phylax patient erase"),
            }
        }));
        Ok(started)
    }
}
