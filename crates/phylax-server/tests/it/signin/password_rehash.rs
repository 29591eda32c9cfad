//! Password hashes made under old settings are replaced at sign-in.

use super::*;

/// A hash made under the old Argon2id settings is replaced, at the next
/// successful sign-in, by one under the current settings (here: a node
/// started after the operator raised the memory cost).
async fn rehash_body(s: &TestServer) {
    enrolled_user(s, "dr.old", "clinician", None).await;
    let scheme = |s: &TestServer| {
        let accounts = s.state.accounts.clone();
        async move {
            accounts
                .find("dr.old")
                .await
                .unwrap()
                .unwrap()
                .password_scheme()
                .unwrap()
        }
    };
    assert_eq!(scheme(s).await, "argon2id m=19456,t=2,p=1");
    // The operator raises the cost; a node started now uses it.
    let mut cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    cfg.auth.argon2_memory_kib = 24 * 1024;
    cfg.save(&s.data_dir).unwrap();
    let (fhir2, _stop) = s.second_node().await;
    let app = add_app(s, "user/*.rs", true).await;
    let mut b = Browser::new(s);
    b.base = fhir2.trim_end_matches("/fhir").to_owned();
    let page = b
        .get(&authorize_url(s, &app, "user/*.rs", "r", &pkce()))
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let next = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.old"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(
        scheme(s).await,
        "argon2id m=24576,t=2,p=1",
        "upgraded at sign-in"
    );
    // A wrong password changes nothing.
    let mut b2 = Browser::new(s);
    b2.base = b.base.clone();
    let page = b2
        .get(&authorize_url(s, &app, "user/*.rs", "r", &pkce()))
        .await;
    b2.post(
        "/auth/login",
        &[
            ("csrf", &page.csrf()),
            ("username", "dr.old"),
            ("password", "wrong wrong wrong wrong"),
        ],
    )
    .await;
    assert_eq!(scheme(s).await, "argon2id m=24576,t=2,p=1");
}

mod rehash {
    use super::common::{Backend, TestServer};
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let s = TestServer::start(Backend::Sqlite).await.unwrap();
        super::rehash_body(&s).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = TestServer::start(Backend::Postgres).await {
            super::rehash_body(&s).await;
        }
    }
}
