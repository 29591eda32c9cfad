//! The index entries a resource gets when it is written: keyed blind
//! hashes for strings, tokens, references and identifying dates; plain
//! ranges for clinical dates and numbers.

use phylax_crypto::BlindIndexKey;
use phylax_fhir::search::{self as fs, normalize, DatePrecision, SearchValue};
use phylax_fhir::ResourceType;
use phylax_store::IndexRow;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Bounds on one search: parameters, and comma-separated values per
/// parameter. They keep every query far below the databases' limits on
/// bound parameters (and the work one request can ask for).
pub const MAX_PARAMS: usize = 64;
pub const MAX_VALUES: usize = 100;

/// Longest string prefix indexed (characters). Longer search values are
/// refused with a clear message rather than matched approximately.
pub const MAX_PREFIX: usize = 64;

/// Dates that identify a person: indexed blind, searchable by equality at
/// year, month or day precision only.
pub(super) fn identifying_date(rtype: &str, code: &str) -> bool {
    matches!(
        (rtype, code),
        ("Patient", "birthdate")
            | ("Patient", "death-date")
            | ("Person", "birthdate")
            | ("RelatedPerson", "birthdate")
    )
}

pub(super) fn hash(key: &BlindIndexKey, parts: &[&str]) -> Vec<u8> {
    let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    key.entry(&bytes).to_vec()
}

pub(super) fn hrow(param: &str, h: Vec<u8>) -> IndexRow {
    IndexRow {
        param: param.to_owned(),
        hash: Some(h),
        lo: None,
        hi: None,
        num: None,
    }
}

pub(super) fn prefixes(s: &str) -> impl Iterator<Item = &str> {
    s.char_indices()
        .map(|(i, c)| &s[..i + c.len_utf8()])
        .take(MAX_PREFIX)
}

/// A reference to a local resource in its canonical form, `Type/id`
/// (absolute to this server's base or versioned, it names the same
/// resource: `phylax_fhir::reference`); anything else as it is.
pub(super) fn local_reference<'a>(r: &'a str, fhir_base: &str) -> std::borrow::Cow<'a, str> {
    match phylax_fhir::reference::target(r, &[fhir_base]) {
        Some((t, id)) if r.len() == t.len() + 1 + id.len() => std::borrow::Cow::Borrowed(r),
        Some((t, id)) => std::borrow::Cow::Owned(format!("{t}/{id}")),
        None => std::borrow::Cow::Borrowed(r),
    }
}

/// `Type/id` (without `_history`) when `r` is a relative literal reference.
pub(super) fn type_and_id(r: &str) -> Option<(&str, &str)> {
    let mut it = r.split('/');
    let (t, id) = (it.next()?, it.next()?);
    match (it.next(), it.next(), it.next()) {
        (None, _, _) | (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    (ResourceType::parse(t).is_some() && phylax_fhir::ids::is_valid_id(id)).then_some((t, id))
}

/// Reference parameters whose targets are few (R4's `subject` on
/// Observation: Device, Group, Location, Patient) store no bare-id entry
/// for a reference to one of those targets: a search by bare id looks for
/// `Type/id` under each target instead (plus the bare-id entry, which a
/// reference to some other type still gets). Same answers; three fewer
/// entries per Observation. Parameters with no target list, or R4's
/// "any type" lists (145 types), keep their bare-id entries.
pub(super) const MAX_EXPANDED_TARGETS: usize = 10;

/// The targets a bare id is expanded to on `code` of `rtype`, if few.
pub(super) fn expanded_targets(rtype: &str, code: &str) -> &'static [String] {
    let t = phylax_fhir::defs::definitions().reference_targets(rtype, code);
    if t.len() <= MAX_EXPANDED_TARGETS {
        t
    } else {
        &[]
    }
}

/// String parameters whose values mostly repeat those of narrower official
/// parameters of the same resource (`name` = `family` + `given` + …,
/// `address` = line + `address-city` + …). A value already indexed under a
/// component is not indexed again under the broad parameter; a search on the
/// broad parameter also looks in its components. Same answers, ~40% fewer
/// entries for a typical patient.
pub(super) const COMPOSED: &[(&str, &[&str])] = &[
    ("name", &["family", "given"]),
    (
        "address",
        &[
            "address-city",
            "address-country",
            "address-postalcode",
            "address-state",
        ],
    ),
];

/// Parameters whose expression (or composite context) is exactly the union
/// of two others': they get no index entries of their own, and a search on
/// one is the OR of searches on its parts (the same answers; an
/// Observation without components has a third fewer entries). A test
/// checks each against the definitions.
pub(super) const UNIONS: &[(&str, &str, [&str; 2])] = &[
    ("Observation", "combo-code", ["code", "component-code"]),
    (
        "Observation",
        "combo-code-value-concept",
        ["code-value-concept", "component-code-value-concept"],
    ),
    (
        "Observation",
        "combo-code-value-quantity",
        ["code-value-quantity", "component-code-value-quantity"],
    ),
    (
        "Observation",
        "combo-data-absent-reason",
        ["data-absent-reason", "component-data-absent-reason"],
    ),
    (
        "Observation",
        "combo-value-concept",
        ["value-concept", "component-value-concept"],
    ),
    (
        "Observation",
        "combo-value-quantity",
        ["value-quantity", "component-value-quantity"],
    ),
];

/// The parts of a union parameter (see [`UNIONS`]).
pub(super) fn union_parts(rtype: &ResourceType, code: &str) -> Option<[&'static str; 2]> {
    UNIONS
        .iter()
        .find(|(t, c, _)| *t == rtype.as_str() && *c == code)
        .map(|(_, _, parts)| *parts)
}

/// The indexable component parameters of `code` on `rtype`.
pub(super) fn components(rtype: &ResourceType, code: &str) -> Vec<&'static str> {
    let defs = fs::params(rtype);
    COMPOSED
        .iter()
        .filter(|(p, _)| *p == code)
        .flat_map(|(_, cs)| cs.iter().copied())
        .filter(|c| defs.get(*c).is_some_and(|p| p.indexable()))
        .collect()
}

