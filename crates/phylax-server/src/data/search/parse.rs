//! Search parameters turned into store conditions: modifiers, prefixes,
//! composite and union parameters, bounded by [`super::MAX_PARAMS`] and
//! [`super::MAX_VALUES`].

use super::index::{
    components, composite_query_key, expanded_targets, identifying_date, local_reference,
    type_and_id, union_parts, MAX_PARAMS, MAX_PREFIX, MAX_VALUES,
};
use crate::base::error::Failure;
use phylax_crypto::BlindIndexKey;
use phylax_fhir::search::{self as fs, normalize, ParamKind};
use phylax_fhir::{Issue, IssueCode, ResourceType};
use phylax_store::{Cond, NumOp, RangeOp};

/// Internal parameter carrying a compartment search's patient (`Patient/id`)
/// through sealed cursors. Stripped from client input.
pub const COMPARTMENT_PARAM: &str = "_compartment";

/// Parameters that control the result rather than select resources.
pub(super) const CONTROL: &[&str] = &[
    "_count",
    "_cursor",
    "_total",
    "_format",
    "_include",
    "_revinclude",
    "_include:iterate",
    "_revinclude:iterate",
    "_summary",
    "_elements",
    "_sort",
    COMPARTMENT_PARAM,
];

/// Every index entry a search looks for: under the current key, and while
/// the index is rebuilt under a new key also under the previous one
/// (docs/KEYS.md), so a resource not re-indexed yet is still found.
fn hash(key: &BlindIndexKey, parts: &[&str]) -> Vec<Vec<u8>> {
    let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    key.entries(&bytes)
        .into_iter()
        .map(|e| e.to_vec())
        .collect()
}

/// The index entries of token `system|code` for `param` (as written by
/// [`super::index_rows`]), to search for.
pub fn token_hash(key: &BlindIndexKey, param: &str, system: &str, code: &str) -> Vec<Vec<u8>> {
    hash(key, &["ts", param, system, code])
}

/// "Parameter `param` references one of `targets` (`Type/id`)".
pub fn references_to(key: &BlindIndexKey, param: &str, targets: &[String]) -> Cond {
    Cond::Hash {
        param: param.to_owned(),
        hashes: targets
            .iter()
            .flat_map(|t| hash(key, &["r", param, t]))
            .collect(),
    }
}

/// The condition "in the compartment of Patient/`patient_id`" for `rtype`,
/// from the official Patient CompartmentDefinition: any of the type's
/// compartment parameters references the patient (for `Patient`, the
/// patient itself too). A type outside the compartment matches nothing.
pub fn compartment_condition(
    key: &BlindIndexKey,
    rtype: &ResourceType,
    patient_id: &str,
) -> Vec<Cond> {
    let target = format!("Patient/{patient_id}");
    let mut group: Vec<Cond> = phylax_fhir::defs::definitions()
        .compartment_params(rtype.as_str())
        .iter()
        .map(|p| Cond::Hash {
            param: p.clone(),
            hashes: hash(key, &["r", p, &target]),
        })
        .collect();
    if rtype.as_str() == "Patient" {
        group.push(Cond::Ids(vec![patient_id.to_owned()]));
    }
    if group.is_empty() {
        group.push(Cond::Never);
    }
    group
}

/// A parsed search: condition groups, plus what was ignored.
#[derive(Debug)]
pub struct ParsedSearch {
    pub and: Vec<Vec<Cond>>,
    /// Names (never values) of parameters that were not understood.
    pub unknown: Vec<String>,
}

pub(super) fn invalid(msg: String) -> Failure {
    Failure::BadRequest(vec![Issue::error(IssueCode::Invalid, msg)])
}

pub(super) fn unsupported(msg: String) -> Failure {
    Failure::BadRequest(vec![Issue::error(IssueCode::NotSupported, msg)])
}

