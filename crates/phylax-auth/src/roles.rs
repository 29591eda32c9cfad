//! Roles as data: what each kind of person may do to which resource types.
//!
//! A user's effective permission on a type is the **intersection** of their
//! role's grants and their token's SMART scopes: an app can never give a
//! person more than their role, and a role never widens what the person
//! approved for the app. Built-in roles follow least privilege (docs/
//! ACCESS_CONTROL.md has the table); deployments add custom roles in
//! configuration, validated at start.
//!
//! Types not named by a role are denied. Until field masking exists, roles
//! that must not see direct identifiers (researcher) get no access to the
//! identifying types at all: denying is the fail-closed answer.

use crate::scopes::Perm;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Which resource types a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Types {
    /// Every type except those listed.
    AllExcept(BTreeSet<String>),
    Only(BTreeSet<String>),
}

impl Types {
    fn covers(&self, t: &str) -> bool {
        match self {
            Types::AllExcept(x) => !x.contains(t),
            Types::Only(x) => x.contains(t),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub types: Types,
    pub perms: BTreeSet<Perm>,
}

/// Whose patients' data a role reaches (on top of its type grants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReachRule {
    /// Every patient (type grants alone decide): roles whose job spans the
    /// whole organisation (reception, billing, research, audit).
    Everyone,
    /// Only patients the user has a care relationship with (their
    /// organisation's or care team's patients), plus break-the-glass.
    CareRelationships,
    /// The user's own compartment (and delegated ones): patients.
    OwnCompartment,
}

impl ReachRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ReachRule::Everyone => "everyone",
            ReachRule::CareRelationships => "care-relationships",
            ReachRule::OwnCompartment => "own-compartment",
        }
    }
}

/// One role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDef {
    pub name: String,
    pub description: String,
    /// Patients hold `patient/` scopes for their own compartment; everyone
    /// else is workforce (`user/` scopes).
    pub patient: bool,
    pub grants: Vec<Grant>,
    /// Whose patients it reaches.
    pub reach: ReachRule,
    /// May see resources carrying restricted security labels (for the
    /// patients it reaches) without break-the-glass.
    pub labelled: bool,
    /// May ask for break-the-glass emergency access.
    pub break_glass: bool,
    /// May erase a patient's record through the API (`Patient/{id}/$erase`,
    /// GDPR Art. 17: crypto-shredding, docs/KEYS.md). No built-in role but
    /// `privacy-officer` has it.
    pub erase: bool,
    /// May change who reaches whom: write the resources and elements that
    /// establish care relationships, delegation and consent
    /// ([`crate::policy::changes_relationships`]). Without it a user cannot
    /// widen their own (or anyone's) reach with an ordinary FHIR write.
    pub relationships: bool,
    /// The purpose of use its requests carry (HL7 v3 ActReason): recorded
    /// in every audit record and matched against consents that deny a
    /// purpose.
    pub purpose: &'static str,
    /// Elements removed from every resource it receives (on every type;
    /// a choice element by its base name, `value` for `valueQuantity`).
    /// Searching or sorting on them is refused.
    pub masks: BTreeSet<String>,
}

/// What researchers never receive, at any depth of any resource: direct
/// identifiers (names, identifiers, contact details, addresses, photos;
/// also inside references and backbone elements), the narrative, which
/// repeats them, and the identifying extensions (mother's maiden name,
/// birth place) and attached or binary content (`data`: scanned documents
/// and images identify). Mask syntax: see `phylax-server`'s `mask` module.
pub const DEIDENTIFY: &[&str] = &[
    "name",
    "identifier",
    "telecom",
    "address",
    "photo",
    "contact",
    "data",
    "Resource.text",
    "extension:http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
    "extension:http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
];

/// Whether `m` is a mask: an element name (`note`), a path from a
/// resource type or `Resource` (`Patient.contact.name`), or
/// `extension:` and an absolute URL.
pub fn valid_mask(m: &str) -> bool {
    let element = |e: &str| {
        e.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && e.chars().all(|c| c.is_ascii_alphanumeric())
            && e.len() <= 64
    };
    if let Some(url) = m.strip_prefix("extension:") {
        return (url.starts_with("http://")
            || url.starts_with("https://")
            || url.starts_with("urn:"))
            && url.len() <= 256
            && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    }
    match m.split_once('.') {
        Some((t, rest)) => {
            t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphanumeric())
                && rest.split('.').all(element)
        }
        None => element(m),
    }
}

