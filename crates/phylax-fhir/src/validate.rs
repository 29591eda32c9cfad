//! Structural validation of resources against the R4 StructureDefinitions.
//!
//! Checked: the resource type; unknown elements; JSON types; primitive
//! formats (the spec's regular expressions plus calendar validity);
//! cardinality (required elements, arrays vs single values); choice types
//! (exactly one `value[x]` variant); primitive extensions (`_element`);
//! contained resources (recursively, without nested `contained`);
//! extensions' shape (`url` plus either `value[x]` or nested extensions);
//! reference format; narrative XHTML without active content.
//!
//! Not checked (documented in docs/ARCHITECTURE.md): terminology bindings,
//! FHIRPath invariants other than ext-1, profiles other than the base.

use crate::defs::{definitions, Definitions, ElementDef};
use crate::ids::{is_valid_id, ResourceType};
use crate::outcome::{Issue, IssueCode};
use base64::Engine;
use regex::Regex;
use serde_json::{Map, Value};
use std::sync::OnceLock;

/// Longest string accepted in any element (FHIR suggests 1 MB).
const MAX_STRING: usize = 1024 * 1024;
/// Stop collecting after this many issues: a hostile body should not make
/// the error response larger than the request.
const MAX_ISSUES: usize = 100;

/// Validate a parsed resource. On success returns its resource type.
pub fn validate_resource(v: &Value) -> Result<ResourceType, Vec<Issue>> {
    let mut cx = Cx {
        defs: definitions(),
        issues: Vec::new(),
    };
    let rt = cx.resource(v, "", true);
    if cx.issues.is_empty() {
        // A resource with no issues always has a parsed type.
        rt.ok_or_else(|| vec![Issue::error(IssueCode::Structure, "not a FHIR resource")])
    } else {
        Err(cx.issues)
    }
}