/// Split on commas not escaped with `\`, and unescape `\,` `\|` `\$` `\\`.
pub(super) fn split_values(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut esc = false;
    for c in v.chars() {
        match (esc, c) {
            (true, c) => {
                if let Some(last) = out.last_mut() {
                    if !matches!(c, ',' | '|' | '$' | '\\') {
                        last.push('\\');
                    }
                    last.push(c);
                }
                esc = false;
            }
            (false, '\\') => esc = true,
            (false, ',') => out.push(String::new()),
            (false, c) => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    // A dangling escape at the end is a literal backslash.
    if esc {
        if let Some(last) = out.last_mut() {
            last.push('\\');
        }
    }
    out
}

/// Split a token value on its first unescaped `|`.
pub(super) fn split_token(v: &str) -> (Option<&str>, &str) {
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'|' => return (Some(&v[..i]), &v[i + 1..]),
            _ => i += 1,
        }
    }
    (None, v)
}

pub(super) const PREFIXES: [(&str, RangeOp); 9] = [
    ("eq", RangeOp::Eq),
    ("ne", RangeOp::Ne),
    ("lt", RangeOp::Lt),
    ("gt", RangeOp::Gt),
    ("le", RangeOp::Le),
    ("ge", RangeOp::Ge),
    ("sa", RangeOp::Sa),
    ("eb", RangeOp::Eb),
    ("ap", RangeOp::Ap),
];

pub(super) fn prefix(v: &str) -> (RangeOp, &str) {
    for (p, op) in PREFIXES {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
                return (op, rest);
            }
        }
    }
    (RangeOp::Eq, v)
}

pub(super) fn date_cond(
    code: &str,
    param_name: &str,
    v: &str,
    last_updated: bool,
) -> Result<Cond, Failure> {
    let (op, lit) = prefix(v);
    let (lo, hi, _) = fs::date_range(lit).ok_or_else(|| {
        invalid(format!(
            "{param_name}: not a valid date, dateTime or instant"
        ))
    })?;
    Ok(if last_updated {
        Cond::LastUpdated { op, lo, hi }
    } else {
        Cond::Range {
            param: code.to_owned(),
            op,
            lo,
            hi,
            hashes: None,
        }
    })
}

/// A number's implicit range: half a unit of its last significant digit.
pub(super) fn number_range(lit: &str) -> Option<(f64, f64, f64)> {
    let v: f64 = lit.parse().ok()?;
    if !v.is_finite() || lit.contains(['e', 'E']) {
        return v.is_finite().then_some((v, v, v));
    }
    let decimals = lit.split_once('.').map(|(_, d)| d.len()).unwrap_or(0);
    let half = 0.5 * 10f64.powi(-(decimals as i32));
    Some((v, v - half, v + half))
}

pub(super) fn num_cond(
    code: &str,
    name: &str,
    v: &str,
    quantity: bool,
    key: &BlindIndexKey,
) -> Result<Cond, Failure> {
    let (op, rest) = prefix(v);
    let (lit, unit) = if quantity {
        let mut parts = rest.splitn(3, '|');
        let n = parts.next().unwrap_or_default();
        let sys = parts.next().filter(|s| !s.is_empty());
        let c = parts.next().filter(|s| !s.is_empty());
        let hashes = match (sys, c) {
            (Some(s), Some(c)) => Some(hash(key, &["qs", code, s, c])),
            (None, Some(c)) => Some(hash(key, &["qc", code, c])),
            (Some(_), None) => {
                return Err(invalid(format!("{name}: a quantity system needs a code")))
            }
            (None, None) => None,
        };
        (n, hashes)
    } else {
        (rest, None)
    };
    let (q, lo, hi) = number_range(lit).ok_or_else(|| invalid(format!("{name}: not a number")))?;
    let (nop, lo, hi) = match op {
        RangeOp::Eq => (NumOp::Eq, lo, hi),
        RangeOp::Ne => (NumOp::Ne, lo, hi),
        RangeOp::Lt | RangeOp::Eb => (NumOp::Lt, q, q),
        RangeOp::Le => (NumOp::Le, q, q),
        RangeOp::Gt | RangeOp::Sa => (NumOp::Gt, q, q),
        RangeOp::Ge => (NumOp::Ge, q, q),
        // Approximately: within 10% of the value.
        RangeOp::Ap => (
            NumOp::Eq,
            q - (q * 0.1).abs(),
            q + (q * 0.1).abs() + f64::EPSILON,
        ),
    };
    Ok(Cond::Num {
        param: code.to_owned(),
        op: nop,
        lo,
        hi,
        hashes: unit,
    })
}

