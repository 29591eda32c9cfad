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

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::LazyLock;

pub const REST_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
pub const REST_SUBTYPE: &str = "http://hl7.org/fhir/restful-interaction";
pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// Phylax's code system for security subtypes BALP does not define.
pub const PHYLAX_SUBTYPES: &str = "https://phylax.dev/fhir/CodeSystem/audit-subtype";
/// Phylax role names (docs/ACCESS_CONTROL.md).
pub const PHYLAX_ROLES: &str = "https://phylax.dev/fhir/CodeSystem/role";
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// The prefix of an agent `policy` naming the token's grant family.
pub const GRANT_FAMILY: &str = "urn:phylax:grant-family:";

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
    fn type_coding(&self) -> Coding<'static> {
        match self {
            EventKind::Rest(_) => Coding::new(REST_TYPE, "rest", Some("Restful Operation")),
            EventKind::Login | EventKind::Logout => {
                Coding::new(DCM, "110114", Some("User Authentication"))
            }
            EventKind::Security(_) => Coding::new(DCM, "110113", Some("Security Alert")),
        }
    }

    fn subtype_coding(&self) -> Coding<'static> {
        match self {
            EventKind::Rest(code) => Coding::new(REST_SUBTYPE, code, None),
            EventKind::Login => Coding::new(DCM, "110122", Some("Login")),
            EventKind::Logout => Coding::new(DCM, "110123", Some("Logout")),
            EventKind::Security(code) => Coding::new(PHYLAX_SUBTYPES, code, None),
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
    /// The grant family (sign-in session and its refresh chain) the token
    /// came from: what `phylax incident scope --token-family` follows.
    /// Written as the requestor's `policy` (`urn:phylax:grant-family:…`).
    pub token_family: Option<String>,
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
    /// For searches: the resource type searched (the query entity's
    /// `name`), so a breach's scope can count searches per type.
    pub query_type: Option<String>,
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

    /// The AuditEvent resource as a JSON tree (for showing it; the log
    /// stores [`AuditFacts::to_json`]'s bytes).
    pub fn to_resource(&self) -> Value {
        // Serialising these borrowed structs cannot fail: every map key is
        // a field name and every value a string, bool or nested struct.
        serde_json::to_value(self.event()).unwrap_or(Value::Null)
    }

    /// The AuditEvent resource's JSON bytes, as the log seals and hashes
    /// them: compact, keys in byte order (the order a `serde_json` map
    /// gives them, so records keep the shape earlier versions wrote).
    /// Written straight from borrowed fields: a search that returned fifty
    /// patients used to build and drop a tree of about a thousand small
    /// allocations first.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.event())
    }

    /// The record, field by field, in the order its JSON keys sort.
    fn event(&self) -> Event<'_> {
        let ip = self.ip.map(|ip| Network {
            address: ip.to_string(),
            kind: "2",
        });
        let purpose = self
            .purpose
            .map(|p| [Concept::of(Coding::new(ACT_REASON, p, None))]);
        let mut agents = Vec::with_capacity(2);
        if let Some(u) = &self.user {
            agents.push(Agent {
                alt_id: None,
                network: None,
                policy: None,
                purpose_of_use: purpose,
                requestor: true,
                role: Some([Concept::of(Coding::new(PHYLAX_ROLES, &u.role, None))]),
                kind: Concept::of(Coding::new(
                    "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "humanuser",
                    Some("human user"),
                )),
                who: Who::Identifier {
                    identifier: Identifier {
                        system: "urn:phylax:user",
                        value: &u.id,
                    },
                },
            });
        }
        let source_role = || Concept::of(Coding::new(DCM, "110153", Some("Source Role ID")));
        if let Some(c) = &self.client {
            agents.push(Agent {
                alt_id: None,
                network: ip,
                policy: None,
                purpose_of_use: None,
                requestor: self.user.is_none(),
                role: None,
                kind: source_role(),
                who: Who::Identifier {
                    identifier: Identifier {
                        system: "urn:phylax:client",
                        value: c,
                    },
                },
            });
        } else if let Some(ip) = ip {
            // No app (a sign-in page): the network address goes on the
            // person, or on an anonymous agent.
            match agents.first_mut() {
                Some(a) => a.network = Some(ip),
                None => agents.push(Agent {
                    alt_id: None,
                    network: Some(ip),
                    policy: None,
                    purpose_of_use: None,
                    requestor: true,
                    role: None,
                    kind: source_role(),
                    who: Who::Display {
                        display: "anonymous",
                    },
                }),
            }
        }
        if let (Some(tok), Some(a)) = (&self.token_id, agents.first_mut()) {
            a.alt_id = Some(tok);
        }
        if let (Some(fam), Some(a)) = (&self.token_family, agents.first_mut()) {
            a.policy = Some([format!("{GRANT_FAMILY}{fam}")]);
        }
        let mut entity = Vec::with_capacity(self.patients.len() + self.resources.len() + 2);
        for p in &self.patients {
            entity.push(Entity {
                description: None,
                name: None,
                role: Some(Code::Written(&PATIENT_ROLE)),
                kind: Code::Written(&PATIENT_TYPE),
                what: Some(What::Reference {
                    reference: Reference::Patient(p),
                }),
            });
        }
        for r in &self.resources {
            entity.push(Entity {
                description: None,
                name: None,
                role: Some(Code::Of(Coding::new(
                    OBJECT_ROLE,
                    "4",
                    Some("Domain Resource"),
                ))),
                kind: Code::Of(Coding::new(ENTITY_TYPE, "2", Some("System Object"))),
                what: Some(What::Reference {
                    reference: Reference::Literal(r),
                }),
            });
        }
        if !self.query_params.is_empty() || self.query_type.is_some() {
            entity.push(Entity {
                description: (!self.query_params.is_empty())
                    .then_some(Description::Params(&self.query_params)),
                name: self.query_type.as_deref(),
                role: Some(Code::Of(Coding::new(OBJECT_ROLE, "24", Some("Query")))),
                kind: Code::Of(Coding::new(ENTITY_TYPE, "2", Some("System Object"))),
                what: None,
            });
        }
        entity.push(Entity {
            description: Some(Description::Text("request id")),
            name: None,
            role: None,
            kind: Code::Of(Coding::new(ENTITY_TYPE, "4", Some("Other"))),
            what: Some(What::Identifier {
                identifier: Identifier {
                    system: "urn:phylax:request",
                    value: &self.request_id,
                },
            }),
        });
        Event {
            action: self.action.code(),
            agent: agents,
            entity,
            id: &self.id,
            meta: Meta {
                profile: [Profile(balp_profile(
                    &self.kind,
                    self.action,
                    !self.patients.is_empty(),
                ))],
            },
            outcome: self.outcome.code(),
            outcome_desc: self.outcome_desc.as_deref(),
            purpose_of_event: purpose,
            recorded: instant(self.recorded_ms),
            resource_type: "AuditEvent",
            source: Source {
                observer: Display {
                    display: &self.observer,
                },
                kind: [Coding::new(
                    "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "4",
                    Some("Application Server"),
                )],
            },
            subtype: [self.kind.subtype_coding()],
            kind: self.kind.type_coding(),
        }
    }
}

