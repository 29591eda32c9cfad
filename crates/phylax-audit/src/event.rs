//! FHIR R4 AuditEvents after IHE Basic Audit Log Patterns (BALP).
//!
//! An [`AuditFacts`] holds only what an audit record may hold: codes, ids,
//! references, an IP address and a request id. There is no field for a
//! resource body, a search value or a free-text message from the client, so
//! PHI cannot reach the log through this type (search records name the
//! parameters used, never their values; a name typed into a search would
//! otherwise sit in the log for six years).
//!
//! Codes: RESTful activity uses type `rest` (audit-event-type) with the
//! `restful-interaction` subtype, as BALP's RESTful patterns do; sign-in and
//! sign-out use DICOM `110114 User Authentication` with `110122 Login` /
//! `110123 Logout`; other security events use DICOM `110113 Security Alert`
//! with a Phylax subtype from [`PHYLAX_SUBTYPES`] (BALP leaves these to the
//! implementer). Agents use DICOM `110153 Source Role ID` for the app and
//! `humanuser` (extra-security-role-type) for the person.

use serde_json::{json, Map, Value};
use std::net::IpAddr;

pub const REST_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
pub const REST_SUBTYPE: &str = "http://hl7.org/fhir/restful-interaction";
pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// Phylax's code system for security subtypes BALP does not define.
pub const PHYLAX_SUBTYPES: &str = "https://phylax.dev/fhir/CodeSystem/audit-subtype";
/// Phylax role names (docs/ACCESS_CONTROL.md).
pub const PHYLAX_ROLES: &str = "https://phylax.dev/fhir/CodeSystem/role";
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// What kind of event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A FHIR REST interaction; the code is from `restful-interaction`
    /// (`read`, `vread`, `search-type`, `create`, `transaction`…) or
    /// `operation` for `$`-operations.
    Rest(&'static str),
    /// Sign-in attempt (success or failure by outcome).
    Login,
    Logout,
    /// Any other security-relevant event (Phylax subtype code: `mfa`,
    /// `token`, `user`, `client`, `key`, `config`, `alert`…).
    Security(&'static str),
}

impl EventKind {
    fn type_coding(&self) -> Value {
        match self {
            EventKind::Rest(_) => {
                json!({"system": REST_TYPE, "code": "rest", "display": "Restful Operation"})
            }
            EventKind::Login | EventKind::Logout => {
                json!({"system": DCM, "code": "110114", "display": "User Authentication"})
            }
            EventKind::Security(_) => {
                json!({"system": DCM, "code": "110113", "display": "Security Alert"})
            }
        }
    }

    fn subtype_coding(&self) -> Value {
        match self {
            EventKind::Rest(code) => json!({"system": REST_SUBTYPE, "code": code}),
            EventKind::Login => json!({"system": DCM, "code": "110122", "display": "Login"}),
            EventKind::Logout => json!({"system": DCM, "code": "110123", "display": "Logout"}),
            EventKind::Security(code) => json!({"system": PHYLAX_SUBTYPES, "code": code}),
        }
    }

    /// The subtype code, for the log's search columns.
    pub fn subtype(&self) -> &'static str {
        match self {
            EventKind::Rest(c) | EventKind::Security(c) => c,
            EventKind::Login => "login",
            EventKind::Logout => "logout",
        }
    }
}

/// AuditEvent.action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "C" => Action::Create,
            "R" => Action::Read,
            "U" => Action::Update,
            "D" => Action::Delete,
            "E" => Action::Execute,
            _ => return None,
        })
    }

    /// The BALP action for a REST interaction code.
    pub fn for_rest(code: &str) -> Action {
        match code {
            "create" => Action::Create,
            "update" | "patch" => Action::Update,
            "delete" => Action::Delete,
            "transaction" | "batch" | "operation" => Action::Execute,
            _ => Action::Read,
        }
    }
}

/// AuditEvent.outcome: 0 success, 4 minor failure (the request was refused
/// or invalid), 8 serious failure (the server failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    MinorFailure,
    SeriousFailure,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
        }
    }

    pub fn from_status(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }
}

