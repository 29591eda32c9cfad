//! The embedded SQLite backend.
//!
//! Durability: WAL mode with `synchronous=FULL`, so a commit is on disk when
//! it returns. Throughput: a single writer thread owns the write connection
//! and **group-commits**: it takes every write queued while the previous
//! commit was syncing, applies each in its own SAVEPOINT (so one failed
//! precondition does not undo its neighbours), commits once, and only then
//! answers each caller. One fsync thus covers many writes, and nothing is
//! acknowledged before it is durable. Reads run on a small pool of
//! connections on blocking threads (WAL readers never block the writer).
//!
//! # Layout
//! One file per storage trait, each `impl … for SqliteStore`:
//! - [`meta`]: `MetaStore`, instance metadata.
//! - [`keys`]: `KeyStore`, wrapped keys.
//! - [`resources`]: `ResourceStore`, versions, the current pointer, the
//!   search index and searches.
//! - [`accounts`]: `AccountStore`, clients and users.
//! - [`grants`]: `GrantStore`, grants, revocations, used assertion ids.
//! - [`audit`]: `AuditStore`, the audit log, sealing queue, checkpoints.
//! - [`break_glass`]: `BreakGlassStore`, emergency access grants.
//! - [`incidents`]: `IncidentStore`, the breach register's steps.
//! - [`snapshot`]: `SnapshotStore`, consistent copies for backups
//!   (the online backup API) and restoring one.
//!
//! This file: opening the database, the writer thread and reader pool, migrations, and the row mapping and SQL helpers the trait files share.

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
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::{oneshot, Semaphore};

/// Upper bound on writes folded into one commit.
const MAX_BATCH: usize = 256;
const READERS: usize = 8;

type Reply = Box<dyn FnOnce(Result<()>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;

pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
    read_permits: Arc<Semaphore>,
    pids: Arc<ParamIds>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Duplicate
        }
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DatabaseBusy
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

/// Readers keep a small page cache. In WAL mode SQLite empties a
/// connection's whole cache at the start of every read transaction that
/// follows any commit, and the cost of emptying grows with the cache's
/// size; with the audit log committing on every read, a 64 MiB reader
/// cache cost more to clear than it saved (13% of CPU in `perf`). The OS
/// page cache still holds the hot pages.
const READER_PRAGMAS: &str = "PRAGMA cache_size=-2048;";

fn open_conn(path: &Path) -> Result<Connection> {
    let c = Connection::open(path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; \
         PRAGMA busy_timeout=10000; PRAGMA secure_delete=ON; \
         PRAGMA cache_size=-8192; PRAGMA temp_store=MEMORY; PRAGMA wal_autocheckpoint=16384; \
         PRAGMA journal_size_limit=268435456;",
    )
    .map_err(backend)?;
    Ok(c)
}

fn migrate(c: &mut Connection) -> Result<()> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(backend)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(backend)?;
    migrations::refuse_newer(current, migrations::SQLITE)?;
    for (v, sql) in migrations::SQLITE.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql).map_err(backend)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, strftime('%s','now'))",
            params![v],
        )
        .map_err(backend)?;
    }
    tx.commit().map_err(backend)
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Nothing ran. Dropping the jobs drops their reply channels, and
            // every caller sees `Unavailable`: nothing is acknowledged.
            tracing::error!(error = %e, "sqlite: cannot begin write transaction");
            drop(jobs);
            continue;
        }
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push(job(&conn));
        }
        match conn.execute_batch("COMMIT") {
            Ok(()) => replies.into_iter().for_each(|r| r(Ok(()))),
            Err(e) => {
                let msg = backend(e).to_string();
                let _ = conn.execute_batch("ROLLBACK");
                replies
                    .into_iter()
                    .for_each(|r| r(Err(StoreError::Unavailable(msg.clone()))));
            }
        }
    }
}

fn row_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredVersion> {
    Ok(StoredVersion {
        seq: r.get(0)?,
        rtype: r.get(1)?,
        id: r.get(2)?,
        version: r.get::<_, i64>(3)? as u64,
        last_updated: r.get(4)?,
        deleted: r.get::<_, i64>(5)? != 0,
        key_scope: r.get(6)?,
        sealed: r.get(7)?,
    })
}

