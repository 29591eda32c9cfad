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
//!
//! # Layout
//! - this file: the service, recording (`record`, `draft`, `record_auth`,
//!   `record_admin`), the group-commit writer, the journal hook, pruning;
//! - [`seal`]: sealing records into the Merkle tree and signing
//!   checkpoints, and the periodic sealer;
//! - [`verify`]: `phylax audit verify`: records, tree, checkpoints and
//!   per-patient entries checked against each other.

mod seal;
mod verify;

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
pub use verify::VerifyReport;

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
    /// The checkpoint key that signs and the verifier keys of every
    /// generation (the signer's first): replaced when the key rotates.
    checkpoint: parking_lot::RwLock<CheckpointSet>,
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

/// The checkpoint key in use and the verifier keys of every generation.
struct CheckpointSet {
    generation: u32,
    signer: Arc<CheckpointKey>,
    /// The signer's first.
    verifiers: Vec<VerifierKey>,
}

impl CheckpointSet {
    async fn load(
        keys: &KeyRing,
        origin: &str,
        may_create: bool,
    ) -> Result<CheckpointSet, AuditError> {
        let k = keys.checkpoint_keys(may_create).await.map_err(|e| match e {
            crate::data::keyring::KeyError::Missing => AuditError::Integrity(
                "the audit log's checkpoint keys are missing or have a gap (a generation deleted from wrapped_keys): restore them from a backup (docs/KEYS.md, \"Recovery\")".into(),
            ),
            e => AuditError::Unavailable(e.to_string()),
        })?;
        let mut verifiers = Vec::with_capacity(1 + k.retired.len());
        for public in std::iter::once(k.signer.public()).chain(k.retired) {
            verifiers.push(
                VerifierKey::new(origin, public)
                    .map_err(|e| AuditError::Unavailable(e.to_string()))?,
            );
        }
        Ok(CheckpointSet {
            generation: k.generation,
            signer: Arc::new(k.signer),
            verifiers,
        })
    }
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
        // A checkpoint key is made only for a log with nothing in it yet.
        let (latest, size) = store.latest_checkpoint_and_tree_size().await?;
        let fresh = latest.is_none() && size == 0;
        let checkpoint = CheckpointSet::load(keys, &origin, fresh).await?;
        let (tx, rx) = mpsc::channel::<Pending>(8 * BATCH_MAX);
        tokio::spawn(writer(store.clone(), rx));
        Ok(Arc::new(AuditLog {
            store,
            key,
            blind,
            checkpoint: parking_lot::RwLock::new(checkpoint),
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

    /// The public key that verifies the checkpoints signed now.
    pub fn verifier_key(&self) -> VerifierKey {
        self.checkpoint.read().verifiers[0].clone()
    }

    /// The public keys of every checkpoint key generation, the one that
    /// signs now first: older checkpoints verify with older ones.
    pub fn verifier_keys(&self) -> Vec<VerifierKey> {
        self.checkpoint.read().verifiers.clone()
    }

    /// The generation of the checkpoint key that signs now.
    pub fn checkpoint_generation(&self) -> u32 {
        self.checkpoint.read().generation
    }

    /// The signing key and its verifier key, read together.
    pub(in crate::audit) fn signer(&self) -> (Arc<CheckpointKey>, VerifierKey) {
        let c = self.checkpoint.read();
        (c.signer.clone(), c.verifiers[0].clone())
    }

    /// Sign a statement other than a checkpoint with the checkpoint key
    /// (a backup's manifest): `domain` is a first line no checkpoint
    /// can start with (an origin is the key's name, `phylax/…`), so the
    /// signature can never pass for a checkpoint's, nor one for it.
    pub fn sign_statement(&self, domain: &str, msg: &[u8]) -> (VerifierKey, Vec<u8>) {
        let (signer, verifier) = self.signer();
        let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
        m.extend_from_slice(domain.as_bytes());
        m.push(b'\n');
        m.extend_from_slice(msg);
        (verifier, signer.sign(&m))
    }

    /// Load the checkpoint keys again (a rotation's key event): sign with
    /// the newest, verify with every one.
    pub async fn reload_checkpoint_keys(&self, keys: &KeyRing) -> Result<(), AuditError> {
        let set = CheckpointSet::load(keys, &self.origin, false).await?;
        *self.checkpoint.write() = set;
        Ok(())
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
    pub(in crate::audit) async fn record_quiet(
        &self,
        facts: &AuditFacts,
    ) -> Result<(), AuditError> {
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

    /// The audit tables: only the audit service's own modules (sealing,
    /// verification, export) use them directly; everything else reads
    /// through the methods below, none of which can change the log.
    pub(in crate::audit) fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// Records matching `q`, sealed (open each with [`AuditLog::open_row`]).
    pub async fn search(&self, q: &phylax_store::AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        self.store.audit_search(q).await
    }

    /// One record by its event id.
    pub async fn get(&self, event_id: &str) -> Result<Option<AuditRow>, StoreError> {
        self.store.audit_get(event_id).await
    }

    /// How many records are sealed into the tree and how many wait for it
    /// (two index lookups: cheap enough for every metrics scrape).
    pub async fn sizes(&self) -> Result<(u64, u64), StoreError> {
        Ok((
            self.store.audit_tree_size().await?,
            self.store.audit_pending_count().await?,
        ))
    }

    /// The newest stored checkpoint.
    pub async fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>, StoreError> {
        self.store.latest_checkpoint().await
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

/// Drafted-record leaf hashes kept for the sealer (about 40 MB at most).
const DRAFTED_MAX: usize = 1_000_000;

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
        self.record_admin_for(what, action, detail, Vec::new())
            .await
    }

    /// [`AuditLog::record_admin`] of a change that concerns patients (an
    /// erasure, a legal hold): the record names them by id, so the
    /// patient's accounting of disclosures shows it.
    pub async fn record_admin_for(
        &self,
        what: &'static str,
        action: phylax_audit::event::Action,
        detail: String,
        patients: Vec<String>,
    ) -> Result<(), AuditError> {
        use phylax_audit::event::{EventKind, Outcome};
        // A step of an API request (`$erase`) carries the request's id,
        // which links it to the request's own record naming the user.
        let (client, request_id) = match crate::base::request::request_id() {
            Some(r) => ("phylax-server", r),
            None => ("phylax-cli", "cli".to_owned()),
        };
        let facts = AuditFacts {
            id: crate::audit::log::new_event_id(),
            recorded_ms: crate::base::clock::now_ms(),
            kind: EventKind::Security(what),
            action,
            outcome: Outcome::Success,
            outcome_desc: Some(detail),
            user: None,
            client: Some(client.into()),
            ip: None,
            token_id: None,
            request_id,
            purpose: None,
            patients,
            resources: Vec::new(),
            query_params: Vec::new(),
            query_type: None,
            token_family: None,
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
            query_type: None,
            token_family: None,
            observer: self.origin.clone(),
        };
        self.record(&facts).await
    }
}
