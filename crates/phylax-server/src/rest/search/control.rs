//! Result control: `_sort`, `_summary`, `_elements`, `_total`, parsed
//! once and applied to a page.

use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::wire::Query;
use phylax_fhir::subset::Summary;
use phylax_fhir::{Issue, IssueCode, ResourceType};
use serde_json::Value;

/// Most matches a search sorted by anything but `-_lastUpdated` may have.
pub(super) const MAX_SORTED: u32 = 2000;

/// `_summary`, `_elements`, `_sort` and `_total`, parsed.
pub(crate) struct ResultControl {
    pub(super) summary: Option<Summary>,
    pub(super) elements: Option<Vec<String>>,
    /// (parameter code, descending); empty: natural order (newest first).
    pub(super) sort: Vec<(String, bool)>,
    pub(super) total: bool,
}

impl ResultControl {
    pub(crate) fn parse(rtype: &ResourceType, q: &Query) -> Result<ResultControl, Failure> {
        let summary = match q.get("_summary") {
            None => None,
            Some(s) => Some(Summary::parse(s).ok_or_else(|| {
                Failure::bad_request("_summary must be true, text, data, count or false")
            })?),
        };
        let elements = match q.get("_elements") {
            None => None,
            Some(e) => {
                let names: Vec<String> = e.split(',').map(|n| n.trim().to_owned()).collect();
                if names.iter().any(|n| {
                    n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric())
                }) {
                    return Err(Failure::bad_request(
                        "_elements takes a comma-separated list of element names",
                    ));
                }
                Some(names)
            }
        };
        if summary.is_some() && elements.is_some() {
            return Err(Failure::bad_request(
                "_summary and _elements cannot be combined",
            ));
        }
        let mut sort = Vec::new();
        for spec in q.0.iter().filter(|(k, _)| k == "_sort").map(|(_, v)| v) {
            for part in spec.split(',') {
                let (code, desc) = match part.strip_prefix('-') {
                    Some(c) => (c, true),
                    None => (part, false),
                };
                let known = matches!(code, "_id" | "_lastUpdated")
                    || phylax_fhir::search::params(rtype)
                        .get(code)
                        .is_some_and(|p| p.indexable());
                if !known {
                    return Err(Failure::BadRequest(vec![Issue::error(
                        IssueCode::NotSupported,
                        format!(
                            "cannot sort by {}: not a search parameter of {rtype}",
                            code.chars().take(64).collect::<String>()
                        ),
                    )]));
                }
                sort.push((code.to_owned(), desc));
            }
        }
        if sort.len() > 8 {
            return Err(Failure::bad_request("_sort takes at most 8 keys"));
        }
        // Newest first is the natural order: no in-memory sort needed.
        if sort == [("_lastUpdated".to_owned(), true)] {
            sort.clear();
        }
        let total = match q.get("_total") {
            None | Some("accurate") | Some("estimate") => true,
            Some("none") => false,
            Some(_) => {
                return Err(Failure::bad_request(
                    "_total must be none, estimate or accurate",
                ))
            }
        };
        Ok(ResultControl {
            summary,
            elements,
            sort,
            total,
        })
    }

    /// Order rows by the sort keys; ties (and resources without a value,
    /// which go last) keep the natural order.
    pub(super) fn sort_rows(
        &self,
        rtype: &ResourceType,
        rows: Vec<ResourceVersion>,
    ) -> Vec<ResourceVersion> {
        use phylax_fhir::search::{sort_key, SortKey};
        use std::cmp::Ordering;
        let keys = |v: &ResourceVersion| -> Vec<Option<SortKey>> {
            self.sort
                .iter()
                .map(|(code, desc)| match code.as_str() {
                    "_id" => Some(SortKey::Text(v.id.to_string())),
                    "_lastUpdated" => Some(SortKey::Num(v.last_updated as f64)),
                    c => v
                        .body
                        .as_ref()
                        .and_then(|b| sort_key(rtype, b.json(), c, *desc)),
                })
                .collect()
        };
        let mut keyed: Vec<(Vec<Option<SortKey>>, ResourceVersion)> =
            rows.into_iter().map(|v| (keys(&v), v)).collect();
        // A stable sort: ties keep the natural order.
        keyed.sort_by(|(a, _), (b, _)| {
            for ((ka, kb), (_, desc)) in a.iter().zip(b).zip(&self.sort) {
                let o = match (ka, kb) {
                    (Some(x), Some(y)) if *desc => x.compare(y).reverse(),
                    (Some(x), Some(y)) => x.compare(y),
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => Ordering::Equal,
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        keyed.into_iter().map(|(_, v)| v).collect()
    }

    /// Whether resources are returned in part.
    pub(crate) fn subsets(&self) -> bool {
        !matches!(self.summary, None | Some(Summary::False)) || self.elements.is_some()
    }

    /// The resource as this search returns it.
    pub(crate) fn apply(&self, v: &Value) -> Value {
        match (&self.summary, &self.elements) {
            (Some(s), _) => phylax_fhir::subset::summary(v, *s),
            (None, Some(e)) => phylax_fhir::subset::elements(v, e),
            (None, None) => v.clone(),
        }
    }

    /// `apply` to a body the response may keep: without `_summary` or
    /// `_elements` it is moved, not copied.
    pub(crate) fn apply_owned(&self, v: Value) -> Value {
        match (&self.summary, &self.elements) {
            (None, None) => v,
            _ => self.apply(&v),
        }
    }
}
