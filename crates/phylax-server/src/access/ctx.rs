//! Who is calling and what a response touched: the request context the
//! authentication middleware attaches, and the audit facts built from it.

use crate::data::repo::ResourceVersion;
use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome, UserRef};
use phylax_auth::policy::Principal;
use phylax_fhir::{compartment, ResourceType};
use serde_json::Value;
use std::net::IpAddr;

/// Who is calling, attached by the authentication middleware. Only the
/// access layer makes one ([`crate::access::reach::establish`]), so the
/// access a context carries is always the one computed for its principal:
/// handlers read it and cannot widen it.
///
/// ```compile_fail,E0451
/// use phylax_server::access::ctx::RequestCtx;
/// fn widen(ctx: &RequestCtx) -> RequestCtx {
///     RequestCtx {
///         access: std::sync::Arc::new(phylax_auth::policy::Access::unrestricted()),
///         ..ctx.clone()
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub(in crate::access) request_id: String,
    pub(in crate::access) principal: Principal,
    pub(in crate::access) peer: Option<IpAddr>,
    /// The grant family of the token (a user's sign-in session), for the
    /// audit record.
    pub(in crate::access) token_family: Option<String>,
    /// Which patients' data this request reaches (computed once, by the
    /// authentication middleware; see [`crate::access::reach`]).
    pub(in crate::access) access: std::sync::Arc<phylax_auth::policy::Access>,
}

impl RequestCtx {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn peer(&self) -> Option<IpAddr> {
        self.peer
    }

    /// Which patients' data this request reaches.
    pub fn access(&self) -> &phylax_auth::policy::Access {
        &self.access
    }
}

/// What a response tells the pipeline about the data it carries, so the
/// audit record names the patients and resources concerned. Handlers
/// attach it as a response extension (computed from the full resources,
/// before `_elements`/`_summary` trimmed them).
#[derive(Debug, Clone, Default)]
pub struct AuditRefs {
    pub patients: Vec<String>,
    /// `Type/id`; kept for single-resource interactions only (a search's
    /// record lists the patients whose data was returned), so at most two
    /// are collected: two means "more than one".
    pub resources: Vec<String>,
    /// Search parameter names (never values).
    pub params: Vec<String>,
    /// The resource type a search searched.
    pub query_type: Option<String>,
}

impl AuditRefs {
    /// Add one returned or written resource, and every patient it names:
    /// through its compartment, or anywhere else in the body (a Binary's
    /// `securityContext`, a DocumentReference's `sourcePatientInfo`).
    pub fn add(&mut self, rtype: &ResourceType, id: &str, body: Option<&Value>) {
        let named = body.map(|b| patients_in(rtype, b)).unwrap_or_default();
        self.add_known(rtype, id, named.first().cloned());
        for p in named.into_iter().skip(1) {
            self.add_patient(p);
        }
    }

    /// Like [`AuditRefs::add`], with the compartment's patient already known.
    fn add_known(&mut self, rtype: &ResourceType, id: &str, patient: Option<String>) {
        let patient = patient.or_else(|| (rtype.as_str() == "Patient").then(|| id.to_owned()));
        if let Some(p) = patient {
            self.add_patient(p);
        }
        if self.resources.len() < 2 {
            self.resources.push(format!("{rtype}/{id}"));
        }
    }

    fn add_patient(&mut self, p: String) {
        if !self.patients.contains(&p) {
            self.patients.push(p);
        }
    }

    /// Every patient the returned versions name. The key scope gives the
    /// first without a parse; a body whose text holds more patient
    /// references than that (a Group, a CareTeam, an Observation with a
    /// patient performer, a linked Patient) is read for all of them.
    pub fn of_versions<'a>(vs: impl IntoIterator<Item = &'a ResourceVersion>) -> AuditRefs {
        let mut r = AuditRefs::default();
        for v in vs {
            r.add_known(&v.rtype, v.id.as_str(), v.patient.clone());
            let Some(b) = &v.body else { continue };
            let known = usize::from(v.patient.is_some() && v.rtype.as_str() != "Patient");
            if b.at_most("\"Patient/") > known {
                for p in patients_in(&v.rtype, b.json()) {
                    r.add_patient(p);
                }
            }
        }
        r
    }
}

/// The patients a body names: its compartment's first (the patient a
/// `Patient` is, or its subject), then every other patient reference in
/// it.
fn patients_in(rtype: &ResourceType, b: &Value) -> Vec<String> {
    let mut out = compartment::patients_of(rtype, b);
    for p in compartment::patients_named(b) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The facts of an audit record for a request, before outcome and refs.
pub fn facts(
    observer: &str,
    ctx: &RequestCtx,
    interaction: &'static str,
    status: u16,
    denied_by: Option<&'static str>,
) -> AuditFacts {
    let (user, client) = match &ctx.principal {
        Principal::Client { client_id, .. } => (None, Some(client_id.clone())),
        Principal::User {
            user_id,
            role,
            client_id,
            ..
        } => (
            Some(UserRef {
                id: user_id.clone(),
                role: role.name.clone(),
            }),
            Some(client_id.clone()),
        ),
    };
    let code = match interaction {
        "update-create" => "update",
        "operation-everything" | "access-log" => "operation",
        other => other,
    };
    let outcome_desc = match denied_by {
        Some(rule) => Some(format!("HTTP {status}; denied by {rule}")),
        None if status >= 400 => Some(format!("HTTP {status}")),
        None => None,
    };
    AuditFacts {
        id: crate::audit::log::new_event_id(),
        recorded_ms: crate::base::clock::now_ms(),
        kind: EventKind::Rest(code),
        action: Action::for_rest(code),
        outcome: Outcome::from_status(status),
        outcome_desc,
        user,
        client,
        ip: ctx.peer,
        token_id: Some(ctx.principal.token_id().to_owned()),
        request_id: ctx.request_id.clone(),
        // The role's purpose of use (break-the-glass accesses say `BTG`).
        purpose: Some(ctx.access.purpose),
        patients: Vec::new(),
        resources: Vec::new(),
        query_params: Vec::new(),
        query_type: None,
        token_family: ctx.token_family.clone(),
        observer: observer.to_owned(),
    }
}

/// An access to a patient reached through break-the-glass carries the
/// purpose of use `BTG` (v3 ActReason), so it stands out in the log and in
/// the patient's access log.
pub fn mark_emergency(ctx: &RequestCtx, f: &mut AuditFacts) {
    if f.patients.iter().any(|p| ctx.access.emergency.contains(p)) {
        f.purpose = Some("BTG");
    }
}
