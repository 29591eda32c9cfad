//! Search values: what each official R4 SearchParameter selects from a
//! resource, as typed, normalised values ready to be indexed.
//!
//! The SearchParameter expressions are FHIRPath, but R4 uses a small subset
//! of it: paths, `|` unions, `(X as T)` / `X.as(T)`, `.where(resolve() is T)`,
//! `.where(field='literal')`, an index `[0]`, and one `exists()` expression
//! (`Patient.deceased`). [`compile`] parses exactly that subset and refuses
//! anything else, so an unsupported expression is visible (the parameter is
//! reported as not supported) rather than silently wrong. Evaluation tracks
//! each node's FHIR type through the StructureDefinitions, so a value is
//! converted by what it *is* (a `Coding`, a `Period`, a `HumanName`), not by
//! guessing from its JSON shape.
//!
//! Extracted values carry PHI: [`SearchValue`] has no `Display` and a
//! redacted `Debug`.

use crate::defs::definitions;
use crate::ids::ResourceType;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;
use unicode_normalization::UnicodeNormalization;

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    String,
    Token,
    Date,
    Reference,
    Number,
    Quantity,
    Uri,
    Composite,
    Special,
}

impl ParamKind {
    fn parse(s: &str) -> ParamKind {
        match s {
            "string" => ParamKind::String,
            "token" => ParamKind::Token,
            "date" => ParamKind::Date,
            "reference" => ParamKind::Reference,
            "number" => ParamKind::Number,
            "quantity" => ParamKind::Quantity,
            "uri" => ParamKind::Uri,
            "composite" => ParamKind::Composite,
            _ => ParamKind::Special,
        }
    }
}

/// Date precision of a FHIR date/dateTime/instant literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DatePrecision {
    Year,
    Month,
    Day,
    Second,
    Millisecond,
}

/// One value of one parameter, normalised for matching.
#[derive(Clone, PartialEq)]
pub enum SearchValue {
    /// `norm` is lowercased, accent-stripped, whitespace-collapsed (the
    /// default string match); `exact` is the value as written (`:exact`).
    Str {
        norm: String,
        exact: String,
    },
    /// A coded value. `text` is the display/text for `:text`.
    Token {
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
    },
    /// A time range `[lo, hi)` in milliseconds since the epoch; `literal`
    /// and `precision` keep the original (for date values indexed blind).
    Date {
        lo: i64,
        hi: i64,
        precision: DatePrecision,
        literal: String,
    },
    /// `Type/id` (relative), `#id` (contained), or an absolute URL / canonical.
    Reference(String),
    Number(f64),
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    Uri(String),
}

impl fmt::Debug for SearchValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            SearchValue::Str { .. } => "Str",
            SearchValue::Token { .. } => "Token",
            SearchValue::Date { .. } => "Date",
            SearchValue::Reference(_) => "Reference",
            SearchValue::Number(_) => "Number",
            SearchValue::Quantity { .. } => "Quantity",
            SearchValue::Uri(_) => "Uri",
        };
        write!(f, "SearchValue::{kind}([PHI REDACTED])")
    }
}

/// Normalise a string for the default (prefix, case- and accent-insensitive)
/// string search: NFKD, drop combining marks, lowercase, collapse spaces.
pub fn normalize(s: &str) -> String {
    let folded: String = s
        .nfkd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ------------------------------------------------------------ expressions

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Child(String),
    As(String),
    WhereResolve(String),
    WhereEq(String, String),
    Index(usize),
    Exists,
}

/// A compiled expression: a union of paths, each rooted at a type name.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    paths: Vec<(String, Vec<Step>)>,
}

