//! Relationship data written before the relationships permission existed,
//! held until an operator approves it.
//!
//! Reach is computed only from relationship versions written by a holder
//! of the relationships permission (docs/ACCESS_CONTROL.md). Versions
//! stored by an earlier release have no such writer on record, so the
//! first start of this release lists every current one
//! ([`crate::access::maintenance`]: care teams, practitioner roles,
//! episodes of care, related persons, groups, consents, `Person` links, and
//! Patients and Encounters with relationship elements) and none of them
//! opens a patient to anyone until an operator approves it (`phylax access
//! held`, `phylax access approve`). A held Consent's deny rules still apply
//! (they only narrow); its delegations do not. A new version written by a
//! holder is not held: the hold is per version.
//!
//! Storage is append-only instance metadata, so nodes agree without a
//! table of its own: the list, written once (`put_meta_if_absent`, the
//! first node wins), and numbered approval entries, each taking the next
//! free slot. Every node rereads new approvals each second (with the
//! consents).

use crate::data::repo::ResourceVersion;
use phylax_store::{MetaStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Why an approval was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("no held version of {0}")]
    NotHeld(String),
    #[error("the holds could not be read or written: {0}")]
    Store(#[from] StoreError),
}

/// The held versions (`Type/id/version`), written once.
const HELD: &str = "relationship_holds_v1";
/// Approval `n` is stored under this prefix and `n`.
const APPROVAL: &str = "relationship_approvals_v1:";

/// One operator approval: every held version, or every held version of
/// the resources named (`Type/id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    All,
    Resources(Vec<String>),
}

/// The versions held now, as every node sees them after its last reload.
#[derive(Debug, Default)]
pub struct Holds {
    state: parking_lot::RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `Type/id/version`.
    held: BTreeSet<String>,
    /// Whether the list has been read (before that, nothing is known to
    /// be held: the list is written before the first request is served).
    loaded: bool,
    /// Approval slots already applied.
    next_approval: u64,
    /// Changes with every change of `held`, so that what was built from
    /// the holds (the consent index, care caches) is rebuilt.
    generation: u64,
}

fn key(rtype: &str, id: &str, version: u64) -> String {
    format!("{rtype}/{id}/{version}")
}

/// The resource (`Type/id`) of a held key (`Type/id/version`).
pub fn resource_of(k: &str) -> &str {
    k.rsplit_once('/').map_or(k, |(r, _)| r)
}

impl Holds {
    /// Is this version held, or older than a held version of the same
    /// resource (written before the rule too)? A holder's later version
    /// is not.
    pub fn held_or_older(&self, v: &ResourceVersion) -> bool {
        let s = self.state.read();
        if s.held.is_empty() {
            return false;
        }
        let prefix = format!("{}/{}/", v.rtype.as_str(), v.id.as_str());
        let mine = v.version.get();
        s.held
            .range(prefix.clone()..)
            .take_while(|k| k.starts_with(&prefix))
            .any(|k| k[prefix.len()..].parse::<u64>().is_ok_and(|n| n >= mine))
    }

    /// Is this version held (it opens no patient to anyone)?
    pub fn is_held(&self, v: &ResourceVersion) -> bool {
        let s = self.state.read();
        !s.held.is_empty()
            && s.held
                .contains(&key(v.rtype.as_str(), v.id.as_str(), v.version.get()))
    }

    /// Whether the list has been read.
    pub fn loaded(&self) -> bool {
        self.state.read().loaded
    }

    /// Counts changes of the held set.
    pub fn generation(&self) -> u64 {
        self.state.read().generation
    }

    /// The held versions, `Type/id/version`, sorted.
    pub fn list(&self) -> Vec<String> {
        self.state.read().held.iter().cloned().collect()
    }

