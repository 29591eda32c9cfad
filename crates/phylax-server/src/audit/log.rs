//! The audit log service: turns [`AuditFacts`] into sealed, hash-chained
//! records, commits them durably (group commit), seals them into the
//! Merkle tree with signed checkpoints, and opens them again for auditors
//! and `phylax audit verify`.
//!
//! Invariants:
//! - A record's leaf hash is over the exact AuditEvent JSON bytes that are
//!   sealed, so a copy exported to a SIEM can be checked against a signed
//!   checkpoint without Phylax's keys.
//! - `record` returns only after the record is committed; callers release
//!   their response after that (fail closed: an error means 503).
//! - Writes carry their record in their own transaction
//!   ([`AuditLog::draft`] + `Store::append_version(…, audit)`), so a
//!   stored write always has its record and a refused one has none.
//! - Records get tree positions later, in arrival order, from one sealer at
//!   a time (the Merkle tree's "merge delay", as in Certificate
//!   Transparency); `checkpoint_secs` bounds how long a record is covered
//!   only by the database.

use crate::data::keyring::KeyRing;
use phylax_audit::checkpoint::{Checkpoint, VerifierKey};
use phylax_audit::event::AuditFacts;
use phylax_audit::merkle::{leaf_hash, Frontier, Hash};
use phylax_crypto::log_signing::CheckpointKey;
use phylax_crypto::{BlindIndexKey, DataKey};
use phylax_store::{AuditRow, AuditStore, CheckpointRow, NewAudit, StoreError};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The data-key scope audit records are sealed under.
pub const AUDIT_SCOPE: &str = "audit";
/// Records per group commit.
const BATCH_MAX: usize = 512;
/// Records per checkpoint at most (a backlog is sealed over several).
const SEAL_MAX: u32 = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The log does not match itself or its checkpoints (tampering).
    #[error("{0}")]
    Integrity(String),
}

impl From<StoreError> for AuditError {
    fn from(e: StoreError) -> Self {
        AuditError::Unavailable(e.to_string())
    }
}

type Pending = (NewAudit, oneshot::Sender<Result<(), String>>);

pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    key: Arc<DataKey>,
    blind: Arc<BlindIndexKey>,
    signer: Arc<CheckpointKey>,
    verifier: VerifierKey,
    origin: String,
    tx: mpsc::Sender<Pending>,
    checkpoint_file: Option<PathBuf>,
    /// The sealer's view of the tree (guarded: one sealing pass at a time
    /// per node; nodes arbitrate in the database).
    frontier: tokio::sync::Mutex<Option<Frontier>>,
    /// Set only by the benchmark to measure what auditing costs; it exists
    /// only under the `danger-bench` feature, which nothing but the
    /// benchmark enables.
    #[cfg(feature = "danger-bench")]
    danger_off: std::sync::atomic::AtomicBool,
    /// The detector every committed record is shown to (set at start).
    detector: std::sync::OnceLock<Arc<crate::audit::alert::Detector>>,
    /// Whether the last sealing pass took a full `SEAL_MAX` batch.
    full: std::sync::atomic::AtomicBool,
    /// Sealed records read back to rebuild the tree's edge (see
    /// [`AuditLog::tree_records_read`]).
    reread: std::sync::atomic::AtomicU64,
    /// A running server's journal (see `audit_journal`); without it
    /// (the CLI) records commit straight into the database.
    journal: std::sync::OnceLock<Arc<crate::audit::journal::Journal>>,
    /// `[audit] retention_days`, in ms: records younger may not be pruned.
    retention_ms: i64,
    /// Leaf hashes of the records this node drafted and has not yet seen
    /// sealed, by event id: the sealer takes those without reopening them
    /// (it drafted them itself); any other pending row (another node's,
    /// or one put in by hand) is opened and checked in full.
    drafted: parking_lot::Mutex<std::collections::HashMap<String, [u8; 32]>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn aad(event_id: &str) -> Vec<u8> {
    format!("phylax/audit/v1\0{event_id}").into_bytes()
}

/// A new AuditEvent id: a UUIDv7, time-ordered so that the log's unique
/// index on ids grows at its end (a random id dirtied a different index
/// page per record), with 74 random bits. It reveals the record's time,
/// which the record states anyway.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Keyed hash of a patient id, as stored beside records.
pub fn patient_hash(blind: &BlindIndexKey, patient_id: &str) -> Vec<u8> {
    blind
        .entry(&[b"audit-patient", patient_id.as_bytes()])
        .to_vec()
}