/// Compile the R4 search-expression subset; `None` for anything outside it.
pub fn compile(expr: &str) -> Option<Expr> {
    // The one boolean expression in R4 (Patient.deceased): index whether
    // the element exists; `deceasedBoolean: false` is excluded below.
    let expr = expr
        .strip_suffix(" and Patient.deceased != false")
        .unwrap_or(expr);
    let mut paths = Vec::new();
    for part in expr.split(" | ") {
        let p = part.trim();
        // `(path as Type)` optionally followed by more steps.
        let (path, as_type, after) = match p.strip_prefix('(') {
            Some(inner) => {
                let close = inner.find(')')?;
                let (path, t) = inner[..close].split_once(" as ")?;
                (path.trim(), Some(t.trim().to_owned()), &inner[close + 1..])
            }
            None => (p, None, ""),
        };
        let root_end = path.find(['.', '[']).unwrap_or(path.len());
        let root = path[..root_end].to_owned();
        if root.is_empty() || !root.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        let mut steps = Vec::new();
        parse_steps(&path[root_end..], &mut steps)?;
        if let Some(t) = as_type {
            steps.push(Step::As(t));
        }
        parse_steps(after, &mut steps)?;
        paths.push((root, steps));
    }
    Some(Expr { paths })
}

fn parse_steps(mut rest: &str, steps: &mut Vec<Step>) -> Option<()> {
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let (n, r) = r.split_once(']')?;
            steps.push(Step::Index(n.parse().ok()?));
            rest = r;
            continue;
        }
        let r = rest.strip_prefix('.')?;
        if let Some(r) = r.strip_prefix("where(resolve() is ") {
            let (t, r) = r.split_once(')')?;
            steps.push(Step::WhereResolve(t.to_owned()));
            rest = r;
        } else if let Some(r) = r.strip_prefix("where(") {
            let (cond, r) = r.split_once(')')?;
            let (field, lit) = cond.split_once('=')?;
            let lit = lit.strip_prefix('\'')?.strip_suffix('\'')?;
            steps.push(Step::WhereEq(field.to_owned(), lit.to_owned()));
            rest = r;
        } else if let Some(r) = r.strip_prefix("as(") {
            let (t, r) = r.split_once(')')?;
            steps.push(Step::As(t.to_owned()));
            rest = r;
        } else if let Some(r) = r.strip_prefix("exists()") {
            steps.push(Step::Exists);
            rest = r;
        } else {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            steps.push(Step::Child(name.to_owned()));
            rest = &r[end..];
        }
    }
    Some(())
}

/// A node during evaluation: a JSON value and its FHIR type.
#[derive(Clone)]
struct Node<'a> {
    v: &'a Value,
    ty: String,
}

fn child<'a>(node: &Node<'a>, name: &str, out: &mut Vec<Node<'a>>) {
    let defs = definitions();
    let Some(obj) = node.v.as_object() else {
        return;
    };
    let Some(els) = defs.structure(&node.ty) else {
        return;
    };
    let Some(el) = els.get(name) else { return };
    let mut push = |v: &'a Value, ty: String| match v {
        Value::Array(items) => out.extend(items.iter().map(|i| Node {
            v: i,
            ty: ty.clone(),
        })),
        Value::Null => {}
        _ => out.push(Node { v, ty }),
    };
    if el.choice {
        for t in &el.types {
            let key = format!("{name}{}{}", t[..1].to_uppercase(), &t[1..]);
            if let Some(v) = obj.get(&key) {
                push(v, t.clone());
            }
        }
    } else if let Some(v) = obj.get(name) {
        let ty = if el.types.first().map(String::as_str) == Some("Resource") {
            v.get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("Resource")
                .to_owned()
        } else {
            el.types.first().cloned().unwrap_or_default()
        };
        push(v, ty);
    }
}

fn eval<'a>(expr: &Expr, rtype: &str, root: &'a Value) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    for (r, steps) in &expr.paths {
        if r != rtype && r != "Resource" && r != "DomainResource" {
            continue;
        }
        let start = vec![Node {
            v: root,
            ty: rtype.to_owned(),
        }];
        out.extend(run_steps(start, steps));
    }
    out
}

/// The root name of expressions compiled relative to an element.
const THIS: &str = "This";

/// Compile an expression relative to an element (a composite component's
/// `code` or `value.as(Quantity)`).
fn compile_relative(expr: &str) -> Option<Expr> {
    let joined = expr
        .split(" | ")
        .map(|p| format!("{THIS}.{}", p.trim()))
        .collect::<Vec<_>>()
        .join(" | ");
    compile(&joined)
}

