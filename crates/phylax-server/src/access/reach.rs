//! The resource-level half of authorization: which patients' data one
//! request reaches, and whether each resource a response would carry is
//! within it (`phylax_auth::policy::decide_resource` decides; this module
//! gathers the facts and applies the answer).
//!
//! - **Reach** is computed once per request by the authentication
//!   middleware ([`access_for`]): backend clients and roles whose job spans
//!   the organisation reach every patient; patients reach their own
//!   compartment; clinicians and nurses (and custom roles limited to care
//!   relationships) reach the patients they care for, found in the data
//!   itself ([`care_patients`]), plus active break-the-glass grants.
//! - **Searches** carry the reach as conditions on the query
//!   ([`query_conditions`]), so paging, `_total` and `_count` are computed
//!   over what the caller may see; nothing is filtered after the fact
//!   where a count could betray it.
//! - **Everything else** (reads, history, includes, `$everything`, writes,
//!   Bundle entries) checks each resource with [`check`]: a resource
//!   outside the reach answers exactly like one that does not exist.
//!
//! Care relationships are cached per user for [`crate::access::care::CARE_TTL`]: a new care team
//! membership applies within seconds; ending one also ends within seconds.

use crate::access::care::{care_patients, emergency_patients, patient_refs, requester_refs};
use crate::access::ctx::RequestCtx;
use crate::access::gate::Gate;
use crate::base::error::Failure;
use crate::data::repo::{RepoError, ResourceVersion};
use phylax_auth::policy::{decide_resource, Access, Decision, Principal, Reach, ResourceFacts};
use phylax_auth::roles::ReachRule;
use phylax_fhir::{compartment, ResourceId, ResourceType};
use phylax_store::Cond;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;

/// With `access.self_registration`, a new `Patient` that names the writer
/// as general practitioner starts a care relationship: a clinician
/// registering a patient may create the record they are taking on.
/// (Whether the write may name them at all is
/// [`phylax_auth::policy::decide_relationships`]'s decision.)
pub(in crate::access) fn starts_care(
    st: &Gate,
    access: &Access,
    rtype: &ResourceType,
    body: &Value,
) -> bool {
    if !st.config.self_registration || rtype.as_str() != "Patient" || access.refs.is_empty() {
        return false;
    }
    let refs_at = |key: &str| -> Vec<String> {
        let node = body.get(key);
        let items: Vec<&Value> = match node {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
            None => Vec::new(),
        };
        items
            .iter()
            .filter_map(|v| v.get("reference").and_then(Value::as_str))
            .map(str::to_owned)
            .collect()
    };
    refs_at("generalPractitioner")
        .into_iter()
        .any(|r| access.refs.contains(&r))
}

/// The restricted security labels, as `(system, code)`.
pub(in crate::access) fn restricted_labels(st: &Gate) -> impl Iterator<Item = (&str, &str)> {
    st.config
        .restricted_labels
        .iter()
        .filter_map(|l| l.split_once('|'))
}

/// Does `body` carry a restricted security label?
pub(in crate::access) fn is_restricted(st: &Gate, body: &Value) -> bool {
    let Some(labels) = body
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
    else {
        return false;
    };
    labels.iter().any(|l| {
        let sys = l.get("system").and_then(Value::as_str);
        let code = l.get("code").and_then(Value::as_str);
        restricted_labels(st).any(|(s, c)| Some(s) == sys && Some(c) == code)
    })
}

/// A held Patient version, or one older than a held one (see [`allows`]).
fn held_patient(st: &Gate, v: &ResourceVersion) -> bool {
    v.rtype.as_str() == "Patient" && st.holds.held_or_older(v)
}

/// The resource-level decision for one resource body.
pub(in crate::access) fn decide_body(
    st: &Gate,
    access: &Access,
    rtype: &ResourceType,
    body: &Value,
) -> Decision {
    decide_patients(
        st,
        access,
        rtype,
        body,
        &compartment::patients_of(rtype, body),
    )
}

/// [`decide_body`] for a body concerning `patients`.
fn decide_patients(
    st: &Gate,
    access: &Access,
    rtype: &ResourceType,
    body: &Value,
    patients: &[String],
) -> Decision {
    decide_resource(
        access,
        &ResourceFacts {
            rtype: rtype.as_str(),
            patients,
            restricted: is_restricted(st, body),
        },
    )
}

