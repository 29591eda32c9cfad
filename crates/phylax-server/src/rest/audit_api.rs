//! The audit log through FHIR, read-only: `GET /fhir/AuditEvent` (search by
//! `patient`, `agent`, `date`, `action`, `subtype`), `GET
//! /fhir/AuditEvent/{id}`, and `GET /fhir/Patient/{id}/$access-log` (who
//! looked at a patient's record, for the patient and for auditors).
//!
//! Who may read: the policy decides as for any type — the `auditor` role,
//! and backend clients whose scopes name `AuditEvent` (wildcards do not
//! reach it) — plus a patient for their own `$access-log`. Nothing can
//! create, change or delete an AuditEvent through the API (405), and the
//! database refuses deletes and edits (triggers), so patient erasure never
//! touches the log.

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::error::Failure;
use crate::rest::pipeline;
use crate::rest::wire::{bundle, fhir_json, make_cursor, open_cursor};
use crate::state::FhirState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use phylax_auth::policy::{decide, Decision, Interaction, Principal};
use phylax_fhir::outcome::{Issue, IssueCode};
use phylax_fhir::ResourceId;
use phylax_store::AuditQuery;
use serde_json::{json, Value};
use std::sync::Arc;

pub const AUDIT_TYPE: &str = "AuditEvent";
const DEFAULT_COUNT: u32 = 50;
const MAX_COUNT: u32 = 500;

/// Any attempt to write the audit log through the API.
pub fn refuse_write() -> Failure {
    Failure::MethodNotAllowed(
        "AuditEvents are written by the server only; they cannot be created, changed or deleted",
    )
}

/// A store query, the page size, the filters kept for links, and the
/// patient asked about (if any), whose records a page keeps.
type Parsed = (AuditQuery, u32, Vec<(String, String)>, Option<ResourceId>);

/// Search parameters → a store query. Unknown parameters are an error
/// (the audit log is small in surface; silently ignoring a filter would
/// show an auditor more, or less, than they asked for).
fn parse_query(st: &FhirState, params: &[(String, String)]) -> Result<Parsed, Failure> {
    let mut q = AuditQuery::default();
    let mut count = DEFAULT_COUNT;
    let mut kept = Vec::new();
    let mut patient = None;
    for (k, v) in params {
        match k.as_str() {
            "patient" | "entity" | "_compartment" => {
                let id = v
                    .rsplit_once("Patient/")
                    .map(|(_, id)| id)
                    .unwrap_or(v.as_str());
                let id = ResourceId::parse(id)
                    .ok_or_else(|| Failure::bad_request("patient must be a Patient id or reference"))?;
                q.patient = Some(st.audit.patient_hash(id.as_str()));
                patient = Some(id);
            }
            "agent" => q.agent = Some(v.clone()),
            "action" => {
                if phylax_audit::event::Action::parse(v).is_none() {
                    return Err(Failure::bad_request("action must be one of C, R, U, D, E"));
                }
                q.action = Some(v.clone());
            }
            "subtype" => q.subtype = Some(v.rsplit('|').next().unwrap_or(v).to_owned()),
            "_id" => q.event_id = Some(v.clone()),
            "date" => {
                let (op, val) = match v.get(..2) {
                    Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                    _ => ("eq", v.as_str()),
                };
                let (lo, hi, _) = phylax_fhir::search::date_range(val)
                    .ok_or_else(|| Failure::bad_request("date must be a FHIR date or dateTime"))?;
                match op {
                    "ge" => q.from = Some(q.from.map_or(lo, |f| f.max(lo))),
                    "gt" => q.from = Some(q.from.map_or(hi, |f| f.max(hi))),
                    "le" => q.to = Some(q.to.map_or(hi, |t| t.min(hi))),
                    "lt" => q.to = Some(q.to.map_or(lo, |t| t.min(lo))),
                    _ => {
                        q.from = Some(q.from.map_or(lo, |f| f.max(lo)));
                        q.to = Some(q.to.map_or(hi, |t| t.min(hi)));
                    }
                }
            }
            "_count" => {
                count = v
                    .parse::<u32>()
                    .map_err(|_| Failure::bad_request("_count must be a number"))?
                    .clamp(1, MAX_COUNT);
                continue;
            }
            "_cursor" => continue,
            other => {
                return Err(Failure::BadRequest(vec![Issue::error(
                    IssueCode::NotSupported,
                    format!(
                        "AuditEvent search supports _id, patient, agent, date, action, subtype and _count; not {}",
                        other.chars().take(40).collect::<String>()
                    ),
                )]))
            }
        }
        kept.push((k.clone(), v.clone()));
    }
    kept.sort();
    Ok((q, count, kept, patient))
}