fn eval_relative<'a>(expr: &Expr, node: &Node<'a>) -> Vec<Node<'a>> {
    expr.paths
        .iter()
        .filter(|(r, _)| r == THIS)
        .flat_map(|(_, steps)| run_steps(vec![node.clone()], steps))
        .collect()
}

fn run_steps<'a>(start: Vec<Node<'a>>, steps: &[Step]) -> Vec<Node<'a>> {
    {
        let mut cur = start;
        for s in steps {
            let mut next = Vec::new();
            match s {
                Step::Child(n) => cur.iter().for_each(|node| child(node, n, &mut next)),
                Step::As(t) => {
                    next = cur
                        .into_iter()
                        .filter(|n| n.ty.eq_ignore_ascii_case(t))
                        .collect()
                }
                Step::WhereResolve(t) => {
                    next = cur
                        .into_iter()
                        .filter(|n| {
                            n.v.get("reference")
                                .and_then(Value::as_str)
                                .is_some_and(|r| reference_type(r) == Some(t.as_str()))
                        })
                        .collect()
                }
                Step::WhereEq(f, lit) => {
                    next = cur
                        .into_iter()
                        .filter(|n| {
                            n.v.get(f.as_str()).and_then(Value::as_str) == Some(lit.as_str())
                        })
                        .collect()
                }
                Step::Index(i) => next = cur.into_iter().nth(*i).into_iter().collect(),
                Step::Exists => {
                    next = cur
                        .into_iter()
                        .filter(|n| n.v != &Value::Bool(false))
                        .map(|_| Node {
                            v: &Value::Bool(true),
                            ty: "boolean".into(),
                        })
                        .collect()
                }
            }
            cur = next;
        }
        cur
    }
}

/// The resource type a reference string points at, if it names one.
pub fn reference_type(r: &str) -> Option<&str> {
    let rel = match r.find("://") {
        Some(_) => {
            // Absolute: …/Type/id or …/Type/id/_history/v
            let parts: Vec<&str> = r.split('/').collect();
            let n = parts.len();
            let i = if n >= 4 && parts[n - 2] == "_history" {
                n - 4
            } else {
                n.checked_sub(2)?
            };
            return parts
                .get(i)
                .copied()
                .filter(|t| ResourceType::parse(t).is_some());
        }
        None => r,
    };
    rel.split('/')
        .next()
        .filter(|t| ResourceType::parse(t).is_some())
}

// ------------------------------------------------------------ conversion

/// The `[lo, hi)` range (ms) and precision of a date/dateTime/instant.
pub fn date_range(s: &str) -> Option<(i64, i64, DatePrecision)> {
    use chrono::{Datelike, NaiveDate, TimeZone, Utc};
    // Byte slicing below relies on this (search values come from URLs).
    if !s.is_ascii() {
        return None;
    }
    let ymd = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let ms = |d: NaiveDate| {
        Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?)
            .timestamp_millis()
            .into()
    };
    let ms = |d: NaiveDate| -> Option<i64> { ms(d) };
    match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            Some((
                ms(ymd(y, 1, 1)?)?,
                ms(ymd(y + 1, 1, 1)?)?,
                DatePrecision::Year,
            ))
        }
        7 => {
            let y: i32 = s[..4].parse().ok()?;
            let m: u32 = s.get(5..7)?.parse().ok()?;
            let start = ymd(y, m, 1)?;
            let end = if m == 12 {
                ymd(y + 1, 1, 1)?
            } else {
                ymd(y, m + 1, 1)?
            };
            Some((ms(start)?, ms(end)?, DatePrecision::Month))
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            let next = d.succ_opt()?;
            let _ = d.year();
            Some((ms(d)?, ms(next)?, DatePrecision::Day))
        }
        _ => {
            let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
            let lo = t.timestamp_millis();
            let has_fraction = s.get(19..20) == Some(".");
            if has_fraction {
                Some((lo, lo + 1, DatePrecision::Millisecond))
            } else {
                Some((lo, lo + 1000, DatePrecision::Second))
            }
        }
    }
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn strs<'a>(v: &'a Value, k: &str) -> Vec<&'a str> {
    match v.get(k) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(x)) => vec![x.as_str()],
        _ => vec![],
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_number().and_then(|n| n.to_string().parse().ok())
}

