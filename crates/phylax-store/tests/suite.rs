//! One behavioural suite, every backend. Each test runs against a fresh
//! SQLite file and a fresh PostgreSQL schema. PostgreSQL comes from
//! `PHYLAX_TEST_DATABASE_URL` (scripts/test sets it up); without it the
//! PostgreSQL half is skipped with a note, except under `CI=true`, where a
//! missing database is a failure.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use phylax_store::postgres::PgStore;
use phylax_store::sqlite::SqliteStore;
use phylax_store::*;
use std::sync::Arc;

struct Fixture {
    store: DynStore,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL schema, for a second store on the same database.
    schema: Option<String>,
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
        schema: None,
    }
}

async fn postgres() -> Option<Fixture> {
    let url = match std::env::var("PHYLAX_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but PHYLAX_TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI");
            }
            eprintln!("note: PHYLAX_TEST_DATABASE_URL not set; skipping the PostgreSQL half (run scripts/test)");
            return None;
        }
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let store = PgStore::connect(&url, Some(&schema)).await.unwrap();
    Some(Fixture {
        store: Arc::new(store),
        _dir: None,
        schema: Some(schema),
    })
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let f = super::sqlite().await;
                super::$name(&f.store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(f) = super::postgres().await {
                    super::$name(&f.store).await;
                }
            }
        }
    };
}

fn nv(rtype: &str, id: &str, version: u64, t: i64, body: &[u8]) -> NewVersion {
    NewVersion {
        rtype: rtype.into(),
        id: id.into(),
        version,
        last_updated: t,
        deleted: false,
        key_scope: "tenant".into(),
        sealed: Some(body.to_vec()),
        index: vec![],
    }
}

/// Every current, non-deleted resource of a type.
fn all_current(rtype: &str) -> SearchQuery {
    SearchQuery {
        rtype: rtype.into(),
        and: vec![],
        before_seq: None,
        limit: u32::MAX,
    }
}

fn h(param: &str, hash: &[u8]) -> IndexRow {
    IndexRow {
        param: param.into(),
        hash: Some(hash.to_vec()),
        lo: None,
        hi: None,
        num: None,
    }
}

fn range(param: &str, lo: i64, hi: i64) -> IndexRow {
    IndexRow {
        param: param.into(),
        hash: None,
        lo: Some(lo),
        hi: Some(hi),
        num: None,
    }
}

fn number(param: &str, n: f64, unit: Option<&[u8]>) -> IndexRow {
    IndexRow {
        param: param.into(),
        hash: unit.map(<[u8]>::to_vec),
        lo: None,
        hi: None,
        num: Some(n),
    }
}

fn with_index(mut v: NewVersion, rows: Vec<IndexRow>) -> NewVersion {
    v.index = rows;
    v
}

async fn ids(s: &DynStore, and: Vec<Vec<Cond>>) -> Vec<String> {
    let q = SearchQuery {
        rtype: "Observation".into(),
        and,
        before_seq: None,
        limit: 100,
    };
    let mut out: Vec<String> = s
        .search(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    let n = s.search_count(&q).await.unwrap();
    assert_eq!(n as usize, out.len(), "count agrees with rows");
    out.sort();
    out
}

both!(meta_and_keys_are_set_once);
async fn meta_and_keys_are_set_once(s: &DynStore) {
    assert_eq!(s.get_meta("k").await.unwrap(), None);
    assert_eq!(s.put_meta_if_absent("k", b"one").await.unwrap(), b"one");
    assert_eq!(s.put_meta_if_absent("k", b"two").await.unwrap(), b"one");
    assert_eq!(s.get_meta("k").await.unwrap().unwrap(), b"one");
    assert_eq!(s.get_wrapped_key("patient:1").await.unwrap(), None);
    let a = s
        .put_wrapped_key_if_absent("patient:1", b"w1", 1)
        .await
        .unwrap();
    let b = s
        .put_wrapped_key_if_absent("patient:1", b"w2", 2)
        .await
        .unwrap();
    assert_eq!(a, b"w1");
    assert_eq!(b, b"w1", "a racing second key loses; the first stays");
    s.put_wrapped_key_if_absent("patient:2", b"w3", 3)
        .await
        .unwrap();
    // Several at once: those that exist, each with its own key.
    let mut got = s
        .get_wrapped_keys(&[
            "patient:2".into(),
            "patient:none".into(),
            "patient:1".into(),
            "patient:1'; DROP TABLE wrapped_keys; --".into(),
        ])
        .await
        .unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("patient:1".to_owned(), b"w1".to_vec()),
            ("patient:2".to_owned(), b"w3".to_vec())
        ]
    );
    assert!(s.get_wrapped_keys(&[]).await.unwrap().is_empty());
}