/// The index entries of one resource version.
/// The keys of a composite's first (token) component: by code alone, and
/// by system and code.
pub(super) fn composite_keys(system: Option<&str>, code: &str) -> Vec<String> {
    let mut k = vec![format!("c:{code}")];
    if let Some(s) = system {
        k.push(format!("s:{s}|{code}"));
    }
    k
}

/// The key a query's token part selects (`system|code`, `|code`, `code`).
pub(super) fn composite_query_key(v: &str) -> String {
    match v.split_once('|') {
        Some((s, c)) if !s.is_empty() => format!("s:{s}|{c}"),
        Some((_, c)) => format!("c:{c}"),
        None => format!("c:{v}"),
    }
}

/// Index entries of composite parameters: one per pair of component values
/// from the same element, the first component (a token) always blind:
/// token+token and token+string as one hash; token+quantity and
/// token+date as a hash with the number or range (plaintext, as for the
/// plain parameters of the same values); token+reference as one hash.
pub(super) fn composite_rows(
    key: &BlindIndexKey,
    fhir_base: &str,
    rtype: &ResourceType,
    resource: &Value,
    rows: &mut Vec<IndexRow>,
) {
    for (code, first, second) in fs::extract_composites(rtype, resource) {
        if union_parts(rtype, code).is_some() {
            continue;
        }
        let SearchValue::Token {
            system,
            code: Some(c1),
            ..
        } = &first
        else {
            continue;
        };
        for k1 in composite_keys(system.as_deref(), c1) {
            match &second {
                SearchValue::Token {
                    system: s2,
                    code: Some(c2),
                    ..
                } => {
                    for k2 in composite_keys(s2.as_deref(), c2) {
                        rows.push(hrow(code, hash(key, &["ct", code, &k1, &k2])));
                    }
                }
                SearchValue::Quantity { value, .. } => rows.push(IndexRow {
                    param: code.to_owned(),
                    hash: Some(hash(key, &["cq", code, &k1])),
                    lo: None,
                    hi: None,
                    num: Some(*value),
                }),
                SearchValue::Date { lo, hi, .. } => rows.push(IndexRow {
                    param: code.to_owned(),
                    hash: Some(hash(key, &["cd", code, &k1])),
                    lo: Some(*lo),
                    hi: Some(*hi),
                    num: None,
                }),
                SearchValue::Str { norm, .. } => {
                    rows.push(hrow(code, hash(key, &["cx", code, &k1, norm])))
                }
                SearchValue::Reference(r) => {
                    let r = local_reference(r, fhir_base);
                    rows.push(hrow(code, hash(key, &["cr", code, &k1, &r])));
                }
                _ => {}
            }
        }
    }
}

/// A token's entries: code, system|code (or |code), system|, and the
/// words of its text.
fn token_rows(
    key: &BlindIndexKey,
    code: &str,
    system: Option<String>,
    c: Option<String>,
    text: Option<String>,
    rows: &mut Vec<IndexRow>,
) {
    if let Some(c) = &c {
        rows.push(hrow(code, hash(key, &["tc", code, c])));
        match &system {
            Some(s) => rows.push(hrow(code, hash(key, &["ts", code, s, c]))),
            None => rows.push(hrow(code, hash(key, &["tn", code, c]))),
        }
    }
    if let Some(s) = &system {
        rows.push(hrow(code, hash(key, &["tS", code, s])));
    }
    if let Some(t) = text {
        // `:text` matches whole words or the whole text (FHIR leaves the
        // matching to the server); words, not every prefix, keep the entry
        // count small.
        let n = normalize(&t);
        for w in n.split(' ').chain(std::iter::once(n.as_str())) {
            rows.push(hrow(code, hash(key, &["tt", code, w])));
        }
    }
}

