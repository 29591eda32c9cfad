//! Care relationships are written only by those allowed to; self-registration.

use super::*;

// Who may change who reaches whom: the ADT feed (a client in
// `access.relationship_clients`) and front desk may; a client with every
// scope but not listed may not. A reference written in absolute form to
// this server is stored in its canonical form, so it decides the same
// compartment, data key, reach and audit attribution as `Patient/id`.
on_both!(relationships_are_written_by_those_allowed_to);
async fn relationships_are_written_by_those_allowed_to(s: &TestServer) {
    load(s).await;
    let wide = s.token("system/*.cruds").await;
    let team = json!({"resourceType": "CareTeam", "subject": {"reference": "Patient/pa-other"},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]});
    let (st, b) = send(s, &wide, M::POST, "/CareTeam", Some(&team)).await;
    assert_eq!(st, 403, "{b}");
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .contains("relationships"),
        "{b}"
    );
    let a = clinician(s, "dr.a", "pr-a").await;
    // Front desk may name a patient's GP (its relationships permission).
    let fd = user(s, "fd", "front-desk", None, None, "user/*.cruds", None).await;
    let gp = patient(
        "pa-other",
        json!({"generalPractitioner": [{"reference": "Practitioner/pr-a"}]}),
    );
    let (st, b) = send(s, &fd, M::PUT, "/Patient/pa-other", Some(&gp)).await;
    assert_eq!(st, 200, "{b}");
    // Within the care cache's seconds the clinician reaches the patient.
    tokio::time::sleep(std::time::Duration::from_millis(5_100)).await;
    assert_eq!(get(s, &a, "/Patient/pa-other").await, 200);
    // Absolute references to this server are stored relative.
    let l = loader(s);
    let abs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": format!("{}/Patient/pa-gp", s.fhir)}});
    let (st, made) = send(s, &l, M::POST, "/Observation", Some(&abs)).await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(made["subject"]["reference"], "Patient/pa-gp");
    let id = made["id"].as_str().unwrap();
    let (st, b) = send(s, &a, M::GET, &format!("/Observation/{id}"), None).await;
    assert_eq!(st, 200, "{b}");
    // A new practitioner role opens its organization's patients: the
    // write's audit record names them (pa-org is managed by org-1).
    put(
        s,
        &l,
        json!({"resourceType": "PractitionerRole", "id": "role-new",
            "practitioner": {"reference": "Practitioner/pr-a"},
            "organization": {"reference": "Organization/org-1"}}),
    )
    .await;
    let b = audit_of(s, "pa-org").await;
    let names_role = names(&b, None, "PractitionerRole/role-new");
    assert!(
        names_role,
        "the role's write is found under the patients it opens: {b}"
    );
    // So are references to a configured alias of this server's base.
    let mut alias = abs.clone();
    alias["subject"]["reference"] = json!("https://old-name.example/fhir/Patient/pa-gp");
    let (st, made) = send(s, &l, M::POST, "/Observation", Some(&alias)).await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(made["subject"]["reference"], "Patient/pa-gp");
    assert!(search(s, &a, "/Observation?subject=Patient/pa-gp")
        .await
        .contains(&format!("Observation/{id}")));
}

// With `access.self_registration` on, a clinician may register a new
// patient naming only themselves as GP (and then reach it), but not one
// managed by an organization, nor bring a deleted patient back as theirs.
mod self_registration {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.access.labelled_clients = vec!["loader".into()];
            c.access.relationship_clients = vec!["loader".into()];
            c.access.self_registration = true;
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::self_registration_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::self_registration_body(&s).await;
        }
    }
}

