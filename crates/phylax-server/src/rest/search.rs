//! FHIR search handlers: type search (GET and `POST _search`), Patient
//! compartment search, `$everything`, and what they share: sealed paging
//! cursors, result control (`_sort`, `_summary`, `_elements`, `_total`),
//! includes with `:iterate`, chaining and `_has`. Parameters become store
//! conditions in `crate::data::search`; the store plans and runs them.

use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::data::repo::{BodyOut, ResourceVersion};
use crate::rest::pipeline;
use crate::rest::wire::{
    bundle_out, check_accept, page_size, parse_since, parse_type, prefer, EntryOut, Query, St,
};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::subset::Summary;
use phylax_fhir::{Issue, IssueCode, OperationOutcome, ResourceId, ResourceType, Severity};
use serde_json::{json, Value};
use std::sync::Arc;

/// Search cursors are sealed (AES-256-GCM under a KEK-wrapped key) rather
/// than only MACed: they carry the search parameters, so that a next-page
/// URL never shows a search term (URLs end up in proxy logs), and an edited
/// or foreign cursor fails to open. They expire after an hour.
const CURSOR_TTL_MS: i64 = 3_600_000;

/// Positions of earlier pages a cursor remembers, for `previous` links.
const MAX_BACK: usize = 200;

/// A page position: the keyset bound (`seq` before which rows are listed)
/// or, for sorted searches, the offset; `FIRST_PAGE` for the first page.
const FIRST_PAGE: i64 = -1;

/// An opened search cursor: the parameters, this page's position, and the
/// positions of the pages before it (most recent last).
struct Cursor {
    params: Vec<(String, String)>,
    at: i64,
    back: Vec<i64>,
}

