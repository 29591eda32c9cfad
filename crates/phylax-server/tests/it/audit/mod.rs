//! The audit log end to end, on both backends: every interaction leaves a
//! BALP AuditEvent naming the patients concerned and no PHI; the log is
//! readable only by auditors and never writable; a request whose record
//! cannot be written fails with 503 and leaks nothing (and a write is then
//! not stored); checkpoints are signed; and every kind of tampering with
//! the stored log is caught by `verify`.
//!
//! # Layout
//! - [`records`]: every interaction is recorded, readable by auditors only,
//!   free of PHI, never writable; checkpoints are signed.
//! - [`fail_closed`]: a request whose record cannot be written fails closed;
//!   journaled records survive a crash.
//! - [`tampering`]: tampering with the stored log is caught: verify, the
//!   sealing edge, damaged records, forged rows.
//! - [`export`]: the JSON lines export and the metrics endpoint.
//! - [`delivery`]: alerts and records leave the server: the signed webhook,
//!   syslog over TLS, configuration changes, the detector.
//! - [`storage`]: how records are stored: retention, compression, patient key
//!   collisions.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{TestServer, ALL, FJ};
use serde_json::{json, Value};

const FAMILY: &str = "Quixotequeue";

async fn send(
    s: &TestServer,
    tok: &str,
    m: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = s.http.request(m, s.url(path)).bearer_auth(tok);
    if let Some(b) = body {
        r = r.header("content-type", FJ).body(b.to_string());
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A patient with an Observation, read and searched; returns (patient id,
/// observation id).
async fn some_traffic(s: &TestServer, tok: &str) -> (String, String) {
    use reqwest::Method as M;
    let (st, p) = send(
        s,
        tok,
        M::POST,
        "/Patient",
        Some(&json!({
        "resourceType": "Patient", "name": [{"family": FAMILY, "given": ["Ada"]}],
        "birthDate": "1961-07-04"})),
    )
    .await;
    assert_eq!(st, 201);
    let pid = p["id"].as_str().unwrap().to_owned();
    let (st, o) = send(
        s,
        tok,
        M::POST,
        "/Observation",
        Some(&json!({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{pid}")}})),
    )
    .await;
    assert_eq!(st, 201);
    let oid = o["id"].as_str().unwrap().to_owned();
    assert_eq!(
        send(s, tok, M::GET, &format!("/Patient/{pid}"), None)
            .await
            .0,
        200
    );
    let (st, b) = send(
        s,
        tok,
        M::GET,
        &format!("/Observation?subject=Patient/{pid}&code=8867-4"),
        None,
    )
    .await;
    assert_eq!((st, b["entry"].as_array().unwrap().len()), (200, 1));
    let (st, _) = send(s, tok, M::GET, &format!("/Patient?family={FAMILY}"), None).await;
    assert_eq!(st, 200);
    (pid, oid)
}

/// The newest `limit` audit records of one subtype.
async fn records_of(s: &TestServer, subtype: &str, limit: u32) -> Vec<phylax_store::AuditRow> {
    s.state.audit.flush().await.unwrap();
    s.store
        .audit_search(&phylax_store::AuditQuery {
            subtype: Some(subtype.into()),
            limit,
            ..Default::default()
        })
        .await
        .unwrap()
}

fn facts(i: usize) -> phylax_audit::event::AuditFacts {
    use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome};
    AuditFacts {
        id: phylax_server::audit::log::new_event_id(),
        recorded_ms: chrono::Utc::now().timestamp_millis(),
        kind: EventKind::Rest("read"),
        action: Action::Read,
        outcome: Outcome::Success,
        outcome_desc: None,
        user: None,
        client: Some(format!("crash-test-{i}")),
        ip: None,
        token_id: None,
        request_id: String::new(),
        purpose: None,
        patients: vec![format!("p{i}")],
        resources: Vec::new(),
        query_params: Vec::new(),
        query_type: None,
        token_family: None,
        observer: "test".into(),
    }
}

mod delivery;
mod export;
mod fail_closed;
mod records;
mod storage;
mod tampering;
