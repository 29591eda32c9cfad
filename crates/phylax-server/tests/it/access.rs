#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
//! The resource-level half of authorization, end to end on both backends:
//! care relationships, the patient's own compartment, security labels and
//! break-the-glass, through every way a response can carry data (read,
//! search, includes, chains, `_has`, history, `$everything`, compartment
//! search, writes, transaction entries). docs/ACCESS_CONTROL.md has the
//! policy these cells check.
//!
//! Users get tokens minted by the server's own issuer (sign-in itself is
//! tested in signin.rs); the care relationships are real FHIR data.

use crate::common;

use common::{now, Backend, TestServer};
use phylax_auth::token::UserContext;
use reqwest::Method as M;
use serde_json::{json, Value};

/// Run a test body on both backends, with this file's configuration.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            use super::common::Backend;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(&super::server(Backend::Sqlite).await.unwrap()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(s) = super::server(Backend::Postgres).await {
                    super::$name(&s).await;
                }
            }
        }
    };
}

const PSY: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const LOINC_HR: &str = "http://loinc.org|8867-4";

async fn server(b: Backend) -> Option<TestServer> {
    TestServer::start_with(b, |c| {
        // The loader may write labelled data (an explicit permission).
        c.access.labelled_clients = vec!["loader".into()];
        // … and the care relationships (the ADT feed).
        c.access.relationship_clients = vec!["loader".into()];
        // Another name this server once had.
        c.http.base_aliases = vec!["https://old-name.example/fhir".into()];
        c.roles = vec![
            phylax_server::base::config::RoleConfig {
                name: "psychiatrist".into(),
                description: "Sees sensitive data of the patients they treat".into(),
                grants: vec![phylax_server::base::config::RoleGrantConfig {
                    types: vec!["*".into()],
                    perms: "cruds".into(),
                }],
                reach: "care-relationships".into(),
                labelled: true,
                break_glass: true,
                relationships: false,
                purpose: "TREAT".into(),
                masks: Vec::new(),
            },
            phylax_server::base::config::RoleConfig {
                name: "coder".into(),
                description: "Codes observations; never sees clinical notes".into(),
                grants: vec![phylax_server::base::config::RoleGrantConfig {
                    types: vec!["Observation".into()],
                    perms: "rs".into(),
                }],
                reach: "everyone".into(),
                labelled: false,
                break_glass: false,
                relationships: false,
                purpose: "HOPERAT".into(),
                masks: vec!["note".into()],
            },
        ];
    })
    .await
}

fn loader(s: &TestServer) -> String {
    let scopes = phylax_auth::ScopeSet::parse_lenient("system/*.cruds");
    s.state
        .authn
        .tokens
        .issue("loader", &scopes, now())
        .unwrap()
        .0
}

/// A user and a token for them; `mfa_age` is how long ago their second
/// factor was used (None: password only).
async fn user(
    s: &TestServer,
    name: &str,
    role: &str,
    practitioner: Option<&str>,
    patient: Option<&str>,
    scope: &str,
    mfa_age: Option<i64>,
) -> String {
    let (u, _) = s
        .state
        .accounts
        .add_linked(name, role, patient, practitioner, 3600, now())
        .await
        .unwrap();
    token_for(s, u.id(), role, patient, scope, mfa_age)
}

/// A clinician linked to `practitioner`, with every `user/` scope.
async fn clinician(s: &TestServer, name: &str, practitioner: &str) -> String {
    user(
        s,
        name,
        "clinician",
        Some(practitioner),
        None,
        "user/*.cruds",
        None,
    )
    .await
}

fn token_for(
    s: &TestServer,
    user_id: &str,
    role: &str,
    patient: Option<&str>,
    scope: &str,
    mfa_age: Option<i64>,
) -> String {
    let ctx = UserContext {
        user_id: user_id.into(),
        role: role.into(),
        patient: patient.map(str::to_owned),
        family: uuid::Uuid::new_v4().to_string(),
        auth_time: now() - mfa_age.unwrap_or(0),
        amr: if mfa_age.is_some() {
            vec!["pwd".into(), "otp".into()]
        } else {
            vec!["pwd".into()]
        },
    };
    s.state
        .authn
        .tokens
        .issue_user("test-app", scope, &ctx, now())
        .unwrap()
        .0
}

async fn send(s: &TestServer, tok: &str, m: M, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut r = s.http.request(m, s.url(path)).bearer_auth(tok);
    if let Some(b) = body {
        r = r
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &TestServer, tok: &str, path: &str) -> u16 {
    send(s, tok, M::GET, path, None).await.0
}

/// `Type/id` of every entry of a Bundle (matches and includes).
fn ids(b: &Value) -> Vec<String> {
    let mut v: Vec<String> = b["entry"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let r = &e["resource"];
            Some(format!(
                "{}/{}",
                r["resourceType"].as_str()?,
                r["id"].as_str()?
            ))
        })
        .filter(|s| !s.starts_with("OperationOutcome/"))
        .collect();
    v.sort();
    v
}

async fn search(s: &TestServer, tok: &str, path: &str) -> Vec<String> {
    let (st, b) = send(s, tok, M::GET, path, None).await;
    assert_eq!(st, 200, "{path}: {b}");
    ids(&b)
}

