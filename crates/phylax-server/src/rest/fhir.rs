//! FHIR R4 REST handlers: create, read, vread, update, delete, history
//! (instance, type, system), conditional create/update/delete, and
//! `metadata`. Their wire helpers are in [`crate::rest::wire`], shared
//! with search ([`crate::rest::search`]) and Bundles
//! ([`crate::rest::bundle`]).
//!
//! Every handler parses its inputs into typed values first (resource type,
//! id, version, headers) and hands its work to [`pipeline::run`].

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::clock::format_instant;
use crate::base::error::Failure;
use crate::rest::pipeline;
use crate::rest::search::ResultControl;
use crate::state::FhirState;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{ResourceId, VersionId};
use phylax_store::HistoryScope;
use serde_json::{json, Value};

use crate::rest::wire::{
    bundle, check_accept, committed, conditional_matches, fhir_json, make_cursor, open_cursor,
    page_size, parse_if_match, parse_since, parse_type, read_resource, read_response,
    version_headers, write_response, Query, St,
};
pub async fn metadata(State(st): St, h: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    if let Err(e) = check_accept(&h, &Query::parse(raw)) {
        return e.into_response();
    }
    fhir_json(StatusCode::OK, &st.capability)
}

pub async fn create(
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
        Interaction::Create,
        Some(&rtype),
        None,
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return Err(crate::rest::audit_api::refuse_write());
            }
            check_accept(&h, &q)?;
            let (bt, value) = read_resource(&st, &h, body).await?;
            if bt != rtype {
                return Err(Failure::bad_request("resourceType does not match the URL"));
            }
            // Conditional create: `If-None-Exist: [search parameters]`.
            if let Some(cond) = h.get("if-none-exist") {
                let cond = cond
                    .to_str()
                    .map_err(|_| Failure::bad_request("malformed If-None-Exist"))?;
                let params = Query::parse(Some(cond.trim_start_matches('?').to_owned()))
                    .without_internal()
                    .0;
                match conditional_matches(&st, &ctx, &rtype, &params)
                    .await?
                    .as_slice()
                {
                    [] => {}
                    [existing] => {
                        // One match: the create is ignored, the match returned.
                        return Ok(write_response(&st, &h, StatusCode::OK, existing));
                    }
                    _ => return Err(Failure::PreconditionFailed),
                }
            }
            let (v, c) = st.scoped(&ctx).create(&rtype, value).await?;
            Ok(committed(
                write_response(&st, &h, StatusCode::CREATED, &v),
                c,
            ))
        },
    )
    .await)
}

pub async fn read(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((t, id)): Path<(String, String)>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    let rid = ResourceId::parse(&id);
    let audit_id = rid.as_ref().map(ResourceId::to_string);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::Read,
        Some(&rtype),
        audit_id.as_deref(),
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return crate::rest::audit_api::read(&st, &id).await;
            }
            check_accept(&h, &q)?;
            let control = ResultControl::parse(&rtype, &q)?;
            let id = rid.ok_or(Failure::NotFound)?;
            let v = st.scoped(&ctx).read(&rtype, &id).await?;
            crate::access::care::watch_own_name(&st.gate, &ctx, [&v]).await;
            match (&v.body, control.subsets()) {
                (Some(b), true) => {
                    let mut r = fhir_json(StatusCode::OK, &control.apply(b.json()));
                    version_headers(&mut r, &st, &v, false);
                    r.extensions_mut().insert(AuditRefs::of_versions([&v]));
                    Ok(r)
                }
                _ => Ok(read_response(&st, &v)),
            }
        },
    )
    .await)
}

pub async fn vread(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((t, id, vid)): Path<(String, String, String)>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    let rid = ResourceId::parse(&id);
    let audit_id = rid.as_ref().map(ResourceId::to_string);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::VRead,
        Some(&rtype),
        audit_id.as_deref(),
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                // Audit records never change: version 1 is the record.
                return match vid.as_str() {
                    "1" => crate::rest::audit_api::read(&st, &id).await,
                    _ => Err(Failure::NotFound),
                };
            }
            check_accept(&h, &q)?;
            let id = rid.ok_or(Failure::NotFound)?;
            let vid = VersionId::parse(&vid).ok_or(Failure::NotFound)?;
            let v = st.scoped(&ctx).vread(&rtype, &id, vid).await?;
            Ok(read_response(&st, &v))
        },
    )
    .await)
}

