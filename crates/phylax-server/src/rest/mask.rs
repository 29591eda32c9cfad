//! Field-level minimisation: roles with masks (`researcher`: direct
//! identifiers; `billing`: clinical notes; custom roles) never receive the
//! masked elements. Applied to the final response, after `_elements` and
//! `_summary`, to every resource in it (Bundle entries, contained
//! resources, resources inside stored Bundles), each marked with the
//! `REDACTED` security label. When names are masked, so are the `display`
//! texts of references, which often repeat a name. Searching or sorting on
//! a masked element is refused: a match would reveal the value.

use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use phylax_auth::policy::Principal;
use phylax_fhir::ResourceType;
use serde_json::{json, Value};
use std::collections::BTreeSet;

pub const OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Largest response body the masking step will rewrite.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// The caller's masks, if any.
pub fn masks_of(ctx: &RequestCtx) -> Option<&BTreeSet<String>> {
    match ctx.principal() {
        Principal::User { role, .. } if !role.masks.is_empty() => Some(&role.masks),
        _ => None,
    }
}

/// Whether JSON key `k` is the element `e` (a choice element matches by
/// its base name: `value` covers `valueQuantity`).
fn is_element(k: &str, e: &str) -> bool {
    k == e
        || k.strip_prefix(e)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// The three kinds of mask (validated in `phylax_auth::roles`):
/// - `name`: the element of that name **at any depth** of a resource (a
///   choice element by its base name): `identifier` also removes
///   `Reference.identifier` and identifiers inside backbone elements;
/// - `Type.path.to.element`, with `Resource` for every type: that element
///   only (`Resource.text`: the narrative, not `CodeableConcept.text`);
/// - `extension:URL`: every `extension` and `modifierExtension` with that
///   url, at any depth (mother's maiden name, birth place).
struct Rules<'a> {
    names: Vec<&'a str>,
    paths: Vec<(&'a str, Vec<&'a str>)>,
    extensions: Vec<&'a str>,
    /// Names are masked: reference `display` texts (which often repeat a
    /// name) go too.
    displays: bool,
    /// The narrative is masked (`Resource.text`): every Narrative goes,
    /// the sections' of a Composition too, not only the resource's own.
    narratives: bool,
}