async fn put(s: &TestServer, tok: &str, r: Value) {
    let path = format!(
        "/{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    );
    let (st, b) = send(s, tok, M::PUT, &path, Some(&r)).await;
    assert!(st == 200 || st == 201, "{path}: {st} {b}");
}

fn patient(id: &str, extra: Value) -> Value {
    let mut p = json!({"resourceType": "Patient", "id": id, "name": [{"family": "Sharedname"}]});
    if let (Some(o), Some(x)) = (p.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    p
}

fn obs(id: &str, patient: &str, label: Option<&str>) -> Value {
    let mut o = json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": 72, "unit": "/min"}});
    if let Some(l) = label {
        o["meta"] = json!({"security": [{"system": PSY, "code": l}]});
    }
    o
}

/// The shared fixture: who cares for whom.
async fn load(s: &TestServer) {
    let l = loader(s);
    for pr in ["pr-a", "pr-b"] {
        put(s, &l, json!({"resourceType": "Practitioner", "id": pr})).await;
    }
    put(
        s,
        &l,
        json!({"resourceType": "Organization", "id": "org-1"}),
    )
    .await;
    put(
        s,
        &l,
        json!({"resourceType": "PractitionerRole", "id": "role-b",
        "practitioner": {"reference": "Practitioner/pr-b"},
        "organization": {"reference": "Organization/org-1"}}),
    )
    .await;
    put(
        s,
        &l,
        patient(
            "pa-gp",
            json!({"generalPractitioner": [{"reference": "Practitioner/pr-a"}]}),
        ),
    )
    .await;
    put(s, &l, patient("pa-team", json!({}))).await;
    put(s, &l, patient("pa-enc", json!({}))).await;
    put(
        s,
        &l,
        patient(
            "pa-org",
            json!({"managingOrganization": {"reference": "Organization/org-1"}}),
        ),
    )
    .await;
    put(s, &l, patient("pa-other", json!({}))).await;
    put(
        s,
        &l,
        json!({"resourceType": "CareTeam", "id": "ct-1",
        "subject": {"reference": "Patient/pa-team"},
        "participant": [{"member": {"reference": "Practitioner/pr-a"}}]}),
    )
    .await;
    put(
        s,
        &l,
        json!({"resourceType": "Encounter", "id": "enc-1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/pa-enc"},
        "participant": [{"individual": {"reference": "Practitioner/pr-a"}}]}),
    )
    .await;
    put(s, &l, obs("obs-gp", "pa-gp", None)).await;
    put(s, &l, obs("obs-psy", "pa-gp", Some("PSY"))).await;
    put(s, &l, obs("obs-other", "pa-other", None)).await;
    put(s, &l, obs("obs-other-psy", "pa-other", Some("PSY"))).await;
    put(s, &l, json!({"resourceType": "Binary", "id": "bin-1", "contentType": "text/plain", "data": "aGk="})).await;
}

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
    use phylax_server::rest::access_admin::{explain, parse_interaction, Subject};
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
    use phylax_server::rest::access_admin::review;
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

on_both!(break_the_glass);
async fn break_the_glass(s: &TestServer) {
    load(s).await;
    glass_breaks_with_fresh_factor_reason_and_role(s).await;
    let open = grant_is_recorded_alerted_and_queued(s).await;
    review_is_closed_by_an_auditor_once(s, &open).await;
    expired_grant_gives_nothing(s).await;
}

/// Breaking the glass needs a recent second factor, a reason, a listed
/// purpose and a role that may; then it opens this patient only.
async fn glass_breaks_with_fresh_factor_reason_and_role(s: &TestServer) {
    let btg = |tok: String, body: Value| async move {
        send(
            s,
            &tok,
            M::POST,
            "/Patient/pa-other/$break-the-glass",
            Some(&body),
        )
        .await
    };
    let reason = json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "unconscious in the emergency department"},
        {"name": "purpose", "valueCode": "ETREAT"}]});
    // Needs a recent second factor.
    let stale = user(
        s,
        "dr.a",
        "clinician",
        Some("pr-a"),
        None,
        "user/*.cruds",
        Some(3600),
    )
    .await;
    let (st, b) = btg(stale, reason.clone()).await;
    assert_eq!(st, 400, "{b}");
    assert!(b.to_string().contains("recent second factor"));
    let id = s.state.accounts.find("dr.a").await.unwrap().unwrap().rec.id;
    let a = token_for(s, &id, "clinician", None, "user/*.cruds", Some(30));
    // Needs a reason, and a purpose from the list.
    let (st, _) = btg(
        a.clone(),
        json!({"resourceType": "Parameters", "parameter": []}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = btg(
        a.clone(),
        json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "x"}, {"name": "purpose", "valueCode": "HMARKT"}]}),
    )
    .await;
    assert_eq!(st, 400);
    // Roles without it are refused; unknown patients are not found.
    let fd = user(
        s,
        "desk",
        "front-desk",
        None,
        None,
        "user/*.cruds",
        Some(30),
    )
    .await;
    assert_eq!(btg(fd, reason.clone()).await.0, 403);
    let (st, _) = send(
        s,
        &a,
        M::POST,
        "/Patient/nobody/$break-the-glass",
        Some(&reason),
    )
    .await;
    assert_eq!(st, 404);

    assert_eq!(get(s, &a, "/Patient/pa-other").await, 404);
    let (st, b) = btg(a.clone(), reason.clone()).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["parameter"][1]["valueInstant"].is_string());
    // Access now, labelled data included, for this patient only.
    assert_eq!(get(s, &a, "/Patient/pa-other").await, 200);
    assert_eq!(get(s, &a, "/Observation/obs-other-psy").await, 200);
    assert_eq!(
        get(s, &a, "/Observation/obs-psy").await,
        404,
        "not another patient's label"
    );
    assert_eq!(get(s, &a, "/Patient/pa-org").await, 404);
}