/// Purposes of use a role may carry (HL7 v3 ActReason codes).
pub const PURPOSES: &[&str] = &[
    "TREAT",
    "ETREAT",
    "HPAYMT",
    "HOPERAT",
    "HRESCH",
    "HSYSADMIN",
    "PATRQT",
    "PUBHLTH",
    "HMARKT",
    "HDIRECT",
    "HLEGAL",
    "COC",
];

/// The static purpose code for `s`, if it is one of [`PURPOSES`].
pub fn purpose(s: &str) -> Option<&'static str> {
    PURPOSES.iter().find(|p| **p == s).copied()
}

impl RoleDef {
    /// May this role perform `perm` on `rtype`?
    pub fn allows(&self, rtype: &str, perm: Perm) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.contains(&perm) && g.types.covers(rtype))
    }

    /// May it perform `perm` on every type (system-wide history)?
    pub fn allows_all(&self, perm: Perm) -> bool {
        self.grants.iter().any(|g| {
            g.perms.contains(&perm) && matches!(&g.types, Types::AllExcept(x) if x.is_empty())
        })
    }
}

/// Parse `cruds` letters (any subset, in order) into permissions.
pub fn parse_perms(s: &str) -> Option<BTreeSet<Perm>> {
    const ORDER: [(char, Perm); 5] = [
        ('c', Perm::Create),
        ('r', Perm::Read),
        ('u', Perm::Update),
        ('d', Perm::Delete),
        ('s', Perm::Search),
    ];
    let mut out = BTreeSet::new();
    let mut idx = 0;
    for ch in s.chars() {
        let pos = ORDER[idx..].iter().position(|(c, _)| *c == ch)?;
        out.insert(ORDER[idx + pos].1);
        idx += pos + 1;
    }
    (!out.is_empty()).then_some(out)
}

fn set(types: &[&str]) -> BTreeSet<String> {
    types.iter().map(|t| (*t).to_owned()).collect()
}

fn grant(types: Types, perms: &str) -> Grant {
    Grant {
        types,
        // The letters below are literals checked by the unit tests.
        perms: parse_perms(perms).unwrap_or_default(),
    }
}

/// Security and audit records: only auditors read them.
const AUDIT: &[&str] = &["AuditEvent", "Provenance"];
/// People and places: who and where, plus scheduling. Front desk holds the
/// `relationships` permission for what of it decides who cares for whom
/// (a patient's GP and organization, related persons); encounters, care
/// teams and consents carry clinical content and are not its to read.
const DEMOGRAPHICS_SCHEDULING: &[&str] = &[
    "Patient",
    "RelatedPerson",
    "Person",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "HealthcareService",
    "Endpoint",
    "Appointment",
    "AppointmentResponse",
    "Schedule",
    "Slot",
    "Coverage",
];
/// Money: coverage, claims, accounts and their parties.
const FINANCIAL: &[&str] = &[
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "Claim",
    "ClaimResponse",
    "ExplanationOfBenefit",
    "Account",
    "Invoice",
    "ChargeItem",
    "ChargeItemDefinition",
    "PaymentNotice",
    "PaymentReconciliation",
    "Contract",
];
/// Reference data billing needs to read alongside claims.
const FINANCIAL_CONTEXT: &[&str] = &["Patient", "Organization", "Practitioner", "Encounter"];
/// The directory an administrator maintains (no clinical data).
const DIRECTORY: &[&str] = &[
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "HealthcareService",
    "Endpoint",
    "Device",
];