/// The person behind a request, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub id: String,
    pub role: String,
}

/// Everything an audit record says. References only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFacts {
    /// The AuditEvent id (a random UUID).
    pub id: String,
    pub recorded_ms: i64,
    pub kind: EventKind,
    pub action: Action,
    pub outcome: Outcome,
    /// A fixed, server-written explanation (`HTTP 403; denied by scope`).
    pub outcome_desc: Option<String>,
    pub user: Option<UserRef>,
    /// The app (OAuth client) that acted or was acted through.
    pub client: Option<String>,
    pub ip: Option<IpAddr>,
    /// The access token's id (`jti`), to tie events of one session together.
    pub token_id: Option<String>,
    pub request_id: String,
    /// v3-ActReason code (`TREAT`, `ETREAT` for break-the-glass, `HOPERAT`…).
    pub purpose: Option<&'static str>,
    /// Patient ids the event concerns (read, written or returned).
    pub patients: Vec<String>,
    /// Other resources concerned, as `Type/id`.
    pub resources: Vec<String>,
    /// For searches: the parameter names used (never their values).
    /// (Network address type 2 is "IP address" for IPv4 and IPv6 alike.)
    pub query_params: Vec<String>,
    /// The server that recorded it (the log's origin).
    pub observer: String,
}

impl AuditFacts {
    /// `user:{id}` for a person, else the client id, else `anonymous`:
    /// the value the log is searched by.
    pub fn agent_key(&self) -> String {
        match (&self.user, &self.client) {
            (Some(u), _) => format!("user:{}", u.id),
            (None, Some(c)) => c.clone(),
            (None, None) => "anonymous".to_owned(),
        }
    }

