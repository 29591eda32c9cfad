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
// nobody, a held Patient's `link` does not open it to the linked patient,
// and nobody without the permission can release it by saving it
// unchanged, until an operator approves it, resource by resource or all at
// once; a new version written by a holder is not held. Approval is an
// operator's command on the instance (there is no API for it).
on_both!(relationship_data_from_before_is_held_until_approved);
async fn relationship_data_from_before_is_held_until_approved(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let a = clinician(s, "dr.a", "pr-a").await;
    written_before_the_upgrade(s, &l, &a).await;
    s.sql("DELETE FROM meta WHERE key = 'relationship_holds_v1'")
        .await;
    let (url, _stop, st2) = s.second_node_with_state().await;
    let n2 = Node2 { s, url };
    held_data_opens_nobody(&n2, &st2, &a).await;
    others_cannot_release_it(&n2, &a).await;
    holders_and_operators_release_it(&n2, &st2, &l, &a).await;
}

/// The upgraded node, where the holds are in force.
struct Node2<'a> {
    s: &'a TestServer,
    url: String,
}

impl Node2<'_> {
    async fn send(&self, tok: &str, m: M, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut r = self
            .s
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(tok);
        if let Some(b) = body {
            r = r.json(b);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, tok: &str, path: &str) -> u16 {
        self.send(tok, M::GET, path, None).await.0
    }
}

/// Care teams, a GP and a link, written (by the ADT feed) before the
/// upgrade: each opens its patient to dr.a.
async fn written_before_the_upgrade(s: &TestServer, l: &str, a: &str) {
    for n in ["1", "2"] {
        put(s, l, patient(&format!("pa-held{n}"), json!({}))).await;
        put(
            s,
            l,
            team_of(&format!("ct-held{n}"), &format!("pa-held{n}")),
        )
        .await;
        assert_eq!(get(s, a, &format!("/Patient/pa-held{n}")).await, 200);
    }
    put(s, l, gp_patient()).await;
    assert_eq!(get(s, a, "/Patient/pa-gp-held").await, 200);
    let linked = patient(
        "pa-linked",
        json!({"link": [{"other": {"reference": "Patient/pa-held2"}, "type": "seealso"}]}),
    );
    // Twice: its older version names the link too.
    put(s, l, linked.clone()).await;
    put(s, l, linked).await;
    assert_eq!(get(s, a, "/Patient/pa-linked").await, 200);
}

/// A patient whose GP is `pr-a`.
fn gp_patient() -> Value {
    patient(
        "pa-gp-held",
        json!({"generalPractitioner": [{"reference": "Practitioner/pr-a"}]}),
    )
}

/// On the upgraded node every one of them is held: out of reach.
async fn held_data_opens_nobody(n2: &Node2<'_>, st2: &phylax_server::state::AppState, a: &str) {
    let list = phylax_server::ops::access::held(st2);
    for h in [
        "CareTeam/ct-held1/1",
        "CareTeam/ct-held2/1",
        "Patient/pa-gp-held/1",
    ] {
        assert!(list.contains(&h.to_string()), "{h}: {list:?}");
    }
    for p in ["pa-held1", "pa-held2", "pa-gp-held", "pa-linked"] {
        assert_eq!(
            n2.get(a, &format!("/Patient/{p}")).await,
            404,
            "{p} held: out of reach"
        );
    }
}

/// A client with every scope but not the permission cannot release the
/// held GP by saving the record unchanged.
async fn others_cannot_release_it(n2: &Node2<'_>, a: &str) {
    let wide = n2.s.token("system/*.cruds").await;
    let (st, b) = n2
        .send(&wide, M::PUT, "/Patient/pa-gp-held", Some(&gp_patient()))
        .await;
    assert_eq!(st, 403, "{b}");
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .contains("held"),
        "{b}"
    );
    assert_eq!(n2.get(a, "/Patient/pa-gp-held").await, 404);
}

/// A holder's new version is not held; the operator approves the rest.
async fn holders_and_operators_release_it(
    n2: &Node2<'_>,
    st2: &phylax_server::state::AppState,
    l: &str,
    a: &str,
) {
    use phylax_server::access::holds::Approval;
    use phylax_server::ops::access::{approve, held};
    let (st, b) = n2
        .send(
            l,
            M::PUT,
            "/CareTeam/ct-held2",
            Some(&team_of("ct-held2", "pa-held2")),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(n2.get(a, "/Patient/pa-held2").await, 200);
    assert_eq!(n2.get(a, "/Patient/pa-held1").await, 404);
    // The held link still does not open pa-linked, by read or by search
    // (left out, not taken for tampering).
    assert_eq!(n2.get(a, "/Patient/pa-linked").await, 404);
    let (st, b) = n2
        .send(a, M::GET, "/Patient?link=Patient/pa-held2", None)
        .await;
    assert_eq!(st, 200, "{b}");
    assert!(b["entry"].as_array().is_none_or(|e| e.is_empty()), "{b}");
    assert_eq!(
        n2.get(a, "/Patient/pa-linked/_history/1").await,
        404,
        "older version"
    );
    // `explain` says what the server does.
    let who = phylax_server::ops::access::Subject::User {
        username: "dr.a".into(),
        scope: None,
    };
    let e = phylax_server::ops::access::explain(
        st2,
        &who,
        &phylax_fhir::ResourceType::parse("Patient").unwrap(),
        &phylax_fhir::ResourceId::parse("pa-linked").unwrap(),
        phylax_server::ops::access::parse_interaction("read").unwrap(),
    )
    .await
    .unwrap();
    assert!(!e.allowed, "{e:?}");
    // Naming a resource that is not held changes nothing.
    assert!(
        approve(st2, Approval::Resources(vec!["CareTeam/ct-1x".into()]))
            .await
            .is_err()
    );
    let n = approve(st2, Approval::Resources(vec!["CareTeam/ct-held1".into()]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(n2.get(a, "/Patient/pa-held1").await, 200);
    assert!(!held(st2)
        .iter()
        .any(|h| h.starts_with("CareTeam/ct-held1/")));
    // The rest at once.
    approve(st2, Approval::All).await.unwrap();
    assert!(held(st2).is_empty());
    for p in ["pa-team", "pa-gp-held", "pa-linked"] {
        assert_eq!(n2.get(a, &format!("/Patient/{p}")).await, 200, "{p}");
    }
}

/// A care team of `pr-a` for `patient`.
fn team_of(id: &str, patient: &str) -> Value {
    json!({"resourceType": "CareTeam", "id": id,
        "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]})
}
