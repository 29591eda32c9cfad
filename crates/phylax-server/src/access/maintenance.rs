//! Maintenance jobs a node runs at start, once per instance, over data
//! written by earlier releases.
//!
//! - [`start`]: everything a node does to stored data before it serves.
//! - [`canonicalize_stored_references`]: references to this server stored
//!   in absolute form get a new version in canonical (relative) form.
//! - [`hold_unvetted_relationships`]: relationship data stored before the
//!   relationships permission is held until an operator approves it.

use crate::access::gate::Gate;
use crate::base::error::Failure;
use crate::data::repo::RepoError;
use phylax_fhir::ResourceType;

/// Bring stored data up to what this release expects, then load the
/// consents: the search index for resources written before it existed
/// (returns how many were indexed), references made canonical (not
/// fatal: retried at the next start), relationship data from before the
/// relationships permission held (fatal: reach must not be computed from
/// it), and the consent index (fatal: consents are enforced from the
/// first request).
pub async fn start(gate: &Gate) -> Result<u64, Failure> {
    let n = gate.repo.reindex_if_needed().await.map_err(Failure::from)?;
    // Holds first, so that canonicalization leaves held versions alone
    // (a rewrite would be a successor no hold covers).
    hold_unvetted_relationships(gate).await?;
    if let Err(e) = canonicalize_stored_references(gate).await {
        tracing::error!(error = ?e, "references to this server could not all be made canonical; retried at the next start");
    }
    gate.refresh_consents().await?;
    Ok(n)
}

/// Once per instance: every current version that establishes reach
/// (`phylax_auth::policy::establishes_reach` types whose content has
/// relationship elements), written before this release checked the
/// relationships permission, is listed as held: it opens no patient until
/// an operator approves it (`crate::access::holds`). On an instance this
/// release created the list is empty. Returns how many versions are held.
pub async fn hold_unvetted_relationships(st: &Gate) -> Result<usize, Failure> {
    if !crate::access::holds::recorded(&*st.meta)
        .await
        .map_err(RepoError::from)?
    {
        list_unvetted(st).await?;
    }
    // Whoever wrote the list (this node or another starting with it), a
    // node serves only with it loaded: otherwise nothing would be held.
    st.holds.reload(&*st.meta).await.map_err(RepoError::from)?;
    if !st.holds.loaded() {
        return Err(Failure::Unavailable(
            "the relationship holds could not be loaded".into(),
        ));
    }
    let n = st.holds.list().len();
    if n > 0 {
        tracing::warn!(
            versions = n,
            "relationship data written before the relationships permission is held: it opens no patient until approved (phylax access held; docs/OPERATIONS.md)"
        );
    }
    Ok(n)
}

/// Record the list of unvetted relationship versions (unless another node
/// did first).
async fn list_unvetted(st: &Gate) -> Result<(), Failure> {
    let mut held = Vec::new();
    for t in phylax_fhir::defs::definitions().resource_types() {
        if !phylax_auth::policy::establishes_reach(t) {
            continue;
        }
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
                if phylax_auth::policy::changes_relationships(t, None, Some(b.json())) {
                    held.push((t.to_owned(), v.id.to_string(), v.version.get()));
                }
            }
        }
    }
    crate::access::holds::record(&*st.meta, &held)
        .await
        .map_err(RepoError::from)?;
    Ok(())
}

