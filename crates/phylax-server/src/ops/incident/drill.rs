//! `phylax incident drill`: a scripted breach against the running
//! instance, timed end to end, so that incident response is practised,
//! not only written down.
//!
//! The scenario, over the real HTTPS API of a serving node:
//! 1. two drill clients are registered (an "attacker" that may only read
//!    Patients, and an administrator that creates and later deletes the
//!    drill's synthetic patients, tagged `drill`: no real record is read);
//! 2. the attacker reads one more drill patient than `[detect]
//!    scraping_patients`;
//! 3. the detector on the serving node raises `scraping`, which opens an
//!    incident (`[detect] incident_on`): **time to detect**;
//! 4. the incident is scoped from the verified audit log, which must name
//!    exactly the drill's patients: **time to scope**;
//! 5. the attacker is contained (disabled; no key is rotated by a drill)
//!    and the serving node refuses its token: **time to contain**;
//! 6. the drill patients are deleted, both clients disabled, the incident
//!    closed, and the result recorded (an audit event and the instance
//!    metadata `incident_drill_v1:…`, for the compliance report).

use super::{audited, contain, scope, ResponseError};
use crate::data::incidents::{IncidentError, Step};
use crate::state::AppState;
use phylax_audit::event::Action;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The meta key prefix drill results are recorded under.
pub const DRILL_META: &str = "incident_drill_v1:";

/// How long the drill waits for the detector or containment.
const PATIENCE: Duration = Duration::from_secs(60);

/// A drill's timeline and result.
#[derive(Debug, Clone, Serialize)]
pub struct DrillResult {
    pub ok: bool,
    pub incident: Option<String>,
    pub patients: usize,
    pub time_to_detect_secs: Option<f64>,
    pub time_to_scope_secs: Option<f64>,
    pub time_to_contain_secs: Option<f64>,
    /// (seconds from the start, what happened).
    pub timeline: Vec<(f64, String)>,
    pub started: String,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

fn fail(m: impl Into<String>) -> ResponseError {
    ResponseError::Register(IncidentError::Unavailable(m.into()))
}

/// A drill client: its id, its private key and a token.
struct DrillClient {
    id: String,
    token: String,
}

/// The running instance as the drill reaches it.
struct Api {
    http: reqwest::Client,
    base: String,
    token_url: String,
}

impl Api {
    async fn client(
        &self,
        st: &AppState,
        name: &str,
        scope: &str,
    ) -> Result<DrillClient, ResponseError> {
        let g = phylax_auth::client_key::generate().map_err(|e| fail(e.to_string()))?;
        let id = format!(
            "phylax-drill-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        st.clients
            .register(&phylax_store::ClientRecord {
                id: id.clone(),
                name: format!("incident drill ({name})"),
                scope: scope.into(),
                jwks: g.jwks.clone(),
                disabled: false,
                created_at: crate::base::clock::now_secs(),
                redirect_uris: vec![],
                public: false,
                first_party: false,
                cert_bound: false,
            })
            .await
            .map_err(|e| fail(format!("registering a drill client: {e}")))?;
        // The running nodes must see the new client before it asks for a
        // token (they read clients from the database on each request).
        let assertion = phylax_auth::client_key::sign_assertion(
            g.private_pem.expose(),
            None,
            &id,
            &self.token_url,
            crate::base::clock::now_secs(),
        )
        .map_err(|e| fail(e.to_string()))?;
        let r = self
            .http
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ])
            .send()
            .await
            .map_err(|e| fail(format!("the token endpoint: {e}")))?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or_default();
        let token = v["access_token"]
            .as_str()
            .filter(|_| status.is_success())
            .ok_or_else(|| fail(format!("no token for the drill client ({status})")))?
            .to_owned();
        Ok(DrillClient { id, token })
    }

    async fn send(
        &self,
        tok: &str,
        m: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<u16, ResponseError> {
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .bearer_auth(tok);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/fhir+json")
                .body(b.to_string());
        }
        let r = r
            .send()
            .await
            .map_err(|e| fail(format!("the FHIR API: {e}")))?;
        Ok(r.status().as_u16())
    }
}

