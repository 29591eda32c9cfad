//! Care relationships: how a workforce user or a patient is known in the
//! data, the patients a clinician cares for (cached per user for
//! [`CARE_TTL`]), break-the-glass grants in force, the
//! patients a relationship write opens, and the own-family-name watch.

use crate::access::gate::{Cached, Gate};
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use phylax_auth::policy::Principal;
use phylax_fhir::{compartment, ResourceType};
use phylax_store::SearchQuery;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// How long a user's computed care relationships are reused.
pub const CARE_TTL: Duration = Duration::from_secs(5);

/// Types whose writes can start or end a care relationship (or, `Person`,
/// change who a patient is in the data).
pub const CARE_TYPES: &[&str] = &[
    "Patient",
    "CareTeam",
    "Encounter",
    "EpisodeOfCare",
    "PractitionerRole",
    "Person",
];

/// Most rows read per care-relationship lookup: a practitioner with more
/// encounters than this is treated as over `max_reach`.
pub(in crate::access) const CARE_SCAN_LIMIT: u32 = 100_000;

pub(in crate::access) fn cached(st: &Gate, user_id: &str) -> Cached {
    match st.care_cache.map.lock().get(user_id) {
        Some((at, c)) if at.elapsed() < CARE_TTL => c.clone(),
        _ => Cached::default(),
    }
}

pub(in crate::access) fn store_cached(st: &Gate, user_id: &str, f: impl FnOnce(&mut Cached)) {
    let mut map = st.care_cache.map.lock();
    let e = map
        .entry(user_id.to_owned())
        .or_insert_with(|| (Instant::now(), Cached::default()));
    if e.0.elapsed() >= CARE_TTL {
        *e = (Instant::now(), Cached::default());
    }
    f(&mut e.1);
}

/// The patients a user holds an unexpired break-the-glass grant for
/// (expiry is checked on every request, whatever the cache holds).
pub(in crate::access) async fn emergency_patients(
    st: &Gate,
    user_id: &str,
) -> Result<BTreeSet<String>, Failure> {
    let now = crate::base::clock::now_ms();
    let grants = match cached(st, user_id).emergency {
        Some(g) => g,
        None => {
            let g = crate::access::break_glass::active_grants(st, user_id).await?;
            store_cached(st, user_id, |c| c.emergency = Some(g.clone()));
            g
        }
    };
    Ok(grants
        .into_iter()
        .filter(|(_, exp)| *exp > now)
        .map(|(p, _)| p)
        .collect())
}

/// The patients a workforce user has a care relationship with, from the
/// data: through their linked `Practitioner` (`phylax user
/// set-practitioner`), its `PractitionerRole`s and their organizations —
/// `Patient.generalPractitioner`, `Patient.managingOrganization`,
/// `CareTeam.participant`, `Encounter.participant` and
/// `EpisodeOfCare.careManager`. Only holders of the relationships
/// permission write these (`phylax_auth::policy::decide_relationships`). `None` when the set
/// exceeds `access.max_reach`. A user with no linked practitioner reaches
/// no patient (fail closed).
pub(in crate::access) async fn care_patients(
    st: &Gate,
    user_id: &str,
) -> Result<Option<Arc<BTreeSet<String>>>, Failure> {
    if let Some(c) = cached(st, user_id).care {
        return Ok(c);
    }
    let computed = compute_care(st, user_id).await?;
    store_cached(st, user_id, |c| c.care = Some(computed.clone()));
    Ok(computed)
}

pub(in crate::access) async fn find(
    st: &Gate,
    rtype: &str,
    param: &str,
    targets: &[String],
) -> Result<Vec<ResourceVersion>, Failure> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let q = SearchQuery {
        rtype: rtype.to_owned(),
        and: vec![vec![crate::data::search::references_to(
            &st.repo.blind_key(),
            param,
            targets,
        )]],
        before_seq: None,
        limit: CARE_SCAN_LIMIT,
    };
    let mut rows = st.repo.search_unconfined(&q).await?;
    // Relationship data no holder of the permission is known to have
    // written opens nobody (`holds`).
    rows.retain(|v| !st.holds.is_held(v));
    Ok(rows)
}

