//! Masked elements never leave, through any path.

use super::*;

on_both!(masked_elements_never_leave);
async fn masked_elements_never_leave(s: &TestServer) {
    load(s).await;
    let l = loader(s);
    put(s, &l, json!({"resourceType": "Patient", "id": "pa-id", "gender": "female",
        "name": [{"family": "Identifiable", "given": ["Ida"]}],
        "identifier": [{"system": "urn:mrn", "value": "MRN-77"}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "address": [{"line": ["1 Secret Street"]}],
        "contact": [{"name": {"family": "Kinsman"}, "telecom": [{"system": "phone", "value": "555-0199"}]}],
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Maidenly"},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": "Birthville"}}],
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ida Identifiable</div>"}}))
    .await;
    let mut o = obs("obs-note", "pa-id", None);
    o["subject"]["display"] = json!("Ida Identifiable");
    o["note"] = json!([{"text": "patient worried about her job"}]);
    // A performer named only by identifier and display (no reference).
    o["performer"] = json!([{"identifier": {"system": "urn:npi", "value": "NPI-4242"},
        "display": "Doctor Displayname"}]);
    put(s, &l, o).await;
    let res = user(s, "res", "researcher", None, None, "user/*.rs", None).await;
    // Every identifying value of the source resources.
    let secrets = [
        "Identifiable",
        "MRN-77",
        "555-0100",
        "Secret Street",
        "Ida",
        "Kinsman",
        "555-0199",
        "Maidenly",
        "Birthville",
        "NPI-4242",
        "Doctor Displayname",
    ];
    let leak_free = |b: &Value| {
        let t = b.to_string();
        for x in secrets {
            assert!(!t.contains(x), "{x} leaked: {t}");
        }
    };
    for path in [
        "/Patient/pa-id",
        "/Patient/pa-id/_history/1",
        "/Patient/pa-id/_history",
        "/Patient?gender=female",
        "/Patient?_id=pa-id&_elements=name,identifier,gender",
        "/Patient?_id=pa-id&_summary=true",
        "/Observation?subject=Patient/pa-id&_include=Observation:subject",
        "/Patient/pa-id/$everything",
        "/Patient/pa-id/Observation",
        "/Observation/obs-note",
        "/Observation/obs-note/_history/1",
        "/Observation?_id=obs-note&_include=Observation:subject",
    ] {
        let (st, b) = send(s, &res, M::GET, path, None).await;
        assert_eq!(st, 200, "{path}: {b}");
        leak_free(&b);
    }
    let (_, p) = send(s, &res, M::GET, "/Patient/pa-id", None).await;
    assert_eq!(p["gender"], "female");
    assert_eq!(p["meta"]["security"][0]["code"], "REDACTED");
    // A batch GET is masked too.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/pa-id"}}]});
    let (st, b) = send(s, &res, M::POST, "", Some(&batch)).await;
    assert_eq!(st, 200);
    leak_free(&b);
    // Searching or sorting on a masked element would reveal it.
    for path in [
        "/Patient?family=Identifiable",
        "/Patient?name:exact=Ida",
        "/Patient?identifier=urn:mrn|MRN-77",
        "/Patient?address=Secret",
        "/Patient?phone=555-0100",
        "/Patient?gender=female&_sort=family",
        "/Observation?subject:Patient.family=Identifiable",
        "/Patient?_has:Observation:subject:code=8867-4&family=Identifiable",
    ] {
        assert_eq!(get(s, &res, path).await, 403, "{path}");
    }
    let r = s
        .http
        .post(s.url("/Patient/_search"))
        .bearer_auth(&res)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=Identifiable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Another role, another mask: the coder never receives notes.
    let coder = user(s, "coder", "coder", None, None, "user/*.rs", None).await;
    let (st, b) = send(s, &coder, M::GET, "/Observation/obs-note", None).await;
    assert_eq!(st, 200);
    assert!(b.get("note").is_none() && b["status"] == "final", "{b}");
    assert!(
        b.to_string().contains("Ida Identifiable"),
        "only notes are masked for the coder"
    );
    // Roles without masks receive everything.
    let (_, b) = send(s, &l, M::GET, "/Observation/obs-note", None).await;
    assert!(b["note"].is_array());
}
