//! Maintenance jobs a node runs at start, once per instance, over data
//! written by earlier releases.
//!
//! - [`canonicalize_stored_references`]: references to this server stored
//!   in absolute form get a new version in canonical (relative) form.

use crate::error::ApiError;
use crate::http::AppState;
use crate::repo::RepoError;
use phylax_fhir::ResourceType;

/// Once per instance (and again when `http.base_aliases` changes):
/// current resources stored before references to this server were
/// made canonical, whose text still names this server's base, get a
/// new version with relative references, so their compartment, data
/// key, reach and audit attribution follow the patients they name
/// (docs/ACCESS_CONTROL.md, "One canonical form"). Each rewrite is an
/// audited write (`maintenance`, by the server); a concurrent write
/// (already canonical) wins. Idempotent across nodes.
pub async fn canonicalize_stored_references(st: &AppState) -> Result<u64, ApiError> {
    let marker = format!("canonical_refs_v1:{}", st.repo.bases().join(" "));
    let done_key = format!(
        "canonical_refs_v1_{}",
        hex::encode(&phylax_audit::merkle::leaf_hash(marker.as_bytes())[..8])
    );
    if st
        .store
        .get_meta(&done_key)
        .await
        .map_err(RepoError::from)?
        .is_some()
    {
        return Ok(0);
    }
    let bases = st.repo.bases().to_vec();
    let mut n = 0u64;
    for t in phylax_fhir::defs::definitions().resource_types() {
        let Some(rtype) = ResourceType::parse(t) else {
            continue;
        };
        let mut before = None;
        loop {
            let page = st.repo.list(&rtype, before, 500).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            for v in &page {
                let Some(b) = &v.body else { continue };
                if !bases.iter().any(|base| b.may_contain(base)) {
                    continue;
                }
                let mut body = b.json().clone();
                if phylax_fhir::reference::canonicalize(&mut body, &bases) == 0 {
                    continue;
                }
                let w = st
                    .repo
                    .plan_put(
                        &v.rtype,
                        &v.id,
                        v.version.next(),
                        body,
                        phylax_store::Precondition::CurrentIs(v.version.get()),
                    )
                    .await?;
                let facts = phylax_audit::event::AuditFacts {
                    id: crate::audit::new_event_id(),
                    recorded_ms: crate::now_ms(),
                    kind: phylax_audit::event::EventKind::Security("maintenance"),
                    action: phylax_audit::event::Action::Update,
                    outcome: phylax_audit::event::Outcome::Success,
                    outcome_desc: Some(
                        "references to this server rewritten in canonical form".into(),
                    ),
                    user: None,
                    client: Some("phylax-server".into()),
                    ip: None,
                    token_id: None,
                    request_id: "maintenance".into(),
                    purpose: None,
                    patients: w
                        .body()
                        .map(|b| phylax_fhir::compartment::patients_of(&v.rtype, b))
                        .unwrap_or_default(),
                    resources: vec![format!("{}/{}", v.rtype, v.id)],
                    query_params: Vec::new(),
                    observer: st.audit.origin().to_owned(),
                };
                let row = st
                    .audit
                    .draft(&facts)
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
                match st.repo.commit(vec![w], vec![row]).await {
                    Ok(_) => n += 1,
                    // Written meanwhile: that version went through the
                    // canonical form already.
                    Err(crate::repo::RepoError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    st.store
        .put_meta_if_absent(&done_key, b"1")
        .await
        .map_err(RepoError::from)?;
    if n > 0 {
        tracing::info!(
            resources = n,
            "references to this server rewritten in canonical form"
        );
    }
    Ok(n)
}
