//! Patient compartment membership, from the official Patient
//! CompartmentDefinition. Phylax uses it to pick the data key a resource is
//! sealed with: each patient's data has its own key.

use crate::defs::definitions;
use crate::ids::{is_valid_id, ResourceType};
use serde_json::Value;

/// The id of the patient whose compartment `resource` belongs to, if any.
///
/// A `Patient` is in its own compartment. Other types are in the compartment
/// of the first patient referenced (as `Patient/{id}`) through the
/// definition's compartment parameters, in the definition's order, so the
/// answer is deterministic. A resource that references several patients
/// (e.g. a `Group`) is sealed with the first one's key; see
/// docs/ARCHITECTURE.md.
pub fn patient_of(rtype: &ResourceType, resource: &Value) -> Option<String> {
    if rtype.as_str() == "Patient" {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
            .map(str::to_owned);
    }
    for path in definitions().compartment_paths(rtype.as_str()) {
        let mut found = None;
        walk(resource, path, &mut |node| {
            if found.is_none() {
                found = patient_reference(node);
            }
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether resources of `rtype` can be in a Patient compartment at all
/// (the official CompartmentDefinition names the type).
pub fn is_compartment_type(rtype: &str) -> bool {
    rtype == "Patient" || !definitions().compartment_params(rtype).is_empty()
}

/// Every patient whose compartment `resource` is in (any compartment
/// parameter referencing `Patient/{id}`; a `Patient` is in its own), without
/// repeats, in the definition's order. Access decisions use this: a resource
/// is reachable when any of its patients is (the same rule the search side
/// applies through the compartment index entries).
pub fn patients_of(rtype: &ResourceType, resource: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if rtype.as_str() == "Patient" {
        if let Some(id) = resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
        {
            out.push(id.to_owned());
        }
    }
    for path in definitions().compartment_paths(rtype.as_str()) {
        walk(resource, path, &mut |node| {
            if let Some(p) = patient_reference(node) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        });
    }
    out
}

/// Every patient a resource refers to anywhere, not only through the
/// compartment's parameters: a Binary's `securityContext`, a
/// DocumentReference's `context.sourcePatientInfo`, a Provenance's agent,
/// references inside contained resources. What an audit record names
/// when the resource is disclosed: a patient whose data left must be
/// found in the log, whatever field names them.
pub fn patients_named(resource: &Value) -> Vec<String> {
    fn go(node: &Value, out: &mut Vec<String>) {
        match node {
            Value::Object(m) => {
                if let Some(p) = patient_reference(node) {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
                m.values().for_each(|v| go(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| go(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    go(resource, &mut out);
    out
}

fn walk(node: &Value, path: &[String], f: &mut dyn FnMut(&Value)) {
    match node {
        Value::Array(items) => items.iter().for_each(|i| walk(i, path, f)),
        Value::Object(map) => match path.split_first() {
            None => f(node),
            Some((head, rest)) => {
                if let Some(child) = map.get(head.as_str()) {
                    walk(child, rest, f);
                }
            }
        },
        _ => {}
    }
}

/// Stored resources carry only relative references to local resources
/// ([`crate::reference::canonicalize`] runs before sealing), so the
/// canonical reading needs no base here.
fn patient_reference(reference: &Value) -> Option<String> {
    let r = reference.get("reference")?.as_str()?;
    match crate::reference::target::<&str>(r, &[])? {
        ("Patient", id) => Some(id.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> ResourceType {
        ResourceType::parse(s).unwrap()
    }

    #[test]
    fn every_patient_named_anywhere() {
        let b = json!({"resourceType":"Binary","securityContext":{"reference":"Patient/p24"}});
        assert_eq!(patients_named(&b), vec!["p24"]);
        let d = json!({"resourceType":"DocumentReference","context":{"sourcePatientInfo":{"reference":"Patient/p23"}},
            "contained":[{"resourceType":"Provenance","agent":[{"who":{"reference":"Patient/p12"}}]}],
            "author":[{"reference":"Practitioner/x"}]});
        let mut named = patients_named(&d);
        named.sort();
        assert_eq!(named, vec!["p12", "p23"]);
    }

    #[test]
    fn every_patient_of_a_resource() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/p2"},
            "performer":[{"reference":"Practitioner/x"},{"reference":"Patient/p3/_history/2"},{"reference":"Patient/p2"}]});
        assert_eq!(patients_of(&t("Observation"), &obs), vec!["p2", "p3"]);
        let p =
            json!({"resourceType":"Patient","id":"a","link":[{"other":{"reference":"Patient/b"}}]});
        assert_eq!(patients_of(&t("Patient"), &p), vec!["a", "b"]);
        assert!(patients_of(&t("Observation"), &json!({"resourceType":"Observation"})).is_empty());
        assert!(is_compartment_type("Observation") && is_compartment_type("Patient"));
        assert!(!is_compartment_type("Practitioner") && !is_compartment_type("Binary"));
    }

    #[test]
    fn finds_the_patient() {
        assert_eq!(
            patient_of(&t("Patient"), &json!({"resourceType":"Patient","id":"p1"})),
            Some("p1".into())
        );
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/p2"}});
        assert_eq!(patient_of(&t("Observation"), &obs), Some("p2".into()));
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Group/g"},
            "performer":[{"reference":"Practitioner/x"},{"reference":"Patient/p3/_history/2"}]});
        assert_eq!(patient_of(&t("Observation"), &obs), Some("p3".into()));
        let enc = json!({"resourceType":"Group","member":[{"entity":{"reference":"Patient/p4"}}]});
        assert_eq!(patient_of(&t("Group"), &enc), Some("p4".into()));
        let org = json!({"resourceType":"Organization","name":"x"});
        assert_eq!(patient_of(&t("Organization"), &org), None);
        let bad = json!({"resourceType":"Observation","subject":{"reference":"Patient/a b"}});
        assert_eq!(patient_of(&t("Observation"), &bad), None);
    }
}