impl<'a> Rules<'a> {
    fn new(masks: &'a BTreeSet<String>) -> Rules<'a> {
        let mut r = Rules {
            names: Vec::new(),
            paths: Vec::new(),
            extensions: Vec::new(),
            displays: masks.contains("name"),
            narratives: masks.contains("Resource.text"),
        };
        for m in masks {
            if let Some(url) = m.strip_prefix("extension:") {
                r.extensions.push(url);
            } else if let Some((t, rest)) = m.split_once('.') {
                r.paths.push((t, rest.split('.').collect()));
            } else {
                r.names.push(m);
            }
        }
        r
    }

    /// Whether key `k` is a masked element, or the `_element` sibling of
    /// one (its extensions can carry the value: `_birthDate`'s birth time).
    fn masks_name(&self, k: &str) -> bool {
        let base = k.strip_prefix('_').unwrap_or(k);
        k != "resourceType" && self.names.iter().any(|m| is_element(base, m))
    }
}

/// Mask every resource inside `v`. Returns whether anything was removed.
pub fn mask_json(v: &mut Value, masks: &BTreeSet<String>) -> bool {
    let rules = Rules::new(masks);
    let mut any = false;
    walk(v, &rules, &mut any);
    any
}

/// Content that is not itself a resource; resources found inside are
/// masked (and marked) on their own.
fn walk(v: &mut Value, rules: &Rules<'_>, any: &mut bool) -> bool {
    match v {
        Value::Object(o) if o.contains_key("resourceType") => {
            let changed = mask_resource(o, rules, any);
            *any |= changed;
            false
        }
        Value::Object(o) => mask_object(o, rules, any),
        Value::Array(a) => {
            let mut changed = false;
            for x in a.iter_mut() {
                changed |= walk(x, rules, any);
            }
            changed
        }
        _ => false,
    }
}

/// Whether an object is a Reference (not a Coding, whose `display` is a
/// code's meaning, not a person's name).
fn is_reference(o: &serde_json::Map<String, Value>) -> bool {
    o.contains_key("reference")
        || o.contains_key("identifier")
        || (o.contains_key("display") && !o.contains_key("code") && !o.contains_key("system"))
}

fn mask_object(o: &mut serde_json::Map<String, Value>, rules: &Rules<'_>, any: &mut bool) -> bool {
    let mut changed = false;
    if rules.displays && is_reference(o) && o.remove("display").is_some() {
        changed = true;
    }
    let before = o.len();
    o.retain(|k, v| {
        !rules.masks_name(k)
            && !(rules.narratives && (k == "text" || k == "_text") && v.get("div").is_some())
    });
    changed |= o.len() != before;
    for (k, x) in o.iter_mut() {
        if (k == "extension" || k == "modifierExtension") && !rules.extensions.is_empty() {
            if let Value::Array(a) = x {
                let n = a.len();
                a.retain(|e| {
                    !e.get("url")
                        .and_then(Value::as_str)
                        .is_some_and(|u| rules.extensions.contains(&u))
                });
                changed |= a.len() != n;
            }
        }
        changed |= walk(x, rules, any);
    }
    changed
}

/// Remove the element at `path` under `v` (through arrays).
fn remove_path(v: &mut Value, path: &[&str]) -> bool {
    match (v, path) {
        (Value::Array(a), _) => {
            let mut changed = false;
            for x in a.iter_mut() {
                changed |= remove_path(x, path);
            }
            changed
        }
        (Value::Object(o), [last]) => {
            let before = o.len();
            o.retain(|k, _| !is_element(k.strip_prefix('_').unwrap_or(k), last));
            o.len() != before
        }
        (Value::Object(o), [head, rest @ ..]) => o
            .get_mut(*head)
            .is_some_and(|child| remove_path(child, rest)),
        _ => false,
    }
}

/// Mask one resource; marks it `REDACTED` when its own content changed.
fn mask_resource(
    o: &mut serde_json::Map<String, Value>,
    rules: &Rules<'_>,
    any: &mut bool,
) -> bool {
    let rtype = o
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut changed = false;
    for (t, path) in &rules.paths {
        if *t == "Resource" || *t == rtype {
            let mut tmp = Value::Object(std::mem::take(o));
            changed |= remove_path(&mut tmp, path);
            if let Value::Object(back) = tmp {
                *o = back;
            }
        }
    }
    changed |= mask_object(o, rules, any);
    if changed {
        let meta = o.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let sec = m.entry("security").or_insert_with(|| json!([]));
            if let Some(a) = sec.as_array_mut() {
                let mark = json!({"system": OBSERVATION_VALUE, "code": "REDACTED"});
                if !a.contains(&mark) {
                    a.push(mark);
                }
            }
        }
    }
    changed
}

/// Mask a finished FHIR JSON response (any status: an OperationOutcome
/// carries no masked element and passes unchanged).
pub async fn apply(r: Response, masks: &BTreeSet<String>) -> Response {
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    if !is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return Failure::Internal("response too large to mask".into()).into_response_safe();
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        // Not JSON after all: never send unmasked data by mistake.
        return Failure::Internal("response could not be masked".into()).into_response_safe();
    };
    mask_json(&mut v, masks);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(v.to_string()))
}