/// Recorded: the grant (purpose, patient), the alert, and the access
/// made under it (purpose of use BTG). The reason stays out of the log.
/// Returns the open review queue.
async fn grant_is_recorded_alerted_and_queued(
    s: &TestServer,
) -> Vec<phylax_store::BreakGlassRecord> {
    let events = |subtype: &'static str| async move {
        s.state.audit.flush().await.unwrap();
        let rows = s
            .store
            .audit_search(&phylax_store::AuditQuery {
                subtype: Some(subtype.into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        rows.iter()
            .map(|r| s.state.audit.open_row(r).unwrap())
            .collect::<Vec<Value>>()
    };
    let grants = events("break-the-glass").await;
    let ok: Vec<&Value> = grants.iter().filter(|e| e["outcome"] == "0").collect();
    assert_eq!(ok.len(), 1, "{grants:?}");
    assert!(ok[0].to_string().contains("ETREAT"));
    assert!(ok[0].to_string().contains("Patient/pa-other"));
    assert!(!grants.iter().any(|e| e.to_string().contains("unconscious")));
    let reads = events("read").await;
    assert!(
        reads.iter().any(|e| e.to_string().contains("\"BTG\"")),
        "accesses under the grant are marked"
    );
    let mut alerted = false;
    for _ in 0..40 {
        if events("alert").await.iter().any(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.starts_with("break-the-glass [high]"))
        }) {
            alerted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(alerted, "a real-time alert");
    // In the review queue, with its sealed reason for the reviewer.
    let open = s.store.break_glass_list(true, 10).await.unwrap();
    assert_eq!(open.len(), 1);
    let d = phylax_server::access::break_glass::open_details(&s.state.keys, &open[0])
        .await
        .unwrap();
    assert_eq!(d.patient, "pa-other");
    assert!(d.reason.contains("unconscious"));
    open
}

/// Closing the review: auditors only, with a note, once.
async fn review_is_closed_by_an_auditor_once(
    s: &TestServer,
    open: &[phylax_store::BreakGlassRecord],
) {
    use phylax_server::access::break_glass::{close, queue, ReviewError};
    let gid = open[0].id.clone();
    user(s, "aud", "auditor", None, None, "user/AuditEvent.rs", None).await;
    assert!(matches!(
        close(&s.state.gate, &gid, "dr.a", "fine").await,
        Err(ReviewError::NotAuditor)
    ));
    assert!(matches!(
        close(&s.state.gate, &gid, "aud", "  ").await,
        Err(ReviewError::Note)
    ));
    assert!(matches!(
        close(&s.state.gate, "no-such", "aud", "x").await,
        Err(ReviewError::NotOpen)
    ));
    close(&s.state.gate, &gid, "aud", "confirmed with the ED log")
        .await
        .unwrap();
    assert!(matches!(
        close(&s.state.gate, &gid, "aud", "again").await,
        Err(ReviewError::NotOpen)
    ));
    assert!(queue(&s.state.gate, true).await.unwrap().is_empty());
    let all = queue(&s.state.gate, false).await.unwrap();
    assert_eq!(
        all[0].review_note.as_deref(),
        Some("confirmed with the ED log")
    );
    // The database refuses to rewrite a closed review or drop a grant.
    for sql in [
        format!("UPDATE break_glass SET expires = expires + 1 WHERE id = '{gid}'"),
        format!("UPDATE break_glass SET reviewer = 'someone' WHERE id = '{gid}'"),
        format!("DELETE FROM break_glass WHERE id = '{gid}'"),
    ] {
        let e = s.try_sql(&sql).await.unwrap_err();
        assert!(e.contains("kept"), "{sql}: {e}");
    }
}

/// An expired grant gives nothing: a fresh user with only a past grant.
async fn expired_grant_gives_nothing(s: &TestServer) {
    let c = user(
        s,
        "dr.c",
        "clinician",
        Some("pr-b"),
        None,
        "user/*.rs",
        Some(30),
    )
    .await;
    let cid = s.state.accounts.find("dr.c").await.unwrap().unwrap().rec.id;
    let gid = uuid::Uuid::new_v4().to_string();
    let details = phylax_server::access::break_glass::GrantDetails {
        patient: "pa-other".into(),
        reason: "old".into(),
        purpose: "ETREAT".into(),
    };
    let sealed = phylax_server::access::break_glass::seal(&s.state.keys, &gid, "grant", &details)
        .await
        .unwrap();
    let t = chrono::Utc::now().timestamp_millis();
    s.store
        .put_break_glass(&phylax_store::BreakGlassRecord {
            id: gid,
            user_id: cid,
            started: t - 7_200_000,
            expires: t - 3_600_000,
            sealed,
            reviewed_at: None,
            reviewer: None,
            review_sealed: None,
        })
        .await
        .unwrap();
    assert_eq!(get(s, &c, "/Patient/pa-other").await, 404);
}

fn consent(id: &str, patient: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "id": id, "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision})
}

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
    let e = phylax_server::rest::access_admin::explain(
        &s.state,
        &phylax_server::rest::access_admin::Subject::User {
            username: "dr.a".into(),
            scope: None,
        },
        &phylax_fhir::ResourceType::parse("Patient").unwrap(),
        &phylax_fhir::ResourceId::parse("pa-enc").unwrap(),
        phylax_server::rest::access_admin::parse_interaction("read").unwrap(),
    )
    .await
    .unwrap();
    assert!(e.rule.starts_with("consent"), "{e:?}");
}

on_both!(masked_elements_never_leave);
async fn masked_elements_never_leave(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    put(s, &l, json!({"resourceType": "Patient", "id": "pa-id", "gender": "female",
        "name": [{"family": "Identifiable", "given": ["Ida"]}],
        "identifier": [{"system": "urn:mrn", "value": "MRN-77"}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "address": [{"line": ["1 Secret Street"]}],
        "contact": [{"name": {"family": "Kinsman"}, "telecom": [{"system": "phone", "value": "555-0199"}]}],
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Maidenly"},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": "Birthville"}}],
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ida Identifiable</div>"}}))
    .await;
    let mut o = obs("obs-note", "pa-id", None);
    o["subject"]["display"] = json!("Ida Identifiable");
    o["note"] = json!([{"text": "patient worried about her job"}]);
    // A performer named only by identifier and display (no reference).
    o["performer"] = json!([{"identifier": {"system": "urn:npi", "value": "NPI-4242"},
        "display": "Doctor Displayname"}]);
    put(s, &l, o).await;
    let res = user(s, "res", "researcher", None, None, "user/*.rs", None).await;
    // Every identifying value of the source resources.
    let secrets = [
        "Identifiable",
        "MRN-77",
        "555-0100",
        "Secret Street",
        "Ida",
        "Kinsman",
        "555-0199",
        "Maidenly",
        "Birthville",
        "NPI-4242",
        "Doctor Displayname",
    ];
    let leak_free = |b: &Value| {
        let t = b.to_string();
        for x in secrets {
            assert!(!t.contains(x), "{x} leaked: {t}");
        }
    };
    for path in [
        "/Patient/pa-id",
        "/Patient/pa-id/_history/1",
        "/Patient/pa-id/_history",
        "/Patient?gender=female",
        "/Patient?_id=pa-id&_elements=name,identifier,gender",
        "/Patient?_id=pa-id&_summary=true",
        "/Observation?subject=Patient/pa-id&_include=Observation:subject",
        "/Patient/pa-id/$everything",
        "/Patient/pa-id/Observation",
        "/Observation/obs-note",
        "/Observation/obs-note/_history/1",
        "/Observation?_id=obs-note&_include=Observation:subject",
    ] {
        let (st, b) = send(s, &res, M::GET, path, None).await;
        assert_eq!(st, 200, "{path}: {b}");
        leak_free(&b);
    }
    let (_, p) = send(s, &res, M::GET, "/Patient/pa-id", None).await;
    assert_eq!(p["gender"], "female");
    assert_eq!(p["meta"]["security"][0]["code"], "REDACTED");
    // A batch GET is masked too.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/pa-id"}}]});
    let (st, b) = send(s, &res, M::POST, "", Some(&batch)).await;
    assert_eq!(st, 200);
    leak_free(&b);
    // Searching or sorting on a masked element would reveal it.
    for path in [
        "/Patient?family=Identifiable",
        "/Patient?name:exact=Ida",
        "/Patient?identifier=urn:mrn|MRN-77",
        "/Patient?address=Secret",
        "/Patient?phone=555-0100",
        "/Patient?gender=female&_sort=family",
        "/Observation?subject:Patient.family=Identifiable",
        "/Patient?_has:Observation:subject:code=8867-4&family=Identifiable",
    ] {
        assert_eq!(get(s, &res, path).await, 403, "{path}");
    }
    let r = s
        .http
        .post(s.url("/Patient/_search"))
        .bearer_auth(&res)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=Identifiable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Another role, another mask: the coder never receives notes.
    let coder = user(s, "coder", "coder", None, None, "user/*.rs", None).await;
    let (st, b) = send(s, &coder, M::GET, "/Observation/obs-note", None).await;
    assert_eq!(st, 200);
    assert!(b.get("note").is_none() && b["status"] == "final", "{b}");
    assert!(
        b.to_string().contains("Ida Identifiable"),
        "only notes are masked for the coder"
    );
    // Roles without masks receive everything.
    let (_, b) = send(s, &l, M::GET, "/Observation/obs-note", None).await;
    assert!(b["note"].is_array());
}

/// One row of the documented matrix: role, type, (column, cell) pairs.
type MatrixRow = (String, String, Vec<(String, String)>);

/// The matrix of docs/ACCESS_CONTROL.md: (role, type) → cells by column.
fn documented_matrix_cells() -> Vec<MatrixRow> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/ACCESS_CONTROL.md"
    ))
    .unwrap();
    let section = doc.split("## The matrix").nth(1).unwrap();
    let mut header: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        if !line.starts_with('|') || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        if cells[0] == "role" {
            header = cells;
            continue;
        }
        let cols = header[2..]
            .iter()
            .cloned()
            .zip(cells[2..].iter().cloned())
            .collect();
        out.push((cells[0].clone(), cells[1].clone(), cols));
    }
    out
}

