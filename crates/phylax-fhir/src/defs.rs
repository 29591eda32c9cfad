//! The compiled-in FHIR R4 definitions.
//!
//! The table is generated from the official StructureDefinitions,
//! SearchParameters and the Patient CompartmentDefinition by
//! `scripts/gen-fhir-defs.py`; its format is documented there. It is parsed
//! once, on first use.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

const RAW: &str = include_str!("../data/r4.json");

/// One element of a structure.
#[derive(Debug, Clone)]
pub struct ElementDef {
    /// Minimum cardinality.
    pub min: u32,
    /// True when the element repeats (max is `*` or > 1).
    pub many: bool,
    /// Allowed type codes (primitive, complex, `Resource`, or a backbone path).
    pub types: Vec<String>,
    /// True for a choice element `name[x]` (stored without the suffix).
    pub choice: bool,
}

/// A search parameter as defined for one resource type.
#[derive(Debug, Clone)]
pub struct SearchParamDef {
    pub code: String,
    pub kind: String,
    pub expression: Option<String>,
}

/// All definitions Phylax knows.
#[derive(Debug)]
pub struct Definitions {
    pub version: String,
    resources: Vec<String>,
    resource_set: HashSet<String>,
    primitives: HashSet<String>,
    types: HashMap<String, HashMap<String, ElementDef>>,
    search: HashMap<String, Vec<SearchParamDef>>,
    compartment: HashMap<String, Vec<Vec<String>>>,
    compartment_params: HashMap<String, Vec<String>>,
    summary: HashMap<String, HashSet<String>>,
    targets: HashMap<String, HashMap<String, Vec<String>>>,
    composites: HashMap<String, BTreeMap<String, CompositeDef>>,
}

/// A composite search parameter: the elements its context expression
/// selects, and per component the parameter type and the expression
/// relative to each such element.
#[derive(Debug, Clone)]
pub struct CompositeDef {
    pub expression: String,
    pub components: Vec<(String, String)>,
}

/// One element in the generated table: (min, max_many, type codes, choice).
type RawElement = (u32, u8, Vec<String>, u8);

#[derive(Deserialize)]
struct Raw {
    version: String,
    resources: Vec<String>,
    primitives: Vec<String>,
    types: BTreeMap<String, BTreeMap<String, RawElement>>,
    search: BTreeMap<String, Vec<(String, String, Option<String>)>>,
    compartment: BTreeMap<String, Vec<String>>,
    compartment_params: BTreeMap<String, Vec<String>>,
    summary: BTreeMap<String, Vec<String>>,
    targets: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    composites: BTreeMap<String, BTreeMap<String, RawComposite>>,
}

/// (context expression, [(component type, relative expression)]).
type RawComposite = (String, Vec<(String, String)>);

impl Definitions {
    fn load() -> Self {
        // The table is generated and compiled in; a failure here is a build
        // defect caught by every test, not input from the outside.
        #[allow(clippy::expect_used)]
        let raw: Raw = serde_json::from_str(RAW).expect("embedded r4.json is valid");
        let types = raw
            .types
            .into_iter()
            .map(|(name, els)| {
                let els = els
                    .into_iter()
                    .map(|(el, (min, many, types, choice))| {
                        (
                            el,
                            ElementDef {
                                min,
                                many: many == 1,
                                types,
                                choice: choice == 1,
                            },
                        )
                    })
                    .collect();
                (name, els)
            })
            .collect();
        let search = raw
            .search
            .into_iter()
            .map(|(t, ps)| {
                let ps = ps
                    .into_iter()
                    .map(|(code, kind, expression)| SearchParamDef {
                        code,
                        kind,
                        expression,
                    })
                    .collect();
                (t, ps)
            })
            .collect();
        let compartment = raw
            .compartment
            .into_iter()
            .map(|(t, paths)| {
                let paths = paths
                    .into_iter()
                    .map(|p| p.split('.').map(str::to_owned).collect())
                    .collect();
                (t, paths)
            })
            .collect();
        Definitions {
            version: raw.version,
            resource_set: raw.resources.iter().cloned().collect(),
            resources: raw.resources,
            primitives: raw.primitives.into_iter().collect(),
            types,
            search,
            compartment,
            compartment_params: raw.compartment_params.into_iter().collect(),
            summary: raw
                .summary
                .into_iter()
                .map(|(t, els)| (t, els.into_iter().collect()))
                .collect(),
            targets: raw
                .targets
                .into_iter()
                .map(|(t, m)| (t, m.into_iter().collect()))
                .collect(),
            composites: raw
                .composites
                .into_iter()
                .map(|(t, m)| {
                    let m = m
                        .into_iter()
                        .map(|(code, (expression, components))| {
                            (
                                code,
                                CompositeDef {
                                    expression,
                                    components,
                                },
                            )
                        })
                        .collect();
                    (t, m)
                })
                .collect(),
        }
    }