async fn seal_search_cursor(
    st: &AppState,
    rtype: &str,
    params: &[(String, String)],
    before: i64,
    back: &[i64],
) -> Result<String, Failure> {
    let key = st
        .keys
        .for_write("cursor")
        .await
        .map_err(crate::data::repo::RepoError::from)?;
    let back = &back[back.len().saturating_sub(MAX_BACK)..];
    let body = json!({"p": params, "b": before, "s": back, "e": crate::base::clock::now_ms() + CURSOR_TTL_MS})
        .to_string();
    let sealed = key
        .seal(
            format!("phylax/search-cursor/v1\0{rtype}").as_bytes(),
            body.as_bytes(),
        )
        .map_err(|_| Failure::Internal("cursor seal failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(sealed))
}

async fn open_search_cursor(st: &AppState, rtype: &str, cursor: &str) -> Result<Cursor, Failure> {
    let bad = || Failure::bad_request("invalid, expired or tampered paging cursor");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let key = st
        .keys
        .for_write("cursor")
        .await
        .map_err(crate::data::repo::RepoError::from)?;
    let plain = key
        .open(format!("phylax/search-cursor/v1\0{rtype}").as_bytes(), &raw)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&plain).map_err(|_| bad())?;
    if v["e"]
        .as_i64()
        .is_none_or(|e| e < crate::base::clock::now_ms())
    {
        return Err(bad());
    }
    let params = v["p"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .filter_map(|pair| {
            Some((
                pair.get(0)?.as_str()?.to_owned(),
                pair.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect();
    let back = match v.get("s").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(Value::as_i64)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?,
        None => Vec::new(),
    };
    Ok(Cursor {
        params,
        at: v["b"].as_i64().ok_or_else(bad)?,
        back,
    })
}

/// The resource a reference names on this server (`Type/id` or
/// `Type/id/_history/v`, or the same as an absolute URL under our base);
/// `None` for contained, external or malformed references.
fn local_target(st: &AppState, r: &str) -> Option<(ResourceType, ResourceId)> {
    let r = r
        .strip_prefix(st.fhir_base.as_str())
        .and_then(|x| x.strip_prefix('/'))
        .unwrap_or(r);
    let mut parts = r.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) | (Some("_history"), Some(_), None) => {
            Some((ResourceType::parse(t)?, ResourceId::parse(id)?))
        }
        _ => None,
    }
}

/// Most resources `_include`/`_revinclude` add to one page.
const MAX_INCLUDED: usize = 1000;

/// Rounds of `:iterate` after the first pass (include loops end when no
/// new resource appears, or here).
const MAX_ITERATE_DEPTH: usize = 4;

/// Resources named by `_include=Source:param[:Target]` (references from the
/// matches) and `_revinclude=Source:param` (resources referring to the
/// matches), and with `:iterate` from the included resources too, until
/// nothing new appears. Every included resource passes the same policy as a
/// direct read; one the caller may not see is silently left out, never an
/// error that would reveal it exists. Each resource appears once (loops end).
async fn included(
    st: &AppState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    q: &Query,
    matches: &[crate::data::repo::ResourceVersion],
) -> Result<Vec<crate::data::repo::ResourceVersion>, Failure> {
    use std::collections::HashSet;
    type Spec = (bool, ResourceType, String, Option<ResourceType>);
    let parse_spec = |v: &str| -> Result<(ResourceType, String, Option<ResourceType>), Failure> {
        let bad = || Failure::bad_request("_include/_revinclude take Type:parameter[:TargetType]");
        let mut it = v.split(':');
        let src = it.next().and_then(ResourceType::parse).ok_or_else(bad)?;
        let param = it
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(bad)?
            .to_owned();
        let target = match it.next() {
            Some(t) => Some(ResourceType::parse(t).ok_or_else(bad)?),
            None => None,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        let known = phylax_fhir::search::params(&src)
            .get(&param)
            .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference && p.indexable());
        if !known {
            return Err(Failure::bad_request(format!(
                "{}:{}: not a reference search parameter",
                src,
                param.chars().take(64).collect::<String>()
            )));
        }
        Ok((src, param, target))
    };
    // (reverse?, source, param, target) for the first pass and for iterating.
    let mut first: Vec<Spec> = Vec::new();
    let mut iterate: Vec<Spec> = Vec::new();
    for (k, v) in &q.0 {
        let (rev, iter) = match k.as_str() {
            "_include" => (false, false),
            "_revinclude" => (true, false),
            "_include:iterate" => (false, true),
            "_revinclude:iterate" => (true, true),
            _ => continue,
        };
        let (src, param, target) = parse_spec(v)?;
        if !iter && !rev && &src != rtype {
            return Err(Failure::bad_request(
                "_include must start with the searched resource type (or use _include:iterate)",
            ));
        }
        let spec = (rev, src, param, target);
        // An :iterate spec also applies to the matches themselves.
        first.push(spec.clone());
        if iter {
            iterate.push(spec);
        }
    }
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|v| (v.rtype.to_string(), v.id.to_string()))
        .collect();
    let mut out: Vec<crate::data::repo::ResourceVersion> = Vec::new();
    // Indexes into `out` of the resources added by the previous round.
    let mut frontier: Vec<usize> = Vec::new();
    for round in 0..=MAX_ITERATE_DEPTH {
        let specs = if round == 0 { &first } else { &iterate };
        if specs.is_empty() || (round > 0 && frontier.is_empty()) {
            break;
        }
        let base: Vec<&crate::data::repo::ResourceVersion> = if round == 0 {
            matches.iter().collect()
        } else {
            frontier.iter().map(|&i| &out[i]).collect()
        };
        let mut added = Vec::new();
        for (rev, src, param, target) in specs {
            if out.len() + added.len() >= MAX_INCLUDED {
                break;
            }
            if !rev {
                for m in base.iter().filter(|m| &m.rtype == src) {
                    let Some(body) = &m.body else { continue };
                    for (code, val) in phylax_fhir::search::extract(src, body.json()) {
                        let phylax_fhir::search::SearchValue::Reference(r) = val else {
                            continue;
                        };
                        if code != param {
                            continue;
                        }
                        let Some((t, id)) = local_target(st, &r) else {
                            continue;
                        };
                        if target.as_ref().is_some_and(|tt| tt != &t)
                            || out.len() + added.len() >= MAX_INCLUDED
                            || decide(&ctx.principal, Interaction::Read, Some(t.as_str()))
                                != Decision::Allow
                            || !seen.insert((t.to_string(), id.to_string()))
                        {
                            continue;
                        }
                        if let Some(v) = st.scoped(ctx).visible(&t, &id).await? {
                            added.push(v);
                        }
                    }
                }
            } else {
                if decide(&ctx.principal, Interaction::SearchType, Some(src.as_str()))
                    != Decision::Allow
                {
                    continue;
                }
                let targets: Vec<String> = base
                    .iter()
                    .map(|m| format!("{}/{}", m.rtype, m.id))
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                let and = vec![vec![crate::data::search::references_to(
                    st.gate.blind_key(),
                    param,
                    &targets,
                )]];
                let found = st
                    .scoped(ctx)
                    .search(phylax_store::SearchQuery {
                        rtype: src.to_string(),
                        and,
                        before_seq: None,
                        limit: (MAX_INCLUDED - out.len() - added.len()) as u32,
                    })
                    .await?;
                for v in found {
                    if seen.insert((v.rtype.to_string(), v.id.to_string())) {
                        added.push(v);
                    }
                }
            }
        }
        let start = out.len();
        out.extend(added);
        frontier = (start..out.len()).collect();
    }
    Ok(out)
}

/// Most resources the inner search of a chain or `_has` may match.
const MAX_CHAIN: u32 = 1000;

/// Most chained or `_has` parameters in one search (each runs a search).
const MAX_CHAINS: usize = 8;

/// The inner search of a chain or `_has`: the caller must be allowed to
/// search its type (else a chain would reveal what it may not see); its
/// parameters must all be understood; it may match at most `MAX_CHAIN`.
async fn inner_search(
    st: &AppState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<Vec<ResourceVersion>, Failure> {
    if decide(
        &ctx.principal,
        Interaction::SearchType,
        Some(rtype.as_str()),
    ) != Decision::Allow
    {
        return Err(Failure::Forbidden);
    }
    crate::rest::mask::check_params(ctx, rtype, params)?;
    let parsed = crate::data::search::parse(st.gate.blind_key(), &st.fhir_base, rtype, params)?;
    if let Some(u) = parsed.unknown.first() {
        return Err(Failure::BadRequest(vec![Issue::error(
            IssueCode::NotSupported,
            format!("unsupported parameter in a chain or _has: {u}"),
        )]));
    }
    // The inner search sees only what the caller may see: a chain or
    // `_has` must not test data outside their reach.
    let rows = st
        .scoped(ctx)
        .search(phylax_store::SearchQuery {
            rtype: rtype.to_string(),
            and: parsed.and,
            before_seq: None,
            limit: MAX_CHAIN + 1,
        })
        .await?;
    if rows.len() > MAX_CHAIN as usize {
        return Err(Failure::BadRequest(vec![Issue::error(
            IssueCode::TooCostly,
            format!("a chained or _has search may match at most {MAX_CHAIN} resources; narrow it"),
        )]));
    }
    Ok(rows)
}

/// Split chained (`subject:Patient.name=x`, `patient.identifier=x`) and
/// reverse-chained (`_has:Observation:patient:code=x`) parameters off a
/// search and turn each into a condition group: the inner search runs
/// first, and its matches become reference hashes (chain) or ids (`_has`)
/// of the outer search. One level only.
async fn resolve_chains(
    st: &AppState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<(Vec<(String, String)>, Vec<Vec<phylax_store::Cond>>), Failure> {
    use phylax_store::Cond;
    let defs = phylax_fhir::defs::definitions();
    let mut plain = Vec::new();
    let mut groups = Vec::new();
    let shown = |n: &str| n.chars().take(64).collect::<String>();
    let chains = params
        .iter()
        .filter(|(n, _)| n.starts_with("_has:") || n.contains('.'))
        .count();
    if chains > MAX_CHAINS {
        return Err(Failure::bad_request(format!(
            "at most {MAX_CHAINS} chained or _has parameters per search"
        )));
    }
    for (name, value) in params {
        if let Some(rest) = name.strip_prefix("_has:") {
            // _has:Type:refParam:innerParam
            let mut parts = rest.splitn(3, ':');
            let (Some(t), Some(refp), Some(inner)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(Failure::bad_request(format!(
                    "{}: _has takes _has:Type:reference:parameter",
                    shown(name)
                )));
            };
            if inner.starts_with("_has") || inner.contains('.') {
                return Err(Failure::NotImplemented(
                    "only one level of _has or chaining is supported",
                ));
            }
            let inner_type = ResourceType::parse(t)
                .ok_or_else(|| Failure::bad_request(format!("{}: unknown type", shown(name))))?;
            let is_ref = phylax_fhir::search::params(&inner_type)
                .get(refp)
                .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference);
            if !is_ref {
                return Err(Failure::bad_request(format!(
                    "{}: not a reference parameter of {inner_type}",
                    shown(name)
                )));
            }
            let rows =
                inner_search(st, ctx, &inner_type, &[(inner.to_owned(), value.clone())]).await?;
            let mut ids = std::collections::BTreeSet::new();
            for v in &rows {
                let Some(b) = &v.body else { continue };
                for (code, val) in phylax_fhir::search::extract(&inner_type, b.json()) {
                    if code != refp {
                        continue;
                    }
                    if let phylax_fhir::search::SearchValue::Reference(r) = val {
                        if let Some((t, id)) = local_target(st, &r) {
                            if &t == rtype {
                                ids.insert(id.to_string());
                            }
                        }
                    }
                }
            }
            groups.push(vec![if ids.is_empty() {
                Cond::Never
            } else {
                Cond::Ids(ids.into_iter().collect())
            }]);
            continue;
        }
        let Some((head, inner)) = name.split_once('.') else {
            plain.push((name.clone(), value.clone()));
            continue;
        };
        if inner.contains('.') || inner.starts_with("_has") {
            return Err(Failure::NotImplemented(
                "only one level of _has or chaining is supported",
            ));
        }
        let (code, type_mod) = match head.split_once(':') {
            Some((c, t)) => (c, Some(t)),
            None => (head, None),
        };
        let is_ref = phylax_fhir::search::params(rtype)
            .get(code)
            .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference);
        if !is_ref {
            return Err(Failure::bad_request(format!(
                "{}: chaining needs a reference parameter of {rtype}",
                shown(name)
            )));
        }
        let inner_code = inner.split(':').next().unwrap_or(inner);
        let candidates: Vec<ResourceType> = match type_mod {
            Some(t) => vec![ResourceType::parse(t)
                .ok_or_else(|| Failure::bad_request(format!("{}: unknown type", shown(name))))?],
            // No type given: every target type that has the parameter.
            None => defs
                .reference_targets(rtype.as_str(), code)
                .iter()
                .filter_map(|t| ResourceType::parse(t))
                .filter(|t| {
                    inner_code.starts_with('_')
                        || phylax_fhir::search::params(t).contains_key(inner_code)
                })
                .collect(),
        };
        if candidates.is_empty() {
            return Err(Failure::bad_request(format!(
                "{}: no target type of {code} has that parameter",
                shown(name)
            )));
        }
        let mut targets = Vec::new();
        for t in &candidates {
            // Types the caller may not search are skipped when the type was
            // not named; naming one is a plain request (403 if denied).
            if type_mod.is_none()
                && decide(&ctx.principal, Interaction::SearchType, Some(t.as_str()))
                    != Decision::Allow
            {
                continue;
            }
            for v in inner_search(st, ctx, t, &[(inner.to_owned(), value.clone())]).await? {
                targets.push(format!("{}/{}", v.rtype, v.id));
            }
            if targets.len() > MAX_CHAIN as usize {
                return Err(Failure::BadRequest(vec![Issue::error(
                    IssueCode::TooCostly,
                    format!("a chained search may match at most {MAX_CHAIN} resources; narrow it"),
                )]));
            }
        }
        groups.push(vec![if targets.is_empty() {
            Cond::Never
        } else {
            crate::data::search::references_to(st.gate.blind_key(), code, &targets)
        }]);
    }
    Ok((plain, groups))
}

/// Most matches a search sorted by anything but `-_lastUpdated` may have.
const MAX_SORTED: u32 = 2000;

/// `_summary`, `_elements`, `_sort` and `_total`, parsed.
pub(crate) struct ResultControl {
    summary: Option<Summary>,
    elements: Option<Vec<String>>,
    /// (parameter code, descending); empty: natural order (newest first).
    sort: Vec<(String, bool)>,
    total: bool,
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
    fn sort_rows(&self, rtype: &ResourceType, rows: Vec<ResourceVersion>) -> Vec<ResourceVersion> {
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

/// Cut a page once its stored bodies pass `cap` bytes (at least one
/// resource stays, so paging always moves on): a page of a thousand large
/// resources is answered in several pages, each bounded, rather than
/// assembled whole. Returns whether it cut.
fn bound_page(rows: &mut Vec<ResourceVersion>, cap: usize) -> bool {
    let mut total = 0usize;
    for (i, v) in rows.iter().enumerate() {
        total = total.saturating_add(v.body.as_ref().map_or(0, |b| b.stored_len()));
        if total > cap && i > 0 {
            rows.truncate(i);
            return true;
        }
    }
    false
}

/// Run a type-level search (GET or POST `_search`). `posted`: the terms
/// came in a form body, and must not appear in any link of the answer.
async fn search(
    st: &AppState,
    ctx: &RequestCtx,
    h: &HeaderMap,
    rtype: &ResourceType,
    mut params: Vec<(String, String)>,
    posted: bool,
) -> Result<Response, Failure> {
    let q = Query(params.clone());
    check_accept(h, &q)?;
    if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
        return crate::rest::audit_api::search(st, params).await;
    }
    // Terms that reached us outside the URL (a form body, or a sealed
    // cursor made from one) stay out of every link: the self link is then
    // a sealed cursor for this very page.
    let terms_hidden = posted || q.get("_cursor").is_some();
    let mut before = None;
    let mut back: Option<Vec<i64>> = None;
    if let Some(c) = q.get("_cursor") {
        let cur = open_search_cursor(st, rtype.as_str(), c).await?;
        params = cur.params;
        before = (cur.at != FIRST_PAGE).then_some(cur.at);
        back = Some(cur.back);
    }
    let q = Query(params.clone());
    crate::rest::mask::check_params(ctx, rtype, &params)?;
    let count = page_size(st, &q)?;
    let (plain, chained) = resolve_chains(st, ctx, rtype, &params).await?;
    let mut parsed = crate::data::search::parse(st.gate.blind_key(), &st.fhir_base, rtype, &plain)?;
    parsed.and.extend(chained);
    if let Some(c) = q.get(crate::data::search::COMPARTMENT_PARAM) {
        let pid = c
            .strip_prefix("Patient/")
            .filter(|id| phylax_fhir::ids::is_valid_id(id))
            .ok_or_else(|| Failure::bad_request("invalid compartment"))?;
        parsed.and.push(crate::data::search::compartment_condition(
            st.gate.blind_key(),
            rtype,
            pid,
        ));
    }
    if !parsed.unknown.is_empty() && prefer(h).strict {
        return Err(Failure::BadRequest(
            parsed
                .unknown
                .iter()
                .map(|k| {
                    Issue::error(
                        IssueCode::NotSupported,
                        format!("unsupported search parameter: {k}"),
                    )
                })
                .collect(),
        ));
    }
    // Confined to what the caller may see (their patients, no restricted
    // labels without permission) by the scoped searches below: counts and
    // pages only ever cover visible resources.
    let scoped = st.scoped(ctx);
    let control = ResultControl::parse(rtype, &q)?;
    let sorted = !control.sort.is_empty();
    let query = phylax_store::SearchQuery {
        rtype: rtype.to_string(),
        and: parsed.and,
        before_seq: if sorted { None } else { before },
        limit: if sorted { MAX_SORTED + 1 } else { count + 1 },
    };
    // When the whole match set is in hand, its size is the total: no
    // count query (the common case for selective searches).
    let mut known_total: Option<u64> = None;
    let (rows, next_mark) = if control.summary == Some(Summary::Count) {
        (Vec::new(), None)
    } else if sorted {
        // Sorted in memory after decryption (blind index entries carry no
        // order), so the match set is bounded; pages are offsets into it.
        let all = scoped.search(query.clone()).await?;
        if all.len() > MAX_SORTED as usize {
            return Err(Failure::BadRequest(vec![Issue::error(
                IssueCode::TooCostly,
                format!(
                    "more than {MAX_SORTED} matches to sort; narrow the search, or sort by -_lastUpdated (the natural order)"
                ),
            )]));
        }
        known_total = Some(all.len() as u64);
        let all = control.sort_rows(rtype, all);
        let offset = before.unwrap_or(0).max(0) as usize;
        let n = all.len();
        let mut page: Vec<_> = all.into_iter().skip(offset).take(count as usize).collect();
        bound_page(&mut page, st.config.http.max_response_bytes);
        let end = offset + page.len();
        let more = end < n;
        (page, more.then_some(end as i64))
    } else {
        let (mut rows, mut more) = scoped.search_page(query.clone(), count as usize).await?;
        if bound_page(&mut rows, st.config.http.max_response_bytes) {
            more = true;
        }
        if !more && before.is_none() {
            known_total = Some(rows.len() as u64);
        }
        let mark = rows.last().map(|r| r.seq);
        (rows, if more { mark } else { None })
    };
    let url = format!("{}/{}", st.fhir_base, rtype);
    // The self link shows the parameters actually used: not the cursor, and
    // not ignored parameters (whose values are never echoed).
    let shown: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .cloned()
        .collect();
    let used: Vec<&(String, String)> = shown
        .iter()
        .filter(|(k, _)| {
            !parsed
                .unknown
                .iter()
                .any(|u| u == &k.chars().take(64).collect::<String>())
        })
        .collect();
    let self_q: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(used)
        .finish();
    let self_url = if terms_hidden {
        let c = seal_search_cursor(
            st,
            rtype.as_str(),
            &shown,
            before.unwrap_or(FIRST_PAGE),
            back.as_deref().unwrap_or_default(),
        )
        .await?;
        format!("{url}?_cursor={c}")
    } else if self_q.is_empty() {
        url.clone()
    } else {
        format!("{url}?{self_q}")
    };
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(mark) = next_mark {
        let mut trail = back.clone().unwrap_or_default();
        trail.push(before.unwrap_or(FIRST_PAGE));
        let c = seal_search_cursor(st, rtype.as_str(), &shown, mark, &trail).await?;
        links.push(json!({"relation": "next", "url": format!("{url}?_cursor={c}")}));
    }
    // Not on the first page: `previous` reopens the page before, from the
    // positions the cursor remembers.
    if let Some(mut trail) = back {
        if let Some(prev) = trail.pop() {
            let c = seal_search_cursor(st, rtype.as_str(), &shown, prev, &trail).await?;
            links.push(json!({"relation": "previous", "url": format!("{url}?_cursor={c}")}));
        }
    }
    let inc = included(st, ctx, rtype, &q, &rows).await?;
    crate::access::reach::watch_own_name(&st.gate, ctx, rows.iter().chain(inc.iter())).await;
    let mut refs = crate::access::ctx::AuditRefs::of_versions(rows.iter().chain(inc.iter()));
    // Parameter names only: values (a name, a birth date) stay out of the log.
    refs.params = params
        .iter()
        .map(|(k, _)| k.chars().take(64).collect::<String>())
        .filter(|k| k != "_cursor" && !k.starts_with("_phylax"))
        .collect();
    refs.params.sort();
    refs.params.dedup();
    // Matches, then includes; bodies are moved into the Bundle.
    let modes = rows
        .into_iter()
        .map(|v| (v, "match"))
        .chain(inc.into_iter().map(|v| (v, "include")));
    // Stored text goes into the page as it is, unless `_summary` or
    // `_elements` reshape it.
    let mut entries: Vec<EntryOut> = modes
        .filter_map(|(v, mode)| {
            let url = format!("{}/{}/{}", st.fhir_base, v.rtype, v.id);
            v.body.map(|b| {
                let out = if control.subsets() {
                    BodyOut::Tree(control.apply_owned(b.into_json()))
                } else {
                    b.into_out()
                };
                EntryOut::new(Some(url), out, mode)
            })
        })
        .collect();
    if !parsed.unknown.is_empty() {
        let oo = OperationOutcome {
            issues: parsed
                .unknown
                .iter()
                .map(|k| Issue {
                    severity: Severity::Warning,
                    code: IssueCode::NotSupported,
                    diagnostics: format!("search parameter ignored (not supported): {k}"),
                    expression: None,
                })
                .collect(),
        };
        entries.push(EntryOut::new(
            None,
            BodyOut::Tree(oo.to_json(None)),
            "outcome",
        ));
    }
    let mut bundle = bundle_out("searchset", links, entries);
    if control.total || control.summary == Some(Summary::Count) {
        let total = match known_total {
            Some(n) => n,
            None => scoped.count(query).await?,
        };
        bundle.set_total(total);
    }
    let mut r = bundle.into_response(StatusCode::OK);
    r.extensions_mut().insert(refs);
    Ok(r)
}

pub async fn search_type(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path(t): Path<String>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw).without_internal();
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::SearchType,
        Some(&rtype),
        None,
        || async { search(&st, &ctx, &h, &rtype, q.0, false).await },
    )
    .await)
}