/// May `access` write (or replace) `body`? Every patient it names must be
/// within reach ([`phylax_auth::policy::decide_write`]); consents do not
/// restrict writes.
pub(in crate::access) fn decide_write_body(
    st: &Gate,
    access: &Access,
    rtype: &ResourceType,
    body: &Value,
) -> Decision {
    let patients = compartment::patients_of(rtype, body);
    phylax_auth::policy::decide_write(
        &access.for_writes(),
        &ResourceFacts {
            rtype: rtype.as_str(),
            patients: &patients,
            restricted: is_restricted(st, body),
        },
    )
}

/// May `access` see version `v`? A deleted version carries no body: only
/// an unrestricted caller sees that it was deleted.
pub(in crate::access) fn allows(st: &Gate, access: &Access, v: &ResourceVersion) -> Decision {
    match &v.body {
        // A held Patient's `link` (a relationship element written before
        // the relationships permission) does not put it, or any of its
        // older versions, in the linked patient's compartment: it
        // concerns only itself until approved.
        Some(b) if held_patient(st, v) => {
            decide_patients(st, access, &v.rtype, b.json(), &[v.id.to_string()])
        }
        Some(b) => decide_body(st, access, &v.rtype, b.json()),
        None if access.reach == Reach::All => Decision::Allow,
        None => Decision::Deny("reach: a deleted version names no patient"),
    }
}

/// [`allows`] as a result: hidden resources answer 404.
pub(in crate::access) fn check(
    st: &Gate,
    access: &Access,
    v: &ResourceVersion,
) -> Result<(), Failure> {
    match allows(st, access, v) {
        Decision::Allow => Ok(()),
        Decision::Deny(rule) => Err(Failure::Hidden(rule)),
    }
}

/// The key scopes a history page of `scope` may draw from for `access`
/// (`None`: every version). A caller limited to some patients gets the
/// versions sealed under their patients' keys (less those whose consent
/// denies them) and, for the shared reference types, the tenant key; a
/// version whose first patient is out of reach is left out even if a
/// later one is reached (narrower than a read, never wider).
pub(in crate::access) fn history_scopes(
    access: &Access,
    scope: &phylax_store::HistoryScope,
) -> Option<Vec<String>> {
    let Reach::Patients(set) = &access.reach else {
        return None;
    };
    let patients = || {
        set.iter()
            .filter(|p| !access.denied.contains(*p))
            .map(|p| format!("patient:{p}"))
            .collect::<Vec<_>>()
    };
    Some(match scope {
        phylax_store::HistoryScope::Type(t)
            if phylax_auth::policy::SHARED_REFERENCE.contains(&t.as_str()) =>
        {
            vec!["tenant".to_owned()]
        }
        phylax_store::HistoryScope::Type(t) if compartment::is_compartment_type(t) => patients(),
        phylax_store::HistoryScope::Type(_) => Vec::new(),
        // An instance is checked version by version; system history is
        // not open to callers limited to some patients.
        phylax_store::HistoryScope::Instance(..) => return None,
        phylax_store::HistoryScope::System => {
            let mut v = patients();
            v.push("tenant".to_owned());
            v
        }
    })
}

/// [`allows`] for a resource a search returned, with fast paths that need
/// no parse of the body in the common cases: a caller who reaches every
/// patient and sees labels; a body with no security labels at all; the
/// compartment's patient known from the authenticated key scope.
pub(in crate::access) fn returned(st: &Gate, access: &Access, v: &ResourceVersion) -> Decision {
    let labels_ok = access.labelled
        || !v
            .body
            .as_ref()
            .is_some_and(|b| b.may_contain("\"security\""));
    let reach_ok = match &access.reach {
        Reach::All => true,
        Reach::Patients(set) => v.patient.as_ref().is_some_and(|p| set.contains(p)),
    };
    if labels_ok && reach_ok && access.denied.is_empty() {
        return Decision::Allow;
    }
    allows(st, access, v)
}

