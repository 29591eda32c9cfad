//! Incident response (docs/INCIDENT_RESPONSE.md): the breach register and
//! an incident's scope from the audit log, on both backends.
//!
//! A backend client, a user and a second client read, search, export-like
//! `$everything`, batch and write known sets of patients; each scope must
//! name exactly those patients (no more, no fewer) with counts that
//! match, and a tampered log gives no scope at all.

use crate::common::{self, Backend, TestServer};
use phylax_auth::token::UserContext;
use phylax_server::data::incidents::{IncidentError, Severity, Step};
use phylax_server::ops::incident::{self as response, scope::Who, scope::Window};
use reqwest::Method as M;
use serde_json::{json, Value};
use std::collections::BTreeSet;

macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            use super::*;
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

/// The insider app may see labelled data (so its reads of it succeed and
/// count).
async fn server(b: Backend) -> Option<TestServer> {
    TestServer::start_with(b, labelled).await
}

/// The loader (the ADT feed, which may write care relationships) and
/// the insider app may see and write labelled data.
fn labelled(c: &mut phylax_server::base::config::Config) {
    c.access.labelled_clients = vec!["app-c".into(), common::FEED.into()];
}

fn client_token(s: &TestServer, id: &str, scope: &str) -> String {
    let scopes = phylax_auth::ScopeSet::parse_lenient(scope);
    s.state
        .authn
        .tokens
        .issue(id, &scopes, common::now())
        .unwrap()
        .0
}

async fn send(s: &TestServer, tok: &str, m: M, path: &str, body: Option<Value>) -> (u16, Value) {
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

async fn put(s: &TestServer, tok: &str, r: Value) {
    let path = format!(
        "/{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    );
    let (st, b) = send(s, tok, M::PUT, &path, Some(r)).await;
    assert!(st == 200 || st == 201, "{path}: {st} {b}");
}

fn obs(id: &str, patient: &str, label: Option<&str>) -> Value {
    let mut o = json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}});
    if let Some(l) = label {
        o["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": l}]});
    }
    o
}

