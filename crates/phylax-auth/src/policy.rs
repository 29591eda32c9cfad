//! The single authorization decision. Every FHIR interaction is described as
//! an [`Interaction`] on an optional resource type and decided here, so later
//! rules (roles, compartments, consent, labels, break-the-glass) extend one
//! function instead of every handler. Deny by default.

use crate::scopes::{Context, Perm, ScopeSet};
use serde_json::Value;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A SMART Backend Services client acting for itself (`system/` scopes).
    Client {
        client_id: String,
        scopes: ScopeSet,
        /// The access token's `jti`, for audit correlation.
        token_id: String,
    },
    /// A signed-in user acting through an app (`user/` or `patient/`
    /// scopes).
    User {
        user_id: String,
        /// The user's role as defined now (looked up when the token is
        /// checked, so a changed definition applies at once).
        role: std::sync::Arc<crate::roles::RoleDef>,
        client_id: String,
        scopes: ScopeSet,
        /// The launch-context patient for `patient/` scopes.
        patient: Option<String>,
        token_id: String,
        /// When the user last completed a second factor (the token's
        /// `auth_time` when its `acr` says MFA), for step-up decisions
        /// such as break-the-glass.
        mfa_at: Option<i64>,
    },
}

impl Principal {
    pub fn id(&self) -> &str {
        match self {
            Principal::Client { client_id, .. } => client_id,
            Principal::User { user_id, .. } => user_id,
        }
    }

    /// The access token's id.
    pub fn token_id(&self) -> &str {
        match self {
            Principal::Client { token_id, .. } | Principal::User { token_id, .. } => token_id,
        }
    }
}

/// A FHIR interaction, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    VRead,
    Create,
    Update,
    /// PUT to an id that does not exist yet (needs create and update).
    UpdateCreate,
    Delete,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    SearchType,
    /// `Patient/{id}/$everything`: the patient's read; each compartment type
    /// is then filtered by its own search permission.
    PatientEverything,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::VRead => "vread",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::UpdateCreate => "update-create",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::PatientEverything => "operation-everything",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the rule that denied (for logs and audit, not clients).
    Deny(&'static str),
}

/// Decide whether `who` may perform `what` on `rtype` (None for system-level).
pub fn decide(who: &Principal, what: Interaction, rtype: Option<&str>) -> Decision {
    decide_instance(who, what, rtype, None)
}

/// A workforce user: the token's `user/` scopes **and** the role's grants
/// must both allow every permission the interaction needs.
fn decide_user(
    scopes: &ScopeSet,
    role: &crate::roles::RoleDef,
    what: Interaction,
    rtype: Option<&str>,
) -> Decision {
    let ctx = Context::User;
    let need = needs(what);
    if what == Interaction::HistorySystem {
        let ok = [Perm::Read, Perm::Search]
            .iter()
            .all(|p| scopes.allows_all_types(ctx, *p) && role.allows_all(*p));
        return if ok {
            Decision::Allow
        } else {
            Decision::Deny("scope or role: system history needs every type")
        };
    }
    let Some(t) = rtype else {
        return Decision::Deny("no resource type");
    };
    if !need.iter().all(|p| scopes.allows(ctx, t, *p)) {
        return Decision::Deny("scope: not granted for this type and interaction");
    }
    if !need.iter().all(|p| role.allows(t, *p)) {
        return Decision::Deny("role: not permitted for this type and interaction");
    }
    Decision::Allow
}

/// The permissions an interaction needs (system history is decided apart).
fn needs(what: Interaction) -> &'static [Perm] {
    match what {
        Interaction::Read
        | Interaction::VRead
        | Interaction::HistoryInstance
        | Interaction::PatientEverything => &[Perm::Read],
        Interaction::Create => &[Perm::Create],
        Interaction::Update => &[Perm::Update],
        Interaction::UpdateCreate => &[Perm::Create, Perm::Update],
        Interaction::Delete => &[Perm::Delete],
        Interaction::HistoryType | Interaction::SearchType => &[Perm::Search],
        Interaction::HistorySystem => &[Perm::Read, Perm::Search],
    }
}