/// The built-in roles.
pub fn builtin() -> Vec<RoleDef> {
    let all_but = |x: &[&str]| Types::AllExcept(set(x));
    let only = |x: &[&str]| Types::Only(set(x));
    // Identifying types are readable by researchers since masking removes
    // the identifiers (DEIDENTIFY); money and audit records are not.
    let not_for_research: Vec<&str> = AUDIT.iter().chain(FINANCIAL).copied().collect();
    vec![
        RoleDef {
            name: "clinician".into(),
            description: "Clinical staff who treat patients: all clinical and demographic data, no audit records".into(),
            patient: false,
            grants: vec![grant(all_but(AUDIT), "cruds")],
            reach: ReachRule::CareRelationships,
            labelled: false,
            break_glass: true,
            erase: false,
            relationships: false,
            purpose: "TREAT",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "nurse".into(),
            description: "Nursing staff: like a clinician, without deleting records".into(),
            patient: false,
            grants: vec![grant(all_but(AUDIT), "crus")],
            reach: ReachRule::CareRelationships,
            labelled: false,
            break_glass: true,
            erase: false,
            relationships: false,
            purpose: "TREAT",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "front-desk".into(),
            description: "Reception: demographics, coverage and scheduling only".into(),
            patient: false,
            grants: vec![grant(only(DEMOGRAPHICS_SCHEDULING), "crus")],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: true,
            purpose: "HOPERAT",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "billing".into(),
            description: "Billing: coverage, claims and accounts; reads the parties; no clinical notes".into(),
            patient: false,
            grants: vec![
                grant(only(FINANCIAL), "crus"),
                grant(only(FINANCIAL_CONTEXT), "rs"),
            ],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "HPAYMT",
            masks: set(&["note"]),
        },
        RoleDef {
            name: "researcher".into(),
            description: "Research: reads clinical and demographic data with direct identifiers masked; no financial or audit records".into(),
            patient: false,
            grants: vec![grant(all_but(&not_for_research), "rs")],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "HRESCH",
            masks: set(DEIDENTIFY),
        },
        RoleDef {
            name: "auditor".into(),
            description: "Compliance: audit and provenance records only".into(),
            patient: false,
            grants: vec![grant(only(AUDIT), "rs")],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "HOPERAT",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "admin".into(),
            description: "Administration: users, clients, keys (CLI) and the directory; no clinical data".into(),
            patient: false,
            grants: vec![grant(only(DIRECTORY), "cruds")],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: true,
            purpose: "HSYSADMIN",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "privacy-officer".into(),
            description: "Privacy officer: erases a patient's record on a lawful request (Patient/{id}/$erase); reads no clinical data".into(),
            patient: false,
            grants: Vec::new(),
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: true,
            relationships: false,
            purpose: "HOPERAT",
            masks: BTreeSet::new(),
        },
        RoleDef {
            name: "patient".into(),
            description: "A patient: their own record, through patient/ scopes".into(),
            patient: true,
            grants: vec![grant(all_but(AUDIT), "rs")],
            reach: ReachRule::OwnCompartment,
            labelled: true,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "PATRQT",
            masks: BTreeSet::new(),
        },
    ]
}

/// A custom role as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomRole {
    pub name: String,
    pub description: String,
    /// `(types, perms)`: types are resource type names or `*`; perms are
    /// `cruds` letters.
    pub grants: Vec<(Vec<String>, String)>,
    /// Limited to the user's care relationships (default) or reaching
    /// every patient.
    pub reach: ReachRule,
    pub labelled: bool,
    pub break_glass: bool,
    /// May erase a patient's record through the API ([`RoleDef::erase`]).
    pub erase: bool,
    /// May change who reaches whom ([`RoleDef::relationships`]).
    pub relationships: bool,
    /// One of [`PURPOSES`].
    pub purpose: String,
    /// Element names to mask.
    pub masks: Vec<String>,
}

/// The role registry: built-in roles plus validated custom ones.
#[derive(Debug, Clone)]
pub struct Roles {
    map: BTreeMap<String, Arc<RoleDef>>,
}

