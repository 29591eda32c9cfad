//! Search conditions and the SQL they become.
//!
//! A [`SearchQuery`] is an AND of groups, each an OR of [`Cond`]itions (FHIR:
//! repeated parameters AND, comma-separated values OR). Every condition on
//! the index is a semi-join, `r.seq [NOT] IN (SELECT i.seq FROM
//! search_entries i WHERE i.pid = ? AND …)`, which both SQLite and
//! PostgreSQL drive from the `(pid, hash, seq)` / `(pid, lo)` indexes, so a
//! selective condition stays logarithmic in the table size. An entry names
//! its resource by the `seq` of the resource's current version and its
//! (type, parameter) by a number `pid` (see `params`). Values are always
//! bound parameters; only placeholders differ per backend.

/// Date comparisons, against a stored range `[lo, hi)` and a query range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    /// The query range contains the stored range.
    Eq,
    Ne,
    /// The stored range starts before the query range.
    Lt,
    /// The stored range ends after the query range.
    Gt,
    Le,
    Ge,
    /// Starts after the query range ends.
    Sa,
    /// Ends before the query range starts.
    Eb,
    /// Overlaps the query range.
    Ap,
}

/// Number comparisons, against a stored value and a query range `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
pub enum Cond {
    /// Has an entry with one of these hashes.
    Hash {
        param: String,
        hashes: Vec<Vec<u8>>,
    },
    /// Has no entry with any of these hashes (`:not`).
    NotHash {
        param: String,
        hashes: Vec<Vec<u8>>,
    },
    /// Has (`false`) or lacks (`true`) any entry (`:missing`).
    Missing {
        param: String,
        missing: bool,
    },
    Range {
        param: String,
        op: RangeOp,
        lo: i64,
        hi: i64,
        /// Only entries carrying one of these hashes (a composite's first
        /// component).
        hashes: Option<Vec<Vec<u8>>>,
    },
    Num {
        param: String,
        op: NumOp,
        lo: f64,
        hi: f64,
        hashes: Option<Vec<Vec<u8>>>,
    },
    Ids(Vec<String>),
    /// None of these ids.
    NotIds(Vec<String>),
    LastUpdated {
        op: RangeOp,
        lo: i64,
        hi: i64,
    },
    /// Matches nothing (e.g. a reference to a type the parameter cannot hold).
    Never,
}

