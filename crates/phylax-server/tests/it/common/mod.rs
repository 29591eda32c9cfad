//! Test harness: a real Phylax instance (SQLite file or a fresh PostgreSQL
//! schema) served over real HTTPS on 127.0.0.1, and a reqwest client that
//! trusts only the instance's generated CA.
#![allow(dead_code)]

use phylax_server::instance::{InitOptions, Instance};
use phylax_server::{http::serve, state::AppState};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestServer {
    pub base: String,
    pub fhir: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub db_url: Option<String>,
    pub backend: Backend,
    pub state: Arc<AppState>,
    /// The certificate the server presents (reloaded when its files change).
    pub cert: Arc<phylax_server::net::certs::ServerCert>,
    /// The database, as an operator holding it sees it (the server's
    /// subsystems each hold only their own concern).
    pub store: phylax_store::DynStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The client id of the test deployment's relationship feed.
pub const FEED: &str = "adt-feed";

/// The PostgreSQL URL for tests, or None (skip) outside CI.
pub fn pg_url() -> Option<String> {
    match std::env::var("PHYLAX_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but PHYLAX_TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI");
            }
            eprintln!("note: PHYLAX_TEST_DATABASE_URL not set; skipping the PostgreSQL half (run scripts/test)");
            None
        }
    }
}

/// `[hsm]` settings for the test SoftHSM2 token, with a key label no other
/// test uses; `None` (skip) without the token, a failure under `CI=true`.
pub fn hsm_settings() -> Option<phylax_server::base::config::HsmSettings> {
    let (Ok(module), Ok(token), Ok(pin)) = (
        std::env::var("PHYLAX_TEST_HSM_MODULE"),
        std::env::var("PHYLAX_TEST_HSM_TOKEN"),
        std::env::var("PHYLAX_TEST_HSM_PIN_FILE"),
    ) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no SoftHSM2 token: run the tests through scripts/test"
        );
        eprintln!("note: no SoftHSM2 token; skipping the HSM case (run scripts/test)");
        return None;
    };
    Some(phylax_server::base::config::HsmSettings {
        module: module.into(),
        token,
        pin_file: Some(pin.into()),
        pin_env: None,
        key_label: format!("t-{}", uuid::Uuid::new_v4().simple()),
    })
}

/// A fresh schema in the test database, as a URL whose connections use it.
pub async fn pg_schema_url() -> Option<(String, String)> {
    let url = pg_url()?;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    Some((
        format!("{url}{sep}options=-c%20search_path%3D{schema}"),
        schema,
    ))
}

pub fn https_client(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .build()
        .unwrap()
}

impl TestServer {
    pub async fn start(backend: Backend) -> Option<TestServer> {
        Self::start_with(backend, |_| {}).await
    }

    /// Start, letting `tweak` adjust the configuration first.
    pub async fn start_with(
        backend: Backend,
        tweak: impl FnOnce(&mut phylax_server::base::config::Config),
    ) -> Option<TestServer> {
        Self::start_full(backend, None, tweak).await
    }

    /// Start with the KEK in the test SoftHSM2 token (scripts/test-softhsm.sh)
    /// under a key label of its own; `None` (skip) without the token
    /// outside CI.
    pub async fn start_hsm(backend: Backend) -> Option<TestServer> {
        let hsm = hsm_settings()?;
        Self::start_full(backend, Some(hsm), |_| {}).await
    }

