//! The documented access matrix, cell by cell.

use super::*;

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
