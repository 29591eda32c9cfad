//! Roles that may skip the second factor, and what each role reaches.

use super::*;

async fn roles_body(s: &TestServer) {
    make_patient(s, "pr-1").await;
    let admin = s.token("system/*.cruds").await;
    let r = s
        .http
        .put(s.url("/Observation/ob-1"))
        .bearer_auth(&admin)
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Observation","id":"ob-1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/pr-1"}}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // The same wide scopes; the role decides.
    let fd = password_only_token(s, "desk.one", "front-desk", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &fd, "/Patient/pr-1").await, 200);
    assert_eq!(fhir_get(s, &fd, "/Observation/ob-1").await, 403);
    assert_eq!(
        fhir_get(s, &fd, "/Observation?subject=Patient/pr-1").await,
        403
    );
    let au = password_only_token(s, "audit.one", "auditor", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &au, "/Patient/pr-1").await, 403);
    assert_eq!(fhir_get(s, &au, "/AuditEvent?_count=1").await, 200);
    // A custom role from phylax.toml.
    let lab = password_only_token(s, "lab.one", "lab-tech", "user/*.cruds").await;
    assert_eq!(fhir_get(s, &lab, "/Observation/ob-1").await, 200);
    assert_eq!(fhir_get(s, &lab, "/Patient/pr-1").await, 403);
    // A role changed by an administrator: the old token stops working.
    let id = s
        .state
        .accounts
        .find("lab.one")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    s.state
        .accounts
        .set_role(&id, "front-desk", chrono::Utc::now().timestamp())
        .await
        .unwrap();
    s.state.refresh_disabled().await.unwrap();
    assert_eq!(fhir_get(s, &lab, "/Observation/ob-1").await, 401);
}

mod roles {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.auth.mfa_optional_roles =
                vec!["front-desk".into(), "auditor".into(), "lab-tech".into()];
            c.roles = vec![phylax_server::base::config::RoleConfig {
                name: "lab-tech".into(),
                description: "Laboratory".into(),
                grants: vec![phylax_server::base::config::RoleGrantConfig {
                    types: vec!["Observation".into(), "Specimen".into()],
                    perms: "crus".into(),
                }],
                reach: "everyone".into(),
                labelled: false,
                break_glass: false,
                erase: false,
                relationships: false,
                purpose: "TREAT".into(),
                masks: Vec::new(),
            }];
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::roles_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::roles_body(&s).await;
        }
    }
}