/// [`decide`] for an interaction on one known resource (`id`).
///
/// This is the type-level half of the decision (roles and scopes). Which
/// patients' data the caller reaches, security labels and break-the-glass
/// are the resource-level half, [`decide_resource`], applied to every
/// resource a response would carry and, for searches, as conditions on the
/// query itself.
///
/// Patient-context access (`patient/` scopes) reaches the types of the
/// Patient compartment and the shared reference types
/// ([`SHARED_REFERENCE`]); which compartments, [`Reach`] says. Every other
/// type can hold other patients' data outside any compartment (`Binary`,
/// `Bundle`, `Linkage`…) and is denied.
pub fn decide_instance(
    who: &Principal,
    what: Interaction,
    rtype: Option<&str>,
    _id: Option<&str>,
) -> Decision {
    let scopes = match who {
        Principal::Client { scopes, .. } => scopes,
        Principal::User {
            scopes,
            patient,
            role,
            ..
        } => {
            let patient_scoped = scopes.iter().any(|s| s.context == Context::Patient);
            if patient_scoped {
                if patient.is_none() {
                    return Decision::Deny("patient context: the token names no patient");
                }
                if what == Interaction::HistorySystem {
                    return Decision::Deny("patient context: no system-wide history");
                }
                let Some(t) = rtype else {
                    return Decision::Deny("no resource type");
                };
                if !compartment_or_shared(t) {
                    return Decision::Deny("patient context: type outside the patient compartment");
                }
                let need = needs(what);
                if !need.iter().all(|p| scopes.allows(Context::Patient, t, *p)) {
                    return Decision::Deny("scope: not granted for this type and interaction");
                }
                if !need.iter().all(|p| role.allows(t, *p)) {
                    return Decision::Deny("role: not permitted for this type and interaction");
                }
                return Decision::Allow;
            }
            return decide_user(scopes, role, what, rtype);
        }
    };
    let ctx = Context::System;
    // History across all types needs read+search on every type: it returns
    // resources of any type.
    if what == Interaction::HistorySystem {
        return if scopes.allows_all_types(ctx, Perm::Read)
            && scopes.allows_all_types(ctx, Perm::Search)
        {
            Decision::Allow
        } else {
            Decision::Deny("scope: system history needs system/*.rs")
        };
    }
    let need = needs(what);
    let Some(t) = rtype else {
        return Decision::Deny("no resource type");
    };
    if need.iter().all(|p| scopes.allows(ctx, t, *p)) {
        Decision::Allow
    } else {
        Decision::Deny("scope: not granted for this type and interaction")
    }
}

/// Types outside the Patient compartment that hold no patient's data:
/// the directory (who and where) and definitional content (terminology,
/// questionnaires, medications, plans). Callers limited to some patients
/// (patients, care-relationship roles) may read these; every other type
/// outside the compartment (`Binary`, `Bundle`, `Device`, `Linkage`,
/// `Contract`, `MessageHeader`, payment notices…) can carry any patient's
/// data with no compartment link and is denied to them. An allow-list, so
/// a type nobody thought about stays denied.
pub const SHARED_REFERENCE: &[&str] = &[
    "ActivityDefinition",
    "CapabilityStatement",
    "CatalogEntry",
    "ChargeItemDefinition",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "DeviceDefinition",
    "EffectEvidenceSynthesis",
    "Endpoint",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "GraphDefinition",
    "HealthcareService",
    "ImplementationGuide",
    "InsurancePlan",
    "Library",
    "Location",
    "Measure",
    "Medication",
    "MedicationKnowledge",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "NamingSystem",
    "ObservationDefinition",
    "OperationDefinition",
    "Organization",
    "OrganizationAffiliation",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Questionnaire",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "RiskEvidenceSynthesis",
    "SearchParameter",
    "Slot",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "TerminologyCapabilities",
    "TestScript",
    "ValueSet",
];