impl AuditLog {
    /// Open the log service: loads its keys and starts the group-commit
    /// writer on the current runtime.
    pub async fn open(
        store: Arc<dyn AuditStore>,
        keys: &KeyRing,
        blind: Arc<BlindIndexKey>,
        origin: String,
        checkpoint_file: Option<PathBuf>,
        retention_days: u32,
    ) -> Result<Arc<AuditLog>, AuditError> {
        let key = keys
            .for_write(AUDIT_SCOPE)
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let signer = Arc::new(
            keys.checkpoint_key()
                .await
                .map_err(|e| AuditError::Unavailable(e.to_string()))?,
        );
        let verifier = VerifierKey::new(&origin, signer.public())
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Pending>(8 * BATCH_MAX);
        tokio::spawn(writer(store.clone(), rx));
        Ok(Arc::new(AuditLog {
            store,
            key,
            blind,
            signer,
            verifier,
            origin,
            tx,
            checkpoint_file,
            frontier: tokio::sync::Mutex::new(None),
            #[cfg(feature = "danger-bench")]
            danger_off: std::sync::atomic::AtomicBool::new(false),
            full: std::sync::atomic::AtomicBool::new(false),
            reread: std::sync::atomic::AtomicU64::new(0),
            detector: std::sync::OnceLock::new(),
            journal: std::sync::OnceLock::new(),
            retention_ms: i64::from(retention_days) * 86_400_000,
            drafted: Default::default(),
        }))
    }

