//! Running an entry through the FHIR routes as if it had arrived on its
//! own, and turning the response into a response entry.

use super::entry::{entry_error, Entry};
use crate::access::ctx::RequestCtx;
use crate::base::clock::format_instant;
use crate::state::FhirState;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

/// Run one request through the FHIR routes as if it had arrived on its own,
/// with the Bundle's caller. Returns the response entry.
pub(super) async fn dispatch(
    svc: &Router,
    ctx: &RequestCtx,
    outer: &HeaderMap,
    e: &Entry,
) -> (Value, usize) {
    let mut b = Request::builder()
        .method(e.verb.method())
        .uri(format!("/fhir/{}", e.url));
    for (k, v) in [
        (header::IF_MATCH.as_str(), &e.if_match),
        ("if-none-exist", &e.if_none_exist),
    ] {
        if let Some(v) = v.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            b = b.header(k, v);
        }
    }
    for v in outer.get_all("prefer") {
        b = b.header("prefer", v.clone());
    }
    let body = match &e.resource {
        Some(r) => {
            b = b.header(header::CONTENT_TYPE, "application/fhir+json");
            Body::from(r.to_string())
        }
        None => Body::empty(),
    };
    let req = match b.body(body) {
        Ok(mut r) => {
            r.extensions_mut().insert(ctx.clone());
            r
        }
        Err(_) => {
            return response_entry_sized(
                entry_error(e.idx, "request.url is not a valid URL").into_response(),
            )
            .await
        }
    };
    match svc.clone().oneshot(req).await {
        Ok(r) => response_entry_sized(r).await,
        Err(never) => match never {},
    }
}

/// How Bundle entries are routed: the FHIR routes, handed to the Bundle
/// handler as a request extension by the router that registers it
/// ([`crate::rest::routes`]), so entries run exactly as if they had arrived
/// on their own (and this module need not know the routes).
#[derive(Clone, Copy)]
pub struct EntryRoutes(pub fn() -> Router<Arc<FhirState>>);

impl std::fmt::Debug for EntryRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryRoutes")
    }
}

/// The FHIR routes, for running entries as if they had arrived on their
/// own (built once per Bundle).
pub(super) fn entry_router(st: &Arc<FhirState>, routes: EntryRoutes) -> Router {
    (routes.0)()
        .with_state(st.clone())
        .layer(axum::middleware::from_fn(
            crate::rest::error::normalize_errors,
        ))
}

/// Turn a response into a Bundle response entry.
pub(super) async fn response_entry_for(r: Response) -> Value {
    response_entry_sized(r).await.0
}

/// [`response_entry_for`], with the size of the entry's resource.
pub(super) async fn response_entry_sized(r: Response) -> (Value, usize) {
    let status = r.status();
    let (location, etag, modified) = {
        let hv = |n: header::HeaderName| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            hv(header::LOCATION),
            hv(header::ETAG),
            hv(header::LAST_MODIFIED),
        )
    };
    let last_modified = modified.and_then(|d| {
        httpdate::parse_http_date(&d).ok().map(|t| {
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            format_instant(ms)
        })
    });
    // Responses of our own routes: bounded by the same limits.
    let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let size = bytes.len();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let mut resp = json!({"status": status_line(status)});
    if let Some(l) = location {
        resp["location"] = json!(l);
    }
    if let Some(e) = etag {
        resp["etag"] = json!(e);
    }
    if let Some(m) = last_modified {
        resp["lastModified"] = json!(m);
    }
    let mut entry = json!({});
    match body {
        Some(b) if !status.is_success() => resp["outcome"] = b,
        Some(b) => entry["resource"] = b,
        None => {}
    }
    entry["response"] = resp;
    (entry, size)
}

pub(super) fn status_line(s: StatusCode) -> String {
    format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""))
        .trim_end()
        .to_owned()
}
