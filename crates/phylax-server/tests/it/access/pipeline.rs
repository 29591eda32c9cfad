//! Resources are reached only inside the interaction pipeline.

use super::*;
use phylax_fhir::{ResourceId, ResourceType};
use phylax_server::access::scoped::decided;
use phylax_server::base::error::Failure;

// A handler that skips `pipeline::run` (its type-level decision, masking
// and audit record) and asks for the scoped repository anyway gets one that
// refuses every read and write; the same repository made inside decided
// work reads. docs/ARCHITECTURE.md, "Resources only through `Scoped`".
on_both!(scoped_access_outside_the_pipeline_is_refused);
async fn scoped_access_outside_the_pipeline_is_refused(s: &TestServer) {
    let l = loader(s);
    put(s, &l, json!({"resourceType": "Patient", "id": "pa-pipe"})).await;
    let principal = phylax_auth::policy::Principal::Client {
        client_id: "loader".into(),
        scopes: phylax_auth::ScopeSet::parse_lenient("system/*.cruds"),
        token_id: "t-pipeline".into(),
    };
    let ctx =
        phylax_server::access::reach::establish(&s.state.gate, principal, None, None, "rq".into())
            .await
            .unwrap();
    let fhir = &s.state.fhir;
    let (t, id) = (
        ResourceType::parse("Patient").unwrap(),
        ResourceId::parse("pa-pipe").unwrap(),
    );

    // Outside: reads, searches and writes are refused, nothing is written.
    let outside = fhir.scoped(&ctx);
    let read = outside.read(&t, &id).await;
    assert!(
        matches!(read, Err(Failure::Refused("undecided"))),
        "{read:?}"
    );
    let written = outside
        .create(&t, json!({"resourceType": "Patient", "gender": "other"}))
        .await;
    assert!(written.is_err(), "a write outside the pipeline was stored");
    assert!(!outside_exists(s, &l).await);

    // Inside decided work the same call reads.
    let v = decided(async { fhir.scoped(&ctx).read(&t, &id).await }).await;
    assert!(v.is_ok(), "{v:?}");
}

/// Whether a Patient with gender `other` exists (the refused write).
async fn outside_exists(s: &TestServer, token: &str) -> bool {
    let (st, b) = send(s, token, M::GET, "/Patient?gender=other", None).await;
    assert_eq!(st, 200, "{b}");
    b["entry"].as_array().is_some_and(|e| !e.is_empty())
}
