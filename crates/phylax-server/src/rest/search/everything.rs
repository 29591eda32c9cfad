//! `Patient/{id}/$everything`: the compartment and what it references,
//! paged by sealed cursors.

use super::cursor::{open_search_cursor, seal_search_cursor};
use super::include::{local_target, MAX_INCLUDED};
use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::pipeline;
use crate::rest::wire::{bundle_out, check_accept, page_size, parse_since, EntryOut, Query};
use crate::state::FhirState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{Issue, IssueCode, ResourceId, ResourceType};
use serde_json::json;
use std::sync::Arc;

/// Cursor scope of `$everything` pages (no resource type starts with `$`,
/// so these never open as search cursors, nor the reverse).
pub(super) const EVERYTHING_CURSOR: &str = "$everything";

/// `GET /fhir/Patient/{id}/$everything`: the patient and every resource in
/// their compartment (official CompartmentDefinition), plus the resources
/// those reference outside it (practitioners, organizations, medications…),
/// with `_since`, `_type` and `_count`, paged by sealed cursors. Types the
/// caller may not search are silently left out, as are referenced
/// resources it may not read.
pub(super) async fn everything(
    st: Arc<FhirState>,
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
            everything_page(&st, &ctx, &patient_type, &pid, &h, raw).await
        },
    )
    .await
}

/// One page of `$everything` for a patient the caller reaches.
async fn everything_page(
    st: &FhirState,
    ctx: &RequestCtx,
    patient_type: &ResourceType,
    pid: &ResourceId,
    h: &HeaderMap,
    raw: Option<String>,
) -> Result<Response, Failure> {
    let q = Query::parse(raw).without_internal();
    check_accept(h, &q)?;
    st.scoped(ctx).compartment_anchor(patient_type, pid).await?;
    let (params, ti, before) = position(st, q, pid).await?;
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
    let count = page_size(st, &params)? as usize;
    let since = parse_since(&params)?;
    let types = compartment_types(ctx, patient_type, &params)?;
    let (page, next) = fill_page(st, ctx, pid, &types, since, count, ti, before).await?;
    let referenced = referenced(st, ctx, &page).await?;
    let url = format!("{}/Patient/{}/$everything", st.fhir_base, pid);
    let mut links = vec![json!({"relation": "self", "url": url})];
    if let Some((nti, nb)) = next {
        let mut p = params.0.clone();
        p.retain(|(k, _)| k != "_cursor");
        p.push(("_patient".into(), pid.to_string()));
        p.push(("_ti".into(), nti.to_string()));
        let c = seal_search_cursor(st, EVERYTHING_CURSOR, &p, nb, &[]).await?;
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
}

/// The parameters and position of this page: from the query, or from a
/// sealed cursor (which must be this patient's): the type index and the
/// keyset bound within that type.
async fn position(
    st: &FhirState,
    q: Query,
    pid: &ResourceId,
) -> Result<(Query, usize, Option<i64>), Failure> {
    let Some(c) = q.get("_cursor") else {
        return Ok((q, 0, None));
    };
    let cur = open_search_cursor(st, EVERYTHING_CURSOR, c).await?;
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
    Ok((Query(p), ti, (b >= 0).then_some(b)))
}

/// The compartment's types the caller may search (and `_type` asks for):
/// Patient first, then every other compartment type by name.
fn compartment_types(
    ctx: &RequestCtx,
    patient_type: &ResourceType,
    params: &Query,
) -> Result<Vec<ResourceType>, Failure> {
    let wanted: Option<Vec<ResourceType>> = match params.get("_type") {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|t| {
                    ResourceType::parse(t.trim())
                        .ok_or_else(|| Failure::bad_request("_type lists unknown resource types"))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
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
            && decide(ctx.principal(), Interaction::SearchType, Some(t.as_str())) == Decision::Allow
    });
    Ok(types)
}

/// Fill a page of `count` from the compartment, type after type from
/// `types[ti]` (within it, before `before`). Returns the page and where
/// the next one starts (type index, keyset bound or -1 for a type's start).
#[allow(clippy::too_many_arguments)]
async fn fill_page(
    st: &FhirState,
    ctx: &RequestCtx,
    pid: &ResourceId,
    types: &[ResourceType],
    since: Option<i64>,
    count: usize,
    mut ti: usize,
    mut before: Option<i64>,
) -> Result<(Vec<ResourceVersion>, Option<(usize, i64)>), Failure> {
    let mut page: Vec<ResourceVersion> = Vec::new();
    let mut next: Option<(usize, i64)> = None;
    while ti < types.len() && page.len() < count {
        let t = &types[ti];
        let need = count - page.len();
        let mut and = vec![crate::data::search::compartment_condition(
            &st.gate.blind_key(),
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
            .scoped(ctx)
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
    Ok((page, next))
}

/// Resources the page references outside the compartment, that the caller
/// may read (at most `MAX_INCLUDED`).
async fn referenced(
    st: &FhirState,
    ctx: &RequestCtx,
    page: &[ResourceVersion],
) -> Result<Vec<ResourceVersion>, Failure> {
    let defs = phylax_fhir::defs::definitions();
    let mut seen: std::collections::HashSet<(String, String)> = page
        .iter()
        .map(|v| (v.rtype.to_string(), v.id.to_string()))
        .collect();
    let mut referenced = Vec::new();
    let mut refs = Vec::new();
    for v in page {
        if let Some(b) = &v.body {
            crate::rest::wire::collect_references(b.json(), &mut refs);
        }
    }
    for r in refs {
        let Some((t, rid)) = local_target(st, &r) else {
            continue;
        };
        if !defs.compartment_params(t.as_str()).is_empty()
            || t.as_str() == "Patient"
            || referenced.len() >= MAX_INCLUDED
            || !seen.insert((t.to_string(), rid.to_string()))
            || decide(ctx.principal(), Interaction::Read, Some(t.as_str())) != Decision::Allow
        {
            continue;
        }
        if let Some(v) = st.scoped(ctx).visible(&t, &rid).await? {
            referenced.push(v);
        }
    }
    Ok(referenced)
}