/// `GET /fhir/Patient/{id}/{type}`: a search restricted to one patient's
/// compartment, following the official Patient CompartmentDefinition.
pub async fn compartment_search(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((ct, id, t)): Path<(String, String, String)>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    if ct != "Patient" {
        return Err(Failure::NotImplemented(
            "only the Patient compartment is supported",
        ));
    }
    if t == "$everything" {
        return Ok(everything(st, ctx, id, h, raw).await);
    }
    if t == "$access-log" {
        return Ok(crate::rest::audit_api::access_log(st, ctx, id, raw).await);
    }
    let rtype = parse_type(&t)?;
    let pid = ResourceId::parse(&id).ok_or(Failure::NotFound)?;
    let mut params = Query::parse(raw).without_internal().0;
    params.push((
        crate::data::search::COMPARTMENT_PARAM.to_owned(),
        format!("Patient/{pid}"),
    ));
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::SearchType,
        Some(&rtype),
        None,
        || async { search(&st, &ctx, &h, &rtype, params, false).await },
    )
    .await)
}

/// `POST /fhir/{type}/_search` with a form body: the same search, without
/// putting identifying search terms into the URL.
pub async fn search_post(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path(t): Path<String>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::SearchType,
        Some(&rtype),
        None,
        || async {
            let ct = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !ct.starts_with("application/x-www-form-urlencoded") {
                return Err(Failure::UnsupportedMediaType);
            }
            let limit = 64 * 1024;
            let bytes = crate::rest::wire::read_body(&h, body, limit).await?;
            let mut params = q.0;
            params.extend(
                form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())),
            );
            search(
                &st,
                &ctx,
                &h,
                &rtype,
                Query(params).without_internal().0,
                true,
            )
            .await
        },
    )
    .await)
}