/// Once per instance (and again when `http.base_aliases` changes):
/// current resources stored before references to this server were
/// made canonical, whose text still names this server's base, get a
/// new version with relative references, so their compartment, data
/// key, reach and audit attribution follow the patients they name
/// (docs/ACCESS_CONTROL.md, "One canonical form"). Each rewrite is an
/// audited write (`maintenance`, by the server); a concurrent write
/// (already canonical) wins. Idempotent across nodes. A rewrite that would
/// add patients to a resource that already names some, or change care
/// relationships, is not made: it raises a `reference-review` alert.
pub async fn canonicalize_stored_references(st: &Gate) -> Result<u64, Failure> {
    let marker = format!("canonical_refs_v1:{}", st.repo.bases().join(" "));
    let done_key = format!(
        "canonical_refs_v1_{}",
        hex::encode(&phylax_audit::merkle::leaf_hash(marker.as_bytes())[..8])
    );
    if st
        .meta
        .get_meta(&done_key)
        .await
        .map_err(RepoError::from)?
        .is_some()
    {
        return Ok(0);
    }
    let bases = st.repo.bases().to_vec();
    let (mut n, mut held) = (0u64, 0u64);
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
                match canonicalize_one(st, v, &bases).await? {
                    Rewrite::Done => n += 1,
                    Rewrite::Held => held += 1,
                    Rewrite::None => {}
                }
            }
        }
    }
    st.meta
        .put_meta_if_absent(&done_key, b"1")
        .await
        .map_err(RepoError::from)?;
    if held > 0 {
        tracing::warn!(
            resources = held,
            "resources left with absolute references for review (see the reference-review alerts)"
        );
    }
    if n > 0 {
        tracing::info!(
            resources = n,
            "references to this server rewritten in canonical form"
        );
    }
    Ok(n)
}

/// What became of one stored version.
enum Rewrite {
    /// Already canonical, or written meanwhile.
    None,
    /// A new version in canonical form was committed.
    Done,
    /// Left absolute for review (an alert was raised).
    Held,
}

/// Make one current version's references canonical, unless that would put
/// it into another patient's record or change who reaches whom: the
/// writer of the original was never checked against that (an alias
/// configured after the write), so it is left for review, with an alert.
async fn canonicalize_one(
    st: &Gate,
    v: &crate::data::repo::ResourceVersion,
    bases: &[String],
) -> Result<Rewrite, Failure> {
    let Some(b) = &v.body else {
        return Ok(Rewrite::None);
    };
    if !bases.iter().any(|base| b.may_contain(base)) {
        return Ok(Rewrite::None);
    }
    // A held relationship version stays as it is: its rewrite would be a
    // successor no hold covers.
    if st.holds.is_held(v) {
        hold_for_review(st, v);
        return Ok(Rewrite::Held);
    }
    let mut body = b.json().clone();
    if phylax_fhir::reference::canonicalize(&mut body, bases) == 0 {
        return Ok(Rewrite::None);
    }
    let named = phylax_fhir::compartment::patients_of(&v.rtype, b.json());
    let named_after = phylax_fhir::compartment::patients_of(&v.rtype, &body);
    let widens = !named.is_empty() && named_after != named;
    if widens
        || phylax_auth::policy::changes_relationships(v.rtype.as_str(), Some(b.json()), Some(&body))
    {
        hold_for_review(st, v);
        return Ok(Rewrite::Held);
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
        id: crate::audit::log::new_event_id(),
        recorded_ms: crate::base::clock::now_ms(),
        kind: phylax_audit::event::EventKind::Security("maintenance"),
        action: phylax_audit::event::Action::Update,
        outcome: phylax_audit::event::Outcome::Success,
        outcome_desc: Some("references to this server rewritten in canonical form".into()),
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
        query_type: None,
        token_family: None,
        observer: st.audit.origin().to_owned(),
    };
    let row = st
        .audit
        .draft(&facts)
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    match st.repo.commit(vec![w], vec![row]).await {
        Ok(_) => Ok(Rewrite::Done),
        // Written meanwhile: that version went through the canonical form
        // already.
        Err(crate::data::repo::RepoError::Conflict) => Ok(Rewrite::None),
        Err(e) => Err(e.into()),
    }
}

/// Log and alert a version left with absolute references for review.
fn hold_for_review(st: &Gate, v: &crate::data::repo::ResourceVersion) {
    tracing::warn!(
        event = "maintenance.held",
        resource = %format!("{}/{}", v.rtype, v.id),
        "a reference to this server was left absolute: made canonical it would name other patients or change care relationships"
    );
    if let Some(d) = st.audit.detector() {
        d.raise_once(
            crate::audit::alert::Alert {
                rule: "reference-review",
                severity: "medium",
                detail: format!(
                    "{}/{} names this server by an absolute URL; made canonical it would name other patients or change care relationships: review it",
                    v.rtype, v.id
                ),
                user: None,
            },
            format!("reference-review|{}/{}", v.rtype, v.id),
        );
    }
}
