//! Search parameter numbers.
//!
//! Index entries name their parameter by a small integer from
//! `search_params` (one row per resource type and parameter code) rather
//! than by the type and code as text, which made up a third of every entry
//! and of both of its indexes. A number, once assigned, never changes, so
//! each store keeps the numbers it has seen in memory.
//!
//! Invariant: a number enters this cache only after the row that assigns
//! it has committed (see each backend's `intern`). A number handed out in
//! a transaction that later rolled back could otherwise be reused for a
//! different parameter while entries still carried the old meaning.

use crate::{IndexRow, Result, StoreError};
use parking_lot::RwLock;
use std::collections::HashMap;

/// What a search uses for a parameter that has never been registered: no
/// entry carries it, so the condition matches nothing (and `:missing` /
/// `:not` match everything), exactly as for a parameter without values.
pub(crate) const UNKNOWN: i32 = -1;

#[derive(Debug, Default)]
pub(crate) struct ParamIds {
    /// type → parameter code → number.
    known: RwLock<HashMap<String, HashMap<String, i32>>>,
}

impl ParamIds {
    pub(crate) fn get(&self, rtype: &str, param: &str) -> Option<i32> {
        self.known.read().get(rtype)?.get(param).copied()
    }

    /// Record a committed number.
    pub(crate) fn insert(&self, rtype: &str, param: &str, pid: i32) {
        self.known
            .write()
            .entry(rtype.to_owned())
            .or_default()
            .insert(param.to_owned(), pid);
    }

    /// The (type, parameter) pairs among these versions' entries that have
    /// no number yet, without repeats.
    pub(crate) fn missing<'a>(
        &self,
        versions: impl IntoIterator<Item = (&'a str, &'a [IndexRow])>,
    ) -> Vec<(String, String)> {
        let known = self.known.read();
        let mut out: Vec<(String, String)> = Vec::new();
        for (rtype, rows) in versions {
            let have = known.get(rtype);
            for r in rows {
                if have.is_some_and(|m| m.contains_key(&r.param)) {
                    continue;
                }
                if !out.iter().any(|(t, p)| t == rtype && *p == r.param) {
                    out.push((rtype.to_owned(), r.param.clone()));
                }
            }
        }
        out
    }

    /// The numbers of a version's entries, in order. Every parameter must
    /// have been interned first.
    pub(crate) fn pids(&self, rtype: &str, rows: &[IndexRow]) -> Result<Vec<i32>> {
        let known = self.known.read();
        let have = known.get(rtype);
        rows.iter()
            .map(|r| {
                have.and_then(|m| m.get(&r.param).copied()).ok_or_else(|| {
                    StoreError::Backend(format!(
                        "search parameter {rtype}.{} has no number",
                        r.param
                    ))
                })
            })
            .collect()
    }
}

/// Every parameter code a query names (its own type's), without repeats.
pub(crate) fn query_params(q: &crate::query::SearchQuery) -> Vec<String> {
    use crate::query::Cond;
    let mut out: Vec<String> = Vec::new();
    for c in q.and.iter().flatten() {
        let p = match c {
            Cond::Hash { param, .. }
            | Cond::NotHash { param, .. }
            | Cond::Missing { param, .. }
            | Cond::Range { param, .. }
            | Cond::Num { param, .. } => param,
            Cond::Ids(_) | Cond::NotIds(_) | Cond::LastUpdated { .. } | Cond::Never => continue,
        };
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(p: &str) -> IndexRow {
        IndexRow {
            param: p.into(),
            hash: None,
            lo: None,
            hi: None,
            num: None,
        }
    }

    #[test]
    fn missing_lists_each_unknown_pair_once_and_pids_need_every_number() {
        let ids = ParamIds::default();
        ids.insert("Patient", "name", 1);
        let rows = [row("name"), row("family"), row("family")];
        let obs = [row("name")];
        let missing = ids.missing([("Patient", &rows[..]), ("Observation", &obs[..])]);
        assert_eq!(
            missing,
            vec![
                ("Patient".to_owned(), "family".to_owned()),
                ("Observation".to_owned(), "name".to_owned())
            ]
        );
        assert!(ids.pids("Patient", &rows).is_err());
        ids.insert("Patient", "family", 2);
        assert_eq!(ids.pids("Patient", &rows).unwrap(), vec![1, 2, 2]);
        assert_eq!(ids.get("Observation", "name"), None);
    }
}
