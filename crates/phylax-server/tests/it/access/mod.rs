//! The resource-level half of authorization, end to end on both backends:
//! care relationships, the patient's own compartment, security labels and
//! break-the-glass, through every way a response can carry data (read,
//! search, includes, chains, `_has`, history, `$everything`, compartment
//! search, writes, transaction entries). docs/ACCESS_CONTROL.md has the
//! policy these cells check.
//!
//! Users get tokens minted by the server's own issuer (sign-in itself is
//! tested in `signin`); the care relationships are real FHIR data.
//!
//! # Layout
//! - [`care`]: care relationships decide reads, searches and writes; refusals
//!   are audited; explain and review.
//! - [`compartment`]: patients reach their own compartment, delegates and
//!   related persons with consent.
//! - [`glass`]: break-the-glass: the grant, its record, alert and review, its
//!   expiry.
//! - [`consents`]: consents deny actors, purposes and everyone, at once and
//!   across nodes.
//! - [`masks`]: masked elements never leave, through any path.
//! - [`matrix`]: the documented access matrix, cell by cell.
//! - [`detection`]: detection rules that need access data; too many consent
//!   denials and over-reach are refused and recorded.
//! - [`erase`]: `Patient/{id}/$erase` only by a privacy officer, with the
//!   scope, a fresh second factor and a reason.
//! - [`insiders`]: insiders cannot widen their reach with ordinary FHIR
//!   writes.
//! - [`relationships`]: care relationships are written only by those allowed
//!   to; self-registration; data from before the permission held.
//! - [`pipeline`]: resources are reached only inside the interaction
//!   pipeline.
//! - [`records`]: tampered index rows, patient attribution and private access
//!   logs, type history, canonical references.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

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
                erase: false,
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
                erase: false,
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

fn consent(id: &str, patient: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "id": id, "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision})
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

mod care;
mod compartment;
mod consents;
mod detection;
mod erase;
mod glass;
mod insiders;
mod masks;
mod matrix;
mod pipeline;
mod records;
mod relationships;