fn string_value(out: &mut Vec<SearchValue>, x: &str) {
    let norm = normalize(x);
    if !norm.is_empty() {
        out.push(SearchValue::Str {
            norm,
            exact: x.to_owned(),
        });
    }
}

fn coding(c: &Value) -> SearchValue {
    SearchValue::Token {
        system: s(c, "system").map(str::to_owned),
        code: s(c, "code").map(str::to_owned),
        text: s(c, "display").map(str::to_owned),
    }
}

fn date_value(out: &mut Vec<SearchValue>, lit: &str) {
    if let Some((lo, hi, precision)) = date_range(lit) {
        out.push(SearchValue::Date {
            lo,
            hi,
            precision,
            literal: lit.to_owned(),
        });
    }
}

fn convert(kind: ParamKind, n: &Node<'_>, out: &mut Vec<SearchValue>) {
    let v = n.v;
    match (kind, n.ty.as_str()) {
        (ParamKind::String, "HumanName") => {
            for k in ["family", "text"] {
                if let Some(x) = s(v, k) {
                    string_value(out, x);
                }
            }
            for k in ["given", "prefix", "suffix"] {
                strs(v, k).into_iter().for_each(|x| string_value(out, x));
            }
        }
        (ParamKind::String, "Address") => {
            for x in strs(v, "line") {
                string_value(out, x);
            }
            for k in ["city", "district", "state", "postalCode", "country", "text"] {
                if let Some(x) = s(v, k) {
                    string_value(out, x);
                }
            }
        }
        (ParamKind::String, _) => {
            if let Some(x) = v.as_str() {
                string_value(out, x);
            }
        }
        (ParamKind::Token, "Coding") => out.push(coding(v)),
        (ParamKind::Token, "CodeableConcept") => {
            if let Some(Value::Array(cs)) = v.get("coding") {
                out.extend(cs.iter().map(coding));
            }
            if let Some(t) = s(v, "text") {
                out.push(SearchValue::Token {
                    system: None,
                    code: None,
                    text: Some(t.to_owned()),
                });
            }
        }
        (ParamKind::Token, "Identifier") => out.push(SearchValue::Token {
            system: s(v, "system").map(str::to_owned),
            code: s(v, "value").map(str::to_owned),
            text: v.get("type").and_then(|t| s(t, "text")).map(str::to_owned),
        }),
        (ParamKind::Token, "ContactPoint") => {
            if let Some(x) = s(v, "value") {
                out.push(SearchValue::Token {
                    system: None,
                    code: Some(x.to_owned()),
                    text: None,
                });
            }
        }
        (ParamKind::Token, _) => {
            let code = match v {
                Value::String(x) => Some(x.clone()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            };
            if code.is_some() {
                out.push(SearchValue::Token {
                    system: None,
                    code,
                    text: None,
                });
            }
        }
        (ParamKind::Date, "Period") => {
            let lo = s(v, "start")
                .and_then(date_range)
                .map(|r| r.0)
                .unwrap_or(i64::MIN);
            let hi = s(v, "end")
                .and_then(date_range)
                .map(|r| r.1)
                .unwrap_or(i64::MAX);
            if lo != i64::MIN || hi != i64::MAX {
                out.push(SearchValue::Date {
                    lo,
                    hi,
                    precision: DatePrecision::Millisecond,
                    literal: String::new(),
                });
            }
        }
        (ParamKind::Date, "Timing") => {
            strs(v, "event")
                .into_iter()
                .for_each(|e| date_value(out, e));
            if let Some(b) = v.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                convert(
                    kind,
                    &Node {
                        v: b,
                        ty: "Period".into(),
                    },
                    out,
                );
            }
        }
        (ParamKind::Date, _) => {
            if let Some(x) = v.as_str() {
                date_value(out, x);
            }
        }
        (ParamKind::Reference, "Reference") => {
            if let Some(r) = s(v, "reference") {
                out.push(SearchValue::Reference(r.to_owned()));
            }
        }
        (ParamKind::Reference, _) => {
            if let Some(r) = v.as_str() {
                out.push(SearchValue::Reference(r.to_owned()));
            }
        }
        (ParamKind::Number, _) => {
            if let Some(x) = num(v) {
                out.push(SearchValue::Number(x));
            }
        }
        (
            ParamKind::Quantity,
            "Quantity" | "Age" | "Duration" | "Count" | "Distance" | "SimpleQuantity"
            | "MoneyQuantity",
        ) => {
            if let Some(x) = v.get("value").and_then(num) {
                out.push(SearchValue::Quantity {
                    value: x,
                    system: s(v, "system").map(str::to_owned),
                    code: s(v, "code").map(str::to_owned),
                    unit: s(v, "unit").map(str::to_owned),
                });
            }
        }
        (ParamKind::Quantity, "Money") => {
            if let Some(x) = v.get("value").and_then(num) {
                out.push(SearchValue::Quantity {
                    value: x,
                    system: Some("urn:iso:std:iso:4217".into()),
                    code: s(v, "currency").map(str::to_owned),
                    unit: None,
                });
            }
        }
        (ParamKind::Uri, _) => {
            if let Some(x) = v.as_str() {
                out.push(SearchValue::Uri(x.to_owned()));
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------ parameters

/// A search parameter as Phylax supports it.
#[derive(Debug, Clone)]
pub struct SearchParam {
    pub code: String,
    pub kind: ParamKind,
    expr: Option<Expr>,
    /// For a composite: whether Phylax indexes it (see `extract_composites`).
    composite_ok: bool,
}

impl SearchParam {
    /// The top-level elements of `rtype` this parameter reads (the first
    /// step of each of its paths rooted at `rtype` or `Resource`), e.g.
    /// `name` for `family`. Lets field masking refuse searches and sorts
    /// that would test a masked element. Empty when it has no expression.
    pub fn top_elements(&self, rtype: &str) -> Vec<String> {
        let Some(e) = &self.expr else {
            return Vec::new();
        };
        e.paths
            .iter()
            .filter(|(root, _)| root == rtype || root == "Resource" || root == "DomainResource")
            .filter_map(|(_, steps)| match steps.first() {
                Some(Step::Child(c)) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// True when values can be extracted and indexed for this parameter.
    /// `phonetic` is excluded: R4 gives it the same expression as `name`,
    /// and a prefix match is not a phonetic match, so claiming it would be
    /// untruthful.
    pub fn indexable(&self) -> bool {
        match self.kind {
            ParamKind::Composite => self.composite_ok,
            ParamKind::Special => false,
            _ => self.expr.is_some() && self.code != "phonetic",
        }
    }
}

/// The parameters of each resource type (its own plus the common `_tag`,
/// `_profile`, `_security`, `_source`, `_lastUpdated`, `_id`).
pub fn params(rtype: &ResourceType) -> &'static HashMap<String, SearchParam> {
    static ALL: OnceLock<HashMap<&'static str, HashMap<String, SearchParam>>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let d = definitions();
        let common: Vec<_> = d
            .search_params("Resource")
            .iter()
            .chain(d.search_params("DomainResource"))
            .collect();
        d.resource_types()
            .iter()
            .map(|t| {
                let map = common
                    .iter()
                    .copied()
                    .chain(d.search_params(t))
                    .map(|p| {
                        let kind = ParamKind::parse(&p.kind);
                        let composite_ok = kind == ParamKind::Composite
                            && composite_second_of(t, &p.code).is_some();
                        let sp = SearchParam {
                            code: p.code.clone(),
                            kind,
                            expr: p.expression.as_deref().and_then(compile),
                            composite_ok,
                        };
                        (p.code.clone(), sp)
                    })
                    .collect();
                (t.as_str(), map)
            })
            .collect()
    });
    // Every ResourceType comes from the same definitions table.
    static EMPTY: OnceLock<HashMap<String, SearchParam>> = OnceLock::new();
    all.get(rtype.as_str())
        .unwrap_or_else(|| EMPTY.get_or_init(HashMap::new))
}

/// Every indexable value of every parameter of `resource`.
pub fn extract(rtype: &ResourceType, resource: &Value) -> Vec<(&'static str, SearchValue)> {
    let mut out = Vec::new();
    for (code, p) in params(rtype) {
        if !p.indexable()
            || p.kind == ParamKind::Composite
            || code == "_id"
            || code == "_lastUpdated"
        {
            continue;
        }
        let Some(expr) = &p.expr else { continue };
        let mut vals = Vec::new();
        for node in eval(expr, rtype.as_str(), resource) {
            convert(p.kind, &node, &mut vals);
        }
        vals.dedup();
        out.extend(vals.into_iter().map(|v| (code.as_str(), v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> ResourceType {
        ResourceType::parse(s).unwrap()
    }

    fn values<'a>(all: &'a [(&str, SearchValue)], code: &str) -> Vec<&'a SearchValue> {
        all.iter()
            .filter(|(c, _)| *c == code)
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn nearly_every_expression_compiles() {
        let d = definitions();
        let mut failed = Vec::new();
        let mut total = 0;
        for rt in d.resource_types() {
            for p in d.search_params(rt) {
                if let Some(e) = &p.expression {
                    total += 1;
                    if compile(e).is_none() {
                        failed.push(e.clone());
                    }
                }
            }
        }
        assert!(total > 1300, "{total}");
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[test]
    fn normalisation_folds_case_accents_and_space() {
        assert_eq!(
            normalize("  Ångström  Müller-Lüdenscheidt "),
            "angstrom muller-ludenscheidt"
        );
        assert_eq!(normalize("ÉLODIE"), "elodie");
        assert_eq!(normalize("ﬁ"), "fi");
    }

    #[test]
    fn patient_values() {
        let p = json!({"resourceType":"Patient","id":"p1",
            "meta": {"tag": [{"system":"http://t","code":"vip"}], "lastUpdated":"2024-01-01T00:00:00Z"},
            "name":[{"family":"Éclair","given":["Anna","Maria"],"text":"Anna Éclair"}],
            "identifier":[{"system":"urn:mrn","value":"123"}],
            "telecom":[{"system":"phone","value":"555-1"},{"system":"email","value":"a@b.c"}],
            "gender":"female","birthDate":"1970-05","active":true,
            "deceasedBoolean": false,
            "address":[{"line":["1 Main St"],"city":"Springfield","postalCode":"12345"}],
            "managingOrganization":{"reference":"Organization/o1"},
            "generalPractitioner":[{"reference":"Practitioner/d1"}]});
        let v = extract(&t("Patient"), &p);
        let fam = values(&v, "family");
        assert_eq!(
            fam,
            vec![&SearchValue::Str {
                norm: "eclair".into(),
                exact: "Éclair".into()
            }]
        );
        assert_eq!(values(&v, "name").len(), 4, "family, text, two givens");
        assert_eq!(values(&v, "given").len(), 2);
        assert_eq!(
            values(&v, "identifier"),
            vec![&SearchValue::Token {
                system: Some("urn:mrn".into()),
                code: Some("123".into()),
                text: None
            }]
        );
        assert_eq!(values(&v, "phone").len(), 1);
        assert_eq!(values(&v, "email").len(), 1);
        assert_eq!(values(&v, "telecom").len(), 2);
        assert_eq!(values(&v, "gender").len(), 1);
        assert_eq!(
            values(&v, "active"),
            vec![&SearchValue::Token {
                system: None,
                code: Some("true".into()),
                text: None
            }]
        );
        assert!(
            values(&v, "deceased").is_empty(),
            "deceasedBoolean false is not deceased"
        );
        match values(&v, "birthdate")[0] {
            SearchValue::Date {
                precision, literal, ..
            } => {
                assert_eq!(*precision, DatePrecision::Month);
                assert_eq!(literal, "1970-05");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(values(&v, "address").len(), 3);
        assert_eq!(values(&v, "address-city").len(), 1);
        assert_eq!(
            values(&v, "organization"),
            vec![&SearchValue::Reference("Organization/o1".into())]
        );
        assert_eq!(values(&v, "general-practitioner").len(), 1);
        assert_eq!(values(&v, "_tag").len(), 1);
        let dead = json!({"resourceType":"Patient","deceasedDateTime":"2020-01-01T10:00:00Z"});
        let v = extract(&t("Patient"), &dead);
        assert_eq!(values(&v, "deceased").len(), 1);
        assert_eq!(values(&v, "death-date").len(), 1);
    }

    #[test]
    fn observation_values_follow_choice_types_and_resolve_filters() {
        let o = json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"29463-7","display":"Body weight"}],"text":"Weight"},
            "subject":{"reference":"Patient/p1"},
            "effectivePeriod":{"start":"2024-01-01","end":"2024-01-02"},
            "valueQuantity":{"value":72.5,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"},
            "performer":[{"reference":"Practitioner/x"}]});
        let v = extract(&t("Observation"), &o);
        assert_eq!(values(&v, "code").len(), 2, "coding and text");
        assert_eq!(
            values(&v, "subject"),
            vec![&SearchValue::Reference("Patient/p1".into())]
        );
        assert_eq!(
            values(&v, "patient"),
            vec![&SearchValue::Reference("Patient/p1".into())]
        );
        match values(&v, "value-quantity")[0] {
            SearchValue::Quantity { value, code, .. } => {
                assert_eq!(*value, 72.5);
                assert_eq!(code.as_deref(), Some("kg"));
            }
            o => panic!("{o:?}"),
        }
        match values(&v, "date")[0] {
            SearchValue::Date { lo, hi, .. } => {
                assert_eq!(*lo, date_range("2024-01-01").unwrap().0);
                assert_eq!(*hi, date_range("2024-01-02").unwrap().1);
            }
            o => panic!("{o:?}"),
        }
        assert!(values(&v, "value-date").is_empty());
        // A Group subject is not a patient.
        let g = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Group/g"}});
        let v = extract(&t("Observation"), &g);
        assert!(values(&v, "patient").is_empty());
        assert_eq!(values(&v, "subject").len(), 1);
    }

    #[test]
    fn date_ranges_follow_precision() {
        let (lo, hi, p) = date_range("2024").unwrap();
        assert_eq!(p, DatePrecision::Year);
        assert_eq!(hi - lo, 366 * 86_400_000, "2024 is a leap year");
        let (lo, hi, _) = date_range("2023-02").unwrap();
        assert_eq!(hi - lo, 28 * 86_400_000);
        let (lo, hi, _) = date_range("2023-12-31").unwrap();
        assert_eq!(hi - lo, 86_400_000);
        let (lo, hi, p) = date_range("2023-12-31T23:00:00+01:00").unwrap();
        assert_eq!((hi - lo, p), (1000, DatePrecision::Second));
        assert_eq!(lo, date_range("2023-12-31T22:00:00Z").unwrap().0);
        assert_eq!(
            date_range("2023-12-31T22:00:00.250Z").unwrap().2,
            DatePrecision::Millisecond
        );
        assert!(date_range("2023-13").is_none());
        assert!(
            date_range("abcé12").is_none(),
            "multi-byte input must not panic"
        );
        assert!(date_range("éééé").is_none());
        assert!(date_range("nonsense").is_none());
    }

    #[test]
    fn references_types() {
        assert_eq!(reference_type("Patient/1"), Some("Patient"));
        assert_eq!(reference_type("https://x/fhir/Patient/1"), Some("Patient"));
        assert_eq!(
            reference_type("https://x/fhir/Patient/1/_history/2"),
            Some("Patient")
        );
        assert_eq!(reference_type("#c1"), None);
        assert_eq!(reference_type("Nope/1"), None);
    }

    #[test]
    fn debug_is_redacted() {
        let v = SearchValue::Str {
            norm: "secretname".into(),
            exact: "SecretName".into(),
        };
        assert!(!format!("{v:?}").contains("ecret"));
    }

    #[test]
    fn every_type_extracts_from_a_bare_instance_without_panicking() {
        for rt in definitions().resource_types() {
            let r = ResourceType::parse(rt).unwrap();
            let _ = extract(&r, &json!({"resourceType": rt, "id": "x"}));
        }
    }
}

/// Composite values: for each composite parameter of two components whose
/// first is a token (all of R4's but MolecularSequence's coordinates), the
/// pairs of component values taken **from the same element** (the same
/// Observation.component, for instance), as `(code, token, second)`.
pub fn extract_composites(
    rtype: &ResourceType,
    resource: &Value,
) -> Vec<(&'static str, SearchValue, SearchValue)> {
    let mut out = Vec::new();
    for (code, c) in definitions().composites(rtype.as_str()) {
        let [(k1, e1), (k2, e2)] = c.components.as_slice() else {
            continue;
        };
        if k1 != "token" {
            continue;
        }
        let (Some(ctx), Some(e1), Some(e2)) = (
            compile(&c.expression),
            compile_relative(e1),
            compile_relative(e2),
        ) else {
            continue;
        };
        let k2 = ParamKind::parse(k2);
        for node in eval(&ctx, rtype.as_str(), resource) {
            let mut a = Vec::new();
            for n in eval_relative(&e1, &node) {
                convert(ParamKind::Token, &n, &mut a);
            }
            let mut b = Vec::new();
            for n in eval_relative(&e2, &node) {
                convert(k2, &n, &mut b);
            }
            for x in &a {
                for y in &b {
                    out.push((code, x.clone(), y.clone()));
                }
            }
        }
    }
    out
}

/// Whether `code` is a composite parameter of `rtype` that Phylax indexes
/// (two components, the first a token), and the kind of its second.
pub fn composite_second(rtype: &ResourceType, code: &str) -> Option<ParamKind> {
    composite_second_of(rtype.as_str(), code)
}

fn composite_second_of(rtype: &str, code: &str) -> Option<ParamKind> {
    let (_, c) = definitions().composites(rtype).find(|(k, _)| *k == code)?;
    match c.components.as_slice() {
        [(k1, e1), (k2, e2)]
            if k1 == "token"
                && compile_relative(e1).is_some()
                && compile_relative(e2).is_some() =>
        {
            Some(ParamKind::parse(k2))
        }
        _ => None,
    }
}

/// A value to order search results by (`_sort`).
#[derive(Clone, PartialEq, PartialOrd)]
pub enum SortKey {
    Num(f64),
    Text(String),
}

impl fmt::Debug for SortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SortKey([PHI REDACTED])")
    }
}

impl SortKey {
    fn of(v: &SearchValue) -> SortKey {
        match v {
            SearchValue::Str { norm, .. } => SortKey::Text(norm.clone()),
            SearchValue::Token { code, text, .. } => {
                SortKey::Text(code.clone().or_else(|| text.clone()).unwrap_or_default())
            }
            SearchValue::Date { lo, .. } => SortKey::Num(*lo as f64),
            SearchValue::Reference(r) | SearchValue::Uri(r) => SortKey::Text(r.clone()),
            SearchValue::Number(n) => SortKey::Num(*n),
            SearchValue::Quantity { value, .. } => SortKey::Num(*value),
        }
    }

    /// Total order: numbers before text, NaN last among numbers.
    pub fn compare(&self, other: &SortKey) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self, other) {
            (SortKey::Num(a), SortKey::Num(b)) => a
                .partial_cmp(b)
                .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan())),
            (SortKey::Text(a), SortKey::Text(b)) => a.cmp(b),
            (SortKey::Num(_), SortKey::Text(_)) => Ordering::Less,
            (SortKey::Text(_), SortKey::Num(_)) => Ordering::Greater,
        }
    }
}

/// The key a resource sorts by for parameter `code`: its smallest value
/// ascending, its largest descending (FHIR leaves multi-valued sorting to
/// the server; this is what most servers do). `None`: no value (sorts last).
pub fn sort_key(
    rtype: &ResourceType,
    resource: &Value,
    code: &str,
    descending: bool,
) -> Option<SortKey> {
    let keys = extract(rtype, resource)
        .into_iter()
        .filter(|(c, _)| *c == code)
        .map(|(_, v)| SortKey::of(&v));
    if descending {
        keys.max_by(|a, b| a.compare(b))
    } else {
        keys.min_by(|a, b| a.compare(b))
    }
}