pub async fn update(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((t, id)): Path<(String, String)>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    let rid = ResourceId::parse(&id);
    let audit_id = rid.as_ref().map(ResourceId::to_string);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::Update,
        Some(&rtype),
        audit_id.as_deref(),
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return Err(crate::rest::audit_api::refuse_write());
            }
            check_accept(&h, &q)?;
            let id = rid
                .ok_or_else(|| Failure::bad_request("the id in the URL is not a valid FHIR id"))?;
            let if_match = parse_if_match(&h)?;
            let (bt, value) = read_resource(&st, &h, body).await?;
            if bt != rtype {
                return Err(Failure::bad_request("resourceType does not match the URL"));
            }
            match value.get("id").and_then(Value::as_str) {
                Some(b) if b == id.as_str() => {}
                Some(_) => {
                    return Err(Failure::bad_request(
                        "the id in the body does not match the id in the URL",
                    ))
                }
                None => {
                    return Err(Failure::bad_request(
                        "an update must carry the resource id in the body",
                    ))
                }
            }
            // Creating through PUT needs the create permission as well.
            let may_create = st.config.http.allow_update_create
                && decide(
                    ctx.principal(),
                    Interaction::UpdateCreate,
                    Some(rtype.as_str()),
                ) == Decision::Allow;
            let (v, created, c) = match st
                .scoped(&ctx)
                .update(&rtype, &id, value, if_match, may_create)
                .await
            {
                Err(crate::data::repo::RepoError::CreateViaUpdateDisabled)
                    if st.config.http.allow_update_create =>
                {
                    return Err(Failure::Forbidden)
                }
                r => r?,
            };
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(committed(write_response(&st, &h, status, &v), c))
        },
    )
    .await)
}

pub async fn delete(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((t, id)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let rid = ResourceId::parse(&id);
    let audit_id = rid.as_ref().map(ResourceId::to_string);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::Delete,
        Some(&rtype),
        audit_id.as_deref(),
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return Err(crate::rest::audit_api::refuse_write());
            }
            let id = rid.ok_or(Failure::NotFound)?;
            let mut r = StatusCode::NO_CONTENT.into_response();
            if let Some((v, c)) = st.scoped(&ctx).delete(&rtype, &id).await? {
                r.extensions_mut().insert(c);
                if let Ok(e) = HeaderValue::from_str(&format!("W/\"{}\"", v.version)) {
                    r.headers_mut().insert(header::ETAG, e);
                }
            }
            Ok(r)
        },
    )
    .await)
}