both!(versions_preconditions_and_tombstones);
async fn versions_preconditions_and_tombstones(s: &DynStore) {
    s.append_version(
        nv("Patient", "a", 1, 1000, b"v1"),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    assert!(matches!(
        s.append_version(
            nv("Patient", "a", 1, 1001, b"x"),
            Precondition::Absent,
            vec![]
        )
        .await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.append_version(
            nv("Patient", "a", 3, 1001, b"x"),
            Precondition::CurrentIs(1),
            vec![]
        )
        .await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.append_version(
            nv("Patient", "a", 3, 1001, b"x"),
            Precondition::CurrentIs(2),
            vec![]
        )
        .await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.append_version(
            nv("Patient", "zz", 2, 1001, b"x"),
            Precondition::CurrentIs(1),
            vec![]
        )
        .await,
        Err(StoreError::Conflict)
    ));
    s.append_version(
        nv("Patient", "a", 2, 2000, b"v2"),
        Precondition::CurrentIs(1),
        vec![],
    )
    .await
    .unwrap();
    let cur = s.read_current("Patient", "a").await.unwrap().unwrap();
    assert_eq!((cur.version, cur.sealed.as_deref()), (2, Some(&b"v2"[..])));
    let v1 = s.read_version("Patient", "a", 1).await.unwrap().unwrap();
    assert_eq!(v1.sealed.as_deref(), Some(&b"v1"[..]));
    assert!(s.read_version("Patient", "a", 3).await.unwrap().is_none());
    assert!(s.read_current("Observation", "a").await.unwrap().is_none());
    let mut del = nv("Patient", "a", 3, 3000, b"");
    del.deleted = true;
    del.sealed = None;
    s.append_version(del, Precondition::CurrentIs(2), vec![])
        .await
        .unwrap();
    let cur = s.read_current("Patient", "a").await.unwrap().unwrap();
    assert!(cur.deleted && cur.sealed.is_none() && cur.version == 3);
    // A deleted id is never "absent" again: no silent version-1 reuse.
    assert!(matches!(
        s.append_version(
            nv("Patient", "a", 1, 4000, b"x"),
            Precondition::Absent,
            vec![]
        )
        .await,
        Err(StoreError::Conflict)
    ));
    s.append_version(
        nv("Patient", "a", 4, 4000, b"v4"),
        Precondition::CurrentIs(3),
        vec![],
    )
    .await
    .unwrap();
    assert!(
        !s.read_current("Patient", "a")
            .await
            .unwrap()
            .unwrap()
            .deleted
    );
}

both!(history_scopes_since_and_paging);
async fn history_scopes_since_and_paging(s: &DynStore) {
    for i in 0..5u64 {
        let id = format!("p{i}");
        s.append_version(
            nv("Patient", &id, 1, 100 + i as i64, b"x"),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
        s.append_version(
            nv("Observation", &id, 1, 200 + i as i64, b"x"),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    s.append_version(
        nv("Patient", "p0", 2, 300, b"y"),
        Precondition::CurrentIs(1),
        vec![],
    )
    .await
    .unwrap();
    let q = |scope, since, before, limit| HistoryQuery {
        scope,
        since,
        before_seq: before,
        key_scopes: None,
        limit,
    };
    let all = s
        .history(&q(HistoryScope::System, None, None, 100))
        .await
        .unwrap();
    assert_eq!(all.len(), 11);
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    let pats = s
        .history(&q(HistoryScope::Type("Patient".into()), None, None, 100))
        .await
        .unwrap();
    assert_eq!(pats.len(), 6);
    let inst = s
        .history(&q(
            HistoryScope::Instance("Patient".into(), "p0".into()),
            None,
            None,
            100,
        ))
        .await
        .unwrap();
    assert_eq!(
        inst.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    let since = s
        .history(&q(HistoryScope::System, Some(200), None, 100))
        .await
        .unwrap();
    assert_eq!(since.len(), 6);
    // Paging: pages of 4 cover everything exactly once.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .history(&q(HistoryScope::System, None, before, 4))
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|v| v.seq);
        seen.extend(page.into_iter().map(|v| v.seq));
    }
    assert_eq!(seen, all.iter().map(|v| v.seq).collect::<Vec<_>>());
}

// Confined to some key scopes, on every scope of history: versions of other
// scopes are never returned, and paging stays within the scopes.
both!(history_confined_to_key_scopes);
async fn history_confined_to_key_scopes(s: &DynStore) {
    for (id, scope) in [
        ("a1", "patient:a"),
        ("b1", "patient:b"),
        ("a2", "patient:a"),
        ("t1", "tenant"),
    ] {
        let mut v = nv("Observation", id, 1, 100, b"x");
        v.key_scope = scope.into();
        s.append_version(v, Precondition::Absent, vec![])
            .await
            .unwrap();
    }
    let scoped = |scope, keys: &[&str], before, limit| HistoryQuery {
        scope,
        since: None,
        before_seq: before,
        key_scopes: Some(keys.iter().map(|k| (*k).to_owned()).collect()),
        limit,
    };
    let ids =
        |vs: Vec<phylax_store::StoredVersion>| vs.into_iter().map(|v| v.id).collect::<Vec<_>>();
    for scope in [
        HistoryScope::System,
        HistoryScope::Type("Observation".into()),
    ] {
        let got = ids(s
            .history(&scoped(scope.clone(), &["patient:a"], None, 100))
            .await
            .unwrap());
        assert_eq!(got, vec!["a2", "a1"], "{scope:?}");
        let got = ids(s
            .history(&scoped(scope.clone(), &["patient:b", "tenant"], None, 100))
            .await
            .unwrap());
        assert_eq!(got, vec!["t1", "b1"], "{scope:?}");
        assert!(s
            .history(&scoped(scope.clone(), &[], None, 100))
            .await
            .unwrap()
            .is_empty());
        // A page of one, then the next: still only patient:a's.
        let p1 = s
            .history(&scoped(scope.clone(), &["patient:a"], None, 1))
            .await
            .unwrap();
        let p2 = s
            .history(&scoped(
                scope.clone(),
                &["patient:a"],
                p1.last().map(|v| v.seq),
                1,
            ))
            .await
            .unwrap();
        assert_eq!(
            (ids(p1), ids(p2)),
            (vec!["a2".to_owned()], vec!["a1".to_owned()])
        );
    }
    let inst = s
        .history(&scoped(
            HistoryScope::Instance("Observation".into(), "b1".into()),
            &["patient:a"],
            None,
            10,
        ))
        .await
        .unwrap();
    assert!(inst.is_empty());
}

both!(list_and_count_current);
async fn list_and_count_current(s: &DynStore) {
    for i in 0..6 {
        s.append_version(
            nv("Patient", &format!("p{i}"), 1, i, b"x"),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    let mut del = nv("Patient", "p2", 2, 10, b"");
    del.deleted = true;
    del.sealed = None;
    s.append_version(del, Precondition::CurrentIs(1), vec![])
        .await
        .unwrap();
    s.append_version(
        nv("Patient", "p0", 2, 11, b"x2"),
        Precondition::CurrentIs(1),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(s.search_count(&all_current("Patient")).await.unwrap(), 5);
    assert_eq!(
        s.search_count(&all_current("Observation")).await.unwrap(),
        0
    );
    let page1 = s.list_current("Patient", None, 3).await.unwrap();
    assert_eq!(
        page1.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec!["p0", "p5", "p4"]
    );
    assert_eq!(page1[0].version, 2);
    let page2 = s
        .list_current("Patient", page1.last().map(|v| v.seq), 3)
        .await
        .unwrap();
    assert_eq!(
        page2.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec!["p3", "p1"]
    );
}

both!(clients_and_jti_replay);
async fn clients_and_jti_replay(s: &DynStore) {
    let c = ClientRecord {
        id: "c1".into(),
        name: "lab".into(),
        scope: "system/*.rs".into(),
        jwks: "{\"keys\":[]}".into(),
        disabled: false,
        created_at: 5,
        redirect_uris: vec![],
        public: false,
        first_party: false,
        cert_bound: false,
    };
    s.add_client(&c).await.unwrap();
    let app = ClientRecord {
        id: "app".into(),
        name: "patient app".into(),
        scope: "patient/*.rs openid fhirUser".into(),
        jwks: String::new(),
        disabled: false,
        created_at: 6,
        redirect_uris: vec![
            "https://app.example/cb".into(),
            "http://127.0.0.1:9/cb".into(),
        ],
        public: true,
        first_party: true,
        cert_bound: false,
    };
    s.add_client(&app).await.unwrap();
    assert_eq!(s.get_client("app").await.unwrap().unwrap(), app);
    assert!(matches!(s.add_client(&c).await, Err(StoreError::Duplicate)));
    assert_eq!(s.get_client("c1").await.unwrap().unwrap(), c);
    assert!(s.get_client("nope").await.unwrap().is_none());
    assert!(s.set_client_disabled("c1", true).await.unwrap());
    assert!(!s.set_client_disabled("nope", true).await.unwrap());
    assert!(s.list_clients().await.unwrap()[0].disabled);
    assert!(s.use_jti("c1", "j1", 100, 10).await.unwrap());
    assert!(
        !s.use_jti("c1", "j1", 100, 20).await.unwrap(),
        "replay refused"
    );
    assert!(
        s.use_jti("c2", "j1", 100, 20).await.unwrap(),
        "jti is per client"
    );
    // After expiry the entry may be purged; the assertion itself would be
    // refused by its exp check long before that.
    assert!(s.use_jti("c1", "j2", 100, 20).await.unwrap());
}

both!(concurrent_writers_one_winner_per_version);
async fn concurrent_writers_one_winner_per_version(s: &DynStore) {
    s.append_version(
        nv("Patient", "race", 1, 1, b"x"),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.append_version(
                nv("Patient", "race", 2, 2, format!("w{i}").as_bytes()),
                Precondition::CurrentIs(1),
                vec![],
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(
        s.read_current("Patient", "race")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

both!(many_concurrent_creates_all_land);
async fn many_concurrent_creates_all_land(s: &DynStore) {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.append_version(
                nv("Observation", &format!("o{i}"), 1, i, b"x"),
                Precondition::Absent,
                vec![],
            )
            .await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    assert_eq!(
        s.search_count(&all_current("Observation")).await.unwrap(),
        200
    );
}

#[tokio::test]
async fn sqlite_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        let s = SqliteStore::open(&path).await.unwrap();
        s.append_version(
            nv("Patient", "a", 1, 1, b"durable"),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    let s = SqliteStore::open(&path).await.unwrap();
    let v = s.read_current("Patient", "a").await.unwrap().unwrap();
    assert_eq!(v.sealed.as_deref(), Some(&b"durable"[..]));
}

#[tokio::test]
async fn unknown_database_url_is_refused() {
    assert!(phylax_store::open("mysql://x").await.is_err());
}

both!(driven_pages_are_newest_first_once_each);
/// Pages of a search driven by blind-hash entries: newest first, each
/// match once even when it has the entry twice (two names with the same
/// family), the other groups still applied, and paging by `seq` neither
/// skipping nor repeating a match. On PostgreSQL the driver is an ordered
/// stream joined to the versions (`query::build`), so this is what keeps
/// that stream honest; on SQLite the same answers come from `seq IN (…)`.
async fn driven_pages_are_newest_first_once_each(s: &DynStore) {
    let fam = |x: &[u8]| Cond::Hash {
        param: "family".into(),
        hashes: vec![x.to_vec()],
    };
    let given = |x: &[u8]| Cond::Hash {
        param: "given".into(),
        hashes: vec![x.to_vec()],
    };
    for i in 0..9 {
        let mut rows = vec![h("family", if i == 7 { b"G" } else { b"F" })];
        if i == 2 || i == 5 {
            rows.push(h("family", b"F"));
        }
        if i == 3 {
            rows.push(h("_security", b"R"));
        }
        if i == 7 || i == 8 {
            rows.push(h("given", b"X"));
        }
        s.append_version(
            with_index(nv("Patient", &format!("p{i}"), 1, 1000 + i, b"x"), rows),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    let pages = |and: Vec<Vec<Cond>>| async move {
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let q = SearchQuery {
                rtype: "Patient".into(),
                and: and.clone(),
                before_seq: before,
                limit: 3,
            };
            let mut rows = s.search(&q).await.unwrap();
            assert!(rows.len() <= 3);
            let more = rows.len() == 3;
            rows.truncate(2);
            before = rows.last().map(|r| r.seq);
            seen.extend(rows.into_iter().map(|r| r.id));
            if !more {
                return seen;
            }
        }
    };
    let not_restricted = vec![Cond::NotHash {
        param: "_security".into(),
        hashes: vec![b"R".to_vec()],
    }];
    assert_eq!(
        pages(vec![vec![fam(b"F")], not_restricted.clone()]).await,
        ["p8", "p6", "p5", "p4", "p2", "p1", "p0"],
        "one hash drives"
    );
    assert_eq!(
        pages(vec![vec![fam(b"F"), given(b"X")], not_restricted.clone()]).await,
        ["p8", "p7", "p6", "p5", "p4", "p2", "p1", "p0"],
        "a union drives; p8 matches both and is listed once"
    );
    assert_eq!(
        pages(vec![vec![fam(b"F")], vec![given(b"X")]]).await,
        ["p8"],
        "the other group still applies"
    );
}

both!(search_index_follows_versions_and_answers_queries);
async fn search_index_follows_versions_and_answers_queries(s: &DynStore) {
    let hc = |x: &str| Cond::Hash {
        param: "code".into(),
        hashes: vec![x.as_bytes().to_vec()],
    };
    // o1: code A, date [100, 200), value 5 mg; o2: code B, date [150, 160), value 10 g; o3: code A, no date.
    s.append_version(
        with_index(
            nv("Observation", "o1", 1, 1000, b"x"),
            vec![
                h("code", b"A"),
                range("date", 100, 200),
                number("value", 5.0, Some(b"mg")),
                number("value", 5.0, None),
            ],
        ),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    s.append_version(
        with_index(
            nv("Observation", "o2", 1, 2000, b"x"),
            vec![
                h("code", b"B"),
                range("date", 150, 160),
                number("value", 10.0, Some(b"g")),
            ],
        ),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    s.append_version(
        with_index(
            nv("Observation", "o3", 1, 3000, b"x"),
            vec![h("code", b"A")],
        ),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(ids(s, vec![vec![hc("A")]]).await, vec!["o1", "o3"]);
    assert_eq!(
        ids(s, vec![vec![hc("A"), hc("B")]]).await,
        vec!["o1", "o2", "o3"],
        "OR"
    );
    assert_eq!(
        ids(s, vec![vec![hc("A")], vec![hc("B")]]).await,
        Vec::<String>::new(),
        "AND"
    );
    // OR across parameters (as `name` searches `family` and `given`): one
    // union of entries; a resource matching twice is listed once.
    let unit = |u: &[u8]| Cond::Hash {
        param: "value".into(),
        hashes: vec![u.to_vec()],
    };
    assert_eq!(
        ids(s, vec![vec![hc("B"), unit(b"mg")]]).await,
        vec!["o1", "o2"],
        "OR across parameters"
    );
    assert_eq!(
        ids(s, vec![vec![hc("A"), unit(b"mg")]]).await,
        vec!["o1", "o3"],
        "matched twice, listed once"
    );
    assert_eq!(
        ids(
            s,
            vec![vec![hc("A"), unit(b"mg")], vec![hc("B"), unit(b"g")]]
        )
        .await,
        Vec::<String>::new(),
        "two OR groups, AND-ed"
    );
    assert_eq!(
        ids(
            s,
            vec![vec![hc("A"), unit(b"g")], vec![hc("B"), unit(b"mg")]]
        )
        .await,
        vec!["o1", "o2"],
        "two OR groups, one drives, the other probed per row"
    );
    assert_eq!(
        ids(
            s,
            vec![vec![Cond::NotHash {
                param: "code".into(),
                hashes: vec![b"A".to_vec()]
            }]]
        )
        .await,
        vec!["o2"]
    );
    assert_eq!(
        ids(
            s,
            vec![vec![Cond::Missing {
                param: "date".into(),
                missing: true
            }]]
        )
        .await,
        vec!["o3"]
    );
    assert_eq!(
        ids(
            s,
            vec![vec![Cond::Missing {
                param: "date".into(),
                missing: false
            }]]
        )
        .await,
        vec!["o1", "o2"]
    );
    let r = |op, lo, hi| {
        vec![vec![Cond::Range {
            param: "date".into(),
            op,
            lo,
            hi,
            hashes: None,
        }]]
    };
    assert_eq!(
        ids(s, r(RangeOp::Eq, 140, 170)).await,
        vec!["o2"],
        "contained"
    );
    assert_eq!(ids(s, r(RangeOp::Eq, 0, 1000)).await, vec!["o1", "o2"]);
    assert_eq!(ids(s, r(RangeOp::Lt, 120, 130)).await, vec!["o1"]);
    assert_eq!(ids(s, r(RangeOp::Gt, 120, 170)).await, vec!["o1"]);
    assert_eq!(ids(s, r(RangeOp::Ap, 155, 156)).await, vec!["o1", "o2"]);
    assert_eq!(ids(s, r(RangeOp::Sa, 0, 150)).await, vec!["o2"]);
    assert_eq!(ids(s, r(RangeOp::Eb, 200, 300)).await, vec!["o1", "o2"]);
    let n = |op, lo, hi, u: Option<&[u8]>| {
        vec![vec![Cond::Num {
            param: "value".into(),
            op,
            lo,
            hi,
            hashes: u.map(|u| vec![u.to_vec()]),
        }]]
    };
    assert_eq!(ids(s, n(NumOp::Eq, 4.5, 5.5, None)).await, vec!["o1"]);
    assert_eq!(
        ids(s, n(NumOp::Eq, 4.5, 5.5, Some(b"g"))).await,
        Vec::<String>::new(),
        "unit must match"
    );
    assert_eq!(ids(s, n(NumOp::Gt, 6.0, 6.0, None)).await, vec!["o2"]);
    assert_eq!(ids(s, n(NumOp::Le, 10.0, 10.0, None)).await, vec!["o1"]);
    assert_eq!(ids(s, n(NumOp::Ge, 5.0, 5.0, None)).await, vec!["o1", "o2"]);
    assert_eq!(
        ids(s, vec![vec![Cond::Ids(vec!["o2".into(), "zz".into()])]]).await,
        vec!["o2"]
    );
    assert_eq!(
        ids(
            s,
            vec![vec![Cond::LastUpdated {
                op: RangeOp::Ge,
                lo: 2000,
                hi: 2001
            }]]
        )
        .await,
        vec!["o2", "o3"]
    );
    assert_eq!(ids(s, vec![vec![Cond::Never]]).await, Vec::<String>::new());
    // Paging: newest first, below a cursor.
    let q = SearchQuery {
        rtype: "Observation".into(),
        and: vec![vec![hc("A"), hc("B")]],
        before_seq: None,
        limit: 2,
    };
    let page = s.search(&q).await.unwrap();
    assert_eq!(
        page.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec!["o3", "o2"]
    );
    let q2 = SearchQuery {
        before_seq: page.last().map(|v| v.seq),
        ..q
    };
    assert_eq!(
        s.search(&q2)
            .await
            .unwrap()
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>(),
        vec!["o1"]
    );
    // An update replaces the entries; a failed precondition changes nothing.
    assert!(s
        .append_version(
            with_index(
                nv("Observation", "o1", 3, 4000, b"y"),
                vec![h("code", b"B")]
            ),
            Precondition::CurrentIs(2),
            vec![]
        )
        .await
        .is_err());
    assert_eq!(ids(s, vec![vec![hc("A")]]).await, vec!["o1", "o3"]);
    s.append_version(
        with_index(
            nv("Observation", "o1", 2, 4000, b"y"),
            vec![h("code", b"B")],
        ),
        Precondition::CurrentIs(1),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(ids(s, vec![vec![hc("A")]]).await, vec!["o3"]);
    assert_eq!(ids(s, vec![vec![hc("B")]]).await, vec!["o1", "o2"]);
    // A delete removes them; so does the tombstone's own (empty) index.
    let mut del = with_index(nv("Observation", "o2", 2, 5000, b""), vec![h("code", b"B")]);
    del.deleted = true;
    del.sealed = None;
    s.append_version(del, Precondition::CurrentIs(1), vec![])
        .await
        .unwrap();
    assert_eq!(ids(s, vec![vec![hc("B")]]).await, vec!["o1"]);
    // Reindexing replaces a resource's entries.
    s.set_index("Observation", "o3", None, vec![h("code", b"C")])
        .await
        .unwrap();
    assert_eq!(ids(s, vec![vec![hc("C")]]).await, vec!["o3"]);
    assert_eq!(ids(s, vec![vec![hc("A")]]).await, Vec::<String>::new());
    // A reindex that read an older version does not overwrite the
    // entries of the version written since.
    assert!(!s
        .set_index("Observation", "o3", Some(-1), vec![h("code", b"D")])
        .await
        .unwrap());
    assert_eq!(ids(s, vec![vec![hc("D")]]).await, Vec::<String>::new());
    assert_eq!(ids(s, vec![vec![hc("C")]]).await, vec!["o3"]);
    // Hostile values are data, never SQL.
    let evil = Cond::Hash {
        param: "code') OR 1=1 --".into(),
        hashes: vec![b"' OR '1'='1".to_vec()],
    };
    assert_eq!(ids(s, vec![vec![evil]]).await, Vec::<String>::new());
}

both!(append_versions_is_all_or_nothing);
async fn append_versions_is_all_or_nothing(s: &DynStore) {
    s.append_version(
        nv("Patient", "p", 1, 1000, b"p1"),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    // The third entry's precondition fails: none of the three may land,
    // including the index entries of the first two.
    let r = s
        .append_versions(
            vec![
                (
                    with_index(
                        nv("Observation", "o1", 1, 2000, b"o1"),
                        vec![h("code", b"c")],
                    ),
                    Precondition::Absent,
                ),
                (
                    nv("Patient", "p", 2, 2000, b"p2"),
                    Precondition::CurrentIs(1),
                ),
                (
                    nv("Patient", "q", 2, 2000, b"q2"),
                    Precondition::CurrentIs(1),
                ),
            ],
            vec![],
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict)), "{r:?}");
    assert!(s.read_current("Observation", "o1").await.unwrap().is_none());
    assert_eq!(
        s.read_current("Patient", "p")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    assert!(ids(
        s,
        vec![vec![Cond::Hash {
            param: "code".into(),
            hashes: vec![b"c".to_vec()]
        }]]
    )
    .await
    .is_empty());
    // All preconditions hold: all land, answered in input order.
    let seqs = s
        .append_versions(
            vec![
                (
                    with_index(
                        nv("Observation", "o1", 1, 3000, b"o1"),
                        vec![h("code", b"c")],
                    ),
                    Precondition::Absent,
                ),
                (
                    nv("Patient", "p", 2, 3000, b"p2"),
                    Precondition::CurrentIs(1),
                ),
                (nv("Encounter", "e", 1, 3000, b"e1"), Precondition::Absent),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(seqs.len(), 3);
    let o = s.read_current("Observation", "o1").await.unwrap().unwrap();
    let p = s.read_current("Patient", "p").await.unwrap().unwrap();
    let e = s.read_current("Encounter", "e").await.unwrap().unwrap();
    assert_eq!((o.seq, p.seq, e.seq), (seqs[0], seqs[1], seqs[2]));
    assert_eq!(p.sealed.as_deref(), Some(&b"p2"[..]));
    assert_eq!(
        ids(
            s,
            vec![vec![Cond::Hash {
                param: "code".into(),
                hashes: vec![b"c".to_vec()]
            }]]
        )
        .await,
        vec!["o1".to_string()]
    );
    // Two entries racing for the same new id inside one batch: refused.
    let r = s
        .append_versions(
            vec![
                (nv("Encounter", "x", 1, 4000, b"x"), Precondition::Absent),
                (nv("Encounter", "x", 1, 4000, b"y"), Precondition::Absent),
            ],
            vec![],
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict)), "{r:?}");
    assert!(s.read_current("Encounter", "x").await.unwrap().is_none());
}

both!(mixed_conditions_agree_whichever_group_drives);
async fn mixed_conditions_agree_whichever_group_drives(s: &DynStore) {
    // 40 observations: 4 patients × 10; codes alternate; dates spread.
    for k in 0..40i64 {
        let id = format!("o{k}");
        let rows = vec![
            h("subject", format!("p{}", k % 4).as_bytes()),
            h("code", if k % 2 == 0 { b"common" } else { b"rare" }),
            range("date", 1000 * k, 1000 * k + 1),
        ];
        s.append_version(
            with_index(nv("Observation", &id, 1, k, b"x"), rows),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    let hash = |p: &str, v: &str| Cond::Hash {
        param: p.into(),
        hashes: vec![v.as_bytes().to_vec()],
    };
    let date_ge = |t: i64| Cond::Range {
        param: "date".into(),
        op: RangeOp::Ge,
        lo: t,
        hi: t + 1,
        hashes: None,
    };
    // Two equality groups (the probe picks the smaller), a range and a :not.
    let got = ids(
        s,
        vec![
            vec![hash("code", "common")],
            vec![hash("subject", "p2")],
            vec![date_ge(10_000)],
            vec![Cond::NotHash {
                param: "subject".into(),
                hashes: vec![b"p0".to_vec()],
            }],
        ],
    )
    .await;
    let mut want: Vec<String> = (0..40)
        .filter(|k| k % 2 == 0 && k % 4 == 2 && 1000 * k >= 10_000)
        .map(|k| format!("o{k}"))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // Ids drive; the hash is probed per row.
    let got = ids(
        s,
        vec![
            vec![hash("code", "rare")],
            vec![Cond::Ids(vec!["o1".into(), "o2".into(), "o3".into()])],
        ],
    )
    .await;
    assert_eq!(got, vec!["o1".to_string(), "o3".to_string()]);
    // Only a range: materialised lists.
    assert_eq!(ids(s, vec![vec![date_ge(38_000)]]).await.len(), 2);
    // Missing within a driven query.
    let got = ids(
        s,
        vec![
            vec![hash("subject", "p1")],
            vec![Cond::Missing {
                param: "date".into(),
                missing: false,
            }],
        ],
    )
    .await;
    assert_eq!(got.len(), 10);
}

fn user(id: &str, hash: &[u8]) -> UserRecord {
    UserRecord {
        id: id.into(),
        username_hash: hash.to_vec(),
        role: "clinician".into(),
        status: "active".into(),
        sealed: b"sealed-1".to_vec(),
        rev: 0,
        created_at: 7,
    }
}

both!(users_unique_and_compare_and_swap);
async fn users_unique_and_compare_and_swap(s: &DynStore) {
    let u = user("u1", b"hash-alice");
    s.add_user(&u).await.unwrap();
    assert!(
        matches!(
            s.add_user(&user("u2", b"hash-alice")).await,
            Err(StoreError::Duplicate)
        ),
        "username hash is unique"
    );
    assert!(matches!(
        s.add_user(&user("u1", b"hash-bob")).await,
        Err(StoreError::Duplicate)
    ));
    assert_eq!(s.get_user("u1").await.unwrap().unwrap(), u);
    assert_eq!(s.find_user(b"hash-alice").await.unwrap().unwrap(), u);
    assert!(s.find_user(b"hash-nobody").await.unwrap().is_none());
    assert!(s.get_user("u9").await.unwrap().is_none());
    // Compare-and-swap: the first of two updates from the same read wins.
    let mut a = u.clone();
    a.sealed = b"sealed-a".to_vec();
    a.status = "locked".into();
    let mut b = u.clone();
    b.sealed = b"sealed-b".to_vec();
    assert!(s.update_user(&a).await.unwrap());
    assert!(!s.update_user(&b).await.unwrap(), "stale revision refused");
    let now = s.get_user("u1").await.unwrap().unwrap();
    assert_eq!(
        (now.rev, now.status.as_str(), now.sealed.as_slice()),
        (1, "locked", &b"sealed-a"[..])
    );
    assert!(
        !s.update_user(&user("u9", b"x")).await.unwrap(),
        "no such user"
    );
    // Concurrent CAS from one revision: exactly one winner.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = s.clone();
        let mut c = now.clone();
        c.sealed = format!("w{i}").into_bytes();
        tasks.push(tokio::spawn(
            async move { s.update_user(&c).await.unwrap() },
        ));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as u32;
    }
    assert_eq!(wins, 1);
    s.add_user(&user("u2", b"hash-bob")).await.unwrap();
    assert_eq!(s.list_users().await.unwrap().len(), 2);
    // The username hash moves with an update (a sign-in key rotation
    // re-hashing names), and stays unique.
    let mut moved = s.get_user("u2").await.unwrap().unwrap();
    moved.username_hash = b"hash-bob-2".to_vec();
    assert!(s.update_user(&moved).await.unwrap());
    assert!(s.find_user(b"hash-bob").await.unwrap().is_none());
    assert_eq!(s.find_user(b"hash-bob-2").await.unwrap().unwrap().id, "u2");
    let mut clash = s.get_user("u2").await.unwrap().unwrap();
    clash.username_hash = b"hash-alice".to_vec();
    assert!(matches!(
        s.update_user(&clash).await,
        Err(StoreError::Duplicate)
    ));
}

fn grant(kind: &str, key: &[u8], family: &str, user: &str, exp: i64) -> GrantRecord {
    GrantRecord {
        kind: kind.into(),
        key_hash: key.to_vec(),
        family: family.into(),
        user_id: user.into(),
        sealed: b"details".to_vec(),
        expires_at: exp,
        used_at: None,
    }
}

both!(grants_single_use_expiry_and_families);
async fn grants_single_use_expiry_and_families(s: &DynStore) {
    let now = 1_000;
    s.put_grant(&grant("code", b"k1", "f1", "u1", now + 60), now)
        .await
        .unwrap();
    assert!(matches!(
        s.put_grant(&grant("code", b"k1", "f1", "u1", now + 60), now)
            .await,
        Err(StoreError::Duplicate)
    ));
    assert!(s.get_grant("code", b"k1", now).await.unwrap().is_some());
    assert!(
        s.get_grant("refresh", b"k1", now).await.unwrap().is_none(),
        "kinds are separate"
    );
    assert!(
        s.get_grant("code", b"k1", now + 60)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    // Single use, even when raced.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.use_grant("code", b"k1", now + 1).await.unwrap()
        }));
    }
    let (mut fresh, mut reused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            GrantUse::Fresh(g) => {
                assert_eq!(g.used_at, None);
                fresh += 1
            }
            GrantUse::Reused(g) => {
                assert_eq!(g.used_at, Some(now + 1));
                reused += 1
            }
            GrantUse::Missing => panic!("present"),
        }
    }
    assert_eq!((fresh, reused), (1, 7));
    assert_eq!(
        s.use_grant("code", b"k1", now + 61).await.unwrap(),
        GrantUse::Missing,
        "expired"
    );
    assert_eq!(
        s.use_grant("code", b"nope", now).await.unwrap(),
        GrantUse::Missing
    );
    // Touch moves the expiry (a session's idle timeout).
    s.put_grant(&grant("session", b"s1", "fs", "u1", now + 10), now)
        .await
        .unwrap();
    s.touch_grant("session", b"s1", now + 500).await.unwrap();
    assert!(s
        .get_grant("session", b"s1", now + 400)
        .await
        .unwrap()
        .is_some());
    // The latest expiry of a live grant (what a sign-in key rotation
    // waits for).
    assert_eq!(s.max_grant_expiry(now).await.unwrap(), Some(now + 500));
    assert_eq!(s.max_grant_expiry(now + 500).await.unwrap(), None);
    // Families and users.
    s.put_grant(&grant("refresh", b"r1", "fam", "u1", now + 900), now)
        .await
        .unwrap();
    s.put_grant(&grant("refresh", b"r2", "fam", "u1", now + 900), now)
        .await
        .unwrap();
    s.put_grant(&grant("refresh", b"r3", "other", "u2", now + 900), now)
        .await
        .unwrap();
    assert_eq!(s.delete_family("fam").await.unwrap(), 2);
    assert!(s.get_grant("refresh", b"r1", now).await.unwrap().is_none());
    assert!(s.get_grant("refresh", b"r3", now).await.unwrap().is_some());
    assert_eq!(
        s.delete_user_grants("u1").await.unwrap(),
        2,
        "the session and the used code"
    );
    assert!(s.delete_grant("refresh", b"r3").await.unwrap());
    assert!(!s.delete_grant("refresh", b"r3").await.unwrap());
    // Expired grants are purged when new ones are stored.
    s.put_grant(&grant("code", b"old", "f", "u3", now + 5), now)
        .await
        .unwrap();
    s.put_grant(&grant("code", b"new", "f", "u3", now + 500), now + 100)
        .await
        .unwrap();
    assert_eq!(
        s.delete_family("f").await.unwrap(),
        1,
        "the expired one was purged"
    );
    // Live grants, and their details sealed again by compare-and-swap (a
    // data-key rotation).
    s.put_grant(&grant("session", b"live", "fl", "u4", now + 900), now)
        .await
        .unwrap();
    let live = s.live_grants(now).await.unwrap();
    assert!(live.iter().any(|g| g.key_hash == b"live"));
    assert!(live.iter().all(|g| g.expires_at > now));
    assert!(!s
        .reseal_grant("session", b"live", b"not what is there", b"new")
        .await
        .unwrap());
    assert!(s
        .reseal_grant("session", b"live", b"details", b"resealed")
        .await
        .unwrap());
    assert_eq!(
        s.get_grant("session", b"live", now)
            .await
            .unwrap()
            .unwrap()
            .sealed,
        b"resealed"
    );
}

both!(revocations_are_published_in_order);
async fn revocations_are_published_in_order(s: &DynStore) {
    let a = s.add_revocation("user", "u1", 100).await.unwrap();
    let b = s.add_revocation("family", "f1", 200).await.unwrap();
    assert!(b > a);
    let all = s.revocations_since(0, 0).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (r.kind.as_str(), r.key.as_str(), r.at))
            .collect::<Vec<_>>(),
        vec![("user", "u1", 100), ("family", "f1", 200)]
    );
    assert_eq!(s.revocations_since(a, 0).await.unwrap().len(), 1);
    assert_eq!(
        s.revocations_since(0, 150).await.unwrap().len(),
        1,
        "old ones no longer matter"
    );
}

fn audit(n: u32, t: i64, agent: &str, patients: &[&[u8]]) -> NewAudit {
    NewAudit {
        event_id: format!("ev-{n}-{}", uuid::Uuid::new_v4().simple()),
        recorded: t,
        agent: agent.into(),
        action: "R".into(),
        subtype: "read".into(),
        outcome: "0".into(),
        patients: patients.iter().map(|p| p.to_vec()).collect(),
        leaf_hash: vec![n as u8; 32],
        sealed: format!("sealed-{n}").into_bytes(),
    }
}

fn cp(size: u64) -> CheckpointRow {
    CheckpointRow {
        size,
        time: size as i64,
        note: format!("note {size}"),
        // Stands for the tree's edge: one byte per set bit, enough to show
        // it is stored and read back unchanged.
        frontier: (0..size.count_ones() as u8).collect(),
    }
}

both!(audit_log_appends_seals_and_searches);
async fn audit_log_appends_seals_and_searches(s: &DynStore) {
    assert_eq!(
        s.latest_checkpoint_and_tree_size().await.unwrap(),
        (None, 0),
        "an empty log"
    );
    s.append_audit(vec![
        audit(1, 1000, "user:u1", &[b"p1"]),
        audit(2, 2000, "app", &[b"p1", b"p2"]),
    ])
    .await
    .unwrap();
    // A write and its audit record land together...
    s.append_version(
        nv("Patient", "a", 1, 3000, b"v1"),
        Precondition::Absent,
        vec![audit(3, 3000, "user:u1", &[b"p2"])],
    )
    .await
    .unwrap();
    // ...and a refused write leaves no audit record behind.
    assert!(matches!(
        s.append_version(
            nv("Patient", "a", 1, 3001, b"x"),
            Precondition::Absent,
            vec![audit(99, 3001, "user:u1", &[])],
        )
        .await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.append_versions(
            vec![(
                nv("Patient", "b", 1, 3002, b"x"),
                Precondition::CurrentIs(7)
            )],
            vec![audit(98, 3002, "user:u1", &[])],
        )
        .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.audit_counts().await.unwrap(), (3, 0));

    let unsealed = s.audit_unsealed(i64::MIN, 10).await.unwrap();
    assert_eq!(
        unsealed.iter().map(|u| u.leaf_hash[0]).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "arrival order"
    );
    let ids: Vec<i64> = unsealed.iter().map(|u| u.id).collect();
    // Sealing must continue the tree where it ends.
    assert!(!s.audit_seal(5, ids[..2].to_vec(), cp(7)).await.unwrap());
    assert!(s.audit_seal(0, ids[..2].to_vec(), cp(2)).await.unwrap());
    // A stale sealer (another node got there first) changes nothing.
    assert!(!s.audit_seal(0, ids[2..].to_vec(), cp(1)).await.unwrap());
    assert!(!s.audit_seal(2, ids[..1].to_vec(), cp(3)).await.unwrap());
    assert_eq!(s.audit_counts().await.unwrap(), (3, 2));
    assert_eq!(s.audit_tree_size().await.unwrap(), 2);
    assert_eq!(s.audit_pending_count().await.unwrap(), 1);
    assert!(s.audit_seal(2, ids[2..].to_vec(), cp(3)).await.unwrap());
    assert_eq!(s.audit_counts().await.unwrap(), (3, 3));
    assert_eq!(s.audit_tree_size().await.unwrap(), 3);
    assert_eq!(s.audit_pending_count().await.unwrap(), 0);
    assert!(s.audit_unsealed(i64::MIN, 10).await.unwrap().is_empty());

    let by_index = s.audit_by_index(1, 10).await.unwrap();
    assert_eq!(
        by_index
            .iter()
            .map(|r| (r.leaf_index, r.leaf_hash[0]))
            .collect::<Vec<_>>(),
        vec![(Some(1), 2), (Some(2), 3)]
    );
    assert_eq!(by_index[0].sealed, b"sealed-2");
    let got = s.audit_get(&by_index[0].event_id).await.unwrap().unwrap();
    assert_eq!(got, by_index[0]);
    assert!(s.audit_get("nope").await.unwrap().is_none());

    assert_eq!(
        s.latest_checkpoint_and_tree_size().await.unwrap(),
        (Some(cp(3)), 3)
    );
    let cps = s.checkpoints(0, 10).await.unwrap();
    assert_eq!(cps.iter().map(|c| c.size).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(s.latest_checkpoint().await.unwrap().unwrap(), cp(3));
    assert_eq!(s.checkpoints(2, 10).await.unwrap(), vec![cp(3)]);

    let search = |q: AuditQuery| async move {
        s.audit_search(&AuditQuery { limit: 10, ..q })
            .await
            .unwrap()
            .iter()
            .map(|r| r.leaf_hash[0])
            .collect::<Vec<_>>()
    };
    assert_eq!(
        search(AuditQuery::default()).await,
        vec![3, 2, 1],
        "newest first"
    );
    let p1 = AuditQuery {
        patient: Some(b"p1".to_vec()),
        ..Default::default()
    };
    assert_eq!(search(p1.clone()).await, vec![2, 1]);
    let p2 = AuditQuery {
        patient: Some(b"p2".to_vec()),
        ..Default::default()
    };
    assert_eq!(search(p2).await, vec![3, 2]);
    let u1 = AuditQuery {
        agent: Some("user:u1".into()),
        ..Default::default()
    };
    assert_eq!(search(u1).await, vec![3, 1]);
    let window = AuditQuery {
        from: Some(1500),
        to: Some(3000),
        ..Default::default()
    };
    assert_eq!(search(window).await, vec![2]);
    let paged = AuditQuery {
        before_id: Some(ids[1]),
        ..p1
    };
    assert_eq!(search(paged).await, vec![1]);
    let act = AuditQuery {
        action: Some("D".into()),
        ..Default::default()
    };
    assert!(search(act).await.is_empty());
    let one = AuditQuery {
        event_id: Some(by_index[0].event_id.clone()),
        ..Default::default()
    };
    assert_eq!(search(one).await, vec![2]);
    // Quotes and metacharacters are values, not SQL.
    let hostile = AuditQuery {
        agent: Some("x' OR '1'='1".into()),
        subtype: Some("read; DROP TABLE audit_log".into()),
        ..Default::default()
    };
    assert!(search(hostile).await.is_empty());
    assert_eq!(s.audit_counts().await.unwrap(), (3, 3));
}

/// The records a patient-hash search returns (newest first, up to 100).
async fn of_patient(s: &DynStore, patient: Vec<u8>) -> Vec<AuditRow> {
    s.audit_search(&AuditQuery {
        patient: Some(patient),
        limit: 100,
        ..Default::default()
    })
    .await
    .unwrap()
}

both!(audit_patient_entries_once_each);
/// A record may name a patient twice, and a batch names patients in any
/// order: each record is found once per patient it names (PostgreSQL
/// inserts the entries deduplicated and sorted, without `ON CONFLICT`, so
/// a duplicate reaching the table would fail the whole batch).
async fn audit_patient_entries_once_each(s: &DynStore) {
    s.append_audit(vec![
        audit(1, 1000, "app", &[b"p2", b"p1", b"p2"]),
        audit(2, 1000, "app", &[b"p3", b"p1"]),
    ])
    .await
    .unwrap();
    // A larger batch: 30 records of 20 patients each, named out of order.
    let names: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b'q', 39 - i]).collect();
    let batch: Vec<NewAudit> = (0..30u8)
        .map(|r| {
            let ps: Vec<&[u8]> = (0..20usize)
                .map(|k| names[(usize::from(r) * 7 + k * 3) % 40].as_slice())
                .collect();
            audit(10 + u32::from(r), 2000, "app", &ps)
        })
        .collect();
    let expected: Vec<usize> = names
        .iter()
        .map(|n| batch.iter().filter(|a| a.patients.contains(n)).count())
        .collect();
    s.append_audit(batch).await.unwrap();
    let found = |p: &[u8]| {
        let p = p.to_vec();
        async move {
            of_patient(s, p)
                .await
                .iter()
                .map(|r| r.leaf_hash[0])
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(found(b"p2").await, vec![1]);
    assert_eq!(found(b"p1").await, vec![2, 1]);
    assert_eq!(found(b"p3").await, vec![2]);
    for (n, want) in names.iter().zip(expected) {
        assert_eq!(found(n).await.len(), want);
    }
}

both!(patient_entries_key_on_the_first_eight_bytes);
/// Entries are keyed by the first 8 bytes of a patient's hash
/// (`query::patient_key`): hashes that differ only after them find each
/// other's records (the server keeps only records naming the patient it
/// asked about), hashes that differ within them do not, and a record
/// naming two colliding patients is stored (one entry), not refused.
async fn patient_entries_key_on_the_first_eight_bytes(s: &DynStore) {
    // Twice: a write's small batch and one padded to 300 more entries
    // (the size of the journal indexer's), each with its own patients.
    for (round, pad) in [(0x71u8, 0usize), (0xF1, 300)] {
        let mut a = vec![round; 32];
        let mut b = a.clone();
        b[8] = 0x00; // differs after the key
        let mut c = a.clone();
        c[7] = 0x00; // differs within it
        a[31] = 0x42;
        let n = u32::from(round);
        let mut batch = vec![
            audit(n, 1000, "app", &[&a]),
            audit(n + 1, 1000, "app", &[&b]),
            audit(n + 2, 1000, "app", &[&c]),
            // Two colliding patients and a repeat in one record: one entry
            // each, never a failed batch.
            audit(n + 3, 1000, "app", &[&a, &b, &c, &a]),
        ];
        // Distinct within their first 8 bytes (the key).
        let filler: Vec<Vec<u8>> = (0..pad as u32)
            .map(|i| {
                let mut h = vec![0xAB; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                h[4] = round;
                h
            })
            .collect();
        for chunk in filler.chunks(50) {
            let ps: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            batch.push(audit(7, 999, "app", &ps));
        }
        s.append_audit(batch).await.unwrap();
        let found = |p: Vec<u8>| async move {
            of_patient(s, p)
                .await
                .iter()
                .map(|r| u32::from(r.leaf_hash[0]))
                .collect::<Vec<_>>()
        };
        assert_eq!(found(a.clone()).await, vec![n + 3, n + 1, n], "{round:x}");
        assert_eq!(found(b.clone()).await, vec![n + 3, n + 1, n]);
        assert_eq!(found(c.clone()).await, vec![n + 3, n + 2]);
        assert_eq!(
            found(a[..8].to_vec()).await,
            vec![n + 3, n + 1, n],
            "the key alone"
        );
        // A shorter hash is padded with zeros: c's key, since c[7] is 0.
        assert_eq!(found(vec![round; 7]).await, vec![n + 3, n + 2]);
        for f in filler.iter().step_by(37) {
            assert_eq!(found(f.clone()).await, vec![7]);
        }
    }
}

both!(audit_prune_empties_only_old_sealed_bodies);
async fn audit_prune_empties_only_old_sealed_bodies(s: &DynStore) {
    s.append_audit(vec![
        audit(1, 1000, "user:u1", &[b"p1"]),
        audit(2, 2000, "user:u1", &[b"p1"]),
        audit(3, 3000, "user:u1", &[b"p1"]),
    ])
    .await
    .unwrap();
    // Unsealed records are never pruned (they are not in the tree yet).
    assert_eq!(s.audit_prune(10_000, 100).await.unwrap(), 0);
    let ids: Vec<i64> = s
        .audit_unsealed(i64::MIN, 10)
        .await
        .unwrap()
        .iter()
        .map(|u| u.id)
        .collect();
    assert!(s.audit_seal(0, ids, cp(3)).await.unwrap());
    assert_eq!(s.audit_prune(2500, 100).await.unwrap(), 2);
    assert_eq!(s.audit_prune(2500, 100).await.unwrap(), 0, "once");
    // The tree keeps every leaf; pruned records are not found by search.
    let rows = s.audit_by_index(0, 10).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows.iter()
            .map(|r| (r.leaf_hash[0], r.sealed.is_empty()))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true), (3, false)]
    );
    let found = s
        .audit_search(&AuditQuery {
            patient: Some(b"p1".to_vec()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        found.iter().map(|r| r.leaf_hash[0]).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(s.audit_counts().await.unwrap(), (3, 3));
}

/// The ids a search of `rtype` finds, sorted.
async fn found(s: &DynStore, rtype: &str, and: Vec<Vec<Cond>>) -> Vec<String> {
    let q = SearchQuery {
        rtype: rtype.into(),
        and,
        before_seq: None,
        limit: 100,
    };
    let mut out: Vec<String> = s
        .search(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    out.sort();
    out
}

fn code(x: &[u8]) -> Cond {
    Cond::Hash {
        param: "code".into(),
        hashes: vec![x.to_vec()],
    }
}

/// Entries name their parameter by a number per (type, parameter)
/// (`params.rs`): a parameter nobody registered yet matches nothing (and
/// its negations everything), the same code on another type is another
/// parameter, and a number another node registered is found without a
/// restart. `a` and `b` are two stores on one database.
async fn parameter_numbers_per_type_and_across_nodes(a: &DynStore, b: &DynStore) {
    a.append_version(
        nv("Observation", "o1", 1, 1, b"x"),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    assert!(found(a, "Observation", vec![vec![code(b"A")]])
        .await
        .is_empty());
    let not_a = || Cond::NotHash {
        param: "code".into(),
        hashes: vec![b"A".to_vec()],
    };
    assert_eq!(
        found(a, "Observation", vec![vec![not_a()]]).await,
        vec!["o1"]
    );
    let missing = Cond::Missing {
        param: "code".into(),
        missing: true,
    };
    assert_eq!(
        found(a, "Observation", vec![vec![missing]]).await,
        vec!["o1"]
    );
    // Patient.code registered through `b`: not an Observation entry.
    b.append_version(
        with_index(nv("Patient", "p1", 1, 2, b"x"), vec![h("code", b"A")]),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    assert!(found(a, "Observation", vec![vec![code(b"A")]])
        .await
        .is_empty());
    assert_eq!(
        found(a, "Patient", vec![vec![code(b"A")]]).await,
        vec!["p1"]
    );
    // Observation.code registered through `b`, searched through `a`, which
    // has already looked the parameter up once and found nothing.
    b.append_version(
        with_index(nv("Observation", "o2", 1, 3, b"x"), vec![h("code", b"A")]),
        Precondition::Absent,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        found(a, "Observation", vec![vec![code(b"A")]]).await,
        vec!["o2"]
    );
    assert_eq!(
        found(a, "Observation", vec![vec![not_a()]]).await,
        vec!["o1"]
    );
    // A new version replaces its entries; `a` writes with the number `b` made.
    a.append_version(
        with_index(nv("Observation", "o2", 2, 4, b"y"), vec![h("code", b"B")]),
        Precondition::CurrentIs(1),
        vec![],
    )
    .await
    .unwrap();
    assert!(found(b, "Observation", vec![vec![code(b"A")]])
        .await
        .is_empty());
    assert_eq!(
        found(b, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o2"]
    );
    // Reindexing one resource replaces its entries too.
    b.set_index("Observation", "o1", None, vec![h("code", b"B")])
        .await
        .unwrap();
    assert_eq!(
        found(a, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o1", "o2"]
    );
    // Reindexing an id that does not exist stores nothing.
    a.set_index("Observation", "nope", None, vec![h("code", b"B")])
        .await
        .unwrap();
    assert_eq!(
        found(b, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o1", "o2"]
    );
    // Nor does reindexing a deleted one (a reindex racing a delete): a
    // search reads matching versions directly and must never find it.
    let mut gone = nv("Observation", "o1", 2, 5, b"");
    gone.deleted = true;
    gone.sealed = None;
    a.append_version(gone, Precondition::CurrentIs(1), vec![])
        .await
        .unwrap();
    b.set_index("Observation", "o1", None, vec![h("code", b"B")])
        .await
        .unwrap();
    assert_eq!(
        found(a, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o2"]
    );
    let q = SearchQuery {
        rtype: "Observation".into(),
        and: vec![vec![code(b"B")]],
        before_seq: None,
        limit: 100,
    };
    assert_eq!(a.search_count(&q).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_numbers_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let a: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let b: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    parameter_numbers_per_type_and_across_nodes(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_numbers_postgres() {
    let Some(f) = postgres().await else { return };
    let url = std::env::var("PHYLAX_TEST_DATABASE_URL").unwrap();
    let schema = f.schema.clone().unwrap();
    let b: DynStore = Arc::new(PgStore::connect(&url, Some(&schema)).await.unwrap());
    parameter_numbers_per_type_and_across_nodes(&f.store, &b).await;
}

/// A database written before search entries were compact (text type, id
/// and parameter per entry) is converted at start: its entries still
/// answer, and the next version replaces them. Rows are written as that
/// schema stored them: o1 at version 2 (seq 2), o2 at version 1 (seq 3).
async fn old_entries_answer_after_migration(s: &DynStore) {
    assert_eq!(
        found(s, "Observation", vec![vec![code(b"A")]]).await,
        vec!["o1"]
    );
    assert_eq!(
        found(s, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o2"]
    );
    let before = Cond::Range {
        param: "date".into(),
        op: RangeOp::Lt,
        lo: 150,
        hi: 151,
        hashes: None,
    };
    assert_eq!(
        found(s, "Observation", vec![vec![before]]).await,
        vec!["o1"]
    );
    let value = Cond::Num {
        param: "value".into(),
        op: NumOp::Gt,
        lo: 4.0,
        hi: 4.5,
        hashes: None,
    };
    assert_eq!(found(s, "Observation", vec![vec![value]]).await, vec!["o2"]);
    s.append_version(
        with_index(nv("Observation", "o1", 3, 9, b"z"), vec![h("code", b"B")]),
        Precondition::CurrentIs(2),
        vec![],
    )
    .await
    .unwrap();
    assert!(found(s, "Observation", vec![vec![code(b"A")]])
        .await
        .is_empty());
    assert_eq!(
        found(s, "Observation", vec![vec![code(b"B")]]).await,
        vec!["o1", "o2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_entries_migrate_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    sqlite_at(
        &path,
        10,
        "INSERT INTO resource_versions (seq, rtype, id, version, last_updated, deleted, key_scope, body) VALUES
                (1, 'Observation', 'o1', 1, 1, 0, 'tenant', X'00'),
                (2, 'Observation', 'o1', 2, 2, 0, 'tenant', X'00'),
                (3, 'Observation', 'o2', 1, 3, 0, 'tenant', X'00');
             INSERT INTO resources (rtype, id, version, seq, deleted) VALUES
                ('Observation', 'o1', 2, 2, 0), ('Observation', 'o2', 1, 3, 0);
             INSERT INTO search_index (rtype, id, param, hash, lo, hi, num) VALUES
                ('Observation', 'o1', 'code', X'41', NULL, NULL, NULL),
                ('Observation', 'o1', 'date', NULL, 100, 200, NULL),
                ('Observation', 'o2', 'code', X'42', NULL, NULL, NULL),
                ('Observation', 'o2', 'value', NULL, NULL, NULL, 5.0);",
    );
    let s: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    old_entries_answer_after_migration(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_entries_migrate_postgres() {
    let Some((url, schema)) = postgres_at(
        11,
        "INSERT INTO resource_versions (seq, rtype, id, version, last_updated, deleted, key_scope, body) VALUES
            (1, 'Observation', 'o1', 1, 1, false, 'tenant', '\\x00'),
            (2, 'Observation', 'o1', 2, 2, false, 'tenant', '\\x00'),
            (3, 'Observation', 'o2', 1, 3, false, 'tenant', '\\x00');
         SELECT setval('resource_versions_seq_seq', 3);
         INSERT INTO resources (rtype, id, version, seq, deleted) VALUES
            ('Observation', 'o1', 2, 2, false), ('Observation', 'o2', 1, 3, false);
         INSERT INTO search_index (rtype, id, param, hash, lo, hi, num) VALUES
            ('Observation', 'o1', 'code', '\\x41', NULL, NULL, NULL),
            ('Observation', 'o1', 'date', NULL, 100, 200, NULL),
            ('Observation', 'o2', 'code', '\\x42', NULL, NULL, NULL),
            ('Observation', 'o2', 'value', NULL, NULL, NULL, 5.0);",
    )
    .await
    else {
        return;
    };
    let s: DynStore = Arc::new(PgStore::connect(&url, Some(&schema)).await.unwrap());
    old_entries_answer_after_migration(&s).await;
}

/// A log sealed before tree positions moved to `audit_leaf` (SQLite
/// migration 11, PostgreSQL 12) keeps its tree across the upgrade: sealed
/// records keep their positions, unsealed ones are pending in arrival
/// order, and sealing continues where the tree ended.
async fn upgraded_log_keeps_its_tree(s: &DynStore) {
    assert_eq!(s.audit_counts().await.unwrap(), (5, 3));
    let tree = s.audit_by_index(0, 10).await.unwrap();
    assert_eq!(
        tree.iter()
            .map(|r| (r.leaf_index, r.event_id.as_str()))
            .collect::<Vec<_>>(),
        vec![(Some(0), "old-0"), (Some(1), "old-1"), (Some(2), "old-2")]
    );
    let pending = s.audit_unsealed(i64::MIN, 10).await.unwrap();
    assert_eq!(
        pending.iter().map(|p| p.leaf_hash[0]).collect::<Vec<_>>(),
        vec![3, 4]
    );
    let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
    assert!(s.audit_seal(3, ids, cp(5)).await.unwrap());
    assert_eq!(s.audit_counts().await.unwrap(), (5, 5));
    let got = s.audit_get("old-4").await.unwrap().unwrap();
    assert_eq!(got.leaf_index, Some(4));
    // Records written after the upgrade join the same tree.
    s.append_audit(vec![audit(9, 9000, "app", &[b"p9"])])
        .await
        .unwrap();
    let ids: Vec<i64> = s
        .audit_unsealed(i64::MIN, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert!(s.audit_seal(5, ids, cp(6)).await.unwrap());
    assert_eq!(s.audit_by_index(5, 10).await.unwrap()[0].leaf_hash[0], 9);
}

/// Five records of the old layout: three sealed (positions 0–2), two not.
/// `hex` writes a one-byte blob literal for the backend.
fn old_log(hex: fn(u8) -> String) -> String {
    let rows: Vec<String> = (0u8..5)
        .map(|i| {
            let pos = if i < 3 { i.to_string() } else { "NULL".into() };
            format!(
                "({pos}, 'old-{i}', {i}, 'app', 'R', 'read', '0', {}, {})",
                hex(i),
                hex(1)
            )
        })
        .collect();
    format!(
        "INSERT INTO audit_log (leaf_index, event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) VALUES {};",
        rows.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_keeps_the_audit_tree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    sqlite_at(&path, 11, &old_log(|b| format!("X'{b:02x}'")));
    let s: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    upgraded_log_keeps_its_tree(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_keeps_the_audit_tree() {
    let Some((url, schema)) = postgres_at(12, &old_log(|b| format!("'\\x{b:02x}'::bytea"))).await
    else {
        return;
    };
    let s: DynStore = Arc::new(PgStore::connect(&url, Some(&schema)).await.unwrap());
    upgraded_log_keeps_its_tree(&s).await;
}

/// Patient entries written under whole 32-byte hashes (before SQLite
/// migration 13 / PostgreSQL 15) answer by the same hash after the upgrade,
/// beside entries written after it, and stay append-only. One old hash
/// starts with a byte over 0x7F, so PostgreSQL's cast to BIGINT must agree
/// with `query::patient_key_int` on the sign.
async fn upgraded_patient_entries_answer(s: &DynStore) {
    let found = |p: Vec<u8>| async move {
        of_patient(s, p)
            .await
            .into_iter()
            .map(|r| r.event_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(found(vec![0xF1; 32]).await, vec!["old-1", "old-0"]);
    assert_eq!(found(vec![0x0A; 32]).await, vec!["old-0"]);
    assert!(found(vec![0x0B; 32]).await.is_empty());
    s.append_audit(vec![audit(9, 9000, "app", &[&[0xF1; 32]])])
        .await
        .unwrap();
    let all = found(vec![0xF1; 32]).await;
    assert_eq!(all.len(), 3);
    assert_eq!(all[1..], ["old-1", "old-0"]);
}

/// Two records of the old layout, and their patient entries under whole
/// hashes: old-0 names patients 0xF1… and 0x0A…, old-1 names 0xF1….
fn old_patient_entries(hex: fn(&[u8]) -> String) -> String {
    let rec = |i: u8| {
        format!(
            "('old-{i}', {i}, 'app', 'R', 'read', '0', {}, {})",
            hex(&[i]),
            hex(&[1])
        )
    };
    let entry = |p: u8, i: u8| {
        format!(
            "INSERT INTO audit_patient (patient, audit_id) SELECT {}, id FROM audit_log WHERE event_id = 'old-{i}';",
            hex(&[p; 32])
        )
    };
    format!(
        "INSERT INTO audit_log (event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) VALUES {}, {};\n{}\n{}\n{}",
        rec(0),
        rec(1),
        entry(0xF1, 0),
        entry(0x0A, 0),
        entry(0xF1, 1)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_keeps_patient_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    sqlite_at(
        &path,
        13,
        &old_patient_entries(|b| format!("X'{}'", hex_of(b))),
    );
    let s: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    upgraded_patient_entries_answer(&s).await;
    drop(s);
    // Rebuilt with its triggers: no delete, and now no edit either.
    let c = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "DELETE FROM audit_patient",
        "UPDATE audit_patient SET audit_id = audit_id + 100",
    ] {
        let e = c.execute(sql, []).unwrap_err().to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_keeps_patient_entries() {
    let Some((url, schema)) = postgres_at(
        15,
        &old_patient_entries(|b| format!("'\\x{}'::bytea", hex_of(b))),
    )
    .await
    else {
        return;
    };
    let s: DynStore = Arc::new(PgStore::connect(&url, Some(&schema)).await.unwrap());
    upgraded_patient_entries_answer(&s).await;
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Every audit table but the log itself refuses with a reason of its
    // own (before migration 15 the shared function failed on a column
    // these tables do not have).
    c.batch_execute(&format!(
        "SET search_path = {schema}; INSERT INTO audit_leaf VALUES (0, 1); \
         INSERT INTO audit_checkpoints (size, time, note) VALUES (1, 1, 'n')"
    ))
    .await
    .unwrap();
    for sql in [
        "DELETE FROM audit_patient",
        "UPDATE audit_patient SET audit_id = audit_id + 100",
        "UPDATE audit_leaf SET audit_id = 2",
        "DELETE FROM audit_leaf",
        "UPDATE audit_checkpoints SET note = 'x'",
        "DELETE FROM audit_checkpoints",
    ] {
        let e = c
            .batch_execute(&format!("SET search_path = {schema}; {sql}"))
            .await
            .unwrap_err();
        let e = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A SQLite database at `path` with the migrations before `version`
/// applied (recorded as the store records them), then `data` run on it: a
/// store of an older release, for upgrade tests.
fn sqlite_at(path: &std::path::Path, version: i64, data: &str) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .unwrap();
    for (v, sql) in migrations::SQLITE.iter().filter(|(v, _)| *v < version) {
        c.execute_batch(sql).unwrap();
        c.execute(
            "INSERT INTO schema_migrations VALUES (?1, 0)",
            rusqlite::params![v],
        )
        .unwrap();
    }
    c.execute_batch(data).unwrap();
}

/// [`sqlite_at`] for PostgreSQL, in a fresh schema: its URL and schema, or
/// `None` when no test database is configured (a failure under `CI=true`).
async fn postgres_at(version: i64, data: &str) -> Option<(String, String)> {
    let Some(url) = std::env::var("PHYLAX_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true needs PostgreSQL (PHYLAX_TEST_DATABASE_URL)"
        );
        return None;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema}; SET search_path = {schema}; \
         CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .await
    .unwrap();
    for (v, sql) in migrations::POSTGRES.iter().filter(|(v, _)| *v < version) {
        c.batch_execute(sql).await.unwrap();
        c.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[v])
            .await
            .unwrap();
    }
    c.batch_execute(data).await.unwrap();
    Some((url, schema))
}

// A count whose conditions are all about index entries is taken from the
// entries alone (`query::count_from_entries`), not through the versions:
// it must still count a resource once however many of its values share a
// hash, follow updates and deletions, keep to its type, and apply the
// other groups (including negations of a parameter nobody registered and
// of one that has entries); with `_id` or `_lastUpdated` it goes through
// the versions as before. Each case compares the count with the rows.
both!(counts_from_entries_agree_with_the_rows);
async fn counts_from_entries_agree_with_the_rows(s: &DynStore) {
    let fam = |x: &[u8]| Cond::Hash {
        param: "family".into(),
        hashes: vec![x.to_vec()],
    };
    let put = |rtype: &'static str, id: &'static str, v: u64, rows: Vec<IndexRow>| {
        let n = with_index(nv(rtype, id, v, 1000 * v as i64, b"x"), rows);
        (
            n,
            if v == 1 {
                Precondition::Absent
            } else {
                Precondition::CurrentIs(v - 1)
            },
        )
    };
    // p1 has two names sharing the prefix entry "sm"; p2 one; p3 is
    // updated away from it; p4 is deleted; a Practitioner shares the
    // parameter name and the hash; p5 carries a label.
    for (n, pre) in [
        put(
            "Patient",
            "p1",
            1,
            vec![h("family", b"sm"), h("family", b"sm")],
        ),
        put("Patient", "p2", 1, vec![h("family", b"sm")]),
        put("Patient", "p3", 1, vec![h("family", b"sm")]),
        put("Patient", "p3", 2, vec![h("family", b"jo")]),
        put("Patient", "p4", 1, vec![h("family", b"sm")]),
        put("Practitioner", "d1", 1, vec![h("family", b"sm")]),
        put(
            "Patient",
            "p5",
            1,
            vec![h("family", b"sm"), h("_security", b"R")],
        ),
    ] {
        s.append_version(n, pre, vec![]).await.unwrap();
    }
    let mut gone = nv("Patient", "p4", 2, 5000, b"");
    gone.deleted = true;
    gone.sealed = None;
    s.append_version(gone, Precondition::CurrentIs(1), vec![])
        .await
        .unwrap();
    let not = |param: &str, x: &[u8]| Cond::NotHash {
        param: param.into(),
        hashes: vec![x.to_vec()],
    };
    let cases: Vec<(Vec<Vec<Cond>>, Vec<&str>)> = vec![
        (vec![vec![fam(b"sm")]], vec!["p1", "p2", "p5"]),
        (
            vec![vec![fam(b"sm")], vec![not("_security", b"R")]],
            vec!["p1", "p2"],
        ),
        (
            vec![vec![fam(b"sm")], vec![not("never-registered", b"R")]],
            vec!["p1", "p2", "p5"],
        ),
        (
            vec![vec![fam(b"sm"), fam(b"jo")]],
            vec!["p1", "p2", "p3", "p5"],
        ),
        (
            vec![vec![fam(b"sm")], vec![Cond::NotIds(vec!["p2".into()])]],
            vec!["p1", "p5"],
        ),
        (
            vec![
                vec![fam(b"sm")],
                vec![Cond::LastUpdated {
                    op: RangeOp::Ge,
                    lo: 0,
                    hi: 1,
                }],
            ],
            vec!["p1", "p2", "p5"],
        ),
    ];
    for (and, want) in cases {
        let q = SearchQuery {
            rtype: "Patient".into(),
            and: and.clone(),
            before_seq: None,
            limit: 100,
        };
        let n = s.search_count(&q).await.unwrap();
        assert_eq!(found(s, "Patient", and.clone()).await, want, "{and:?}");
        assert_eq!(n as usize, want.len(), "count of {and:?}");
    }
}

// A database that a newer release migrated is refused at start, with the
// reason, rather than served by a release that does not know its tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    sqlite_at(
        &path,
        i64::MAX,
        "INSERT INTO schema_migrations VALUES (9999, 0)",
    );
    let e = SqliteStore::open(&path).await.err().unwrap().to_string();
    assert!(e.contains("schema is version 9999, newer"), "{e}");
    if let Some((url, schema)) = postgres_at(
        i64::MAX,
        "INSERT INTO schema_migrations (version) VALUES (9999)",
    )
    .await
    {
        let e = PgStore::connect(&url, Some(&schema))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("schema is version 9999, newer"), "{e}");
    }
    // The current schema itself opens.
    let fresh = dir.path().join("fresh.db");
    drop(SqliteStore::open(&fresh).await.unwrap());
    SqliteStore::open(&fresh).await.unwrap();
}

both!(wrapped_keys_page_swap_and_group);
async fn wrapped_keys_page_swap_and_group(s: &DynStore) {
    // Version 2 heads name a generation; version 1 heads are one byte.
    let v2 = |gen: u8, tail: u8| vec![2, 0, 0, 0, gen, tail, tail];
    for (scope, w, t) in [
        ("data:patient:a", v2(1, 1), 10),
        ("data:patient:b", v2(1, 2), 20),
        ("data:tenant", vec![1, 9, 9, 9, 9, 9], 5),
        ("mac:token", v2(2, 3), 30),
        ("data:patient:c", vec![1, 8, 8, 8, 8, 8], 7),
    ] {
        s.put_wrapped_key_if_absent(scope, &w, t).await.unwrap();
    }
    // Pages in byte order, each after the last.
    let p1 = s.list_wrapped_keys("", 2).await.unwrap();
    let p2 = s.list_wrapped_keys(&p1[1].scope, 2).await.unwrap();
    let p3 = s.list_wrapped_keys(&p2[1].scope, 2).await.unwrap();
    let all: Vec<String> = p1
        .iter()
        .chain(&p2)
        .chain(&p3)
        .map(|r| r.scope.clone())
        .collect();
    assert_eq!(
        all,
        [
            "data:patient:a",
            "data:patient:b",
            "data:patient:c",
            "data:tenant",
            "mac:token"
        ]
    );
    // Pages in the order cheapest to rewrite: every key exactly once,
    // whether the last page is full or not.
    for size in [2, 5] {
        let mut walked = Vec::new();
        let (mut page, mut at) = s.wrapped_keys_page(None, size).await.unwrap();
        loop {
            walked.extend(page.iter().map(|r| r.scope.clone()));
            let Some(f) = at else { break };
            (page, at) = s.wrapped_keys_page(Some(&f), size).await.unwrap();
        }
        walked.sort();
        assert_eq!(walked, all, "each key once, pages of {size}");
    }
    assert_eq!(p1[0].created_at, 10);
    let others: Vec<String> = s
        .wrapped_keys_except("data")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.scope)
        .collect();
    assert_eq!(others, ["mac:token"]);
    assert!(s.delete_wrapped_key("data:tenant").await.unwrap());
    assert!(!s.delete_wrapped_key("data:tenant").await.unwrap());
    // Append-only lists are read whole, gaps and all.
    for k in ["list_v1:1", "list_v1:3", "other:1"] {
        s.put_meta_if_absent(k, k.as_bytes()).await.unwrap();
    }
    let mut l = s.meta_with_prefix("list_v1:").await.unwrap();
    l.sort();
    assert_eq!(
        l,
        vec![
            ("list_v1:1".to_owned(), b"list_v1:1".to_vec()),
            ("list_v1:3".to_owned(), b"list_v1:3".to_vec())
        ]
    );
    // Compare-and-swap: only rows still holding the old bytes change.
    let n = s
        .replace_wrapped_keys(vec![
            ("data:patient:a".into(), v2(1, 1), v2(2, 1)),
            ("data:patient:b".into(), v2(9, 9), v2(2, 2)),
            ("data:gone".into(), v2(1, 1), v2(2, 1)),
        ])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        s.get_wrapped_key("data:patient:a").await.unwrap(),
        Some(v2(2, 1))
    );
    assert_eq!(
        s.get_wrapped_key("data:patient:b").await.unwrap(),
        Some(v2(1, 2))
    );
    let stats = s.wrapped_key_stats().await.unwrap();
    let summary: Vec<(String, Vec<u8>, u64, i64, i64)> = stats
        .into_iter()
        .map(|g| (g.kind, g.head, g.count, g.oldest, g.newest))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("data".into(), vec![1], 1, 7, 7),
            ("data".into(), vec![2, 0, 0, 0, 1], 1, 20, 20),
            ("data".into(), vec![2, 0, 0, 0, 2], 1, 10, 10),
            ("mac".into(), vec![2, 0, 0, 0, 2], 1, 30, 30),
        ]
    );
}

both!(erasing_a_key_scope_removes_its_versions_and_key);
async fn erasing_a_key_scope_removes_its_versions_and_key(s: &DynStore) {
    let put = |id: &str, version: u64, scope: &str| {
        let mut v = with_index(
            nv("Observation", id, version, 100 * version as i64, b"x"),
            vec![h("code", b"c")],
        );
        v.key_scope = scope.into();
        v
    };
    // o1: the erased patient's. o2: moved from the erased patient to b
    // (its current version is b's). o3: b's only. o4: moved to the erased
    // patient (its current version is a's): all of it goes, the version
    // from before too.
    for (v, pre) in [
        (put("o1", 1, "patient:a"), Precondition::Absent),
        (put("o2", 1, "patient:a"), Precondition::Absent),
        (put("o2", 2, "patient:b"), Precondition::CurrentIs(1)),
        (put("o3", 1, "patient:b"), Precondition::Absent),
        (put("o4", 1, "patient:b"), Precondition::Absent),
        (put("o4", 2, "patient:a"), Precondition::CurrentIs(1)),
    ] {
        s.append_version(v, pre, vec![]).await.unwrap();
    }
    for scope in ["data:patient:a", "data:patient:b"] {
        s.put_wrapped_key_if_absent(scope, b"k", 1).await.unwrap();
    }
    assert_eq!(
        s.key_scope_summary("patient:a").await.unwrap(),
        (3, Some(200))
    );
    let e = s
        .erase_key_scope("patient:a", "data:patient:a")
        .await
        .unwrap();
    assert_eq!(
        e,
        Erased {
            versions: 4,
            resources: 2,
            key_rows: 1
        }
    );
    assert!(s
        .read_version("Observation", "o4", 1)
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.key_scope_summary("patient:a").await.unwrap(), (0, None));
    assert!(s.get_wrapped_key("data:patient:a").await.unwrap().is_none());
    assert!(s.get_wrapped_key("data:patient:b").await.unwrap().is_some());
    assert!(s.read_current("Observation", "o1").await.unwrap().is_none());
    assert!(s.read_current("Observation", "o4").await.unwrap().is_none());
    assert_eq!(
        s.read_current("Observation", "o2")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    assert!(s
        .read_version("Observation", "o2", 1)
        .await
        .unwrap()
        .is_none());
    // The index answers only for what is left.
    let got = ids(
        s,
        vec![vec![Cond::Hash {
            param: "code".into(),
            hashes: vec![b"c".to_vec()],
        }]],
    )
    .await;
    assert_eq!(got, ["o2", "o3"]);
    // Again: nothing left to erase.
    assert_eq!(
        s.erase_key_scope("patient:a", "data:patient:a")
            .await
            .unwrap(),
        Erased::default()
    );
}

both!(versions_are_listed_by_generation_and_resealed_by_compare_and_swap);
async fn versions_are_listed_by_generation_and_resealed_by_compare_and_swap(s: &DynStore) {
    // Generation 1 (0x01…), 2 and 3 (0x02 ‖ generation ‖ …), a tombstone.
    let bodies: [&[u8]; 3] = [
        b"\x01one",
        b"\x02\x00\x00\x00\x02two",
        b"\x02\x00\x00\x00\x03three",
    ];
    for (i, b) in bodies.iter().enumerate() {
        s.append_version(
            nv("Basic", &format!("g{i}"), 1, 10, b),
            Precondition::Absent,
            vec![],
        )
        .await
        .unwrap();
    }
    let mut gone = nv("Basic", "g0", 2, 20, b"");
    gone.deleted = true;
    gone.sealed = None;
    s.append_version(gone, Precondition::CurrentIs(1), vec![])
        .await
        .unwrap();
    let below3 = s.sealed_versions(3, 0, 100).await.unwrap();
    let ids: Vec<&str> = below3.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, vec!["g0", "g1"], "generations 1 and 2, no tombstone");
    assert_eq!(below3[1].sealed, bodies[1]);
    assert_eq!(s.sealed_versions(2, 0, 100).await.unwrap().len(), 1);
    assert_eq!(s.count_sealed_versions(3).await.unwrap(), 2);
    assert_eq!(s.count_sealed_versions(2).await.unwrap(), 1);
    assert_eq!(
        s.sealed_versions(3, below3[0].seq, 100)
            .await
            .unwrap()
            .len(),
        1,
        "paged"
    );
    // A body changed since it was read is left alone.
    let n = s
        .reseal_versions(vec![
            (
                below3[0].seq,
                b"\x01other".to_vec(),
                b"\x02\x00\x00\x00\x03new0".to_vec(),
            ),
            (
                below3[1].seq,
                bodies[1].to_vec(),
                b"\x02\x00\x00\x00\x03new1".to_vec(),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(n, 1);
    let left: Vec<String> = s
        .sealed_versions(3, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(left, vec!["g0"]);
    let v = s.read_version("Basic", "g1", 1).await.unwrap().unwrap();
    assert_eq!(v.sealed.unwrap(), b"\x02\x00\x00\x00\x03new1");
    // Keys made and deleted in batches; a key already there wins.
    s.put_wrapped_key_if_absent("data:x@2", b"first", 1)
        .await
        .unwrap();
    let got = s
        .put_wrapped_keys_if_absent(
            vec![
                ("data:x@2".into(), b"second".to_vec()),
                ("data:y@2".into(), b"y".to_vec()),
            ],
            2,
        )
        .await
        .unwrap();
    assert_eq!(got, vec![b"first".to_vec(), b"y".to_vec()]);
    let n = s
        .delete_wrapped_keys(vec![
            "data:x@2".into(),
            "data:y@2".into(),
            "data:z@2".into(),
        ])
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(s.get_wrapped_key("data:y@2").await.unwrap().is_none());
}

both!(incident_steps_in_order_per_incident);
async fn incident_steps_in_order_per_incident(s: &DynStore) {
    use phylax_store::IncidentEventRow;
    let step = |inc: &str, n: i64, at: i64, kind: &str| IncidentEventRow {
        seq: 0,
        incident: inc.into(),
        step: n,
        at,
        kind: kind.into(),
        sealed: vec![at as u8; 3],
    };
    let a = s
        .incident_append(&step("inc-a", 0, 10, "opened"))
        .await
        .unwrap();
    let b = s
        .incident_append(&step("inc-b", 0, 11, "opened"))
        .await
        .unwrap();
    let c = s
        .incident_append(&step("inc-a", 1, 12, "note"))
        .await
        .unwrap();
    assert!(a < b && b < c);
    // One writer wins each step number.
    assert!(matches!(
        s.incident_append(&step("inc-a", 1, 13, "note")).await,
        Err(StoreError::Duplicate)
    ));
    let only_a = s.incident_events(Some("inc-a")).await.unwrap();
    assert_eq!(
        only_a
            .iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect::<Vec<_>>(),
        vec![(a, "opened"), (c, "note")]
    );
    assert_eq!(only_a[1].sealed, vec![12u8; 3]);
    assert_eq!(s.incident_events(None).await.unwrap().len(), 3);
    assert!(s.incident_events(Some("inc-z")).await.unwrap().is_empty());
}
