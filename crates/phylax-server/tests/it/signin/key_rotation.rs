//! The sign-in key rotates while people sign in (docs/KEYS.md, "The
//! sign-in key"): sessions, refresh tokens, recovery codes, enrollment
//! links and forms from before keep working; usernames move to the new
//! generation; the old generation is kept while something depends on it
//! and, once retired, nothing made under it is accepted.

use super::*;
use phylax_server::data::auth_keys;
use phylax_server::data::grants::Kind;
use phylax_server::instance::Instance;
use phylax_server::keys::KeyAdmin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Nodes look for key events each second.
const GRACE: Duration = Duration::from_millis(1500);

/// Sign `name` (enrolled, TOTP set up by [`signed_in_browser`]'s
/// path) in with a recovery code; returns the status of the code step.
async fn sign_in_with_recovery(s: &TestServer, name: &str, code: &str) -> u16 {
    let mut b = Browser::new(s);
    let app = add_app(s, "user/*.rs", true).await;
    let page = b
        .get(&authorize_url(s, &app, "user/*.rs", "r", &pkce()))
        .await;
    let mfa = b
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", name),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(mfa.status, 200, "{}", mfa.body);
    b.post("/auth/mfa", &[("csrf", &mfa.csrf()), ("code", code)])
        .await
        .status
}

/// With a session cookie, authorize goes straight to a code (303).
async fn session_works(s: &TestServer, b: &mut Browser, app: &str) -> bool {
    let r = b
        .get(&authorize_url(
            s,
            app,
            "user/*.rs offline_access",
            "s",
            &pkce(),
        ))
        .await;
    r.status == 303 && r.param("code").is_some()
}