/// One page of records matching `params`, newest first, as a Bundle.
/// `strip` removes forensic details (network address, token id, request
/// id) for a patient's own view.
async fn page(
    st: &FhirState,
    path: &str,
    params: &[(String, String)],
    strip: bool,
) -> Result<Response, Failure> {
    let (mut q, count, kept, patient) = parse_query(st, params)?;
    // Every record acknowledged before this request is readable.
    st.audit
        .flush()
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let listing = format!(
        "{path}?{}",
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&kept)
            .finish()
    );
    if let Some((_, c)) = params.iter().find(|(k, _)| k == "_cursor") {
        q.before_id = Some(open_cursor(st, &listing, c)?);
    }
    q.limit = count + 1;
    let rows = st
        .audit
        .search(&q)
        .await
        .map_err(crate::data::repo::RepoError::from)?;
    let more = rows.len() > count as usize;
    let rows = &rows[..rows.len().min(count as usize)];
    let mut entries = Vec::with_capacity(rows.len());
    let mut damaged = 0usize;
    for r in rows {
        // A record that fails its integrity check is left out, said in an
        // OperationOutcome entry and alerted: one damaged row must not
        // hide the rest of the log from the auditor (`audit verify`
        // reports it in full).
        let mut v = match st.audit.open_row(r) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(event = "audit.verification_failed", audit_id = r.id, error = %e, "an audit record failed its integrity check; left out of the page");
                if let Some(d) = st.audit.detector() {
                    d.raise_once(
                        crate::audit::alert::Alert {
                            rule: "audit-tamper",
                            severity: "high",
                            detail: format!(
                                "audit record {} failed its integrity check when read; run phylax audit verify",
                                r.event_id
                            ),
                            user: None,
                        },
                        format!("audit-tamper|{}", r.id),
                    );
                }
                damaged += 1;
                continue;
            }
        };
        // The store finds a patient's records by 64 bits of their keyed
        // hash (`phylax_store::query::patient_key`), so another patient's
        // record can come back on a collision: only records that name
        // the patient asked about are shown. The page may then hold fewer
        // than `_count` entries; its links are unchanged.
        if let Some(p) = &patient {
            if !names_patient(&v, p) {
                tracing::warn!(
                    event = "audit.patient_key_collision",
                    "an audit record about another patient shared the patient key; left out"
                );
                continue;
            }
        }
        if strip {
            strip_forensics(&mut v, patient.as_ref());
        }
        entries.push(crate::rest::wire::entry(
            format!("{}/AuditEvent/{}", st.fhir_base, r.event_id),
            v,
            "match",
        ));
    }
    if damaged > 0 {
        let oo = phylax_fhir::OperationOutcome::single(phylax_fhir::Issue {
            severity: phylax_fhir::Severity::Warning,
            code: phylax_fhir::IssueCode::Processing,
            diagnostics: format!(
                "{damaged} audit record(s) on this page failed their integrity check and are left out; an alert was raised (run phylax audit verify)"
            ),
            expression: None,
        });
        entries.push(json!({"resource": oo.to_json(None), "search": {"mode": "outcome"}}));
    }
    let base = format!("{}/{}", st.fhir_base, path);
    let self_url = listing.replacen(path, &base, 1);
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let (true, Some(last)) = (more, rows.last()) {
        let c = make_cursor(st, &listing, last.id);
        let sep = if kept.is_empty() { "" } else { "&" };
        links.push(json!({"relation": "next", "url": format!("{self_url}{sep}_count={count}&_cursor={c}")}));
    }
    let mut r = fhir_json(StatusCode::OK, &bundle("searchset", links, entries));
    r.extensions_mut().insert(AuditRefs {
        params: kept.iter().map(|(k, _)| k.clone()).collect(),
        ..Default::default()
    });
    Ok(r)
}