/// Turn query parameters into store conditions.
pub fn parse(
    key: &BlindIndexKey,
    fhir_base: &str,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<ParsedSearch, Failure> {
    let defs = fs::params(rtype);
    let mut and = Vec::new();
    let mut unknown = Vec::new();
    if params.len() > MAX_PARAMS {
        return Err(invalid(format!(
            "at most {MAX_PARAMS} search parameters per request"
        )));
    }
    for (name, value) in params {
        if CONTROL.contains(&name.as_str()) {
            continue;
        }
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name.as_str(), None),
        };
        let shown: String = name.chars().take(64).collect();
        if let Some(parts) = union_parts(rtype, code) {
            union_conditions(
                key, fhir_base, rtype, parts, modifier, value, &shown, &mut and,
            )?;
            continue;
        }
        if code == "_id" && modifier.is_none() {
            let ids = split_values(value);
            if ids.len() > MAX_VALUES {
                return Err(invalid(format!(
                    "{shown}: at most {MAX_VALUES} comma-separated values"
                )));
            }
            and.push(vec![Cond::Ids(ids)]);
            continue;
        }
        if code == "_lastUpdated" && modifier.is_none() {
            let group = split_values(value)
                .iter()
                .map(|v| date_cond(code, &shown, v, true))
                .collect::<Result<_, _>>()?;
            and.push(group);
            continue;
        }
        let Some(p) = defs.get(code).filter(|p| p.indexable()) else {
            unknown.push(shown);
            continue;
        };
        if modifier == Some("missing") {
            missing_conditions(rtype, code, value, &shown, &mut and)?;
            continue;
        }
        let values = split_values(value);
        if values.len() > MAX_VALUES {
            return Err(invalid(format!(
                "{shown}: at most {MAX_VALUES} comma-separated values"
            )));
        }
        if values.iter().any(String::is_empty) {
            return Err(invalid(format!("{shown}: empty value")));
        }
        let t = Term {
            key,
            fhir_base,
            rtype,
            code,
            shown: &shown,
        };
        match t.conditions(p.kind, modifier, &values)? {
            Some(mut group) => {
                if group.is_empty() {
                    group.push(Cond::Never);
                }
                and.push(group);
            }
            // Reported, and matching nothing (as an empty group would).
            None => {
                unknown.push(shown);
                and.push(vec![Cond::Never]);
            }
        }
    }
    Ok(ParsedSearch { and, unknown })
}

/// A union parameter (one name over two indexed parts): the same search on
/// each part, OR-ed; but "has no such value" (`:not`, `:missing=true`)
/// must hold for both parts: AND.
#[allow(clippy::too_many_arguments)]
fn union_conditions(
    key: &BlindIndexKey,
    fhir_base: &str,
    rtype: &ResourceType,
    parts: [&str; 2],
    modifier: Option<&str>,
    value: &str,
    shown: &str,
    and: &mut Vec<Vec<Cond>>,
) -> Result<(), Failure> {
    let mut sub = Vec::new();
    for part in parts {
        let n = match modifier {
            Some(m) => format!("{part}:{m}"),
            None => part.to_owned(),
        };
        sub.push(parse(key, fhir_base, rtype, &[(n, value.to_owned())])?);
    }
    if modifier == Some("not") || (modifier == Some("missing") && value == "true") {
        and.extend(sub.into_iter().flat_map(|p| p.and));
    } else {
        let mut group = Vec::new();
        for p in sub {
            match <[Vec<Cond>; 1]>::try_from(p.and) {
                Ok([g]) => group.extend(g),
                Err(_) => {
                    return Err(unsupported(format!(
                        "{shown}: this modifier is not supported here"
                    )))
                }
            }
        }
        and.push(group);
    }
    Ok(())
}