both!(the_sign_in_key_rotates_while_people_sign_in);
async fn the_sign_in_key_rotates_while_people_sign_in(s: &TestServer) {
    // Before: a signed-in browser (session, refresh token, recovery
    // codes), another user's refresh token, an unused enrollment link,
    // login forms already rendered, and a grant kept aside unused.
    let mut b = Browser::new(s);
    let (app, _, rt, recovery) = signed_in_browser(s, &mut b, "dr.rot").await;
    assert_eq!(recovery.len(), 10);
    let (kept_app, _, kept_rt, _) = signed_in_browser(s, &mut Browser::new(s), "dr.kept").await;
    let (_, link) = s
        .state
        .accounts
        .add_linked(
            "dr.later",
            "clinician",
            None,
            Some(CARE_PRACTITIONER),
            3600,
            now(),
        )
        .await
        .unwrap();
    let mut form_browser = Browser::new(s);
    let old_form = form_browser
        .get(&authorize_url(
            s,
            &app,
            "user/*.rs offline_access",
            "f",
            &pkce(),
        ))
        .await;
    let mut late_browser = Browser::new(s);
    let late_form = late_browser
        .get(&authorize_url(
            s,
            &app,
            "user/*.rs offline_access",
            "l",
            &pkce(),
        ))
        .await;
    let grants = &s.state.authn.grants;
    let aside = grants
        .create(
            Kind::Refresh,
            "fam-aside",
            "nobody",
            &serde_json::json!({}),
            now() + 3600,
            now(),
        )
        .await
        .unwrap();

    // Load: a chain of refresh-token rotations (each a new grant, the
    // previous one taken) and username lookups, all through the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (refreshes, lookups) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (load_app, _, chain_rt, _) = signed_in_browser(s, &mut Browser::new(s), "dr.load").await;
    let refresher = {
        let (http, url) = (s.http.clone(), s.token_url());
        let (stop, n) = (stop.clone(), refreshes.clone());
        tokio::spawn(async move {
            let mut rt = chain_rt;
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(&url)
                    .form(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", rt.as_str()),
                        ("client_id", load_app.as_str()),
                    ])
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                assert_eq!(st, 200, "a refresh during the rotation: {v}");
                rt = v["refresh_token"].as_str().unwrap().to_owned();
                n.fetch_add(1, Ordering::Relaxed);
                // Below the token endpoint's rate limit per client.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let finder = {
        let (accounts, stop, n) = (s.state.accounts.clone(), stop.clone(), lookups.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for name in ["dr.rot", "DR.KEPT", "dr.later", "dr.load"] {
                    let u = accounts.find(name).await.unwrap();
                    assert!(u.is_some(), "{name} found during the rotation");
                    n.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let op = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_sign_in(&|_, _| {})
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    refresher.await.unwrap();
    finder.await.unwrap();
    assert!(refreshes.load(Ordering::Relaxed) > 5 && lookups.load(Ordering::Relaxed) > 20);
    assert_eq!(r.generation, 2);
    assert!(r.usernames_rehashed >= 4, "{r:?}");
    // Generation 1 is kept: live grants, recovery codes and a link.
    assert!(r.retire.retired.is_empty());
    let kept = &r.retire.kept[0];
    assert_eq!(kept.generation, 1);
    assert!(kept.grants_until.unwrap() > now());
    assert_eq!(kept.accounts.usernames, 0, "every username re-hashed");
    assert!(kept.accounts.recovery_code_sets >= 3 && kept.accounts.enrollment_links == 1);
    assert!(s
        .store
        .get_wrapped_key("mac:auth@2")
        .await
        .unwrap()
        .is_some());
    tokio::time::sleep(GRACE).await;

    // What was made before keeps working: the session (it moves to the
    // new generation), the refresh token, the rendered form, the link,
    // a recovery code, on this node and on one started now.
    assert!(session_works(s, &mut b, &app).await);
    assert!(session_works(s, &mut b, &app).await, "moved, still works");
    let (st, v) = refresh_with(s, &app, &rt).await;
    assert_eq!(st, 200, "{v}");
    let r = form_browser
        .post(
            "/auth/login",
            &[
                ("csrf", &old_form.csrf()),
                ("username", "dr.rot"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(
        r.status, 200,
        "a form from before the rotation posts: {}",
        r.body
    );
    let r = Browser::new(s)
        .post(
            "/auth/enroll",
            &[
                ("token", &link),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(sign_in_with_recovery(s, "dr.rot", &recovery[0]).await, 200);
    assert_eq!(
        sign_in_with_recovery(s, "dr.rot", &recovery[0]).await,
        401,
        "still once"
    );
    // New recovery codes, links and grants name the new generation.
    let (_, link2) = s
        .state
        .accounts
        .add_linked(
            "dr.new",
            "clinician",
            None,
            Some(CARE_PRACTITIONER),
            3600,
            now(),
        )
        .await
        .unwrap();
    // A name taken under the old generation is still taken (its hash
    // moved; the check looks under every generation anyway).
    assert!(s
        .state
        .accounts
        .add_linked("Dr.Kept", "clinician", None, None, 60, now())
        .await
        .is_err());
    let (node, _stop) = s.second_node().await;
    let (st, v) = exchange_at(s, &node, &kept_app, &kept_rt).await;
    assert_eq!(
        st, 200,
        "the other node takes a refresh token from before: {v}"
    );
    assert!(grants
        .get::<Value>(Kind::Refresh, &aside, now())
        .await
        .unwrap()
        .is_some());

    // Retirement waits for what depends on generation 1: recovery codes
    // (replaced when the second factor is reset) and grants (their
    // recorded end is moved to the past, as if time had passed).
    let admin = KeyAdmin::of(&op, GRACE);
    let r = admin.retire_sign_in().await.unwrap();
    assert!(r.retired.is_empty() && r.kept[0].accounts.recovery_code_sets >= 3);
    assert_eq!(r.kept[0].accounts.enrollment_links, 0, "the link was used");
    for u in s.state.accounts.list().await.unwrap() {
        if u.recovery_left() > 0 {
            s.state.accounts.reset_mfa(u.id(), now()).await.unwrap();
        }
    }
    let r = admin.retire_sign_in().await.unwrap();
    assert!(r.retired.is_empty(), "grants may still be alive: {r:?}");
    assert_eq!(r.kept[0].accounts.recovery_code_sets, 0);
    s.sql(&format!(
        "UPDATE meta SET value = {} WHERE key = '{}2'",
        s.blob(b"1"),
        auth_keys::GRANTS_UNTIL
    ))
    .await;
    let r = admin.retire_sign_in().await.unwrap();
    assert_eq!((r.retired.clone(), r.kept.len()), (vec![1], 0), "{r:?}");
    assert!(s.store.get_wrapped_key("mac:auth").await.unwrap().is_none());
    tokio::time::sleep(GRACE).await;

    // Retired means refused: the grant kept aside and the form rendered
    // before the rotation no longer work; what was made after does.
    assert!(grants
        .get::<Value>(Kind::Refresh, &aside, now())
        .await
        .unwrap()
        .is_none());
    let r = late_browser
        .post(
            "/auth/login",
            &[
                ("csrf", &late_form.csrf()),
                ("username", "dr.new"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert!(matches!(r.status, 400 | 403), "{}", r.status);
    let r = Browser::new(s)
        .post(
            "/auth/enroll",
            &[
                ("token", &link2),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "a link made after the rotation: {}", r.body);
    assert!(s.state.accounts.find("dr.rot").await.unwrap().is_some());
    // The KEK rotation re-wraps the new generation like any other key,
    // and an instance opened afterwards has only it.
    KeyAdmin::of(&op, Duration::ZERO)
        .rotate_kek(&|_, _| {})
        .await
        .unwrap();
    let reopened = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    assert_eq!(reopened.auth_keys.generations(), vec![2]);
    let (node, _stop) = s.second_node().await;
    let mut nb = Browser::new(s);
    nb.base = node.trim_end_matches("/fhir").to_owned();
    let page = nb
        .get(&authorize_url(
            s,
            &app,
            "user/*.rs offline_access",
            "n",
            &pkce(),
        ))
        .await;
    let r = nb
        .post(
            "/auth/login",
            &[
                ("csrf", &page.csrf()),
                ("username", "dr.new"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "a new node signs people in: {}", r.body);
}

/// A refresh at another node's token endpoint.
async fn exchange_at(s: &TestServer, node: &str, app: &str, rt: &str) -> (u16, Value) {
    let url = format!("{}/auth/token", node.trim_end_matches("/fhir"));
    let r = s
        .http
        .post(url)
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", app),
        ])
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or_default())
}

both!(sign_in_rotation_survives_what_an_operator_could_do);
/// What goes wrong around a rotation: a `user add` from a process that
/// loaded its keys before it, a rotation stopped between storing its key
/// and recording it, a key event removed from the middle of the list,
/// a retired key row put back from a backup, and a recorded generation
/// whose key was deleted.
async fn sign_in_rotation_survives_what_an_operator_could_do(s: &TestServer) {
    let t = now();
    s.state
        .accounts
        .add_linked("xavier", "clinician", None, None, 2, t)
        .await
        .unwrap();
    // A CLI process opened before the rotation.
    let stale = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let stale_accounts = stale.accounts().unwrap();
    let op = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let admin = KeyAdmin::of(&op, GRACE);
    // A key event removed from the middle of the list hides nothing
    // after it from the running server.
    admin.rotate_tokens().await.unwrap();
    admin.rotate_tokens().await.unwrap();
    tokio::time::sleep(GRACE).await;
    let follower = phylax_server::data::key_events::KeyEvents::new(&s.store)
        .await
        .unwrap();
    s.sql("DELETE FROM meta WHERE key = 'keys_event_v1:1'")
        .await;
    admin.rotate_tokens().await.unwrap();
    // The removed event makes it reload everything; the new one is seen.
    let kinds = follower.poll(&s.store, &op.keys).await.unwrap();
    assert!(
        kinds.iter().filter(|k| *k == "tokens").count() == 2 && kinds.len() == 7,
        "an event after a gap is seen: {kinds:?}"
    );
    // The largest event number, written by hand, hides nothing either.
    s.sql(&format!(
        "INSERT INTO meta (key, value) VALUES ('keys_event_v1:18446744073709551615', {})",
        s.blob(b"tokens 0")
    ))
    .await;
    assert_eq!(
        follower.poll(&s.store, &op.keys).await.unwrap(),
        vec!["tokens".to_owned()]
    );
    admin.rotate_tokens().await.unwrap();
    assert_eq!(
        follower.poll(&s.store, &op.keys).await.unwrap(),
        vec!["tokens".to_owned()],
        "an event after the largest number is seen"
    );
    let saved = s.store.get_wrapped_key("mac:auth").await.unwrap().unwrap();
    let r = admin.rotate_sign_in(&|_, _| {}).await.unwrap();
    assert_eq!(r.generation, 2);
    let mut retired = r.retire.retired.clone();
    tokio::time::sleep(GRACE).await;
    assert!(
        s.state.accounts.find("xavier").await.unwrap().is_some(),
        "the running server follows the rotation"
    );
    // The stale process does not make a second xavier.
    assert!(matches!(
        stale_accounts
            .add_linked("Xavier", "clinician", None, None, 3600, now())
            .await,
        Err(phylax_server::data::accounts::AccountError::Taken)
    ));
    assert_eq!(
        s.state.accounts.list().await.unwrap().len(),
        1,
        "one xavier"
    );
    // A rotation stopped after storing its key, before recording it: the
    // instance opens, and the next rotation finishes that generation
    // instead of adding another.
    let (_, w) =
        phylax_crypto::MacKey::generate_wrapped(op.keys.kek(), &auth_keys::purpose(3)).unwrap();
    s.store
        .put_wrapped_key_if_absent(&auth_keys::row(3), &w, now())
        .await
        .unwrap();
    Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let r = admin.rotate_sign_in(&|_, _| {}).await.unwrap();
    assert_eq!(r.generation, 3, "finished, not stacked on");
    retired.extend(r.retire.retired.clone());
    // Retire what is left (nothing depends on it once grants are over;
    // xavier's enrollment link has expired).
    for g in [2, 3] {
        s.sql(&format!(
            "UPDATE meta SET value = {} WHERE key = '{}{g}'",
            s.blob(b"1"),
            auth_keys::GRANTS_UNTIL
        ))
        .await;
    }
    let r = admin.retire_sign_in().await.unwrap();
    retired.extend(r.retired.clone());
    retired.sort();
    assert_eq!(retired, vec![1, 2], "{r:?}");
    // The first key row put back from a backup does not bring it back.
    s.store
        .put_wrapped_key_if_absent("mac:auth", &saved, now())
        .await
        .unwrap();
    let reopened = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    assert_eq!(reopened.auth_keys.generations(), vec![3]);
    // A recorded generation whose key was deleted stops the instance from
    // opening (usernames are hashed under it), with a reason.
    s.sql("DELETE FROM wrapped_keys WHERE scope = 'mac:auth@3'")
        .await;
    let e = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("keys: the sign-in key mac:auth@3 is missing"),
        "{e}"
    );
}

both!(accounts_and_grants_move_with_a_data_key_rotation);
/// `keys rotate --data-keys` seals every account and live grant again
/// under the new generation and deletes the old accounts and grants keys:
/// a copy of the database from before keeps its account details sealed
/// under a key that no longer exists. Sign-in, sessions and refresh
/// tokens carry on, on this node and on one started afterwards.
async fn accounts_and_grants_move_with_a_data_key_rotation(s: &TestServer) {
    let mut b = Browser::new(s);
    let (app, _, rt, _) = signed_in_browser(s, &mut b, "dr.dk").await;
    let op = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let r = KeyAdmin::of(&op, GRACE)
        .rotate_data_keys(&|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.generation, 2);
    assert!(r.accounts >= 1 && r.grants >= 2, "{r:?}");
    for gone in ["data:accounts", "data:grants"] {
        assert!(
            s.store.get_wrapped_key(gone).await.unwrap().is_none(),
            "{gone}"
        );
    }
    for kept in ["data:accounts@2", "data:grants@2"] {
        assert!(
            s.store.get_wrapped_key(kept).await.unwrap().is_some(),
            "{kept}"
        );
    }
    for u in s.store.list_users().await.unwrap() {
        assert_eq!(
            phylax_crypto::datakey::record_generation(&u.sealed),
            Some(2)
        );
    }
    for g in s.store.live_grants(now()).await.unwrap() {
        assert_eq!(
            phylax_crypto::datakey::record_generation(&g.sealed),
            Some(2)
        );
    }
    tokio::time::sleep(GRACE).await;
    assert!(session_works(s, &mut b, &app).await);
    let (st, v) = refresh_with(s, &app, &rt).await;
    assert_eq!(st, 200, "{v}");
    assert!(s.state.accounts.find("dr.dk").await.unwrap().is_some());
    let (node, _stop) = s.second_node().await;
    let (st, v) = exchange_at(s, &node, &app, v["refresh_token"].as_str().unwrap()).await;
    assert_eq!(st, 200, "{v}");
    // New accounts are sealed under the new generation from the start.
    let (u, _) = s
        .state
        .accounts
        .add_linked("dr.after", "clinician", None, None, 60, now())
        .await
        .unwrap();
    let row = s.store.get_user(u.id()).await.unwrap().unwrap();
    assert_eq!(
        phylax_crypto::datakey::record_generation(&row.sealed),
        Some(2)
    );
}