/// Run the drill against the node at `public_url` (trusting `ca_pem`).
pub async fn drill(
    st: &AppState,
    public_url: &str,
    ca_pem: &[u8],
    by: &str,
) -> Result<DrillResult, ResponseError> {
    let det = &st.config.detect;
    if !det.enabled || !det.incident_on.iter().any(|r| r == "scraping") {
        return Err(IncidentError::Invalid(
            "a drill needs the detector on and `scraping` in [detect] incident_on".into(),
        )
        .into());
    }
    let ca = reqwest::Certificate::from_pem(ca_pem).map_err(|e| fail(e.to_string()))?;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let api = Api {
        http,
        base: format!("{public_url}/fhir"),
        token_url: format!("{public_url}/auth/token"),
    };
    let n = det.scraping_patients as usize + 1;
    let started = crate::base::clock::now_ms();
    let t0 = Instant::now();
    let mut r = DrillResult {
        ok: false,
        incident: None,
        patients: n,
        time_to_detect_secs: None,
        time_to_scope_secs: None,
        time_to_contain_secs: None,
        timeline: Vec::new(),
        started: crate::base::clock::format_instant(started),
        failure: None,
    };
    let mark =
        |r: &mut DrillResult, what: String| r.timeline.push((t0.elapsed().as_secs_f64(), what));
    let admin = api.client(st, "admin", "system/Patient.cruds").await?;
    let attacker = api.client(st, "attacker", "system/Patient.rs").await?;
    mark(
        &mut r,
        format!("drill clients {} and {} registered", admin.id, attacker.id),
    );
    let ids: Vec<String> = (0..n)
        .map(|_| format!("drill-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    let entries: Vec<Value> = ids
        .iter()
        .map(|id| json!({"resource": {"resourceType": "Patient", "id": id,
            "meta": {"tag": [{"system": "https://phylax.dev/fhir/CodeSystem/tag", "code": "drill"}]}},
            "request": {"method": "PUT", "url": format!("Patient/{id}")}}))
        .collect();
    let s = api
        .send(
            &admin.token,
            reqwest::Method::POST,
            "",
            Some(json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})),
        )
        .await?;
    if s != 200 {
        return Err(fail(format!("creating the drill patients: HTTP {s}")));
    }
    mark(&mut r, format!("{n} synthetic drill patients created"));
    let outcome = run(st, &api, &attacker, &ids, by, t0, &mut r).await;
    // Clean up whatever happened.
    let deletes: Vec<Value> = ids
        .iter()
        .map(|id| json!({"request": {"method": "DELETE", "url": format!("Patient/{id}")}}))
        .collect();
    let s = api
        .send(
            &admin.token,
            reqwest::Method::POST,
            "",
            Some(json!({"resourceType": "Bundle", "type": "transaction", "entry": deletes})),
        )
        .await
        .unwrap_or(0);
    for c in [&admin.id, &attacker.id] {
        let _ = st.clients.set_disabled(c, true).await;
    }
    mark(
        &mut r,
        format!("drill patients deleted (HTTP {s}); drill clients disabled"),
    );
    match outcome {
        Ok(()) => r.ok = true,
        Err(e) => r.failure = Some(e.to_string()),
    }
    record(st, &r, started).await?;
    Ok(r)
}

