//! The authenticated FHIR routes: the REST interactions, search, history,
//! batch and transaction, and the break-the-glass operation. Bundle
//! entries are routed through the same routes (`bundle::EntryRoutes`).

use crate::state::FhirState;
use axum::routing::{get, post};
use axum::{Extension, Router};
use std::sync::Arc;

/// The authenticated FHIR routes. Handlers expect a [`crate::access::ctx::RequestCtx`] in the
/// request extensions: the token middleware attaches it, and batch
/// entries reuse their Bundle's.
pub fn fhir_routes() -> Router<Arc<FhirState>> {
    use crate::rest::{bundle, fhir, search};
    // Bundle entries are run through these same routes: the Bundle
    // handler alone is told how (not every FHIR request).
    let bundles = || post(bundle::system_post).layer(Extension(bundle::EntryRoutes(fhir_routes)));
    Router::new()
        .route("/fhir", bundles())
        // Clients commonly post Bundles to the base with a trailing slash.
        .route("/fhir/", bundles())
        .route("/fhir/_history", get(fhir::history_system))
        .route(
            "/fhir/{rtype}",
            get(search::search_type)
                .post(fhir::create)
                .put(fhir::conditional_update)
                .delete(fhir::conditional_delete),
        )
        .route("/fhir/{rtype}/_history", get(fhir::history_type))
        .route("/fhir/{rtype}/_search", post(search::search_post))
        .route(
            "/fhir/{rtype}/{id}",
            get(fhir::read).put(fhir::update).delete(fhir::delete),
        )
        .route("/fhir/{rtype}/{id}/_history", get(fhir::history_instance))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(fhir::vread))
        .route(
            "/fhir/{rtype}/{id}/{ctype}",
            get(search::compartment_search).post(crate::rest::break_glass::request),
        )
}
