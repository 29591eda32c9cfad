//! Lockout, scraping, dormant accounts, sign-in floods, back-off and token rate limits.

use super::*;

async fn lockout_body(s: &TestServer) {
    enrolled_user(s, "nurse.joy", "clinician", None).await;
    let app = add_app(s, "user/*.rs", true).await;
    let mut b = Browser::new(s);
    let mut page = b
        .get(&authorize_url(s, &app, "user/*.rs", "s", &pkce()))
        .await;
    // The same account however its name is typed: full-width letters
    // are the same name after NFKC, for the lock and for the delay.
    for name in ["nurse.joy", "ＮＵＲＳＥ.ＪＯＹ", " Nurse.Joy"] {
        page = b
            .post(
                "/auth/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", name),
                    ("password", "wrong wrong wrong wrong"),
                ],
            )
            .await;
        assert_eq!(page.status, 401);
    }
    let acct_key = format!(
        "user:{}",
        s.state.accounts.keyed("throttle", "nurse.joy".as_bytes())
    );
    // The failures were counted under the name as sign-in matches it (an
    // entry exists: asked "as of the epoch", its wait is positive).
    assert!(
        s.state.authn.throttle.wait(&acct_key, 0) > 0,
        "the per-account delay counts every spelling"
    );
    // The failure count is written in the background; wait for the lock.
    let mut locked = false;
    for _ in 0..50 {
        let u = s.state.accounts.find("nurse.joy").await.unwrap().unwrap();
        if u.rec.status == "locked" {
            locked = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(locked, "locked after three failures");
    // The lockout is recorded (after the failure's response, in the
    // background), as are the failed sign-ins.
    let mut recorded = false;
    for _ in 0..50 {
        if has_event(&audit_events(s).await, "lockout", "0") {
            recorded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recorded, "lockout audited");
    assert!(has_event(&audit_events(s).await, "login", "4"));
    let r = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(
        r.status, 401,
        "the right password does not open a locked account"
    );
    assert!(r.body.contains("cannot sign in now"));
    // Four failures from this address: the next attempt must wait.
    let r2 = b
        .post(
            "/auth/login",
            &[
                ("csrf", &r.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r2.status, 429, "{}", r2.body);
    assert!(r2.body.contains("Too many attempts"));
    // Unlocked by an administrator, after the delay the password works
    // (and the second factor is next).
    let id = s
        .state
        .accounts
        .find("nurse.joy")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    s.state
        .accounts
        .set_status(&id, phylax_server::data::accounts::Status::Active, now())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r3 = b
        .post(
            "/auth/login",
            &[
                ("csrf", &r2.csrf()),
                ("username", "nurse.joy"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r3.status, 200, "{}", r3.body);
    assert!(r3.body.contains("otpauth://"));
}

mod lockout {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| c.auth.lockout_threshold = 3).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::lockout_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::lockout_body(&s).await;
        }
    }
}

/// Automatic response: a user who reads many patients' records in a short
/// time is locked by the `scraping` rule, and their token stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_locks_the_account() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.mfa_optional_roles = vec!["clinician".into()];
        c.detect.scraping_patients = 3;
    })
    .await
    .unwrap();
    for i in 0..4 {
        make_patient(&s, &format!("scr-{i}")).await;
    }
    let tok = password_only_token(&s, "nosy", "clinician", "user/Patient.rs").await;
    for i in 0..3 {
        assert_eq!(fhir_get(&s, &tok, &format!("/Patient/scr-{i}")).await, 200);
    }
    // The lock ends the user's tokens on every node within seconds.
    let mut refused = false;
    for _ in 0..60 {
        if fhir_get(&s, &tok, "/Patient/scr-3").await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(refused, "the scraper's token still works");
    let u = s.state.accounts.find("nosy").await.unwrap().unwrap();
    assert_eq!(u.rec.status, "locked");
    let evs = audit_events(&s).await;
    assert!(has_event(&evs, "alert", "0"));
    assert!(evs.iter().any(
        |(st, _, e)| st == "lockout" && e["outcomeDesc"].as_str().unwrap().contains("scraping")
    ));
}

/// `dormant-account`: a sign-in after `detect.dormant_days` without one
/// raises an alert; an ordinary sign-in does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_account_sign_in_alerts() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.mfa_optional_roles = vec!["front-desk".into()];
    })
    .await
    .unwrap();
    let count = || async {
        audit_events(&s)
            .await
            .iter()
            .filter(|(sub, _, ev)| {
                sub == "alert"
                    && ev["outcomeDesc"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("dormant-account ["))
            })
            .count()
    };
    password_only_token(&s, "returner", "front-desk", "user/Patient.rs").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        count().await,
        0,
        "a first sign-in of a new account is not dormant"
    );
    let id = s
        .state
        .accounts
        .find("returner")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    let long_ago = chrono::Utc::now().timestamp() - 120 * 86_400;
    s.state
        .accounts
        .record_success(&id, long_ago)
        .await
        .unwrap();
    password_sign_in(&s, "returner", "user/Patient.rs").await;
    let mut n = 0;
    for _ in 0..50 {
        n = count().await;
        if n > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1);
}