/// Append a version; `pids` are the numbers of `v.index`'s parameters.
fn append_one(c: &Connection, v: NewVersion, pre: Precondition, pids: &[i32]) -> Result<i64> {
    let found: Option<(i64, i64)> = c
        .query_row(
            "SELECT version, seq FROM resources WHERE rtype = ?1 AND id = ?2",
            params![v.rtype, v.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(backend)?;
    let current = found.map(|(version, _)| version);
    // A deleted id keeps its row (tombstone), so ids are never reused
    // with version 1 again; `Absent` means never used.
    let ok = match (pre, current) {
        (Precondition::Absent, None) => v.version == 1,
        (Precondition::CurrentIs(n), Some(cur)) => cur as u64 == n && v.version == n + 1,
        _ => false,
    };
    if !ok {
        return Err(StoreError::Conflict);
    }
    c.execute(
            "INSERT INTO resource_versions (rtype, id, version, last_updated, deleted, key_scope, body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![v.rtype, v.id, v.version as i64, v.last_updated, v.deleted as i64, v.key_scope, v.sealed],
        )
        .map_err(|e| match backend(e) {
            StoreError::Duplicate => StoreError::Conflict,
            o => o,
        })?;
    let seq = c.last_insert_rowid();
    c.execute(
            "INSERT INTO resources (rtype, id, version, seq, deleted) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version, seq = excluded.seq, deleted = excluded.deleted",
            params![v.rtype, v.id, v.version as i64, seq, v.deleted as i64],
        )
        .map_err(backend)?;
    let rows = if v.deleted { &[][..] } else { &v.index[..] };
    replace_index(c, found.map(|(_, old)| old), seq, pids, rows)?;
    Ok(seq)
}

const VERSION_COLS: &str = "seq, rtype, id, version, last_updated, deleted, key_scope, body";

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and apply migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let p2 = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let mut c = open_conn(&p2)?;
            migrate(&mut c)?;
            Ok(c)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))??;
        let pids = Arc::new(ParamIds::default());
        let known = {
            let mut st = conn
                .prepare("SELECT pid, rtype, param FROM search_params")
                .map_err(backend)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?
        };
        for (pid, rtype, param) in known {
            pids.insert(&rtype, &param, pid);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("phylax-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(SqliteStore {
            path,
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            read_permits: Arc::new(Semaphore::new(READERS)),
            pids,
        })
    }

    /// Give every parameter of these versions' entries a number, each in
    /// its own committed write before the entries that use it (see
    /// `params`: a number is cached only once committed).
    async fn intern<'a>(
        &self,
        versions: impl IntoIterator<Item = (&'a str, &'a [IndexRow])>,
    ) -> Result<()> {
        let missing = self.pids.missing(versions);
        if missing.is_empty() {
            return Ok(());
        }
        let got = self
            .write(move |c| {
                let mut out = Vec::with_capacity(missing.len());
                for (rtype, param) in missing {
                    c.execute(
                        "INSERT INTO search_params (rtype, param) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                        params![rtype, param],
                    )
                    .map_err(backend)?;
                    let pid: i32 = c
                        .query_row(
                            "SELECT pid FROM search_params WHERE rtype = ?1 AND param = ?2",
                            params![rtype, param],
                            |r| r.get(0),
                        )
                        .map_err(backend)?;
                    out.push((rtype, param, pid));
                }
                Ok(out)
            })
            .await?;
        // Committed: `write` answers only after the commit is durable.
        for (rtype, param, pid) in got {
            self.pids.insert(&rtype, &param, pid);
        }
        Ok(())
    }

    /// Run `f` inside the next group commit; its result is delivered only
    /// after the commit is durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn: &Connection| -> Reply {
            let res = match conn.execute_batch("SAVEPOINT w") {
                Err(e) => Err(backend(e)),
                Ok(()) => {
                    let r = f(conn);
                    let end = if r.is_ok() {
                        "RELEASE w"
                    } else {
                        "ROLLBACK TO w; RELEASE w"
                    };
                    match conn.execute_batch(end) {
                        Ok(()) => r,
                        Err(e) => Err(backend(e)),
                    }
                }
            };
            Box::new(move |commit: Result<()>| {
                let out = match commit {
                    Ok(()) => res,
                    Err(e) => Err(e),
                };
                let _ = tx.send(out);
            })
        });
        self.writer
            .send(job)
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("write was not committed".into()))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let _permit = self
            .read_permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("closed".into()))?;
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match readers.lock().pop() {
                Some(c) => c,
                None => {
                    let c = open_conn(&path)?;
                    c.execute_batch(READER_PRAGMAS).map_err(backend)?;
                    c
                }
            };
            let r = f(&conn);
            readers.lock().push(conn);
            r
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