impl Roles {
    /// Built-in roles plus `custom`. `known_type` says whether a name is a
    /// FHIR resource type. A custom role may not reuse a built-in name,
    /// grant on audit types, or name an unknown type.
    pub fn new(custom: &[CustomRole], known_type: impl Fn(&str) -> bool) -> Result<Roles, String> {
        let mut map: BTreeMap<String, Arc<RoleDef>> = builtin()
            .into_iter()
            .map(|r| (r.name.clone(), Arc::new(r)))
            .collect();
        for c in custom {
            let ok_name = !c.name.is_empty()
                && c.name.len() <= 32
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-');
            if !ok_name {
                return Err(format!(
                    "role name {:?}: use 1-32 lower-case letters, digits or '-'",
                    c.name
                ));
            }
            if map.contains_key(&c.name) {
                return Err(format!(
                    "role {}: the name is taken (built-in or repeated)",
                    c.name
                ));
            }
            if c.grants.is_empty() {
                return Err(format!("role {}: needs at least one grant", c.name));
            }
            if let Some(m) = c.masks.iter().find(|m| !valid_mask(m)) {
                return Err(format!(
                    "role {}: mask {m:?} must be an element name such as \"note\", a path such as \"Patient.contact.name\", or \"extension:\" and a URL",
                    c.name
                ));
            }
            let purpose = purpose(&c.purpose).ok_or_else(|| {
                format!(
                    "role {}: purpose {:?} must be one of {}",
                    c.name,
                    c.purpose,
                    PURPOSES.join(", ")
                )
            })?;
            let mut grants = Vec::new();
            for (types, perms) in &c.grants {
                let perms = parse_perms(perms).ok_or_else(|| {
                    format!(
                        "role {}: permissions {perms:?} must be letters of \"cruds\" in that order",
                        c.name
                    )
                })?;
                let types = if types.iter().any(|t| t == "*") {
                    if types.len() != 1 {
                        return Err(format!("role {}: \"*\" stands alone", c.name));
                    }
                    Types::AllExcept(set(AUDIT))
                } else {
                    for t in types {
                        if !known_type(t) {
                            return Err(format!("role {}: unknown resource type {t}", c.name));
                        }
                        if AUDIT.contains(&t.as_str()) {
                            return Err(format!(
                                "role {}: audit records are for the built-in auditor role only",
                                c.name
                            ));
                        }
                    }
                    if types.is_empty() {
                        return Err(format!("role {}: a grant needs types", c.name));
                    }
                    Types::Only(types.iter().cloned().collect())
                };
                grants.push(Grant { types, perms });
            }
            map.insert(
                c.name.clone(),
                Arc::new(RoleDef {
                    name: c.name.clone(),
                    description: c.description.clone(),
                    patient: false,
                    grants,
                    reach: c.reach,
                    labelled: c.labelled,
                    break_glass: c.break_glass,
                    erase: c.erase,
                    relationships: c.relationships,
                    purpose,
                    masks: c.masks.iter().cloned().collect(),
                }),
            );
        }
        Ok(Roles { map })
    }