struct Cx<'d> {
    defs: &'d Definitions,
    issues: Vec<Issue>,
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl Cx<'_> {
    fn err(&mut self, code: IssueCode, path: &str, msg: impl Into<String>) {
        if self.issues.len() < MAX_ISSUES {
            let mut i = Issue::error(code, msg);
            if !path.is_empty() {
                i = i.at(path);
            }
            self.issues.push(i);
        }
    }

    /// Validate a resource object; `path` is the location of the resource
    /// itself ("" at the root, `Patient.contained[0]` when contained).
    fn resource(&mut self, v: &Value, path: &str, allow_contained: bool) -> Option<ResourceType> {
        let Some(obj) = v.as_object() else {
            self.err(
                IssueCode::Structure,
                path,
                "a resource must be a JSON object",
            );
            return None;
        };
        let Some(name) = obj.get("resourceType").and_then(Value::as_str) else {
            self.err(IssueCode::Required, path, "resourceType is required");
            return None;
        };
        let Some(rt) = ResourceType::parse(name) else {
            self.err(
                IssueCode::NotSupported,
                path,
                "resourceType is not a FHIR R4 resource type",
            );
            return None;
        };
        let here = if path.is_empty() {
            rt.as_str().to_owned()
        } else {
            path.to_owned()
        };
        if !allow_contained && obj.contains_key("contained") {
            self.err(
                IssueCode::Structure,
                &join(&here, "contained"),
                "a contained resource must not contain other resources",
            );
        }
        self.structure(obj, rt.as_str(), &here, true);
        Some(rt)
    }

    /// Find the definition for a JSON property name of structure `sname`.
    /// Returns (element name, definition, the single type it must have).
    fn lookup<'a>(
        els: &'a std::collections::HashMap<String, ElementDef>,
        key: &str,
    ) -> Option<(&'a str, &'a ElementDef, &'a str)> {
        if let Some((n, d)) = els.get_key_value(key) {
            if !d.choice {
                return d.types.first().map(|t| (n.as_str(), d, t.as_str()));
            }
        }
        for (n, d) in els.iter().filter(|(_, d)| d.choice) {
            if let Some(suffix) = key.strip_prefix(n.as_str()) {
                if let Some(t) = d.types.iter().find(|t| upper_first(t) == suffix) {
                    return Some((n.as_str(), d, t.as_str()));
                }
            }
        }
        None
    }

    fn structure(&mut self, obj: &Map<String, Value>, sname: &str, path: &str, is_resource: bool) {
        let defs = self.defs;
        let Some(els) = defs.structure(sname) else {
            // Every type code in the table has a structure or is primitive;
            // an unknown one means the generated table is incomplete.
            self.err(IssueCode::NotSupported, path, "type is not supported");
            return;
        };
        if obj.is_empty() {
            self.err(IssueCode::Structure, path, "an object must not be empty");
            return;
        }
        let mut choices_seen: Vec<(&str, &str)> = Vec::new();
        for (key, value) in obj {
            if is_resource && key == "resourceType" {
                continue;
            }
            let (base, is_ext) = match key.strip_prefix('_') {
                Some(b) => (b, true),
                None => (key.as_str(), false),
            };
            let here = join(path, base);
            let Some((ename, edef, ty)) = Self::lookup(els, base) else {
                self.err(
                    IssueCode::Structure,
                    &join(path, &key.chars().take(64).collect::<String>()),
                    "unknown element",
                );
                continue;
            };
            if edef.choice {
                if let Some((_, other)) =
                    choices_seen.iter().find(|(n, k)| *n == ename && *k != base)
                {
                    let msg = format!("only one of {ename}[x] may be present (also {other})");
                    self.err(IssueCode::Structure, &here, msg);
                }
                choices_seen.push((ename, base));
            }
            if is_ext {
                if !defs.is_primitive(ty) {
                    self.err(
                        IssueCode::Structure,
                        &here,
                        "a `_` property is only allowed for primitive elements",
                    );
                    continue;
                }
                self.primitive_extension(value, edef.many, &here);
                continue;
            }
            let has_ext = obj.contains_key(&format!("_{key}"));
            if edef.many {
                let Some(items) = value.as_array() else {
                    self.err(IssueCode::Structure, &here, "must be a JSON array");
                    continue;
                };
                if items.is_empty() {
                    self.err(IssueCode::Structure, &here, "an array must not be empty");
                }
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{here}[{i}]");
                    if item.is_null() {
                        if !has_ext {
                            self.err(IssueCode::Structure, &p, "null is not allowed here");
                        }
                        continue;
                    }
                    self.value(item, ty, &p);
                }
            } else {
                if value.is_array() {
                    self.err(
                        IssueCode::Structure,
                        &here,
                        "must be a single value, not an array",
                    );
                    continue;
                }
                if value.is_null() {
                    self.err(IssueCode::Structure, &here, "null is not allowed here");
                    continue;
                }
                self.value(value, ty, &here);
            }
        }
        for (name, def) in els.iter().filter(|(_, d)| d.min > 0) {
            let present = if def.choice {
                choices_seen.iter().any(|(n, _)| *n == name.as_str())
            } else {
                obj.contains_key(name.as_str()) || obj.contains_key(&format!("_{name}"))
            };
            if !present {
                let n = if def.choice {
                    format!("{name}[x]")
                } else {
                    name.clone()
                };
                self.err(
                    IssueCode::Required,
                    &join(path, &n),
                    "required element is missing",
                );
            }
        }
        match sname {
            "Extension" => self.extension_shape(obj, path),
            "Reference" => self.reference_format(obj, path),
            _ => {}
        }
    }

    fn value(&mut self, v: &Value, ty: &str, path: &str) {
        if self.defs.is_primitive(ty) {
            self.primitive(v, ty, path);
        } else if ty == "Resource" {
            // A contained resource may not itself contain resources; a
            // Bundle entry or Parameters resource may.
            let is_contained = path
                .rsplit('.')
                .next()
                .is_some_and(|last| last.starts_with("contained["));
            self.resource(v, path, !is_contained);
        } else {
            let Some(obj) = v.as_object() else {
                self.err(IssueCode::Structure, path, "must be a JSON object");
                return;
            };
            self.structure(obj, ty, path, false);
        }
    }

    fn primitive_extension(&mut self, v: &Value, many: bool, path: &str) {
        let check = |cx: &mut Self, item: &Value, p: &str| match item.as_object() {
            Some(o) if !o.is_empty() => {
                for (k, val) in o {
                    match k.as_str() {
                        "id" => cx.primitive(val, "string", &join(p, "id")),
                        "extension" => match val.as_array() {
                            Some(a) if !a.is_empty() => {
                                for (i, e) in a.iter().enumerate() {
                                    cx.value(e, "Extension", &format!("{p}.extension[{i}]"));
                                }
                            }
                            _ => cx.err(
                                IssueCode::Structure,
                                p,
                                "extension must be a non-empty array",
                            ),
                        },
                        _ => cx.err(
                            IssueCode::Structure,
                            p,
                            "unknown element in primitive extension",
                        ),
                    }
                }
            }
            _ => cx.err(
                IssueCode::Structure,
                p,
                "primitive extension must be a non-empty object",
            ),
        };
        if many {
            match v.as_array() {
                Some(a) => {
                    for (i, item) in a.iter().enumerate() {
                        if !item.is_null() {
                            check(self, item, &format!("{path}[{i}]"));
                        }
                    }
                }
                None => self.err(IssueCode::Structure, path, "must be a JSON array"),
            }
        } else {
            check(self, v, path);
        }
    }

    fn extension_shape(&mut self, obj: &Map<String, Value>, path: &str) {
        let has_value = obj.keys().any(|k| k.starts_with("value"));
        let has_nested = obj.contains_key("extension");
        if has_value == has_nested {
            self.err(
                IssueCode::Structure,
                path,
                "an extension must have either a value[x] or nested extensions, not both (ext-1)",
            );
        }
    }

    fn reference_format(&mut self, obj: &Map<String, Value>, path: &str) {
        let Some(r) = obj.get("reference").and_then(Value::as_str) else {
            return;
        };
        if !is_valid_reference(r) {
            self.err(
                IssueCode::Value,
                &join(path, "reference"),
                "reference must be Type/id, Type/id/_history/vid, #local, urn:uuid:, urn:oid: or an absolute URL",
            );
        }
    }

    fn primitive(&mut self, v: &Value, ty: &str, path: &str) {
        match ty {
            "boolean" => {
                if !v.is_boolean() {
                    self.err(IssueCode::Value, path, "must be a JSON boolean");
                }
            }
            "integer" | "positiveInt" | "unsignedInt" => {
                let n = v
                    .as_number()
                    .and_then(|n| n.to_string().parse::<i64>().ok());
                let ok = match (ty, n) {
                    (_, None) => false,
                    ("positiveInt", Some(n)) => (1..=i32::MAX as i64).contains(&n),
                    ("unsignedInt", Some(n)) => (0..=i32::MAX as i64).contains(&n),
                    (_, Some(n)) => (i32::MIN as i64..=i32::MAX as i64).contains(&n),
                };
                if !ok {
                    self.err(
                        IssueCode::Value,
                        path,
                        format!("must be a JSON number of type {ty}"),
                    );
                }
            }
            "decimal" => {
                let ok = v.as_number().is_some_and(|n| {
                    n.to_string().len() <= 64 && decimal_re().is_match(&n.to_string())
                });
                if !ok {
                    self.err(IssueCode::Value, path, "must be a JSON number (decimal)");
                }
            }
            _ => {
                let Some(s) = v.as_str() else {
                    self.err(
                        IssueCode::Value,
                        path,
                        format!("must be a JSON string ({ty})"),
                    );
                    return;
                };
                if s.len() > MAX_STRING {
                    self.err(IssueCode::TooLong, path, "string is too long");
                    return;
                }
                if !string_ok(ty, s) {
                    self.err(IssueCode::Value, path, format!("not a valid {ty}"));
                }
            }
        }
    }
}

