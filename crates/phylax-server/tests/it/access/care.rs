//! Care relationships decide reads, searches and writes; refusals are audited; explain and review.

use super::*;

on_both!(care_relationships_decide_every_path);
async fn care_relationships_decide_every_path(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    reach_decides_reads(s, &a).await;
    searches_are_confined_in_the_query(s, &a).await;
    let l = writes_need_reach(s, &a).await;
    refusals_are_audited_with_their_rule(s).await;
    other_paths_to_a_patient(s).await;
    access_explain_gives_the_rule(s).await;
    access_review_finds_unused_grants(s).await;
    relationships_apply_within_seconds(s, &a, &l).await;
}

/// Reached through generalPractitioner, CareTeam and Encounter; the
/// others answer exactly like ids that do not exist.
async fn reach_decides_reads(s: &TestServer, a: &str) {
    for p in ["pa-gp", "pa-team", "pa-enc"] {
        assert_eq!(get(s, a, &format!("/Patient/{p}")).await, 200, "{p}");
    }
    for p in ["pa-org", "pa-other", "never-existed"] {
        assert_eq!(get(s, a, &format!("/Patient/{p}")).await, 404, "{p}");
    }
    assert_eq!(get(s, a, "/Observation/obs-other").await, 404);
    assert_eq!(get(s, a, "/Observation/obs-other/_history/1").await, 404);
    assert_eq!(get(s, a, "/Patient/pa-other/_history").await, 404);
    // Restricted label: hidden without the permission, even for a patient
    // they care for.
    assert_eq!(get(s, a, "/Observation/obs-gp").await, 200);
    assert_eq!(get(s, a, "/Observation/obs-psy").await, 404);
    // A type outside the compartment that can hold anyone's data.
    assert_eq!(get(s, a, "/Binary/bin-1").await, 404);
    assert!(search(s, a, "/Binary").await.is_empty());
    // Shared reference data stays readable.
    assert_eq!(get(s, a, "/Practitioner/pr-b").await, 200);
}

/// Searches are confined in the query: totals count only what is seen.
async fn searches_are_confined_in_the_query(s: &TestServer, a: &str) {
    let (_, b) = send(
        s,
        a,
        M::GET,
        "/Patient?family=Sharedname&_total=accurate",
        None,
    )
    .await;
    assert_eq!(b["total"], 3, "{b}");
    assert_eq!(
        ids(&b),
        vec!["Patient/pa-enc", "Patient/pa-gp", "Patient/pa-team"]
    );
    assert_eq!(
        search(s, a, &format!("/Observation?code={LOINC_HR}")).await,
        vec!["Observation/obs-gp"]
    );
    // POST _search takes the same path.
    let r = s
        .http
        .post(s.url("/Observation/_search"))
        .bearer_auth(a)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("code=8867-4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ids(&r.json::<Value>().await.unwrap()),
        vec!["Observation/obs-gp"]
    );
    // Includes, reverse includes, chains and _has see no further.
    assert_eq!(
        search(s, a, "/Observation?_include=Observation:subject").await,
        vec!["Observation/obs-gp", "Patient/pa-gp"]
    );
    assert_eq!(
        search(
            s,
            a,
            "/Patient?_id=pa-gp,pa-other&_revinclude=Observation:subject"
        )
        .await,
        vec!["Observation/obs-gp", "Patient/pa-gp"]
    );
    assert_eq!(
        search(s, a, "/Patient?_has:Observation:subject:code=8867-4").await,
        vec!["Patient/pa-gp"]
    );
    assert_eq!(
        search(s, a, "/Observation?subject:Patient.family=Sharedname").await,
        vec!["Observation/obs-gp"]
    );
    // Compartment search, $everything and history.
    assert!(search(s, a, "/Patient/pa-other/Observation")
        .await
        .is_empty());
    assert_eq!(get(s, a, "/Patient/pa-other/$everything").await, 404);
    let every = search(s, a, "/Patient/pa-gp/$everything").await;
    assert!(
        every.contains(&"Observation/obs-gp".to_owned()),
        "{every:?}"
    );
    assert!(
        !every.contains(&"Observation/obs-psy".to_owned()),
        "{every:?}"
    );
    let hist = search(s, a, "/Observation/_history").await;
    assert!(hist.iter().all(|i| i == "Observation/obs-gp"), "{hist:?}");
}