async fn self_registration_body(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let a = clinician(s, "dr.a", "pr-a").await;
    let mine = json!({"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner/pr-a"}]});
    let (st, made) = send(s, &a, M::POST, "/Patient", Some(&mine)).await;
    assert_eq!(st, 201, "{made}");
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(get(s, &a, &format!("/Patient/{id}")).await, 200);
    let mut managed = mine.clone();
    managed["managingOrganization"] = json!({"reference": "Organization/org-1"});
    assert_eq!(
        send(s, &a, M::POST, "/Patient", Some(&managed)).await.0,
        403
    );
    // A patient the clinician reached, deleted, then brought back naming
    // them: the deleted version stands as the one replaced.
    put(
        s,
        &l,
        patient(
            "pa-back",
            json!({"generalPractitioner": [{"reference": "Practitioner/pr-b"}]}),
        ),
    )
    .await;
    put(
        s,
        &l,
        json!({"resourceType": "CareTeam", "id": "ct-back",
        "subject": {"reference": "Patient/pa-back"},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(5_100)).await;
    assert_eq!(get(s, &a, "/Patient/pa-back").await, 200);
    assert_eq!(
        send(s, &l, M::DELETE, "/Patient/pa-back", None).await.0,
        204
    );
    let back = patient(
        "pa-back",
        json!({"generalPractitioner": [{"reference": "Practitioner/pr-a"}]}),
    );
    let (st, b) = send(s, &a, M::PUT, "/Patient/pa-back", Some(&back)).await;
    assert_eq!(st, 403, "{b}");
}

// Relationship data written before the relationships permission existed
// (here: the record that the vetting ran is removed, as if the instance
// came from an earlier release) is held on the upgraded node: it opens
// nobody until an operator approves it, resource by resource or all at
// once; a new version written by a holder is not held. Approval is an
// operator's command on the instance (there is no API for it).
on_both!(relationship_data_from_before_is_held_until_approved);
async fn relationship_data_from_before_is_held_until_approved(s: &TestServer) {
    use phylax_server::access::holds::Approval;
    use phylax_server::ops::access::{approve, held};
    load(s).await;
    let l = loader(s);
    let a = clinician(s, "dr.a", "pr-a").await;
    for n in ["1", "2"] {
        put(s, &l, patient(&format!("pa-held{n}"), json!({}))).await;
        put(
            s,
            &l,
            team_of(&format!("ct-held{n}"), &format!("pa-held{n}")),
        )
        .await;
        assert_eq!(get(s, &a, &format!("/Patient/pa-held{n}")).await, 200);
    }
    s.sql("DELETE FROM meta WHERE key = 'relationship_holds_v1'")
        .await;
    let (node2, _stop, st2) = s.second_node_with_state().await;
    let on2 = |path: &str| {
        let req = s.http.get(format!("{node2}{path}")).bearer_auth(&a);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let list = held(&st2);
    for n in ["1", "2"] {
        assert!(list.contains(&format!("CareTeam/ct-held{n}/1")), "{list:?}");
        assert_eq!(
            on2(&format!("/Patient/pa-held{n}")).await,
            404,
            "held: out of reach"
        );
    }
    // A holder's new version is not held.
    let r = s
        .http
        .put(format!("{node2}/CareTeam/ct-held2"))
        .bearer_auth(&l)
        .json(&team_of("ct-held2", "pa-held2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(on2("/Patient/pa-held2").await, 200);
    assert_eq!(on2("/Patient/pa-held1").await, 404);
    // The operator approves one resource; naming one that is not held
    // changes nothing.
    let e = approve(&st2, Approval::Resources(vec!["CareTeam/ct-1x".into()])).await;
    assert!(e.is_err(), "not held: refused");
    let n = approve(&st2, Approval::Resources(vec!["CareTeam/ct-held1".into()]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(on2("/Patient/pa-held1").await, 200);
    assert!(!held(&st2)
        .iter()
        .any(|h| h.starts_with("CareTeam/ct-held1/")));
    // The rest at once.
    approve(&st2, Approval::All).await.unwrap();
    assert!(held(&st2).is_empty());
    assert_eq!(on2("/Patient/pa-team").await, 200);
}

/// A care team of `pr-a` for `patient`.
fn team_of(id: &str, patient: &str) -> Value {
    json!({"resourceType": "CareTeam", "id": id,
        "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]})
}
