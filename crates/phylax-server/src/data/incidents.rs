//! The breach register (GDPR Art. 33(5); HIPAA §164.308(a)(6)): security
//! incidents as append-only lists of steps (opened, notes, alerts that
//! joined, scopes, containments, reports, closed), each sealed with the
//! tenant data key and bound to its incident, kind and time.
//!
//! Titles, notes and scopes are free text or patient lists: they are
//! sealed (never in the audit log, logs or metrics; `Debug` shows the
//! kind of a step only). An incident is the fold of its steps; nothing is
//! ever rewritten (the store's triggers refuse it), so the register keeps
//! what was known and done, and when (docs/INCIDENT_RESPONSE.md).

use crate::data::keyring::KeyRing;
use phylax_store::{IncidentEventRow, IncidentStore, MetaStore, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// Errors of the register.
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("no incident {0}")]
    NotFound(String),
    #[error("incident {0} is closed")]
    Closed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the register could not be read or written: {0}")]
    Unavailable(String),
    #[error("incident step {0} fails its integrity check (a step was changed, moved or deleted)")]
    Integrity(i64),
    /// Another writer took the step number (retried inside `append`).
    #[error("the step number was taken")]
    Taken,
}

impl From<StoreError> for IncidentError {
    fn from(e: StoreError) -> Self {
        IncidentError::Unavailable(e.to_string())
    }
}

/// An incident's id: `inc-YYYYMMDD-` and six hex digits (typed, so a
/// command line or a config value is checked once).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IncidentId(String);

impl IncidentId {
    /// A new id for an incident opened at `now_ms`.
    pub fn new(now_ms: i64) -> IncidentId {
        let day = chrono::DateTime::from_timestamp_millis(now_ms)
            .unwrap_or_default()
            .format("%Y%m%d");
        let r = uuid::Uuid::new_v4().simple().to_string();
        IncidentId(format!("inc-{day}-{}", &r[..6]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for IncidentId {
    type Err = IncidentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = b.len() == 19
            && s.starts_with("inc-")
            && b[4..12].iter().all(u8::is_ascii_digit)
            && b[12] == b'-'
            && b[13..]
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        if ok {
            Ok(IncidentId(s.to_owned()))
        } else {
            Err(IncidentError::Invalid(
                "an incident id looks like inc-20261207-3fa2c1".into(),
            ))
        }
    }
}

impl TryFrom<String> for IncidentId {
    type Error = IncidentError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IncidentId> for String {
    fn from(i: IncidentId) -> String {
        i.0
    }
}

impl std::fmt::Display for IncidentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How bad an incident is, as the security officer judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Moderate,
    High,
    Critical,
}

impl std::str::FromStr for Severity {
    type Err = IncidentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "low" => Severity::Low,
            "moderate" => Severity::Moderate,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => {
                return Err(IncidentError::Invalid(
                    "severity: one of low, moderate, high, critical".into(),
                ))
            }
        })
    }
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Moderate => "moderate",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// Longest title or note accepted.
pub const MAX_TEXT: usize = 4000;

/// One step of an incident (sealed).
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    Opened {
        title: String,
        severity: Severity,
        /// When the organisation became aware (ms): the legal clocks
        /// (GDPR's 72 hours, HIPAA's 60 days) run from here.
        discovered: i64,
        by: String,
    },
    Note {
        text: String,
        by: String,
    },
    /// A detector alert that opened or joined the incident.
    Alert {
        rule: String,
        key: String,
        detail: String,
    },
    /// A scope computed from the audit log (the whole result, which the
    /// report and letters use later).
    Scoped {
        by: String,
        scope: Value,
    },
    /// What containment did.
    Contained {
        by: String,
        actions: Vec<String>,
    },
    /// A notification report was made (and letters, if asked).
    Reported {
        by: String,
        jurisdictions: Vec<String>,
        individuals: u64,
        letters: u64,
    },
    Closed {
        by: String,
        resolution: String,
    },
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Titles, notes and scopes may name patients: the kind only.
        f.write_str(self.kind())
    }
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Opened { .. } => "opened",
            Step::Note { .. } => "note",
            Step::Alert { .. } => "alert",
            Step::Scoped { .. } => "scoped",
            Step::Contained { .. } => "contained",
            Step::Reported { .. } => "reported",
            Step::Closed { .. } => "closed",
        }
    }
}

/// An incident: the fold of its steps.
#[derive(Clone, Serialize)]
pub struct Incident {
    pub id: IncidentId,
    pub title: String,
    pub severity: Severity,
    /// When it was opened (ms).
    pub opened: i64,
    pub discovered: i64,
    pub closed: Option<i64>,
    /// Every step, oldest first: (time in ms, step).
    pub steps: Vec<(i64, Step)>,
    /// The chain's end: the next step binds this hash of the last one.
    #[serde(skip)]
    last_hash: [u8; 32],
}