/// A new resource of `t` in the test patient's compartment (or the
/// directory), for creates.
fn template(t: &str) -> Value {
    match t {
        "Patient" => json!({"resourceType": "Patient", "name": [{"family": "Matrix"}],
            "generalPractitioner": [{"reference": "Practitioner/pr-m"}]}),
        "Observation" => obs("ignored", "pm", None),
        "Condition" => json!({"resourceType": "Condition", "subject": {"reference": "Patient/pm"},
            "code": {"text": "cough"}}),
        "Coverage" => json!({"resourceType": "Coverage", "status": "active",
            "beneficiary": {"reference": "Patient/pm"}, "payor": [{"reference": "Organization/org-pay"}]}),
        "Claim" => json!({"resourceType": "Claim", "status": "active",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
            "use": "claim", "patient": {"reference": "Patient/pm"}, "created": "2024-01-01",
            "provider": {"reference": "Organization/org-pay"}, "priority": {"coding": [{"code": "normal"}]},
            "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov-m"}}]}),
        "Practitioner" => json!({"resourceType": "Practitioner", "active": true}),
        _ => json!({"resourceType": t}),
    }
}

/// The anchor resource of each type.
fn anchor(t: &str) -> &'static str {
    match t {
        "Patient" => "pm",
        "Observation" => "obs-m",
        "Condition" => "cond-m",
        "Coverage" => "cov-m",
        "Claim" => "claim-m",
        "Practitioner" => "pr-m",
        _ => "",
    }
}