pub(in crate::access) fn ids_of_refs(body: &Value, pointer: &[&str], prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut nodes = vec![body];
    for key in pointer {
        let mut next = Vec::new();
        for n in nodes {
            match n.get(*key) {
                Some(Value::Array(a)) => next.extend(a.iter()),
                Some(v) => next.push(v),
                None => {}
            }
        }
        nodes = next;
    }
    // `prefix` is `Type/`; references are read in their canonical form
    // (versioned ones name the same resource).
    let want = prefix.trim_end_matches('/');
    for n in nodes {
        if let Some((_, id)) = n
            .get("reference")
            .and_then(Value::as_str)
            .and_then(|r| phylax_fhir::reference::target::<&str>(r, &[]))
            .filter(|(t, _)| *t == want)
        {
            out.push(id.to_owned());
        }
    }
    out
}

/// The patients a write of a `PractitionerRole` opens (or closes) to the
/// practitioner holding it: those whose general practitioner is the role
/// or its organization, and those the organization manages. Named in the
/// write's audit record, so a relationship change says whom it concerns
/// (at most `access.max_reach`). Other relationship types name their
/// patients themselves.
pub(in crate::access) async fn patients_opened(
    st: &Gate,
    rtype: &ResourceType,
    id: &phylax_fhir::ResourceId,
    bodies: &[&Value],
) -> Result<Vec<String>, Failure> {
    if rtype.as_str() != "PractitionerRole" {
        return Ok(Vec::new());
    }
    // The organizations of every version given (the new content and the
    // one it replaces), once each.
    let mut orgs: Vec<String> = Vec::new();
    for o in bodies
        .iter()
        .flat_map(|b| ids_of_refs(b, &["organization"], "Organization/"))
    {
        let o = format!("Organization/{o}");
        if !orgs.contains(&o) {
            orgs.push(o);
        }
    }
    let mut gp_targets = vec![format!("PractitionerRole/{id}")];
    gp_targets.extend(orgs.iter().cloned());
    let max = st.config.max_reach;
    let mut out: Vec<String> = Vec::new();
    for (param, targets) in [
        ("general-practitioner", &gp_targets),
        ("organization", &orgs),
    ] {
        for v in find(st, "Patient", param, targets).await? {
            let p = v.id.to_string();
            if !out.contains(&p) && out.len() < max {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// How a patient is known in the data: their `Patient/{id}`, and the
/// `RelatedPerson`s a `Person` resource links to that Patient (the same
/// human as someone else's parent or carer), so a consent naming either
/// delegates to them.
pub(in crate::access) async fn patient_refs(
    st: &Gate,
    user_id: &str,
    patient: &str,
) -> Result<Arc<Vec<String>>, Failure> {
    if let Some(r) = cached(st, user_id).refs {
        return Ok(r);
    }
    let me = format!("Patient/{patient}");
    let mut refs = vec![me.clone()];
    for person in find(st, "Person", "link", std::slice::from_ref(&me)).await? {
        if let Some(b) = &person.body {
            if b.json().get("active").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            for rp in ids_of_refs(b.json(), &["link", "target"], "RelatedPerson/") {
                let r = format!("RelatedPerson/{rp}");
                if !refs.contains(&r) {
                    refs.push(r);
                }
            }
        }
    }
    let refs = Arc::new(refs);
    store_cached(st, user_id, |c| c.refs = Some(refs.clone()));
    Ok(refs)
}

/// How a workforce user is known in the data: their linked Practitioner,
/// its active PractitionerRoles and those roles' organizations (`Type/id`).
/// Empty without a linked Practitioner.
pub(in crate::access) async fn requester_refs(
    st: &Gate,
    user_id: &str,
) -> Result<Arc<Vec<String>>, Failure> {
    if let Some(r) = cached(st, user_id).refs {
        return Ok(r);
    }
    let user = st
        .accounts
        .load(user_id)
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let mut refs = Vec::new();
    if let Some(practitioner) = user.as_ref().and_then(|u| u.practitioner()) {
        let me = format!("Practitioner/{practitioner}");
        let roles = find(
            st,
            "PractitionerRole",
            "practitioner",
            std::slice::from_ref(&me),
        )
        .await?;
        refs.push(me);
        let mut orgs = Vec::new();
        for r in &roles {
            let Some(b) = r.body.as_ref().map(|b| b.json()) else {
                continue;
            };
            if b.get("active").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            refs.push(format!("PractitionerRole/{}", r.id));
            for o in ids_of_refs(b, &["organization"], "Organization/") {
                let o = format!("Organization/{o}");
                if !orgs.contains(&o) {
                    orgs.push(o);
                }
            }
        }
        refs.extend(orgs);
    }
    let refs = Arc::new(refs);
    store_cached(st, user_id, |c| c.refs = Some(refs.clone()));
    Ok(refs)
}

pub(in crate::access) async fn compute_care(
    st: &Gate,
    user_id: &str,
) -> Result<Option<Arc<BTreeSet<String>>>, Failure> {
    let refs = requester_refs(st, user_id).await?;
    if refs.is_empty() {
        return Ok(Some(Arc::new(BTreeSet::new())));
    }
    let max = st.config.max_reach;
    let people: Vec<String> = refs
        .iter()
        .filter(|r| !r.starts_with("Organization/"))
        .cloned()
        .collect();
    let orgs: Vec<String> = refs
        .iter()
        .filter(|r| r.starts_with("Organization/"))
        .cloned()
        .collect();
    let mut set = BTreeSet::new();
    let gp_targets: Vec<String> = refs.to_vec();
    for v in find(st, "Patient", "general-practitioner", &gp_targets).await? {
        set.insert(v.id.to_string());
    }
    for v in find(st, "Patient", "organization", &orgs).await? {
        set.insert(v.id.to_string());
    }
    for (rtype, param) in [
        ("CareTeam", "participant"),
        ("Encounter", "participant"),
        ("EpisodeOfCare", "care-manager"),
    ] {
        let rows = find(st, rtype, param, &people).await?;
        if rows.len() >= CARE_SCAN_LIMIT as usize {
            return Ok(None);
        }
        for v in rows {
            if let Some(b) = &v.body {
                set.extend(compartment::patients_of(&v.rtype, b.json()));
            }
        }
        if set.len() > max {
            return Ok(None);
        }
    }
    if set.len() > max {
        return Ok(None);
    }
    Ok(Some(Arc::new(set)))
}

/// The `own-family-name` detection rule: a workforce user receiving
/// Patients whose family name is their own (normalised, from their linked
/// Practitioner) is looking up relatives, the classic snooping case. Only
/// ids go into the alert.
pub async fn watch_own_name<'a>(
    st: &Gate,
    ctx: &crate::access::ctx::RequestCtx,
    versions: impl IntoIterator<Item = &'a ResourceVersion>,
) {
    let Some(detector) = st.audit.detector() else {
        return;
    };
    let Principal::User { user_id, role, .. } = &ctx.principal else {
        return;
    };
    if role.patient {
        return;
    }
    let patients: Vec<&ResourceVersion> = versions
        .into_iter()
        .filter(|v| v.rtype.as_str() == "Patient")
        .collect();
    if patients.is_empty() {
        return;
    }
    let family = match own_family(st, user_id).await {
        Ok(f) if !f.is_empty() => f,
        _ => return,
    };
    for v in patients {
        let Some(b) = &v.body else { continue };
        let theirs = b
            .json()
            .get("name")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("family").and_then(Value::as_str))
            .map(phylax_fhir::search::normalize);
        for f in theirs {
            if family.contains(&f) {
                detector.raise_once(
                    crate::audit::alert::Alert {
                        rule: "own-family-name",
                        severity: "medium",
                        detail: format!(
                            "user {user_id} looked up Patient/{}, who shares their family name",
                            v.id
                        ),
                        user: Some(user_id.clone()),
                    },
                    format!("{user_id}|{}", v.id),
                );
                break;
            }
        }
    }
}

pub(in crate::access) async fn own_family(
    st: &Gate,
    user_id: &str,
) -> Result<Arc<Vec<String>>, Failure> {
    if let Some(f) = cached(st, user_id).family {
        return Ok(f);
    }
    let refs = requester_refs(st, user_id).await?;
    let mut out = Vec::new();
    if let Some(id) = refs
        .iter()
        .find_map(|r| r.strip_prefix("Practitioner/"))
        .and_then(phylax_fhir::ResourceId::parse)
    {
        let t = ResourceType::parse("Practitioner")
            .ok_or_else(|| Failure::Internal("no Practitioner type".into()))?;
        if let Ok(v) = st.repo.read(&t, &id).await {
            if let Some(b) = &v.body {
                out.extend(
                    b.json()
                        .get("name")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|n| n.get("family").and_then(Value::as_str))
                        .map(phylax_fhir::search::normalize)
                        .filter(|f| !f.is_empty()),
                );
            }
        }
    }
    let out = Arc::new(out);
    store_cached(st, user_id, |c| c.family = Some(out.clone()));
    Ok(out)
}