    async fn start_full(
        backend: Backend,
        hsm: Option<phylax_server::base::config::HsmSettings>,
        tweak: impl FnOnce(&mut phylax_server::base::config::Config),
    ) -> Option<TestServer> {
        let db_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(pg_schema_url().await?.0),
        };
        Some(Self::start_at(backend, db_url, hsm, tweak).await)
    }

    /// Start on a PostgreSQL database of the test's own (a cluster it
    /// runs itself).
    pub async fn start_on(
        db_url: String,
        tweak: impl FnOnce(&mut phylax_server::base::config::Config),
    ) -> TestServer {
        Self::start_at(Backend::Postgres, Some(db_url), None, tweak).await
    }

    async fn start_at(
        backend: Backend,
        db_url: Option<String>,
        hsm: Option<phylax_server::base::config::HsmSettings>,
        tweak: impl FnOnce(&mut phylax_server::base::config::Config),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = Instance::init(&InitOptions {
            data_dir: data_dir.clone(),
            key_file: Some(dir.path().join("keys/kek")),
            listen: addr.to_string(),
            public_url: None,
            database_url: db_url.clone(),
            tls_names: vec![],
            hsm,
        })
        .await
        .unwrap();
        // The backend client of `feed_token`: the ADT feed that may write
        // care relationships.
        cfg.access.relationship_clients = vec![FEED.into()];
        tweak(&mut cfg);
        cfg.save(&data_dir).unwrap();
        let inst = Instance::open(&data_dir, db_url.as_deref()).await.unwrap();
        let (tls, cert) = phylax_server::net::tls::server_tls(inst.cert_files()).unwrap();
        cert.watch();
        let ca = std::fs::read(inst.ca_path()).unwrap();
        let store = inst.store.clone();
        let state = AppState::new(inst).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st2 = state.clone();
        tokio::spawn(async move {
            serve(st2, listener, Some(tls), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let base = format!("https://{addr}");
        TestServer {
            fhir: format!("{base}/fhir"),
            base,
            http: https_client(&ca),
            dir,
            data_dir,
            db_url,
            backend,
            state,
            cert,
            store,
            stop: Some(tx),
        }
    }

    /// Stop serving and let go of everything but the directory (data and
    /// keys), which the caller keeps.
    pub fn shut_down(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Run SQL directly against the instance's database, as someone with
    /// database access (an attacker, or a failing disk) would.
    pub async fn sql(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let c = rusqlite::Connection::open(self.data_dir.join("phylax.db")).unwrap();
                c.execute_batch(sql).unwrap();
            }
            Backend::Postgres => {
                let url = self.db_url.as_deref().unwrap();
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                c.batch_execute(sql).await.unwrap();
            }
        }
    }

    /// Run SQL straight on the database; the database's error if it refuses.
    pub async fn try_sql(&self, sql: &str) -> Result<(), String> {
        match self.backend {
            Backend::Sqlite => {
                let c = rusqlite::Connection::open(self.data_dir.join("phylax.db"))
                    .map_err(|e| e.to_string())?;
                c.execute_batch(sql).map_err(|e| e.to_string())
            }
            Backend::Postgres => {
                let url = self.db_url.as_deref().unwrap();
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                c.batch_execute(sql).await.map_err(|e| format!("{e:?}"))
            }
        }
    }

    /// The single integer a query returns (a count), straight from the
    /// database.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let c = rusqlite::Connection::open(self.data_dir.join("phylax.db")).unwrap();
                c.query_row(sql, [], |r| r.get(0)).unwrap()
            }
            Backend::Postgres => {
                let url = self.db_url.as_deref().unwrap();
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                c.query_one(sql, &[]).await.unwrap().get(0)
            }
        }
    }

    /// A blob literal in this backend's SQL.
    pub fn blob(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match self.backend {
            Backend::Sqlite => format!("X'{hex}'"),
            Backend::Postgres => format!("'\\x{hex}'::bytea"),
        }
    }

    /// A second node over the same instance (same data directory, same
    /// database, same KEK), on its own port: how several Phylax nodes share
    /// one PostgreSQL. Returns its FHIR base URL and a stop handle.
    pub async fn second_node(&self) -> (String, tokio::sync::oneshot::Sender<()>) {
        let (url, stop, _) = self.second_node_with_state().await;
        (url, stop)
    }

    /// [`TestServer::second_node`], with its state (for what an operator
    /// does on that node's instance).
    pub async fn second_node_with_state(
        &self,
    ) -> (String, tokio::sync::oneshot::Sender<()>, Arc<AppState>) {
        let inst = Instance::open(&self.data_dir, self.db_url.as_deref())
            .await
            .unwrap();
        let tls = phylax_server::net::tls::server_config(&inst.cert_path(), &inst.config.tls.key)
            .unwrap();
        let state = AppState::new(inst).await.unwrap();
        let kept = state.clone();
        // Same certificate: it names 127.0.0.1, so any port works.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(state, listener, Some(tls), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        (format!("https://{addr}/fhir"), tx, kept)
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base)
    }

    /// Register a client with an ES384 key; returns (client_id, private key PEM).
    pub async fn register(&self, scope: &str) -> (String, Vec<u8>) {
        let g = phylax_auth::client_key::generate().unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        self.store
            .add_client(&phylax_store::ClientRecord {
                id: id.clone(),
                name: "test".into(),
                scope: scope.into(),
                jwks: g.jwks.clone(),
                disabled: false,
                created_at: 0,
                redirect_uris: vec![],
                public: false,
                first_party: false,
                cert_bound: false,
            })
            .await
            .unwrap();
        (id, g.private_pem.expose().to_vec())
    }

    pub fn assertion(&self, client_id: &str, key: &[u8]) -> String {
        phylax_auth::client_key::sign_assertion(
            key,
            None,
            client_id,
            &self.token_url(),
            chrono::Utc::now().timestamp(),
        )
        .unwrap()
    }

    /// POST to the token endpoint; returns (status, JSON body).
    pub async fn token_request(&self, assertion: &str, scope: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
            ])
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or_default())
    }

    /// A token for the test deployment's ADT feed (client id [`FEED`],
    /// listed in `access.relationship_clients`): the one backend client
    /// that may write care relationships.
    pub fn feed_token(&self, scope: &str) -> String {
        let scopes = phylax_auth::ScopeSet::parse_lenient(scope);
        self.state
            .authn
            .tokens
            .issue(FEED, &scopes, chrono::Utc::now().timestamp())
            .unwrap()
            .0
    }

    /// Register a client with `scope` and get a token for it.
    pub async fn token(&self, scope: &str) -> String {
        let (id, key) = self.register(scope).await;
        let (s, v) = self.token_request(&self.assertion(&id, &key), scope).await;
        assert_eq!(s, 200, "{v}");
        v["access_token"].as_str().unwrap().to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.fhir, path)
    }
}

/// The FHIR JSON media type.
pub const FJ: &str = "application/fhir+json";

/// Every system scope: what a test client asks for when scopes are not
/// what it tests.
pub const ALL: &str = "system/*.cruds";

/// Now, in Unix seconds.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// GET `path_and_query` with `tok`: the status and the JSON body (null
/// when there is none).
pub async fn get(s: &TestServer, tok: &str, path_and_query: &str) -> (u16, serde_json::Value) {
    let r = s
        .http
        .get(s.url(path_and_query))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// This process's resident memory (KiB), for tests that bound it.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Run a test body on both backends.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::common::{Backend, TestServer};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let s = TestServer::start(Backend::Sqlite).await.unwrap();
                super::$name(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(s) = TestServer::start(Backend::Postgres).await {
                    super::$name(&s).await;
                }
            }
        }
    };
}