use crate::query::{
    audit_search_sql, AuditArg, AUDIT_COLS, AUDIT_FROM, AUDIT_PENDING_COLS, TREE_SIZE,
};

fn row_audit(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        leaf_index: r.get::<_, Option<i64>>(1)?.map(|i| i as u64),
        event_id: r.get(2)?,
        recorded: r.get(3)?,
        agent: r.get(4)?,
        action: r.get(5)?,
        subtype: r.get(6)?,
        outcome: r.get(7)?,
        leaf_hash: r.get(8)?,
        sealed: r.get(9)?,
    })
}

fn row_checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        size: r.get::<_, i64>(0)? as u64,
        time: r.get(1)?,
        note: r.get(2)?,
        frontier: r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default(),
    })
}

/// Insert audit records inside the caller's transaction. Any failure is
/// `Unavailable` (never `Conflict`/`Duplicate`, which callers treat as a
/// retryable precondition): the audit log refused, so nothing may commit.
fn insert_audit(c: &Connection, rows: &[NewAudit]) -> Result<()> {
    let unavailable = |e: rusqlite::Error| StoreError::Unavailable(format!("audit log: {e}"));
    let mut st = c
        .prepare_cached(
            "INSERT INTO audit_log (event_id, recorded, agent, action, subtype, outcome, leaf_hash, sealed) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(unavailable)?;
    let mut pt = c
        .prepare_cached(
            "INSERT INTO audit_patient (patient, audit_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )
        .map_err(unavailable)?;
    // Waiting for a tree position (the sealer's queue).
    let mut pend = c
        .prepare_cached("INSERT INTO audit_pending (audit_id) VALUES (?1)")
        .map_err(unavailable)?;
    for a in rows {
        st.execute(params![
            a.event_id,
            a.recorded,
            a.agent,
            a.action,
            a.subtype,
            a.outcome,
            a.leaf_hash,
            a.sealed
        ])
        .map_err(unavailable)?;
        let id = c.last_insert_rowid();
        pend.execute(params![id]).map_err(unavailable)?;
        // Keyed by the hash's first 8 bytes (`query::patient_key`); two
        // patients of one record whose keys collide share an entry.
        for p in &a.patients {
            pt.execute(params![&crate::query::patient_key(p)[..], id])
                .map_err(unavailable)?;
        }
    }
    Ok(())
}

/// Rows per multi-row INSERT when replacing index entries.
const INDEX_CHUNK: usize = 64;

/// Replace a resource's index entries (inside the caller's transaction):
/// those filed under `old` (the version being superseded; `None` for a
/// first version, which has none) by `rows` under `seq`, the new current
/// version. `pids[i]` is `rows[i]`'s parameter number.
fn replace_index(
    c: &Connection,
    old: Option<i64>,
    seq: i64,
    pids: &[i32],
    rows: &[IndexRow],
) -> Result<()> {
    use rusqlite::types::Value as V;
    if let Some(old) = old {
        c.prepare_cached("DELETE FROM search_entries WHERE seq = ?1")
            .and_then(|mut st| st.execute(params![old]))
            .map_err(backend)?;
    }
    for (chunk, pids) in rows.chunks(INDEX_CHUNK).zip(pids.chunks(INDEX_CHUNK)) {
        let placeholders = (0..chunk.len())
            .map(|i| {
                let b = i * 5 + 2;
                format!(
                    "(?1, ?{}, ?{}, ?{}, ?{}, ?{})",
                    b,
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO search_entries (seq, pid, hash, lo, hi, num) VALUES {placeholders}"
        );
        let mut vals: Vec<V> = vec![V::Integer(seq)];
        for (r, pid) in chunk.iter().zip(pids) {
            vals.push(V::Integer(i64::from(*pid)));
            vals.push(r.hash.clone().map_or(V::Null, V::Blob));
            vals.push(r.lo.map_or(V::Null, V::Integer));
            vals.push(r.hi.map_or(V::Null, V::Integer));
            vals.push(r.num.map_or(V::Null, V::Real));
        }
        let mut st = c.prepare_cached(&sql).map_err(backend)?;
        st.execute(rusqlite::params_from_iter(vals))
            .map_err(backend)?;
    }
    Ok(())
}

/// The numbers of a query's parameters: from the cache, else from the
/// table (another process may have registered one since this store
/// opened); a parameter never registered has no entries (`UNKNOWN`).
fn resolve(c: &Connection, ids: &ParamIds, q: &SearchQuery) -> Result<Pids> {
    let mut out = Pids::new();
    for p in params::query_params(q) {
        let pid = match ids.get(&q.rtype, &p) {
            Some(pid) => pid,
            None => {
                let found: Option<i32> = c
                    .prepare_cached("SELECT pid FROM search_params WHERE rtype = ?1 AND param = ?2")
                    .and_then(|mut st| st.query_row(params![q.rtype, p], |r| r.get(0)).optional())
                    .map_err(backend)?;
                match found {
                    // Visible to this reader, so committed.
                    Some(pid) => {
                        ids.insert(&q.rtype, &p, pid);
                        pid
                    }
                    None => params::UNKNOWN,
                }
            }
        };
        out.insert(p, pid);
    }
    Ok(out)
}

/// Which condition group drives a search (see `query::plan`).
fn driver(c: &Connection, q: &SearchQuery, pids: &Pids) -> Result<Option<usize>> {
    match query::plan(q, pids, &|n| format!("?{n}")) {
        Plan::Lists => Ok(None),
        Plan::Driver(i) => Ok(Some(i)),
        Plan::Probe {
            sql,
            params,
            candidates,
        } => {
            let counts: Vec<i64> = c
                .query_row(&sql, rusqlite::params_from_iter(bind(params)), |r| {
                    (0..candidates.len()).map(|k| r.get(k)).collect()
                })
                .map_err(backend)?;
            Ok(query::driver_from_counts(&candidates, &counts))
        }
    }
}

fn bind(p: Vec<P>) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    p.into_iter()
        .map(|p| match p {
            P::T(t) => V::Text(t),
            P::B(b) => V::Blob(b),
            P::I(i) => V::Integer(i),
            P::I32(i) => V::Integer(i64::from(i)),
            P::F(f) => V::Real(f),
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

fn row_client(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        scope: r.get(2)?,
        jwks: r.get(3)?,
        disabled: r.get::<_, i64>(4)? != 0,
        created_at: r.get(5)?,
        redirect_uris: crate::split_uris(&r.get::<_, String>(6)?),
        public: r.get::<_, i64>(7)? != 0,
        first_party: r.get::<_, i64>(8)? != 0,
        cert_bound: r.get::<_, i64>(9)? != 0,
    })
}

const USER_COLS: &str = "id, username_hash, role, status, sealed, rev, created_at";

fn row_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: r.get(0)?,
        username_hash: r.get(1)?,
        role: r.get(2)?,
        status: r.get(3)?,
        sealed: r.get(4)?,
        rev: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const GRANT_COLS: &str = "kind, key_hash, family, user_id, sealed, expires_at, used_at";

fn row_grant(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    Ok(GrantRecord {
        kind: r.get(0)?,
        key_hash: r.get(1)?,
        family: r.get(2)?,
        user_id: r.get(3)?,
        sealed: r.get(4)?,
        expires_at: r.get(5)?,
        used_at: r.get(6)?,
    })
}

fn unique(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Duplicate
        }
        _ => backend(e),
    }
}

const BREAK_GLASS_COLS: &str =
    "id, user_id, started, expires, sealed, reviewed_at, reviewer, review_sealed";

fn row_break_glass(r: &rusqlite::Row<'_>) -> rusqlite::Result<BreakGlassRecord> {
    Ok(BreakGlassRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        started: r.get(2)?,
        expires: r.get(3)?,
        sealed: r.get(4)?,
        reviewed_at: r.get(5)?,
        reviewer: r.get(6)?,
        review_sealed: r.get(7)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::query::{Cond, RangeOp};

    /// SQLite's plan for a query: one line per step.
    fn plan_of(c: &Connection, q: &SearchQuery, pids: &Pids, driver: Option<usize>) -> String {
        let (sql, ps) = query::build(
            q,
            pids,
            &|n| format!("?{n}"),
            &prefixed_cols(),
            false,
            driver,
        );
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = st
            .query_map(rusqlite::params_from_iter(bind(ps)), |r| {
                r.get::<_, String>(3)
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    }

    /// Selective searches are index lookups from end to end: the driving
    /// group comes from the hash index alone, each candidate version is
    /// read by its `seq` (no `resources` lookup: entries name only live
    /// versions), every other condition is a point probe of that
    /// candidate's entries, and nothing is scanned. The planner statistics
    /// are fixed (migrations 3 and 10), so this plan is the one every
    /// database gets, whatever its size.
    #[test]
    fn selective_searches_are_driven_from_the_hash_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut c = open_conn(&path).unwrap();
        migrate(&mut c).unwrap();
        drop(c);
        // A new connection reads the statistics the migrations wrote.
        let c = open_conn(&path).unwrap();
        let pids: Pids = [("family", 1), ("subject", 2), ("code", 3), ("date", 4)]
            .map(|(p, n)| (p.to_owned(), n))
            .into();
        let hash = |p: &str| Cond::Hash {
            param: p.into(),
            hashes: vec![vec![1; 16]],
        };
        let family = SearchQuery {
            rtype: "Patient".into(),
            and: vec![vec![hash("family")]],
            before_seq: None,
            limit: 20,
        };
        let plan = plan_of(&c, &family, &pids, Some(0));
        assert!(
            plan.contains("SEARCH i USING COVERING INDEX search_entries_hash (pid=? AND hash=?)")
                && plan.contains("SEARCH v USING INTEGER PRIMARY KEY (rowid=?)")
                && !plan.contains("SCAN")
                && !plan.contains("resources"),
            "{plan}"
        );
        let weights = SearchQuery {
            rtype: "Observation".into(),
            and: vec![
                vec![hash("subject")],
                vec![hash("code")],
                vec![Cond::Range {
                    param: "date".into(),
                    op: RangeOp::Lt,
                    lo: 1,
                    hi: 2,
                    hashes: None,
                }],
            ],
            before_seq: None,
            limit: 20,
        };
        let plan = plan_of(&c, &weights, &pids, Some(0));
        assert!(
            plan.contains(
                "SEARCH i USING COVERING INDEX search_entries_hash (pid=? AND hash=? AND seq=?)"
            ) && plan.contains("SEARCH i USING INDEX search_entries_seq (seq=? AND pid=?)")
                && plan.contains("SEARCH v USING INTEGER PRIMARY KEY (rowid=?)")
                && !plan.contains("SCAN")
                && !plan.contains("resources"),
            "{plan}"
        );
        // An `_id` list drives through `resources` (keyed by id), probing
        // the other conditions of each.
        let by_id = SearchQuery {
            rtype: "Patient".into(),
            and: vec![
                vec![Cond::Ids(vec!["a".into(), "b".into()])],
                vec![hash("family")],
            ],
            before_seq: None,
            limit: 20,
        };
        let plan = plan_of(&c, &by_id, &pids, Some(0));
        assert!(
            plan.contains("SEARCH r USING INDEX sqlite_autoindex_resources_1 (rtype=? AND id=?)")
                && !plan.contains("SCAN"),
            "{plan}"
        );
    }
}