    /// Apply the deployment's `[access]` choices: with `care_relationships`
    /// off, roles limited to care relationships reach every patient; roles
    /// in `labelled` may see restricted-label data; roles in
    /// `relationships` may change who reaches whom. Unknown names are an
    /// error (a typo must not silently grant or withhold).
    pub fn with_access(
        mut self,
        care_relationships: bool,
        labelled: &[String],
        relationships: &[String],
    ) -> Result<Roles, String> {
        for (list, n) in labelled
            .iter()
            .map(|n| ("labelled_roles", n))
            .chain(relationships.iter().map(|n| ("relationship_roles", n)))
        {
            if !self.map.contains_key(n) {
                return Err(format!("access.{list}: unknown role {n}"));
            }
        }
        for (name, def) in self.map.iter_mut() {
            let mut d = (**def).clone();
            if !care_relationships && d.reach == ReachRule::CareRelationships {
                d.reach = ReachRule::Everyone;
            }
            if labelled.contains(name) {
                d.labelled = true;
            }
            if relationships.contains(name) {
                d.relationships = true;
            }
            *def = Arc::new(d);
        }
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<RoleDef>> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Perm::*;

    fn roles() -> Roles {
        Roles::new(&[], |t| {
            t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        })
        .unwrap()
    }

    #[test]
    fn builtin_perm_letters_are_valid() {
        for r in builtin() {
            for g in &r.grants {
                assert!(!g.perms.is_empty(), "{}", r.name);
            }
        }
    }

    #[test]
    fn masks_and_purposes() {
        let r = roles();
        let res = r.get("researcher").unwrap();
        for e in ["name", "identifier", "telecom", "address", "Resource.text"] {
            assert!(res.masks.contains(e), "{e}");
        }
        assert_eq!(res.purpose, "HRESCH");
        assert!(r.get("billing").unwrap().masks.contains("note"));
        assert!(r.get("clinician").unwrap().masks.is_empty());
        assert_eq!(r.get("billing").unwrap().purpose, "HPAYMT");
        assert_eq!(purpose("TREAT"), Some("TREAT"));
        assert_eq!(purpose("treat"), None);
    }

    #[test]
    fn least_privilege_matrix() {
        let r = roles();
        let can = |role: &str, t: &str, p: Perm| r.get(role).unwrap().allows(t, p);
        // (role, type, perm, expected)
        let cases = [
            ("clinician", "Observation", Delete, true),
            ("clinician", "Patient", Update, true),
            ("clinician", "AuditEvent", Read, false),
            ("nurse", "Observation", Update, true),
            ("nurse", "Observation", Delete, false),
            ("front-desk", "Patient", Create, true),
            ("front-desk", "Appointment", Update, true),
            ("front-desk", "Observation", Read, false),
            ("front-desk", "DocumentReference", Search, false),
            ("billing", "Claim", Create, true),
            ("billing", "Patient", Read, true),
            ("billing", "Patient", Update, false),
            ("billing", "Observation", Read, false),
            ("billing", "DocumentReference", Read, false),
            ("researcher", "Observation", Search, true),
            ("researcher", "Observation", Update, false),
            ("researcher", "Patient", Read, true),
            ("researcher", "Patient", Update, false),
            ("researcher", "Claim", Read, false),
            ("auditor", "AuditEvent", Search, true),
            ("auditor", "Observation", Read, false),
            ("auditor", "AuditEvent", Delete, false),
            ("admin", "Organization", Update, true),
            ("admin", "Patient", Read, false),
            ("admin", "Observation", Read, false),
            ("patient", "Observation", Read, true),
            ("patient", "Observation", Update, false),
        ];
        for (role, t, p, want) in cases {
            assert_eq!(can(role, t, p), want, "{role} {t} {p:?}");
        }
        assert!(
            !r.get("clinician").unwrap().allows_all(Read),
            "audit types are excluded"
        );
    }

    #[test]
    fn custom_roles_are_validated() {
        let known = |t: &str| ["Observation", "Patient", "AuditEvent"].contains(&t);
        let ok = CustomRole {
            name: "lab-tech".into(),
            description: "Lab".into(),
            grants: vec![(vec!["Observation".into()], "crus".into())],
            reach: ReachRule::CareRelationships,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "TREAT".into(),
            masks: Vec::new(),
        };
        let r = Roles::new(std::slice::from_ref(&ok), known).unwrap();
        assert!(r.get("lab-tech").unwrap().allows("Observation", Create));
        assert!(!r.get("lab-tech").unwrap().allows("Patient", Read));
        let bad = |name: &str, types: &[&str], perms: &str| CustomRole {
            name: name.into(),
            description: String::new(),
            grants: vec![(
                types.iter().map(|t| (*t).to_owned()).collect(),
                perms.into(),
            )],
            reach: ReachRule::Everyone,
            labelled: false,
            break_glass: false,
            erase: false,
            relationships: false,
            purpose: "TREAT".into(),
            masks: Vec::new(),
        };
        for (c, why) in [
            (bad("clinician", &["Patient"], "r"), "taken"),
            (bad("Lab Tech", &["Patient"], "r"), "lower-case"),
            (bad("x", &["Nonsense"], "r"), "unknown resource type"),
            (bad("x", &["AuditEvent"], "r"), "auditor"),
            (bad("x", &["Patient"], "rc"), "cruds"),
            (bad("x", &["*", "Patient"], "r"), "stands alone"),
            (bad("x", &[], "r"), "needs types"),
        ] {
            let e = Roles::new(&[c], known).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert!(Roles::new(&[ok.clone(), ok], known)
            .unwrap_err()
            .contains("taken"));
        // "*" never reaches audit records.
        let star = Roles::new(&[bad("reader", &["*"], "rs")], known).unwrap();
        assert!(!star.get("reader").unwrap().allows("AuditEvent", Read));
    }
}