    /// The AuditEvent resource.
    pub fn to_resource(&self) -> Value {
        let mut agents = Vec::new();
        if let Some(u) = &self.user {
            let mut a = json!({
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": "humanuser", "display": "human user"}]},
                "role": [{"coding": [{"system": PHYLAX_ROLES, "code": u.role}]}],
                "who": {"identifier": {"system": "urn:phylax:user", "value": u.id}},
                "requestor": true,
            });
            if let Some(p) = self.purpose {
                a["purposeOfUse"] = json!([{"coding": [{"system": ACT_REASON, "code": p}]}]);
            }
            agents.push(a);
        }
        if let Some(c) = &self.client {
            let mut a = json!({
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {"identifier": {"system": "urn:phylax:client", "value": c}},
                "requestor": self.user.is_none(),
            });
            if let Some(ip) = self.ip {
                a["network"] = json!({"address": ip.to_string(), "type": "2"});
            }
            agents.push(a);
        } else if let Some(ip) = self.ip {
            // No app (a sign-in page): the network address goes on the
            // person, or on an anonymous agent.
            match agents.first_mut() {
                Some(a) => a["network"] = json!({"address": ip.to_string(), "type": "2"}),
                None => agents.push(json!({
                    "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                    "who": {"display": "anonymous"},
                    "requestor": true,
                    "network": {"address": ip.to_string(), "type": "2"},
                })),
            }
        }
        if let Some(tok) = &self.token_id {
            if let Some(a) = agents.first_mut() {
                a["altId"] = json!(tok);
            }
        }
        let mut entities = Vec::new();
        for p in &self.patients {
            entities.push(json!({
                "what": {"reference": format!("Patient/{p}")},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
            }));
        }
        for r in &self.resources {
            entities.push(json!({
                "what": {"reference": r},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"},
            }));
        }
        if !self.query_params.is_empty() {
            entities.push(json!({
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
                "description": format!("parameters: {}", self.query_params.join(",")),
            }));
        }
        entities.push(json!({
            "what": {"identifier": {"system": "urn:phylax:request", "value": self.request_id}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4", "display": "Other"},
            "description": "request id",
        }));
        let mut m = Map::new();
        m.insert("resourceType".into(), json!("AuditEvent"));
        m.insert("id".into(), json!(self.id));
        m.insert(
            "meta".into(),
            json!({"profile": [balp_profile(&self.kind, self.action, !self.patients.is_empty())]}),
        );
        m.insert("type".into(), self.kind.type_coding());
        m.insert("subtype".into(), json!([self.kind.subtype_coding()]));
        m.insert("action".into(), json!(self.action.code()));
        m.insert("recorded".into(), json!(instant(self.recorded_ms)));
        m.insert("outcome".into(), json!(self.outcome.code()));
        if let Some(d) = &self.outcome_desc {
            m.insert("outcomeDesc".into(), json!(d));
        }
        if let Some(p) = self.purpose {
            m.insert(
                "purposeOfEvent".into(),
                json!([{"coding": [{"system": ACT_REASON, "code": p}]}]),
            );
        }
        m.insert("agent".into(), Value::Array(agents));
        m.insert(
            "source".into(),
            json!({
                "observer": {"display": self.observer},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
            }),
        );
        m.insert("entity".into(), Value::Array(entities));
        Value::Object(m)
    }
}

/// The BALP profile the event follows.
fn balp_profile(kind: &EventKind, action: Action, patient: bool) -> String {
    let base = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/";
    let name = match (kind, action, patient) {
        (EventKind::Login, _, _) => "IHE.BasicAudit.Login",
        (EventKind::Logout, _, _) => "IHE.BasicAudit.Logout",
        (EventKind::Security(_), _, _) => "IHE.BasicAudit.SecurityAlert",
        (EventKind::Rest(c), _, true) if c.starts_with("search") => "IHE.BasicAudit.PatientQuery",
        (EventKind::Rest(c), _, false) if c.starts_with("search") => "IHE.BasicAudit.Query",
        (EventKind::Rest(_), Action::Create, true) => "IHE.BasicAudit.PatientCreate",
        (EventKind::Rest(_), Action::Create, false) => "IHE.BasicAudit.Create",
        (EventKind::Rest(_), Action::Update, true) => "IHE.BasicAudit.PatientUpdate",
        (EventKind::Rest(_), Action::Update, false) => "IHE.BasicAudit.Update",
        (EventKind::Rest(_), Action::Delete, true) => "IHE.BasicAudit.PatientDelete",
        (EventKind::Rest(_), Action::Delete, false) => "IHE.BasicAudit.Delete",
        (EventKind::Rest(_), Action::Read, true) => "IHE.BasicAudit.PatientRead",
        (EventKind::Rest(_), _, _) => "IHE.BasicAudit.Read",
    };
    format!("{base}{name}")
}

/// RFC 3339 UTC with milliseconds, from ms since the epoch (civil-from-days,
/// so this crate needs no date library).
pub fn instant(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants() {
        assert_eq!(instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(1_764_322_222_123), "2025-11-28T09:30:22.123Z");
        assert_eq!(instant(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_patient_read_has_the_balp_shape() {
        let f = AuditFacts {
            id: "a1".into(),
            recorded_ms: 0,
            kind: EventKind::Rest("read"),
            action: Action::Read,
            outcome: Outcome::Success,
            outcome_desc: None,
            user: Some(UserRef {
                id: "u1".into(),
                role: "clinician".into(),
            }),
            client: Some("app".into()),
            ip: "10.0.0.1".parse().ok(),
            token_id: Some("t1".into()),
            request_id: "r1".into(),
            purpose: Some("TREAT"),
            patients: vec!["p1".into()],
            resources: vec!["Observation/o1".into()],
            query_params: vec![],
            observer: "phylax/test".into(),
        };
        let v = f.to_resource();
        assert_eq!(v["type"]["code"], "rest");
        assert_eq!(v["subtype"][0]["code"], "read");
        assert_eq!(v["action"], "R");
        assert_eq!(v["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(v["agent"][0]["who"]["identifier"]["value"], "u1");
        assert_eq!(v["agent"][1]["network"]["address"], "10.0.0.1");
        assert!(v["meta"]["profile"][0]
            .as_str()
            .is_some_and(|p| p.ends_with("PatientRead")));
        assert_eq!(f.agent_key(), "user:u1");
    }
}