/// `:missing=true|false`. With components: present if any is present;
/// missing if all are.
fn missing_conditions(
    rtype: &ResourceType,
    code: &str,
    value: &str,
    shown: &str,
    and: &mut Vec<Vec<Cond>>,
) -> Result<(), Failure> {
    let missing = match value {
        "true" => true,
        "false" => false,
        _ => return Err(invalid(format!("{shown}: :missing takes true or false"))),
    };
    let mut params = vec![code];
    params.extend(components(rtype, code));
    let conds = params.into_iter().map(|p| Cond::Missing {
        param: p.to_owned(),
        missing,
    });
    if missing {
        and.extend(conds.map(|c| vec![c]));
    } else {
        and.push(conds.collect());
    }
    Ok(())
}

/// One indexed search parameter of one query, being turned into the OR
/// group of conditions its comma-separated values make.
struct Term<'a> {
    key: &'a BlindIndexKey,
    fhir_base: &'a str,
    rtype: &'a ResourceType,
    code: &'a str,
    /// The parameter name as the client wrote it (shortened), for errors.
    shown: &'a str,
}

impl Term<'_> {
    /// The OR group for `values`; `None` when this kind and modifier are
    /// not searched (the parameter is reported as unknown).
    fn conditions(
        &self,
        kind: ParamKind,
        modifier: Option<&str>,
        values: &[String],
    ) -> Result<Option<Vec<Cond>>, Failure> {
        let (key, code, shown) = (self.key, self.code, self.shown);
        let mut group = Vec::new();
        match (kind, modifier) {
            (ParamKind::String, None | Some("exact")) => {
                self.strings(modifier, values, &mut group)?
            }
            (ParamKind::Token, None | Some("not")) => group.push(self.tokens(modifier, values)),
            (ParamKind::Token, Some("text")) => {
                let hashes = values
                    .iter()
                    .flat_map(|v| hash(key, &["tt", code, &normalize(v)]))
                    .collect();
                group.push(Cond::Hash {
                    param: code.to_owned(),
                    hashes,
                });
            }
            (ParamKind::Reference, m) => group.push(self.references(m, values)?),
            (ParamKind::Composite, None) => {
                for v in values {
                    group.push(self.composite(v)?);
                }
            }
            (ParamKind::Uri, None) => {
                let hashes = values
                    .iter()
                    .flat_map(|v| hash(key, &["u", code, v]))
                    .collect();
                group.push(Cond::Hash {
                    param: code.to_owned(),
                    hashes,
                });
            }
            (ParamKind::Date, None) if identifying_date(self.rtype.as_str(), code) => {
                self.blind_dates(values, &mut group)?
            }
            (ParamKind::Date, None) => {
                for v in values {
                    group.push(date_cond(code, shown, v, false)?);
                }
            }
            (ParamKind::Number, None) => {
                for v in values {
                    group.push(num_cond(code, shown, v, false, key)?);
                }
            }
            (ParamKind::Quantity, None) => {
                for v in values {
                    group.push(num_cond(code, shown, v, true, key)?);
                }
            }
            (_, Some(m)) => {
                return Err(unsupported(format!(
                    "{shown}: modifier :{} is not supported",
                    m.chars().take(32).collect::<String>()
                )))
            }
            _ => return Ok(None),
        }
        Ok(Some(group))
    }

    /// Strings: normalised prefixes (the default) or `:exact`. A broad
    /// parameter also searches its components' entries.
    fn strings(
        &self,
        modifier: Option<&str>,
        values: &[String],
        group: &mut Vec<Cond>,
    ) -> Result<(), Failure> {
        let mut params = vec![self.code];
        params.extend(components(self.rtype, self.code));
        for p in params {
            let mut hashes = Vec::new();
            for v in values {
                if modifier == Some("exact") {
                    hashes.extend(hash(self.key, &["x", p, v]));
                } else {
                    let n = normalize(v);
                    if n.chars().count() > MAX_PREFIX {
                        return Err(unsupported(format!(
                            "{}: string search values are limited to {MAX_PREFIX} characters (use :exact for longer values)",
                            self.shown
                        )));
                    }
                    hashes.extend(hash(self.key, &["s", p, &n]));
                }
            }
            group.push(Cond::Hash {
                param: p.to_owned(),
                hashes,
            });
        }
        Ok(())
    }

    /// Tokens: `code`, `system|code`, `|code`, `system|`; `:not` negates.
    fn tokens(&self, modifier: Option<&str>, values: &[String]) -> Cond {
        let (key, code) = (self.key, self.code);
        let hashes = values
            .iter()
            .flat_map(|v| match split_token(v) {
                (None, c) => hash(key, &["tc", code, c]),
                (Some(""), c) => hash(key, &["tn", code, c]),
                (Some(s), "") => hash(key, &["tS", code, s]),
                (Some(s), c) => hash(key, &["ts", code, s, c]),
            })
            .collect();
        if modifier == Some("not") {
            Cond::NotHash {
                param: code.to_owned(),
                hashes,
            }
        } else {
            Cond::Hash {
                param: code.to_owned(),
                hashes,
            }
        }
    }

    /// References: `Type/id`, a bare id (every target type, see
    /// `MAX_EXPANDED_TARGETS`), absolute URLs under this server's base, or
    /// the `:Type` modifier.
    fn references(&self, modifier: Option<&str>, values: &[String]) -> Result<Cond, Failure> {
        let (key, code) = (self.key, self.code);
        let type_mod = match modifier {
            None => None,
            Some(t) if ResourceType::parse(t).is_some() => Some(t),
            Some(other) => {
                return Err(unsupported(format!(
                    "{}: modifier :{} is not supported",
                    self.shown,
                    other.chars().take(32).collect::<String>()
                )))
            }
        };
        let mut hashes = Vec::new();
        for v in values {
            let r = local_reference(v, self.fhir_base);
            let r: &str = &r;
            if type_mod.is_none() && phylax_fhir::ids::is_valid_id(r) {
                for t in expanded_targets(self.rtype.as_str(), code) {
                    hashes.extend(hash(key, &["r", code, &format!("{t}/{r}")]));
                }
            }
            let h = match (type_and_id(r), type_mod) {
                (Some((t, _)), Some(tm)) if t != tm => continue,
                (Some((t, id)), _) => hash(key, &["r", code, &format!("{t}/{id}")]),
                (None, Some(tm)) if phylax_fhir::ids::is_valid_id(r) => {
                    hash(key, &["r", code, &format!("{tm}/{r}")])
                }
                (None, None) if phylax_fhir::ids::is_valid_id(r) => hash(key, &["ri", code, r]),
                (None, _) => hash(key, &["r", code, r]),
            };
            hashes.extend(h);
        }
        Ok(Cond::Hash {
            param: code.to_owned(),
            hashes,
        })
    }

    /// One composite value, `token$value`.
    fn composite(&self, v: &str) -> Result<Cond, Failure> {
        let (key, code, shown) = (self.key, self.code, self.shown);
        let second = fs::composite_second(self.rtype, code)
            .ok_or_else(|| unsupported(format!("{shown}: not supported")))?;
        let (a, b) = v
            .split_once('$')
            .ok_or_else(|| invalid(format!("{shown}: a composite value is token$value")))?;
        if a.is_empty() || b.is_empty() {
            return Err(invalid(format!("{shown}: empty component")));
        }
        let k1 = composite_query_key(a);
        let hashed = |hashes: Vec<Vec<u8>>| Cond::Hash {
            param: code.to_owned(),
            hashes,
        };
        Ok(match second {
            ParamKind::Token => hashed(hash(key, &["ct", code, &k1, &composite_query_key(b)])),
            ParamKind::String => hashed(hash(key, &["cx", code, &k1, &normalize(b)])),
            ParamKind::Reference => hashed(hash(
                key,
                &["cr", code, &k1, &local_reference(b, self.fhir_base)],
            )),
            ParamKind::Quantity => match num_cond(code, shown, b, true, key)? {
                Cond::Num {
                    param, op, lo, hi, ..
                } => Cond::Num {
                    param,
                    op,
                    lo,
                    hi,
                    // Units of a composite quantity are not matched; the
                    // first component is.
                    hashes: Some(hash(key, &["cq", code, &k1])),
                },
                other => other,
            },
            ParamKind::Date => match date_cond(code, shown, b, false)? {
                Cond::Range {
                    param, op, lo, hi, ..
                } => Cond::Range {
                    param,
                    op,
                    lo,
                    hi,
                    hashes: Some(hash(key, &["cd", code, &k1])),
                },
                other => other,
            },
            _ => return Err(unsupported(format!("{shown}: not supported"))),
        })
    }

    /// Dates that identify a person are stored blind: only `eq` and `ne`
    /// on a year, year-month or full date.
    fn blind_dates(&self, values: &[String], group: &mut Vec<Cond>) -> Result<(), Failure> {
        let (key, code) = (self.key, self.code);
        let mut eq = Vec::new();
        let mut ne = Vec::new();
        for v in values {
            let (op, lit) = prefix(v);
            let ok_len = matches!(lit.len(), 4 | 7 | 10) && fs::date_range(lit).is_some();
            match (op, ok_len) {
                (RangeOp::Eq, true) => eq.extend(hash(key, &["d", code, lit])),
                (RangeOp::Ne, true) => ne.extend(hash(key, &["d", code, lit])),
                _ => {
                    return Err(unsupported(format!(
                        "{}: this date identifies a person and is stored blind; search it with eq or ne \
                         and a year, year-month or full date",
                        self.shown
                    )))
                }
            }
        }
        if !eq.is_empty() {
            group.push(Cond::Hash {
                param: code.to_owned(),
                hashes: eq,
            });
        }
        if !ne.is_empty() {
            group.push(Cond::NotHash {
                param: code.to_owned(),
                hashes: ne,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::*;
    use super::*;

    #[test]
    fn value_splitting_and_escapes() {
        assert_eq!(split_values("a,b\\,c"), vec!["a", "b,c"]);
        assert_eq!(split_token("http://x|123"), (Some("http://x"), "123"));
        assert_eq!(split_token("a\\|b|c"), (Some("a\\|b"), "c"));
        assert_eq!(split_token("|c"), (Some(""), "c"));
        assert_eq!(prefix("ge2020"), (RangeOp::Ge, "2020"));
        assert_eq!(prefix("2020"), (RangeOp::Eq, "2020"));
        assert_eq!(prefix("eq-5"), (RangeOp::Eq, "-5"));
        let (v, lo, hi) = number_range("100").unwrap();
        assert_eq!((v, lo, hi), (100.0, 99.5, 100.5));
        let (_, lo, hi) = number_range("1.50").unwrap();
        assert!((lo - 1.495).abs() < 1e-9 && (hi - 1.505).abs() < 1e-9);
        assert!(number_range("abc").is_none());
        assert!(number_range("NaN").is_none());
    }

    #[test]
    fn broad_string_parameters_do_not_repeat_components() {
        let (kek, _) = phylax_crypto::Kek::generate().unwrap();
        let (k, _) = BlindIndexKey::generate_wrapped(&kek).unwrap();
        let t = ResourceType::parse("Patient").unwrap();
        let p = serde_json::json!({"resourceType":"Patient",
            "name":[{"family":"Benchfamily","given":["Synthetic"],"prefix":["Dr"]}],
            "address":[{"line":["1 Example Street"],"city":"Testville"}]});
        let rows = index_rows(&k, "", &t, &p);
        let count = |param: &str| rows.iter().filter(|r| r.param == param).count();
        assert_eq!(
            count("name"),
            3,
            "only the prefix 'Dr' (two prefixes + exact)"
        );
        assert_eq!(count("family"), 12);
        assert_eq!(count("address"), 17, "only the line");
        assert_eq!(count("address-city"), 10);
    }

    /// A reference to one of a parameter's few targets gets no bare-id
    /// entry (a bare-id search expands to the targets); one to another
    /// type, or on a parameter with no short target list, keeps it.
    #[test]
    fn bare_id_entries_only_where_a_search_cannot_expand() {
        let (kek, _) = phylax_crypto::Kek::generate().unwrap();
        let (k, _) = BlindIndexKey::generate_wrapped(&kek).unwrap();
        let t = ResourceType::parse("Observation").unwrap();
        let o = serde_json::json!({"resourceType":"Observation","status":"final",
            "code":{"text":"x"},
            "subject":{"reference":"Patient/p1"},
            "encounter":{"reference":"Encounter/e1"},
            "performer":[{"reference":"Endpoint/x1"}],
            "focus":[{"reference":"Patient/p1"}]});
        let rows = index_rows(&k, "", &t, &o);
        let count = |param: &str| rows.iter().filter(|r| r.param == param).count();
        assert_eq!(count("subject"), 1);
        assert_eq!(count("patient"), 1);
        assert_eq!(count("encounter"), 1);
        assert_eq!(count("performer"), 2, "Endpoint is not a target");
        assert_eq!(count("focus"), 2, "any type: no expansion");
        assert_eq!(expanded_targets("Observation", "subject").len(), 4);
        assert!(expanded_targets("Observation", "focus").is_empty());
    }

    #[test]
    fn prefixes_respect_char_boundaries() {
        let p: Vec<&str> = prefixes("éa").collect();
        assert_eq!(p, vec!["é", "éa"]);
        assert_eq!(prefixes(&"x".repeat(200)).count(), MAX_PREFIX);
    }
}

#[cfg(test)]
mod union_tests {
    use super::super::index::*;

    /// Each union parameter's expression is exactly its parts' expressions
    /// joined (or, for composites, the contexts joined with the same
    /// components), so skipping its entries loses no answer.
    #[test]
    fn unions_are_exact_unions_in_the_definitions() {
        let defs = phylax_fhir::defs::definitions();
        for (t, code, parts) in UNIONS {
            let expr = |c: &str| {
                defs.search_params(t)
                    .iter()
                    .find(|p| p.code == c)
                    .and_then(|p| p.expression.clone())
            };
            let composite = |c: &str| {
                defs.composites(t)
                    .find(|(k, _)| *k == c)
                    .map(|(_, d)| d.clone())
            };
            match composite(code) {
                Some(whole) => {
                    let [a, b] = parts.map(|p| composite(p).unwrap_or_else(|| panic!("{p}")));
                    assert_eq!(a.components, whole.components, "{code}");
                    assert_eq!(b.components, whole.components, "{code}");
                    assert_eq!(
                        format!("{} | {}", a.expression, b.expression),
                        whole.expression,
                        "{code}"
                    );
                }
                None => {
                    let whole = expr(code).unwrap_or_else(|| panic!("{code}"));
                    let [a, b] = parts.map(|p| expr(p).unwrap_or_else(|| panic!("{p}")));
                    assert_eq!(format!("{a} | {b}"), whole, "{code}");
                }
            }
        }
    }
}