async fn run(
    st: &AppState,
    api: &Api,
    attacker: &DrillClient,
    ids: &[String],
    by: &str,
    t0: Instant,
    r: &mut DrillResult,
) -> Result<(), ResponseError> {
    let scrape = Instant::now();
    for id in ids {
        let s = api
            .send(
                &attacker.token,
                reqwest::Method::GET,
                &format!("/Patient/{id}"),
                None,
            )
            .await?;
        if s != 200 {
            return Err(fail(format!("the attacker's read was answered {s}")));
        }
    }
    r.timeline.push((
        t0.elapsed().as_secs_f64(),
        format!("attacker read {} patients", ids.len()),
    ));
    // Detection: an incident opened by the scraping alert naming the
    // attacker.
    let id = loop {
        let found = st.incidents.list().await?.into_iter().rev().find(|i| {
            i.is_open()
                && i.steps.iter().any(|(_, s)| {
                    matches!(s, Step::Alert { rule, detail, .. } if rule == "scraping" && detail.starts_with(&attacker.id))
                })
        });
        if let Some(i) = found {
            break i.id;
        }
        if scrape.elapsed() > PATIENCE {
            return Err(fail("the detector raised no scraping incident within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    r.time_to_detect_secs = Some(scrape.elapsed().as_secs_f64());
    r.incident = Some(id.to_string());
    r.timeline.push((
        t0.elapsed().as_secs_f64(),
        format!("detected: incident {id} opened by the scraping alert"),
    ));
    recorded(st, &attacker.id, ids.len(), scrape).await?;
    let s = super::scope(
        st,
        &id,
        &scope::Who::Client(attacker.id.clone()),
        scope::Window::default(),
        &[],
        by,
    )
    .await?;
    r.time_to_scope_secs = Some(scrape.elapsed().as_secs_f64());
    let exact = s.individuals == ids.len() && ids.iter().all(|p| s.patients.contains_key(p));
    r.timeline.push((
        t0.elapsed().as_secs_f64(),
        format!(
            "scoped: {} individuals, {} records{}",
            s.individuals,
            s.records,
            if exact {
                ""
            } else {
                " (NOT the drill's patients)"
            }
        ),
    ));
    if !exact {
        return Err(fail("the scope did not name exactly the drill's patients"));
    }
    let plan = contain::Plan {
        clients: vec![attacker.id.clone()],
        ..contain::Plan::default()
    };
    contain::contain(st, None, &id, &plan, by, &|_, _| {}).await?;
    // Contained when the serving node refuses the attacker.
    loop {
        let s = api
            .send(
                &attacker.token,
                reqwest::Method::GET,
                &format!("/Patient/{}", ids[0]),
                None,
            )
            .await?;
        if s == 401 || s == 403 {
            break;
        }
        if scrape.elapsed() > PATIENCE * 2 {
            return Err(fail(
                "the serving node still served the attacker 60 s after containment",
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.time_to_contain_secs = Some(scrape.elapsed().as_secs_f64());
    r.timeline.push((
        t0.elapsed().as_secs_f64(),
        "contained: the serving node refuses the attacker".into(),
    ));
    super::step(
        st,
        &id,
        Step::Closed {
            by: by.to_owned(),
            resolution: "incident drill".into(),
        },
    )
    .await?;
    Ok(())
}

/// Wait until the attacker's `n` reads are in the log: the serving node
/// records reads through its journal, indexed into the log moments later
/// (an officer would scope again; the drill's exact check waits).
async fn recorded(
    st: &AppState,
    attacker: &str,
    n: usize,
    since: Instant,
) -> Result<(), ResponseError> {
    loop {
        let held = st
            .audit
            .search(&phylax_store::AuditQuery {
                agent: Some(attacker.to_owned()),
                limit: n as u32 + 1,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(e.to_string()))?;
        if held.len() >= n {
            return Ok(());
        }
        if since.elapsed() > PATIENCE {
            return Err(fail(
                "the attacker's reads did not reach the audit log within 60 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Record the result: the instance metadata (for the compliance report)
/// and the audit log.
async fn record(st: &AppState, r: &DrillResult, started: i64) -> Result<(), ResponseError> {
    let v = serde_json::to_vec(r).map_err(|e| fail(e.to_string()))?;
    st.incidents
        .record_drill(&format!("{DRILL_META}{started:016}"), &v)
        .await?;
    audited(
        st,
        Action::Execute,
        format!(
            "incident drill {}: detect {} s, contain {} s",
            if r.ok { "passed" } else { "FAILED" },
            r.time_to_detect_secs
                .map_or("-".into(), |t| format!("{t:.1}")),
            r.time_to_contain_secs
                .map_or("-".into(), |t| format!("{t:.1}"))
        ),
    )
    .await
}
