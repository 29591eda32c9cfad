//! PHI stays sealed: nothing identifying is in the database bytes, tampering
//! with stored rows is detected and refused, the KEK is guarded, and the
//! wire is TLS unless explicitly and locally overridden.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{Backend, TestServer, FJ};
use phylax_server::instance::{InitOptions, Instance, InstanceError};
use serde_json::{json, Value};

/// Distinctive PHI-like test values (fictional).
const NEEDLES: &[&str] = &[
    "Quixotebergson",
    "Zephyrina",
    "1961-07-23",
    "MRN-99887766",
    "555-0199-4242",
    "742 Evergreenish Terrace",
    "Springfieldia",
    "xylophonitis",
    "zephyrina.q@example.org",
];

async fn store_phi(s: &TestServer, tok: &str) -> (String, String) {
    let p = json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-99887766"}],
        "name": [{"family": "Quixotebergson", "given": ["Zephyrina"]}],
        "telecom": [{"system": "phone", "value": "+1 555-0199-4242"}, {"system": "email", "value": "zephyrina.q@example.org"}],
        "birthDate": "1961-07-23",
        "address": [{"line": ["742 Evergreenish Terrace"], "city": "Springfieldia"}]
    });
    let r = s
        .http
        .post(s.url("/Patient"))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = json!({
        "resourceType": "Observation", "status": "final", "code": {"text": "Diagnosis note"},
        "subject": {"reference": format!("Patient/{pid}")},
        "note": [{"text": "Confidential diagnosis: xylophonitis"}]
    });
    let r = s
        .http
        .post(s.url("/Observation"))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(o.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let oid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (pid, oid)
}