impl std::fmt::Debug for Incident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incident")
            .field("id", &self.id)
            .field("severity", &self.severity)
            .field("steps", &self.steps.len())
            .finish_non_exhaustive()
    }
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.closed.is_none()
    }

    /// The number of the newest step (0: only the opening).
    pub fn last_step(&self) -> u64 {
        self.steps.len().saturating_sub(1) as u64
    }

    /// The newest scope recorded, if any.
    pub fn latest_scope(&self) -> Option<&Value> {
        self.steps.iter().rev().find_map(|(_, s)| match s {
            Step::Scoped { scope, .. } => Some(scope),
            _ => None,
        })
    }
}

/// A step's seal binds its incident, number, kind, time and the hash of
/// the step before it: a step deleted from the middle, moved, renumbered
/// or swapped breaks the chain from there on.
fn aad(incident: &str, step: i64, kind: &str, at: i64, prev: &[u8; 32]) -> Vec<u8> {
    format!(
        "phylax-incident/2|{incident}|{step}|{kind}|{at}|{}",
        hex::encode(prev)
    )
    .into_bytes()
}

fn chain_hash(sealed: &[u8]) -> [u8; 32] {
    phylax_audit::merkle::leaf_hash(sealed)
}

/// The register over its store.
#[derive(Debug, Clone)]
pub struct Incidents {
    store: Arc<dyn IncidentStore>,
    /// Incident drills' results (instance metadata, written once each).
    meta: Arc<dyn MetaStore>,
    keys: Arc<KeyRing>,
}

impl Incidents {
    pub fn new(store: phylax_store::DynStore, keys: Arc<KeyRing>) -> Incidents {
        Incidents {
            meta: store.clone(),
            store,
            keys,
        }
    }

    /// Record an incident drill's result (JSON, no PHI) under `key`.
    pub async fn record_drill(&self, key: &str, result: &[u8]) -> Result<(), IncidentError> {
        self.meta.put_meta_if_absent(key, result).await?;
        Ok(())
    }

