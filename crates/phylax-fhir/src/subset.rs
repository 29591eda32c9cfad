//! `_summary` and `_elements`: returning part of a resource.
//!
//! A subsetted resource is marked with the `SUBSETTED` tag (as the
//! specification requires) so nobody mistakes it for the whole resource
//! and writes it back. Mandatory top-level elements are always kept, so
//! the result stays a valid resource.

use crate::defs::definitions;
use serde_json::{json, Map, Value};

/// A `_summary` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    /// Elements marked `isSummary` in the definitions.
    True,
    /// `text`, `id`, `meta` and mandatory elements.
    Text,
    /// Everything but `text`.
    Data,
    /// No resources, only the total.
    Count,
    /// The whole resource.
    False,
}

impl Summary {
    pub fn parse(s: &str) -> Option<Summary> {
        Some(match s {
            "true" => Summary::True,
            "text" => Summary::Text,
            "data" => Summary::Data,
            "count" => Summary::Count,
            "false" => Summary::False,
            _ => return None,
        })
    }
}

/// The element a JSON key belongs to: `_birthDate` (a primitive's
/// extensions) is `birthDate`; `deceasedBoolean` is the choice `deceased`.
fn element_of(rtype: &str, key: &str) -> String {
    let key = key.strip_prefix('_').unwrap_or(key);
    let defs = definitions();
    if let Some(els) = defs.structure(rtype) {
        if els.contains_key(key) {
            return key.to_owned();
        }
        for (name, el) in els {
            if el.choice {
                if let Some(rest) = key.strip_prefix(name.as_str()) {
                    if rest.starts_with(|c: char| c.is_ascii_uppercase()) {
                        return name.clone();
                    }
                }
            }
        }
    }
    key.to_owned()
}

fn mandatory(rtype: &str, element: &str) -> bool {
    definitions()
        .structure(rtype)
        .and_then(|els| els.get(element))
        .is_some_and(|e| e.min > 0)
}

fn keep(resource: &Value, f: impl Fn(&str, &str) -> bool) -> Value {
    let Some(obj) = resource.as_object() else {
        return resource.clone();
    };
    let rtype = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut out = Map::new();
    for (k, v) in obj {
        let el = element_of(rtype, k);
        if matches!(k.as_str(), "resourceType" | "id" | "meta")
            || mandatory(rtype, &el)
            || f(rtype, &el)
        {
            out.insert(k.clone(), v.clone());
        }
    }
    let mut out = Value::Object(out);
    mark_subsetted(&mut out);
    out
}

/// Add the `SUBSETTED` tag to `meta.tag`.
pub fn mark_subsetted(v: &mut Value) {
    let Some(obj) = v.as_object_mut() else { return };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    if let Some(tags) = tags.as_array_mut() {
        tags.push(json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED",
            "display": "subsetted"
        }));
    }
}

/// Apply a `_summary` mode (`Count` and `False` return the resource whole;
/// the caller handles `Count` by returning no resources).
pub fn summary(resource: &Value, mode: Summary) -> Value {
    match mode {
        Summary::False | Summary::Count => resource.clone(),
        Summary::True => keep(resource, |t, el| definitions().is_summary(t, el)),
        Summary::Text => keep(resource, |_, el| el == "text"),
        Summary::Data => keep(resource, |_, el| el != "text"),
    }
}

/// Keep only the named top-level elements (plus `id`, `meta` and the
/// mandatory ones). Names are element names (`deceased`, not
/// `deceasedBoolean`).
pub fn elements(resource: &Value, names: &[String]) -> Value {
    keep(resource, |_, el| names.iter().any(|n| n == el))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> Value {
        json!({"resourceType":"Patient","id":"p","meta":{"versionId":"1"},
            "text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "name":[{"family":"F"}],"birthDate":"1970","_birthDate":{"extension":[]},
            "deceasedBoolean":false,"contact":[{"name":{"family":"C"}}],"communication":[]})
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort();
        k
    }

    #[test]
    fn summary_modes() {
        let p = patient();
        assert_eq!(
            keys(&summary(&p, Summary::True)),
            [
                "_birthDate",
                "birthDate",
                "deceasedBoolean",
                "id",
                "meta",
                "name",
                "resourceType"
            ]
        );
        assert_eq!(
            keys(&summary(&p, Summary::Text)),
            ["id", "meta", "resourceType", "text"]
        );
        assert!(!keys(&summary(&p, Summary::Data)).contains(&"text"));
        assert!(keys(&summary(&p, Summary::Data)).contains(&"contact"));
        assert_eq!(summary(&p, Summary::False), p);
        let s = summary(&p, Summary::True);
        assert_eq!(s["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(s["meta"]["versionId"], "1");
    }

    #[test]
    fn elements_keep_named_and_mandatory() {
        let p = patient();
        assert_eq!(
            keys(&elements(&p, &["birthDate".into(), "deceased".into()])),
            [
                "_birthDate",
                "birthDate",
                "deceasedBoolean",
                "id",
                "meta",
                "resourceType"
            ]
        );
        // Observation.status and .code are mandatory: always kept.
        let o = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"note":[{"text":"n"}],"valueString":"v"});
        assert_eq!(
            keys(&elements(&o, &["value".into()])),
            ["code", "meta", "resourceType", "status", "valueString"]
        );
    }
}
