//! Patient privacy consents as deny rules.
//!
//! An active FHIR R4 `Consent` with scope `patient-privacy` records a
//! patient's choice about who may see their data. Phylax enforces the
//! **deny** provisions: the root provision when its type is `deny`, and
//! each nested provision of type `deny`. A rule names actors (any
//! `Type/id` reference: a Practitioner, PractitionerRole, Organization,
//! RelatedPerson…), purposes of use (HL7 v3 ActReason codes) and a period;
//! whatever it leaves out it does not narrow (no actors: every requester
//! but the patient; no purposes: every purpose). Provisions are read at
//! any depth: every `deny` in the tree is a rule, whatever permits it
//! sits inside. Nested `permit` exceptions inside a deny are not applied:
//! the deny stays whole (the fail-closed reading).
//!
//! References are read in their canonical form
//! (`phylax_fhir::reference::target`: `Practitioner/x/_history/2` is
//! `Practitioner/x`). What cannot be read fails closed: an actor of a deny
//! that names no readable reference (an identifier, a display, another
//! server's URL) makes the rule deny every requester but the patient; a
//! purpose without a code makes it deny every purpose; a permit's
//! unreadable actor delegates nothing. A consent that is not active, has
//! another scope or names no readable patient yields no rule (it cannot
//! be attached to anyone: see docs/ACCESS_CONTROL.md).

use serde_json::Value;

pub const SCOPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/consentscope";

/// One deny rule of one patient's consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    pub patient: String,
    /// `Type/id` references; empty: every requester except the patient.
    pub actors: Vec<String>,
    /// Purpose of use codes; empty: every purpose.
    pub purposes: Vec<String>,
    /// In force from / until (ms since the epoch).
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
}

impl DenyRule {
    /// Does this rule deny a requester known by `refs`, for `purpose`, at
    /// `now_ms`?
    pub fn denies(&self, refs: &[String], purpose: &str, now_ms: i64) -> bool {
        self.applies(refs, purpose, now_ms)
    }

    /// Does this rule (a deny, or a delegation) apply to a requester known
    /// by `refs`, for `purpose`, at `now_ms`? Never to the patient.
    pub fn applies(&self, refs: &[String], purpose: &str, now_ms: i64) -> bool {
        if self.start_ms.is_some_and(|s| now_ms < s) || self.end_ms.is_some_and(|e| now_ms >= e) {
            return false;
        }
        if refs
            .iter()
            .any(|r| *r == format!("Patient/{}", self.patient))
        {
            return false;
        }
        let actor = self.actors.is_empty() || self.actors.iter().any(|a| refs.contains(a));
        let purpose = self.purposes.is_empty() || self.purposes.iter().any(|p| p == purpose);
        actor && purpose
    }
}

fn period(p: Option<&Value>) -> Bounds {
    let bound = |k: &str, end: bool| {
        p.and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .and_then(phylax_fhir::search::date_range)
            .map(|(lo, hi, _)| if end { hi } else { lo })
    };
    (bound("start", false), bound("end", true))
}

/// `Type/id` of a literal reference to a local resource, versions dropped.
fn canonical(r: &str) -> Option<String> {
    phylax_fhir::reference::target::<&str>(r, &[]).map(|(t, id)| format!("{t}/{id}"))
}

/// The types a requester is known by (a workforce user: their
/// Practitioner, its roles and organizations; a patient: their Patient and
/// RelatedPersons). A deny naming anything else (a CareTeam, a Group, a
/// Device) could match nobody: it is read as denying everyone (fail closed).
const REQUESTER_TYPES: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Patient",
    "RelatedPerson",
];

/// Elements that narrow a provision to some data or actions. A permit
/// carrying one does not grant a whole record, and is not read as a
/// delegation (fail closed).
const NARROWING: &[&str] = &[
    "data",
    "class",
    "code",
    "action",
    "securityLabel",
    "dataPeriod",
];