fn decimal_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    // Proven-valid literal regex.
    #[allow(clippy::unwrap_used)]
    R.get_or_init(|| Regex::new(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$").unwrap())
}

fn regex_for(ty: &str) -> Option<&'static Regex> {
    macro_rules! re {
        ($pat:expr) => {{
            static R: OnceLock<Regex> = OnceLock::new();
            // Literal patterns from the FHIR R4 datatypes page; proven valid
            // by the unit tests.
            #[allow(clippy::unwrap_used)]
            Some(R.get_or_init(|| Regex::new(concat!("^(?:", $pat, ")$")).unwrap()))
        }};
    }
    match ty {
        "id" => re!(r"[A-Za-z0-9\-\.]{1,64}"),
        "code" => re!(r"[^\s]+( [^\s]+)*"),
        "date" => re!(
            r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
        ),
        "dateTime" => re!(
            r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
        ),
        "instant" => re!(
            r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
        ),
        "time" => re!(r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"),
        "oid" => re!(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+"),
        "uuid" => re!(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
        "uri" | "url" | "canonical" => re!(r"\S+"),
        _ => None,
    }
}

/// Is a full date (YYYY-MM-DD prefix) a real calendar day?
fn calendar_ok(s: &str) -> bool {
    if s.len() < 10 {
        return true;
    }
    chrono::NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").is_ok()
}

fn string_ok(ty: &str, s: &str) -> bool {
    match ty {
        "string" | "markdown" => !s.is_empty() && !s.trim().is_empty(),
        "base64Binary" => {
            let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .is_ok()
        }
        "xhtml" => xhtml_ok(s),
        "date" | "dateTime" | "instant" => {
            regex_for(ty).is_some_and(|r| r.is_match(s)) && calendar_ok(s)
        }
        _ => regex_for(ty).is_none_or(|r| r.is_match(s)),
    }
}

/// Narrative must be a `<div>` of allowed XHTML ([`crate::narrative`]:
/// parsed as XML and checked against FHIR's allow-list).
fn xhtml_ok(s: &str) -> bool {
    crate::narrative::check(s.trim()).is_ok()
}

/// Reference.reference formats Phylax accepts.
pub fn is_valid_reference(r: &str) -> bool {
    if let Some(local) = r.strip_prefix('#') {
        return local.is_empty() || is_valid_id(local);
    }
    if r.starts_with("urn:uuid:") {
        return regex_for("uuid").is_some_and(|re| re.is_match(r));
    }
    if r.starts_with("urn:oid:") {
        return regex_for("oid").is_some_and(|re| re.is_match(r));
    }
    if r.starts_with("http://") || r.starts_with("https://") {
        return !r.chars().any(char::is_whitespace);
    }
    let mut parts = r.split('/');
    let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
        return false;
    };
    if ResourceType::parse(t).is_none() || !is_valid_id(id) {
        return false;
    }
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => true,
        (Some("_history"), Some(v), None) => is_valid_id(v),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn issues(v: Value) -> Vec<(String, String)> {
        match validate_resource(&v) {
            Ok(_) => vec![],
            Err(is) => is
                .into_iter()
                .map(|i| (i.expression.unwrap_or_default(), i.diagnostics))
                .collect(),
        }
    }

    fn has(v: Value, expr: &str) -> bool {
        let is = issues(v);
        let found = is.iter().any(|(e, _)| e == expr);
        if !found {
            eprintln!("issues: {is:?}");
        }
        found
    }

    #[test]
    fn a_realistic_patient_is_valid() {
        let p = json!({
            "resourceType": "Patient",
            "id": "example",
            "meta": {"versionId": "1", "lastUpdated": "2024-01-01T10:00:00Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
            "active": true,
            "name": [{"use": "official", "family": "Testperson", "given": ["Alpha", "B."]}],
            "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1}],
            "gender": "female",
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
            "deceasedBoolean": false,
            "address": [{"line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999", "period": {"start": "1974-12-25"}}],
            "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
                         "name": {"family": "Other"}}],
            "managingOrganization": {"reference": "Organization/1"},
            "contained": [{"resourceType": "Practitioner", "id": "gp", "name": [{"family": "Doc"}]}],
            "generalPractitioner": [{"reference": "#gp"}]
        });
        assert_eq!(issues(p), vec![]);
    }

    #[test]
    fn an_observation_with_value_quantity_is_valid() {
        let o = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2016-03-28",
            "valueQuantity": {"value": 67.50, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
            "component": [{"code": {"text": "x"}, "valueString": "y"}]
        });
        assert_eq!(issues(o), vec![]);
    }

    #[test]
    fn unknown_elements_and_types_are_refused() {
        assert!(has(
            json!({"resourceType":"Patient","nmae":[]}),
            "Patient.nmae"
        ));
        assert!(!issues(json!({"resourceType":"Nope"})).is_empty());
        assert!(!issues(json!({"name":"x"})).is_empty());
        assert!(!issues(json!([1])).is_empty());
        assert!(has(
            json!({"resourceType":"Patient","name":[{"family":"x","bogus":1}]}),
            "Patient.name[0].bogus"
        ));
    }

    #[test]
    fn json_types_and_cardinality() {
        assert!(has(
            json!({"resourceType":"Patient","active":"true"}),
            "Patient.active"
        ));
        assert!(has(
            json!({"resourceType":"Patient","name":{"family":"x"}}),
            "Patient.name"
        ));
        assert!(has(
            json!({"resourceType":"Patient","gender":["female"]}),
            "Patient.gender"
        ));
        assert!(has(
            json!({"resourceType":"Patient","name":[]}),
            "Patient.name"
        ));
        assert!(has(
            json!({"resourceType":"Patient","name":[{}]}),
            "Patient.name[0]"
        ));
        assert!(has(
            json!({"resourceType":"Patient","multipleBirthInteger":1.5}),
            "Patient.multipleBirthInteger"
        ));
        assert!(has(
            json!({"resourceType":"Observation","code":{"text":"x"}}),
            "Observation.status"
        ));
        assert!(has(
            json!({"resourceType":"Patient","active":null}),
            "Patient.active"
        ));
        assert!(has(
            json!({"resourceType":"Patient","name":[null]}),
            "Patient.name[0]"
        ));
    }

    #[test]
    fn primitive_formats() {
        for (k, bad) in [
            ("birthDate", json!("1974-13-01")),
            ("birthDate", json!("1974-02-30")),
            ("birthDate", json!("74-01-01")),
            ("birthDate", json!(19740101)),
            ("gender", json!("")),
            ("gender", json!(" female")),
            ("id", json!("has space")),
            ("implicitRules", json!("a b")),
            ("language", json!("en  US")),
        ] {
            let p = json!({"resourceType":"Patient", k: bad});
            assert!(has(p, &format!("Patient.{k}")), "{k}");
        }
        assert!(has(
            json!({"resourceType":"Patient","deceasedDateTime":"2020-01-01T25:00:00Z"}),
            "Patient.deceasedDateTime"
        ));
        assert!(has(
            json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"issued":"2020-01-01"}),
            "Observation.issued"
        ));
        assert!(has(
            json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":"1.0"}}),
            "Observation.valueQuantity.value"
        ));
        assert!(has(
            json!({"resourceType":"Patient","photo":[{"data":"not base64!"}]}),
            "Patient.photo[0].data"
        ));
        assert!(has(
            json!({"resourceType":"Patient","communication":[{"language":{"text":"x"},"preferred":1}]}),
            "Patient.communication[0].preferred"
        ));
        assert!(has(
            json!({"resourceType":"Patient","identifier":[{"period":{"start":"2020-01-01T10:00"}}]}),
            "Patient.identifier[0].period.start"
        ));
        assert!(has(
            json!({"resourceType":"Patient","contact":[{"gender":"x","period":{"end":"x"}}]}),
            "Patient.contact[0].period.end"
        ));
        assert!(issues(json!({"resourceType":"Patient","birthDate":"1974"})).is_empty());
        assert!(issues(json!({"resourceType":"Patient","birthDate":"1974-12"})).is_empty());
        assert!(issues(
            json!({"resourceType":"Patient","deceasedDateTime":"2020-01-01T10:00:00.123+14:00"})
        )
        .is_empty());
        assert!(issues(json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"valueInteger":2147483647})).is_empty());
        assert!(!issues(json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"valueInteger":2147483648_i64})).is_empty());
    }

    #[test]
    fn choice_types() {
        assert!(
            has(
                json!({"resourceType":"Patient","deceasedBoolean":true,"deceasedDateTime":"2020"}),
                "Patient.deceasedDateTime"
            ) || has(
                json!({"resourceType":"Patient","deceasedBoolean":true,"deceasedDateTime":"2020"}),
                "Patient.deceasedBoolean"
            )
        );
        assert!(has(
            json!({"resourceType":"Patient","deceasedString":"x"}),
            "Patient.deceasedString"
        ));
        assert!(has(
            json!({"resourceType":"Patient","deceased":true}),
            "Patient.deceased"
        ));
    }

    #[test]
    fn extensions_and_primitive_extensions() {
        assert!(has(
            json!({"resourceType":"Patient","extension":[{"valueString":"x"}]}),
            "Patient.extension[0].url"
        ));
        assert!(has(
            json!({"resourceType":"Patient","extension":[{"url":"http://x"}]}),
            "Patient.extension[0]"
        ));
        assert!(has(
            json!({"resourceType":"Patient","extension":[{"url":"http://x","valueString":"a","extension":[{"url":"y","valueBoolean":true}]}]}),
            "Patient.extension[0]"
        ));
        assert!(issues(json!({"resourceType":"Patient","extension":[{"url":"http://x","extension":[{"url":"y","valueBoolean":true}]}]})).is_empty());
        assert!(has(
            json!({"resourceType":"Patient","_name":{"id":"x"}}),
            "Patient.name"
        ));
        assert!(has(
            json!({"resourceType":"Patient","_gender":{"foo":1}}),
            "Patient.gender"
        ));
        assert!(issues(json!({"resourceType":"Patient","name":[{"given":["A",null],"_given":[null,{"id":"g"}]}]})).is_empty());
    }

    #[test]
    fn contained_resources_and_references() {
        assert!(has(
            json!({"resourceType":"Patient","contained":[{"resourceType":"Patient","contained":[{"resourceType":"Patient"}]}]}),
            "Patient.contained[0].contained"
        ));
        assert!(has(
            json!({"resourceType":"Patient","contained":[{"resourceType":"Observation","status":"final"}]}),
            "Patient.contained[0].code"
        ));
        assert!(has(
            json!({"resourceType":"Patient","managingOrganization":{"reference":"Nope/1"}}),
            "Patient.managingOrganization.reference"
        ));
        assert!(has(
            json!({"resourceType":"Patient","managingOrganization":{"reference":"Organization/"}}),
            "Patient.managingOrganization.reference"
        ));
        assert!(has(
            json!({"resourceType":"Patient","managingOrganization":{"reference":"Organization/1/x"}}),
            "Patient.managingOrganization.reference"
        ));
        for ok in [
            "Organization/1",
            "Organization/1/_history/2",
            "#x",
            "urn:uuid:0a3f1c2e-1111-4222-8333-444455556666",
            "https://example.org/fhir/Organization/1",
        ] {
            assert!(is_valid_reference(ok), "{ok}");
        }
    }

    #[test]
    fn narrative_must_be_inert() {
        for bad in [
            "<p>x</p>",
            "<div><script>alert(1)</script></div>",
            "<div onload=\"x()\">a</div>",
            "<div><a href=\"javascript:x\">a</a></div>",
        ] {
            assert!(
                has(
                    json!({"resourceType":"Patient","text":{"status":"generated","div":bad}}),
                    "Patient.text.div"
                ),
                "{bad}"
            );
        }
        assert!(issues(json!({"resourceType":"Patient","text":{"status":"generated","div":"<div>Only one person</div>"}})).is_empty());
    }

    #[test]
    fn every_resource_type_validates_a_minimal_instance_or_names_required() {
        for t in definitions().resource_types() {
            let r = validate_resource(&json!({"resourceType": t, "id": "x"}));
            if let Err(is) = r {
                assert!(
                    is.iter().all(|i| i.code == IssueCode::Required),
                    "{t}: {is:?}"
                );
            }
        }
    }

    #[test]
    fn issue_count_is_bounded() {
        let mut m = Map::new();
        m.insert("resourceType".into(), json!("Patient"));
        for i in 0..1000 {
            m.insert(format!("bogus{i}"), json!(1));
        }
        let is = validate_resource(&Value::Object(m)).unwrap_err();
        assert_eq!(is.len(), MAX_ISSUES);
    }
}