/// Conditions that confine a search of `rtype` to what `access` may see:
/// the compartments it reaches (any compartment parameter referencing one
/// of its patients) and, without the label permission, no restricted
/// label. Break-the-glass patients' labelled data is allowed through the
/// label condition by an OR with their compartment.
pub(in crate::access) fn query_conditions(
    st: &Gate,
    access: &Access,
    rtype: &ResourceType,
) -> Vec<Vec<Cond>> {
    let (generation, key) = st.repo.blind_snapshot();
    let mut and = Vec::new();
    if let Reach::Patients(set) = &access.reach {
        if compartment::is_compartment_type(rtype.as_str()) {
            and.push(compartment_of_any(st, rtype, set));
        } else if !phylax_auth::policy::SHARED_REFERENCE.contains(&rtype.as_str()) {
            and.push(vec![Cond::Never]);
        }
    }
    if !access.denied.is_empty() && compartment::is_compartment_type(rtype.as_str()) {
        // In no compartment of a patient whose consent denies the caller.
        let targets: Vec<String> = access
            .denied
            .iter()
            .map(|p| format!("Patient/{p}"))
            .collect();
        for p in phylax_fhir::defs::definitions().compartment_params(rtype.as_str()) {
            let Cond::Hash { param, hashes } =
                crate::data::search::references_to(&key, p, &targets)
            else {
                continue;
            };
            and.push(vec![Cond::NotHash { param, hashes }]);
        }
        if rtype.as_str() == "Patient" {
            and.push(vec![Cond::NotIds(access.denied.iter().cloned().collect())]);
        }
    }
    if !access.labelled {
        // Computed once per blind-index key: a rotation replaces them, or
        // restricted data would stop being excluded.
        let cached = st
            .label_hashes
            .read()
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, h)| h.clone());
        let hashes = match cached {
            Some(h) => h,
            None => {
                let h: Vec<Vec<u8>> = restricted_labels(st)
                    .flat_map(|(s, c)| crate::data::search::token_hash(&key, "_security", s, c))
                    .collect();
                *st.label_hashes.write() = Some((generation, h.clone()));
                h
            }
        };
        if !hashes.is_empty() {
            let mut group = vec![Cond::NotHash {
                param: "_security".into(),
                hashes,
            }];
            if !access.emergency.is_empty() && compartment::is_compartment_type(rtype.as_str()) {
                group.extend(compartment_of_any(st, rtype, &access.emergency));
            }
            and.push(group);
        }
    }
    and
}

/// "In the compartment of one of `patients`", as one OR group.
fn compartment_of_any(st: &Gate, rtype: &ResourceType, patients: &BTreeSet<String>) -> Vec<Cond> {
    let targets: Vec<String> = patients.iter().map(|p| format!("Patient/{p}")).collect();
    let mut group: Vec<Cond> = phylax_fhir::defs::definitions()
        .compartment_params(rtype.as_str())
        .iter()
        .map(|p| crate::data::search::references_to(&st.repo.blind_key(), p, &targets))
        .collect();
    if rtype.as_str() == "Patient" {
        group.push(Cond::Ids(patients.iter().cloned().collect()));
    }
    if group.is_empty() || patients.is_empty() {
        return vec![Cond::Never];
    }
    group
}

/// The purpose of use of backend clients' requests (healthcare
/// operations: system integrations).
pub const CLIENT_PURPOSE: &str = "HOPERAT";

/// Most patients whose consent may deny one caller: the set becomes
/// conditions of every query (bound parameters per compartment parameter),
/// so a larger one is refused with a reason rather than risk a query the
/// database cannot take. Callers limited to some patients only count the
/// ones they reach.
pub const MAX_DENIED: usize = 2_000;

/// The context of an authenticated request: `principal`'s access,
/// computed here (consents fresh, care relationships, break-the-glass).
/// When it cannot be established the error carries a context that reaches
/// nothing, so a policy refusal can still be recorded.
pub async fn establish(
    gate: &Gate,
    principal: phylax_auth::policy::Principal,
    peer: Option<std::net::IpAddr>,
    token_family: Option<String>,
    request_id: String,
) -> Result<RequestCtx, (Failure, RequestCtx)> {
    match access_for(gate, &principal).await {
        Ok(a) => Ok(RequestCtx {
            request_id,
            principal,
            peer,
            token_family,
            access: Arc::new(a),
        }),
        Err(e) => Err((
            e,
            RequestCtx {
                request_id,
                principal,
                peer,
                token_family,
                access: Arc::new(Access::nothing()),
            },
        )),
    }
}