    /// **Benchmarks only** (the `danger-bench` feature): stop recording
    /// reads, searches and security events (writes still commit their
    /// records), to measure what auditing costs. A server must never run
    /// like this; it is not reachable from phylax.toml or the CLI, and
    /// does not exist in a build without the feature.
    #[cfg(feature = "danger-bench")]
    pub fn danger_disable_for_benchmark(&self) {
        self.danger_off
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the benchmark turned recording off (never, without the
    /// `danger-bench` feature).
    #[inline]
    fn danger_off(&self) -> bool {
        #[cfg(feature = "danger-bench")]
        {
            self.danger_off.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(feature = "danger-bench"))]
        {
            false
        }
    }

    /// The log's name in checkpoints (`phylax/<instance id>`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The public key that verifies checkpoints, in `note` verifier format.
    pub fn verifier_key(&self) -> &VerifierKey {
        &self.verifier
    }

    pub fn patient_hash(&self, patient_id: &str) -> Vec<u8> {
        patient_hash(&self.blind, patient_id)
    }

    /// Seal a record without writing it (a write commits it with its data).
    pub fn draft(&self, facts: &AuditFacts) -> Result<NewAudit, AuditError> {
        let json = facts
            .to_json()
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        // Compressed, then sealed; the leaf hash stays over the JSON
        // (`phylax_audit::stored`).
        let sealed = self
            .key
            .seal(&aad(&facts.id), &phylax_audit::stored::pack(&json))
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        Ok(NewAudit {
            event_id: facts.id.clone(),
            recorded: facts.recorded_ms,
            agent: facts.agent_key(),
            action: facts.action.code().to_owned(),
            subtype: facts.kind.subtype().to_owned(),
            outcome: facts.outcome.code().to_owned(),
            patients: facts
                .patients
                .iter()
                .map(|p| self.patient_hash(p))
                .collect(),
            leaf_hash: {
                let leaf = leaf_hash(&json);
                let mut d = self.drafted.lock();
                if d.len() >= DRAFTED_MAX {
                    // Nothing is sealing (an outage): forget, and check
                    // those rows in full when sealing resumes.
                    d.clear();
                }
                d.insert(facts.id.clone(), leaf);
                leaf.to_vec()
            },
            sealed,
        })
    }

    /// Show every record committed from now on to `d`.
    pub fn set_detector(&self, d: Arc<crate::audit::alert::Detector>) {
        let _ = self.detector.set(d);
    }

    /// The detector, if running (for alerts raised outside the rules).
    pub fn detector(&self) -> Option<&Arc<crate::audit::alert::Detector>> {
        self.detector.get()
    }

    /// Commit one record (group-committed with concurrent ones) and show it
    /// to the detector. `Ok` means durable.
    pub async fn record(&self, facts: &AuditFacts) -> Result<(), AuditError> {
        self.record_quiet(facts).await?;
        if let Some(d) = self.detector.get() {
            d.observe(facts);
        }
        Ok(())
    }

    /// [`AuditLog::record`], handing the facts on to the detector instead
    /// of copying them (a search's facts name every patient it returned).
    pub async fn record_owned(&self, facts: AuditFacts) -> Result<(), AuditError> {
        self.record_quiet(&facts).await?;
        if let Some(d) = self.detector.get() {
            d.observe_owned(facts);
        }
        Ok(())
    }

    /// Commit one record without showing it to the detector (the
    /// detector's own alerts).
    pub async fn record_quiet(&self, facts: &AuditFacts) -> Result<(), AuditError> {
        if self.danger_off() {
            return Ok(());
        }
        let row = self.draft(facts)?;
        if let Some(j) = self.journal.get() {
            return j.append(row).await.map_err(AuditError::Unavailable);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((row, tx))
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?;
        rx.await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
            .map_err(AuditError::Unavailable)
    }

    /// The journal's syncs and records since the start (`None` without a
    /// journal).
    pub fn journal_stats(&self) -> Option<(u64, u64)> {
        self.journal.get().map(|j| j.stats())
    }

    /// Announce that the caller will record an event soon, so that the
    /// journal's next sync can wait for it (see
    /// [`crate::audit::journal::Ticket`]). Drop the ticket just before
    /// recording, or when there will be nothing to record.
    pub fn ticket(&self) -> crate::audit::journal::Ticket {
        match self.journal.get() {
            Some(j) if !self.danger_off() => j.ticket(),
            _ => crate::audit::journal::Ticket::none(),
        }
    }

    /// Journal records on local disk from now on (a serving node; see
    /// `audit_journal`), first moving any stopped node's journal into the
    /// database.
    pub async fn start_journal(&self, root: &std::path::Path) -> Result<(), AuditError> {
        let j = crate::audit::journal::Journal::open(root, self.store.clone())
            .await
            .map_err(AuditError::Unavailable)?;
        j.spawn_indexer();
        let _ = self.journal.set(j);
        Ok(())
    }

    /// Move every acknowledged record into the searchable tables now
    /// (readers of the log call this first). A no-op without a journal.
    pub async fn flush(&self) -> Result<(), AuditError> {
        match self.journal.get() {
            Some(j) => j.flush().await.map(|_| ()).map_err(AuditError::Unavailable),
            None => Ok(()),
        }
    }

    /// Empty the bodies of sealed records older than the retention period
    /// (`[audit] retention_days`); their leaf hashes stay, so the tree and
    /// every checkpoint still verify. Records not yet sealed are kept until
    /// they are. The pruning is itself recorded. Returns how many.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, AuditError> {
        self.seal_pending().await?;
        let cutoff = now_ms - self.retention_ms;
        let mut n = 0;
        loop {
            let k = self.store.audit_prune(cutoff, 10_000).await?;
            n += k;
            if k < 10_000 {
                break;
            }
        }
        self.record_admin(
            "audit-prune",
            phylax_audit::event::Action::Update,
            format!(
                "{n} audit records older than {} pruned after retention",
                crate::base::clock::format_instant(cutoff)
            ),
        )
        .await?;
        Ok(n)
    }

    /// The audit tables, for what reads them (the AuditEvent API, the
    /// access review, metrics, export): only this service owns them.
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// A stored record's AuditEvent JSON, exactly the bytes its leaf hash
    /// covers, after the same checks as [`AuditLog::open_row`].
    pub fn leaf_bytes(&self, row: &AuditRow) -> Result<Vec<u8>, AuditError> {
        self.checked(row).map(|(plain, _)| plain)
    }

    /// Open a stored record: decrypt, check it hashes to its leaf and that
    /// the searchable columns agree with it. Any mismatch is tampering.
    pub fn open_row(&self, row: &AuditRow) -> Result<Value, AuditError> {
        self.checked(row).map(|(_, v)| v)
    }

    /// The checks of [`AuditLog::open_row`], keeping the exact bytes too
    /// (one decryption for both callers).
    fn checked(&self, row: &AuditRow) -> Result<(Vec<u8>, Value), AuditError> {
        let bad =
            || AuditError::Integrity(format!("record {} fails its integrity check", row.event_id));
        let stored = self
            .key
            .open(&aad(&row.event_id), &row.sealed)
            .map_err(|_| bad())?;
        let plain = phylax_audit::stored::unpack(&stored)
            .map_err(|_| bad())?
            .into_owned();
        if leaf_hash(&plain).as_slice() != row.leaf_hash.as_slice() {
            return Err(bad());
        }
        let v: Value = serde_json::from_slice(&plain).map_err(|_| bad())?;
        let subtype_ok = v["subtype"][0]["code"].as_str().is_some_and(|c| {
            c == row.subtype
                || (row.subtype == "login" && c == "110122")
                || (row.subtype == "logout" && c == "110123")
        });
        if v["id"].as_str() != Some(row.event_id.as_str())
            || v["action"].as_str() != Some(row.action.as_str())
            || v["outcome"].as_str() != Some(row.outcome.as_str())
            || !subtype_ok
            || v["recorded"].as_str() != Some(phylax_audit::event::instant(row.recorded).as_str())
            || agent_of(&v) != row.agent
        {
            return Err(bad());
        }
        Ok((plain, v))
    }

    /// Give every unsealed record a tree position and sign a checkpoint
    /// over the new tree. Returns the new checkpoint, or `None` when there
    /// was nothing to seal or another node sealed first (it will be picked
    /// up next time). An `Integrity` error means the stored tree no longer
    /// matches the last signed checkpoint: someone changed the log.
    pub async fn seal_pending(&self) -> Result<Option<Checkpoint>, AuditError> {
        // Journaled records first, so a checkpoint covers everything
        // acknowledged before it (a journal failure leaves them for the
        // next pass: sealing what is stored goes on).
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "journal not flushed before sealing");
        }
        let mut guard = self.frontier.lock().await;
        // Queue entries naming no record, or one already sealed, can only
        // have been put there by hand; they would stall sealing.
        let stray = self.store.audit_queue_clean().await?;
        if stray > 0 {
            tracing::error!(
                event = "audit.forged_record",
                entries = stray,
                "sealing-queue entries naming no pending record were removed"
            );
            if let Some(d) = self.detector() {
                d.raise(crate::audit::alert::Alert {
                    rule: "audit-tamper",
                    severity: "high",
                    detail: format!(
                        "{stray} sealing-queue entries named no record awaiting sealing (put there by hand); removed"
                    ),
                    user: None,
                });
            }
        }
        let pending = self.store.audit_unsealed(i64::MIN, SEAL_MAX).await?;
        if pending.is_empty() {
            return Ok(None);
        }
        // Read together, so that another node's seal cannot fall between
        // them and look like tampering.
        let (latest, sealed) = self.store.latest_checkpoint_and_tree_size().await?;
        let latest = match latest {
            Some(row) => {
                let cp = phylax_audit::checkpoint::open_signed(&row.note, &self.verifier)
                    .map_err(|e| AuditError::Integrity(format!("latest checkpoint: {e}")))?;
                Some((cp, row.frontier))
            }
            None => None,
        };
        let mut f = match guard.take() {
            Some(f) => f,
            // A starting node goes on from the newest checkpoint's stored
            // edge, not by rereading every sealed record (O(n) at every
            // start: ten seconds of database time at a million records).
            // The edge is trusted only if its root is the signed one.
            None => match &latest {
                Some((cp, edge)) => Frontier::from_parts(cp.size, edge)
                    .filter(|g| g.root() == cp.root && g.size() <= sealed)
                    .unwrap_or_default(),
                None => Frontier::new(),
            },
        };
        if sealed < f.size() {
            // The tree shrank under us: the log was truncated.
            return Err(AuditError::Integrity(format!(
                "tree has {sealed} records, {} were sealed",
                f.size()
            )));
        }
        // Catch up with records other nodes sealed (or, without a stored
        // edge, with the whole tree, once).
        while f.size() < sealed {
            let rows = self.store.audit_by_index(f.size(), 10_000).await?;
            if rows.is_empty() {
                break;
            }
            self.reread
                .fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for r in rows {
                if r.leaf_index != Some(f.size()) {
                    return Err(AuditError::Integrity(format!(
                        "tree position {} is missing",
                        f.size()
                    )));
                }
                f.push(to_hash(&r.leaf_hash).ok_or(AuditError::Integrity(r.event_id))?);
            }
        }
        if let Some((cp, _)) = &latest {
            if cp.size != f.size() || cp.root != f.root() {
                return Err(AuditError::Integrity(format!(
                    "the stored tree does not match checkpoint {}",
                    cp.size
                )));
            }
        }
        self.full.store(
            pending.len() as u32 >= SEAL_MAX,
            std::sync::atomic::Ordering::Relaxed,
        );
        let first = f.size();
        let mut next = f.clone();
        let mut ids = Vec::with_capacity(pending.len());
        let mut refused = Vec::new();
        for row in &pending {
            // Only records this server sealed enter the tree: a row put
            // into the database by hand (a forged record, a copied body
            // under another id, a leaf hash that is not its body's) is
            // refused, left out and alerted, never sealed, so it cannot
            // poison the tree for every later verification.
            if !self.sealed_here(row) {
                self.refuse_forged(row);
                refused.push(row.id);
                continue;
            }
            next.push(
                to_hash(&row.leaf_hash)
                    .ok_or_else(|| AuditError::Integrity(format!("row {}", row.id)))?,
            );
            ids.push(row.id);
        }
        if !refused.is_empty() {
            // Off the queue, so they neither stall sealing nor come back.
            self.store.audit_unqueue(refused).await?;
        }
        if ids.is_empty() {
            *guard = Some(f);
            return Ok(None);
        }
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size: next.size(),
            root: next.root(),
            time_ms: crate::base::clock::now_ms(),
        };
        let note = cp.sign(&self.verifier, |m| self.signer.sign(m));
        let row = CheckpointRow {
            size: cp.size,
            time: cp.time_ms,
            note: note.clone(),
            frontier: next.to_bytes(),
        };
        let t0 = std::time::Instant::now();
        let sealed_ok = self.store.audit_seal(first, ids, row).await?;
        {
            let mut d = self.drafted.lock();
            for r in &pending {
                d.remove(&r.event_id);
            }
        }
        tracing::info!(
            event = "audit.sealed",
            size = cp.size,
            added = pending.len(),
            ms = t0.elapsed().as_millis() as u64,
            ok = sealed_ok,
            "audit records sealed"
        );
        if sealed_ok {
            *guard = Some(next);
            drop(guard);
            self.publish(&note);
            Ok(Some(cp))
        } else {
            // Another node sealed first; re-read next time.
            *guard = Some(f);
            Ok(None)
        }
    }

    /// Whether a pending record is one this server sealed: its body opens
    /// under the audit key for its event id and its leaf hash is the
    /// hash of that body. (The columns are checked by `audit verify` and
    /// when a record is read; this is the cheap test every record passes
    /// before it gets a tree position.)
    fn sealed_here(&self, row: &AuditRow) -> bool {
        // Drafted by this node with exactly this leaf hash: the pairing of
        // id and leaf is its own (a body altered afterwards is tampering
        // that `audit verify` reports, not a forged record).
        if self
            .drafted
            .lock()
            .get(&row.event_id)
            .is_some_and(|l| l.as_slice() == row.leaf_hash.as_slice())
        {
            return true;
        }
        let Ok(stored) = self.key.open(&aad(&row.event_id), &row.sealed) else {
            return false;
        };
        match phylax_audit::stored::unpack(&stored) {
            Ok(plain) => leaf_hash(&plain).as_slice() == row.leaf_hash.as_slice(),
            Err(_) => false,
        }
    }

    fn refuse_forged(&self, row: &AuditRow) {
        tracing::error!(
            event = "audit.forged_record",
            audit_id = row.id,
            "a pending audit record was not sealed by this server; refused, not sealed"
        );
        if let Some(d) = self.detector() {
            d.raise_once(
                crate::audit::alert::Alert {
                    rule: "audit-tamper",
                    severity: "high",
                    detail: format!(
                        "audit row {} awaiting sealing was not written by Phylax (forged or altered); it was refused and left out of the tree",
                        row.id
                    ),
                    user: None,
                },
                format!("audit-forged|{}", row.id),
            );
        }
    }

    /// How many sealed records this node has read back to rebuild the
    /// tree's edge: none when it started from a checkpoint's stored edge
    /// and no other node sealed since; the whole tree when that edge was
    /// missing (a checkpoint from before it was kept) or did not match its
    /// signed root.
    pub fn tree_records_read(&self) -> u64 {
        self.reread.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn last_batch_full(&self) -> bool {
        self.full.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keep a copy of the newest checkpoint outside the database (written
    /// to a temporary file and renamed, so a reader never sees half).
    fn publish(&self, note: &str) {
        let Some(path) = &self.checkpoint_file else {
            return;
        };
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, note).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::error!(event = "audit.checkpoint_copy_failed", path = %path.display(), error = %e,
                "could not write the external checkpoint copy");
        }
    }

    /// Seal every few seconds until the process ends.
    pub fn spawn_sealer(self: &Arc<Self>, every: std::time::Duration) {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(log) = log.upgrade() else { return };
                // A full batch means a backlog: keep sealing (each pass is
                // its own short transaction and checkpoint).
                let mut res = log.seal_pending().await;
                while matches!(&res, Ok(Some(_))) && log.last_batch_full() {
                    res = log.seal_pending().await;
                }
                match res {
                    Ok(_) => {}
                    Err(AuditError::Integrity(what)) => {
                        tracing::error!(event = "audit.verification_failed", what = %what,
                            "the audit log does not match its signed checkpoints; sealing stopped");
                        if let Some(d) = log.detector() {
                            d.raise(crate::audit::alert::Alert {
                                rule: "audit-verification",
                                severity: "critical",
                                detail: format!(
                                    "the audit log does not match its signed checkpoints: {what}"
                                ),
                                user: None,
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not seal audit records"),
                }
            }
        });
    }
}

fn to_hash(b: &[u8]) -> Option<Hash> {
    b.try_into().ok()
}

/// The agent key (`user:{id}`, client id or `anonymous`) an AuditEvent
/// records, read back from its JSON.
pub fn agent_of(v: &Value) -> String {
    let agents = v["agent"].as_array().cloned().unwrap_or_default();
    for a in &agents {
        if a["who"]["identifier"]["system"] == "urn:phylax:user" {
            if let Some(id) = a["who"]["identifier"]["value"].as_str() {
                return format!("user:{id}");
            }
        }
    }
    for a in &agents {
        if a["who"]["identifier"]["system"] == "urn:phylax:client" {
            if let Some(id) = a["who"]["identifier"]["value"].as_str() {
                return id.to_owned();
            }
        }
    }
    "anonymous".to_owned()
}

/// The group-commit writer: takes every record queued while the previous
/// batch was committing and writes them in one transaction.
async fn writer(store: Arc<dyn AuditStore>, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (rows, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let res = store.append_audit(rows).await.map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::error!(event = "audit.write_failed", error = %e, "audit records could not be written");
        }
        for r in replies {
            let _ = r.send(res.clone());
        }
    }
}