/// A provision as a rule. `unreadable` actors and purposes widen it: for a
/// deny, to every requester or every purpose (fail closed); a permit
/// drops them (no delegation to someone it cannot name).
fn rule(patient: &str, prov: &Value, inherited: Bounds, deny: bool) -> DenyRule {
    let mut unreadable_actor = false;
    let mut actors: Vec<String> = Vec::new();
    for a in prov
        .get("actor")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        match a
            .pointer("/reference/reference")
            .and_then(Value::as_str)
            .and_then(canonical)
        {
            Some(r)
                if REQUESTER_TYPES
                    .iter()
                    .any(|t| r.split('/').next() == Some(*t)) =>
            {
                actors.push(r)
            }
            _ => unreadable_actor = true,
        }
    }
    let mut unreadable_purpose = false;
    let mut purposes: Vec<String> = Vec::new();
    for c in prov
        .get("purpose")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        match c.get("code").and_then(Value::as_str) {
            Some(code) => purposes.push(code.to_owned()),
            None => unreadable_purpose = true,
        }
    }
    if deny && unreadable_actor {
        actors.clear();
    }
    if deny && unreadable_purpose {
        purposes.clear();
    }
    let (s, e) = period(prov.get("period"));
    DenyRule {
        patient: patient.to_owned(),
        actors,
        purposes,
        start_ms: s.or(inherited.0),
        end_ms: e.or(inherited.1),
    }
}

/// A period's bounds (ms since the epoch), either open.
type Bounds = (Option<i64>, Option<i64>);

/// Where a provision sits in its tree.
#[derive(Debug, Clone, Copy, Default)]
struct Context {
    /// The period of the nearest ancestor that sets one (a deny's own
    /// period, if any, replaces it: never narrower than the FHIR reading).
    inherited: Bounds,
    /// Every ancestor's period intersected (a permit never outlasts one).
    within: Bounds,
    /// Some ancestor is a deny (a permit inside it is an exception to a
    /// deny, not a grant).
    under_deny: bool,
}

fn intersect(a: Bounds, b: Bounds) -> Bounds {
    let start = match (a.0, b.0) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let end = match (a.1, b.1) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    (start, end)
}

/// Every provision of the tree under `root` (root included), with where
/// it sits.
fn provisions(root: &Value) -> Vec<(&Value, Context)> {
    let mut out = Vec::new();
    let mut stack = vec![(root, Context::default())];
    while let Some((p, cx)) = stack.pop() {
        out.push((p, cx));
        let own = period(p.get("period"));
        let pass = Context {
            inherited: (own.0.or(cx.inherited.0), own.1.or(cx.inherited.1)),
            within: intersect(cx.within, own),
            under_deny: cx.under_deny || p.get("type").and_then(Value::as_str) == Some("deny"),
        };
        // Reversed onto the stack: provisions come out in document order.
        for child in p
            .get("provision")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .rev()
        {
            stack.push((child, pass));
        }
    }
    out
}

/// Delegations in one Consent: its `permit` provisions (root or nested)
/// naming another person as actor, as a `Patient/{id}` or a
/// `RelatedPerson/{id}`: that person may use the consenting patient's
/// record as their own, e.g. a parent for a child. Returned as rules whose
/// `actors` are those references. Same conditions as [`deny_rules`]
/// (active, patient-privacy, a patient); purposes and periods narrow them
/// the same way.
pub fn delegations(consent: &Value) -> Vec<DenyRule> {
    let Some((patient, root)) = privacy_consent(consent) else {
        return Vec::new();
    };
    let me = format!("Patient/{patient}");
    provisions(root)
        .into_iter()
        .filter(|(p, cx)| {
            p.get("type").and_then(Value::as_str) == Some("permit")
                && !cx.under_deny
                && !NARROWING.iter().any(|n| p.get(*n).is_some())
        })
        .filter_map(|(p, cx)| {
            // A delegation lasts only while every enclosing period does.
            let mut r = rule(&patient, p, (None, None), false);
            let own = (r.start_ms, r.end_ms);
            (r.start_ms, r.end_ms) = intersect(cx.within, own);
            r.actors.retain(|a| {
                (a.starts_with("Patient/") || a.starts_with("RelatedPerson/")) && *a != me
            });
            (!r.actors.is_empty()).then_some(r)
        })
        .collect()
}