const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";

// The AuditEvent's JSON, borrowed from the facts. Each struct declares its
// fields in the byte order of their JSON names (`altId` < `network` <
// `purposeOfUse`…), because serde writes them in declaration order and the
// records have always had sorted keys (`to_json_has_sorted_keys` checks).

#[derive(Serialize)]
struct Event<'a> {
    action: &'static str,
    agent: Vec<Agent<'a>>,
    entity: Vec<Entity<'a>>,
    id: &'a str,
    meta: Meta,
    outcome: &'static str,
    #[serde(rename = "outcomeDesc", skip_serializing_if = "Option::is_none")]
    outcome_desc: Option<&'a str>,
    #[serde(rename = "purposeOfEvent", skip_serializing_if = "Option::is_none")]
    purpose_of_event: Option<[Concept<'a>; 1]>,
    recorded: String,
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    source: Source<'a>,
    subtype: [Coding<'a>; 1],
    #[serde(rename = "type")]
    kind: Coding<'a>,
}

#[derive(Serialize, Clone, Copy)]
struct Coding<'a> {
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
    system: &'a str,
}

impl<'a> Coding<'a> {
    fn new(system: &'a str, code: &'a str, display: Option<&'a str>) -> Coding<'a> {
        Coding {
            code,
            display,
            system,
        }
    }
}

/// A coding to write, or one written once already: a search's record
/// names up to a page of patients, each with the same two codings, and
/// escaping their six strings again for every patient was a visible part
/// of drafting the record. The bytes are the same either way
/// (`to_json_writes_what_earlier_versions_wrote`).
#[derive(Serialize)]
#[serde(untagged)]
enum Code<'a> {
    Of(Coding<'a>),
    Written(&'static RawValue),
}

/// A coding's JSON, written once.
fn written(c: Coding<'static>) -> Box<RawValue> {
    // Invariant: a coding of static strings always serialises, and
    // serde_json's own output is valid JSON for `from_string`.
    RawValue::from_string(serde_json::to_string(&c).expect("a coding serialises"))
        .expect("serde_json output is JSON")
}

static PATIENT_ROLE: LazyLock<Box<RawValue>> =
    LazyLock::new(|| written(Coding::new(OBJECT_ROLE, "1", Some("Patient"))));
static PATIENT_TYPE: LazyLock<Box<RawValue>> =
    LazyLock::new(|| written(Coding::new(ENTITY_TYPE, "1", Some("Person"))));

#[derive(Serialize, Clone, Copy)]
struct Concept<'a> {
    coding: [Coding<'a>; 1],
}

impl<'a> Concept<'a> {
    fn of(c: Coding<'a>) -> Concept<'a> {
        Concept { coding: [c] }
    }
}

#[derive(Serialize)]
struct Identifier<'a> {
    system: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct Display<'a> {
    display: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Who<'a> {
    Display { display: &'a str },
    Identifier { identifier: Identifier<'a> },
}

#[derive(Serialize)]
struct Network {
    address: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Agent<'a> {
    #[serde(rename = "altId", skip_serializing_if = "Option::is_none")]
    alt_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<[String; 1]>,
    #[serde(rename = "purposeOfUse", skip_serializing_if = "Option::is_none")]
    purpose_of_use: Option<[Concept<'a>; 1]>,
    requestor: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<[Concept<'a>; 1]>,
    #[serde(rename = "type")]
    kind: Concept<'a>,
    who: Who<'a>,
}

#[derive(Serialize)]
struct Entity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<Description<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Code<'a>>,
    #[serde(rename = "type")]
    kind: Code<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    what: Option<What<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum What<'a> {
    Identifier { identifier: Identifier<'a> },
    Reference { reference: Reference<'a> },
}

/// `Patient/{id}`, or a reference as given, written without building it.
enum Reference<'a> {
    Patient(&'a str),
    Literal(&'a str),
}

impl Serialize for Reference<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reference::Patient(p) => s.collect_str(&format_args!("Patient/{p}")),
            Reference::Literal(r) => s.serialize_str(r),
        }
    }
}

/// A fixed description, or the search's parameter names.
enum Description<'a> {
    Text(&'static str),
    Params(&'a [String]),
}

impl Serialize for Description<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Description::Text(t) => s.serialize_str(t),
            Description::Params(ps) => s.collect_str(&format_args!("parameters: {}", Joined(ps))),
        }
    }
}

/// Comma-joined, for `collect_str`.
struct Joined<'a>(&'a [String]);

impl std::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Meta {
    profile: [Profile; 1],
}

/// A BALP profile's canonical URL, from its name.
struct Profile(&'static str);

impl Serialize for Profile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/{}",
            self.0
        ))
    }
}