/// What `phylax audit verify` found. Any tampering is an `Err` instead.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records whose bodies were pruned after retention (leaf hash only).
    pub pruned: u64,
    /// Records in the database.
    pub records: u64,
    /// Records in the Merkle tree (the rest await the next checkpoint).
    pub sealed: u64,
    /// Stored checkpoints checked (signature and root).
    pub checkpoints: u64,
    /// The newest stored checkpoint.
    pub latest: Option<Checkpoint>,
    /// Outside checkpoints checked for consistency with the log.
    pub external: u64,
    /// For `--event`: its tree position, the checkpoint size it was
    /// proven against, and the proof length.
    pub inclusion: Option<(u64, u64, usize)>,
}

impl AuditLog {
    /// Check the whole log: every record opens under its key and hashes to
    /// its leaf, tree positions are contiguous, every stored checkpoint is
    /// signed by the log's key and matches the tree at its size, every
    /// outside checkpoint (`external`, signed-note text saved earlier) is
    /// consistent with today's tree, and, if asked, `event` is included
    /// in the newest checkpoint. Detects edited, deleted, inserted and
    /// reordered records and a truncated tail.
    pub async fn verify(
        &self,
        external: &[String],
        event: Option<&str>,
    ) -> Result<VerifyReport, AuditError> {
        self.verify_at(external, event, crate::base::clock::now_ms())
            .await
    }