/// An active patient-privacy consent's patient (canonical id) and root
/// provision.
fn privacy_consent(consent: &Value) -> Option<(String, &Value)> {
    if consent.get("status").and_then(Value::as_str) != Some("active") {
        return None;
    }
    let privacy = consent
        .pointer("/scope/coding")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(SCOPE_SYSTEM)
                    && c.get("code").and_then(Value::as_str) == Some("patient-privacy")
            })
        });
    let patient = consent
        .pointer("/patient/reference")
        .and_then(Value::as_str)
        .and_then(|r| phylax_fhir::reference::target::<&str>(r, &[]))
        .filter(|(t, _)| *t == "Patient")
        .map(|(_, id)| id.to_owned())?;
    let root = consent.get("provision")?;
    privacy.then_some((patient, root))
}

/// The deny rules of one Consent resource.
pub fn deny_rules(consent: &Value) -> Vec<DenyRule> {
    let Some((patient, root)) = privacy_consent(consent) else {
        return Vec::new();
    };
    provisions(root)
        .into_iter()
        .filter(|(p, _)| p.get("type").and_then(Value::as_str) == Some("deny"))
        .map(|(p, cx)| rule(&patient, p, cx.inherited, true))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn consent(provision: Value) -> Value {
        json!({"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
            "patient": {"reference": "Patient/p1"}, "provision": provision})
    }

    #[test]
    fn deny_provisions_become_rules() {
        let c = consent(json!({"type": "permit", "provision": [
            {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/dr-x"}}]},
            {"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]},
            {"type": "permit", "actor": [{"reference": {"reference": "Organization/o"}}]}]}));
        let rules = deny_rules(&c);
        assert_eq!(rules.len(), 2);
        let now = 1_700_000_000_000;
        let dr_x = vec!["Practitioner/dr-x".to_owned()];
        let dr_y = vec!["Practitioner/dr-y".to_owned(), "Organization/o".to_owned()];
        assert!(rules[0].denies(&dr_x, "TREAT", now));
        assert!(!rules[0].denies(&dr_y, "TREAT", now));
        assert!(rules[1].denies(&dr_y, "HRESCH", now));
        assert!(!rules[1].denies(&dr_y, "TREAT", now));
        // The patient is never denied their own data.
        let me = vec!["Patient/p1".to_owned()];
        assert!(!rules[1].denies(&me, "HRESCH", now));
    }

    #[test]
    fn only_active_privacy_consents_with_a_patient_count() {
        let deny_all = json!({"type": "deny"});
        assert_eq!(deny_rules(&consent(deny_all.clone())).len(), 1);
        let mut c = consent(deny_all.clone());
        c["status"] = json!("inactive");
        assert!(deny_rules(&c).is_empty());
        let mut c = consent(deny_all.clone());
        c["scope"]["coding"][0]["code"] = json!("research");
        assert!(deny_rules(&c).is_empty());
        let mut c = consent(deny_all);
        c["patient"] = json!({"reference": "Group/g"});
        assert!(deny_rules(&c).is_empty());
    }

    #[test]
    fn permits_naming_a_patient_are_delegations() {
        let c = consent(json!({"type": "permit", "actor": [
            {"reference": {"reference": "Patient/parent"}},
            {"reference": {"reference": "Practitioner/x"}}],
            "provision": [{"type": "deny", "actor": [{"reference": {"reference": "Patient/other"}}]}]}));
        let d = delegations(&c);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].patient, "p1");
        assert_eq!(d[0].actors, vec!["Patient/parent"]);
        // Deny provisions and inactive consents delegate nothing.
        assert!(delegations(&consent(
            json!({"type": "deny", "actor": [{"reference": {"reference": "Patient/parent"}}]})
        ))
        .is_empty());
        let mut c2 = c.clone();
        c2["status"] = json!("rejected");
        assert!(delegations(&c2).is_empty());
    }

    #[test]
    fn periods_bound_a_rule() {
        let c = consent(
            json!({"type": "deny", "period": {"start": "2024-01-01", "end": "2024-12-31"}}),
        );
        let r = &deny_rules(&c)[0];
        let who = vec!["Practitioner/a".to_owned()];
        let at = |s: &str| phylax_fhir::search::date_range(s).unwrap().0;
        assert!(!r.denies(&who, "TREAT", at("2023-06-01")));
        assert!(r.denies(&who, "TREAT", at("2024-06-01")));
        assert!(
            r.denies(&who, "TREAT", at("2024-12-31T12:00:00Z")),
            "the end day is included"
        );
        assert!(!r.denies(&who, "TREAT", at("2025-01-01")));
    }

    #[test]
    fn nested_denies_at_any_depth_and_canonical_references() {
        let c = consent(json!({"type": "permit", "provision": [
            {"type": "permit", "period": {"start": "2024-01-01"}, "provision": [
                {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/dr-x/_history/3"}}]}]}]}));
        let rules = deny_rules(&c);
        assert_eq!(rules.len(), 1, "a deny two levels down");
        let at = |s: &str| phylax_fhir::search::date_range(s).unwrap().0;
        let dr_x = vec!["Practitioner/dr-x".to_owned()];
        assert!(rules[0].denies(&dr_x, "TREAT", at("2024-06-01")));
        assert!(
            !rules[0].denies(&dr_x, "TREAT", at("2023-06-01")),
            "inherits the period"
        );
        // A versioned patient reference is the same patient.
        let mut v = consent(json!({"type": "deny"}));
        v["patient"]["reference"] = json!("Patient/p1/_history/2");
        assert_eq!(deny_rules(&v)[0].patient, "p1");
        let d = delegations(&consent(json!({"type": "permit",
            "actor": [{"reference": {"reference": "Patient/parent/_history/1"}}]})));
        assert_eq!(d[0].actors, vec!["Patient/parent"]);
    }

    #[test]
    fn what_cannot_be_read_fails_closed() {
        let now = 1_700_000_000_000;
        let anyone = vec!["Practitioner/someone".to_owned()];
        // An actor named only by identifier: the deny covers everyone.
        let c = consent(json!({"type": "deny", "actor": [
            {"reference": {"identifier": {"system": "urn:npi", "value": "1"}}}]}));
        assert!(deny_rules(&c)[0].denies(&anyone, "TREAT", now));
        // A purpose without a code: every purpose.
        let c = consent(json!({"type": "deny", "purpose": [{"display": "research"}]}));
        assert!(deny_rules(&c)[0].denies(&anyone, "TREAT", now));
        // A permit's unreadable actor delegates nothing.
        let c = consent(json!({"type": "permit", "actor": [
            {"reference": {"reference": "https://elsewhere.example/fhir/Patient/x"}}]}));
        assert!(delegations(&c).is_empty());
    }

    #[test]
    fn denies_naming_no_requester_type_deny_everyone_and_delegations_stay_narrow() {
        let now = 1_700_000_000_000;
        let dr = vec!["Practitioner/dr".to_owned()];
        let c = consent(
            json!({"type": "deny", "actor": [{"reference": {"reference": "CareTeam/ct1"}}]}),
        );
        assert!(deny_rules(&c)[0].denies(&dr, "TREAT", now));
        // A permit inside a deny is an exception, not a delegation.
        let c = consent(json!({"type": "deny", "provision": [
            {"type": "permit", "actor": [{"reference": {"reference": "Patient/parent"}}]}]}));
        assert!(delegations(&c).is_empty());
        // A permit narrowed to some data grants no whole record.
        let c = consent(
            json!({"type": "permit", "actor": [{"reference": {"reference": "Patient/parent"}}],
            "class": [{"code": "Observation"}]}),
        );
        assert!(delegations(&c).is_empty());
        // A nested permit does not outlast its parent.
        let c = consent(
            json!({"type": "permit", "period": {"start": "2024-01-01", "end": "2024-06-30"},
            "provision": [{"type": "permit", "period": {"start": "2024-03-01", "end": "2030-01-01"},
                "actor": [{"reference": {"reference": "Patient/parent"}}]}]}),
        );
        let d = delegations(&c);
        let at = |s: &str| phylax_fhir::search::date_range(s).unwrap().0;
        let parent = vec!["Patient/parent".to_owned()];
        assert!(d
            .iter()
            .any(|r| r.applies(&parent, "PATRQT", at("2024-04-01"))));
        assert!(!d
            .iter()
            .any(|r| r.applies(&parent, "PATRQT", at("2025-01-01"))));
        assert!(!d
            .iter()
            .any(|r| r.applies(&parent, "PATRQT", at("2024-02-01"))));
    }
}