/// History for any scope, as a `history` Bundle with MACed paging links.
/// Versions outside the caller's reach are left out of the page (a
/// resource's history is decided version by version: one that moved
/// between patients shows only the versions the caller may see).
async fn history(
    st: &FhirState,
    ctx: &RequestCtx,
    scope: HistoryScope,
    listing: String,
    path: String,
    q: &Query,
    h: &HeaderMap,
) -> Result<Response, Failure> {
    check_accept(h, q)?;
    let count = page_size(st, q)?;
    let since = parse_since(q)?;
    let listing = format!(
        "{listing}|{}",
        since.map(|s| s.to_string()).unwrap_or_default()
    );
    let before = q
        .get("_cursor")
        .map(|c| open_cursor(st, &listing, c))
        .transpose()?;
    // Confined and checked by the scoped repository (see
    // `Scoped::history_page`).
    let page = st
        .scoped(ctx)
        .history_page(scope, since, before, count)
        .await?;
    let more = page.more;
    let next_mark = page.last_seq;
    let rows: Vec<&crate::data::repo::ResourceVersion> = page.versions.iter().collect();
    let mut base_q = format!("_count={count}");
    if let Some(s) = q.get("_since") {
        base_q.push_str("&_since=");
        base_q.push_str(&form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>());
    }
    let url = format!("{}{}", st.fhir_base, path);
    let mut links = vec![json!({"relation": "self", "url": match q.get("_cursor") {
        Some(c) => format!("{url}?{base_q}&_cursor={c}"),
        None => format!("{url}?{base_q}"),
    }})];
    if more {
        if let Some(last) = next_mark {
            links.push(json!({"relation": "next", "url": format!("{url}?{base_q}&_cursor={}", make_cursor(st, &listing, last))}));
        }
    }
    let entries: Vec<Value> = rows
        .iter()
        .map(|v| {
            let full = format!("{}/{}/{}", st.fhir_base, v.rtype, v.id);
            let mut e = json!({
                "fullUrl": full,
                "request": {
                    "method": if v.deleted { "DELETE" } else if v.version.get() == 1 { "POST" } else { "PUT" },
                    "url": if v.version.get() == 1 && !v.deleted { v.rtype.to_string() } else { format!("{}/{}", v.rtype, v.id) },
                },
                "response": {
                    "status": if v.deleted { "204" } else if v.version.get() == 1 { "201" } else { "200" },
                    "etag": format!("W/\"{}\"", v.version),
                    "lastModified": format_instant(v.last_updated),
                },
            });
            if let Some(b) = &v.body {
                e["resource"] = b.json().clone();
            }
            e
        })
        .collect();
    let mut r = fhir_json(StatusCode::OK, &bundle("history", links, entries));
    r.extensions_mut()
        .insert(AuditRefs::of_versions(rows.iter().copied()));
    Ok(r)
}

pub async fn history_instance(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path((t, id)): Path<(String, String)>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    let rid = ResourceId::parse(&id);
    let audit_id = rid.as_ref().map(ResourceId::to_string);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::HistoryInstance,
        Some(&rtype),
        audit_id.as_deref(),
        || async {
            let id = rid.ok_or(Failure::NotFound)?;
            if !st.scoped(&ctx).exists(&rtype, &id).await? {
                return Err(Failure::NotFound);
            }
            // A caller limited to some patients must not learn that an id
            // outside their reach exists from an empty history.
            if ctx.access().reach != phylax_auth::policy::Reach::All
                || !ctx.access().labelled
                || !ctx.access().denied.is_empty()
            {
                match st.scoped(&ctx).read(&rtype, &id).await {
                    Ok(_) => {}
                    // Deleted, and the caller reaches every patient: the
                    // versions are decided one by one below.
                    Err(Failure::Gone) => {}
                    Err(e) => return Err(e),
                }
            }
            let scope = HistoryScope::Instance(rtype.to_string(), id.to_string());
            history(
                &st,
                &ctx,
                scope,
                format!("i|{rtype}|{id}"),
                format!("/{rtype}/{id}/_history"),
                &q,
                &h,
            )
            .await
        },
    )
    .await)
}

pub async fn history_type(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path(t): Path<String>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw);
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::HistoryType,
        Some(&rtype),
        None,
        || async {
            history(
                &st,
                &ctx,
                HistoryScope::Type(rtype.to_string()),
                format!("t|{rtype}"),
                format!("/{rtype}/_history"),
                &q,
                &h,
            )
            .await
        },
    )
    .await)
}

pub async fn history_system(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = Query::parse(raw);
    pipeline::run(
        &st,
        &ctx,
        Interaction::HistorySystem,
        None,
        None,
        || async {
            history(
                &st,
                &ctx,
                HistoryScope::System,
                "s".into(),
                "/_history".into(),
                &q,
                &h,
            )
            .await
        },
    )
    .await
}