/// The compartment parameter pointing at the patient, per type.
fn patient_param(t: &str) -> &'static str {
    match t {
        "Coverage" => "beneficiary",
        "Claim" => "patient",
        _ => "subject",
    }
}

on_both!(documented_matrix);
async fn documented_matrix(s: &TestServer) {
    let l = loader(s);
    load_matrix_anchors(s, &l).await;
    // An audit record to read.
    s.state.audit.flush().await.unwrap();
    let audit_id = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .event_id
        .clone();
    let cells = documented_matrix_cells();
    assert_eq!(cells.len(), 8 * 7, "every role × type row");
    let mut tokens = std::collections::HashMap::new();
    let mut checked = 0;
    for (role, t, cols) in &cells {
        if !tokens.contains_key(role) {
            let tok = matrix_token(s, role).await;
            tokens.insert(role.clone(), tok);
        }
        let tok = tokens[role].clone();
        let id = if t == "AuditEvent" {
            audit_id.as_str()
        } else {
            anchor(t)
        };
        for (col, want) in cols {
            if want == "-" {
                continue;
            }
            let want = match want.as_str() {
                "yes" => true,
                "no" => false,
                other => panic!("cell {role} {t} {col}: {other}"),
            };
            let got = matrix_cell(s, &l, &tok, t, id, col).await;
            assert_eq!(got, want, "{role} × {t} × {col}");
            checked += 1;
        }
    }
    assert!(checked > 500, "{checked} cells");
}

/// The matrix's anchors: a patient, their data, a payer, a practitioner.
async fn load_matrix_anchors(s: &TestServer, l: &str) {
    put(
        s,
        l,
        json!({"resourceType": "Organization", "id": "org-pay"}),
    )
    .await;
    put(s, l, json!({"resourceType": "Practitioner", "id": "pr-m"})).await;
    for t in ["Patient", "Observation", "Condition", "Coverage", "Claim"] {
        let mut r = template(t);
        r["id"] = json!(anchor(t));
        put(s, l, r).await;
    }
}

/// A user in `role` (linked to pr-m, or the patient pm) and their token.
async fn matrix_token(s: &TestServer, role: &str) -> String {
    if role == "patient" {
        user(
            s,
            "m-patient",
            "patient",
            None,
            Some("pm"),
            "patient/*.cruds",
            None,
        )
        .await
    } else {
        let name = format!("m-{role}");
        user(s, &name, role, Some("pr-m"), None, "user/*.cruds", None).await
    }
}

