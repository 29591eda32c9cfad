//! What breach notification needs from patients' records, read inside the
//! server: the state or province of each patient's address (the report's
//! counts by state) and whom a letter goes to. Only the operator's
//! incident commands call it (no route reaches it); what it returns is
//! PHI: no `Display`, a `Debug` that shows nothing, and the report keeps
//! only counts, the letters only inside their encrypted archive.

use crate::access::gate::Gate;
use crate::data::repo::RepoError;
use phylax_fhir::{ResourceId, ResourceType};
use serde_json::Value;

/// Whom a letter goes to: a name and postal address lines.
pub struct Addressee {
    pub name: String,
    pub lines: Vec<String>,
    /// The address's state or province, as written.
    pub state: Option<String>,
}

impl std::fmt::Debug for Addressee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Addressee(..)")
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The home address (or the first) of a Patient resource, and its name.
pub fn addressee_of(p: &Value) -> Addressee {
    let names = p["name"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let n = names
        .iter()
        .find(|n| n["use"] == "official")
        .or(names.first());
    let name = n
        .map(|n| {
            let mut parts: Vec<String> = n["given"]
                .as_array()
                .map(|g| g.iter().filter_map(text).collect())
                .unwrap_or_default();
            parts.extend(text(&n["family"]));
            if parts.is_empty() {
                text(&n["text"]).unwrap_or_default()
            } else {
                parts.join(" ")
            }
        })
        .unwrap_or_default();
    let addrs = p["address"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let a = addrs.iter().find(|a| a["use"] == "home").or(addrs.first());
    let (lines, state) = match a {
        Some(a) => {
            let mut lines: Vec<String> = a["line"]
                .as_array()
                .map(|l| l.iter().filter_map(text).collect())
                .unwrap_or_default();
            let city = [text(&a["city"]), text(&a["state"]), text(&a["postalCode"])]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            if !city.is_empty() {
                lines.push(city);
            }
            lines.extend(text(&a["country"]));
            (lines, text(&a["state"]))
        }
        None => (Vec::new(), None),
    };
    Addressee { name, lines, state }
}

/// The addressee of patient `id`; `None` when the Patient no longer
/// exists (deleted or erased).
pub async fn addressee(st: &Gate, id: &str) -> Result<Option<Addressee>, RepoError> {
    let (Some(t), Some(i)) = (ResourceType::parse("Patient"), ResourceId::parse(id)) else {
        return Ok(None);
    };
    match st.repo.read(&t, &i).await {
        Ok(v) => Ok(v.body.as_ref().map(|b| addressee_of(b.json()))),
        Err(RepoError::NotFound | RepoError::Gone(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn home_address_and_official_name() {
        let a = addressee_of(&json!({"resourceType": "Patient",
            "name": [{"use": "nickname", "given": ["Bo"]}, {"use": "official", "family": "Lee", "given": ["Ann", "B"]}],
            "address": [{"use": "work", "state": "NY"}, {"use": "home", "line": ["1 Main St"], "city": "Boston", "state": "MA", "postalCode": "02101"}]}));
        assert_eq!(a.name, "Ann B Lee");
        assert_eq!(a.lines, vec!["1 Main St", "Boston MA 02101"]);
        assert_eq!(a.state.as_deref(), Some("MA"));
        assert_eq!(format!("{a:?}"), "Addressee(..)");
        let none = addressee_of(&json!({"resourceType": "Patient"}));
        assert!(none.name.is_empty() && none.lines.is_empty() && none.state.is_none());
    }
}
