//! Batch: each entry on its own, with its own status.

use super::entry::Entry;
use super::routing::{
    dispatch, entry_router, response_entry_for, response_entry_sized, EntryRoutes,
};
use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::error::Failure;
use crate::rest::pipeline;
use crate::rest::wire;
use crate::state::FhirState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;

pub(super) async fn batch(
    st: &Arc<FhirState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    entries: Vec<Result<Entry, Failure>>,
    routes: EntryRoutes,
) -> Response {
    let svc = entry_router(st, routes);
    let mut out = Vec::with_capacity(entries.len());
    // The answer is assembled in memory: past `http.max_response_bytes`
    // the remaining entries are not run, each answered with a
    // `too-costly` outcome (nothing of theirs happened), so a batch of
    // thousands of searches cannot hold gigabytes.
    let cap = st.config.http.max_response_bytes;
    let mut total = 0usize;
    for e in entries {
        if total > cap {
            let idx = e.as_ref().map(|e| e.idx).unwrap_or(0);
            out.push(
                response_entry_for(
                    Failure::Unprocessable(vec![phylax_fhir::Issue::error(
                        phylax_fhir::IssueCode::TooCostly,
                        format!(
                            "entry {idx} was not processed: the batch's answer passed {cap} bytes (http.max_response_bytes); send the rest in another batch"
                        ),
                    )])
                    .into_response(),
                )
                .await,
            );
            continue;
        }
        let (entry, size) = match e {
            Ok(e) => dispatch(&svc, ctx, h, &e).await,
            Err(err) => response_entry_sized(err.into_response()).await,
        };
        total = total.saturating_add(size);
        out.push(entry);
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "batch-response",
        "entry": out,
    });
    if let Err(e) = pipeline::record(st, ctx, "batch", AuditRefs::default(), 200, None).await {
        return e.into_response();
    }
    wire::fhir_json(StatusCode::OK, &bundle)
}

// ---------------------------------------------------------- transaction
