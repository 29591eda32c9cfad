//! The authenticated FHIR routes: the REST interactions, search, history,
//! batch and transaction, and the break-the-glass operation. Bundle
//! entries are routed through the same routes (`bundle::EntryRoutes`).

use crate::state::AppState;
use axum::routing::{get, post};
use axum::{Extension, Router};
use std::sync::Arc;

/// The authenticated FHIR routes. Handlers expect a [`RequestCtx`] in the
/// request extensions: the token middleware attaches it, and batch
/// entries reuse their Bundle's.
pub fn fhir_routes() -> Router<Arc<AppState>> {
    use crate::rest::{bundle, fhir as fhir_api, search as search_api};
    Router::new()
        .route("/fhir", post(bundle::system_post))
        // Clients commonly post Bundles to the base with a trailing slash.
        .route("/fhir/", post(bundle::system_post))
        .route("/fhir/_history", get(fhir_api::history_system))
        .route(
            "/fhir/{rtype}",
            get(search_api::search_type)
                .post(fhir_api::create)
                .put(fhir_api::conditional_update)
                .delete(fhir_api::conditional_delete),
        )
        .route("/fhir/{rtype}/_history", get(fhir_api::history_type))
        .route("/fhir/{rtype}/_search", post(search_api::search_post))
        .route(
            "/fhir/{rtype}/{id}",
            get(fhir_api::read)
                .put(fhir_api::update)
                .delete(fhir_api::delete),
        )
        .route(
            "/fhir/{rtype}/{id}/_history",
            get(fhir_api::history_instance),
        )
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(fhir_api::vread))
        .route(
            "/fhir/{rtype}/{id}/{ctype}",
            get(search_api::compartment_search).post(crate::rest::break_glass::request),
        )
        // Bundle entries are run through these same routes.
        .layer(Extension(bundle::EntryRoutes(fhir_routes)))
}