/// Whether a record lists `Patient/{id}` among its entities (how
/// `phylax_audit::event` names every patient a record concerns).
fn names_patient(v: &Value, id: &ResourceId) -> bool {
    let want = format!("Patient/{}", id.as_str());
    v["entity"]
        .as_array()
        .is_some_and(|es| es.iter().any(|e| e["what"]["reference"] == want.as_str()))
}

/// A patient's own view of a record about them: no forensic details
/// (network address, token id, request id), no other patient a
/// multi-patient record names (a search that returned several people),
/// and no query entity (what was searched for is about the searcher's
/// method, and the parameters could hint at other people's data).
fn strip_forensics(v: &mut Value, patient: Option<&ResourceId>) {
    if let Some(agents) = v["agent"].as_array_mut() {
        for a in agents.iter_mut().filter_map(Value::as_object_mut) {
            a.remove("network");
            a.remove("altId");
        }
    }
    let mine = patient.map(|p| format!("Patient/{}", p.as_str()));
    if let Some(es) = v["entity"].as_array_mut() {
        let other = |e: &Value| {
            e["what"]["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with("Patient/") && Some(r) != mine.as_deref())
        };
        // A record naming other patients too (a search that returned
        // several people): its resource entities may be theirs, so none
        // is shown.
        let shared = es.iter().any(other);
        es.retain(|e| {
            let request = e["what"]["identifier"]["system"] == "urn:phylax:request";
            let query = e["role"]["code"] == "24";
            let resource = e["type"]["code"] == "2";
            !(request || query || other(e) || (shared && resource))
        });
    }
}

/// Search the log (the pipeline has decided `search-type` on AuditEvent).
pub async fn search(st: &FhirState, params: Vec<(String, String)>) -> Result<Response, Failure> {
    page(st, AUDIT_TYPE, &params, false).await
}

/// Read one record (the pipeline has decided `read` on AuditEvent).
pub async fn read(st: &FhirState, id: &str) -> Result<Response, Failure> {
    st.audit
        .flush()
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let row = st
        .audit
        .get(id)
        .await
        .map_err(crate::data::repo::RepoError::from)?
        .ok_or(Failure::NotFound)?;
    if row.sealed.is_empty() {
        // Pruned after its retention period: it existed; its content is gone.
        return Err(Failure::Gone);
    }
    let v = st.audit.open_row(&row).map_err(|e| {
        tracing::error!(event = "audit.verification_failed", error = %e, "an audit record failed its integrity check");
        Failure::Internal("an audit record failed its integrity check".into())
    })?;
    Ok(fhir_json(StatusCode::OK, &v))
}

/// `GET /fhir/Patient/{id}/$access-log`.
pub async fn access_log(
    st: Arc<FhirState>,
    ctx: RequestCtx,
    id: String,
    raw: Option<String>,
) -> Response {
    let pid = ResourceId::parse(&id);
    let own = matches!(
        (ctx.principal(), &pid),
        (Principal::User { patient: Some(p), role, .. }, Some(pid))
            if p == pid.as_str() && role.name == "patient"
    );
    let auditor =
        decide(ctx.principal(), Interaction::SearchType, Some(AUDIT_TYPE)) == Decision::Allow;
    let work = || async {
        let Some(pid) = pid.clone() else {
            return Err(Failure::NotFound);
        };
        let mut params: Vec<(String, String)> = crate::rest::wire::Query::parse(raw)
            .0
            .into_iter()
            .filter(|(k, _)| matches!(k.as_str(), "date" | "_count" | "_cursor"))
            .collect();
        params.push(("patient".into(), pid.to_string()));
        let path = format!("Patient/{pid}/$access-log");
        let mut r = page(&st, &path, &params, !auditor).await?;
        r.extensions_mut().insert(AuditRefs {
            patients: vec![pid.to_string()],
            resources: vec![format!("Patient/{pid}")],
            ..Default::default()
        });
        Ok(r)
    };
    let (result, denied) = if own || auditor {
        (work().await, None)
    } else {
        (
            Err(Failure::Forbidden),
            Some("access-log: only the patient or an auditor"),
        )
    };
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    let refs = result
        .as_ref()
        .ok()
        .and_then(|r| r.extensions().get::<AuditRefs>().cloned())
        .unwrap_or_default();
    if let Err(e) = pipeline::record(&st, &ctx, "access-log", refs, status, denied).await {
        return e.into_response();
    }
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
