//! Patients reach their own compartment, delegates and related persons with consent.

use super::*;

on_both!(patients_reach_their_own_compartment);
async fn patients_reach_their_own_compartment(s: &TestServer) {
    load(s).await;
    let p = user(
        s,
        "pat",
        "patient",
        None,
        Some("pa-gp"),
        "patient/*.rs",
        None,
    )
    .await;
    patient_sees_only_their_compartment(s, &p).await;
    let l = loader(s);
    delegation_reaches_both_compartments(s, &p, &l).await;
    related_person_with_consent_reaches(s, &l).await;
}

/// The patient's own compartment, labelled data included; nothing else,
/// whatever the scopes.
async fn patient_sees_only_their_compartment(s: &TestServer, p: &str) {
    assert_eq!(get(s, p, "/Patient/pa-gp").await, 200);
    assert_eq!(get(s, p, "/Patient/pa-other").await, 404);
    assert_eq!(
        search(s, p, "/Patient?family=Sharedname").await,
        vec!["Patient/pa-gp"]
    );
    // Their own labelled data is theirs to see.
    assert_eq!(
        search(s, p, "/Observation").await,
        vec!["Observation/obs-gp", "Observation/obs-psy"]
    );
    assert_eq!(get(s, p, "/Observation/obs-other").await, 404);
    assert_eq!(get(s, p, "/Patient/pa-gp/$everything").await, 200);
    assert_eq!(get(s, p, "/Patient/pa-other/$everything").await, 404);
    assert_eq!(get(s, p, "/Practitioner/pr-a").await, 200);
    // Types that hold data outside any compartment; writes; system history.
    assert_eq!(get(s, p, "/Binary/bin-1").await, 403);
    assert_eq!(get(s, p, "/_history").await, 403);
    let (st, _) = send(
        s,
        p,
        M::POST,
        "/Observation",
        Some(&obs("x", "pa-gp", None)),
    )
    .await;
    assert_eq!(st, 403);
    // Scope escalation: a patient token cannot use user/ scopes to widen.
    let wide = token_for(
        s,
        &s.state.accounts.find("pat").await.unwrap().unwrap().rec.id,
        "patient",
        Some("pa-gp"),
        "patient/*.rs user/*.cruds",
        None,
    );
    assert_eq!(get(s, &wide, "/Patient/pa-other").await, 404);
    assert_eq!(search(s, &wide, "/Patient").await, vec!["Patient/pa-gp"]);
}

/// Delegation: pa-team's consent permits pa-gp (say, a parent) to use
/// pa-team's record; pa-gp's token then reaches both compartments.
async fn delegation_reaches_both_compartments(s: &TestServer, p: &str, l: &str) {
    put(
        s,
        l,
        consent(
            "c-del",
            "pa-team",
            json!({"type": "permit",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "GUARD"}]}, "reference": {"reference": "Patient/pa-gp"}}]}),
        ),
    )
    .await;
    put(s, l, obs("obs-team", "pa-team", None)).await;
    assert_eq!(get(s, p, "/Patient/pa-team").await, 200);
    assert_eq!(get(s, p, "/Observation/obs-team").await, 200);
    assert_eq!(
        search(s, p, "/Patient?family=Sharedname").await,
        vec!["Patient/pa-gp", "Patient/pa-team"]
    );
    assert_eq!(get(s, p, "/Patient/pa-other").await, 404);
    // Not the other way round.
    let child = user(
        s,
        "kid",
        "patient",
        None,
        Some("pa-team"),
        "patient/*.rs",
        None,
    )
    .await;
    assert_eq!(get(s, &child, "/Patient/pa-gp").await, 404);
    // Revoked: gone at once.
    let (st, _) = send(s, l, M::DELETE, "/Consent/c-del", None).await;
    assert_eq!(st, 204);
    assert_eq!(get(s, p, "/Patient/pa-team").await, 404);
}

/// Through a RelatedPerson: pa-enc's holder is, as a Person, also
/// RelatedPerson rp-1 of pa-team; pa-team's consent names rp-1.
async fn related_person_with_consent_reaches(s: &TestServer, l: &str) {
    let mum = user(
        s,
        "mum",
        "patient",
        None,
        Some("pa-enc"),
        "patient/*.rs",
        None,
    )
    .await;
    assert_eq!(get(s, &mum, "/Patient/pa-team").await, 404);
    put(
        s,
        l,
        json!({"resourceType": "RelatedPerson", "id": "rp-1",
        "patient": {"reference": "Patient/pa-team"}}),
    )
    .await;
    put(
        s,
        l,
        json!({"resourceType": "Person", "id": "pe-1", "link": [
        {"target": {"reference": "Patient/pa-enc"}},
        {"target": {"reference": "RelatedPerson/rp-1"}}]}),
    )
    .await;
    put(s, l, consent("c-rp", "pa-team", json!({"type": "permit",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]},
            "reference": {"reference": "RelatedPerson/rp-1"}}]}))).await;
    assert_eq!(get(s, &mum, "/Patient/pa-team").await, 200);
    assert_eq!(get(s, &mum, "/Observation/obs-team").await, 200);
    // The RelatedPerson alone (no consent) grants nothing.
    let (st, _) = send(s, l, M::DELETE, "/Consent/c-rp", None).await;
    assert_eq!(st, 204);
    assert_eq!(get(s, &mum, "/Patient/pa-team").await, 404);
}