/// Patients p1..p9, pr-u caring for p9, observations; p5 labelled R.
async fn load(s: &TestServer) {
    let l = s.feed_token("system/*.cruds");
    put(s, &l, json!({"resourceType": "Practitioner", "id": "pr-u"})).await;
    for i in 1..=9 {
        let mut p = json!({"resourceType": "Patient", "id": format!("p{i}")});
        if i == 5 {
            p["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]});
        }
        if i == 9 {
            p["generalPractitioner"] = json!([{"reference": "Practitioner/pr-u"}]);
        }
        // Addresses for the report's counts by state and the letters.
        let state = match i {
            1 | 2 => Some("MA"),
            3 => Some("ca"),
            _ => None,
        };
        if let Some(st) = state {
            p["name"] = json!([{"family": format!("Test{i}"), "given": ["Pat"]}]);
            p["address"] = json!([{"use": "home", "line": [format!("{i} Main St")], "city": "Town", "state": st}]);
        }
        put(s, &l, p).await;
    }
    put(s, &l, obs("o2", "p2", None)).await;
    put(s, &l, obs("o3", "p3", None)).await;
    put(s, &l, obs("o8", "p8", None)).await;
    put(s, &l, obs("oh", "p4", Some("HIV"))).await;
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn patients(sc: &phylax_server::ops::incident::scope::Scope) -> BTreeSet<String> {
    sc.patients.keys().cloned().collect()
}

on_both!(scope_names_exactly_what_each_principal_touched);
async fn scope_names_exactly_what_each_principal_touched(s: &TestServer) {
    load(s).await;
    let start = chrono::Utc::now().timestamp_millis();
    // The insider app: reads, searches (plain and with _include),
    // $everything, a batch, a write, a refusal and a miss.
    let c = client_token(s, "app-c", "system/*.rs system/Observation.c");
    let ok = |(st, b): (u16, Value)| {
        assert_eq!(st, 200, "{b}");
        b
    };
    ok(send(s, &c, M::GET, "/Patient/p1", None).await);
    ok(send(s, &c, M::GET, "/Observation?subject=Patient/p2", None).await);
    let inc = ok(send(
        s,
        &c,
        M::GET,
        "/Observation?_id=o3&_include=Observation:subject",
        None,
    )
    .await);
    assert_eq!(inc["entry"].as_array().unwrap().len(), 2, "{inc}");
    ok(send(s, &c, M::GET, "/Patient/p4/$everything", None).await);
    ok(send(s, &c, M::GET, "/Observation/oh", None).await);
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p5"}},
        {"request": {"method": "GET", "url": "Patient/p6"}}]});
    ok(send(s, &c, M::POST, "", Some(batch)).await);
    let (st, _) = send(
        s,
        &c,
        M::POST,
        "/Observation",
        Some(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "y"},
            "subject": {"reference": "Patient/p7"}}),
        ),
    )
    .await;
    assert_eq!(st, 201);
    let (st, _) = send(
        s,
        &c,
        M::POST,
        "/Patient",
        Some(json!({"resourceType": "Patient"})),
    )
    .await;
    assert_eq!(st, 403, "Patient.c is not in the app's scopes");
    let (st, _) = send(s, &c, M::GET, "/Patient/nobody", None).await;
    assert_eq!(st, 404);
    // Noise: another app and a user.
    let n = client_token(s, "app-n", "system/*.rs");
    ok(send(s, &n, M::GET, "/Patient/p8", None).await);
    ok(send(s, &n, M::GET, "/Observation?subject=Patient/p8", None).await);
    let (u, _) = s
        .state
        .accounts
        .add_linked("dr.u", "clinician", None, Some("pr-u"), 3600, common::now())
        .await
        .unwrap();
    let family = uuid::Uuid::new_v4().to_string();
    let ut = s
        .state
        .authn
        .tokens
        .issue_user(
            "test-app",
            "user/*.rs",
            &UserContext {
                user_id: u.id().into(),
                role: "clinician".into(),
                patient: None,
                family: family.clone(),
                auth_time: common::now(),
                amr: vec!["pwd".into()],
            },
            common::now(),
        )
        .unwrap()
        .0;
    ok(send(s, &ut, M::GET, "/Patient/p9", None).await);
    let (st, _) = send(s, &ut, M::GET, "/Patient/p1", None).await;
    assert!(st == 403 || st == 404, "{st}");

    let st = &s.state;
    let inc = response::open(st, "app-c suspected", Severity::High, start, "uid 0")
        .await
        .unwrap();
    let all = Window::default();
    let sc = response::scope(st, &inc.id, &Who::Client("app-c".into()), all, &[], "uid 0")
        .await
        .unwrap();
    assert_eq!(
        patients(&sc),
        set(&["p1", "p2", "p3", "p4", "p5", "p6", "p7"])
    );
    assert_eq!(sc.individuals, 7);
    // The batch's entries are recorded one by one, and the batch itself.
    assert_eq!(sc.records, 11, "{:?}", sc.by_interaction);
    assert_eq!(
        sc.totals.read, 5,
        "read p1, read oh, $everything p4, the batch's p5 and p6"
    );
    assert_eq!(sc.totals.search, 2);
    assert_eq!(sc.totals.write, 1);
    assert_eq!(sc.totals.denied, 1);
    assert_eq!(sc.totals.failed, 1);
    assert_eq!(sc.totals.other, 1, "the batch as a whole");
    assert_eq!(sc.by_interaction["search-type"], 2);
    assert_eq!(sc.by_interaction["create"], 2, "one stored, one refused");
    assert_eq!(sc.by_type["Observation"], 4, "{:?}", sc.by_type);
    assert_eq!(sc.patients["p7"].counts.write, 1);
    assert_eq!(sc.patients["p4"].counts.read, 2, "$everything and oh");
    assert_eq!(
        sc.restricted,
        vec!["Observation/oh".to_string(), "Patient/p5".to_string()]
    );
    assert_eq!(sc.principals, set(&["app-c"]));
    report_and_letters(s, &inc.id).await;

    // The user, and their sign-in session, reached p9 only.
    let su = response::scope(st, &inc.id, &Who::User(u.id().into()), all, &[], "uid 0")
        .await
        .unwrap();
    assert_eq!(patients(&su), set(&["p9"]));
    assert_eq!(su.records, 2);
    assert_eq!(su.totals.denied + su.totals.failed, 1);
    let sf = response::scope(st, &inc.id, &Who::Family(family), all, &[], "uid 0")
        .await
        .unwrap();
    assert_eq!(patients(&sf), set(&["p9"]));
    let none = response::scope(
        st,
        &inc.id,
        &Who::Family("someone-else".into()),
        all,
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(none.records, 0);
    // Through the app the user used: the user's accesses.
    let sa = response::scope(
        st,
        &inc.id,
        &Who::Client("test-app".into()),
        all,
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(patients(&sa), set(&["p9"]));
    // Everyone on this address: the load, both apps and the user.
    let si = response::scope(
        st,
        &inc.id,
        &Who::Ip("127.0.0.1".parse().unwrap()),
        all,
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert!(
        si.principals
            .is_superset(&set(&["app-c", "app-n", "adt-feed"])),
        "{:?}",
        si.principals
    );
    assert!(si.principals.contains(&format!("user:{}", u.id())));
    let every = response::scope(st, &inc.id, &Who::All, all, &[], "uid 0")
        .await
        .unwrap();
    assert_eq!(every.records, si.records);
    // A window before any of it: nothing.
    let before = response::scope(
        st,
        &inc.id,
        &Who::Client("app-c".into()),
        Window {
            since: None,
            until: Some(start),
        },
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(before.records, 0);

    // Each scope is in the register and the audit log.
    let got = st.incidents.get(&inc.id).await.unwrap();
    let scoped = got
        .steps
        .iter()
        .filter(|(_, s)| matches!(s, Step::Scoped { .. }))
        .count();
    assert_eq!(scoped, 8);
    assert_eq!(got.latest_scope().unwrap()["records"], 0);

    // A tampered log gives no scope.
    match s.backend {
        Backend::Sqlite => {
            s.sql(
                "DROP TRIGGER audit_no_update; \
                 UPDATE audit_log SET sealed = zeroblob(length(sealed)) WHERE id = (SELECT min(id) FROM audit_log WHERE agent = 'app-c')",
            )
            .await
        }
        Backend::Postgres => {
            s.sql(
                "ALTER TABLE audit_log DISABLE TRIGGER audit_append_only; \
                 UPDATE audit_log SET sealed = '\\x00'::bytea || sealed WHERE id = (SELECT min(id) FROM audit_log WHERE agent = 'app-c')",
            )
            .await
        }
    }
    let e = response::scope(st, &inc.id, &Who::Client("app-c".into()), all, &[], "uid 0")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not verify"), "{e}");
}

on_both!(the_register_keeps_every_step);
async fn the_register_keeps_every_step(s: &TestServer) {
    let st = &s.state;
    let now = chrono::Utc::now().timestamp_millis();
    let a = response::open(
        st,
        "lost laptop",
        Severity::Moderate,
        now - 3_600_000,
        "uid 1",
    )
    .await
    .unwrap();
    let b = response::open(st, "phishing", Severity::Low, now, "uid 1")
        .await
        .unwrap();
    assert_ne!(a.id, b.id);
    response::step(
        st,
        &a.id,
        Step::Note {
            text: "disk was encrypted".into(),
            by: "uid 1".into(),
        },
    )
    .await
    .unwrap();
    let closed = response::step(
        st,
        &a.id,
        Step::Closed {
            by: "uid 1".into(),
            resolution: "no breach: encrypted device".into(),
        },
    )
    .await
    .unwrap();
    assert!(!closed.is_open());
    assert_eq!(closed.steps.len(), 3);
    assert_eq!(closed.discovered, now - 3_600_000);
    // A closed incident takes no more steps.
    let e = response::step(
        st,
        &a.id,
        Step::Note {
            text: "late".into(),
            by: "uid 1".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");
    // Empty text and a future discovery are refused; nothing is written.
    assert!(matches!(
        st.incidents
            .open(" ", Severity::Low, now, "uid 1", now)
            .await,
        Err(IncidentError::Invalid(_))
    ));
    assert!(st
        .incidents
        .open("x", Severity::Low, now + 3_600_000, "uid 1", now)
        .await
        .is_err());
    let list = response::read(st, None).await.unwrap();
    assert_eq!(
        list.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        vec![a.id.clone(), b.id.clone()]
    );
    // The text is sealed: not in the database in the clear.
    let clear = s
        .sql_i64(match s.backend {
            Backend::Sqlite => {
                "SELECT count(*) FROM incident_events WHERE instr(sealed, CAST('laptop' AS BLOB)) > 0"
            }
            Backend::Postgres => {
                "SELECT count(*) FROM incident_events WHERE position('laptop'::bytea in sealed) > 0"
            }
        })
        .await;
    assert_eq!(clear, 0);
    // Append-only, even for someone with database access who does not
    // first drop the guards.
    assert!(s
        .try_sql("UPDATE incident_events SET kind = 'note'")
        .await
        .is_err());
    assert!(s.try_sql("DELETE FROM incident_events").await.is_err());
    // A step moved to another incident no longer opens.
    match s.backend {
        Backend::Sqlite => s.sql("DROP TRIGGER incident_events_no_update").await,
        Backend::Postgres => {
            s.sql("ALTER TABLE incident_events DISABLE TRIGGER incident_events_append_only")
                .await
        }
    }
    s.sql(&format!(
        "UPDATE incident_events SET incident = '{}' WHERE kind = 'note'",
        b.id
    ))
    .await;
    assert!(matches!(
        st.incidents.get(&b.id).await,
        Err(IncidentError::Integrity(_))
    ));
    // Each step is in the audit log (ids and kinds, never the text).
    st.audit.flush().await.unwrap();
    let recs = st
        .audit
        .search(&phylax_store::AuditQuery {
            subtype: Some("incident".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(recs.len() >= 5, "{}", recs.len());
    for r in &recs {
        let v = st.audit.open_row(r).unwrap().to_string();
        assert!(
            !v.contains("laptop") && !v.contains("encrypted device"),
            "{v}"
        );
    }
}

/// GET `url` with `tok` through `http`: the status.
async fn status(http: &reqwest::Client, url: &str, tok: &str) -> u16 {
    http.get(url)
        .bearer_auth(tok)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

on_both!(containment_stops_the_principal_on_every_node);
async fn containment_stops_the_principal_on_every_node(s: &TestServer) {
    load(s).await;
    let (node2, _stop, _st2) = s.second_node_with_state().await;
    let on2 = |path: &str| format!("{node2}{path}");
    // A user, a registered app and a client on another address, each
    // working on the second node.
    let (u, _) = s
        .state
        .accounts
        .add_linked("dr.x", "clinician", None, Some("pr-u"), 3600, common::now())
        .await
        .unwrap();
    let ut = s
        .state
        .authn
        .tokens
        .issue_user(
            "test-app",
            "user/*.rs",
            &UserContext {
                user_id: u.id().into(),
                role: "clinician".into(),
                patient: None,
                family: uuid::Uuid::new_v4().to_string(),
                auth_time: common::now(),
                amr: vec!["pwd".into()],
            },
            common::now(),
        )
        .unwrap()
        .0;
    let (app, key) = s.register("system/*.rs").await;
    let (st, v) = s
        .token_request(&s.assertion(&app, &key), "system/*.rs")
        .await;
    assert_eq!(st, 200, "{v}");
    let at = v["access_token"].as_str().unwrap().to_owned();
    let inst = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let ca = std::fs::read(inst.ca_path()).unwrap();
    // The attacker's machine: another loopback address.
    let far = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .local_address(Some("127.0.0.3".parse().unwrap()))
        .build()
        .unwrap();
    let other = client_token(s, "app-n", "system/*.rs");
    assert_eq!(status(&s.http, &on2("/Patient/p9"), &ut).await, 200);
    assert_eq!(status(&s.http, &on2("/Patient/p1"), &at).await, 200);
    assert_eq!(status(&far, &on2("/Patient/p1"), &other).await, 200);

    let st = &s.state;
    let inc = response::open(
        st,
        "compromise",
        Severity::Critical,
        common::now() * 1000,
        "uid 0",
    )
    .await
    .unwrap();
    let admin = phylax_server::keys::KeyAdmin::of(&inst, std::time::Duration::from_millis(200));
    let plan = phylax_server::ops::incident::contain::Plan {
        users: vec![u.id().to_owned()],
        clients: vec![app.clone()],
        addresses: vec!["127.0.0.3".parse().unwrap()],
        rotate_tokens: true,
        rotate_data_keys: false,
    };
    let started = std::time::Instant::now();
    let done = phylax_server::ops::incident::contain::contain(
        st,
        Some(&admin),
        &inc.id,
        &plan,
        "uid 0",
        &|_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(done.actions.len(), 5, "{:?}", done.actions);
    // Every node refuses them within seconds.
    loop {
        let refused = (
            status(&s.http, &on2("/Patient/p9"), &ut).await,
            status(&s.http, &on2("/Patient/p1"), &at).await,
            status(&far, &on2("/Patient/p1"), &other).await,
            status(&far, &format!("{}/Patient/p1", s.fhir), &other).await,
        );
        if refused == (401, 401, 403, 403) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "still served after 15 s: {refused:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The blocked address reaches no route, sign-in and tokens included;
    // others still work on both nodes.
    let r = far
        .get(format!("{}/auth/jwks", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(status(&s.http, &on2("/Patient/p1"), &other).await, 200);
    // The app gets no new token; the user cannot sign in (no password).
    let (st2, _) = s
        .token_request(&s.assertion(&app, &key), "system/*.rs")
        .await;
    assert_eq!(st2, 401);
    let user = s.state.accounts.find("dr.x").await.unwrap().unwrap();
    assert!(matches!(
        s.state
            .accounts
            .verify_password(Some(&user), "anything")
            .await
            .unwrap(),
        phylax_crypto::password::Verified::Mismatch
    ));
    // Recorded: the incident's step and the audit log.
    let got = st.incidents.get(&inc.id).await.unwrap();
    assert!(got
        .steps
        .iter()
        .any(|(_, s)| matches!(s, Step::Contained { actions, .. } if actions.len() == 5)));
    // A closed incident contains nothing more.
    response::step(
        st,
        &inc.id,
        Step::Closed {
            by: "uid 0".into(),
            resolution: "contained".into(),
        },
    )
    .await
    .unwrap();
    assert!(phylax_server::ops::incident::contain::contain(
        st,
        Some(&admin),
        &inc.id,
        &plan,
        "uid 0",
        &|_, _| {},
    )
    .await
    .is_err());
    // Unblocking lets the address in again.
    st.blocks
        .unblock(
            "127.0.0.3".parse().unwrap(),
            chrono::Utc::now().timestamp_millis(),
        )
        .await
        .unwrap();
    assert_eq!(
        status(&far, &format!("{}/Patient/p1", s.fhir), &other).await,
        200
    );
}

// A detector alert of a rule in `[detect] incident_on` opens an incident
// (and later alerts of the same rule and user join it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_open_incidents() {
    let s = TestServer::start_with(Backend::Sqlite, |c| {
        labelled(c);
        c.detect.scraping_patients = 3;
    })
    .await
    .unwrap();
    load(&s).await;
    let t = client_token(&s, "app-s", "system/*.rs");
    for i in [1, 2, 3, 4, 6] {
        let (st, _) = send(&s, &t, M::GET, &format!("/Patient/p{i}"), None).await;
        assert_eq!(st, 200);
    }
    // The loading feed touched more than three patients too: each
    // subject gets an incident of its own.
    let of = |all: &[phylax_server::data::incidents::Incident], who: &str| {
        all.iter()
            .filter(|i| {
                i.steps.iter().any(|(_, st)| {
                    matches!(st, Step::Alert { rule, detail, .. }
                        if rule == "scraping" && detail.starts_with(who))
                })
            })
            .count()
    };
    let started = std::time::Instant::now();
    loop {
        let all = s.state.incidents.list().await.unwrap();
        if of(&all, "app-s") > 0 && of(&all, "adt-feed") > 0 {
            assert_eq!(of(&all, "app-s"), 1);
            assert!(all
                .iter()
                .all(|i| i.is_open() && i.title == "alert: scraping"));
            break;
        }
        assert!(
            started.elapsed().as_secs() < 10,
            "no incident from the alerts"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The report of the app-c scope: counts by state from the addresses,
/// HIPAA's annual log (7 individuals), letters in an age archive.
async fn report_and_letters(s: &TestServer, id: &phylax_server::data::incidents::IncidentId) {
    use phylax_server::ops::incident::{deadlines::Jurisdiction, report};
    let key = age::x25519::Identity::generate();
    let to = phylax_crypto::kek::Recipients::parse([key.to_public().to_string().as_str()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("letters.age");
    let r = report::report(
        &s.state,
        id,
        &[Jurisdiction::UsHipaa, Jurisdiction::EuGdpr],
        Some(report::Letters {
            out: &out,
            to: &to,
            contact: "privacy office, 555-0100",
        }),
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(r.individuals, 7);
    assert_eq!(
        r.by_state,
        [("CA".to_string(), 1), ("MA".to_string(), 2)]
            .into_iter()
            .collect()
    );
    assert_eq!(r.state_unknown, 4);
    assert_eq!(r.letters, 7);
    assert!(r.obligations.iter().any(|o| o.notify.contains("annual")));
    // The report names no patient; the page escapes what it shows.
    let md = report::markdown(&r);
    let page = report::html(&r);
    for text in [&md, &page, &serde_json::to_string(&r).unwrap()] {
        assert!(
            !text.contains("Test1") && !text.contains("Main St"),
            "{text}"
        );
    }
    assert!(page.contains("<table>") && !page.contains("<script"));
    // The letters open with the identity only.
    let sealed = std::fs::read(&out).unwrap();
    let dec = age::Decryptor::new(&sealed[..]).unwrap();
    let mut plain = Vec::new();
    use std::io::Read;
    dec.decrypt(std::iter::once(&key as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let mut ar = tar::Archive::new(&plain[..]);
    let mut letters = std::collections::BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut body = String::new();
        e.read_to_string(&mut body).unwrap();
        letters.insert(name, body);
    }
    assert_eq!(letters.len(), 8, "seven letters and the index");
    assert!(letters
        .values()
        .any(|l| l.starts_with("Pat Test1\n1 Main St\nTown MA")));
    assert!(letters["index.csv"].contains(",p7\n"));
    // Never over an existing file.
    let again = report::report(
        &s.state,
        id,
        &[Jurisdiction::UsHipaa],
        Some(report::Letters {
            out: &out,
            to: &to,
            contact: "x",
        }),
        "uid 0",
    )
    .await;
    assert!(again.is_err());
}

// A drill against a serving node: detected, scoped to exactly its
// synthetic patients, contained, cleaned up and recorded.
on_both!(a_drill_detects_scopes_and_contains);
async fn a_drill_detects_scopes_and_contains(_s: &TestServer) {
    // (The file's server has labelled clients; a drill wants a small
    // scraping threshold instead.)
    let s = TestServer::start_with(_s.backend, |c| {
        c.detect.scraping_patients = 20;
    })
    .await
    .unwrap();
    let inst = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let ca = std::fs::read(inst.ca_path()).unwrap();
    let r = phylax_server::ops::incident::drill::drill(&s.state, &s.base, &ca, "uid 0")
        .await
        .unwrap();
    assert!(r.ok, "{:?}", r.failure);
    assert_eq!(r.patients, 21);
    let (d, sc, c) = (
        r.time_to_detect_secs.unwrap(),
        r.time_to_scope_secs.unwrap(),
        r.time_to_contain_secs.unwrap(),
    );
    assert!(d <= sc && sc <= c && c < 30.0, "{d} {sc} {c}");
    // The incident is closed, the drill patients are gone, the result is
    // recorded.
    let all = s.state.incidents.list().await.unwrap();
    assert!(all.iter().all(|i| !i.is_open()));
    let loader = client_token(&s, "loader", "system/*.rs");
    let (st, b) = send(&s, &loader, M::GET, "/Patient?_tag=drill", None).await;
    assert_eq!(st, 200);
    assert_eq!(b["entry"].as_array().map_or(0, Vec::len), 0, "{b}");
    let recorded = s
        .state
        .incidents
        .drills(phylax_server::ops::incident::drill::DRILL_META)
        .await
        .unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["ok"], true);
}

// A scope runs on a live instance: another node goes on recording reads
// (its journal indexed into the log, its sealer sealing) while this one
// verifies, and the log must verify every time.
on_both!(a_live_log_verifies_while_another_node_writes);
async fn a_live_log_verifies_while_another_node_writes(s: &TestServer) {
    load(s).await;
    let (node2, stop, _st2) = s.second_node_with_state().await;
    let tok = client_token(s, "app-busy", "system/*.rs");
    let http = s.http.clone();
    let busy = tokio::spawn(async move {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
        let mut n = 0;
        while std::time::Instant::now() < until {
            let i = n % 9 + 1;
            let r = http
                .get(format!("{node2}/Patient/p{i}"))
                .bearer_auth(&tok)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success() || r.status().as_u16() == 404);
            n += 1;
        }
        n
    });
    let mut passes = 0;
    while !busy.is_finished() {
        s.state.audit.verify(&[], None).await.unwrap();
        passes += 1;
    }
    let n = busy.await.unwrap();
    assert!(n > 20 && passes > 1, "{n} reads, {passes} passes");
    let _ = stop.send(());
    s.state.audit.verify(&[], None).await.unwrap();
}

/// Remove the register's guards, as someone with database access could.
async fn drop_register_guards(s: &TestServer) {
    match s.backend {
        Backend::Sqlite => {
            s.sql("DROP TRIGGER incident_events_no_update; DROP TRIGGER incident_events_no_delete")
                .await
        }
        Backend::Postgres => {
            s.sql("ALTER TABLE incident_events DISABLE TRIGGER incident_events_append_only")
                .await
        }
    }
}

// Someone with the database file deletes or reorders steps to hide what
// was found or done: the chain or the audit log shows it.
on_both!(deleted_or_reordered_steps_are_found);
async fn deleted_or_reordered_steps_are_found(s: &TestServer) {
    let st = &s.state;
    let now = chrono::Utc::now().timestamp_millis();
    let note = |t: &str| Step::Note {
        text: t.into(),
        by: "uid 1".into(),
    };
    let a = response::open(st, "a", Severity::High, now, "uid 1")
        .await
        .unwrap();
    for t in ["one", "two", "three"] {
        response::step(st, &a.id, note(t)).await.unwrap();
    }
    let b = response::open(st, "b", Severity::Low, now, "uid 1")
        .await
        .unwrap();
    response::read(st, None).await.unwrap();
    drop_register_guards(s).await;
    let copy = "CREATE TABLE ie_copy AS SELECT * FROM incident_events";
    s.sql(copy).await;
    let restore = "DELETE FROM incident_events; INSERT INTO incident_events SELECT * FROM ie_copy";
    let cases = [
        (
            "a step deleted from the middle",
            format!(
                "DELETE FROM incident_events WHERE incident = '{}' AND step = 2",
                a.id
            ),
        ),
        (
            "two steps swapped",
            format!(
                "UPDATE incident_events SET step = 9 WHERE incident = '{0}' AND step = 1; \
                 UPDATE incident_events SET step = 1 WHERE incident = '{0}' AND step = 2; \
                 UPDATE incident_events SET step = 2 WHERE incident = '{0}' AND step = 9",
                a.id
            ),
        ),
        (
            "the last step deleted",
            format!(
                "DELETE FROM incident_events WHERE incident = '{}' AND step = 3",
                a.id
            ),
        ),
        (
            "a whole incident deleted",
            format!("DELETE FROM incident_events WHERE incident = '{}'", b.id),
        ),
    ];
    for (what, sql) in cases {
        s.sql(&sql).await;
        let r = response::read(st, None).await;
        s.sql(restore).await;
        assert!(r.is_err(), "{what} went unnoticed");
    }
    // Restored, the register reads again.
    assert_eq!(response::read(st, None).await.unwrap().len(), 2);
}

// Patients named outside the compartment (a Binary's securityContext, a
// DocumentReference's sourcePatientInfo) are in the scope when their
// resources leave, by search or read.
on_both!(patients_named_outside_the_compartment_are_in_the_scope);
async fn patients_named_outside_the_compartment_are_in_the_scope(s: &TestServer) {
    load(s).await;
    let l = s.feed_token("system/*.cruds");
    put(
        s,
        &l,
        json!({"resourceType": "DocumentReference", "id": "d1", "status": "current",
            "context": {"sourcePatientInfo": {"reference": "Patient/p2"}},
            "content": [{"attachment": {"contentType": "text/plain", "data": "eA=="}}]}),
    )
    .await;
    put(
        s,
        &l,
        json!({"resourceType": "Binary", "id": "b1", "contentType": "text/plain",
            "securityContext": {"reference": "Patient/p3"}, "data": "eA=="}),
    )
    .await;
    let t = client_token(s, "app-d", "system/*.rs");
    let (st, b) = send(s, &t, M::GET, "/DocumentReference?status=current", None).await;
    assert_eq!(
        (st, b["entry"].as_array().map_or(0, Vec::len)),
        (200, 1),
        "{b}"
    );
    let (st, _) = send(s, &t, M::GET, "/Binary/b1", None).await;
    assert_eq!(st, 200);
    let inc = response::open(&s.state, "docs", Severity::High, 0, "uid 0")
        .await
        .unwrap();
    let sc = response::scope(
        &s.state,
        &inc.id,
        &Who::Client("app-d".into()),
        Window::default(),
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(patients(&sc), set(&["p2", "p3"]));
}

// A log cut back below what an earlier scope verified gives no scope,
// even with no checkpoint kept outside the database.
on_both!(a_log_cut_after_a_scope_is_refused);
async fn a_log_cut_after_a_scope_is_refused(s: &TestServer) {
    load(s).await;
    let st = &s.state;
    st.audit.seal_pending().await.unwrap();
    let a = st.audit.latest_checkpoint().await.unwrap().unwrap().size;
    // More traffic, sealed: the records an attacker wants gone.
    let t = client_token(s, "app-cut", "system/*.rs");
    for i in 1..=4 {
        send(s, &t, M::GET, &format!("/Patient/p{i}"), None).await;
    }
    st.audit.seal_pending().await.unwrap();
    let inc = response::open(st, "cut", Severity::High, 0, "uid 0")
        .await
        .unwrap();
    let first = response::scope(
        st,
        &inc.id,
        &Who::Client("app-cut".into()),
        Window::default(),
        &[],
        "uid 0",
    )
    .await
    .unwrap();
    assert_eq!(first.individuals, 4);
    assert!(first.log.checkpoint_size.unwrap() > a);
    // Cut the tree and its checkpoints back to the first checkpoint: what
    // is left verifies on its own.
    let cut = format!(
        "DELETE FROM audit_patient WHERE audit_id IN (SELECT audit_id FROM audit_leaf WHERE leaf_index >= {a}); \
         DELETE FROM audit_log WHERE id IN (SELECT audit_id FROM audit_leaf WHERE leaf_index >= {a}); \
         DELETE FROM audit_leaf WHERE leaf_index >= {a}; \
         DELETE FROM audit_checkpoints WHERE size > {a}"
    );
    match s.backend {
        Backend::Sqlite => {
            s.sql(&format!(
                "DROP TRIGGER audit_no_delete; DROP TRIGGER audit_leaf_no_delete; \
                 DROP TRIGGER checkpoints_no_delete; DROP TRIGGER audit_patient_no_delete; {cut}"
            ))
            .await
        }
        Backend::Postgres => {
            s.sql(&format!(
                "ALTER TABLE audit_log DISABLE TRIGGER audit_append_only; \
                 ALTER TABLE audit_leaf DISABLE TRIGGER audit_leaf_append_only; \
                 ALTER TABLE audit_checkpoints DISABLE TRIGGER checkpoints_append_only; \
                 ALTER TABLE audit_patient DISABLE TRIGGER audit_patient_append_only; {cut}"
            ))
            .await
        }
    }
    st.audit.verify(&[], None).await.unwrap();
    let e = response::scope(
        st,
        &inc.id,
        &Who::Client("app-cut".into()),
        Window::default(),
        &[],
        "uid 0",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("cut off"), "{e}");
}