/// One cell: whether `tok` can do interaction `col` on `t`'s anchor `id`.
async fn matrix_cell(s: &TestServer, l: &str, tok: &str, t: &str, id: &str, col: &str) -> bool {
    let me = format!("{t}/{id}");
    let has = |b: &Value| ids(b).contains(&me);
    match col {
        "read" => get(s, tok, &format!("/{me}")).await == 200,
        "history" => {
            let (st, b) = send(s, tok, M::GET, &format!("/{me}/_history"), None).await;
            st == 200 && !ids(&b).is_empty()
        }
        "search" => {
            let (st, b) = send(s, tok, M::GET, &format!("/{t}?_id={id}"), None).await;
            st == 200 && has(&b)
        }
        "create" => {
            let (st, _) = send(s, tok, M::POST, &format!("/{t}"), Some(&template(t))).await;
            st == 201
        }
        "update" => {
            // Re-read by the loader so the update carries the id.
            let (_, mut cur) = send(s, l, M::GET, &format!("/{me}"), None).await;
            if cur.is_null() || t == "AuditEvent" {
                cur = json!({"resourceType": t, "id": id});
            }
            let (st, _) = send(s, tok, M::PUT, &format!("/{me}"), Some(&cur)).await;
            st == 200
        }
        "delete" => {
            // A disposable copy, so the anchors stay.
            let (st, made) = send(s, l, M::POST, &format!("/{t}"), Some(&template(t))).await;
            let victim = if st == 201 {
                made["id"].as_str().unwrap().to_owned()
            } else {
                id.to_owned()
            };
            let (st, _) = send(s, tok, M::DELETE, &format!("/{t}/{victim}"), None).await;
            st == 204
        }
        "include" => {
            let path = match t {
                "Patient" => "/Observation?_id=obs-m&_include=Observation:subject".to_owned(),
                "Practitioner" => {
                    "/Patient?_id=pm&_include=Patient:general-practitioner".to_owned()
                }
                _ => format!("/Patient?_id=pm&_revinclude={t}:{}", patient_param(t)),
            };
            let (st, b) = send(s, tok, M::GET, &path, None).await;
            st == 200 && has(&b)
        }
        "_has" => {
            let (path, found) = match t {
                "Patient" => (
                    "/Practitioner?_id=pr-m&_has:Patient:general-practitioner:_id=pm".to_owned(),
                    "Practitioner/pr-m",
                ),
                _ => (
                    format!("/Patient?_id=pm&_has:{t}:{}:_id={id}", patient_param(t)),
                    "Patient/pm",
                ),
            };
            let (st, b) = send(s, tok, M::GET, &path, None).await;
            st == 200 && ids(&b).contains(&found.to_owned())
        }
        "transaction" => {
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                        {"resource": template(t), "request": {"method": "POST", "url": t}}]});
            let (st, _) = send(s, tok, M::POST, "", Some(&tx)).await;
            st == 200
        }
        "$everything" => {
            let (st, b) = send(s, tok, M::GET, "/Patient/pm/$everything?_count=500", None).await;
            st == 200 && has(&b)
        }
        other => panic!("unknown column {other}"),
    }
}

/// Alerts in the audit log whose text starts with `rule`.
async fn alerts(s: &TestServer, rule: &str) -> usize {
    s.state.audit.flush().await.unwrap();
    let rows = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some("alert".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    rows.iter()
        .map(|r| s.state.audit.open_row(r).unwrap())
        .filter(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.starts_with(&format!("{rule} [")))
        })
        .count()
}