fn compartment_or_shared(rtype: &str) -> bool {
    phylax_fhir::compartment::is_compartment_type(rtype) || SHARED_REFERENCE.contains(&rtype)
}

/// Which patients' data one request reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// No patient restriction: the type-level decision alone applies.
    All,
    /// Only these patients' compartments (and shared reference types).
    Patients(std::collections::BTreeSet<String>),
}

/// The resource-level facts of one request's caller: computed once per
/// request (care relationships and break-the-glass grants are looked up
/// then, so a change applies to the next request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub reach: Reach,
    /// Patients reached through an active break-the-glass grant (also in
    /// `reach`). Their restricted-label data is visible too, and every
    /// access to them is marked in the audit log.
    pub emergency: std::collections::BTreeSet<String>,
    /// May see restricted-label data of every patient it reaches.
    pub labelled: bool,
    /// Patients whose active privacy consent denies this requester (for
    /// this purpose, now); break-the-glass patients are never in it.
    /// Applies to disclosure (reads and searches), not to writes.
    pub denied: std::collections::BTreeSet<String>,
    /// The purpose of use the requests carry (HL7 v3 ActReason).
    pub purpose: &'static str,
    /// How the requester is known in the data (`Practitioner/…`, its roles
    /// and organizations; a patient's `Patient/…`).
    pub refs: Vec<String>,
    /// May change who reaches whom ([`decide_relationships`]): the role's
    /// `relationships` permission, or a client listed in
    /// `access.relationship_clients`.
    pub relationships: bool,
}

impl Access {
    /// No patient restriction, labels visible: backend clients with the
    /// right scopes, and tests.
    pub fn unrestricted() -> Access {
        Access {
            reach: Reach::All,
            emergency: Default::default(),
            labelled: true,
            denied: Default::default(),
            purpose: "HOPERAT",
            refs: Vec::new(),
            relationships: true,
        }
    }

    /// Reaches nothing and may change nothing: the context of a request
    /// refused before its access was known (its refusal is still
    /// recorded). Built field by field, not from `unrestricted`, so a field
    /// added later defaults closed here.
    pub fn nothing() -> Access {
        Access {
            reach: Reach::Patients(Default::default()),
            emergency: Default::default(),
            labelled: false,
            denied: Default::default(),
            purpose: "HOPERAT",
            refs: Vec::new(),
            relationships: false,
        }
    }

    /// The same access for writing: consents restrict disclosure, not the
    /// upkeep of a record (a write answers with what was sent).
    pub fn for_writes(&self) -> Access {
        Access {
            denied: Default::default(),
            ..self.clone()
        }
    }

    /// Whether `patient`'s compartment is reachable.
    pub fn reaches(&self, patient: &str) -> bool {
        match &self.reach {
            Reach::All => true,
            Reach::Patients(set) => set.contains(patient),
        }
    }
}

/// What the decision needs to know about one resource.
#[derive(Debug, Clone, Copy)]
pub struct ResourceFacts<'a> {
    pub rtype: &'a str,
    /// Patients whose compartment it is in.
    pub patients: &'a [String],
    /// It carries a restricted security label (confidentiality R or V, or a
    /// sensitive category; the list is configuration).
    pub restricted: bool,
}

/// The resource-level half of the decision: may a caller with `access`
/// see this resource (read it, find it, receive it as an include, write
/// over it)? Deny by default for callers limited to some patients:
/// - a compartment type is reachable when one of its patients is (a
///   resource of such a type that names no patient belongs to nobody's
///   compartment and is not reachable);
/// - outside the compartment, only the shared reference types;
/// - restricted labels need the role's permission or break-the-glass on
///   one of the resource's patients.
pub fn decide_resource(access: &Access, r: &ResourceFacts<'_>) -> Decision {
    decide_patients(access, r, false)
}