/// Compute the access of one request's caller.
pub async fn access_for(st: &Gate, who: &Principal) -> Result<Access, Failure> {
    // Consents that could not be reread for a while are not applied from
    // memory: fail closed until the index is current again.
    if !st.consents.fresh() {
        st.consents.refresh(&st.repo, &st.holds).await?;
    }
    let a = compute_access(st, who).await?;
    if a.denied.len() > MAX_DENIED {
        return Err(Failure::Declined(
            "consent: more patients' consents deny this caller than a query can carry",
        ));
    }
    Ok(a)
}

async fn compute_access(st: &Gate, who: &Principal) -> Result<Access, Failure> {
    match who {
        Principal::Client { client_id, .. } => Ok(Access {
            reach: Reach::All,
            emergency: BTreeSet::new(),
            labelled: st.config.labelled_clients.contains(client_id),
            // A client is known by no reference in the data: only consents
            // that deny every requester apply to it.
            denied: st
                .consents
                .denied(&[], CLIENT_PURPOSE, crate::base::clock::now_ms()),
            purpose: CLIENT_PURPOSE,
            refs: Vec::new(),
            relationships: st.config.relationship_clients.contains(client_id),
        }),
        Principal::User {
            user_id,
            role,
            patient,
            ..
        } => {
            let emergency = if role.break_glass {
                emergency_patients(st, user_id).await?
            } else {
                BTreeSet::new()
            };
            let refs = match (role.reach, patient) {
                (ReachRule::OwnCompartment, Some(p)) => patient_refs(st, user_id, p).await?,
                (ReachRule::OwnCompartment, None) => Arc::new(Vec::new()),
                _ => requester_refs(st, user_id).await?,
            };
            let mut denied = st
                .consents
                .denied(&refs, role.purpose, crate::base::clock::now_ms());
            denied.retain(|p| !emergency.contains(p));
            let reach = match role.reach {
                ReachRule::Everyone => Reach::All,
                ReachRule::OwnCompartment => {
                    // A patient's token names their own patient (SMART
                    // launch context); without one it reaches nothing.
                    // People who delegated to them (a permit in their
                    // consent naming this patient) are reached too.
                    let mut set: BTreeSet<String> = patient.iter().cloned().collect();
                    set.extend(st.consents.delegated(
                        &refs,
                        role.purpose,
                        crate::base::clock::now_ms(),
                    ));
                    // Denials of patients out of reach change nothing (and
                    // must not count towards `MAX_DENIED`: other patients'
                    // consents denying "everyone" name this patient too).
                    denied.retain(|p| set.contains(p));
                    set.retain(|p| !denied.contains(p));
                    Reach::Patients(set)
                }
                ReachRule::CareRelationships => {
                    let mut set = match care_patients(st, user_id).await? {
                        Some(s) => (*s).clone(),
                        None => {
                            return Err(Failure::Declined(
                                "reach: care relationships exceed access.max_reach",
                            ))
                        }
                    };
                    set.extend(emergency.iter().cloned());
                    // Denials of patients out of reach change nothing.
                    denied.retain(|p| set.contains(p));
                    Reach::Patients(set)
                }
            };
            Ok(Access {
                reach,
                emergency,
                labelled: role.labelled,
                denied,
                purpose: role.purpose,
                refs: refs.to_vec(),
                relationships: role.relationships,
            })
        }
    }
}

/// What explaining an access decision about `Type/id` needs, for the
/// operator's `phylax access explain`: the patients it names and
/// whether it carries a restricted label. Never its content.
pub async fn explain_facts(
    st: &Gate,
    rtype: &ResourceType,
    id: &ResourceId,
) -> Result<(Vec<String>, bool), RepoError> {
    let v = st.repo.read(rtype, id).await?;
    let body = v.body.as_ref().map(|b| b.json());
    Ok(match body {
        // As `allows` decides: a held Patient concerns only itself.
        Some(b) if held_patient(st, &v) => (vec![v.id.to_string()], is_restricted(st, b)),
        Some(b) => (
            phylax_fhir::compartment::patients_of(rtype, b),
            is_restricted(st, b),
        ),
        None => (Vec::new(), false),
    })
}