/// Writes: new content must be within reach; what a write replaces too.
/// Returns the loader's token.
async fn writes_need_reach(s: &TestServer, a: &str) -> String {
    let (st, _) = send(
        s,
        a,
        M::POST,
        "/Observation",
        Some(&obs("x", "pa-other", None)),
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = send(
        s,
        a,
        M::POST,
        "/Observation",
        Some(&obs("x", "pa-gp", None)),
    )
    .await;
    assert_eq!(st, 201);
    let (st, _) = send(
        s,
        a,
        M::PUT,
        "/Observation/obs-other",
        Some(&obs("obs-other", "pa-gp", None)),
    )
    .await;
    assert_eq!(st, 404, "overwriting another patient's record");
    let (st, _) = send(s, a, M::DELETE, "/Observation/obs-other", None).await;
    assert_eq!(st, 404);
    // Conditional delete matches only what the caller sees (obs-gp and the
    // new one are theirs: two matches, 412; never obs-other).
    let (st, _) = send(
        s,
        a,
        M::DELETE,
        "/Observation?subject=Patient/pa-other",
        None,
    )
    .await;
    assert_eq!(st, 204);
    // A transaction with one entry outside reach stores nothing.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("t1", "pa-gp", None), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("t2", "pa-other", None), "request": {"method": "POST", "url": "Observation"}}]});
    let (st, _) = send(s, a, M::POST, "", Some(&tx)).await;
    assert_eq!(st, 403);
    let l = loader(s);
    let (_, all) = send(s, &l, M::GET, "/Observation?_total=accurate", None).await;
    assert_eq!(
        all["total"], 5,
        "the loader's four, dr.a's one create; none from the transaction"
    );
    assert_eq!(
        get(s, &l, "/Observation/obs-other").await,
        200,
        "not deleted"
    );
    l
}

/// Every refusal is in the audit log with its rule.
async fn refusals_are_audited_with_their_rule(s: &TestServer) {
    s.state.audit.flush().await.unwrap();
    let rows = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some("read".into()),
            limit: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    let denied = rows
        .iter()
        .map(|r| s.state.audit.open_row(r).unwrap())
        .filter(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.contains("denied by reach"))
        })
        .count();
    assert!(denied >= 3, "hidden reads are recorded as denials");
}

/// Through PractitionerRole and its organization; no linked practitioner;
/// roles limited by type; the label permission; backend clients.
async fn other_paths_to_a_patient(s: &TestServer) {
    // Through PractitionerRole and its organization.
    let b = user(
        s,
        "dr.b",
        "clinician",
        Some("pr-b"),
        None,
        "user/*.rs",
        None,
    )
    .await;
    assert_eq!(get(s, &b, "/Patient/pa-org").await, 200);
    assert_eq!(get(s, &b, "/Patient/pa-gp").await, 404);
    // No linked practitioner: no patient at all (fail closed).
    let none = user(s, "dr.none", "clinician", None, None, "user/*.rs", None).await;
    assert_eq!(get(s, &none, "/Patient/pa-gp").await, 404);
    assert!(search(s, &none, "/Patient").await.is_empty());
    // Roles whose job spans the organisation are limited by type instead.
    let fd = user(s, "desk", "front-desk", None, None, "user/*.cruds", None).await;
    assert_eq!(get(s, &fd, "/Patient/pa-other").await, 200);
    assert_eq!(get(s, &fd, "/Observation/obs-other").await, 403);
    // A role with the label permission sees labelled data of its patients
    // only.
    let psy = user(
        s,
        "dr.psy",
        "psychiatrist",
        Some("pr-a"),
        None,
        "user/*.rs",
        None,
    )
    .await;
    assert_eq!(get(s, &psy, "/Observation/obs-psy").await, 200);
    assert_eq!(get(s, &psy, "/Observation/obs-other-psy").await, 404);
    // Backend clients without the label permission do not see it either.
    let plain = s.token("system/*.rs").await;
    assert_eq!(get(s, &plain, "/Observation/obs-psy").await, 404);
    assert_eq!(get(s, &plain, "/Observation/obs-other").await, 200);
}

