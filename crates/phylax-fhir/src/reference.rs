//! One canonical form for literal references to this server's resources.
//!
//! A reference may name the same resource as `Patient/a`,
//! `Patient/a/_history/2`, `https://host/fhir/Patient/a` (this server's
//! base, or an alias the deployment configures) or
//! `https://host/fhir/Patient/a/_history/2`. Every decision that depends on
//! whose data a resource is (compartments, the data key, the policy,
//! consents, audit attribution, the detectors, the search index) must see
//! them as one: the form of a reference must never decide whose record a
//! resource belongs to (docs/ACCESS_CONTROL.md, "One canonical form").
//!
//! Two functions, used together:
//! - [`canonicalize`] rewrites, before a resource is stored, every
//!   reference that is absolute to one of this server's bases into its
//!   relative form (`Type/id`, keeping a `/_history/v` suffix: a versioned
//!   reference still means that version). Stored data therefore carries
//!   only relative references to local resources.
//! - [`target`] reads a (relative or local absolute, possibly versioned)
//!   reference as `(Type, id)`, for code that looks at references.

use crate::ids::is_valid_id;
use serde_json::Value;

/// `(Type, id)` of a literal reference to a resource of this server:
/// relative (`Type/id`, `Type/id/_history/v`) or absolute to one of
/// `bases` (each without a trailing slash). `None` for anything else
/// (another server, `urn:`, `#contained`, a malformed id).
pub fn target<'a, S: AsRef<str>>(reference: &'a str, bases: &[S]) -> Option<(&'a str, &'a str)> {
    let local = bases
        .iter()
        .find_map(|b| {
            reference
                .strip_prefix(b.as_ref())
                .and_then(|r| r.strip_prefix('/'))
        })
        .unwrap_or(reference);
    let mut it = local.split('/');
    let (t, id) = (it.next()?, it.next()?);
    match (it.next(), it.next(), it.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(v), None) if !v.is_empty() => {}
        _ => return None,
    }
    let type_ok = t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphanumeric());
    (type_ok && is_valid_id(id)).then_some((t, id))
}

/// The relative form of `reference` when it is absolute to one of `bases`
/// and names a local resource (`Type/id` or `Type/id/_history/v`).
fn relative<'a, S: AsRef<str>>(reference: &'a str, bases: &[S]) -> Option<&'a str> {
    let rest = bases.iter().find_map(|b| {
        reference
            .strip_prefix(b.as_ref())
            .and_then(|r| r.strip_prefix('/'))
    })?;
    target::<&str>(rest, &[]).map(|_| rest)
}

/// Rewrite every `reference` element in `resource` (at any depth,
/// contained resources included) that is absolute to one of `bases` into
/// its relative form. Returns how many were rewritten.
pub fn canonicalize<S: AsRef<str>>(resource: &mut Value, bases: &[S]) -> usize {
    if bases.is_empty() {
        return 0;
    }
    let mut n = 0;
    walk(resource, bases, &mut n);
    n
}

fn walk<S: AsRef<str>>(node: &mut Value, bases: &[S], n: &mut usize) {
    match node {
        Value::Array(items) => items.iter_mut().for_each(|i| walk(i, bases, n)),
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(s) if k == "reference" => {
                        if let Some(r) = relative(s, bases) {
                            *s = r.to_owned();
                            *n += 1;
                        }
                    }
                    _ => walk(v, bases, n),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bases() -> Vec<String> {
        vec![
            "https://phylax.example/fhir".into(),
            "https://old-name.example:8443/fhir".into(),
        ]
    }

    #[test]
    fn every_form_names_the_same_resource() {
        let b = bases();
        for r in [
            "Patient/a",
            "Patient/a/_history/2",
            "https://phylax.example/fhir/Patient/a",
            "https://phylax.example/fhir/Patient/a/_history/2",
            "https://old-name.example:8443/fhir/Patient/a",
        ] {
            assert_eq!(target(r, &b), Some(("Patient", "a")), "{r}");
        }
        for r in [
            "https://elsewhere.example/fhir/Patient/a",
            "https://phylax.example/fhirX/Patient/a",
            "https://phylax.example/fhir/Patient/a/extra",
            "Patient/a/_history/",
            "Patient/a b",
            "patient/a",
            "urn:uuid:0b1c",
            "#contained",
            "Patient",
        ] {
            assert_eq!(target(r, &b), None, "{r}");
        }
    }

    #[test]
    fn absolute_local_references_become_relative_at_any_depth() {
        let mut r = json!({
            "resourceType": "Observation",
            "subject": {"reference": "https://phylax.example/fhir/Patient/a"},
            "performer": [
                {"reference": "https://old-name.example:8443/fhir/Patient/b/_history/3"},
                {"reference": "https://elsewhere.example/fhir/Patient/c"},
                {"reference": "Practitioner/p"}
            ],
            "contained": [{"resourceType": "Provenance",
                "target": [{"reference": "https://phylax.example/fhir/Patient/d"}]}],
            "note": [{"text": "https://phylax.example/fhir/Patient/e"}]
        });
        assert_eq!(canonicalize(&mut r, &bases()), 3);
        assert_eq!(r["subject"]["reference"], "Patient/a");
        assert_eq!(r["performer"][0]["reference"], "Patient/b/_history/3");
        assert_eq!(
            r["performer"][1]["reference"],
            "https://elsewhere.example/fhir/Patient/c"
        );
        assert_eq!(r["contained"][0]["target"][0]["reference"], "Patient/d");
        // Only `reference` elements: free text is data, not a reference.
        assert_eq!(
            r["note"][0]["text"],
            "https://phylax.example/fhir/Patient/e"
        );
        assert_eq!(canonicalize::<&str>(&mut r, &[]), 0);
    }
}
