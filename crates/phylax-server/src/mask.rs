//! Field-level minimisation: roles with masks (`researcher`: direct
//! identifiers; `billing`: clinical notes; custom roles) never receive the
//! masked elements. Applied to the final response, after `_elements` and
//! `_summary`, to every resource in it (Bundle entries, contained
//! resources, resources inside stored Bundles), each marked with the
//! `REDACTED` security label. When names are masked, so are the `display`
//! texts of references, which often repeat a name. Searching or sorting on
//! a masked element is refused: a match would reveal the value.

use crate::error::ApiError;
use crate::pipeline::RequestCtx;
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
    match &ctx.principal {
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

/// Mask every resource inside `v`. Returns whether anything was removed.
pub fn mask_json(v: &mut Value, masks: &BTreeSet<String>) -> bool {
    let mut changed = false;
    match v {
        Value::Object(o) => {
            if o.contains_key("resourceType") {
                let before = o.len();
                o.retain(|k, _| !masks.iter().any(|m| is_element(k, m)));
                if o.len() != before {
                    changed = true;
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
            }
            if masks.contains("name")
                && o.contains_key("reference")
                && o.remove("display").is_some()
            {
                changed = true;
            }
            for (_, x) in o.iter_mut() {
                changed |= mask_json(x, masks);
            }
        }
        Value::Array(a) => {
            for x in a.iter_mut() {
                changed |= mask_json(x, masks);
            }
        }
        _ => {}
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
        return ApiError::Internal("response too large to mask".into()).into_response_safe();
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        // Not JSON after all: never send unmasked data by mistake.
        return ApiError::Internal("response could not be masked".into()).into_response_safe();
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
) -> Result<(), ApiError> {
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
            return Err(ApiError::Masked);
        }
    }
    Ok(())
}

impl ApiError {
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
        let masks = set(&["name", "identifier", "text", "value"]);
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
}
