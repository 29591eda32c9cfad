//! A type-level search from parameters to a Bundle page: confined through
//! the scoped repository, bounded by `http.max_response_bytes`.

use super::chain::resolve_chains;
use super::control::{ResultControl, MAX_SORTED};
use super::cursor::{open_search_cursor, seal_search_cursor, FIRST_PAGE};
use super::include::included;
use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::data::repo::{BodyOut, ResourceVersion};
use crate::rest::wire::{bundle_out, check_accept, page_size, prefer, EntryOut, Query};
use crate::state::FhirState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use phylax_fhir::subset::Summary;
use phylax_fhir::{Issue, IssueCode, OperationOutcome, ResourceType, Severity};
use serde_json::{json, Value};

/// Cut a page once its stored bodies pass `cap` bytes (at least one
/// resource stays, so paging always moves on): a page of a thousand large
/// resources is answered in several pages, each bounded, rather than
/// assembled whole. Returns whether it cut.
pub(super) fn bound_page(rows: &mut Vec<ResourceVersion>, cap: usize) -> bool {
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
pub(super) async fn search(
    st: &FhirState,
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
    let mut at = Position::default();
    if let Some(c) = q.get("_cursor") {
        let cur = open_search_cursor(st, rtype.as_str(), c).await?;
        params = cur.params;
        at.before = (cur.at != FIRST_PAGE).then_some(cur.at);
        at.back = Some(cur.back);
    }
    let q = Query(params.clone());
    crate::rest::mask::check_params(ctx, rtype, &params)?;
    let count = page_size(st, &q)?;
    let parsed = conditions(st, ctx, h, rtype, &params, &q).await?;
    // Confined to what the caller may see (their patients, no restricted
    // labels without permission) by the scoped searches below: counts and
    // pages only ever cover visible resources.
    let scoped = st.scoped(ctx);
    let control = ResultControl::parse(rtype, &q)?;
    let sorted = !control.sort.is_empty();
    let query = phylax_store::SearchQuery {
        rtype: rtype.to_string(),
        and: parsed.and,
        before_seq: if sorted { None } else { at.before },
        limit: if sorted { MAX_SORTED + 1 } else { count + 1 },
    };
    let page = fetch_page(st, &scoped, rtype, &control, &query, at.before, count).await?;
    let links = page_links(
        st,
        rtype,
        &params,
        &parsed.unknown,
        terms_hidden,
        at,
        page.next_mark,
    )
    .await?;
    let rows = page.rows;
    let inc = included(st, ctx, rtype, &q, &rows).await?;
    crate::access::care::watch_own_name(&st.gate, ctx, rows.iter().chain(inc.iter())).await;
    let mut refs = crate::access::ctx::AuditRefs::of_versions(rows.iter().chain(inc.iter()));
    // Parameter names only: values (a name, a birth date) stay out of the log.
    refs.params = params
        .iter()
        .map(|(k, _)| k.chars().take(64).collect::<String>())
        .filter(|k| k != "_cursor" && !k.starts_with("_phylax"))
        .collect();
    refs.params.sort();
    refs.params.dedup();
    refs.query_type = Some(rtype.to_string());
    let entries = page_entries(st, &control, rows, inc, &parsed.unknown);
    let mut bundle = bundle_out("searchset", links, entries);
    if control.total || control.summary == Some(Summary::Count) {
        let total = match page.known_total {
            Some(n) => n,
            None => scoped.count(query).await?,
        };
        bundle.set_total(total);
    }
    let mut r = bundle.into_response(StatusCode::OK);
    r.extensions_mut().insert(refs);
    Ok(r)
}

/// Where a page starts: the keyset bound (or sort offset) and the earlier
/// pages' positions (for `previous`), from the cursor.
#[derive(Default)]
struct Position {
    before: Option<i64>,
    back: Option<Vec<i64>>,
}

/// The search's store conditions: chains and `_has` resolved, parameters
/// parsed, a `_compartment` added; unknown parameters refused under
/// `Prefer: handling=strict`.
async fn conditions(
    st: &FhirState,
    ctx: &RequestCtx,
    h: &HeaderMap,
    rtype: &ResourceType,
    params: &[(String, String)],
    q: &Query,
) -> Result<crate::data::search::ParsedSearch, Failure> {
    let (plain, chained) = resolve_chains(st, ctx, rtype, params).await?;
    let mut parsed =
        crate::data::search::parse(&st.gate.blind_key(), &st.fhir_base, rtype, &plain)?;
    parsed.and.extend(chained);
    if let Some(c) = q.get(crate::data::search::COMPARTMENT_PARAM) {
        let pid = c
            .strip_prefix("Patient/")
            .filter(|id| phylax_fhir::ids::is_valid_id(id))
            .ok_or_else(|| Failure::bad_request("invalid compartment"))?;
        parsed.and.push(crate::data::search::compartment_condition(
            &st.gate.blind_key(),
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
    Ok(parsed)
}

/// One page of matches.
struct Page {
    rows: Vec<ResourceVersion>,
    /// The next page's position, if there is one.
    next_mark: Option<i64>,
    /// The total, when the whole match set was in hand (then no count
    /// query: the common case for selective searches).
    known_total: Option<u64>,
}

/// Fetch one page: `_summary=count` none; sorted searches in memory after
/// decryption (blind index entries carry no order), so the match set is
/// bounded and pages are offsets into it; otherwise by keyset.
#[allow(clippy::too_many_arguments)]
async fn fetch_page(
    st: &FhirState,
    scoped: &crate::access::scoped::Scoped<'_>,
    rtype: &ResourceType,
    control: &ResultControl,
    query: &phylax_store::SearchQuery,
    before: Option<i64>,
    count: u32,
) -> Result<Page, Failure> {
    if control.summary == Some(Summary::Count) {
        return Ok(Page {
            rows: Vec::new(),
            next_mark: None,
            known_total: None,
        });
    }
    if !control.sort.is_empty() {
        let all = scoped.search(query.clone()).await?;
        if all.len() > MAX_SORTED as usize {
            return Err(Failure::BadRequest(vec![Issue::error(
                IssueCode::TooCostly,
                format!(
                    "more than {MAX_SORTED} matches to sort; narrow the search, or sort by -_lastUpdated (the natural order)"
                ),
            )]));
        }
        let known_total = Some(all.len() as u64);
        let all = control.sort_rows(rtype, all);
        let offset = before.unwrap_or(0).max(0) as usize;
        let n = all.len();
        let mut page: Vec<_> = all.into_iter().skip(offset).take(count as usize).collect();
        bound_page(&mut page, st.config.http.max_response_bytes);
        let end = offset + page.len();
        let more = end < n;
        return Ok(Page {
            rows: page,
            next_mark: more.then_some(end as i64),
            known_total,
        });
    }
    let (mut rows, mut more) = scoped.search_page(query.clone(), count as usize).await?;
    if bound_page(&mut rows, st.config.http.max_response_bytes) {
        more = true;
    }
    let known_total = (!more && before.is_none()).then_some(rows.len() as u64);
    let mark = rows.last().map(|r| r.seq);
    Ok(Page {
        rows,
        next_mark: if more { mark } else { None },
        known_total,
    })
}

/// The page's links. The self link shows the parameters actually used:
/// not the cursor, and not ignored parameters (whose values are never
/// echoed); with hidden terms it is a sealed cursor. `next` and
/// `previous` are sealed cursors.
async fn page_links(
    st: &FhirState,
    rtype: &ResourceType,
    params: &[(String, String)],
    unknown: &[String],
    terms_hidden: bool,
    at: Position,
    next_mark: Option<i64>,
) -> Result<Vec<Value>, Failure> {
    let url = format!("{}/{}", st.fhir_base, rtype);
    let shown: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .cloned()
        .collect();
    let used: Vec<&(String, String)> = shown
        .iter()
        .filter(|(k, _)| {
            !unknown
                .iter()
                .any(|u| u == &k.chars().take(64).collect::<String>())
        })
        .collect();
    let self_q: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(used)
        .finish();
    let (before, back) = (at.before, at.back);
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
    Ok(links)
}

/// Matches, then includes, then (for ignored parameters) an outcome;
/// bodies are moved into the Bundle. Stored text goes into the page as it
/// is, unless `_summary` or `_elements` reshape it.
fn page_entries(
    st: &FhirState,
    control: &ResultControl,
    rows: Vec<ResourceVersion>,
    inc: Vec<ResourceVersion>,
    unknown: &[String],
) -> Vec<EntryOut> {
    let modes = rows
        .into_iter()
        .map(|v| (v, "match"))
        .chain(inc.into_iter().map(|v| (v, "include")));
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
    if !unknown.is_empty() {
        let oo = OperationOutcome {
            issues: unknown
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
    entries
}
