//! What the server announces: the CapabilityStatement (generated from what
//! the server really does, so that it stays truthful as capabilities land)
//! and the SMART configuration document.

use crate::base::config::Config;
use phylax_fhir::defs::definitions;
use serde_json::{json, Value};

/// The search parameters this server really supports for a type: every
/// indexable official parameter, plus `_id` and `_lastUpdated`.
fn search_params(t: &str) -> Vec<Value> {
    let Some(rt) = phylax_fhir::ResourceType::parse(t) else {
        return Vec::new();
    };
    let mut out: Vec<Value> = phylax_fhir::search::params(&rt)
        .values()
        .filter(|p| p.indexable() || p.code == "_id" || p.code == "_lastUpdated")
        .map(|p| {
            let kind = format!("{:?}", p.kind).to_lowercase();
            json!({"name": p.code, "type": kind})
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

/// `_include` values supported for a type: its reference parameters.
fn search_includes(t: &str) -> Vec<String> {
    let Some(rt) = phylax_fhir::ResourceType::parse(t) else {
        return Vec::new();
    };
    let mut out: Vec<String> = phylax_fhir::search::params(&rt)
        .values()
        .filter(|p| p.indexable() && p.kind == phylax_fhir::search::ParamKind::Reference)
        .map(|p| format!("{t}:{}", p.code))
        .collect();
    out.sort();
    out
}

pub fn capability_statement(cfg: &Config) -> Value {
    let d = definitions();
    let interactions = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    let resources: Vec<Value> = d
        .resource_types()
        .iter()
        .map(|t| {
            json!({
                "type": t,
                "interaction": interactions.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": cfg.http.allow_update_create,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchParam": search_params(t),
            })
        })
        .collect();
    // Empty arrays are not valid FHIR JSON: only types with reference
    // parameters get a searchInclude list.
    let resources: Vec<Value> = resources
        .into_iter()
        .map(|mut r| {
            let inc = search_includes(r["type"].as_str().unwrap_or_default());
            if !inc.is_empty() {
                r["searchInclude"] = json!(inc);
            }
            if r["type"] == "Patient" {
                r["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
                }]);
            }
            r
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "publisher": "Phylax",
        "kind": "instance",
        "software": {"name": "Phylax", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Phylax FHIR R4 server", "url": cfg.fhir_base()},
        "fhirVersion": d.version,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": !cfg.http.cors_origins.is_empty(),
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": cfg.token_url()}]
                }],
                "description": "SMART Backend Services (client_credentials with private_key_jwt, RS384/ES384); system/ scopes"
            },
            "resource": resources,
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "interaction": [{"code": "history-system"}, {"code": "transaction"}, {"code": "batch"}],
        }],
    })
}

/// The SMART configuration document (`.well-known/smart-configuration`).
pub fn smart_configuration(cfg: &Config) -> Value {
    let base = format!("{}/auth", cfg.public_url);
    let mut v = json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": cfg.token_url(),
        "revocation_endpoint": format!("{base}/revoke"),
        "jwks_uri": format!("{base}/jwks"),
        "id_token_signing_alg_values_supported": ["ES256"],
        "introspection_endpoint": format!("{base}/introspect"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "scopes_supported": [
            "openid", "fhirUser", "launch/patient", "offline_access", "online_access",
            "patient/*.rs", "patient/*.read", "user/*.cruds", "user/*.rs", "user/*.read",
            "system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"
        ],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-asymmetric",
            "context-standalone-patient", "permission-offline", "permission-online",
            "permission-patient", "permission-user", "permission-v1", "permission-v2",
            "sso-openid-connect"
        ],
    });
    // RFC 8705 §3.3: with mutual TLS on, clients registered `--cert-bound`
    // get tokens bound to their certificate.
    if cfg.tls.client_ca.is_some() {
        v["tls_client_certificate_bound_access_tokens"] = json!(true);
    }
    v
}