    /// [`AuditLog::verify`] as of `now` (ms): retention is judged against
    /// it, as [`AuditLog::prune`] takes its time.
    pub async fn verify_at(
        &self,
        external: &[String],
        event: Option<&str>,
        now: i64,
    ) -> Result<VerifyReport, AuditError> {
        self.flush().await?;
        use phylax_audit::checkpoint::open_signed;
        use phylax_audit::merkle;
        // Every problem found, not only the first: an operator on the day
        // of a breach needs the whole picture.
        let mut problems: Vec<String> = Vec::new();
        let (records, sealed) = self.store.audit_counts().await?;
        let mut report = VerifyReport {
            records,
            sealed,
            ..Default::default()
        };
        // The per-patient entries the readable records call for, as an
        // order-free digest (a sum of hashes of (patient key, record id)).
        let mut expected = PatientDigest::default();
        let mut pruned_ids: std::collections::HashSet<i64> = Default::default();
        let mut pruned_at: Vec<u64> = Vec::new();
        let mut leaves: Vec<Hash> = Vec::with_capacity(sealed as usize);
        let mut gap = false;
        loop {
            let rows = self
                .store
                .audit_by_index(leaves.len() as u64, 10_000)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                if r.leaf_index != Some(leaves.len() as u64) {
                    problems.push(format!(
                        "tree position {} is missing (a record was deleted or moved)",
                        leaves.len()
                    ));
                    gap = true;
                    break;
                }
                if r.sealed.is_empty() {
                    // Pruned: only its leaf hash is left, which the
                    // checkpoints still cover; its age is checked against
                    // the signed time of the checkpoint that first covers
                    // it (the `recorded` column is not authenticated).
                    pruned_ids.insert(r.id);
                    pruned_at.push(leaves.len() as u64);
                    report.pruned += 1;
                } else {
                    match self.open_row(&r) {
                        Ok(v) => expected.add_record(self, r.id, &v),
                        Err(_) => problems.push(format!(
                            "record at position {} was altered or forged",
                            leaves.len()
                        )),
                    }
                }
                match to_hash(&r.leaf_hash) {
                    Some(h) => leaves.push(h),
                    None => {
                        problems.push(format!(
                            "record at position {} has no valid leaf hash",
                            leaves.len()
                        ));
                        gap = true;
                        break;
                    }
                }
            }
            if gap {
                break;
            }
        }
        if !gap && leaves.len() as u64 != sealed {
            problems.push(format!(
                "{} records in order, but positions reach {sealed}",
                leaves.len()
            ));
        }
        // Records awaiting their checkpoint count too (their entries are
        // written with them); one that does not open is a forgery.
        let mut last_pending = i64::MIN;
        let mut pending_seen = 0u64;
        loop {
            let rows = self.store.audit_unsealed(last_pending, 10_000).await?;
            if rows.is_empty() {
                break;
            }
            pending_seen += rows.len() as u64;
            for r in &rows {
                match self.open_row(r) {
                    Ok(v) => expected.add_record(self, r.id, &v),
                    Err(_) => problems.push(format!(
                        "record {} awaiting its checkpoint was not written by Phylax (forged or altered)",
                        r.id
                    )),
                }
            }
            last_pending = rows.last().map_or(last_pending, |r| r.id);
            if rows.len() < 10_000 {
                break;
            }
        }
        // Queue entries naming no record are the sealer's to remove (it
        // does, with an alert); here only records outside both count.
        let outside = records.saturating_sub(sealed + pending_seen);
        if outside > 0 {
            problems.push(format!(
                "{outside} record(s) are neither in the tree nor awaiting it (rows put in by hand and refused by the sealer)"
            ));
        }
        let n = leaves.len() as u64;
        let mut f = Frontier::new();
        let mut after = 0;
        let mut pruned_next = 0usize;
        'cps: loop {
            let cps = self.store.checkpoints(after, 1000).await?;
            if cps.is_empty() {
                break;
            }
            for c in cps {
                after = c.size;
                let cp = match open_signed(&c.note, &self.verifier) {
                    Ok(cp) => cp,
                    Err(e) => {
                        problems.push(format!("checkpoint {}: {e}", c.size));
                        continue;
                    }
                };
                if cp.size != c.size {
                    problems.push(format!("checkpoint row {} holds size {}", c.size, cp.size));
                    continue;
                }
                if cp.size > n {
                    problems.push(format!(
                        "the log was truncated: checkpoint {} signed {} records, {n} remain",
                        cp.size, cp.size
                    ));
                    break 'cps;
                }
                while f.size() < cp.size {
                    f.push(leaves[f.size() as usize]);
                }
                if f.root() != cp.root {
                    problems.push(format!(
                        "the records no longer match checkpoint {} (edited, inserted or reordered)",
                        cp.size
                    ));
                }
                // Pruned records this checkpoint is the first to cover
                // were recorded before its signed time.
                while pruned_next < pruned_at.len() && pruned_at[pruned_next] < cp.size {
                    if cp.time_ms - PRUNE_SLACK_MS > now - self.retention_ms {
                        problems.push(format!(
                            "record at position {} was pruned before its retention ended (its first checkpoint was signed {})",
                            pruned_at[pruned_next],
                            phylax_audit::event::instant(cp.time_ms)
                        ));
                    }
                    pruned_next += 1;
                }
                report.checkpoints += 1;
                report.latest = Some(cp);
            }
        }
        for note in external {
            let cp = match open_signed(note, &self.verifier) {
                Ok(cp) => cp,
                Err(e) => {
                    problems.push(format!("outside checkpoint: {e}"));
                    continue;
                }
            };
            if cp.size > n {
                problems.push(format!(
                    "the log was truncated: an outside checkpoint signed {} records, {n} remain",
                    cp.size
                ));
                continue;
            }
            if cp.size > 0 {
                let consistent = merkle::consistency_proof(cp.size as usize, &leaves)
                    .ok()
                    .map(|p| p.iter().map(|h| h.to_vec()).collect::<Vec<Vec<u8>>>())
                    .is_some_and(|proof| {
                        merkle::verify_consistency(
                            cp.size,
                            n,
                            &proof,
                            &cp.root,
                            &merkle::root(&leaves),
                        )
                        .is_ok()
                    });
                if !consistent {
                    problems.push(format!(
                        "the log is not consistent with outside checkpoint {}",
                        cp.size
                    ));
                    continue;
                }
            }
            report.external += 1;
        }
        if n > 0 && report.latest.as_ref().map(|c| c.size) != Some(n) {
            problems.push(format!(
                "{n} records are in the tree but no checkpoint covers them all"
            ));
        }
        // The per-patient entries, rebuilt from the records, must be the
        // ones stored: deleting them (to empty a patient's access log) or
        // adding some is found here.
        let mut actual = PatientDigest::default();
        let mut cursor = None;
        loop {
            let rows = self.store.audit_patient_entries(cursor, 50_000).await?;
            let Some(last) = rows.last().copied() else {
                break;
            };
            for (key, audit_id) in &rows {
                if !pruned_ids.contains(audit_id) {
                    actual.add(key, *audit_id);
                }
            }
            cursor = Some(last);
        }
        if actual != expected {
            problems.push(format!(
                "the per-patient index does not match the records ({} entries stored for readable records, {} expected): entries were deleted or added, so patients' access logs are incomplete",
                actual.count, expected.count
            ));
        }
        if let Some(id) = event {
            match self.inclusion(id, &report, &leaves).await {
                Ok(i) => report.inclusion = Some(i),
                Err(AuditError::Integrity(m)) => problems.push(m),
                Err(e) => return Err(e),
            }
        }
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(AuditError::Integrity(format!(
                "{} problem(s): {}",
                problems.len(),
                problems.join("; ")
            )))
        }
    }

    async fn inclusion(
        &self,
        id: &str,
        report: &VerifyReport,
        leaves: &[Hash],
    ) -> Result<(u64, u64, usize), AuditError> {
        use phylax_audit::merkle;
        let bad = |m: String| AuditError::Integrity(m);
        let row = self
            .store
            .audit_get(id)
            .await?
            .ok_or_else(|| bad(format!("no record {id}")))?;
        let Some(i) = row.leaf_index else {
            return Err(AuditError::Unavailable(format!(
                "record {id} awaits the next checkpoint; try again in a few seconds"
            )));
        };
        let latest = report
            .latest
            .as_ref()
            .ok_or_else(|| bad("no checkpoint".into()))?;
        if latest.size as usize > leaves.len() {
            return Err(bad(format!(
                "record {id} is not in checkpoint {}",
                latest.size
            )));
        }
        let proof: Vec<Vec<u8>> =
            merkle::inclusion_proof(i as usize, &leaves[..latest.size as usize])
                .map_err(|e| bad(e.to_string()))?
                .iter()
                .map(|h| h.to_vec())
                .collect();
        merkle::verify_inclusion(i, latest.size, &row.leaf_hash, &proof, &latest.root)
            .map_err(|_| bad(format!("record {id} is not in checkpoint {}", latest.size)))?;
        Ok((i, latest.size, proof.len()))
    }
}

