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

both!(a_role_or_status_edited_in_the_database_does_not_count);
/// Someone who can write the database but does not hold the KEK edits a
/// user's plain `role` (to admin) or `status` (a disabled account back to
/// active): the account no longer opens, so the user cannot sign in at
/// all, let alone with the edited role. Changes made through Phylax keep
/// working. Accounts sealed before this binding existed are bound at the
/// next start.
async fn a_role_or_status_edited_in_the_database_does_not_count(s: &TestServer) {
    enrolled_user(s, "desk.two", "front-desk", None).await;
    let id = s
        .state
        .accounts
        .find("desk.two")
        .await
        .unwrap()
        .unwrap()
        .id()
        .to_owned();
    s.sql(&format!(
        "UPDATE users SET role = 'admin' WHERE id = '{id}'"
    ))
    .await;
    assert!(s.state.accounts.load(&id).await.is_err(), "does not open");
    let sign_in = || async {
        let app = add_app(s, "user/*.cruds", true).await;
        let mut b = Browser::new(s);
        let page = b
            .get(&authorize_url(s, &app, "user/*.rs", "x", &pkce()))
            .await;
        b.post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "desk.two"),
                ("password", PASSWORD),
            ],
        )
        .await
        .status
    };
    assert!(
        !matches!(sign_in().await, 200 | 303),
        "no sign-in with an edited role"
    );
    // Put back, it opens again; a disabled user edited back to active
    // does not.
    s.sql(&format!(
        "UPDATE users SET role = 'front-desk' WHERE id = '{id}'"
    ))
    .await;
    assert!(s.state.accounts.load(&id).await.is_ok());
    s.state
        .accounts
        .set_status(&id, phylax_server::data::accounts::Status::Disabled, now())
        .await
        .unwrap();
    s.sql(&format!(
        "UPDATE users SET status = 'active' WHERE id = '{id}'"
    ))
    .await;
    assert!(s.state.accounts.load(&id).await.is_err());
    s.sql(&format!(
        "UPDATE users SET status = 'disabled' WHERE id = '{id}'"
    ))
    .await;
    // A role changed through Phylax is sealed with the account.
    s.state
        .accounts
        .set_role(&id, "nurse", now())
        .await
        .unwrap();
    assert_eq!(
        s.state.accounts.load(&id).await.unwrap().unwrap().role(),
        "nurse"
    );
    // An account sealed before the binding (as an older release left it:
    // no `bound`, no record) is bound at the next start; once bound, such
    // an account with an edited role is refused.
    s.sql(&format!(
        "DELETE FROM meta WHERE key = '{}'",
        phylax_server::data::accounts::ACCOUNTS_BOUND
    ))
    .await;
    assert!(s.state.accounts.load(&id).await.is_ok());
    let reopened = phylax_server::instance::Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    assert!(reopened
        .store
        .get_meta(phylax_server::data::accounts::ACCOUNTS_BOUND)
        .await
        .unwrap()
        .is_some());
    s.sql(&format!(
        "UPDATE users SET role = 'admin' WHERE id = '{id}'"
    ))
    .await;
    assert!(s.state.accounts.load(&id).await.is_err());
}