/// Every byte of the database: the SQLite files, or every row of every
/// table in the PostgreSQL schema rendered as text (bytea as hex).
async fn raw_database(s: &TestServer) -> Vec<u8> {
    match s.backend {
        Backend::Sqlite => {
            let mut out = Vec::new();
            for f in ["phylax.db", "phylax.db-wal"] {
                if let Ok(b) = std::fs::read(s.data_dir.join(f)) {
                    out.extend(b);
                }
            }
            assert!(out.len() > 4096);
            out
        }
        Backend::Postgres => {
            let (c, conn) =
                tokio_postgres::connect(s.db_url.as_deref().unwrap(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let tables = c
                .query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()", &[])
                .await
                .unwrap();
            assert!(tables.len() >= 5);
            let mut out = Vec::new();
            for t in tables {
                let name: String = t.get(0);
                for row in c
                    .query(&format!("SELECT t::text FROM {name} t"), &[])
                    .await
                    .unwrap()
                {
                    out.extend(row.get::<_, String>(0).into_bytes());
                }
            }
            out
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

both!(no_phi_in_database_bytes);
async fn no_phi_in_database_bytes(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let (pid, _) = store_phi(s, &tok).await;
    // Update and delete too: old versions and tombstones must be sealed as well.
    let r = s
        .http
        .get(s.url(&format!("/Patient/{pid}")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let mut p: Value = r.json().await.unwrap();
    p["gender"] = json!("female");
    s.http
        .put(s.url(&format!("/Patient/{pid}")))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    let raw = raw_database(s).await;
    for n in NEEDLES {
        assert!(
            !contains(&raw, n.as_bytes()),
            "plaintext {n:?} found in the {:?} database",
            s.backend
        );
        assert!(
            !contains(&raw, hex::encode(n).as_bytes()),
            "hex of {n:?} found in the {:?} database",
            s.backend
        );
    }
    // The data is really there: a read returns it.
    let r = s
        .http
        .get(s.url(&format!("/Patient/{pid}")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("Quixotebergson"));
}

async fn sql(s: &TestServer, stmt: &str) {
    match s.backend {
        Backend::Sqlite => {
            let c = rusqlite::Connection::open(s.data_dir.join("phylax.db")).unwrap();
            c.execute_batch(stmt).unwrap();
        }
        Backend::Postgres => {
            let (c, conn) =
                tokio_postgres::connect(s.db_url.as_deref().unwrap(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            c.batch_execute(stmt).await.unwrap();
        }
    }
}

async fn status_and_body(s: &TestServer, tok: &str, path: &str) -> (u16, String) {
    let r = s
        .http
        .get(s.url(path))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn assert_integrity_refusal((st, body): (u16, String), what: &str) {
    assert_eq!(st, 500, "{what}: {body}");
    assert!(body.contains("integrity"), "{what}: {body}");
    for n in NEEDLES {
        assert!(!body.contains(n), "{what}: PHI leaked in the error");
    }
}

both!(tampering_is_detected_and_refused);
async fn tampering_is_detected_and_refused(s: &TestServer) {
    let tok = s.token("system/*.cruds").await;
    let (a, _) = store_phi(s, &tok).await;
    let (b, _) = store_phi(s, &tok).await;
    let (c, _) = store_phi(s, &tok).await;
    let (d, _) = store_phi(s, &tok).await;
    a_flipped_byte_is_refused(s, &tok, &a).await;
    swapped_rows_are_refused(s, &tok, &b, &c).await;
    a_replayed_version_is_refused(s, &tok, &d).await;
    a_rewritten_key_scope_is_refused(s, &tok, &b).await;
    a_tampered_wrapped_key_is_refused(s, &tok).await;
}

/// Flip the last byte of A's body (inside the GCM tag).
async fn a_flipped_byte_is_refused(s: &TestServer, tok: &str, a: &str) {
    let blob_flip = match s.backend {
        // Flip the last byte of the body (inside the GCM tag).
        Backend::Sqlite => format!(
            "UPDATE resource_versions SET body = CAST(substr(body, 1, length(body) - 1) || \
             CASE WHEN substr(body, -1) = x'00' THEN x'01' ELSE x'00' END AS BLOB) WHERE id = '{a}'"
        ),
        Backend::Postgres => format!(
            "UPDATE resource_versions SET body = set_byte(body, length(body) - 1, (get_byte(body, length(body) - 1) + 1) % 256) WHERE id = '{a}'"
        ),
    };
    sql(s, &blob_flip).await;
    assert_integrity_refusal(
        status_and_body(s, tok, &format!("/Patient/{a}")).await,
        "flipped byte",
    );
}

/// Move B's ciphertext onto C (same type and version, different id).
async fn swapped_rows_are_refused(s: &TestServer, tok: &str, b: &str, c: &str) {
    sql(s, &format!("UPDATE resource_versions SET body = (SELECT body FROM resource_versions WHERE id = '{b}' AND version = 1), \
                     key_scope = (SELECT key_scope FROM resource_versions WHERE id = '{b}' AND version = 1) WHERE id = '{c}'")).await;
    assert_integrity_refusal(
        status_and_body(s, tok, &format!("/Patient/{c}")).await,
        "swapped rows",
    );
    assert_eq!(
        status_and_body(s, tok, &format!("/Patient/{b}")).await.0,
        200,
        "the source row is intact"
    );
}

/// Replay an old version of D as the current one.
async fn a_replayed_version_is_refused(s: &TestServer, tok: &str, d: &str) {
    let r = s
        .http
        .get(s.url(&format!("/Patient/{d}")))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    s.http
        .put(s.url(&format!("/Patient/{d}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    sql(s, &format!("UPDATE resource_versions SET body = (SELECT body FROM resource_versions WHERE id = '{d}' AND version = 1) \
                     WHERE id = '{d}' AND version = 2")).await;
    assert_integrity_refusal(
        status_and_body(s, tok, &format!("/Patient/{d}")).await,
        "replayed version",
    );
    assert_eq!(
        status_and_body(s, tok, &format!("/Patient/{d}/_history/1"))
            .await
            .0,
        200
    );
}

/// Rewrite which key a row claims; history listings refuse too.
async fn a_rewritten_key_scope_is_refused(s: &TestServer, tok: &str, b: &str) {
    sql(
        s,
        &format!("UPDATE resource_versions SET key_scope = 'tenant' WHERE id = '{b}'"),
    )
    .await;
    assert_integrity_refusal(
        status_and_body(s, tok, &format!("/Patient/{b}")).await,
        "key scope rewritten",
    );
    // History listings refuse too, rather than skipping the bad row silently.
    assert_integrity_refusal(
        status_and_body(s, tok, "/Patient/_history").await,
        "history over a tampered row",
    );
}

/// A fresh server (no key cache) over a tampered wrapped key.
async fn a_tampered_wrapped_key_is_refused(s: &TestServer, tok: &str) {
    let (good1, _) = store_phi(s, tok).await;
    let (good2, _) = store_phi(s, tok).await;
    let (e, _) = store_phi(s, tok).await;
    let flip_key = match s.backend {
        Backend::Sqlite => format!("UPDATE wrapped_keys SET wrapped = CAST(substr(wrapped, 1, 20) || CASE WHEN substr(wrapped, 21, 1) = x'ff' THEN x'00' ELSE x'ff' END || substr(wrapped, 22) AS BLOB) WHERE scope = 'data:patient:{e}'"),
        Backend::Postgres => format!("UPDATE wrapped_keys SET wrapped = set_byte(wrapped, 20, (get_byte(wrapped, 20) + 1) % 256) WHERE scope = 'data:patient:{e}'"),
    };
    sql(s, &flip_key).await;
    let inst = Instance::open(&s.data_dir, s.db_url.as_deref())
        .await
        .unwrap();
    let repo = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        inst.blind_key,
        String::new(),
    );
    let t = phylax_fhir::ResourceType::parse("Patient").unwrap();
    // A search page fetches its keys together: a page of good records
    // opens; one that includes the tampered key is refused, not served
    // without that record.
    let page = |ids: Vec<&String>| {
        let q = phylax_store::SearchQuery {
            rtype: "Patient".into(),
            and: vec![vec![phylax_store::Cond::Ids(
                ids.into_iter().cloned().collect(),
            )]],
            before_seq: None,
            limit: 100,
        };
        let repo = &repo;
        async move { repo.search_unconfined(&q).await }
    };
    let r = page(vec![&good1, &e, &good2]).await;
    assert!(
        matches!(
            r,
            Err(phylax_server::data::repo::RepoError::Integrity { .. })
        ),
        "{:?}",
        r.map(|p| p.len())
    );
    assert_eq!(page(vec![&good1, &good2]).await.unwrap().len(), 2);
    let r = repo
        .read(&t, &phylax_fhir::ResourceId::parse(&e).unwrap())
        .await;
    assert!(
        matches!(
            r,
            Err(phylax_server::data::repo::RepoError::Integrity { .. })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn wrong_or_exposed_kek_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = dir.path().join("keys/kek");
    let opts = InitOptions {
        data_dir: data.clone(),
        key_file: Some(key.clone()),
        listen: "127.0.0.1:0".into(),
        public_url: None,
        database_url: None,
        tls_names: vec![],
        hsm: None,
    };
    Instance::init(&opts).await.unwrap();
    assert!(matches!(
        Instance::init(&opts).await,
        Err(InstanceError::AlreadyInitialized(_))
    ));
    assert!(Instance::open(&data, None).await.is_ok());
    // A PostgreSQL URL does not apply to a SQLite instance.
    assert!(matches!(
        Instance::open(&data, Some("postgres://x@localhost/y")).await,
        Err(InstanceError::DatabaseUrlNotApplicable)
    ));
    // Another KEK: refused at start, not at the first read.
    let other = dir.path().join("keys/other");
    phylax_crypto::Kek::create_file(&other).unwrap();
    let mut cfg = phylax_server::base::config::Config::load(&data).unwrap();
    let good = cfg.key_file.clone();
    cfg.key_file = Some(other);
    cfg.save(&data).unwrap();
    assert!(matches!(
        Instance::open(&data, None).await,
        Err(InstanceError::WrongKek)
    ));
    cfg.key_file = good;
    cfg.save(&data).unwrap();
    // A key file others can read is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Instance::open(&data, None).await.unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Instance::open(&data, None).await.is_ok());
    // Keys never go inside the data directory.
    let inside = InitOptions {
        data_dir: dir.path().join("d2"),
        key_file: Some(dir.path().join("d2/kek")),
        ..opts.clone()
    };
    assert!(matches!(
        Instance::init(&inside).await,
        Err(InstanceError::KeyInsideDataDir)
    ));
    // The default key location is beside, not inside, the data directory.
    let def = phylax_server::instance::default_key_file(&dir.path().join("phylax-data")).unwrap();
    assert!(!def.starts_with(dir.path().join("phylax-data")));
    // No key material in the data directory at all.
    for entry in walk(&data) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(!text.contains("PRIVATE KEY"), "{}", entry.display());
    }
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_only_on_loopback_and_tls_is_strict() {
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    // Plaintext on a non-loopback address is refused.
    let l = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let r = phylax_server::http::serve(s.state.clone(), l, None, async {}).await;
    assert!(r.is_err());
    // Plaintext HTTP to the TLS port gets nothing useful.
    let plain = reqwest::Client::new();
    let r = plain
        .get(s.fhir.replace("https://", "http://") + "/metadata")
        .send()
        .await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));
    // A TLS 1.2-only client still connects (forward-secret AEAD suite).
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let c12 = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    assert_eq!(
        c12.get(s.url("/metadata")).send().await.unwrap().status(),
        200
    );
    // A client that does not trust our CA refuses the server.
    let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    assert!(untrusting.get(s.url("/metadata")).send().await.is_err());
    // Only forward-secret AEAD suites are configured.
    for suite in phylax_server::net::tls::allowed_suites() {
        let name = format!("{:?}", suite.suite());
        assert!(
            name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
            "{name}"
        );
        assert!(
            name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
            "{name}"
        );
    }
}
