//! Sealing: records get tree positions in arrival order and a signed
//! checkpoint covers them; the sealer runs every few seconds.

use super::*;

impl AuditLog {
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
        self.clean_queue().await?;
        let pending = self.store.audit_unsealed(i64::MIN, SEAL_MAX).await?;
        if pending.is_empty() {
            return Ok(None);
        }
        let f = self.current_tree(guard.take()).await?;
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
        let (cp, note, sealed_ok) = self.commit_seal(first, ids, &next, &pending).await?;
        if sealed_ok {
            *guard = Some(next);
            drop(guard);
            self.publish(&note).await;
            Ok(Some(cp))
        } else {
            // Another node sealed first; re-read next time.
            *guard = Some(f);
            Ok(None)
        }
    }

    /// Queue entries naming no record, or one already sealed, can only
    /// have been put there by hand; they would stall sealing. Removed,
    /// with an `audit-tamper` alert.
    async fn clean_queue(&self) -> Result<(), AuditError> {
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
        Ok(())
    }

    /// The tree as stored now, checked against the newest signed
    /// checkpoint: from this node's edge (`known`), or, on a starting
    /// node, the newest checkpoint's stored edge, caught up with records
    /// other nodes sealed.
    async fn current_tree(&self, known: Option<Frontier>) -> Result<Frontier, AuditError> {
        // Read together, so that another node's seal cannot fall between
        // them and look like tampering.
        let (latest, sealed) = self.store.latest_checkpoint_and_tree_size().await?;
        let latest = match latest {
            Some(row) => {
                let cp =
                    phylax_audit::checkpoint::open_signed_any(&row.note, &self.verifier_keys())
                        .map_err(|e| AuditError::Integrity(format!("latest checkpoint: {e}")))?;
                Some((cp, row.frontier))
            }
            None => None,
        };
        let mut f = match known {
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
        Ok(f)
    }

    /// Sign a checkpoint over `next` and store it with the records' tree
    /// positions (from `first`) in one transaction. Returns the checkpoint,
    /// its signed note, and whether this node's seal won (false: another
    /// node sealed first).
    async fn commit_seal(
        &self,
        first: u64,
        ids: Vec<i64>,
        next: &Frontier,
        pending: &[AuditRow],
    ) -> Result<(Checkpoint, String, bool), AuditError> {
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size: next.size(),
            root: next.root(),
            time_ms: crate::base::clock::now_ms(),
        };
        let (signer, verifier) = self.signer();
        let note = cp.sign(&verifier, |m| signer.sign(m));
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
            for r in pending {
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
        Ok((cp, note, sealed_ok))
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
    async fn publish(&self, note: &str) {
        let Some(path) = &self.checkpoint_file else {
            return;
        };
        // Only over a checkpoint this log continues: one it signed itself
        // (the same root at that size in its own stored checkpoints). Not
        // over one of a larger tree, one of another fork of the log (a copy
        // restored from an older backup, grown past it), or one it cannot
        // read with its keys: each would erase the evidence that the file
        // keeps. That is an incident, not something to fix quietly.
        if let Ok(old) = std::fs::read_to_string(path) {
            if let Err(why) = self.continues(&old, note).await {
                tracing::error!(event = "audit.checkpoint_rollback", path = %path.display(), why = %why,
                    "the outside checkpoint is not one this log continues (a restore from an older backup?); the file is left as it is");
                return;
            }
        }
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, note).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::error!(event = "audit.checkpoint_copy_failed", path = %path.display(), error = %e,
                "could not write the external checkpoint copy");
        }
    }

    /// Whether the checkpoint `new` continues the one in `old` (text of
    /// the outside file): same origin and keys, not smaller, and `old` is
    /// this log's own checkpoint at its size.
    async fn continues(&self, old: &str, new: &str) -> Result<(), String> {
        use phylax_audit::checkpoint::open_signed_any;
        if old.trim().is_empty() {
            return Ok(());
        }
        let keys = self.verifier_keys();
        let old = open_signed_any(old, &keys)
            .map_err(|e| format!("not signed by this log's keys ({e})"))?;
        let new = open_signed_any(new, &keys).map_err(|e| e.to_string())?;
        if old.size > new.size {
            return Err(format!(
                "it is of a larger tree ({} > {})",
                old.size, new.size
            ));
        }
        if old.size == 0 {
            return Ok(());
        }
        let ours = self
            .store
            .checkpoints(old.size - 1, 1)
            .await
            .map_err(|e| e.to_string())?;
        let same = ours.first().filter(|c| c.size == old.size).and_then(|c| {
            open_signed_any(&c.note, &keys)
                .ok()
                .map(|cp| cp.root == old.root)
        });
        match same {
            Some(true) => Ok(()),
            _ => Err(format!(
                "this log's tree at size {} is not the one it records (another fork of the log)",
                old.size
            )),
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