/// `phylax access explain`: the same decision, by rule, without data.
async fn access_explain_gives_the_rule(s: &TestServer) {
    use phylax_server::ops::access::{explain, parse_interaction, Subject};
    let ex = |who: &'static str, rt: &'static str, id: &'static str, what: &'static str| async move {
        let subject = Subject::User {
            username: who.into(),
            scope: None,
        };
        explain(
            &s.state,
            &subject,
            &phylax_fhir::ResourceType::parse(rt).unwrap(),
            &phylax_fhir::ResourceId::parse(id).unwrap(),
            parse_interaction(what).unwrap(),
        )
        .await
        .unwrap()
    };
    let e = ex("dr.a", "Patient", "pa-gp", "read").await;
    assert!(e.allowed, "{e:?}");
    let e = ex("dr.a", "Patient", "pa-other", "read").await;
    assert!(!e.allowed && e.rule.starts_with("reach"), "{e:?}");
    let e = ex("dr.a", "Observation", "obs-psy", "read").await;
    assert!(e.rule.starts_with("security label"), "{e:?}");
    let e = ex("desk", "Observation", "obs-other", "read").await;
    assert!(e.rule.starts_with("role"), "{e:?}");
    let e = ex("dr.psy", "Observation", "obs-psy", "update").await;
    assert!(e.allowed, "{e:?}");
    let e = ex("dr.a", "Patient", "no-such", "read").await;
    assert_eq!(e.rule, "resource: not found");
    let text = format!("{e:?}{:?}", ex("dr.a", "Patient", "pa-gp", "read").await);
    assert!(
        !text.contains("Sharedname") && !text.contains("pa-gp"),
        "no data: {text}"
    );
    let e = explain(
        &s.state,
        &Subject::Client {
            client_id: "no-such-client".into(),
        },
        &phylax_fhir::ResourceType::parse("Patient").unwrap(),
        &phylax_fhir::ResourceId::parse("pa-gp").unwrap(),
        parse_interaction("read").unwrap(),
    )
    .await;
    assert!(e.is_err());
}

/// `phylax access review`: the front desk read once, nothing else.
async fn access_review_finds_unused_grants(s: &TestServer) {
    use phylax_server::ops::access::review;
    let rows = review(&s.state, 90, chrono::Utc::now().timestamp_millis())
        .await
        .unwrap();
    let desk = rows.iter().find(|r| r.name == "desk").unwrap();
    assert_eq!(desk.role.as_deref(), Some("front-desk"));
    assert_eq!(desk.unused, "cus", "{desk:?}");
    assert_eq!(desk.mfa, Some(false));
    assert!(!desk.dormant, "created today");
    let none = rows.iter().find(|r| r.name == "dr.none").unwrap();
    assert!(
        none.unused.contains('c') && none.unused.contains('d'),
        "{none:?}"
    );
    // A year later, everyone is dormant.
    let later = review(
        &s.state,
        90,
        chrono::Utc::now().timestamp_millis() + 365 * 86_400_000,
    )
    .await
    .unwrap();
    assert!(later.iter().filter(|r| r.kind == "user").all(|r| r.dormant));
}

/// A care relationship that starts applies within seconds; one that
/// ends, too.
async fn relationships_apply_within_seconds(s: &TestServer, a: &str, l: &str) {
    put(
        s,
        l,
        json!({"resourceType": "CareTeam", "id": "ct-2",
        "subject": {"reference": "Patient/pa-other"},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]}),
    )
    .await;
    let wait_for = |want: u16| {
        let a = a.to_owned();
        async move {
            for _ in 0..50 {
                if get(s, &a, "/Patient/pa-other").await == want {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            false
        }
    };
    assert!(wait_for(200).await, "new care team membership applies");
    let (st, _) = send(s, l, M::DELETE, "/CareTeam/ct-2", None).await;
    assert_eq!(st, 204);
    assert!(wait_for(404).await, "ended care team membership applies");
}
