//! The PostgreSQL backend: the scale-out path, where several Phylax nodes
//! share one database. Concurrent writers to one resource are arbitrated by
//! a row lock on the current pointer and by the unique (type, id, version)
//! constraint; PostgreSQL's own group commit makes concurrent commits cheap.
//!
//! # Layout
//! One file per storage trait, each `impl … for PgStore`:
//! - [`meta`]: `MetaStore`, instance metadata.
//! - [`keys`]: `KeyStore`, wrapped keys.
//! - [`resources`]: `ResourceStore`, versions, the current pointer, the
//!   search index and searches.
//! - [`accounts`]: `AccountStore`, clients and users.
//! - [`grants`]: `GrantStore`, grants, revocations, used assertion ids.
//! - [`audit`]: `AuditStore`, the audit log, sealing queue, checkpoints.
//! - [`break_glass`]: `BreakGlassStore`, emergency access grants.
//! - [`incidents`]: `IncidentStore`, the breach register's steps.
//! - [`snapshot`]: `SnapshotStore`, a consistent dump for backups
//!   (`pg_dump` in an exported snapshot) and restoring one (`pg_restore`).
//!
//! This file: connecting (TLS rules in `pg_tls`), the pool, migrations, and the row mapping and SQL helpers the trait files share.

mod accounts;
mod audit;
mod break_glass;
mod grants;
mod incidents;
mod keys;
mod meta;
mod resources;
pub mod snapshot;

use crate::migrations;
use crate::params::{self, ParamIds};
use crate::query::{self, Pids, Plan, SearchQuery, P};
use crate::{
    AuditQuery, AuditRow, BreakGlassRecord, CheckpointRow, ClientRecord, GrantRecord, GrantUse,
    HistoryQuery, HistoryScope, IndexRow, NewAudit, NewVersion, Precondition, Result, Revocation,
    Store, StoreError, StoredVersion, UserRecord,
};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

pub struct PgStore {
    pool: Pool,
    /// Connections for search statements only, with generic plans forced
    /// (see `connect`).
    search_pool: Pool,
    pids: ParamIds,
    /// The URL it was opened with (it may hold the password; never
    /// printed): PostgreSQL's own tools connect with it for backups.
    url: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Server-side text of a PostgreSQL error (logged, never sent to clients).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    let text = describe(&e);
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Duplicate,
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            StoreError::Conflict
        }
        Some(c) if *c == SqlState::DISK_FULL || *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
            StoreError::Unavailable(text)
        }
        None => StoreError::Unavailable(text),
        _ => StoreError::Backend(text),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

const VERSION_COLS: &str = "seq, rtype, id, version, last_updated, deleted, key_scope, body";

fn row_version(r: &Row) -> StoredVersion {
    StoredVersion {
        seq: r.get(0),
        rtype: r.get(1),
        id: r.get(2),
        version: r.get::<_, i64>(3) as u64,
        last_updated: r.get(4),
        deleted: r.get(5),
        key_scope: r.get(6),
        sealed: r.get(7),
    }
}

/// Index rows as column arrays, for `unnest` on the server side.
struct IndexCols {
    pids: Vec<i32>,
    hashes: Vec<Option<Vec<u8>>>,
    lo: Vec<Option<i64>>,
    hi: Vec<Option<i64>>,
    num: Vec<Option<f64>>,
}

impl IndexCols {
    /// `pids[i]` is `rows[i]`'s parameter number.
    fn new(rows: &[IndexRow], pids: Vec<i32>) -> Self {
        IndexCols {
            pids,
            hashes: rows.iter().map(|r| r.hash.clone()).collect(),
            lo: rows.iter().map(|r| r.lo).collect(),
            hi: rows.iter().map(|r| r.hi).collect(),
            num: rows.iter().map(|r| r.num).collect(),
        }
    }
}

fn bind(ps: Vec<P>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    ps.into_iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                P::T(t) => Box::new(t),
                P::B(b) => Box::new(b),
                P::I(i) => Box::new(i),
                P::I32(i) => Box::new(i),
                P::F(f) => Box::new(f),
            }
        })
        .collect()
}