/// Refuse search and sort parameters that would test a masked element.
pub fn check_params(
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<(), Failure> {
    let Some(masks) = masks_of(ctx) else {
        return Ok(());
    };
    let defs = phylax_fhir::search::params(rtype);
    let touches = |code: &str| {
        defs.get(code).is_some_and(|p| {
            p.top_elements(rtype.as_str())
                .iter()
                .any(|e| masks.iter().any(|m| is_element(e, m)))
        })
    };
    for (k, v) in params {
        let names: Vec<&str> = if k == "_sort" {
            v.split(',')
                .map(|s| s.trim().trim_start_matches('-'))
                .collect()
        } else {
            vec![k.split([':', '.']).next().unwrap_or("")]
        };
        if names.iter().any(|n| touches(n)) {
            return Err(Failure::Masked);
        }
    }
    Ok(())
}

impl Failure {
    /// The response of an error, for the masking step's own failures.
    fn into_response_safe(self) -> Response {
        let mut r = axum::response::IntoResponse::into_response(self);
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(x: &[&str]) -> BTreeSet<String> {
        x.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn masks_every_resource_and_marks_it() {
        let masks = set(&["name", "identifier", "Resource.text", "value"]);
        let mut b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p", "name": [{"family": "X"}],
                "identifier": [{"value": "1"}], "gender": "female",
                "text": {"div": "<div>X</div>"},
                "contained": [{"resourceType": "RelatedPerson", "name": [{"family": "Y"}]}]}},
            {"resource": {"resourceType": "Observation", "id": "o", "valueQuantity": {"value": 1},
                "subject": {"reference": "Patient/p", "display": "X"}, "status": "final"}}]});
        assert!(mask_json(&mut b, &masks));
        let s = b.to_string();
        for gone in [
            "\"X\"",
            "\"Y\"",
            "identifier",
            "valueQuantity",
            "display",
            "<div>",
        ] {
            assert!(!s.contains(gone), "{gone} in {s}");
        }
        assert_eq!(b["entry"][0]["resource"]["gender"], "female");
        assert_eq!(
            b["entry"][0]["resource"]["meta"]["security"][0]["code"],
            "REDACTED"
        );
        assert_eq!(b["entry"][1]["resource"]["status"], "final");
        // The Bundle itself had nothing masked: no label on it.
        assert!(b.get("meta").is_none());
        // `valueString` is `value`; `valueSet` would not be (lower case).
        assert!(is_element("valueString", "value") && !is_element("values", "value"));
    }

    #[test]
    fn masks_apply_at_any_depth_by_path_and_by_extension() {
        let masks = set(&[
            "name",
            "identifier",
            "telecom",
            "address",
            "contact",
            "Resource.text",
            "extension:http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
        ]);
        let mut p = json!({"resourceType": "Patient", "id": "p", "gender": "male",
            "text": {"div": "<div>Secret</div>"},
            "extension": [
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Maiden"},
                {"url": "http://example.org/other", "valueString": "kept"}],
            "generalPractitioner": [{"identifier": {"value": "NPI-1"}, "display": "Dr Who"}],
            "communication": [{"language": {"coding": [{"code": "en", "display": "English"}], "text": "English"}}]});
        assert!(mask_json(&mut p, &masks));
        let s = p.to_string();
        for gone in ["Secret", "Maiden", "NPI-1", "Dr Who"] {
            assert!(!s.contains(gone), "{gone} in {s}");
        }
        assert!(s.contains("kept") && s.contains("English"), "{s}");
        assert_eq!(p["communication"][0]["language"]["text"], "English");
        // Nested: identifiers and names inside backbone elements.
        let mut c = json!({"resourceType": "Claim", "id": "c",
            "insurance": [{"sequence": 1, "identifier": {"value": "POLICY-9"}}],
            "careTeam": [{"provider": {"reference": "Practitioner/x", "display": "Dr Who"}}]});
        assert!(mask_json(&mut c, &masks));
        let s = c.to_string();
        assert!(!s.contains("POLICY-9") && !s.contains("Dr Who"), "{s}");
        assert_eq!(c["insurance"][0]["sequence"], 1);
    }

    #[test]
    fn sibling_underscores_nested_narratives_and_data() {
        let masks = set(&["birthDate", "Resource.text", "data"]);
        let mut p = json!({"resourceType": "Patient", "id": "p", "birthDate": "1961-07-04",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1961-07-04T06:30:00Z"}]}});
        assert!(mask_json(&mut p, &masks));
        assert!(!p.to_string().contains("1961"), "{p}");
        let mut c = json!({"resourceType": "Composition", "id": "c", "title": "Discharge",
            "section": [{"title": "Course", "text": {"status": "generated", "div": "<div>Ida Secret</div>"},
                "section": [{"text": {"status": "generated", "div": "<div>Deeper Secret</div>"}}]}],
            "type": {"text": "Discharge summary"}});
        assert!(mask_json(&mut c, &masks));
        let t = c.to_string();
        assert!(!t.contains("Secret"), "{t}");
        assert!(
            t.contains("Discharge summary"),
            "a CodeableConcept's text stays: {t}"
        );
        let mut b = json!({"resourceType": "Binary", "id": "b", "contentType": "text/plain", "data": "SWRh"});
        assert!(mask_json(&mut b, &masks));
        assert!(b.get("data").is_none());
    }
}