/// The resource-level decision for a write: like [`decide_resource`], but
/// **every** patient the resource names must be within reach. A resource
/// names a patient to say the data is theirs (an Observation whose
/// performer is Patient/A is in A's record as well as its subject's): a
/// write "through" one reached patient into another's record is refused.
pub fn decide_write(access: &Access, r: &ResourceFacts<'_>) -> Decision {
    decide_patients(access, r, true)
}

fn decide_patients(access: &Access, r: &ResourceFacts<'_>, every: bool) -> Decision {
    if let Reach::Patients(set) = &access.reach {
        if phylax_fhir::compartment::is_compartment_type(r.rtype) {
            if !r.patients.iter().any(|p| set.contains(p)) {
                return Decision::Deny("reach: not in a compartment the caller reaches");
            }
            if every && !r.patients.iter().all(|p| set.contains(p)) {
                return Decision::Deny(
                    "reach: the resource names a patient outside the caller's reach",
                );
            }
        } else if !SHARED_REFERENCE.contains(&r.rtype) {
            return Decision::Deny(
                "reach: type may hold data of patients outside the caller's reach",
            );
        }
    }
    if r.patients.iter().any(|p| access.denied.contains(p)) {
        return Decision::Deny("consent: the patient's privacy consent denies this access");
    }
    if r.restricted && !access.labelled && !r.patients.iter().any(|p| access.emergency.contains(p))
    {
        return Decision::Deny("security label: restricted data needs an explicit permission");
    }
    Decision::Allow
}

/// Types whose every version decides who reaches whom: care teams, the
/// practitioner's roles and organizations, episodes of care, related
/// persons and the `Person` links that make a user one of them, groups,
/// and consents (deny rules and delegations). Any create, update or delete
/// of one changes reach.
pub const RELATIONSHIP_TYPES: &[&str] = &[
    "CareTeam",
    "PractitionerRole",
    "EpisodeOfCare",
    "RelatedPerson",
    "Group",
    "Consent",
    "Person",
];

/// Can a write of `rtype` change who reaches whom (a relationship type, or
/// a type with relationship elements)?
pub fn establishes_reach(rtype: &str) -> bool {
    RELATIONSHIP_TYPES.contains(&rtype) || matches!(rtype, "Patient" | "Encounter")
}

/// The part of a resource of another type that establishes reach, as
/// `(element, value)` pairs of the elements present: a Patient's general
/// practitioner, managing organization and links; an Encounter's
/// participants, with its subject when it has any (moving an Encounter
/// one takes part in to another patient is a new relationship).
fn relationship_part<'a>(rtype: &str, body: &'a Value) -> Vec<(&'static str, &'a Value)> {
    let pick = |names: &[&'static str]| {
        names
            .iter()
            .filter_map(|n| body.get(*n).map(|v| (*n, v)))
            .collect()
    };
    match rtype {
        "Patient" => pick(&["generalPractitioner", "managingOrganization", "link"]),
        "Encounter" if body.get("participant").is_some() => pick(&["subject", "participant"]),
        _ => Vec::new(),
    }
}

/// Does a write that replaces `old` with `new` (either may be absent: a
/// create, a delete) change who reaches whom?
pub fn changes_relationships(rtype: &str, old: Option<&Value>, new: Option<&Value>) -> bool {
    if RELATIONSHIP_TYPES.contains(&rtype) {
        return old.is_some() || new.is_some();
    }
    let old = old.map(|b| relationship_part(rtype, b)).unwrap_or_default();
    let new = new.map(|b| relationship_part(rtype, b)).unwrap_or_default();
    old != new
}

