//! Consents deny actors, purposes and everyone, at once and across nodes.

use super::*;

on_both!(consents_deny_actors_purposes_and_everyone);
async fn consents_deny_actors_purposes_and_everyone(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let a = clinician(s, "dr.a", "pr-a").await;
    let b = clinician(s, "dr.b", "pr-b").await;
    let res = user(s, "res", "researcher", None, None, "user/*.rs", None).await;
    let pat = user(
        s,
        "pat",
        "patient",
        None,
        Some("pa-gp"),
        "patient/*.rs",
        None,
    )
    .await;
    assert_eq!(get(s, &a, "/Patient/pa-gp").await, 200);
    assert_eq!(get(s, &res, "/Observation/obs-other").await, 200);
    let w = Tokens { l, a, b, res, pat };
    consents_apply_at_once(s, &w).await;
    break_the_glass_overrides_a_denial(s).await;
    revoking_a_consent_restores_access(s, &w).await;
    consent_from_another_node_applies(s, &w).await;
}

/// The tokens of [`consents_deny_actors_purposes_and_everyone`].
struct Tokens {
    l: String,
    a: String,
    b: String,
    res: String,
    pat: String,
}

/// pa-gp denies Dr A by name; pa-other denies research use; pa-org
/// denies every requester: applied at once on the node that took the write.
async fn consents_apply_at_once(s: &TestServer, w: &Tokens) {
    let Tokens { l, a, b, res, pat } = w;
    put(s, l, consent("c-1", "pa-gp", json!({"type": "permit", "provision": [
        {"type": "deny", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/pr-a"}}]}]})))
    .await;
    put(
        s,
        l,
        consent(
            "c-2",
            "pa-other",
            json!({"type": "deny", "purpose": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}),
        ),
    )
    .await;
    put(s, l, consent("c-3", "pa-org", json!({"type": "deny"}))).await;

    // Applied at once on the node that took the write.
    assert_eq!(get(s, a, "/Patient/pa-gp").await, 404);
    assert_eq!(get(s, a, "/Observation/obs-gp").await, 404);
    assert_eq!(
        search(s, a, "/Patient?family=Sharedname").await,
        vec!["Patient/pa-enc", "Patient/pa-team"]
    );
    assert!(search(s, a, &format!("/Observation?code={LOINC_HR}"))
        .await
        .is_empty());
    assert_eq!(get(s, a, "/Patient/pa-gp/$everything").await, 404);
    // Writing is upkeep, not disclosure: still allowed where reach allows.
    let (st, _) = send(
        s,
        a,
        M::POST,
        "/Observation",
        Some(&obs("n", "pa-gp", None)),
    )
    .await;
    assert_eq!(st, 201);
    // Another actor, another purpose, the patient: unaffected.
    let fd = user(s, "desk", "front-desk", None, None, "user/*.rs", None).await;
    assert_eq!(get(s, &fd, "/Patient/pa-gp").await, 200);
    assert_eq!(get(s, pat, "/Patient/pa-gp").await, 200);
    assert_eq!(get(s, pat, "/Observation/obs-gp").await, 200);
    // Purpose: no research use of pa-other, treatment unaffected.
    assert_eq!(get(s, res, "/Observation/obs-other").await, 404);
    assert_eq!(get(s, res, "/Observation/obs-gp").await, 200);
    // Everyone: Dr B (who cares for pa-org), the front desk and clients.
    assert_eq!(get(s, b, "/Patient/pa-org").await, 404);
    assert_eq!(get(s, &fd, "/Patient/pa-org").await, 404);
    assert_eq!(get(s, l, "/Patient/pa-org").await, 404);
    let (_, all) = send(s, l, M::GET, "/Patient?_total=accurate", None).await;
    assert_eq!(all["total"], 4, "{all}");
}

/// Break-the-glass overrides a consent denial, and is marked.
async fn break_the_glass_overrides_a_denial(s: &TestServer) {
    let id = s.state.accounts.find("dr.a").await.unwrap().unwrap().rec.id;
    let fresh = token_for(s, &id, "clinician", None, "user/*.cruds", Some(10));
    let (st, _) = send(s, &fresh, M::POST, "/Patient/pa-gp/$break-the-glass", Some(&json!({
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "cardiac arrest"}]})))
    .await;
    assert_eq!(st, 200);
    assert_eq!(get(s, &fresh, "/Patient/pa-gp").await, 200);
}

/// Revoking a consent (status inactive) restores access at once.
async fn revoking_a_consent_restores_access(s: &TestServer, w: &Tokens) {
    let Tokens { l, b, res, .. } = w;
    let mut c3 = consent("c-3", "pa-org", json!({"type": "deny"}));
    c3["status"] = json!("inactive");
    put(s, l, c3).await;
    assert_eq!(get(s, b, "/Patient/pa-org").await, 200);
    // So does deleting one.
    let (st, _) = send(s, l, M::DELETE, "/Consent/c-2", None).await;
    assert_eq!(st, 204);
    assert_eq!(get(s, res, "/Observation/obs-other").await, 200);
}

/// A consent written through another node applies here within seconds.
async fn consent_from_another_node_applies(s: &TestServer, w: &Tokens) {
    let Tokens { l, a, .. } = w;
    let (node2, _stop) = s.second_node().await;
    let r = s
        .http
        .put(format!("{node2}/Consent/c-4"))
        .bearer_auth(l)
        .header("content-type", "application/fhir+json")
        .body(consent("c-4", "pa-enc", json!({"type": "deny"})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut hidden = false;
    for _ in 0..40 {
        if get(s, a, "/Patient/pa-enc").await == 404 {
            hidden = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(hidden, "another node's consent applies");
    // The explanation names the consent.
    let e = phylax_server::ops::access::explain(
        &s.state,
        &phylax_server::ops::access::Subject::User {
            username: "dr.a".into(),
            scope: None,
        },
        &phylax_fhir::ResourceType::parse("Patient").unwrap(),
        &phylax_fhir::ResourceId::parse("pa-enc").unwrap(),
        phylax_server::ops::access::parse_interaction("read").unwrap(),
    )
    .await
    .unwrap();
    assert!(e.rule.starts_with("consent"), "{e:?}");
}
