//! `POST /fhir`: a batch or transaction Bundle, its resources masked like
//! any response.

use super::batch::batch;
use super::entry::parse_entries;
use super::routing::EntryRoutes;
use super::transaction::transaction;
use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::error::Failure;
use crate::rest::pipeline;
use crate::rest::wire;
use crate::state::FhirState;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;
use std::sync::Arc;

/// `POST /fhir` with a Bundle of type `batch` or `transaction`.
pub async fn system_post(
    State(st): State<Arc<FhirState>>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(routes): Extension<EntryRoutes>,
    h: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let bundle = wire::read_json(&st, &h, body).await?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(Failure::bad_request(
                "POST to the base accepts a Bundle of type batch or transaction",
            ));
        }
        // The Bundle's own structure is checked here; each entry's resource
        // is validated as that entry is processed (a batch entry fails on
        // its own; a transaction's after its references are resolved).
        let mut skeleton = bundle.clone();
        if let Some(es) = skeleton.get_mut("entry").and_then(Value::as_array_mut) {
            for e in es.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("resource");
            }
        }
        wire::validated(skeleton)?;
        let entries = parse_entries(&st, &bundle)?;
        match bundle.get("type").and_then(Value::as_str) {
            Some("transaction") => {
                let entries = entries.into_iter().collect::<Result<Vec<_>, _>>()?;
                Ok(transaction(&st, &ctx, &h, entries, routes).await)
            }
            Some("batch") => Ok(batch(&st, &ctx, &h, entries, routes).await),
            _ => Err(Failure::bad_request(
                "POST to the base accepts a Bundle of type batch or transaction",
            )),
        }
    }
    .await;
    match result {
        // Entries' resources are masked like any response.
        Ok(r) => match crate::rest::mask::masks_of(&ctx) {
            Some(m) => crate::rest::mask::apply(r, m).await,
            None => r,
        },
        Err(e) => {
            let status = e.status().as_u16();
            match pipeline::record(&st, &ctx, "batch", AuditRefs::default(), status, None).await {
                Ok(()) => e.into_response(),
                Err(a) => a.into_response(),
            }
        }
    }
}

// ---------------------------------------------------------------- batch