/// Drafted-record leaf hashes kept for the sealer (about 40 MB at most).
const DRAFTED_MAX: usize = 1_000_000;

/// How long a record may wait for its first checkpoint (several nodes'
/// journals, a sealer outage): a pruned record counts as pruned early only
/// when that checkpoint was signed more than this inside the retention.
const PRUNE_SLACK_MS: i64 = 3_600_000;

/// An order-free digest of per-patient entries: the count and the
/// wrapping sum of a hash of each (patient key, record id). Equal sets
/// give equal digests; a deleted or added entry changes both.
#[derive(Debug, Default, PartialEq, Eq)]
struct PatientDigest {
    count: u64,
    sum: u128,
}

impl PatientDigest {
    fn add(&mut self, key: &[u8; 8], audit_id: i64) {
        let d = leaf_hash(&[key.as_slice(), &audit_id.to_be_bytes()].concat());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        self.count += 1;
        self.sum = self.sum.wrapping_add(u128::from_be_bytes(b));
    }

    /// The entries a record's patients call for (distinct keys, as the
    /// store writes them).
    fn add_record(&mut self, log: &AuditLog, audit_id: i64, v: &Value) {
        let mut keys: Vec<[u8; 8]> = v["entity"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"]["code"] == "1")
            .filter_map(|e| e["what"]["reference"].as_str()?.strip_prefix("Patient/"))
            .map(|p| phylax_store::query::patient_key(&log.patient_hash(p)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for k in &keys {
            self.add(k, audit_id);
        }
    }
}

impl AuditLog {
    /// Record an administrative change made outside the HTTP API (the
    /// `phylax` CLI on the server): user and role changes, client
    /// registration, key operations. `what` is a fixed Phylax subtype
    /// (`user`, `client`, `key`…); `detail` names ids, never names.
    pub async fn record_admin(
        &self,
        what: &'static str,
        action: phylax_audit::event::Action,
        detail: String,
    ) -> Result<(), AuditError> {
        use phylax_audit::event::{EventKind, Outcome};
        let facts = AuditFacts {
            id: crate::audit::log::new_event_id(),
            recorded_ms: crate::base::clock::now_ms(),
            kind: EventKind::Security(what),
            action,
            outcome: Outcome::Success,
            outcome_desc: Some(detail),
            user: None,
            client: Some("phylax-cli".into()),
            ip: None,
            token_id: None,
            request_id: "cli".into(),
            purpose: None,
            patients: Vec::new(),
            resources: Vec::new(),
            query_params: Vec::new(),
            observer: self.origin.clone(),
        };
        self.record(&facts).await
    }
}

/// A sign-in, second-factor, token or account event.
#[derive(Debug, Clone)]
pub struct AuthEvent {
    pub kind: phylax_audit::event::EventKind,
    pub action: phylax_audit::event::Action,
    pub outcome: phylax_audit::event::Outcome,
    /// Fixed, server-written text (never a username or anything typed).
    pub detail: String,
    pub user: Option<phylax_audit::event::UserRef>,
    pub client: Option<String>,
    pub ip: Option<std::net::IpAddr>,
}

impl AuditLog {
    /// Record an authentication event; `Ok` means durable. Callers fail
    /// closed: a sign-in whose record cannot be written does not complete.
    pub async fn record_auth(&self, e: AuthEvent) -> Result<(), AuditError> {
        let facts = AuditFacts {
            id: crate::audit::log::new_event_id(),
            recorded_ms: crate::base::clock::now_ms(),
            kind: e.kind,
            action: e.action,
            outcome: e.outcome,
            outcome_desc: Some(e.detail),
            user: e.user,
            client: e.client,
            ip: e.ip,
            token_id: None,
            request_id: crate::base::request::request_id().unwrap_or_default(),
            purpose: None,
            patients: Vec::new(),
            resources: Vec::new(),
            query_params: Vec::new(),
            observer: self.origin.clone(),
        };
        self.record(&facts).await
    }
}
