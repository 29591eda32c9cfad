//! `phylax incident scope`: exactly which patients and resources one
//! principal (a user, an app, a sign-in session, an address, or everyone)
//! read, searched, wrote, exported or was refused in a window, from the
//! sealed audit log.
//!
//! The log is verified and read in the same pass
//! ([`crate::audit::log::AuditLog::verify_visiting`]): every record opens
//! under its key and matches its leaf, the tree matches every signed
//! checkpoint and every outside one, and only then is the scope returned.
//! A log that does not verify gives no scope (an error naming the
//! problems): a scope from a tampered log would be a false assurance.
//!
//! What a record names (docs/AUDIT.md): every patient whose data a
//! successful interaction returned or wrote (searches with `_include`,
//! `$everything`, batches and transactions included); the resource for
//! single-resource interactions; the type a search searched. A refused
//! or failed request names no patient (its target was client-chosen text
//! and nothing was disclosed): refusals are counted per interaction.

use crate::access::reach::explain_facts;
use crate::audit::log::AuditError;
use crate::data::blocks::canonical;
use crate::state::AppState;
use phylax_audit::event::{instant, GRANT_FAMILY};
use phylax_store::AuditRow;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Whose actions to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// A user (by account id): everything they did, through any app.
    User(String),
    /// An app (OAuth client): what it did for itself and what any user
    /// did through it.
    Client(String),
    /// One sign-in session and its refresh chain (a grant family).
    Family(String),
    /// Every request from this address.
    Ip(IpAddr),
    /// Every principal.
    All,
}

impl Who {
    /// How the scope names it.
    pub fn label(&self) -> String {
        match self {
            Who::User(u) => format!("user {u}"),
            Who::Client(c) => format!("client {c}"),
            Who::Family(f) => format!("token family {f}"),
            Who::Ip(a) => format!("address {a}"),
            Who::All => "all principals".into(),
        }
    }

    /// Does this record's agent list include the principal?
    fn matches(&self, v: &Value) -> bool {
        let agents = v["agent"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let id_is = |a: &Value, system: &str, want: &str| {
            a["who"]["identifier"]["system"] == system && a["who"]["identifier"]["value"] == want
        };
        match self {
            Who::All => true,
            Who::User(u) => agents.iter().any(|a| id_is(a, "urn:phylax:user", u)),
            Who::Client(c) => agents.iter().any(|a| id_is(a, "urn:phylax:client", c)),
            Who::Family(f) => agents.iter().any(|a| {
                a["policy"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p.as_str()
                            .and_then(|p| p.strip_prefix(GRANT_FAMILY))
                            .is_some_and(|p| p == f)
                    })
                })
            }),
            Who::Ip(ip) => agents.iter().any(|a| {
                a["network"]["address"]
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .is_some_and(|x| canonical(x) == canonical(*ip))
            }),
        }
    }
}

/// The window, in ms: `since` inclusive, `until` exclusive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl Window {
    fn contains(&self, t: i64) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }
}

/// What kind of access a record was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Read,
    Search,
    Write,
    Export,
    Other,
    Denied,
    Failed,
}

/// Records per category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub read: u64,
    pub search: u64,
    pub write: u64,
    pub export: u64,
    pub other: u64,
    pub denied: u64,
    pub failed: u64,
}

impl Counts {
    fn add(&mut self, c: Category) {
        let n = match c {
            Category::Read => &mut self.read,
            Category::Search => &mut self.search,
            Category::Write => &mut self.write,
            Category::Export => &mut self.export,
            Category::Other => &mut self.other,
            Category::Denied => &mut self.denied,
            Category::Failed => &mut self.failed,
        };
        *n += 1;
    }
}

/// One patient or resource in a scope.
#[derive(Debug, Clone, Serialize)]
pub struct Touch {
    pub counts: Counts,
    /// First and last access in the window (RFC 3339).
    pub first: String,
    pub last: String,
    /// Carries a restricted security label now (or, for a patient, is
    /// flagged VIP).
    pub restricted: bool,
}

/// The integrity of the log the scope was read from.
#[derive(Debug, Clone, Serialize)]
pub struct LogFacts {
    pub records: u64,
    pub sealed: u64,
    pub checkpoint_size: Option<u64>,
    pub checkpoint_time: Option<String>,
    pub outside_checkpoints: u64,
}

/// A scope: what the principal touched in the window.
#[derive(Debug, Clone, Serialize)]
pub struct Scope {
    pub principal: String,
    pub since: Option<String>,
    pub until: Option<String>,
    pub computed: String,
    pub log: LogFacts,
    /// Records of the principal in the window.
    pub records: u64,
    pub totals: Counts,
    /// Records per interaction code (`read`, `search-type`, `create`…).
    pub by_interaction: BTreeMap<String, u64>,
    /// Records per resource type named (the resource of a
    /// single-resource interaction, the type a search searched).
    pub by_type: BTreeMap<String, u64>,
    /// Distinct individuals whose data was returned or written.
    pub individuals: usize,
    /// Patient id → what was done to their data.
    pub patients: BTreeMap<String, Touch>,
    /// `Type/id` → what was done to it.
    pub resources: BTreeMap<String, Touch>,
    /// The patients and resources with restricted labels (or VIP flags).
    pub restricted: Vec<String>,
    /// Agents seen in the matching records (for an address or everyone:
    /// who else to look at).
    pub principals: BTreeSet<String>,
    /// Addresses the matching records came from.
    pub addresses: BTreeSet<String>,
}

