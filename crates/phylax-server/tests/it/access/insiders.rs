//! Insiders cannot widen their reach with ordinary FHIR writes.

use super::*;

// What a clinician who cares for some patients can try, with ordinary
// FHIR writes, to reach another patient (`pa-other`) or to write into
// their record: each attack is refused (403 for content, 404 for ids it
// cannot see), nothing is stored, and the victim stays unreachable
// afterwards. docs/THREAT_MODEL.md, "Insiders".
on_both!(insiders_cannot_widen_their_reach);
async fn insiders_cannot_widen_their_reach(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let a = clinician(s, "dr.a", "pr-a").await;
    let me = "Practitioner/pr-a";
    let victim = "Patient/pa-other";
    let absolute = format!("{}/{victim}", s.fhir);
    // (what, method, path, body, expected status)
    let attacks: Vec<Attack> = [
        relationship_attacks(me, victim),
        record_attacks(me, victim, &absolute),
    ]
    .concat();
    attacks_are_refused_alone_and_in_transactions(s, &l, &a, &attacks).await;
    recreating_a_deleted_patient_is_refused(s, &l, &a, me).await;
    hidden_and_missing_answer_alike(s, &a, me).await;
    writes_naming_nobody_else_work(s, &a, me).await;
    the_victim_stays_unreachable(s, &l, &a).await;
}

