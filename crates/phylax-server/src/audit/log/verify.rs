//! Verification (`phylax audit verify`): every record, tree position,
//! checkpoint and per-patient entry checked against each other.

use super::*;

/// Who else reads each record as verification opens it (an incident's
/// scope).
pub type Visitor<'v> = dyn FnMut(&AuditRow, &Value) + Send + 'v;

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
    /// it, as [`AuditLog::prune`] takes its time. Every problem is
    /// collected, not only the first: an operator on the day of a breach
    /// needs the whole picture.
    pub async fn verify_at(
        &self,
        external: &[String],
        event: Option<&str>,
        now: i64,
    ) -> Result<VerifyReport, AuditError> {
        self.verify_inner(external, event, now, None).await
    }

    /// [`AuditLog::verify`], handing every record that opens to `visit`
    /// as it is checked (tree order, then those awaiting a checkpoint):
    /// one pass over the log both verifies it and feeds a reader such as
    /// an incident's scope. What `visit` saw may be used only when this
    /// returns `Ok` (a tampered log is an `Err`, whatever was visited).
    pub async fn verify_visiting(
        &self,
        external: &[String],
        visit: &mut Visitor<'_>,
    ) -> Result<VerifyReport, AuditError> {
        self.verify_inner(external, None, crate::base::clock::now_ms(), Some(visit))
            .await
    }

    async fn verify_inner<'v>(
        &self,
        external: &[String],
        event: Option<&str>,
        now: i64,
        visit: Option<&'v mut Visitor<'v>>,
    ) -> Result<VerifyReport, AuditError> {
        self.flush().await?;
        let (records, sealed) = self.store.audit_counts().await?;
        let mut v = Verification {
            log: self,
            problems: Vec::new(),
            report: VerifyReport {
                records,
                sealed,
                ..Default::default()
            },
            expected: PatientDigest::default(),
            pruned_ids: Default::default(),
            seen: Default::default(),
            newest_read: i64::MIN,
            pruned_at: Vec::new(),
            leaves: Vec::with_capacity(sealed as usize),
            visit,
        };
        v.read_tree().await?;
        v.read_pending().await?;
        v.check_checkpoints(now).await?;
        v.check_external(external);
        v.check_patient_entries().await?;
        let Verification {
            mut problems,
            mut report,
            leaves,
            ..
        } = v;
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

/// A verification in progress: what was read so far and every problem
/// found.
struct Verification<'a, 'v> {
    log: &'a AuditLog,
    problems: Vec<String>,
    report: VerifyReport,
    /// The per-patient entries the readable records call for, as an
    /// order-free digest (a sum of hashes of (patient key, record id)).
    expected: PatientDigest,
    pruned_ids: std::collections::HashSet<i64>,
    /// Every row met, in the tree or awaiting it: a record sealed while
    /// the pass ran is met twice and read once.
    seen: std::collections::HashSet<i64>,
    /// The newest record read, to tell the entries of records written
    /// while the pass ran from entries naming records that do not exist.
    newest_read: i64,
    /// Tree positions of pruned records.
    pruned_at: Vec<u64>,
    leaves: Vec<Hash>,
    /// Who else reads each record as it opens.
    visit: Option<&'v mut Visitor<'v>>,
}

impl Verification<'_, '_> {
    /// Every sealed record in tree order: contiguous positions, each opens
    /// (or was pruned) and has a leaf hash.
    async fn read_tree(&mut self) -> Result<(), AuditError> {
        let sealed = self.report.sealed;
        loop {
            let rows = self
                .log
                .store
                .audit_by_index(self.leaves.len() as u64, 10_000)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                if !self.read_leaf(r) {
                    return Ok(());
                }
            }
        }
        // More than at the start: sealed while the pass ran (a serving
        // node goes on); fewer: records were taken out.
        if (self.leaves.len() as u64) < sealed {
            self.problems.push(format!(
                "{} records in order, but positions reach {sealed}",
                self.leaves.len()
            ));
        }
        Ok(())
    }

    /// One sealed record; false at a gap (the tree cannot be read on).
    fn read_leaf(&mut self, r: AuditRow) -> bool {
        let at = self.leaves.len();
        // Read already while it awaited its checkpoint.
        let first = self.seen.insert(r.id);
        if r.leaf_index != Some(at as u64) {
            self.problems.push(format!(
                "tree position {at} is missing (a record was deleted or moved)"
            ));
            return false;
        }
        if r.sealed.is_empty() {
            // Pruned: only its leaf hash is left, which the checkpoints
            // still cover; its age is checked against the signed time of
            // the checkpoint that first covers it (the `recorded` column is
            // not authenticated).
            self.pruned_ids.insert(r.id);
            self.pruned_at.push(at as u64);
            self.report.pruned += 1;
        } else if first {
            match self.log.open_row(&r) {
                Ok(v) => self.read(&r, &v),
                Err(_) => self
                    .problems
                    .push(format!("record at position {at} was altered or forged")),
            }
        }
        match to_hash(&r.leaf_hash) {
            Some(h) => {
                self.leaves.push(h);
                true
            }
            None => {
                self.problems
                    .push(format!("record at position {at} has no valid leaf hash"));
                false
            }
        }
    }

    /// A record that opened: its per-patient entries are expected, and
    /// the visitor sees it.
    fn read(&mut self, r: &AuditRow, v: &Value) {
        self.expected.add_record(self.log, r.id, v);
        self.newest_read = self.newest_read.max(r.id);
        if let Some(f) = self.visit.as_mut() {
            f(r, v);
        }
    }

    /// Records awaiting their checkpoint count too (their entries are
    /// written with them); one that does not open is a forgery. Queue
    /// entries naming no record are the sealer's to remove (it does, with
    /// an alert); here only records outside both count.
    async fn read_pending(&mut self) -> Result<(), AuditError> {
        let mut last_pending = i64::MIN;
        loop {
            let rows = self.log.store.audit_unsealed(last_pending, 10_000).await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if !self.seen.insert(r.id) {
                    continue;
                }
                match self.log.open_row(r) {
                    Ok(v) => self.read(r, &v),
                    Err(_) => self.problems.push(format!(
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
        // Records sealed meanwhile: read them from the tree too.
        self.read_tree().await?;
        // (Records written while the pass ran are met but were not
        // counted at the start: on a busy node they can hide as many rows
        // put in by hand; a verification of a quiet log counts exactly.)
        let outside = self.report.records.saturating_sub(self.seen.len() as u64);
        if outside > 0 {
            self.problems.push(format!(
                "{outside} record(s) are neither in the tree nor awaiting it (rows put in by hand and refused by the sealer)"
            ));
        }
        Ok(())
    }

    /// Every stored checkpoint: signed by the log's key, matching the tree
    /// at its size, and (for pruned records it is the first to cover)
    /// signed before their retention ended.
    async fn check_checkpoints(&mut self, now: i64) -> Result<(), AuditError> {
        use phylax_audit::checkpoint::open_signed_any;
        let n = self.leaves.len() as u64;
        let mut f = Frontier::new();
        let mut after = 0;
        let mut pruned_next = 0usize;
        'cps: loop {
            let cps = self.log.store.checkpoints(after, 1000).await?;
            if cps.is_empty() {
                break;
            }
            for c in cps {
                after = c.size;
                let cp = match open_signed_any(&c.note, &self.log.verifier_keys()) {
                    Ok(cp) => cp,
                    Err(e) => {
                        self.problems.push(format!("checkpoint {}: {e}", c.size));
                        continue;
                    }
                };
                if cp.size != c.size {
                    self.problems
                        .push(format!("checkpoint row {} holds size {}", c.size, cp.size));
                    continue;
                }
                if cp.size > n {
                    self.problems.push(format!(
                        "the log was truncated: checkpoint {} signed {} records, {n} remain",
                        cp.size, cp.size
                    ));
                    break 'cps;
                }
                while f.size() < cp.size {
                    f.push(self.leaves[f.size() as usize]);
                }
                if f.root() != cp.root {
                    self.problems.push(format!(
                        "the records no longer match checkpoint {} (edited, inserted or reordered)",
                        cp.size
                    ));
                }
                while pruned_next < self.pruned_at.len() && self.pruned_at[pruned_next] < cp.size {
                    if cp.time_ms - PRUNE_SLACK_MS > now - self.log.retention_ms {
                        self.problems.push(format!(
                            "record at position {} was pruned before its retention ended (its first checkpoint was signed {})",
                            self.pruned_at[pruned_next],
                            phylax_audit::event::instant(cp.time_ms)
                        ));
                    }
                    pruned_next += 1;
                }
                self.report.checkpoints += 1;
                self.report.latest = Some(cp);
            }
        }
        if n > 0 && self.report.latest.as_ref().map(|c| c.size) != Some(n) {
            self.problems.push(format!(
                "{n} records are in the tree but no checkpoint covers them all"
            ));
        }
        Ok(())
    }

    /// Outside checkpoints (signed notes saved earlier) must be consistent
    /// with today's tree.
    fn check_external(&mut self, external: &[String]) {
        use phylax_audit::checkpoint::open_signed_any;
        use phylax_audit::merkle;
        let n = self.leaves.len() as u64;
        for note in external {
            let cp = match open_signed_any(note, &self.log.verifier_keys()) {
                Ok(cp) => cp,
                Err(e) => {
                    self.problems.push(format!("outside checkpoint: {e}"));
                    continue;
                }
            };
            if cp.size > n {
                self.problems.push(format!(
                    "the log was truncated: an outside checkpoint signed {} records, {n} remain",
                    cp.size
                ));
                continue;
            }
            if cp.size > 0 {
                let leaves = &self.leaves;
                let consistent = merkle::consistency_proof(cp.size as usize, leaves)
                    .ok()
                    .map(|p| p.iter().map(|h| h.to_vec()).collect::<Vec<Vec<u8>>>())
                    .is_some_and(|proof| {
                        merkle::verify_consistency(
                            cp.size,
                            n,
                            &proof,
                            &cp.root,
                            &merkle::root(leaves),
                        )
                        .is_ok()
                    });
                if !consistent {
                    self.problems.push(format!(
                        "the log is not consistent with outside checkpoint {}",
                        cp.size
                    ));
                    continue;
                }
            }
            self.report.external += 1;
        }
    }

    /// The per-patient entries, rebuilt from the records, must be the ones
    /// stored: deleting them (to empty a patient's access log) or adding
    /// some is found here.
    async fn check_patient_entries(&mut self) -> Result<(), AuditError> {
        // A serving node goes on writing while the log is verified (an
        // incident's scope runs on a live instance): entries of records
        // newer than every record read belong to the next pass. Entries
        // naming a record at or below that edge that was not read are
        // counted, so entries pointing at records that do not exist are
        // still found.
        // (Nothing read: every entry counts.)
        let edge = if self.newest_read == i64::MIN {
            i64::MAX
        } else {
            self.newest_read
        };
        let mut actual = PatientDigest::default();
        let mut cursor = None;
        loop {
            let rows = self.log.store.audit_patient_entries(cursor, 50_000).await?;
            let Some(last) = rows.last().copied() else {
                break;
            };
            for (key, audit_id) in &rows {
                let newer = *audit_id > edge;
                if !self.pruned_ids.contains(audit_id) && !newer {
                    actual.add(key, *audit_id);
                }
            }
            cursor = Some(last);
        }
        if actual != self.expected {
            self.problems.push(format!(
                "the per-patient index does not match the records ({} entries stored for readable records, {} expected): entries were deleted or added, so patients' access logs are incomplete",
                actual.count, self.expected.count
            ));
        }
        Ok(())
    }
}

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