    /// Every recorded drill result, oldest first.
    pub async fn drills(&self, prefix: &str) -> Result<Vec<Value>, IncidentError> {
        let mut rows = self.meta.meta_with_prefix(prefix).await?;
        rows.sort();
        Ok(rows
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Open an incident; returns it.
    pub async fn open(
        &self,
        title: &str,
        severity: Severity,
        discovered: i64,
        by: &str,
        now: i64,
    ) -> Result<Incident, IncidentError> {
        let title = text(title, "the title")?;
        if discovered > now + 60_000 {
            return Err(IncidentError::Invalid(
                "the discovery time is in the future".into(),
            ));
        }
        let id = IncidentId::new(now);
        let step = Step::Opened {
            title,
            severity,
            discovered,
            by: by.to_owned(),
        };
        self.append_raw(&id, 0, &[0; 32], step, now).await?;
        self.get(&id).await
    }

    /// Add a step to an open incident (a closed one takes none). Two
    /// writers at once (the CLI and a node's detector) each get a number
    /// of their own: the loser reads the chain again and goes after.
    pub async fn append(
        &self,
        id: &IncidentId,
        step: Step,
        now: i64,
    ) -> Result<Incident, IncidentError> {
        if let Step::Note { text: t, .. } | Step::Closed { resolution: t, .. } = &step {
            text(t, "the text")?;
        }
        for _ in 0..8 {
            let inc = self.get(id).await?;
            if !inc.is_open() {
                return Err(IncidentError::Closed(id.to_string()));
            }
            let n = inc.last_step() as i64 + 1;
            match self
                .append_raw(id, n, &inc.last_hash, step.clone(), now)
                .await
            {
                Err(IncidentError::Taken) => continue,
                r => r?,
            }
            return self.get(id).await;
        }
        Err(IncidentError::Unavailable(
            "the incident kept changing while a step was added".into(),
        ))
    }

    async fn append_raw(
        &self,
        id: &IncidentId,
        n: i64,
        prev: &[u8; 32],
        step: Step,
        at: i64,
    ) -> Result<(), IncidentError> {
        let key = self
            .keys
            .for_write("tenant")
            .await
            .map_err(|e| IncidentError::Unavailable(e.to_string()))?;
        let plain =
            serde_json::to_vec(&step).map_err(|e| IncidentError::Unavailable(e.to_string()))?;
        let kind = step.kind();
        let sealed = key
            .seal(&aad(id.as_str(), n, kind, at, prev), &plain)
            .map_err(|e| IncidentError::Unavailable(e.to_string()))?;
        match self
            .store
            .incident_append(&IncidentEventRow {
                seq: 0,
                incident: id.to_string(),
                step: n,
                at,
                kind: kind.to_owned(),
                sealed,
            })
            .await
        {
            Err(StoreError::Duplicate) => Err(IncidentError::Taken),
            r => r.map(|_| ()).map_err(IncidentError::from),
        }
    }

    /// One incident.
    pub async fn get(&self, id: &IncidentId) -> Result<Incident, IncidentError> {
        let rows = self.store.incident_events(Some(id.as_str())).await?;
        let mut all = self.fold(rows).await?;
        all.pop()
            .ok_or_else(|| IncidentError::NotFound(id.to_string()))
    }

    /// Every incident, oldest first: the breach register.
    pub async fn list(&self) -> Result<Vec<Incident>, IncidentError> {
        let rows = self.store.incident_events(None).await?;
        self.fold(rows).await
    }

    async fn fold(&self, rows: Vec<IncidentEventRow>) -> Result<Vec<Incident>, IncidentError> {
        if rows.is_empty() {
            // (No key to ask for before the first step sealed one.)
            return Ok(Vec::new());
        }
        let key = self
            .keys
            .for_read("tenant")
            .await
            .map_err(|e| IncidentError::Unavailable(e.to_string()))?;
        let mut out: Vec<Incident> = Vec::new();
        let mut at: std::collections::HashMap<String, usize> = Default::default();
        for r in rows {
            let bad = || IncidentError::Integrity(r.seq);
            // Rows come by incident and step number: each must continue
            // its incident's chain.
            let (i, prev) = match at.get(&r.incident) {
                Some(&i) => (Some(i), out[i].last_hash),
                None => (None, [0; 32]),
            };
            let expected = i.map_or(0, |i| out[i].steps.len() as i64);
            if r.step != expected {
                return Err(bad());
            }
            let plain = key
                .open(&aad(&r.incident, r.step, &r.kind, r.at, &prev), &r.sealed)
                .map_err(|_| bad())?;
            let step: Step = serde_json::from_slice(&plain).map_err(|_| bad())?;
            if step.kind() != r.kind {
                return Err(bad());
            }
            let hash = chain_hash(&r.sealed);
            match (i, &step) {
                (
                    None,
                    Step::Opened {
                        title,
                        severity,
                        discovered,
                        ..
                    },
                ) => {
                    let id: IncidentId = r.incident.parse().map_err(|_| bad())?;
                    at.insert(r.incident.clone(), out.len());
                    out.push(Incident {
                        id,
                        title: title.clone(),
                        severity: *severity,
                        opened: r.at,
                        discovered: *discovered,
                        closed: None,
                        steps: vec![(r.at, step)],
                        last_hash: hash,
                    });
                }
                // A second opening, or a step after closing, was not
                // written by this register.
                (Some(i), s) if !matches!(s, Step::Opened { .. }) && out[i].is_open() => {
                    if let Step::Closed { .. } = s {
                        out[i].closed = Some(r.at);
                    }
                    out[i].steps.push((r.at, step));
                    out[i].last_hash = hash;
                }
                _ => return Err(bad()),
            }
        }
        // Oldest incident first.
        out.sort_by_key(|i| i.opened);
        Ok(out)
    }
}

/// Free text, trimmed, present and bounded.
fn text(t: &str, what: &str) -> Result<String, IncidentError> {
    let t = t.trim();
    if t.is_empty() {
        return Err(IncidentError::Invalid(format!("{what} is empty")));
    }
    if t.len() > MAX_TEXT {
        return Err(IncidentError::Invalid(format!(
            "{what} is longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_their_shape() {
        let id = IncidentId::new(1_796_601_600_000);
        assert!(id.as_str().starts_with("inc-20261207-"), "{id}");
        assert_eq!(id.as_str().parse::<IncidentId>().ok(), Some(id.clone()));
        for bad in [
            "",
            "inc-2026120-3fa2c1",
            "inc-20261207-3FA2C1",
            "inc-20261207-3fa2c",
            "inc-20261207_3fa2c1",
            "../20261207-3fa2c1",
        ] {
            assert!(bad.parse::<IncidentId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn steps_do_not_show_their_text() {
        let s = Step::Note {
            text: "Jane Doe's chart".into(),
            by: "uid:0".into(),
        };
        assert_eq!(format!("{s:?}"), "note");
    }
}
