//! Synthetic, Synthea-shaped patient records, generated in-tree.
//!
//! Each patient is one `transaction` Bundle, like Synthea's FHIR output: a
//! Patient, an Organization-free set of Encounters, and per encounter
//! vital-sign and laboratory Observations, plus Conditions and
//! MedicationRequests, all referring to the patient (and encounter) through
//! `urn:uuid:` full URLs. Names are built from invented syllables: no real
//! person's data, and nothing fetched from elsewhere. Deterministic for a
//! given index, so searches can target known values.

use serde_json::{json, Value};

const SYLLABLES: [&str; 24] = [
    "ka", "vel", "dor", "mi", "sen", "tra", "lo", "qui", "ban", "er", "zo", "phi", "mar", "tu",
    "nel", "ros", "vi", "gan", "sha", "ol", "bre", "dun", "ias", "tor",
];

/// Observation codes (LOINC) with a unit and a plausible range.
const VITALS: [(&str, &str, &str, f64, f64); 6] = [
    ("8302-2", "Body height", "cm", 150.0, 40.0),
    ("29463-7", "Body weight", "kg", 50.0, 60.0),
    ("8867-4", "Heart rate", "/min", 55.0, 50.0),
    ("8310-5", "Body temperature", "Cel", 36.0, 2.0),
    ("2339-0", "Glucose", "mg/dL", 70.0, 80.0),
    ("2093-3", "Cholesterol", "mg/dL", 150.0, 100.0),
];

const CONDITIONS: [(&str, &str); 5] = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertension"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("40055000", "Chronic sinusitis"),
];

/// A small deterministic generator (SplitMix64): reproducible data
/// without a dependency on the `rand` crate's value stability.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn word(m: &mut Mix, syllables: u64) -> String {
    let mut s = String::new();
    for _ in 0..syllables {
        s.push_str(SYLLABLES[m.below(SYLLABLES.len() as u64) as usize]);
    }
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => s,
    }
}

/// The family name of patient `i` (three syllables: 13,824 distinct).
pub fn family(i: usize) -> String {
    word(&mut Mix(i as u64 ^ 0xFA41), 3)
}

/// The medical record number of patient `i`.
pub fn mrn(i: usize) -> String {
    format!("MRN-{i:09}")
}

pub const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.19.5";

/// The LOINC code used for the per-patient code search.
pub const SEARCH_CODE: &str = "29463-7";

/// Patient `i`'s record as a transaction Bundle, and its resource count.
pub fn patient_bundle(i: usize, encounters: usize) -> (Value, usize) {
    let mut m = Mix(i as u64);
    let pid = format!("urn:uuid:{}", uuid::Uuid::from_u64_pair(i as u64, 0));
    let birth_year = 1930 + m.below(90);
    let mut entries = vec![json!({
        "fullUrl": pid,
        "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": mrn(i),
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "name": [{"use": "official", "family": family(i), "given": [word(&mut m, 2), word(&mut m, 2)]}],
            "telecom": [{"system": "phone", "value": format!("555-{:03}-{:04}", m.below(1000), m.below(10_000)), "use": "home"}],
            "gender": if m.below(2) == 0 { "female" } else { "male" },
            "birthDate": format!("{birth_year}-{:02}-{:02}", 1 + m.below(12), 1 + m.below(28)),
            "address": [{"line": [format!("{} {} Way", 1 + m.below(999), word(&mut m, 2))],
                "city": word(&mut m, 2), "state": "MA", "postalCode": format!("{:05}", m.below(100_000)), "country": "US"}],
            "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}
        },
        "request": {"method": "POST", "url": "Patient"}
    })];
    for e in 0..encounters {
        let eid = format!(
            "urn:uuid:{}",
            uuid::Uuid::from_u64_pair(i as u64, 1 + e as u64)
        );
        let year = 2015 + m.below(10);
        let day = format!("{year}-{:02}-{:02}", 1 + m.below(12), 1 + m.below(28));
        entries.push(json!({
            "fullUrl": eid,
            "resource": {
                "resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}]}],
                "subject": {"reference": pid},
                "period": {"start": format!("{day}T09:00:00Z"), "end": format!("{day}T09:30:00Z")}
            },
            "request": {"method": "POST", "url": "Encounter"}
        }));
        for (code, display, unit, lo, span) in VITALS {
            let v = lo + (m.below(1000) as f64 / 1000.0) * span;
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "resource": {
                    "resourceType": "Observation", "status": "final",
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                    "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
                    "subject": {"reference": pid}, "encounter": {"reference": eid},
                    "effectiveDateTime": format!("{day}T09:10:00Z"), "issued": format!("{day}T09:10:00Z"),
                    "valueQuantity": {"value": (v * 10.0).round() / 10.0, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
                },
                "request": {"method": "POST", "url": "Observation"}
            }));
        }
        if m.below(3) == 0 {
            let (code, display) = CONDITIONS[m.below(CONDITIONS.len() as u64) as usize];
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "resource": {
                    "resourceType": "Condition",
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
                    "subject": {"reference": pid}, "encounter": {"reference": eid},
                    "onsetDateTime": format!("{day}T09:00:00Z")
                },
                "request": {"method": "POST", "url": "Condition"}
            }));
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "resource": {
                    "resourceType": "MedicationRequest", "status": "active", "intent": "order",
                    "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]},
                    "subject": {"reference": pid}, "encounter": {"reference": eid},
                    "authoredOn": format!("{day}T09:20:00Z")
                },
                "request": {"method": "POST", "url": "MedicationRequest"}
            }));
        }
    }
    let n = entries.len();
    (
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        n,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_are_deterministic_and_valid_shaped() {
        let (b, n) = patient_bundle(7, 3);
        assert_eq!(b["entry"].as_array().map(Vec::len), Some(n));
        assert!(n > 3 * 7);
        assert_eq!(family(7), family(7));
        assert_ne!(family(7), family(8));
        assert_eq!(b["entry"][0]["resource"]["name"][0]["family"], family(7));
    }
}