impl Cond {
    /// Only a resource with a matching index entry can satisfy this.
    fn needs_entry(&self) -> bool {
        match self {
            Cond::Hash { hashes, .. } => !hashes.is_empty(),
            Cond::Missing { missing, .. } => !missing,
            Cond::Range { .. } | Cond::Num { .. } => true,
            Cond::NotHash { .. }
            | Cond::Ids(_)
            | Cond::NotIds(_)
            | Cond::LastUpdated { .. }
            | Cond::Never => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub rtype: String,
    pub and: Vec<Vec<Cond>>,
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// A bound value.
#[derive(Debug, Clone)]
pub(crate) enum P {
    T(String),
    B(Vec<u8>),
    I(i64),
    /// A parameter number (`INTEGER` on PostgreSQL).
    I32(i32),
    F(f64),
}

/// Parameter code → number, for the query's type (see `params`).
pub(crate) type Pids = std::collections::HashMap<String, i32>;

struct Builder<'a> {
    sql: String,
    pids: &'a Pids,
    params: Vec<P>,
    ph: &'a dyn Fn(usize) -> String,
    /// Render index conditions as correlated `EXISTS` probes of the current
    /// row (cheap per row) instead of `r.id IN (list)` (materialised once).
    correlated: bool,
    /// PostgreSQL (`$n` placeholders) rather than SQLite (`?n`).
    pg: bool,
    /// The alias conditions name the candidate row by: `r` (`resources`)
    /// or, when the query reads versions alone, `v` (see `build`).
    row: &'static str,
    /// The searched type (for parameters whose number is not in `pids`).
    rtype: &'a str,
}

impl Builder<'_> {
    fn bind(&mut self, p: P) -> String {
        self.params.push(p);
        (self.ph)(self.params.len())
    }

    fn list(&mut self, items: &[Vec<u8>]) -> String {
        items
            .iter()
            .map(|h| self.bind(P::B(h.clone())))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bind the query bounds a range operator uses (see `range_sql`).
    fn range_bounds(&mut self, op: RangeOp, lo: P, hi: P) -> (String, String) {
        use RangeOp::*;
        let need_lo = matches!(op, Eq | Ne | Lt | Le | Ge | Eb | Ap);
        let need_hi = matches!(op, Eq | Ne | Gt | Le | Ge | Sa | Ap);
        let l = if need_lo {
            self.bind(lo)
        } else {
            String::new()
        };
        let h = if need_hi {
            self.bind(hi)
        } else {
            String::new()
        };
        (l, h)
    }

    fn range_sql(op: RangeOp, lo_col: &str, hi_col: &str, qlo: &str, qhi: &str) -> String {
        let eq = format!("({lo_col} >= {qlo} AND {hi_col} <= {qhi})");
        match op {
            RangeOp::Eq => eq,
            RangeOp::Ne => format!("NOT {eq}"),
            RangeOp::Lt => format!("{lo_col} < {qlo}"),
            RangeOp::Gt => format!("{hi_col} > {qhi}"),
            RangeOp::Le => format!("({lo_col} < {qlo} OR {eq})"),
            RangeOp::Ge => format!("({hi_col} > {qhi} OR {eq})"),
            RangeOp::Sa => format!("{lo_col} >= {qhi}"),
            RangeOp::Eb => format!("{hi_col} <= {qlo}"),
            RangeOp::Ap => format!("({lo_col} < {qhi} AND {hi_col} > {qlo})"),
        }
    }

    /// The entries of one parameter: per row when correlated, else the
    /// list of resources (their current version's `seq`) having one.
    fn sub(&mut self, param: &str) -> String {
        let p = match self.pids.get(param) {
            Some(pid) => self.bind(P::I32(*pid)),
            // A number this node has not seen: looked up inside the query
            // (NULL, so no entry, if the parameter was never registered).
            // As fresh as the query's own snapshot, and no separate round
            // trip per search for parameters that have no entries yet (a
            // restricted-label condition on every search, for one).
            None => {
                let t = self.bind(P::T(self.rtype.to_owned()));
                let c = self.bind(P::T(param.to_owned()));
                format!("(SELECT s.pid FROM search_params s WHERE s.rtype = {t} AND s.param = {c})")
            }
        };
        if self.correlated {
            let row = self.row;
            return format!(
                "SELECT 1 FROM search_entries i WHERE i.seq = {row}.seq AND i.pid = {p}"
            );
        }
        format!("SELECT i.seq FROM search_entries i WHERE i.pid = {p}")
    }

    /// The value columns a range or number condition compares. In a
    /// correlated probe on PostgreSQL they are written `+col` (a no-op) so
    /// that no index on the value can serve the probe: it must be the point
    /// lookup of one resource's entries by `(seq, pid)`. Without
    /// statistics (a freshly loaded table) PostgreSQL otherwise took
    /// `date=lt2030-01-01` for selective and probed each candidate row
    /// through the date index, reading every Observation's date entry
    /// per row: one patient's observations by code and date took 26 ms
    /// instead of 1.3 ms, and the benchmark fell from 1,100 to 50
    /// searches/s. SQLite's planner already keeps the probe on the
    /// per-resource index (and measured slower with the `+`).
    fn value_cols(&self, lo: &str, hi: &str) -> (String, String) {
        if self.correlated && self.pg {
            (format!("+{lo}"), format!("+{hi}"))
        } else {
            (lo.to_owned(), hi.to_owned())
        }
    }

    /// "The row has (`not`: has no) index entry selected by `sub`".
    fn has(&self, not: bool, sub: String) -> String {
        let not = if not { "NOT " } else { "" };
        if self.correlated {
            // On PostgreSQL, `OFFSET 0` keeps the probe a per-row subplan
            // (an index point lookup). Otherwise the planner flattens it
            // into a semi-join and, on a freshly loaded table without
            // statistics, may scan every entry of a common hash per row.
            // SQLite always runs EXISTS per row.
            let keep = if self.pg { " OFFSET 0" } else { "" };
            format!("{not}EXISTS ({sub}{keep})")
        } else {
            format!("{}.seq {not}IN ({sub})", self.row)
        }
    }

    /// The resources (current versions' `seq`) with an entry of any of
    /// these hash conditions: one `SELECT` per condition, `UNION ALL`-ed.
    /// As one `IN` list the database drives from the entries. Written as
    /// an OR of `IN` lists instead, PostgreSQL could not: it scanned every
    /// version of the type backwards and tested each against the lists (a `name` search at 1M resources: 103 ms against
    /// 1.2 ms this way).
    fn hash_union(&mut self, group: &[Cond]) -> String {
        let parts: Vec<String> = group
            .iter()
            .filter_map(|c| match c {
                Cond::Hash { param, hashes } => {
                    let sub = self.sub(param);
                    let list = self.list(hashes);
                    Some(format!("{sub} AND i.hash IN ({list})"))
                }
                _ => None,
            })
            .collect();
        parts.join(" UNION ALL ")
    }

    fn cond(&mut self, c: &Cond) -> String {
        match c {
            Cond::Hash { param, hashes } | Cond::NotHash { param, hashes } => {
                if hashes.is_empty() {
                    return if matches!(c, Cond::Hash { .. }) {
                        "1 = 0".into()
                    } else {
                        "1 = 1".into()
                    };
                }
                let sub = self.sub(param);
                let list = self.list(hashes);
                self.has(
                    matches!(c, Cond::NotHash { .. }),
                    format!("{sub} AND i.hash IN ({list})"),
                )
            }
            Cond::Missing { param, missing } => {
                let sub = self.sub(param);
                self.has(*missing, sub)
            }
            Cond::Range {
                param,
                op,
                lo,
                hi,
                hashes,
            } => {
                let sub = self.sub(param);
                let (qlo, qhi) = self.range_bounds(*op, P::I(*lo), P::I(*hi));
                let (l, h) = self.value_cols("i.lo", "i.hi");
                let cmp = Self::range_sql(*op, &l, &h, &qlo, &qhi);
                let with = match hashes {
                    Some(h) if !h.is_empty() => format!(" AND i.hash IN ({})", self.list(h)),
                    _ => String::new(),
                };
                self.has(false, format!("{sub} AND {l} IS NOT NULL AND {cmp}{with}"))
            }
            Cond::Num {
                param,
                op,
                lo,
                hi,
                hashes,
            } => {
                let sub = self.sub(param);
                // Bind only the bounds the operator uses: an unused
                // placeholder is an error on both backends.
                let need_lo = matches!(op, NumOp::Eq | NumOp::Ne | NumOp::Lt | NumOp::Ge);
                let need_hi = matches!(op, NumOp::Eq | NumOp::Ne | NumOp::Le | NumOp::Gt);
                let qlo = if need_lo {
                    self.bind(P::F(*lo))
                } else {
                    String::new()
                };
                let qhi = if need_hi {
                    self.bind(P::F(*hi))
                } else {
                    String::new()
                };
                let (n, _) = self.value_cols("i.num", "i.num");
                let cmp = match op {
                    NumOp::Eq => format!("({n} >= {qlo} AND {n} < {qhi})"),
                    NumOp::Ne => format!("NOT ({n} >= {qlo} AND {n} < {qhi})"),
                    NumOp::Lt => format!("{n} < {qlo}"),
                    NumOp::Le => format!("{n} < {qhi}"),
                    NumOp::Gt => format!("{n} >= {qhi}"),
                    NumOp::Ge => format!("{n} >= {qlo}"),
                };
                let unit = match hashes {
                    Some(h) if !h.is_empty() => format!(" AND i.hash IN ({})", self.list(h)),
                    _ => String::new(),
                };
                self.has(false, format!("{sub} AND {n} IS NOT NULL AND {cmp}{unit}"))
            }
            Cond::Ids(ids) | Cond::NotIds(ids) => {
                let not = matches!(c, Cond::NotIds(_));
                if ids.is_empty() {
                    // No id at all: nothing matches `IN`, everything `NOT IN`.
                    return if not { "1 = 1" } else { "1 = 0" }.into();
                }
                let list = ids
                    .iter()
                    .map(|i| self.bind(P::T(i.clone())))
                    .collect::<Vec<_>>()
                    .join(", ");
                let not = if not { "NOT " } else { "" };
                format!("{}.id {not}IN ({list})", self.row)
            }
            Cond::LastUpdated { op, lo, hi } => {
                let (qlo, qhi) = self.range_bounds(*op, P::I(*lo), P::I(*hi));
                Self::range_sql(*op, "v.last_updated", "(v.last_updated + 1)", &qlo, &qhi)
            }
            Cond::Never => "1 = 0".into(),
        }
    }
}

/// Most index entries the selectivity probe counts per condition.
const PROBE_CAP: i64 = 256;

/// A group of hash conditions only (equalities on blind hashes, usually
/// selective), OR-ed: one parameter, or several (`name` searches `name`,
/// `family` and `given`).
fn all_hashes(g: &[Cond]) -> bool {
    !g.is_empty()
        && g.iter()
            .all(|c| matches!(c, Cond::Hash { hashes, .. } if !hashes.is_empty()))
}

/// Groups that can drive a query: hash conditions (see [`all_hashes`]) or
/// a list of ids.
fn drivable(q: &SearchQuery) -> Vec<usize> {
    q.and
        .iter()
        .enumerate()
        .filter(|(_, g)| {
            all_hashes(g) || matches!(g.as_slice(), [Cond::Ids(ids)] if !ids.is_empty())
        })
        .map(|(i, _)| i)
        .collect()
}

/// How to pick the group that drives a query (see [`build`]).
pub(crate) enum Plan {
    /// Every group is a materialised `IN` list (no drivable group).
    Lists,
    /// This group drives; the others are probed per row.
    Driver(usize),
    /// Several candidates: run this probe (one row, one capped count per
    /// candidate, in `candidates` order) and drive with the smallest.
    Probe {
        sql: String,
        params: Vec<P>,
        candidates: Vec<usize>,
    },
}

/// Decide how to drive a query. The blind index has no statistics a
/// planner could use (every hash is as opaque as the next), so when
/// several equality conditions compete, a capped count of each decides:
/// driving from the smallest keeps a selective search (one patient's
/// observations of one code) logarithmic, however common the code.
pub(crate) fn plan(q: &SearchQuery, pids: &Pids, ph: &dyn Fn(usize) -> String) -> Plan {
    let candidates = drivable(q);
    if let Some(&ids) = candidates
        .iter()
        .find(|&&i| matches!(q.and[i].as_slice(), [Cond::Ids(_)]))
    {
        return Plan::Driver(ids);
    }
    match candidates.as_slice() {
        [] => Plan::Lists,
        [one] => Plan::Driver(*one),
        _ => {
            let mut b = Builder {
                sql: String::new(),
                pids,
                params: Vec::new(),
                ph,
                correlated: false,
                pg: ph(1).starts_with('$'),
                row: "r",
                rtype: &q.rtype,
            };
            let mut cols = Vec::new();
            for &i in &candidates {
                if all_hashes(&q.and[i]) {
                    let union = b.hash_union(&q.and[i]);
                    let cap = b.bind(P::I(PROBE_CAP));
                    cols.push(format!("(SELECT COUNT(*) FROM ({union} LIMIT {cap}) x{i})"));
                }
            }
            Plan::Probe {
                sql: format!("SELECT {}", cols.join(", ")),
                params: b.params,
                candidates,
            }
        }
    }
}

/// The driver chosen from a probe's counts.
pub(crate) fn driver_from_counts(candidates: &[usize], counts: &[i64]) -> Option<usize> {
    candidates
        .iter()
        .zip(counts)
        .min_by_key(|(_, n)| **n)
        .map(|(i, _)| *i)
}

/// Build the SQL for a query: the page of rows (`count == false`) or the
/// total count. `ph(n)` renders the n-th placeholder (1-based). With a
/// `driver`, that group is an `IN` list the database drives from and every
/// other group a correlated `EXISTS` probe; without, every group is an
/// `IN` list.
pub(crate) fn build(
    q: &SearchQuery,
    pids: &Pids,
    ph: &dyn Fn(usize) -> String,
    cols: &str,
    count: bool,
    driver: Option<usize>,
) -> (String, Vec<P>) {
    // Entries exist only for current, non-deleted versions: every append
    // replaces the superseded version's entries in its own transaction, and
    // a deletion leaves none. So when one group can only match through an
    // entry, every match is a current version and the query reads
    // `resource_versions` alone, by `seq` (its primary key), without the
    // two lookups in `resources` per candidate. An `_id` list still drives
    // through `resources`, whose key is the id.
    let versions_only = q
        .and
        .iter()
        .any(|g| !g.is_empty() && g.iter().all(Cond::needs_entry))
        && !driver.is_some_and(|d| matches!(q.and[d].as_slice(), [Cond::Ids(_)]));
    let row = if versions_only { "v" } else { "r" };
    let mut b = Builder {
        sql: String::new(),
        pids,
        params: Vec::new(),
        ph,
        correlated: false,
        pg: ph(1).starts_with('$'),
        row,
        rtype: &q.rtype,
    };
    if count {
        if let Some(sql) = count_from_entries(&mut b, q, driver) {
            b.sql = sql;
            return (b.sql, b.params);
        }
    }
    let t = b.bind(P::T(q.rtype.clone()));
    let mut wh = if versions_only {
        format!("v.rtype = {t}")
    } else {
        format!("r.rtype = {t} AND NOT r.deleted")
    };
    // A page driven by blind-hash entries, on PostgreSQL: the driving
    // entries become an ordered, deduplicated stream of `seq`s (newest
    // first, below the page mark) joined to the versions, so the database
    // stops at the page's last row. As `seq IN (…)` it hashed every match,
    // fetched every matching version and sorted them, bodies and all, to
    // keep a page: 0.24–0.28 ms against 0.16 ms for a family prefix of 72
    // matches, and less work for small ones too (docs/PERFORMANCE.md).
    let ordered = (b.pg && versions_only && !count)
        .then_some(driver)
        .flatten()
        .filter(|&d| all_hashes(&q.and[d]));
    let mut from_driver = None;
    if let Some(d) = ordered {
        b.correlated = false;
        let union = b.hash_union(&q.and[d]);
        let before = b.bind(P::I(q.before_seq.unwrap_or(i64::MAX)));
        from_driver = Some(format!(
            "(SELECT DISTINCT x.seq FROM ({union}) x WHERE x.seq < {before} ORDER BY x.seq DESC) d \
             JOIN resource_versions v ON v.seq = d.seq"
        ));
    } else if !count {
        let before = b.bind(P::I(q.before_seq.unwrap_or(i64::MAX)));
        wh.push_str(&format!(" AND {row}.seq < {before}"));
    }
    for (gi, group) in q.and.iter().enumerate() {
        if ordered == Some(gi) {
            continue;
        }
        b.correlated = driver.is_some_and(|d| d != gi);
        if !b.correlated && group.len() > 1 && all_hashes(group) {
            let union = b.hash_union(group);
            wh.push_str(&format!(" AND {row}.seq IN ({union})"));
            continue;
        }
        let ors: Vec<String> = group.iter().map(|c| b.cond(c)).collect();
        if ors.is_empty() {
            continue;
        }
        wh.push_str(&format!(" AND ({})", ors.join(" OR ")));
    }
    let from = match &from_driver {
        Some(f) => f.as_str(),
        None if versions_only => "resource_versions v",
        None => "resources r JOIN resource_versions v ON v.seq = r.seq",
    };
    b.sql = if count {
        format!("SELECT COUNT(*) FROM {from} WHERE {wh}")
    } else {
        let lim = b.bind(P::I(q.limit as i64));
        // Ordered by the driver's `seq` when it drives: the order its
        // stream already has (the same value as `v.seq`).
        let key = if from_driver.is_some() { "d" } else { row };
        format!("SELECT {cols} FROM {from} WHERE {wh} ORDER BY {key}.seq DESC LIMIT {lim}")
    };
    (b.sql, b.params)
}

/// A count that reads index entries only, when the query allows it: the
/// driving group is blind-hash equalities and no condition looks at a
/// version's columns (`_id`, `_lastUpdated`). Entries exist only for
/// current, non-deleted versions (see [`build`]) and name their parameter
/// by a number that belongs to one resource type, so the distinct `seq`s
/// of the driver's entries that pass the other groups' probes are exactly
/// the matches. Counting them through `resource_versions` as well cost a
/// lookup per match in its `(rtype, seq)` index: the benchmark's
/// family-name prefix counts (over 50 matches each) took 0.23 ms of
/// database time that way, 0.05 ms this way, at a million resources
/// (docs/PERFORMANCE.md).
fn count_from_entries(b: &mut Builder, q: &SearchQuery, driver: Option<usize>) -> Option<String> {
    let d = driver.filter(|&d| all_hashes(&q.and[d]))?;
    let by_version =
        |c: &Cond| matches!(c, Cond::Ids(_) | Cond::NotIds(_) | Cond::LastUpdated { .. });
    if b.row != "v" || q.and.iter().flatten().any(by_version) {
        return None;
    }
    b.correlated = false;
    let source = b.hash_union(&q.and[d]);
    let mut wh = Vec::new();
    for (gi, group) in q.and.iter().enumerate() {
        if gi == d {
            continue;
        }
        b.correlated = true;
        let ors: Vec<String> = group.iter().map(|c| b.cond(c)).collect();
        if !ors.is_empty() {
            wh.push(format!("({})", ors.join(" OR ")));
        }
    }
    let wh = if wh.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", wh.join(" AND "))
    };
    Some(format!(
        "SELECT COUNT(*) FROM (SELECT DISTINCT x.seq AS seq FROM ({source}) x) v{wh}"
    ))
}

/// The audit log's columns, in `AuditRow` order, from [`AUDIT_FROM`] (or
/// any join naming the record `a` and its tree position `f`).
/// [`AUDIT_COLS`] of a record not in the tree yet (`leaf_index` NULL),
/// from `audit_log a` alone.
pub(crate) const AUDIT_PENDING_COLS: &str =
    "a.id, CAST(NULL AS BIGINT), a.event_id, a.recorded, a.agent, a.action, \
     a.subtype, a.outcome, a.leaf_hash, a.sealed";

pub(crate) const AUDIT_COLS: &str =
    "a.id, f.leaf_index, a.event_id, a.recorded, a.agent, a.action, \
     a.subtype, a.outcome, a.leaf_hash, a.sealed";

/// The audit tree's size, as a scalar subquery: the position after the
/// last (positions are contiguous from 0, and `audit_leaf` holds them all
/// since SQLite migration 11 / PostgreSQL 12).
pub(crate) const TREE_SIZE: &str = "(SELECT COALESCE(MAX(leaf_index) + 1, 0) FROM audit_leaf)";

/// Records with their tree positions, if they have one. Positions live in
/// `audit_leaf` (SQLite migration 11): `audit_log.leaf_index` only keeps
/// those of records sealed before it.
pub(crate) const AUDIT_FROM: &str = "audit_log a LEFT JOIN audit_leaf f ON f.audit_id = a.id";

/// A bound value of an audit search.
pub(crate) enum AuditArg {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
    /// An `audit_patient` key (see [`patient_key`]): a BLOB on SQLite, a
    /// BIGINT on PostgreSQL ([`patient_key_int`]).
    PatientKey([u8; 8]),
}

/// The key an `audit_patient` entry is stored under: the first 8 bytes of
/// the patient's keyed hash (SQLite migration 13, PostgreSQL 15).
///
/// Why not the whole hash: a family search's record names about 24
/// patients, and these entries were most of what writing its audit record
/// cost the database. A 32-byte key made each entry about 60 bytes in the
/// index; PostgreSQL inserted 64-bit keys in a quarter less time
/// (docs/PERFORMANCE.md). The price is that two patients' keys can
/// collide, about once in 3.7 million for a million patients
/// (n^2 / 2^65), so a lookup may return a record about another patient
/// too: callers keep only records that name the patient they asked for
/// (`phylax-server`'s audit search does). A shorter key reveals less, not
/// more, than the hash it is cut from. A hash shorter than 8 bytes (never
/// made by Phylax) is padded with zeros, as PostgreSQL's migration pads.
pub fn patient_key(hash: &[u8]) -> [u8; 8] {
    let mut k = [0u8; 8];
    let n = hash.len().min(8);
    k[..n].copy_from_slice(&hash[..n]);
    k
}

/// [`patient_key`] as PostgreSQL stores it: the 8 bytes read big-endian
/// as a signed integer, which is what migration 15's
/// `('x' || encode(substr(patient, 1, 8), 'hex'))::bit(64)::bigint` gives.
pub fn patient_key_int(hash: &[u8]) -> i64 {
    i64::from_be_bytes(patient_key(hash))
}

/// The SQL of an audit search (newest first) and its arguments; `ph(n)`
/// renders placeholder `n` (1-based) for the backend.
pub(crate) fn audit_search_sql(
    q: &crate::AuditQuery,
    ph: impl Fn(usize) -> String,
) -> (String, Vec<AuditArg>) {
    let mut conds = Vec::new();
    let mut args = Vec::new();
    let mut push = |cond: &str, a: AuditArg, args: &mut Vec<AuditArg>| {
        args.push(a);
        conds.push(cond.replace('?', &ph(args.len())));
    };
    if let Some(p) = &q.patient {
        push(
            "id IN (SELECT audit_id FROM audit_patient WHERE patient = ?)",
            AuditArg::PatientKey(patient_key(p)),
            &mut args,
        );
    }
    if let Some(a) = &q.agent {
        push("agent = ?", AuditArg::Text(a.clone()), &mut args);
    }
    if let Some(e) = &q.event_id {
        push("event_id = ?", AuditArg::Text(e.clone()), &mut args);
    }
    if let Some(a) = &q.action {
        push("action = ?", AuditArg::Text(a.clone()), &mut args);
    }
    if let Some(a) = &q.subtype {
        push("subtype = ?", AuditArg::Text(a.clone()), &mut args);
    }
    if let Some(t) = q.from {
        push("recorded >= ?", AuditArg::Int(t), &mut args);
    }
    if let Some(t) = q.to {
        push("recorded < ?", AuditArg::Int(t), &mut args);
    }
    if let Some(b) = q.before_id {
        push("id < ?", AuditArg::Int(b), &mut args);
    }
    // Pruned records (body emptied after retention) are not found.
    push("sealed <> ?", AuditArg::Bytes(Vec::new()), &mut args);
    let wh = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    args.push(AuditArg::Int(i64::from(q.limit)));
    let sql = format!(
        "SELECT {AUDIT_COLS} FROM {AUDIT_FROM}{wh} ORDER BY a.id DESC LIMIT {}",
        ph(args.len())
    );
    (sql, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_keys_are_the_first_eight_bytes_big_endian() {
        let h: Vec<u8> = (1..=32).collect();
        assert_eq!(patient_key(&h), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(patient_key_int(&h), 0x0102_0304_0506_0708);
        // The sign follows the first byte, as PostgreSQL's bit(64) cast.
        assert_eq!(patient_key_int(&[0xFF; 32]), -1);
        assert_eq!(patient_key_int(&[0x80, 0, 0, 0, 0, 0, 0, 0, 9]), i64::MIN);
        // Shorter input is padded with zeros on the right, never a panic.
        assert_eq!(patient_key(&[7, 7]), [7, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(patient_key(&[]), [0; 8]);
    }

    fn obs_by_subject_and_date() -> SearchQuery {
        SearchQuery {
            rtype: "Observation".into(),
            and: vec![
                vec![Cond::Hash {
                    param: "subject".into(),
                    hashes: vec![vec![1; 16]],
                }],
                vec![Cond::Range {
                    param: "date".into(),
                    op: RangeOp::Lt,
                    lo: 1,
                    hi: 2,
                    hashes: None,
                }],
                vec![Cond::Num {
                    param: "value-quantity".into(),
                    op: NumOp::Gt,
                    lo: 1.0,
                    hi: 2.0,
                    hashes: None,
                }],
            ],
            before_seq: None,
            limit: 10,
        }
    }

    /// A count driven by hashes reads entries only; one that looks at a
    /// version's columns (`_id`, `_lastUpdated`) still joins the versions.
    #[test]
    fn counts_read_entries_only_when_they_can() {
        let pg = |n: usize| format!("${n}");
        let fam = Cond::Hash {
            param: "family".into(),
            hashes: vec![vec![1; 16]],
        };
        let label = Cond::NotHash {
            param: "_security".into(),
            hashes: vec![vec![2; 16]],
        };
        let mut q = SearchQuery {
            rtype: "Patient".into(),
            and: vec![vec![fam.clone()], vec![label]],
            before_seq: None,
            limit: 10,
        };
        let (sql, params) = build(&q, &Pids::new(), &pg, "", true, Some(0));
        assert!(!sql.contains("resource_versions"), "{sql}");
        assert!(
            sql.starts_with("SELECT COUNT(*) FROM (SELECT DISTINCT x.seq"),
            "{sql}"
        );
        assert!(
            sql.contains("NOT EXISTS (SELECT 1 FROM search_entries i WHERE i.seq = v.seq"),
            "{sql}"
        );
        // Every bound value is used (PostgreSQL refuses an unused one).
        for n in 1..=params.len() {
            assert!(sql.contains(&format!("${n}")), "${n} unused in {sql}");
        }
        // Not the page: it needs the rows, joined to the driver's ordered
        // stream of `seq`s (PostgreSQL), every bound value used.
        let (page, params) = build(&q, &Pids::new(), &pg, "v.seq", false, Some(0));
        assert!(
            page.contains("JOIN resource_versions v ON v.seq = d.seq"),
            "{page}"
        );
        assert!(
            page.ends_with(&format!("ORDER BY d.seq DESC LIMIT ${}", params.len())),
            "{page}"
        );
        for n in 1..=params.len() {
            assert!(page.contains(&format!("${n}")), "${n} unused in {page}");
        }
        // SQLite keeps `seq IN (…)`: its planner already drives from it.
        let (page, _) = build(
            &q,
            &Pids::new(),
            &|_| "?".to_owned(),
            "v.seq",
            false,
            Some(0),
        );
        assert!(page.contains("FROM resource_versions v WHERE"), "{page}");
        assert!(
            page.contains("v.seq IN (SELECT i.seq FROM search_entries i"),
            "{page}"
        );
        for by_version in [
            Cond::NotIds(vec!["x".into()]),
            Cond::LastUpdated {
                op: RangeOp::Ge,
                lo: 0,
                hi: 1,
            },
        ] {
            q.and = vec![vec![fam.clone()], vec![by_version]];
            let (sql, _) = build(&q, &Pids::new(), &pg, "", true, Some(0));
            assert!(sql.contains("FROM resource_versions v"), "{sql}");
        }
        // Without a hash driver (a range drives nothing): as before.
        q.and = vec![vec![Cond::Range {
            param: "birthdate".into(),
            op: RangeOp::Lt,
            lo: 1,
            hi: 2,
            hashes: None,
        }]];
        let (sql, _) = build(&q, &Pids::new(), &pg, "", true, None);
        assert!(sql.contains("FROM resource_versions v"), "{sql}");
    }

    /// An OR of hash conditions on several parameters (`name`: `name`,
    /// `family`, `given`) drives the query as one `IN` over a union, on
    /// its own and when competing with another group; correlated (not the
    /// driver), it stays per-row probes.
    #[test]
    fn or_groups_of_hashes_drive_as_a_union() {
        let name = vec![
            Cond::Hash {
                param: "family".into(),
                hashes: vec![vec![1; 16]],
            },
            Cond::Hash {
                param: "given".into(),
                hashes: vec![vec![2; 16], vec![3; 16]],
            },
        ];
        let pids: Pids = [("family", 5), ("given", 7), ("gender", 9)]
            .into_iter()
            .map(|(p, n)| (p.to_owned(), n))
            .collect();
        let pg = |n: usize| format!("${n}");
        let mut q = SearchQuery {
            rtype: "Patient".into(),
            and: vec![name.clone()],
            before_seq: None,
            limit: 10,
        };
        assert!(matches!(plan(&q, &pids, &pg), Plan::Driver(0)));
        let (sql, params) = build(&q, &pids, &pg, "v.seq", false, Some(0));
        assert!(sql.contains("FROM (SELECT DISTINCT x.seq FROM (SELECT i.seq FROM search_entries i WHERE i.pid = $2 AND i.hash IN ($3) UNION ALL SELECT i.seq FROM search_entries i WHERE i.pid = $4 AND i.hash IN ($5, $6)) x WHERE x.seq < $7 ORDER BY x.seq DESC) d JOIN resource_versions v ON v.seq = d.seq"), "{sql}");
        assert!(!sql.contains(" OR "), "{sql}");
        assert_eq!(params.len(), 8);
        // Competing with a gender token: both are probed, as unions.
        q.and.push(vec![Cond::Hash {
            param: "gender".into(),
            hashes: vec![vec![4; 16]],
        }]);
        match plan(&q, &pids, &pg) {
            Plan::Probe {
                sql, candidates, ..
            } => {
                assert_eq!(candidates, vec![0, 1]);
                assert!(sql.contains("UNION ALL"), "{sql}");
            }
            _ => panic!("two candidates are probed"),
        }
        // Driven by the gender group, the name group is per-row probes.
        let (sql, _) = build(&q, &pids, &pg, "v.seq", false, Some(1));
        assert!(!sql.contains("UNION ALL"), "{sql}");
        assert!(sql.contains(" OR EXISTS"), "{sql}");
        // A group mixing a hash with anything else does not drive.
        let mixed = SearchQuery {
            rtype: "Patient".into(),
            and: vec![vec![
                name[0].clone(),
                Cond::Missing {
                    param: "given".into(),
                    missing: true,
                },
            ]],
            before_seq: None,
            limit: 10,
        };
        assert!(matches!(plan(&mixed, &pids, &pg), Plan::Lists));
    }

    /// A parameter whose number this node has not seen is looked up in
    /// the query itself (bound, like every value), not given a number.
    #[test]
    fn unknown_parameters_are_looked_up_in_the_query() {
        let q = SearchQuery {
            rtype: "Observation".into(),
            and: vec![vec![Cond::NotHash {
                param: "_security".into(),
                hashes: vec![vec![1; 16]],
            }]],
            before_seq: None,
            limit: 10,
        };
        let pg = |n: usize| format!("${n}");
        let (sql, params) = build(&q, &Pids::new(), &pg, "v.seq", false, None);
        assert!(
            sql.contains(
                "i.pid = (SELECT s.pid FROM search_params s WHERE s.rtype = $3 AND s.param = $4)"
            ),
            "{sql}"
        );
        assert!(matches!(&params[3], P::T(p) if p == "_security"));
    }

    /// A correlated probe on PostgreSQL compares `+i.lo`/`+i.num`, so no
    /// value index can serve it (see `value_cols`); SQLite's and a driving
    /// group's comparisons stay indexable.
    #[test]
    fn correlated_value_comparisons_avoid_value_indexes_on_postgres() {
        let q = obs_by_subject_and_date();
        let pids = Pids::new();
        let pg = |n: usize| format!("${n}");
        let lite = |n: usize| format!("?{n}");
        let (sql, _) = build(&q, &pids, &pg, "r.seq", false, Some(0));
        assert!(sql.contains("+i.lo < $"), "{sql}");
        assert!(sql.contains("+i.num >= $"), "{sql}");
        let (sql, _) = build(&q, &pids, &lite, "r.seq", false, Some(0));
        assert!(!sql.contains("+i."), "{sql}");
        // The date group driving: its comparison must stay indexable.
        let (sql, _) = build(&q, &pids, &pg, "r.seq", false, Some(1));
        assert!(sql.contains(" i.lo < $"), "{sql}");
        assert!(sql.contains("+i.num >= $"), "{sql}");
        // Without a driver every group is a list: all indexable.
        let (sql, _) = build(&q, &pids, &pg, "r.seq", false, None);
        assert!(!sql.contains("+i."), "{sql}");
    }
}