/// A sign-in flood: Argon2id runs at most `auth.argon2_max_concurrent` at
/// once, so memory stays bounded; sign-ins that find no slot in
/// `auth.argon2_queue_secs` get 503 with Retry-After, and the FHIR API
/// keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_flood_is_bounded() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.auth.argon2_max_concurrent = 2;
        c.auth.argon2_queue_secs = 1;
        // 64 MiB each: 48 at once would take 3 GiB.
        c.auth.argon2_memory_kib = 64 * 1024;
    })
    .await
    .unwrap();
    let app = add_app(&s, "user/*.rs", true).await;
    let mut pages = Vec::new();
    for i in 0..48 {
        let mut b = Browser::new(&s);
        let page = b
            .get(&authorize_url(
                &s,
                &app,
                "user/*.rs",
                &format!("s{i}"),
                &pkce(),
            ))
            .await;
        pages.push((b, page.csrf()));
    }
    let before = common::rss_kib();
    let floods = pages.into_iter().enumerate().map(|(i, (mut b, csrf))| {
        tokio::spawn(async move {
            let r = b
                .post(
                    "/auth/login",
                    &[
                        ("csrf", csrf.as_str()),
                        ("username", &format!("nobody{i}")),
                        ("password", "wrong wrong wrong wrong"),
                    ],
                )
                .await;
            r.status
        })
    });
    let floods: Vec<_> = floods.collect();
    // The API answers while the flood waits for Argon2id.
    let tok = s.token("system/Patient.rs").await;
    let t = std::time::Instant::now();
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    let mut statuses = Vec::new();
    for f in floods {
        statuses.push(f.await.unwrap());
    }
    let busy = statuses.iter().filter(|s| **s == 503).count();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(busy + refused, statuses.len(), "{statuses:?}");
    assert!(busy > 0 && refused > 0, "{statuses:?}");
    let after = common::rss_kib();
    // 48 concurrent Argon2id runs would take 3 GiB; two at a time 128 MiB.
    assert!(after < before + 400 * 1024, "RSS {before} -> {after} KiB");
}

// An automatic lockout ends by itself, each further one (before a
// successful sign-in) lasting twice as long; an administrator's lock lasts
// until lifted. So knowing someone's username is not enough to keep them
// out for good, and the lockout alert still goes to the administrators.
both!(lockouts_expire_with_exponential_back_off);
async fn lockouts_expire_with_exponential_back_off(s: &TestServer) {
    use phylax_server::data::accounts::Status;
    enrolled_user(s, "dr.backoff", "clinician", None).await;
    let id = s
        .state
        .accounts
        .find("dr.backoff")
        .await
        .unwrap()
        .unwrap()
        .rec
        .id;
    let t0 = now();
    // One second for the first lockout (the configuration's minimum is a
    // minute; the accounts layer takes what it is given).
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t0)
        .await
        .unwrap();
    assert_eq!(u.status(), Some(Status::Locked));
    assert_eq!(u.locked_until(), Some(t0 + 1));
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let u = s.state.accounts.find("dr.backoff").await.unwrap().unwrap();
    assert_eq!(u.status(), Some(Status::Active), "the lock ran out");
    // The next failure locks again, twice as long.
    let t1 = now();
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t1)
        .await
        .unwrap();
    assert_eq!(u.locked_until(), Some(t1 + 2));
    // A successful sign-in clears the back-off (after the lock ran out).
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    s.state.accounts.record_success(&id, now()).await.unwrap();
    let t2 = now();
    let u = s
        .state
        .accounts
        .record_failure(&id, 1, 1, t2)
        .await
        .unwrap();
    assert_eq!(u.locked_until(), Some(t2 + 1));
    // An administrator's lock does not run out.
    s.state
        .accounts
        .set_status(&id, Status::Locked, now())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let u = s.state.accounts.find("dr.backoff").await.unwrap().unwrap();
    assert_eq!(u.status(), Some(Status::Locked));
    assert_eq!(u.locked_until(), None);
}

// Over the client's token rate limit, nothing single-use is spent: the
// refresh token sent with the refused request still works afterwards (it
// is not taken for a replay).
mod token_limit_spends_nothing {
    use super::common::{Backend, TestServer};
    async fn server(b: Backend) -> Option<TestServer> {
        TestServer::start_with(b, |c| {
            c.rate.token_per_minute = 60;
            c.rate.token_burst = 2;
        })
        .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::token_limit_body(&server(Backend::Sqlite).await.unwrap()).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(s) = server(Backend::Postgres).await {
            super::token_limit_body(&s).await;
        }
    }
}

async fn token_limit_body(s: &TestServer) {
    // The code exchange takes the first of two.
    let (app, _, rt) = signed_in_tokens_for(s, "dr.limited").await;
    let (st, v) = refresh_with(s, &app, &rt).await;
    assert_eq!(st, 200, "{v}");
    let rt2 = v["refresh_token"].as_str().unwrap().to_owned();
    let (st, v) = refresh_with(s, &app, &rt2).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"], "temporarily_unavailable");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (st, v) = refresh_with(s, &app, &rt2).await;
    assert_eq!(st, 200, "the refused request spent nothing: {v}");
}