#[derive(Serialize)]
struct Source<'a> {
    observer: Display<'a>,
    #[serde(rename = "type")]
    kind: [Coding<'a>; 1],
}

/// The name of the BALP profile the event follows.
fn balp_profile(kind: &EventKind, action: Action, patient: bool) -> &'static str {
    match (kind, action, patient) {
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
    }
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
        // A person reading through an app (the first of `variants`).
        let f = variants().swap_remove(0);
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

    /// One record of each shape: a person through an app with a token and
    /// purpose, a client's search (IPv6, a quote in an id), a refused
    /// anonymous sign-in with a non-ASCII description, a sign-out, an alert
    /// with no agent at all, a create without an address, a delete by a
    /// client.
    fn variants() -> Vec<AuditFacts> {
        let base = AuditFacts {
            id: "a1".into(),
            recorded_ms: 1_764_322_222_123,
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
            query_type: None,
            token_family: None,
            observer: "phylax/test".into(),
        };
        let mut v = vec![base.clone()];
        v.push(AuditFacts {
            kind: EventKind::Rest("search-type"),
            action: Action::Read,
            user: None,
            token_id: None,
            purpose: None,
            patients: vec!["p1".into(), "p\"2".into()],
            resources: vec!["Patient/p1".into(), "Patient/p\"2".into()],
            query_params: vec!["family".into(), "_count".into()],
            query_type: None,
            token_family: None,
            ip: "::1".parse().ok(),
            ..base.clone()
        });
        v.push(AuditFacts {
            kind: EventKind::Login,
            action: Action::Execute,
            outcome: Outcome::MinorFailure,
            outcome_desc: Some("HTTP 401; bad \u{e9} password".into()),
            user: None,
            client: None,
            token_id: Some("t2".into()),
            purpose: None,
            patients: vec![],
            resources: vec![],
            ..base.clone()
        });
        v.push(AuditFacts {
            kind: EventKind::Logout,
            action: Action::Execute,
            client: None,
            purpose: Some("ETREAT"),
            patients: vec![],
            resources: vec![],
            ..base.clone()
        });
        v.push(AuditFacts {
            kind: EventKind::Security("alert"),
            action: Action::Execute,
            outcome: Outcome::SeriousFailure,
            user: None,
            client: None,
            ip: None,
            token_id: Some("t3".into()),
            purpose: None,
            patients: vec![],
            resources: vec!["Binary/b".into()],
            ..base.clone()
        });
        v.push(AuditFacts {
            kind: EventKind::Rest("create"),
            action: Action::Create,
            ip: None,
            patients: vec!["p9".into()],
            resources: vec![],
            ..base.clone()
        });
        v.push(AuditFacts {
            kind: EventKind::Rest("delete"),
            action: Action::Delete,
            user: None,
            ip: None,
            patients: vec![],
            resources: vec!["Organization/x".into()],
            ..base.clone()
        });
        v
    }
    /// The bytes written since records are serialised without a tree are
    /// those the tree gave (`testdata/audit_events.jsonl` was written by the
    /// earlier code): the same shape for every kind of record, keys sorted.
    #[test]
    fn to_json_writes_what_earlier_versions_wrote() {
        let golden: Vec<&str> = include_str!("../testdata/audit_events.jsonl")
            .lines()
            .collect();
        let vs = variants();
        assert_eq!(golden.len(), vs.len());
        for (f, want) in vs.iter().zip(golden) {
            let got = f.to_json().unwrap();
            assert_eq!(std::str::from_utf8(&got).unwrap(), want);
            // The tree shown to auditors is the same record.
            assert_eq!(
                f.to_resource(),
                serde_json::from_str::<Value>(want).unwrap()
            );
        }
    }

    /// Keys in byte order at every level, as a `serde_json` map writes
    /// them, for a record with every optional part present.
    #[test]
    fn to_json_has_sorted_keys() {
        for f in variants() {
            let got = f.to_json().unwrap();
            let tree: Value = serde_json::from_slice(&got).unwrap();
            assert_eq!(serde_json::to_vec(&tree).unwrap(), got);
        }
    }
}