/// May `access` write a change from `old` to `new`, as far as reach is
/// concerned? Relationships are privileged data: changing them needs the
/// `relationships` permission ([`Access::relationships`]), whatever the
/// type grants say, so no user widens their own reach with an ordinary
/// FHIR write. With `self_registration` (off by default; an
/// organisation's choice), a user may also create a Patient whose
/// relationship elements name only themselves (a clinician registering
/// the patient they are taking on).
pub fn decide_relationships(
    access: &Access,
    rtype: &str,
    old: Option<&Value>,
    new: Option<&Value>,
    self_registration: bool,
) -> Decision {
    if access.relationships || !changes_relationships(rtype, old, new) {
        return Decision::Allow;
    }
    if self_registration && rtype == "Patient" && old.is_none() {
        if let Some(b) = new {
            // Only `generalPractitioner`, naming only the user's own
            // Practitioner (not their organization or roles, which would
            // open the patient to everyone working there).
            let part = relationship_part(rtype, b);
            let only_gp = part.iter().all(|(name, _)| *name == "generalPractitioner");
            let me = |r: &str| r.starts_with("Practitioner/") && access.refs.iter().any(|m| m == r);
            let gps = b.get("generalPractitioner").and_then(Value::as_array);
            let only_self = gps.is_some_and(|a| {
                !a.is_empty()
                    && a.iter()
                        .all(|g| g.get("reference").and_then(Value::as_str).is_some_and(me))
            });
            if only_gp && only_self {
                return Decision::Allow;
            }
        }
    }
    Decision::Deny("relationships: changing who reaches whom needs the relationships permission")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(scope: &str) -> Principal {
        Principal::Client {
            client_id: "c".into(),
            scopes: ScopeSet::parse_lenient(scope),
            token_id: "t".into(),
        }
    }

    #[test]
    fn decisions_follow_scopes() {
        use Interaction::*;
        let c = client("system/Patient.rs system/Observation.cu");
        assert_eq!(decide(&c, Read, Some("Patient")), Decision::Allow);
        assert_eq!(decide(&c, SearchType, Some("Patient")), Decision::Allow);
        assert!(matches!(
            decide(&c, Update, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&c, Delete, Some("Patient")),
            Decision::Deny(_)
        ));
        assert_eq!(decide(&c, Create, Some("Observation")), Decision::Allow);
        assert_eq!(
            decide(&c, UpdateCreate, Some("Observation")),
            Decision::Allow
        );
        assert!(matches!(
            decide(&c, Read, Some("Observation")),
            Decision::Deny(_)
        ));
        assert!(matches!(decide(&c, HistorySystem, None), Decision::Deny(_)));
        assert!(matches!(decide(&c, Read, None), Decision::Deny(_)));
        let w = client("system/*.rs");
        assert_eq!(decide(&w, HistorySystem, None), Decision::Allow);
        let cu = client("system/Patient.u");
        assert!(matches!(
            decide(&cu, UpdateCreate, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&client(""), Read, Some("Patient")),
            Decision::Deny(_)
        ));
    }

    fn role(name: &str) -> std::sync::Arc<crate::roles::RoleDef> {
        std::sync::Arc::new(
            crate::roles::builtin()
                .into_iter()
                .find(|r| r.name == name)
                .unwrap(),
        )
    }

    fn user_as(role_name: &str, scope: &str, patient: Option<&str>) -> Principal {
        Principal::User {
            user_id: "u".into(),
            role: role(role_name),
            client_id: "app".into(),
            scopes: ScopeSet::parse_lenient(scope),
            patient: patient.map(str::to_owned),
            token_id: "t".into(),
            mfa_at: None,
        }
    }

    fn user(scope: &str, patient: Option<&str>) -> Principal {
        let name = if patient.is_some() {
            "patient"
        } else {
            "clinician"
        };
        Principal::User {
            user_id: "u".into(),
            role: role(name),
            client_id: "app".into(),
            scopes: ScopeSet::parse_lenient(scope),
            patient: patient.map(str::to_owned),
            token_id: "t".into(),
            mfa_at: None,
        }
    }

    #[test]
    fn user_scopes_and_the_narrow_patient_context() {
        use Interaction::*;
        let u = user("user/Patient.rs", None);
        assert_eq!(decide(&u, Read, Some("Patient")), Decision::Allow);
        assert!(matches!(
            decide(&u, Update, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&u, Read, Some("Observation")),
            Decision::Deny(_)
        ));
        // system/ scopes in a user token grant nothing.
        assert!(matches!(
            decide(&user("system/*.cruds", None), Read, Some("Patient")),
            Decision::Deny(_)
        ));
        // Patient context: compartment and shared reference types, read
        // and search; which compartments is the resource-level half.
        let p = user("patient/*.rs", Some("p1"));
        for t in [
            "Patient",
            "Observation",
            "Encounter",
            "Practitioner",
            "Medication",
        ] {
            assert_eq!(decide(&p, Read, Some(t)), Decision::Allow, "{t}");
            assert_eq!(decide(&p, SearchType, Some(t)), Decision::Allow, "{t}");
        }
        for t in [
            "Binary",
            "Bundle",
            "Device",
            "Linkage",
            "AuditEvent",
            "Contract",
        ] {
            assert!(
                matches!(decide(&p, Read, Some(t)), Decision::Deny(_)),
                "{t}"
            );
        }
        assert!(matches!(
            decide(&p, Create, Some("Observation")),
            Decision::Deny(_)
        ));
        assert!(matches!(decide(&p, HistorySystem, None), Decision::Deny(_)));
        // A narrower patient scope stays narrow.
        let po = user("patient/Observation.rs", Some("p1"));
        assert!(matches!(
            decide(&po, Read, Some("Condition")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide_instance(&user("patient/*.rs", None), Read, Some("Patient"), None),
            Decision::Deny(_)
        ));
    }

    fn facts<'a>(rtype: &'a str, patients: &'a [String], restricted: bool) -> ResourceFacts<'a> {
        ResourceFacts {
            rtype,
            patients,
            restricted,
        }
    }

    #[test]
    fn resource_level_reach_labels_and_emergency() {
        let only = |ids: &[&str]| Access {
            reach: Reach::Patients(ids.iter().map(|s| (*s).to_owned()).collect()),
            emergency: Default::default(),
            labelled: false,
            denied: Default::default(),
            purpose: "TREAT",
            refs: Vec::new(),
            relationships: false,
        };
        let a = only(&["p1"]);
        let p1 = vec!["p1".to_owned()];
        let p2 = vec!["p2".to_owned()];
        let both = vec!["p2".to_owned(), "p1".to_owned()];
        let none: Vec<String> = Vec::new();
        assert_eq!(
            decide_resource(&a, &facts("Observation", &p1, false)),
            Decision::Allow
        );
        assert!(
            matches!(decide_resource(&a, &facts("Observation", &p2, false)), Decision::Deny(r) if r.starts_with("reach"))
        );
        assert_eq!(
            decide_resource(&a, &facts("Observation", &both, false)),
            Decision::Allow
        );
        // In the compartment's types but naming no patient: nobody's.
        assert!(matches!(
            decide_resource(&a, &facts("Observation", &none, false)),
            Decision::Deny(_)
        ));
        assert_eq!(
            decide_resource(&a, &facts("Practitioner", &none, false)),
            Decision::Allow
        );
        assert!(matches!(
            decide_resource(&a, &facts("Binary", &none, false)),
            Decision::Deny(_)
        ));
        // Labels: refused without the permission, allowed with it or under
        // break-the-glass for that patient only.
        assert!(
            matches!(decide_resource(&a, &facts("Observation", &p1, true)), Decision::Deny(r) if r.starts_with("security label"))
        );
        let mut l = only(&["p1"]);
        l.labelled = true;
        assert_eq!(
            decide_resource(&l, &facts("Observation", &p1, true)),
            Decision::Allow
        );
        let mut e = only(&["p1", "p2"]);
        e.emergency.insert("p2".into());
        assert_eq!(
            decide_resource(&e, &facts("Observation", &p2, true)),
            Decision::Allow
        );
        assert!(matches!(
            decide_resource(&e, &facts("Observation", &p1, true)),
            Decision::Deny(_)
        ));
        // A consent denial wins over reach and labels.
        let mut c = only(&["p1", "p2"]);
        c.labelled = true;
        c.denied.insert("p2".into());
        assert!(
            matches!(decide_resource(&c, &facts("Observation", &p2, false)), Decision::Deny(r) if r.starts_with("consent"))
        );
        assert!(matches!(
            decide_resource(&c, &facts("Observation", &both, false)),
            Decision::Deny(_)
        ));
        assert_eq!(
            decide_resource(&c.for_writes(), &facts("Observation", &p2, false)),
            Decision::Allow
        );
        // Unrestricted reach still honours labels.
        let mut all = Access::unrestricted();
        assert_eq!(
            decide_resource(&all, &facts("Binary", &none, true)),
            Decision::Allow
        );
        all.labelled = false;
        assert!(matches!(
            decide_resource(&all, &facts("Observation", &p2, true)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn role_and_scopes_intersect() {
        use Interaction::*;
        // Wide scopes, narrow role: the role wins.
        let fd = user_as("front-desk", "user/*.cruds", None);
        assert_eq!(decide(&fd, Create, Some("Patient")), Decision::Allow);
        assert_eq!(
            decide(&fd, SearchType, Some("Appointment")),
            Decision::Allow
        );
        assert!(
            matches!(decide(&fd, Read, Some("Observation")), Decision::Deny(r) if r.starts_with("role"))
        );
        assert!(matches!(
            decide(&fd, Delete, Some("Patient")),
            Decision::Deny(_)
        ));
        // Wide role, narrow scopes: the scopes win.
        let c = user_as("clinician", "user/Patient.rs", None);
        assert!(
            matches!(decide(&c, Read, Some("Observation")), Decision::Deny(r) if r.starts_with("scope"))
        );
        // Auditors read audit records only; admins no clinical data.
        let a = user_as("auditor", "user/*.cruds", None);
        assert_eq!(decide(&a, SearchType, Some("AuditEvent")), Decision::Allow);
        assert!(matches!(
            decide(&a, Read, Some("Patient")),
            Decision::Deny(_)
        ));
        let ad = user_as("admin", "user/*.cruds", None);
        assert_eq!(decide(&ad, Update, Some("Organization")), Decision::Allow);
        assert!(matches!(
            decide(&ad, Read, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&ad, PatientEverything, Some("Patient")),
            Decision::Deny(_)
        ));
        // System history spans every type, audit records included: no
        // workforce role reaches it.
        for r in [
            "clinician",
            "nurse",
            "front-desk",
            "billing",
            "researcher",
            "auditor",
            "admin",
        ] {
            assert!(
                matches!(
                    decide(&user_as(r, "user/*.cruds", None), HistorySystem, None),
                    Decision::Deny(_)
                ),
                "{r}"
            );
        }
    }

    #[test]
    fn relationships_need_the_permission() {
        use serde_json::json;
        let mut a = Access::unrestricted();
        a.relationships = false;
        a.refs = vec!["Practitioner/me".into()];
        let deny = |d: Decision| matches!(d, Decision::Deny(r) if r.starts_with("relationships"));
        let ct = json!({"resourceType":"CareTeam","subject":{"reference":"Patient/a"}});
        for (old, new) in [(None, Some(&ct)), (Some(&ct), Some(&ct)), (Some(&ct), None)] {
            assert!(deny(decide_relationships(&a, "CareTeam", old, new, false)));
        }
        // Patients: only the relationship elements count.
        let p0 = json!({"resourceType":"Patient","id":"a","gender":"female",
            "generalPractitioner":[{"reference":"Practitioner/other"}]});
        let mut p1 = p0.clone();
        p1["gender"] = json!("male");
        assert_eq!(
            decide_relationships(&a, "Patient", Some(&p0), Some(&p1), false),
            Decision::Allow
        );
        let mut p2 = p0.clone();
        p2["generalPractitioner"] = json!([{"reference":"Practitioner/me"}]);
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            Some(&p0),
            Some(&p2),
            false
        )));
        let mut p3 = p0.clone();
        p3["managingOrganization"] = json!({"reference":"Organization/x"});
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            Some(&p0),
            Some(&p3),
            false
        )));
        // A Patient naming nobody is no relationship.
        let bare = json!({"resourceType":"Patient","id":"b"});
        assert_eq!(
            decide_relationships(&a, "Patient", None, Some(&bare), false),
            Decision::Allow
        );
        // Self-registration: only when configured, only a create, only self.
        let mine = json!({"resourceType":"Patient","id":"c","generalPractitioner":[{"reference":"Practitioner/me"}]});
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            None,
            Some(&mine),
            false
        )));
        assert_eq!(
            decide_relationships(&a, "Patient", None, Some(&mine), true),
            Decision::Allow
        );
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            Some(&bare),
            Some(&mine),
            true
        )));
        let linked = json!({"resourceType":"Patient","id":"c","generalPractitioner":[{"reference":"Practitioner/me"}],
            "link":[{"other":{"reference":"Patient/z"},"type":"seealso"}]});
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            None,
            Some(&linked),
            true
        )));
        let org = json!({"resourceType":"Patient","id":"c","generalPractitioner":[{"reference":"Practitioner/me"}],
            "managingOrganization":{"reference":"Organization/x"}});
        assert!(deny(decide_relationships(
            &a,
            "Patient",
            None,
            Some(&org),
            true
        )));
        // Encounters: participants, and the subject once there are any.
        let e0 = json!({"resourceType":"Encounter","subject":{"reference":"Patient/a"},"status":"planned"});
        assert_eq!(
            decide_relationships(&a, "Encounter", None, Some(&e0), false),
            Decision::Allow
        );
        let mut e1 = e0.clone();
        e1["participant"] = json!([{"individual":{"reference":"Practitioner/me"}}]);
        assert!(deny(decide_relationships(
            &a,
            "Encounter",
            Some(&e0),
            Some(&e1),
            false
        )));
        let mut e2 = e1.clone();
        e2["status"] = json!("finished");
        assert_eq!(
            decide_relationships(&a, "Encounter", Some(&e1), Some(&e2), false),
            Decision::Allow
        );
        let mut e3 = e1.clone();
        e3["subject"] = json!({"reference":"Patient/b"});
        assert!(deny(decide_relationships(
            &a,
            "Encounter",
            Some(&e1),
            Some(&e3),
            false
        )));
        assert!(deny(decide_relationships(
            &a,
            "Encounter",
            Some(&e1),
            None,
            false
        )));
        // Ordinary types never count; the permission allows everything.
        let obs = json!({"resourceType":"Observation"});
        assert_eq!(
            decide_relationships(&a, "Observation", None, Some(&obs), false),
            Decision::Allow
        );
        a.relationships = true;
        assert_eq!(
            decide_relationships(&a, "CareTeam", None, Some(&ct), false),
            Decision::Allow
        );
    }

    #[test]
    fn writes_need_every_named_patient() {
        let mut a = Access::unrestricted();
        a.reach = Reach::Patients(["p1".to_owned()].into_iter().collect());
        let both = vec!["p2".to_owned(), "p1".to_owned()];
        let one = vec!["p1".to_owned()];
        assert_eq!(
            decide_resource(&a, &facts("Observation", &both, false)),
            Decision::Allow
        );
        assert!(
            matches!(decide_write(&a, &facts("Observation", &both, false)), Decision::Deny(r) if r.starts_with("reach"))
        );
        assert_eq!(
            decide_write(&a, &facts("Observation", &one, false)),
            Decision::Allow
        );
    }
}
