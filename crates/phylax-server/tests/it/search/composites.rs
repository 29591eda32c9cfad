//! Composite and combo parameters pair values from the same element.

use super::*;

both!(composite_parameters_pair_values_from_the_same_element);
async fn composite_parameters_pair_values_from_the_same_element(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    // Blood pressure: two components, each a code with a quantity.
    let bp = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},
            "component":[
                {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},
                 "valueQuantity":{"value":150,"unit":"mm[Hg]"}},
                {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},
                 "valueQuantity":{"value":85,"unit":"mm[Hg]"}}]}),
    )
    .await;
    let weight = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"29463-7"}]},
            "valueQuantity":{"value":72.5,"unit":"kg"}}),
    )
    .await;
    let smoker = create(
        s,
        &tok,
        json!({"resourceType":"Observation","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"72166-2"}]},
            "valueCodeableConcept":{"coding":[{"system":"http://snomed.info/sct","code":"449868002"}]},
            "effectiveDateTime":"2024-03-01"}),
    )
    .await;
    let obs = Composites { bp, weight, smoker };
    pairs_come_from_the_same_component(s, &tok, &obs).await;
    combo_parameters_answer_from_their_parts(s, &tok, &obs).await;
    malformed_composites_and_the_capability_statement(s, &tok).await;
}

/// A blood pressure, a body weight and a smoking status.
struct Composites {
    bp: String,
    weight: String,
    smoker: String,
}

/// A composite pairs a code with a value of the same component.
async fn pairs_come_from_the_same_component(s: &TestServer, tok: &str, obs: &Composites) {
    let Composites { bp, weight, smoker } = obs;
    let none: Vec<String> = Vec::new();
    // Systolic above 140: the blood pressure.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=http://loinc.org|8480-6$gt140"
        )
        .await,
        vec![bp.clone()]
    );
    // Diastolic above 140: no — 150 belongs to the other component.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=http://loinc.org|8462-4$gt140"
        )
        .await,
        none
    );
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?component-code-value-quantity=8462-4$lt90"
        )
        .await,
        vec![bp.clone()]
    );
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?code-value-quantity=http://loinc.org|29463-7$ge70"
        )
        .await,
        vec![weight.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-quantity=29463-7$lt70").await,
        none
    );
    // combo: the observation's own code and value, or a component's.
    assert_eq!(
        ids(
            s,
            tok,
            "/Observation?combo-code-value-quantity=8480-6$150,29463-7$72.5"
        )
        .await,
        sorted(vec![bp, weight])
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|449868002").await,
        vec![smoker.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?code-value-concept=72166-2$8517006").await,
        none
    );
}

/// combo-* parameters are answered from their parts (no entries of
/// their own): the observation's own values or a component's.
async fn combo_parameters_answer_from_their_parts(s: &TestServer, tok: &str, obs: &Composites) {
    let Composites { bp, weight, smoker } = obs;
    let none: Vec<String> = Vec::new();
    assert_eq!(
        ids(s, tok, "/Observation?combo-code=8480-6,29463-7").await,
        sorted(vec![bp, weight])
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-value-quantity=gt100").await,
        vec![bp.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:missing=true").await,
        none
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-value-quantity:missing=true").await,
        vec![smoker.clone()]
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:not=29463-7").await,
        sorted(vec![bp, smoker]),
        ":not holds for the observation's code and every component's"
    );
    assert_eq!(
        ids(s, tok, "/Observation?combo-code:not=8480-6").await,
        sorted(vec![weight, smoker])
    );
}

/// Malformed composite values: a clear 400. The CapabilityStatement lists
/// the composites it supports, and not MolecularSequence's
/// three-component coordinates.
async fn malformed_composites_and_the_capability_statement(s: &TestServer, tok: &str) {
    for q in [
        "/Observation?code-value-quantity=29463-7",
        "/Observation?code-value-quantity=$70",
        "/Observation?code-value-quantity=29463-7$heavy",
    ] {
        assert_eq!(get(s, tok, q).await.0, 400, "{q}");
    }
    // The CapabilityStatement lists the composites it supports, and not
    // MolecularSequence's three-component coordinates.
    let (_, cap) = get(s, tok, "/metadata").await;
    let params = |t: &str| -> Vec<String> {
        cap["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == t)
            .unwrap()["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(params("Observation").contains(&"component-code-value-quantity".to_string()));
    assert!(!params("MolecularSequence").contains(&"chromosome-window-coordinate".to_string()));
}