/// An insider's write: (what, method, path, body, expected status).
type Attack = (&'static str, M, String, Value, u16);

/// An Observation about `subject`, performed by `performer`.
fn obs_of(subject: &str, performer: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": subject}, "performer": [{"reference": performer}]})
}

/// Writes that would make a care relationship with the victim.
fn relationship_attacks(me: &str, victim: &str) -> Vec<Attack> {
    vec![
        (
            "care team naming myself and the victim",
            M::POST,
            "/CareTeam".into(),
            json!({"resourceType": "CareTeam", "subject": {"reference": "Patient/pa-gp"},
                "participant": [{"member": {"reference": me}}, {"member": {"reference": victim}}]}),
            403,
        ),
        (
            "care team for the victim",
            M::POST,
            "/CareTeam".into(),
            json!({"resourceType": "CareTeam", "subject": {"reference": victim},
                "participant": [{"member": {"reference": me}}]}),
            403,
        ),
        (
            "a role in the victim's managing organization",
            M::POST,
            "/PractitionerRole".into(),
            json!({"resourceType": "PractitionerRole", "practitioner": {"reference": me},
                "organization": {"reference": "Organization/org-1"}}),
            403,
        ),
        (
            "an episode of care I manage",
            M::POST,
            "/EpisodeOfCare".into(),
            json!({"resourceType": "EpisodeOfCare", "status": "active",
                "patient": {"reference": victim}, "careManager": {"reference": me}}),
            403,
        ),
        (
            "an encounter I take part in",
            M::POST,
            "/Encounter".into(),
            json!({"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"},
                "subject": {"reference": victim},
                "participant": [{"individual": {"reference": me}}]}),
            403,
        ),
        (
            "moving my encounter to the victim",
            M::PUT,
            "/Encounter/enc-1".into(),
            json!({"resourceType": "Encounter", "id": "enc-1", "status": "finished",
                "class": {"code": "AMB"}, "subject": {"reference": victim},
                "participant": [{"individual": {"reference": me}}]}),
            403,
        ),
        (
            "joining an encounter of a patient I reach",
            M::PUT,
            "/Encounter/enc-2".into(),
            json!({"resourceType": "Encounter", "id": "enc-2", "status": "finished",
                "class": {"code": "AMB"}, "subject": {"reference": "Patient/pa-gp"},
                "participant": [{"individual": {"reference": me}}]}),
            403,
        ),
        (
            "a related person",
            M::POST,
            "/RelatedPerson".into(),
            json!({"resourceType": "RelatedPerson", "patient": {"reference": "Patient/pa-gp"}}),
            403,
        ),
        (
            "a group with the victim",
            M::POST,
            "/Group".into(),
            json!({"resourceType": "Group", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/pa-gp"}}, {"entity": {"reference": victim}}]}),
            403,
        ),
        (
            "a consent",
            M::POST,
            "/Consent".into(),
            json!({"resourceType": "Consent", "status": "active",
                "scope": {"coding": [{"code": "patient-privacy"}]},
                "category": [{"text": "x"}], "patient": {"reference": "Patient/pa-gp"}}),
            403,
        ),
        (
            "a Person linking patients",
            M::POST,
            "/Person".into(),
            json!({"resourceType": "Person", "link": [{"target": {"reference": victim}}]}),
            403,
        ),
    ]
}

/// Writes that would reach the victim's record some other way.
fn record_attacks(me: &str, victim: &str, absolute: &str) -> Vec<Attack> {
    vec![
        (
            "a patient I register as my own (self-registration off)",
            M::POST,
            "/Patient".into(),
            json!({"resourceType": "Patient", "generalPractitioner": [{"reference": me}]}),
            403,
        ),
        (
            "making myself the GP of a patient I reach through a care team",
            M::PUT,
            "/Patient/pa-team".into(),
            patient(
                "pa-team",
                json!({"generalPractitioner": [{"reference": me}]}),
            ),
            403,
        ),
        (
            "a write into the victim's record through a patient I reach",
            M::POST,
            "/Observation".into(),
            obs_of(victim, "Patient/pa-gp"),
            403,
        ),
        (
            "the same, the victim as performer",
            M::POST,
            "/Observation".into(),
            obs_of("Patient/pa-gp", victim),
            403,
        ),
        (
            "the victim by an absolute reference",
            M::POST,
            "/Observation".into(),
            obs_of("Patient/pa-gp", absolute),
            403,
        ),
        (
            "the victim by a versioned reference",
            M::POST,
            "/Observation".into(),
            obs_of("Patient/pa-gp", &format!("{victim}/_history/1")),
            403,
        ),
        (
            "overwriting the hidden victim",
            M::PUT,
            "/Patient/pa-other".into(),
            patient(
                "pa-other",
                json!({"generalPractitioner": [{"reference": me}]}),
            ),
            404,
        ),
        (
            "a patient under an id of my choosing",
            M::PUT,
            "/Patient/pa-mine".into(),
            patient(
                "pa-mine",
                json!({"generalPractitioner": [{"reference": me}]}),
            ),
            404,
        ),
    ]
}

/// Each attack is refused, alone and inside a transaction.
async fn attacks_are_refused_alone_and_in_transactions(
    s: &TestServer,
    l: &str,
    a: &str,
    attacks: &[Attack],
) {
    // enc-2: an encounter of a reached patient without participants.
    put(
        s,
        l,
        json!({"resourceType": "Encounter", "id": "enc-2", "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": "Patient/pa-gp"}}),
    )
    .await;
    for (what, m, path, body, want) in attacks {
        let (st, b) = send(s, a, m.clone(), path, Some(body)).await;
        assert_eq!(st, *want, "{what}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome", "{what}");
        // The same inside a transaction: refused, nothing stored.
        let method = if *m == M::PUT { "PUT" } else { "POST" };
        let url = path.trim_start_matches('/');
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": body, "request": {"method": method, "url": url}}]});
        let (st, b) = send(s, a, M::POST, "", Some(&tx)).await;
        assert_eq!(st, *want, "{what} (transaction): {b}");
    }
}

/// A deleted patient, recreated naming myself: refused like any id I
/// cannot see.
async fn recreating_a_deleted_patient_is_refused(s: &TestServer, l: &str, a: &str, me: &str) {
    put(s, l, patient("pa-gone", json!({}))).await;
    assert_eq!(send(s, l, M::DELETE, "/Patient/pa-gone", None).await.0, 204);
    let (st, _) = send(
        s,
        a,
        M::PUT,
        "/Patient/pa-gone",
        Some(&patient(
            "pa-gone",
            json!({"generalPractitioner": [{"reference": me}]}),
        )),
    )
    .await;
    assert_eq!(st, 404, "recreating a deleted patient as my own");
}

/// Deleting, and conditional updates that select nothing: hidden and
/// missing resources answer alike.
async fn hidden_and_missing_answer_alike(s: &TestServer, a: &str, me: &str) {
    // Deleting: a hidden live resource, a hidden deleted one and an id that
    // never existed answer alike.
    let mut answers = Vec::new();
    for id in ["pa-other", "pa-gone", "never-existed"] {
        let (st, b) = send(s, a, M::DELETE, &format!("/Patient/{id}"), None).await;
        answers.push((st, b["issue"].clone()));
    }
    assert!(answers.iter().all(|x| *x == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 404);
    // A conditional update that selects nothing, with the id of a hidden
    // resource or of none: the same 404 (not 409 for the hidden one).
    let mut cond = Vec::new();
    for id in ["obs-other", "never-existed"] {
        let mut o = obs_of("Patient/pa-gp", me);
        o["id"] = json!(id);
        let (st, b) = send(
            s,
            a,
            M::PUT,
            "/Observation?identifier=urn:x|nomatch",
            Some(&o),
        )
        .await;
        cond.push((st, b["issue"].clone()));
    }
    assert!(cond.iter().all(|x| *x == cond[0]), "{cond:?}");
    assert_eq!(cond[0].0, 404);
}

/// Writes into reached records that name nobody else still work; my
/// own encounter's other elements remain mine to update.
async fn writes_naming_nobody_else_work(s: &TestServer, a: &str, me: &str) {
    let (st, b) = send(
        s,
        a,
        M::POST,
        "/Observation",
        Some(&obs_of("Patient/pa-gp", me)),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let (_, mut enc) = send(s, a, M::GET, "/Encounter/enc-1", None).await;
    enc["status"] = json!("cancelled");
    assert_eq!(
        send(s, a, M::PUT, "/Encounter/enc-1", Some(&enc)).await.0,
        200
    );
}

/// After every attempt (and past the care cache), the victim is as
/// unreachable as before, and nothing names them.
async fn the_victim_stays_unreachable(s: &TestServer, l: &str, a: &str) {
    tokio::time::sleep(std::time::Duration::from_millis(5_100)).await;
    for p in ["pa-other", "pa-org", "pa-mine", "pa-gone"] {
        assert_eq!(get(s, a, &format!("/Patient/{p}")).await, 404, "{p}");
    }
    assert_eq!(get(s, a, "/Observation/obs-other").await, 404);
    assert!(search(s, a, "/Observation?subject=Patient/pa-other")
        .await
        .is_empty());
    let all = search(s, l, "/Observation?subject=Patient/pa-other&_count=100").await;
    assert_eq!(
        all,
        vec!["Observation/obs-other", "Observation/obs-other-psy"]
    );
    for t in [
        "CareTeam",
        "PractitionerRole",
        "EpisodeOfCare",
        "RelatedPerson",
        "Group",
        "Consent",
        "Person",
    ] {
        let n = search(s, l, &format!("/{t}?_count=100")).await.len();
        let before = match t {
            "CareTeam" | "PractitionerRole" => 1,
            _ => 0,
        };
        assert_eq!(n, before, "{t}");
    }
}