async fn wait_alerts(s: &TestServer, rule: &str, n: usize) -> usize {
    for _ in 0..50 {
        let got = alerts(s, rule).await;
        if got >= n {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    alerts(s, rule).await
}

on_both!(detection_rules_that_need_access_data);
async fn detection_rules_that_need_access_data(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    // Dr A shares a family name with her patients (Sharedname).
    put(
        s,
        &l,
        json!({"resourceType": "Practitioner", "id": "pr-a", "name": [{"family": "SHAREDNAME"}]}),
    )
    .await;
    put(s, &l, patient("pa-vip", json!({"generalPractitioner": [{"reference": "Practitioner/pr-b"}],
        "meta": {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-PatientImportance", "code": "VIP"}]}})))
    .await;
    s.state.refresh_vip().await.unwrap();
    let a = clinician(s, "dr.a", "pr-a").await;
    let b = clinician(s, "dr.b", "pr-b").await;
    assert_eq!(alerts(s, "vip-access").await, 0);
    // A flagged record: Dr B cares for the VIP and reads the record; the
    // alert says so (once per user and patient within the window).
    assert_eq!(get(s, &b, "/Patient/pa-vip").await, 200);
    assert_eq!(get(s, &b, "/Patient/pa-vip").await, 200);
    assert_eq!(wait_alerts(s, "vip-access", 1).await, 1);
    // Probing: Dr A tries three patients she does not care for.
    for p in ["pa-org", "pa-other", "pa-vip"] {
        assert_eq!(get(s, &a, &format!("/Patient/{p}")).await, 404);
    }
    assert_eq!(wait_alerts(s, "outside-care", 1).await, 1);
    // Dr B refused twice raises nothing.
    assert_eq!(alerts(s, "own-family-name").await, 0);
    // Her own family name: a search that returns a namesake.
    assert_eq!(
        search(s, &a, "/Patient?_id=pa-gp").await,
        vec!["Patient/pa-gp"]
    );
    assert_eq!(wait_alerts(s, "own-family-name", 1).await, 1);
    // Dr B has no family name on file: nothing.
    assert_eq!(get(s, &b, "/Patient/pa-org").await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(alerts(s, "own-family-name").await, 1);
    assert_eq!(alerts(s, "outside-care").await, 1);
}

/// The newest record of a refusal while establishing a caller's access
/// (interaction `access`), opened.
async fn last_access_refusal(s: &TestServer) -> Value {
    s.state.audit.flush().await.unwrap();
    let rows = s
        .store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some("access".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    s.state.audit.open_row(&rows[0]).unwrap()
}

on_both!(too_many_consent_denials_are_refused_and_recorded);
/// A caller denied by more patients' consents than a query can carry
/// (`access::MAX_DENIED`) is refused with a reason, recorded, rather than
/// served without the denials or with a query the database cannot take.
async fn too_many_consent_denials_are_refused_and_recorded(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    let fd = user(s, "desk", "front-desk", None, None, "user/*.rs", None).await;
    assert_eq!(get(s, &fd, "/Patient/pa-gp").await, 200);
    // One more patient than the limit denies every requester (one
    // transaction: the consent index is reread once, not per consent).
    let n = phylax_server::access::reach::MAX_DENIED + 1;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({"resource": consent(&format!("cd-{i}"), &format!("pd-{i}"), json!({"type": "deny"})),
                "request": {"method": "PUT", "url": format!("Consent/cd-{i}")}})
        })
        .collect();
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let (st, b) = send(s, &l, M::POST, "", Some(&tx)).await;
    assert_eq!(st, 200, "{b}");
    // Applied within the consent poller's second (a transaction is not a
    // Consent write of its own type).
    let mut refused = None;
    for _ in 0..50 {
        let (st, b) = send(s, &fd, M::GET, "/Patient/pa-gp", None).await;
        if st == 403 {
            refused = Some(b);
            break;
        }
        assert_eq!(st, 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let b = refused.expect("refused once the consents apply");
    assert!(!b.to_string().contains("Sharedname"), "no data: {b}");
    // The reason is about the caller, not a resource: it is stated.
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("more patients' consents deny this caller"),
        "{b}"
    );
    let ev = last_access_refusal(s).await;
    assert!(
        ev["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("more patients' consents deny this caller than a query can carry"),
        "{ev}"
    );
    // A patient reaches only their own compartment: not affected.
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
    let (st, b) = send(s, &pat, M::GET, "/Patient/pa-gp", None).await;
    assert_eq!(st, 200, "{b}");
}

/// A clinician whose care relationships exceed `access.max_reach` is
/// refused with a reason, and the refusal is recorded.
async fn over_max_reach_is_refused_and_recorded(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    let (st, b) = send(s, &a, M::GET, "/Patient/pa-gp", None).await;
    assert_eq!(st, 403, "{b}");
    assert!(!b.to_string().contains("Sharedname"));
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("care relationships exceed access.max_reach"),
        "{b}"
    );
    let ev = last_access_refusal(s).await;
    assert!(
        ev["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("denied by reach: care relationships exceed access.max_reach"),
        "{ev}"
    );
    // Dr B (one patient) is unaffected.
    let b = clinician(s, "dr.b", "pr-b").await;
    assert_eq!(get(s, &b, "/Patient/pa-org").await, 200);
}

mod over_max_reach {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.access.max_reach = 2;
            c.access.labelled_clients = vec!["loader".into()];
            // … and the care relationships (the ADT feed).
            c.access.relationship_clients = vec!["loader".into()];
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::over_max_reach_is_refused_and_recorded(&server(Backend::Sqlite).await.unwrap())
            .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::over_max_reach_is_refused_and_recorded(&s).await;
        }
    }
}

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

// Search index entries are not authenticated: someone with the database
// moves obs-gp's entries onto obs-other (another patient's), so that a
// clinician's search for their patient's observations matches it. The
// resource is checked again after decryption: nothing of it is served, the
// request fails, and an `index-tamper` alert is raised.
on_both!(a_tampered_index_row_is_caught_after_decryption);
async fn a_tampered_index_row_is_caught_after_decryption(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    assert_eq!(
        search(s, &a, "/Observation?subject=Patient/pa-gp").await,
        vec!["Observation/obs-gp"]
    );
    s.sql(
        "UPDATE search_entries SET seq = \
           (SELECT seq FROM resources WHERE rtype = 'Observation' AND id = 'obs-other') \
         WHERE seq = (SELECT seq FROM resources WHERE rtype = 'Observation' AND id = 'obs-gp')",
    )
    .await;
    for path in [
        "/Observation?subject=Patient/pa-gp",
        "/Observation?code=http://loinc.org|8867-4",
        "/Patient/pa-gp/Observation",
        "/Patient/pa-gp/$everything",
        "/Patient?_id=pa-gp&_revinclude=Observation:subject",
    ] {
        let (st, b) = send(s, &a, M::GET, path, None).await;
        assert_eq!(st, 500, "{path}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome", "{path}");
        assert!(!b.to_string().contains("obs-other"), "{path}: {b}");
    }
    assert!(wait_alerts(s, "index-tamper", 1).await >= 1);
}

// Every patient a returned resource names is attributed in the audit
// record (a Group of two patients, read by a backend client), and a
// patient's own `$access-log` shows only what concerns them: not the other
// patients a search record names, nor what was searched for.
on_both!(every_named_patient_is_attributed_and_access_logs_stay_private);
async fn every_named_patient_is_attributed_and_access_logs_stay_private(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    put(
        s,
        &l,
        json!({"resourceType": "Group", "id": "grp-2", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/pa-gp"}},
                       {"entity": {"reference": "Patient/pa-other"}}]}),
    )
    .await;
    assert_eq!(get(s, &l, "/Group/grp-2").await, 200);
    let (st, _) = send(s, &l, M::GET, "/Patient?_id=pa-gp,pa-other", None).await;
    assert_eq!(st, 200);
    let b = audit_of(s, "pa-other").await;
    let names_group = |action: &str| names(&b, Some(action), "Group/grp-2");
    assert!(names_group("C") || names_group("U"), "the Group write: {b}");
    assert!(
        names_group("R"),
        "the Group read is attributed to its second patient too"
    );
    // pa-gp's own access log: the two-patient search is there, without
    // pa-other and without the query entity.
    let me = user(
        s,
        "pat",
        "patient",
        None,
        Some("pa-gp"),
        "patient/*.rs",
        None,
    )
    .await;
    let (st, log) = send(
        s,
        &me,
        M::GET,
        "/Patient/pa-gp/$access-log?_count=200",
        None,
    )
    .await;
    assert_eq!(st, 200, "{log}");
    let text = log.to_string();
    assert!(!text.contains("pa-other"), "{text}");
    assert!(
        !text.contains("\"code\":\"24\""),
        "query entity shown: {text}"
    );
    assert!(text.contains("Patient/pa-gp"));
}

// Type history for a caller limited to some patients pages through their
// patients' versions only: another patient's writes neither fill pages
// (volume, timing) nor get decrypted.
on_both!(type_history_pages_only_through_reached_patients);
async fn type_history_pages_only_through_reached_patients(s: &TestServer) {
    load(s).await;
    let a = clinician(s, "dr.a", "pr-a").await;
    let mut url = s.url("/Observation/_history?_count=1");
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        pages += 1;
        assert!(pages < 10, "runaway paging");
        let r = s.http.get(&url).bearer_auth(&a).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        seen.extend(ids(&b));
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(n) => url = n["url"].as_str().unwrap().to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, vec!["Observation/obs-gp"]);
    // pa-gp's two versions (one hidden by its label), not pa-other's two.
    assert!(
        pages <= 2,
        "{pages} pages: other patients' versions were paged through"
    );
}

// Data written before references were made canonical: an Observation of
// pa-gp whose subject is an absolute URL to this server (so it was sealed
// under the tenant key and reached by nobody limited to patients). The
// start-up job gives it a new version in canonical form, under pa-gp's
// key, audited; run again it finds nothing.
on_both!(absolute_references_stored_earlier_are_made_canonical);
async fn absolute_references_stored_earlier_are_made_canonical(s: &TestServer) {
    load(s).await;
    let inst = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    // A repository that knows another base: it stores our base as it is.
    let old = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        inst.blind_key,
        "https://elsewhere.example/fhir".into(),
    );
    let t = phylax_fhir::ResourceType::parse("Observation").unwrap();
    let v = old
        .create(
            &t,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "old"},
                "subject": {"reference": format!("{}/Patient/pa-gp", s.fhir)}}),
            None,
        )
        .await
        .unwrap();
    let id = v.id.to_string();
    // One that names pa-gp already and pa-other only by an absolute URL:
    // made canonical it would enter pa-other's record, which its writer
    // was never checked for. It is left as it is, for review.
    let held = old
        .create(
            &t,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "held"},
                "subject": {"reference": "Patient/pa-gp"},
                "performer": [{"reference": format!("{}/Patient/pa-other", s.fhir)}]}),
            None,
        )
        .await
        .unwrap()
        .id
        .to_string();
    let row = s
        .store
        .read_current("Observation", &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.key_scope, "tenant");
    let a = clinician(s, "dr.a", "pr-a").await;
    assert_eq!(get(s, &a, &format!("/Observation/{id}")).await, 404);
    let n = phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
        .await
        .unwrap();
    assert_eq!(n, 0, "done once per instance, at the first start");
    // As at the first start after an upgrade: forget that it ran.
    s.sql("DELETE FROM meta WHERE key LIKE 'canonical_refs_v1_%'")
        .await;
    let n = phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let row = s
        .store
        .read_current("Observation", &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.key_scope, "patient:pa-gp");
    assert_eq!(row.version, 2);
    let kept = s
        .store
        .read_current("Observation", &held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        kept.version, 1,
        "not rewritten into another patient's record"
    );
    let (st, b) = send(s, &a, M::GET, &format!("/Observation/{id}"), None).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["subject"]["reference"], "Patient/pa-gp");
    assert!(search(s, &a, "/Observation?subject=Patient/pa-gp")
        .await
        .contains(&format!("Observation/{id}")));
    s.sql("DELETE FROM meta WHERE key LIKE 'canonical_refs_v1_%'")
        .await;
    assert_eq!(
        phylax_server::access::maintenance::canonicalize_stored_references(&s.state.gate)
            .await
            .unwrap(),
        0,
        "nothing left to rewrite"
    );
}

/// The audit records an auditor finds for `patient` (as a Bundle).
async fn audit_of(s: &TestServer, patient: &str) -> Value {
    s.state.audit.flush().await.unwrap();
    let aud = user(s, "aud", "auditor", None, None, "user/*.rs", None).await;
    let path = format!("/AuditEvent?patient={patient}&_count=200");
    let (st, b) = send(s, &aud, M::GET, &path, None).await;
    assert_eq!(st, 200, "{b}");
    b
}

/// Whether a record of `b` (with `action`, if given) names `reference`.
fn names(b: &Value, action: Option<&str>, reference: &str) -> bool {
    b["entry"].as_array().unwrap().iter().any(|e| {
        action.is_none_or(|a| e["resource"]["action"] == a)
            && e["resource"]["entity"]
                .as_array()
                .is_some_and(|es| es.iter().any(|x| x["what"]["reference"] == reference))
    })
}