    /// Read the list (once) and the approvals written since the last
    /// reload. A damaged list fails (the caller keeps the holds it has, or
    /// does not start: fail closed); a damaged approval approves nothing.
    pub async fn reload(&self, meta: &dyn MetaStore) -> Result<(), StoreError> {
        let (loaded, first) = {
            let s = self.state.read();
            (s.loaded, s.next_approval)
        };
        let mut next = first;
        let mut held = None;
        if !loaded {
            let Some(raw) = meta.get_meta(HELD).await? else {
                return Ok(());
            };
            let list: Vec<String> = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::Backend(format!("relationship holds: {e}")))?;
            held = Some(list.into_iter().collect::<BTreeSet<_>>());
        }
        let mut approvals: Vec<Approval> = Vec::new();
        while let Some(raw) = meta.get_meta(&format!("{APPROVAL}{next}")).await? {
            // An entry that cannot be read approves nothing (fail closed)
            // and does not stop the approvals after it.
            match serde_json::from_slice::<Approval>(&raw) {
                Ok(a) => approvals.push(a),
                Err(e) => tracing::error!(
                    slot = next,
                    error = %e,
                    "a relationship approval entry is damaged; it approves nothing"
                ),
            }
            next += 1;
        }
        if held.is_none() && next == first {
            return Ok(());
        }
        let mut s = self.state.write();
        if let Some(h) = held {
            if s.loaded {
                // Another task loaded it meanwhile: keep its state.
                return Ok(());
            }
            s.held = h;
            s.loaded = true;
            s.next_approval = 0;
            // The approvals read above start at 0 too.
        } else if s.next_approval != first {
            // Another reload applied some of these meanwhile.
            return Ok(());
        }
        for a in &approvals {
            apply(&mut s.held, a);
        }
        s.next_approval = next;
        s.generation += 1;
        Ok(())
    }
}

fn apply(held: &mut BTreeSet<String>, a: &Approval) {
    match a {
        Approval::All => held.clear(),
        Approval::Resources(rs) => held.retain(|k| !rs.iter().any(|r| r == resource_of(k))),
    }
}

/// Write the list of held versions unless one exists (the first node to
/// start this release decides; later calls change nothing). Returns how
/// many versions the stored list holds.
pub async fn record(
    meta: &dyn MetaStore,
    held: &[(String, String, u64)],
) -> Result<usize, StoreError> {
    let list: Vec<String> = held.iter().map(|(t, i, v)| key(t, i, *v)).collect();
    let body = serde_json::to_vec(&list).map_err(|e| StoreError::Backend(e.to_string()))?;
    let stored = meta.put_meta_if_absent(HELD, &body).await?;
    let stored: Vec<String> = serde_json::from_slice(&stored)
        .map_err(|e| StoreError::Backend(format!("relationship holds: {e}")))?;
    Ok(stored.len())
}

/// Whether the list has been written (the vetting job ran on this instance).
pub async fn recorded(meta: &dyn MetaStore) -> Result<bool, StoreError> {
    Ok(meta.get_meta(HELD).await?.is_some())
}

/// Append an approval in the next free slot. Returns its slot.
pub async fn approve(meta: &dyn MetaStore, a: &Approval) -> Result<u64, StoreError> {
    let body = serde_json::to_vec(a).map_err(|e| StoreError::Backend(e.to_string()))?;
    let mut n = 0u64;
    loop {
        let slot = format!("{APPROVAL}{n}");
        if meta.get_meta(&slot).await?.is_none()
            && meta.put_meta_if_absent(&slot, &body).await? == body
        {
            return Ok(n);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_release_whole_resources_only() {
        let mut held: BTreeSet<String> = [
            "CareTeam/a/1",
            "CareTeam/a/2",
            "CareTeam/ab/1",
            "Patient/a/3",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        apply(&mut held, &Approval::Resources(vec!["CareTeam/a".into()]));
        assert_eq!(
            held.iter().map(String::as_str).collect::<Vec<_>>(),
            ["CareTeam/ab/1", "Patient/a/3"]
        );
        apply(&mut held, &Approval::All);
        assert!(held.is_empty());
    }
}