/// Cursor scope of `$everything` pages (no resource type starts with `$`,
/// so these never open as search cursors, nor the reverse).
const EVERYTHING_CURSOR: &str = "$everything";

/// `GET /fhir/Patient/{id}/$everything`: the patient and every resource in
/// their compartment (official CompartmentDefinition), plus the resources
/// those reference outside it (practitioners, organizations, medications…),
/// with `_since`, `_type` and `_count`, paged by sealed cursors. Types the
/// caller may not search are silently left out, as are referenced
/// resources it may not read.
async fn everything(
    st: Arc<AppState>,
    ctx: RequestCtx,
    id: String,
    h: HeaderMap,
    raw: Option<String>,
) -> Response {
    let rtype = ResourceType::parse("Patient");
    let pid = ResourceId::parse(&id);
    let audit_id = pid.as_ref().map(ResourceId::to_string);
    pipeline::run(
        &st,
        &ctx,
        Interaction::PatientEverything,
        rtype.as_ref(),
        audit_id.as_deref(),
        || async {
            let patient_type = rtype
                .clone()
                .ok_or_else(|| Failure::Internal("no Patient type".into()))?;
            let pid = pid.ok_or(Failure::NotFound)?;
            let q = Query::parse(raw).without_internal();
            check_accept(&h, &q)?;
            st.scoped(&ctx)
                .compartment_anchor(&patient_type, &pid)
                .await?;
            let (params, mut ti, mut before) = match q.get("_cursor") {
                Some(c) => {
                    let cur = open_search_cursor(&st, EVERYTHING_CURSOR, c).await?;
                    let (p, b) = (cur.params, cur.at);
                    let pos = |k: &str| {
                        p.iter()
                            .find(|(n, _)| n == k)
                            .and_then(|(_, v)| v.parse::<i64>().ok())
                    };
                    if p.iter()
                        .find(|(n, _)| n == "_patient")
                        .map(|(_, v)| v.as_str())
                        != Some(pid.as_str())
                    {
                        return Err(Failure::bad_request(
                            "invalid, expired or tampered paging cursor",
                        ));
                    }
                    let ti = pos("_ti").unwrap_or(0).max(0) as usize;
                    let p: Vec<(String, String)> = p
                        .into_iter()
                        .filter(|(n, _)| !matches!(n.as_str(), "_patient" | "_ti"))
                        .collect();
                    (Query(p), ti, (b >= 0).then_some(b))
                }
                None => (q, 0, None),
            };
            for (k, _) in &params.0 {
                if !matches!(k.as_str(), "_since" | "_type" | "_count" | "_format") {
                    return Err(Failure::BadRequest(vec![Issue::error(
                        IssueCode::NotSupported,
                        format!(
                            "$everything does not support the parameter {}",
                            k.chars().take(64).collect::<String>()
                        ),
                    )]));
                }
            }
            let count = page_size(&st, &params)? as usize;
            let since = parse_since(&params)?;
            let wanted: Option<Vec<ResourceType>> = match params.get("_type") {
                None => None,
                Some(list) => Some(
                    list.split(',')
                        .map(|t| {
                            ResourceType::parse(t.trim()).ok_or_else(|| {
                                Failure::bad_request("_type lists unknown resource types")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                ),
            };
            // Patient first, then every other compartment type by name.
            let defs = phylax_fhir::defs::definitions();
            let mut types: Vec<ResourceType> = vec![patient_type.clone()];
            types.extend(
                defs.resource_types()
                    .iter()
                    .filter(|t| t.as_str() != "Patient" && !defs.compartment_params(t).is_empty())
                    .filter_map(|t| ResourceType::parse(t)),
            );
            types.retain(|t| {
                wanted.as_ref().is_none_or(|w| w.contains(t))
                    && decide(&ctx.principal, Interaction::SearchType, Some(t.as_str()))
                        == Decision::Allow
            });
            let mut page: Vec<ResourceVersion> = Vec::new();
            let mut next: Option<(usize, i64)> = None;
            while ti < types.len() && page.len() < count {
                let t = &types[ti];
                let need = count - page.len();
                let mut and = vec![crate::data::search::compartment_condition(
                    st.gate.blind_key(),
                    t,
                    pid.as_str(),
                )];
                if let Some(s) = since {
                    and.push(vec![phylax_store::Cond::LastUpdated {
                        op: phylax_store::RangeOp::Ge,
                        lo: s,
                        hi: s + 1,
                    }]);
                }
                let mut rows = st
                    .scoped(&ctx)
                    .search(phylax_store::SearchQuery {
                        rtype: t.to_string(),
                        and,
                        before_seq: before,
                        limit: need as u32 + 1,
                    })
                    .await?;
                if rows.len() > need {
                    rows.truncate(need);
                    let last = rows.last().map(|r| r.seq).unwrap_or(0);
                    page.extend(rows);
                    next = Some((ti, last));
                    break;
                }
                page.extend(rows);
                ti += 1;
                before = None;
            }
            if next.is_none() && ti < types.len() {
                next = Some((ti, -1));
            }
            // Resources the page references outside the compartment.
            let mut seen: std::collections::HashSet<(String, String)> = page
                .iter()
                .map(|v| (v.rtype.to_string(), v.id.to_string()))
                .collect();
            let mut referenced = Vec::new();
            let mut refs = Vec::new();
            for v in &page {
                if let Some(b) = &v.body {
                    crate::rest::wire::collect_references(b.json(), &mut refs);
                }
            }
            for r in refs {
                let Some((t, rid)) = local_target(&st, &r) else {
                    continue;
                };
                if !defs.compartment_params(t.as_str()).is_empty()
                    || t.as_str() == "Patient"
                    || referenced.len() >= MAX_INCLUDED
                    || !seen.insert((t.to_string(), rid.to_string()))
                    || decide(&ctx.principal, Interaction::Read, Some(t.as_str()))
                        != Decision::Allow
                {
                    continue;
                }
                if let Some(v) = st.scoped(&ctx).visible(&t, &rid).await? {
                    referenced.push(v);
                }
            }
            let url = format!("{}/Patient/{}/$everything", st.fhir_base, pid);
            let mut links = vec![json!({"relation": "self", "url": url})];
            if let Some((nti, nb)) = next {
                let mut p = params.0.clone();
                p.retain(|(k, _)| k != "_cursor");
                p.push(("_patient".into(), pid.to_string()));
                p.push(("_ti".into(), nti.to_string()));
                let c = seal_search_cursor(&st, EVERYTHING_CURSOR, &p, nb, &[]).await?;
                links.push(json!({"relation": "next", "url": format!("{url}?_cursor={c}")}));
            }
            let audit_refs =
                crate::access::ctx::AuditRefs::of_versions(page.iter().chain(referenced.iter()));
            // Stored text goes into the page as it is (see `search`).
            let entry = |v: ResourceVersion, mode: &'static str| {
                let url = format!("{}/{}/{}", st.fhir_base, v.rtype, v.id);
                v.body.map(|b| EntryOut::new(Some(url), b.into_out(), mode))
            };
            let entries: Vec<EntryOut> = page
                .into_iter()
                .filter_map(|v| entry(v, "match"))
                .chain(referenced.into_iter().filter_map(|v| entry(v, "include")))
                .collect();
            let mut r = bundle_out("searchset", links, entries).into_response(StatusCode::OK);
            r.extensions_mut().insert(audit_refs);
            Ok(r)
        },
    )
    .await
}