/// Why a scope could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("the audit log does not verify, so no scope is given: {0}")]
    Tampered(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<AuditError> for ScopeError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Integrity(m) => ScopeError::Tampered(m),
            AuditError::Unavailable(m) => ScopeError::Unavailable(m),
        }
    }
}

/// The interaction code and category of a REST record; `None` for other
/// records (sign-ins, administration, alerts).
pub fn classify(v: &Value) -> Option<(String, Category)> {
    if v["type"]["code"] != "rest" {
        return None;
    }
    let code = v["subtype"][0]["code"].as_str()?.to_owned();
    let cat = match v["outcome"].as_str() {
        Some("0") => match code.as_str() {
            "read" | "vread" | "history-instance" | "history-type" | "history-system"
            | "history" | "operation" => Category::Read,
            c if c.starts_with("search") => Category::Search,
            "create" | "update" | "patch" | "delete" | "transaction" => Category::Write,
            "export" => Category::Export,
            _ => Category::Other,
        },
        Some("4")
            if v["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.contains("denied by")) =>
        {
            Category::Denied
        }
        _ => Category::Failed,
    };
    Some((code, cat))
}

/// The patients, resources and searched type a record names.
fn named(v: &Value) -> (Vec<&str>, Vec<&str>, Option<&str>) {
    let (mut patients, mut resources, mut searched) = (Vec::new(), Vec::new(), None);
    for e in v["entity"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let role = e["role"]["code"].as_str();
        let reference = e["what"]["reference"].as_str();
        match (role, reference) {
            (Some("1"), Some(r)) => {
                if let Some(p) = r.strip_prefix("Patient/") {
                    patients.push(p);
                }
            }
            (Some("4"), Some(r)) => resources.push(r),
            (Some("24"), _) => searched = e["name"].as_str(),
            _ => {}
        }
    }
    (patients, resources, searched)
}

fn touch(map: &mut BTreeMap<String, Touch>, key: &str, cat: Category, at: &str) {
    if !map.contains_key(key) {
        map.insert(
            key.to_owned(),
            Touch {
                counts: Counts::default(),
                first: at.to_owned(),
                last: at.to_owned(),
                restricted: false,
            },
        );
    }
    let Some(t) = map.get_mut(key) else {
        return;
    };
    t.counts.add(cat);
    // RFC 3339 instants of one format sort as text.
    if at < t.first.as_str() {
        t.first = at.to_owned();
    }
    if at > t.last.as_str() {
        t.last = at.to_owned();
    }
}

/// The scope being gathered, record by record.
#[derive(Debug, Default)]
struct Gather {
    records: u64,
    totals: Counts,
    by_interaction: BTreeMap<String, u64>,
    by_type: BTreeMap<String, u64>,
    patients: BTreeMap<String, Touch>,
    resources: BTreeMap<String, Touch>,
    principals: BTreeSet<String>,
    addresses: BTreeSet<String>,
}

impl Gather {
    fn record(&mut self, who: &Who, w: Window, row: &AuditRow, v: &Value) {
        if !w.contains(row.recorded) || !who.matches(v) {
            return;
        }
        let Some((code, cat)) = classify(v) else {
            return;
        };
        self.records += 1;
        self.totals.add(cat);
        *self.by_interaction.entry(code).or_default() += 1;
        let at = v["recorded"].as_str().unwrap_or_default();
        let (patients, resources, searched) = named(v);
        let mut types: BTreeSet<&str> = resources
            .iter()
            .filter_map(|r| r.split_once('/').map(|(t, _)| t))
            .collect();
        types.extend(searched);
        for t in types {
            *self.by_type.entry(t.to_owned()).or_default() += 1;
        }
        for p in patients {
            touch(&mut self.patients, p, cat, at);
        }
        for r in resources {
            touch(&mut self.resources, r, cat, at);
        }
        self.principals.insert(row.agent.clone());
        for a in v["agent"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(ip) = a["network"]["address"].as_str() {
                self.addresses.insert(ip.to_owned());
            }
        }
    }
}

/// Scope `who` in `w` from the verified log (`outside`: checkpoints saved
/// outside the database, as signed-note text; the configured
/// `[audit] checkpoint_file` should be among them).
pub async fn scope(
    st: &AppState,
    who: &Who,
    w: Window,
    outside: &[String],
) -> Result<Scope, ScopeError> {
    let mut g = Gather::default();
    let report = st
        .audit
        .verify_visiting(outside, &mut |row, v| g.record(who, w, row, v))
        .await?;
    mark_restricted(st, &mut g).await?;
    let mut restricted: Vec<String> = g
        .patients
        .iter()
        .filter(|(_, t)| t.restricted)
        .map(|(p, _)| format!("Patient/{p}"))
        .chain(
            g.resources
                .iter()
                .filter(|(_, t)| t.restricted)
                .map(|(r, _)| r.clone()),
        )
        .collect();
    restricted.sort();
    restricted.dedup();
    let latest = report.latest.as_ref();
    Ok(Scope {
        principal: who.label(),
        since: w.since.map(instant),
        until: w.until.map(instant),
        computed: instant(crate::base::clock::now_ms()),
        log: LogFacts {
            records: report.records,
            sealed: report.sealed,
            checkpoint_size: latest.map(|c| c.size),
            checkpoint_time: latest.map(|c| instant(c.time_ms)),
            outside_checkpoints: report.external,
        },
        records: g.records,
        totals: g.totals,
        by_interaction: g.by_interaction,
        by_type: g.by_type,
        individuals: g.patients.len(),
        patients: g.patients,
        resources: g.resources,
        restricted,
        principals: g.principals,
        addresses: g.addresses,
    })
}

/// Mark what carries a restricted label now (and patients flagged VIP).
/// A resource since deleted or erased is left unmarked. Each distinct
/// resource is read once (a patient and its `Patient/{id}` read are one),
/// several at a time: on a large scope these reads, not the log, were
/// most of the time.
async fn mark_restricted(st: &AppState, g: &mut Gather) -> Result<(), ScopeError> {
    use crate::data::repo::RepoError;
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let vip = st.vip.read().clone();
    let mut refs: BTreeSet<String> = g.resources.keys().cloned().collect();
    refs.extend(g.patients.keys().map(|p| format!("Patient/{p}")));
    let restricted: BTreeSet<String> = stream::iter(refs)
        .map(|r| async move {
            let parsed = r.split_once('/').and_then(|(t, i)| {
                Some((
                    phylax_fhir::ResourceType::parse(t)?,
                    phylax_fhir::ResourceId::parse(i)?,
                ))
            });
            let Some((t, i)) = parsed else {
                return Ok(None);
            };
            match explain_facts(&st.gate, &t, &i).await {
                Ok((_, true)) => Ok(Some(r)),
                Ok((_, false)) | Err(RepoError::NotFound | RepoError::Gone(_)) => Ok(None),
                Err(e) => Err(ScopeError::Unavailable(e.to_string())),
            }
        })
        .buffer_unordered(16)
        .try_filter_map(|r| async move { Ok(r) })
        .try_collect()
        .await?;
    for (p, t) in g.patients.iter_mut() {
        t.restricted = vip.contains(p) || restricted.contains(&format!("Patient/{p}"));
    }
    for (r, t) in g.resources.iter_mut() {
        t.restricted = restricted.contains(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(agent_user: Option<&str>, client: &str, ip: &str, code: &str, outcome: &str) -> Value {
        let mut agents = Vec::new();
        if let Some(u) = agent_user {
            agents.push(
                json!({"who": {"identifier": {"system": "urn:phylax:user", "value": u}},
                "policy": ["urn:phylax:grant-family:fam1"]}),
            );
        }
        agents.push(
            json!({"who": {"identifier": {"system": "urn:phylax:client", "value": client}},
            "network": {"address": ip, "type": "2"}}),
        );
        json!({"type": {"code": "rest"}, "subtype": [{"code": code}], "outcome": outcome,
               "agent": agents, "entity": [], "recorded": "2026-12-07T10:00:00.000Z"})
    }

    #[test]
    fn principals_match_by_their_own_kind() {
        let v = rec(Some("u1"), "app", "10.0.0.1", "read", "0");
        assert!(Who::User("u1".into()).matches(&v));
        assert!(!Who::User("app".into()).matches(&v));
        assert!(Who::Client("app".into()).matches(&v));
        assert!(!Who::Client("u1".into()).matches(&v));
        assert!(Who::Family("fam1".into()).matches(&v));
        assert!(!Who::Family("fam".into()).matches(&v));
        assert!(Who::Ip("10.0.0.1".parse().unwrap()).matches(&v));
        assert!(Who::Ip("::ffff:10.0.0.1".parse().unwrap()).matches(&v));
        assert!(!Who::Ip("10.0.0.2".parse().unwrap()).matches(&v));
    }

    #[test]
    fn categories() {
        let c = |code, outcome, desc: Option<&str>| {
            let mut v = rec(None, "app", "10.0.0.1", code, outcome);
            if let Some(d) = desc {
                v["outcomeDesc"] = json!(d);
            }
            classify(&v).map(|(_, c)| c)
        };
        assert_eq!(c("read", "0", None), Some(Category::Read));
        assert_eq!(c("search-type", "0", None), Some(Category::Search));
        assert_eq!(c("transaction", "0", None), Some(Category::Write));
        assert_eq!(c("operation", "0", None), Some(Category::Read));
        assert_eq!(
            c("read", "4", Some("HTTP 403; denied by care")),
            Some(Category::Denied)
        );
        assert_eq!(c("read", "4", Some("HTTP 404")), Some(Category::Failed));
        let mut login = rec(None, "app", "10.0.0.1", "110122", "0");
        login["type"]["code"] = json!("110114");
        assert_eq!(classify(&login), None);
    }
}