fn prefixed_cols() -> String {
    VERSION_COLS
        .split(", ")
        .map(|c| format!("v.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Append one version through `phylax_append_version`, on a pooled
/// connection or inside a transaction.
async fn append_one<C: deadpool_postgres::GenericClient>(
    c: &C,
    v: &NewVersion,
    pre: Precondition,
    pids: &ParamIds,
) -> Result<i64> {
    let st = c
        .prepare_cached(
            "SELECT phylax_append_version($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .await
        .map_err(pg)?;
    let expected: Option<i64> = match pre {
        Precondition::Absent => None,
        Precondition::CurrentIs(n) => Some(n as i64),
    };
    let version = v.version as i64;
    let rows = if v.deleted { &[][..] } else { &v.index[..] };
    let cols = IndexCols::new(rows, pids.pids(&v.rtype, rows)?);
    let row = c
        .query_one(
            &st,
            &[
                &v.rtype,
                &v.id,
                &version,
                &expected,
                &v.last_updated,
                &v.deleted,
                &v.key_scope,
                &v.sealed,
                &cols.pids,
                &cols.hashes,
                &cols.lo,
                &cols.hi,
                &cols.num,
            ],
        )
        .await
        .map_err(|e| match pg(e) {
            // Two first versions racing: the loser hits the unique key.
            StoreError::Duplicate => StoreError::Conflict,
            o => o,
        })?;
    row.get::<_, Option<i64>>(0).ok_or(StoreError::Conflict)
}

use crate::query::{
    audit_search_sql, AuditArg, AUDIT_COLS, AUDIT_FROM, AUDIT_PENDING_COLS, TREE_SIZE,
};

fn row_audit(r: &Row) -> AuditRow {
    AuditRow {
        id: r.get(0),
        leaf_index: r.get::<_, Option<i64>>(1).map(|i| i as u64),
        event_id: r.get(2),
        recorded: r.get(3),
        agent: r.get(4),
        action: r.get(5),
        subtype: r.get(6),
        outcome: r.get(7),
        leaf_hash: r.get(8),
        sealed: r.get(9),
    }
}

fn row_checkpoint(r: &Row) -> CheckpointRow {
    CheckpointRow {
        size: r.get::<_, i64>(0) as u64,
        time: r.get(1),
        note: r.get(2),
        frontier: r.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
    }
}

/// Insert audit records (and their patient entries) in one statement. Any
/// failure is `Unavailable`, never a retryable `Conflict`: the audit log
/// refused, so the caller's transaction must not commit.
async fn insert_audit<C: deadpool_postgres::GenericClient>(c: &C, rows: &[NewAudit]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let unavailable =
        |e: tokio_postgres::Error| StoreError::Unavailable(format!("audit log: {}", describe(&e)));
    let st = c
        .prepare_cached(
            "WITH ins AS (INSERT INTO audit_log (event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) \
             SELECT e, r, a, ac, s, o, l, b FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::bytea[], $8::bytea[]) WITH ORDINALITY AS u(e, r, a, ac, s, o, l, b, n) ORDER BY n \
             RETURNING id, event_id), \
             pend AS (INSERT INTO audit_pending (audit_id) SELECT id FROM ins) \
             INSERT INTO audit_patient (patient, audit_id) \
             SELECT p.patient, ins.id FROM ins JOIN unnest($9::text[], $10::bigint[]) AS p(event_id, patient) \
             ON p.event_id = ins.event_id ORDER BY p.patient",
        )
        .await
        .map_err(unavailable)?;
    let ev: Vec<&str> = rows.iter().map(|a| a.event_id.as_str()).collect();
    let rec: Vec<i64> = rows.iter().map(|a| a.recorded).collect();
    let agent: Vec<&str> = rows.iter().map(|a| a.agent.as_str()).collect();
    let action: Vec<&str> = rows.iter().map(|a| a.action.as_str()).collect();
    let sub: Vec<&str> = rows.iter().map(|a| a.subtype.as_str()).collect();
    let out: Vec<&str> = rows.iter().map(|a| a.outcome.as_str()).collect();
    let leaf: Vec<&[u8]> = rows.iter().map(|a| a.leaf_hash.as_slice()).collect();
    let sealed: Vec<&[u8]> = rows.iter().map(|a| a.sealed.as_slice()).collect();
    // Each record's patient entries once (the records' ids are new, so
    // no entry can already exist): a plain insert, in key order, costs
    // less than half of `ON CONFLICT DO NOTHING` in arrival order, which
    // checked every entry speculatively and descended the index at random
    // (docs/PERFORMANCE.md).
    // Entries are keyed by the hash's first 8 bytes as a BIGINT
    // (`query::patient_key_int`, migration 15), deduplicated after that cut
    // so that two patients of one record whose keys collide share an entry
    // rather than fail the batch.
    let mut entries: Vec<(&str, i64)> = rows
        .iter()
        .flat_map(|a| {
            a.patients
                .iter()
                .map(move |p| (a.event_id.as_str(), crate::query::patient_key_int(p)))
        })
        .collect();
    entries.sort_unstable();
    entries.dedup();
    let (pe, pp): (Vec<&str>, Vec<i64>) = entries.into_iter().unzip();
    c.execute(
        &st,
        &[
            &ev, &rec, &agent, &action, &sub, &out, &leaf, &sealed, &pe, &pp,
        ],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The numbers of a query's parameters that this node knows (committed
/// ones, see `params`). The others are looked up inside the query itself
/// (`query::Builder::sub`): reading them here first cost a round trip per
/// search for every parameter without entries, such as the
/// restricted-label condition added to every search while no resource
/// carries a label.
fn resolve(ids: &ParamIds, q: &SearchQuery) -> Pids {
    params::query_params(q)
        .into_iter()
        .filter_map(|p| ids.get(&q.rtype, &p).map(|pid| (p, pid)))
        .collect()
}

/// Most statements one search connection keeps prepared. Search SQL
/// varies with the number of values (an `IN` list per condition), so a
/// client choosing those could otherwise grow each connection's cache, and
/// the server's memory for its prepared statements, without bound. Real
/// searches use a few dozen shapes; past the bound the cache starts over.
const MAX_SEARCH_STATEMENTS: usize = 256;

/// A search statement, prepared once per connection (an uncached
/// statement costs a second round trip, parse then execute, per query).
async fn prepare_search(
    c: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement> {
    if c.statement_cache.size() >= MAX_SEARCH_STATEMENTS {
        c.statement_cache.clear();
    }
    c.prepare_cached(sql).await.map_err(pg)
}

/// Which condition group drives a search (see `query::plan`).
async fn driver(
    c: &deadpool_postgres::Client,
    q: &SearchQuery,
    pids: &Pids,
) -> Result<Option<usize>> {
    match query::plan(q, pids, &|n| format!("${n}")) {
        Plan::Lists => Ok(None),
        Plan::Driver(i) => Ok(Some(i)),
        Plan::Probe {
            sql,
            params,
            candidates,
        } => {
            let owned = bind(params);
            let refs: Vec<&(dyn ToSql + Sync)> =
                owned.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
            let st = prepare_search(c, &sql).await?;
            let row = c.query_one(&st, &refs).await.map_err(pg)?;
            let counts: Vec<i64> = (0..candidates.len()).map(|k| row.get(k)).collect();
            Ok(query::driver_from_counts(&candidates, &counts))
        }
    }
}

fn row_client(r: &Row) -> ClientRecord {
    ClientRecord {
        id: r.get(0),
        name: r.get(1),
        scope: r.get(2),
        jwks: r.get(3),
        disabled: r.get(4),
        created_at: r.get(5),
        redirect_uris: crate::split_uris(r.get::<_, &str>(6)),
        public: r.get(7),
        first_party: r.get(8),
        cert_bound: r.get(9),
    }
}

const USER_COLS: &str = "id, username_hash, role, status, sealed, rev, created_at";

fn row_user(r: &Row) -> UserRecord {
    UserRecord {
        id: r.get(0),
        username_hash: r.get(1),
        role: r.get(2),
        status: r.get(3),
        sealed: r.get(4),
        rev: r.get(5),
        created_at: r.get(6),
    }
}

const GRANT_COLS: &str = "kind, key_hash, family, user_id, sealed, expires_at, used_at";

fn row_grant(r: &Row) -> GrantRecord {
    GrantRecord {
        kind: r.get(0),
        key_hash: r.get(1),
        family: r.get(2),
        user_id: r.get(3),
        sealed: r.get(4),
        expires_at: r.get(5),
        used_at: r.get(6),
    }
}

impl PgStore {
    fn pool(cfg: tokio_postgres::Config, tls: MakeRustlsConnect) -> Result<Pool> {
        let mgr = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(mgr)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Connect and apply migrations. `schema`, when given, is created if
    /// missing and used as the search path (tests use one schema each).
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgStore> {
        // TLS or not, by the rule in `pg_tls` (fails closed).
        let (mut cfg, tls) = crate::pg_tls::prepare(url)?;
        if let Some(s) = schema {
            if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(StoreError::Unavailable("invalid schema name".into()));
            }
            cfg.options(format!("-c search_path={s}"));
        }
        // Options from the URL or the schema, kept on both pools.
        let options = cfg.get_options().unwrap_or_default().to_owned();
        let pool = Self::pool(cfg.clone(), tls.clone())?;
        // Search statements are prepared once per connection and executed
        // with a blind hash, whose selectivity PostgreSQL cannot estimate:
        // under `plan_cache_mode = auto` it costs the generic plan above the
        // custom ones and re-plans on every execution, which doubled an
        // identifier search's time in the database (pgbench: 0.44 against
        // 0.21 ms for the same plan). The query's shape already encodes the
        // chosen driver (`query::plan`), so the generic plan is the right
        // one. Only searches get it: forcing it on every connection slowed
        // bulk loads (docs/PERFORMANCE.md).
        cfg.options(format!("{options} -c plan_cache_mode=force_generic_plan").trim());
        let search_pool = Self::pool(cfg, tls)?;
        let store = PgStore {
            pool,
            search_pool,
            pids: ParamIds::default(),
            url: url.to_owned(),
        };
        store.migrate(schema).await?;
        let c = store.pool.get().await.map_err(pool_err)?;
        for r in c
            .query("SELECT pid, rtype, param FROM search_params", &[])
            .await
            .map_err(pg)?
        {
            store
                .pids
                .insert(r.get::<_, &str>(1), r.get::<_, &str>(2), r.get(0));
        }
        drop(c);
        Ok(store)
    }

    /// Give every parameter of these versions' entries a number, committed
    /// (on its own pooled connection, outside any transaction) before the
    /// entries that use it; see `params`. Nodes racing to register the
    /// same parameter both read the one row that won.
    async fn intern<'a>(
        &self,
        versions: impl IntoIterator<Item = (&'a str, &'a [IndexRow])>,
    ) -> Result<()> {
        let missing = self.pids.missing(versions);
        if missing.is_empty() {
            return Ok(());
        }
        let c = self.pool.get().await.map_err(pool_err)?;
        for (rtype, param) in missing {
            c.execute(
                "INSERT INTO search_params (rtype, param) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&rtype, &param],
            )
            .await
            .map_err(pg)?;
            let pid: i32 = c
                .query_one(
                    "SELECT pid FROM search_params WHERE rtype = $1 AND param = $2",
                    &[&rtype, &param],
                )
                .await
                .map_err(pg)?
                .get(0);
            self.pids.insert(&rtype, &param, pid);
        }
        Ok(())
    }

    async fn migrate(&self, schema: Option<&str>) -> Result<()> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        if let Some(s) = schema {
            // Validated above to be [A-Za-z0-9_]+.
            c.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .await
                .map_err(pg)?;
        }
        let tx = c.transaction().await.map_err(pg)?;
        // Serialize migrations across nodes starting together.
        tx.execute("SELECT pg_advisory_xact_lock(7355608)", &[])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg)?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        migrations::refuse_newer(current, migrations::POSTGRES)?;
        for (v, sql) in migrations::POSTGRES.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[v])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
}

const BREAK_GLASS_COLS: &str =
    "id, user_id, started, expires, sealed, reviewed_at, reviewer, review_sealed";

fn row_break_glass(r: &tokio_postgres::Row) -> BreakGlassRecord {
    BreakGlassRecord {
        id: r.get(0),
        user_id: r.get(1),
        started: r.get(2),
        expires: r.get(3),
        sealed: r.get(4),
        reviewed_at: r.get(5),
        reviewer: r.get(6),
        review_sealed: r.get(7),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::prelude::*;

    /// The test database's URL, or None (skipped) outside CI.
    fn test_url() -> Option<String> {
        match std::env::var("PHYLAX_TEST_DATABASE_URL") {
            Ok(u) if !u.is_empty() => Some(u),
            _ => {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "CI=true but PHYLAX_TEST_DATABASE_URL is not set"
                );
                eprintln!("note: PHYLAX_TEST_DATABASE_URL not set; skipped");
                None
            }
        }
    }

    /// Verified TLS against the real local server (scripts/test-postgres.sh
    /// makes sure it serves TLS for `localhost`): the right CA connects and
    /// the session is encrypted; another CA, or the right CA with a name
    /// the certificate does not carry, cannot connect.
    #[tokio::test]
    async fn verified_tls_on_a_real_socket() {
        let Some(url) = test_url() else { return };
        let plain: tokio_postgres::Config = url.parse().unwrap();
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let on: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        let file: String = c.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
        let pem = match (on.as_str(), std::fs::read(&file)) {
            ("on", Ok(pem)) => pem,
            _ => {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "CI=true but the test PostgreSQL serves no readable TLS certificate (scripts/test-postgres.sh sets one up)"
                );
                eprintln!("note: PostgreSQL has no readable TLS certificate; skipped");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let right = dir.path().join("right.pem");
        std::fs::write(&right, &pem).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let wrong = dir.path().join("wrong.pem");
        std::fs::write(&wrong, other.cert.pem()).unwrap();
        let user = plain.get_user().unwrap();
        let password = std::str::from_utf8(plain.get_password().unwrap()).unwrap();
        let db = plain.get_dbname().unwrap();
        let port = plain.get_ports().first().copied().unwrap_or(5432);
        let url_for = |host: &str, ca: &std::path::Path, extra: &str| {
            format!(
                "postgres://{user}:{password}@{host}:{port}/{db}?sslmode=verify-full&sslrootcert={}{extra}",
                ca.display()
            )
        };

        let s = PgStore::connect(&url_for("localhost", &right, ""), None)
            .await
            .unwrap();
        for p in [&s.pool, &s.search_pool] {
            let c = p.get().await.unwrap();
            let ssl: bool = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(ssl, "the session is encrypted");
        }

        let e = PgStore::connect(&url_for("localhost", &wrong, ""), None)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // The right CA, a name its certificate does not carry (the socket
        // is still the local server's).
        let e = PgStore::connect(
            &url_for("wrong-name.invalid", &right, "&hostaddr=127.0.0.1"),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    }

    /// A store migrated into a schema of its own, a plain connection to
    /// look at it with, and the schema's name.
    async fn store_in_new_schema(url: &str) -> (PgStore, tokio_postgres::Client, String) {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        let s = PgStore::connect(
            &format!("{url}{sep}options=-c%20search_path%3D{schema}"),
            None,
        )
        .await
        .unwrap();
        (s, c, schema)
    }

    /// Search connections force generic plans and keep the options the
    /// URL gave (a schema, here); other connections keep PostgreSQL's
    /// default. Needs PostgreSQL (`PHYLAX_TEST_DATABASE_URL`); required
    /// under `CI=true`.
    #[tokio::test]
    async fn only_search_connections_force_generic_plans() {
        let Some(url) = test_url() else { return };
        let (s, _c, schema) = store_in_new_schema(&url).await;
        let show = |p: &Pool, what: &'static str| {
            let p = p.clone();
            async move {
                let c = p.get().await.unwrap();
                let r = c.query_one(&format!("SHOW {what}"), &[]).await.unwrap();
                r.get::<_, String>(0)
            }
        };
        assert_eq!(
            show(&s.search_pool, "plan_cache_mode").await,
            "force_generic_plan"
        );
        assert_eq!(show(&s.pool, "plan_cache_mode").await, "auto");
        assert_eq!(show(&s.search_pool, "search_path").await, schema);
        assert_eq!(show(&s.pool, "search_path").await, schema);
        // Each number of `_id` values is a new statement: the search
        // connections' caches stay bounded however many a client sends.
        for n in 1..=MAX_SEARCH_STATEMENTS + 40 {
            let q = SearchQuery {
                rtype: "Patient".into(),
                and: vec![vec![crate::Cond::Ids(
                    (0..n).map(|i| format!("id-{i}")).collect(),
                )]],
                before_seq: None,
                limit: 10,
            };
            assert!(s.search(&q).await.unwrap().is_empty());
        }
        let c = s.search_pool.get().await.unwrap();
        assert!(c.statement_cache.size() > 0);
        assert!(c.statement_cache.size() <= MAX_SEARCH_STATEMENTS);
    }

    /// Bytes that do not compress, as sealed bytes never do.
    fn incompressible(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        }
        out.truncate(n);
        out
    }

    /// Migration 14: audit records and bodies up to a page stay in their
    /// row instead of going to TOAST (a failed compression, an insert per
    /// 2 KiB chunk and a lookup per read); larger ones still go out.
    #[tokio::test]
    async fn sealed_bytes_up_to_a_page_stay_in_their_row() {
        let Some(url) = test_url() else { return };
        let (s, c, schema) = store_in_new_schema(&url).await;
        let toast_bytes = |table: &'static str| {
            let c = &c;
            let schema = &schema;
            async move {
                let r = c
                    .query_one(
                        "SELECT pg_relation_size(t.reltoastrelid) FROM pg_class t \
                         JOIN pg_namespace n ON n.oid = t.relnamespace \
                         WHERE n.nspname = $1 AND t.relname = $2",
                        &[schema, &table],
                    )
                    .await
                    .unwrap();
                r.get::<_, i64>(0)
            }
        };
        let audit = |n: usize| NewAudit {
            event_id: uuid::Uuid::new_v4().to_string(),
            recorded: 1,
            agent: "user:a".into(),
            action: "E".into(),
            subtype: "search-type".into(),
            outcome: "0".into(),
            patients: vec![vec![1; 32], vec![2; 32]],
            leaf_hash: vec![0; 32],
            sealed: incompressible(n),
        };
        let version = |id: &str, n: usize| NewVersion {
            rtype: "Binary".into(),
            id: id.into(),
            version: 1,
            last_updated: 1,
            deleted: false,
            key_scope: "tenant".into(),
            sealed: Some(incompressible(n)),
            index: vec![],
        };
        // A record of a search that returned two dozen patients, and a
        // body of the same size: past the 2 KiB default, under a page.
        s.append_audit(vec![audit(3_500), audit(7_000)])
            .await
            .unwrap();
        s.append_version(version("b1", 3_500), Precondition::Absent, vec![])
            .await
            .unwrap();
        assert_eq!(toast_bytes("audit_log").await, 0);
        assert_eq!(toast_bytes("resource_versions").await, 0);
        // What is larger than a page still goes out of line, and reads back.
        s.append_audit(vec![audit(20_000)]).await.unwrap();
        s.append_version(version("b2", 20_000), Precondition::Absent, vec![])
            .await
            .unwrap();
        assert!(toast_bytes("audit_log").await > 0);
        assert!(toast_bytes("resource_versions").await > 0);
        let big = s.read_current("Binary", "b2").await.unwrap().unwrap();
        assert_eq!(big.sealed.map(|b| b.len()), Some(20_000));
    }
}
