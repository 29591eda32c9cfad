//! The search routes: type search (GET and `POST _search`) and Patient
//! compartment search.

use super::everything::everything;
use super::query::search;
use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::rest::pipeline;
use crate::rest::wire::{parse_type, Query, St};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Extension;
use phylax_auth::policy::Interaction;
use phylax_fhir::ResourceId;

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