    /// Concrete resource type names, sorted.
    pub fn resource_types(&self) -> &[String] {
        &self.resources
    }

    /// Is `name` a concrete resource type?
    pub fn is_resource_type(&self, name: &str) -> bool {
        self.resource_set.contains(name)
    }

    /// Is `name` a primitive type?
    pub fn is_primitive(&self, name: &str) -> bool {
        self.primitives.contains(name)
    }

    /// The elements of a structure (resource, datatype or backbone path).
    pub fn structure(&self, name: &str) -> Option<&HashMap<String, ElementDef>> {
        self.types.get(name)
    }

    /// Search parameters defined for a resource type (not including the
    /// `Resource`/`DomainResource` common ones).
    pub fn search_params(&self, resource_type: &str) -> &[SearchParamDef] {
        self.search
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Search parameter codes that place a resource of this type in a
    /// Patient compartment (empty: the type is not in the compartment).
    pub fn compartment_params(&self, resource_type: &str) -> &[String] {
        self.compartment_params
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether a top-level element of a resource type is in its summary
    /// (`isSummary`); choice elements are named without `[x]`.
    pub fn is_summary(&self, resource_type: &str, element: &str) -> bool {
        self.summary
            .get(resource_type)
            .is_some_and(|s| s.contains(element))
    }

    /// The composite search parameters of a resource type, by code.
    pub fn composites(&self, resource_type: &str) -> impl Iterator<Item = (&str, &CompositeDef)> {
        self.composites
            .get(resource_type)
            .into_iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The resource types a reference search parameter may point to
    /// (its SearchParameter's `target`).
    pub fn reference_targets(&self, resource_type: &str, code: &str) -> &[String] {
        self.targets
            .get(resource_type)
            .and_then(|m| m.get(code))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Element paths whose references place a resource in a Patient compartment.
    pub fn compartment_paths(&self, resource_type: &str) -> &[Vec<String>] {
        self.compartment
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// The process-wide definitions.
pub fn definitions() -> &'static Definitions {
    static DEFS: OnceLock<Definitions> = OnceLock::new();
    DEFS.get_or_init(Definitions::load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_r4_resource_types_are_known() {
        let d = definitions();
        // FHIR R4 defines 149 resource StructureDefinitions: 147 concrete
        // types plus the abstract Resource and DomainResource.
        assert_eq!(d.resource_types().len(), 147);
        assert_eq!(d.version, "4.0.1");
        for t in [
            "Patient",
            "Observation",
            "Bundle",
            "AuditEvent",
            "Binary",
            "Parameters",
        ] {
            assert!(d.is_resource_type(t), "{t}");
        }
        assert!(!d.is_resource_type("Resource"));
        assert!(!d.is_resource_type("DomainResource"));
        assert!(!d.is_resource_type("HumanName"));
    }

    #[test]
    fn structures_have_expected_shape() {
        let d = definitions();
        let p = d.structure("Patient").unwrap();
        assert!(p["name"].many);
        assert!(p["deceased"].choice);
        assert_eq!(p["contact"].types, vec!["Patient.contact".to_string()]);
        let obs = d.structure("Observation").unwrap();
        assert_eq!(obs["status"].min, 1);
        assert_eq!(obs["code"].min, 1);
        // contentReference: Questionnaire.item.item is a Questionnaire.item
        let qi = d.structure("Questionnaire.item").unwrap();
        assert_eq!(qi["item"].types, vec!["Questionnaire.item".to_string()]);
    }

    #[test]
    fn compartment_paths_come_from_the_definition() {
        let d = definitions();
        assert_eq!(d.compartment_paths("Observation")[0], vec!["subject"]);
        assert_eq!(
            d.compartment_paths("Group")[0],
            vec!["member".to_string(), "entity".to_string()]
        );
        assert!(d.compartment_paths("Organization").is_empty());
        assert!(!d.search_params("Patient").is_empty());
    }
}