/// `PUT /fhir/{type}?criteria`: update the single match, create when there
/// is none, 412 when several match.
pub async fn conditional_update(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path(t): Path<String>,
    h: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw).without_internal();
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::Update,
        Some(&rtype),
        None,
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return Err(crate::rest::audit_api::refuse_write());
            }
            check_accept(&h, &q)?;
            let criteria: Vec<(String, String)> =
                q.0.iter()
                    .filter(|(k, _)| k != "_format")
                    .cloned()
                    .collect();
            let (bt, mut value) = read_resource(&st, &h, body).await?;
            if bt != rtype {
                return Err(Failure::bad_request("resourceType does not match the URL"));
            }
            let body_id = value.get("id").and_then(Value::as_str).map(str::to_owned);
            match conditional_matches(&st, &ctx, &rtype, &criteria)
                .await?
                .as_slice()
            {
                [] => {
                    if decide(ctx.principal(), Interaction::Create, Some(rtype.as_str()))
                        != Decision::Allow
                    {
                        return Err(Failure::Forbidden);
                    }
                    match body_id.as_deref().map(ResourceId::parse) {
                        // No match and no id: an ordinary create.
                        None => {
                            let (v, c) = st.scoped(&ctx).create(&rtype, value).await?;
                            Ok(committed(
                                write_response(&st, &h, StatusCode::CREATED, &v),
                                c,
                            ))
                        }
                        // No match, an id: update-as-create, if allowed.
                        Some(Some(id)) => {
                            if !st.config.http.allow_update_create {
                                return Err(Failure::MethodNotAllowed(
                                    "update-as-create is not allowed on this server",
                                ));
                            }
                            // The id exists but the criteria do not select it:
                            // refuse rather than overwrite an unrelated resource.
                            // A writer limited to some patients learns nothing
                            // of ids it cannot see: those answer as hidden (404)
                            // before the conflict is told.
                            if st.scoped(&ctx).occupied(&rtype, &id).await? {
                                return Err(Failure::Conflict);
                            }
                            let (v, _, c) = st
                                .scoped(&ctx)
                                .update(&rtype, &id, value, None, true)
                                .await?;
                            Ok(committed(
                                write_response(&st, &h, StatusCode::CREATED, &v),
                                c,
                            ))
                        }
                        Some(None) => Err(Failure::bad_request(
                            "the id in the body is not a valid FHIR id",
                        )),
                    }
                }
                [m] => {
                    if body_id.as_deref().is_some_and(|b| b != m.id.as_str()) {
                        return Err(Failure::bad_request(
                            "the id in the body does not match the resource the criteria select",
                        ));
                    }
                    if let Some(o) = value.as_object_mut() {
                        o.insert("id".into(), json!(m.id.as_str()));
                    }
                    let (v, _, c) = st
                        .scoped(&ctx)
                        .update(&rtype, &m.id, value, parse_if_match(&h)?, false)
                        .await?;
                    Ok(committed(write_response(&st, &h, StatusCode::OK, &v), c))
                }
                _ => Err(Failure::PreconditionFailed),
            }
        },
    )
    .await)
}

/// `DELETE /fhir/{type}?criteria`: delete the single match (none: 204),
/// 412 when several match.
pub async fn conditional_delete(
    State(st): St,
    Extension(ctx): Extension<RequestCtx>,
    Path(t): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let rtype = parse_type(&t)?;
    let q = Query::parse(raw).without_internal();
    Ok(pipeline::run(
        &st,
        &ctx,
        Interaction::Delete,
        Some(&rtype),
        None,
        || async {
            if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE {
                return Err(crate::rest::audit_api::refuse_write());
            }
            match conditional_matches(&st, &ctx, &rtype, &q.0)
                .await?
                .as_slice()
            {
                [] => Ok(StatusCode::NO_CONTENT.into_response()),
                [m] => {
                    let mut r = StatusCode::NO_CONTENT.into_response();
                    if let Some((v, c)) = st.scoped(&ctx).delete(&rtype, &m.id).await? {
                        r.extensions_mut().insert(c);
                        if let Ok(e) = HeaderValue::from_str(&format!("W/\"{}\"", v.version)) {
                            r.headers_mut().insert(header::ETAG, e);
                        }
                    }
                    let mut refs = AuditRefs::default();
                    refs.add(&rtype, m.id.as_str(), None);
                    r.extensions_mut().insert(refs);
                    Ok(r)
                }
                _ => Err(Failure::PreconditionFailed),
            }
        },
    )
    .await)
}