/// A date that identifies a person: blind at year, month and day
/// precision (as far as the value is precise).
fn blind_date_rows(
    key: &BlindIndexKey,
    code: &str,
    precision: DatePrecision,
    literal: &str,
    rows: &mut Vec<IndexRow>,
) {
    for (p, n) in [
        (DatePrecision::Year, 4),
        (DatePrecision::Month, 7),
        (DatePrecision::Day, 10),
    ] {
        if precision >= p && literal.len() >= n {
            rows.push(hrow(code, hash(key, &["d", code, &literal[..n]])));
        }
    }
}

/// A quantity: its number, with its unit code (or unit) and system|code
/// blind.
fn quantity_rows(
    key: &BlindIndexKey,
    code: &str,
    value: f64,
    system: Option<String>,
    c: Option<String>,
    unit: Option<String>,
    rows: &mut Vec<IndexRow>,
) {
    let num = |h: Option<Vec<u8>>| IndexRow {
        param: code.to_owned(),
        hash: h,
        lo: None,
        hi: None,
        num: Some(value),
    };
    rows.push(num(None));
    if let Some(u) = c.as_ref().or(unit.as_ref()) {
        rows.push(num(Some(hash(key, &["qc", code, u]))));
    }
    if let (Some(s), Some(c)) = (&system, &c) {
        rows.push(num(Some(hash(key, &["qs", code, s, c]))));
    }
}

pub fn index_rows(
    key: &BlindIndexKey,
    fhir_base: &str,
    rtype: &ResourceType,
    resource: &Value,
) -> Vec<IndexRow> {
    let mut rows = Vec::new();
    let values = fs::extract(rtype, resource);
    // Exact string values per parameter, to skip broad duplicates.
    let mut strings: HashMap<&str, HashSet<String>> = HashMap::new();
    for (code, v) in &values {
        if let SearchValue::Str { exact, .. } = v {
            strings.entry(code).or_default().insert(exact.clone());
        }
    }
    for (code, v) in values {
        if union_parts(rtype, code).is_some() {
            continue;
        }
        let covered = |exact: &str| {
            components(rtype, code)
                .iter()
                .any(|c| strings.get(c).is_some_and(|set| set.contains(exact)))
        };
        match v {
            SearchValue::Str { exact, .. } if covered(&exact) => {}
            SearchValue::Str { norm, exact } => {
                for p in prefixes(&norm) {
                    rows.push(hrow(code, hash(key, &["s", code, p])));
                }
                rows.push(hrow(code, hash(key, &["x", code, &exact])));
            }
            SearchValue::Token {
                system,
                code: c,
                text,
            } => token_rows(key, code, system, c, text, &mut rows),
            SearchValue::Reference(r) => {
                let r = local_reference(&r, fhir_base);
                let r: &str = &r;
                if let Some((t, id)) = type_and_id(r) {
                    rows.push(hrow(code, hash(key, &["r", code, &format!("{t}/{id}")])));
                    if !expanded_targets(rtype.as_str(), code)
                        .iter()
                        .any(|x| x == t)
                    {
                        rows.push(hrow(code, hash(key, &["ri", code, id])));
                    }
                } else if !r.starts_with('#') {
                    rows.push(hrow(code, hash(key, &["r", code, r])));
                }
            }
            SearchValue::Uri(u) => rows.push(hrow(code, hash(key, &["u", code, &u]))),
            SearchValue::Date {
                lo,
                hi,
                precision,
                literal,
            } => {
                if identifying_date(rtype.as_str(), code) {
                    blind_date_rows(key, code, precision, &literal, &mut rows);
                } else {
                    rows.push(IndexRow {
                        param: code.to_owned(),
                        hash: None,
                        lo: Some(lo),
                        hi: Some(hi),
                        num: None,
                    });
                }
            }
            SearchValue::Number(n) => rows.push(IndexRow {
                param: code.to_owned(),
                hash: None,
                lo: None,
                hi: None,
                num: Some(n),
            }),
            SearchValue::Quantity {
                value,
                system,
                code: c,
                unit,
            } => quantity_rows(key, code, value, system, c, unit, &mut rows),
        }
    }
    composite_rows(key, fhir_base, rtype, resource, &mut rows);
    rows.sort_by(|a, b| (&a.param, &a.hash, a.lo, a.hi).cmp(&(&b.param, &b.hash, b.lo, b.hi)));
    rows.dedup();
    rows
}

// ------------------------------------------------------------ parameters
