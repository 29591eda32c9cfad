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
         PRAGMA cache_size=-8192; PRAGMA temp_store=MEMORY; PRAGMA wal_autocheckpoint=16384;",
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

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(backend)?;
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .map_err(backend)
        })
        .await
    }

    async fn get_wrapped_keys(&self, scopes: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let scopes = scopes.to_vec();
        self.read(move |c| {
            let mut st = c
                .prepare_cached("SELECT wrapped FROM wrapped_keys WHERE scope = ?1")
                .map_err(backend)?;
            let mut out = Vec::new();
            for s in scopes {
                let w: Option<Vec<u8>> = st
                    .query_row(params![s], |r| r.get(0))
                    .optional()
                    .map_err(backend)?;
                if let Some(w) = w {
                    out.push((s, w));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn get_wrapped_key(&self, scope: &str) -> Result<Option<Vec<u8>>> {
        let scope = scope.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT wrapped FROM wrapped_keys WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put_wrapped_key_if_absent(
        &self,
        scope: &str,
        wrapped: &[u8],
        now: i64,
    ) -> Result<Vec<u8>> {
        let (scope, wrapped) = (scope.to_owned(), wrapped.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (scope) DO NOTHING",
                params![scope, wrapped, now],
            )
            .map_err(backend)?;
            c.query_row("SELECT wrapped FROM wrapped_keys WHERE scope = ?1", params![scope], |r| r.get(0))
                .map_err(backend)
        })
        .await
    }

    async fn wrapped_key_created(&self, scope: &str) -> Result<Option<i64>> {
        let scope = scope.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT created_at FROM wrapped_keys WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn append_version(
        &self,
        v: NewVersion,
        pre: Precondition,
        audit: Vec<NewAudit>,
    ) -> Result<i64> {
        self.intern([(v.rtype.as_str(), &v.index[..])]).await?;
        let pids = self.pids.pids(&v.rtype, &v.index)?;
        self.write(move |c| {
            let seq = append_one(c, v, pre, &pids)?;
            insert_audit(c, &audit)?;
            Ok(seq)
        })
        .await
    }

    async fn append_versions(
        &self,
        vs: Vec<(NewVersion, Precondition)>,
        audit: Vec<NewAudit>,
    ) -> Result<Vec<i64>> {
        self.intern(vs.iter().map(|(v, _)| (v.rtype.as_str(), &v.index[..])))
            .await?;
        let pids = vs
            .iter()
            .map(|(v, _)| self.pids.pids(&v.rtype, &v.index))
            .collect::<Result<Vec<_>>>()?;
        // One write job: its SAVEPOINT rolls every append back if any fails.
        self.write(move |c| {
            let mut out = Vec::with_capacity(vs.len());
            for ((v, pre), pids) in vs.into_iter().zip(pids) {
                out.push(append_one(c, v, pre, &pids)?);
            }
            insert_audit(c, &audit)?;
            Ok(out)
        })
        .await
    }

    async fn read_current(&self, rtype: &str, id: &str) -> Result<Option<StoredVersion>> {
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {VERSION_COLS} FROM resource_versions WHERE seq = \
                     (SELECT seq FROM resources WHERE rtype = ?1 AND id = ?2)"
                ),
                params![rtype, id],
                row_version,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>> {
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?1 AND id = ?2 AND version = ?3"),
                params![rtype, id, version as i64],
                row_version,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Vec<StoredVersion>> {
        let q = q.clone();
        self.read(move |c| {
            let since = q.since.unwrap_or(i64::MIN);
            let before = q.before_seq.unwrap_or(i64::MAX);
            let limit = q.limit as i64;
            // The key scopes as one parameter whatever their number (NULL:
            // all): newline-delimited, which no scope can contain (`tenant`,
            // `patient:` and a FHIR id).
            let scopes: Option<String> = q.key_scopes.as_ref().map(|k| {
                let mut t = String::from("\n");
                for s in k.iter().filter(|s| !s.contains('\n')) {
                    t.push_str(s);
                    t.push('\n');
                }
                t
            });
            const SCOPED: &str =
                "(?9 IS NULL OR instr(?9, char(10) || key_scope || char(10)) > 0)";
            let (sql, rtype, id) = match &q.scope {
                HistoryScope::System => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE last_updated >= ?1 AND seq < ?2 \
                         AND ?4 IS NULL AND ?5 IS NULL AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    None,
                    None,
                ),
                HistoryScope::Type(t) => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?4 AND last_updated >= ?1 \
                         AND seq < ?2 AND ?5 IS NULL AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    Some(t.clone()),
                    None,
                ),
                HistoryScope::Instance(t, id) => (
                    format!(
                        "SELECT {VERSION_COLS} FROM resource_versions WHERE rtype = ?4 AND id = ?5 \
                         AND last_updated >= ?1 AND seq < ?2 AND {SCOPED} ORDER BY seq DESC LIMIT ?3"
                    ),
                    Some(t.clone()),
                    Some(id.clone()),
                ),
            };
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(
                    rusqlite::named_params! {
                        "?1": since, "?2": before, "?3": limit, "?4": rtype, "?5": id, "?9": scopes,
                    },
                    row_version,
                )
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn list_current(
        &self,
        rtype: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredVersion>> {
        let rtype = rtype.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {} FROM resources r JOIN resource_versions v ON v.seq = r.seq \
                     WHERE r.rtype = ?1 AND r.deleted = 0 AND r.seq < ?2 ORDER BY r.seq DESC LIMIT ?3",
                    prefixed_cols()
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![rtype, before_seq.unwrap_or(i64::MAX), limit as i64], row_version)
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn search(&self, q: &SearchQuery) -> Result<Vec<StoredVersion>> {
        let q = q.clone();
        let ids = self.pids.clone();
        self.read(move |c| {
            let pids = resolve(c, &ids, &q)?;
            let driver = driver(c, &q, &pids)?;
            let (sql, ps) = query::build(
                &q,
                &pids,
                &|n| format!("?{n}"),
                &prefixed_cols(),
                false,
                driver,
            );
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(bind(ps)), row_version)
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn search_count(&self, q: &SearchQuery) -> Result<u64> {
        let q = q.clone();
        let ids = self.pids.clone();
        self.read(move |c| {
            let pids = resolve(c, &ids, &q)?;
            let driver = driver(c, &q, &pids)?;
            let (sql, ps) = query::build(&q, &pids, &|n| format!("?{n}"), "", true, driver);
            c.query_row(&sql, rusqlite::params_from_iter(bind(ps)), |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn set_index(&self, rtype: &str, id: &str, rows: Vec<IndexRow>) -> Result<()> {
        self.intern([(rtype, &rows[..])]).await?;
        let pids = self.pids.pids(rtype, &rows)?;
        let (rtype, id) = (rtype.to_owned(), id.to_owned());
        self.write(move |c| {
            let cur: Option<(i64, bool)> = c
                .query_row(
                    "SELECT seq, deleted FROM resources WHERE rtype = ?1 AND id = ?2",
                    params![rtype, id],
                    |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
                )
                .optional()
                .map_err(backend)?;
            // No such resource: nothing to index. A deleted one keeps none
            // (searches rely on entries naming only live versions).
            match cur {
                Some((seq, false)) => replace_index(c, Some(seq), seq, &pids, &rows),
                Some((seq, true)) => replace_index(c, Some(seq), seq, &[], &[]),
                None => Ok(()),
            }
        })
        .await
    }

    async fn add_client(&self, cl: &ClientRecord) -> Result<()> {
        let cl = cl.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO clients (id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![cl.id, cl.name, cl.scope, cl.jwks, cl.disabled as i64, cl.created_at, cl.redirect_uris.join("\n"), cl.public as i64, cl.first_party as i64],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party FROM clients WHERE id = ?1",
                params![id],
                row_client,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare("SELECT id, name, scope, jwks, disabled, created_at, redirect_uris, public, first_party FROM clients ORDER BY created_at, id")
                .map_err(backend)?;
            let rows = st.query_map([], row_client).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE clients SET disabled = ?1 WHERE id = ?2",
                params![disabled as i64, id],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    async fn add_user(&self, u: &UserRecord) -> Result<()> {
        let u = u.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    u.id,
                    u.username_hash,
                    u.role,
                    u.status,
                    u.sealed,
                    u.rev,
                    u.created_at
                ],
            )
            .map(|_| ())
            .map_err(unique)
        })
        .await
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                params![id],
                row_user,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn find_user(&self, username_hash: &[u8]) -> Result<Option<UserRecord>> {
        let h = username_hash.to_vec();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE username_hash = ?1"),
                params![h],
                row_user,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {USER_COLS} FROM users ORDER BY created_at, id"
                ))
                .map_err(backend)?;
            let rows = st.query_map([], row_user).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn update_user(&self, u: &UserRecord) -> Result<bool> {
        let u = u.clone();
        self.write(move |c| {
            c.execute(
                "UPDATE users SET role = ?1, status = ?2, sealed = ?3, rev = rev + 1 WHERE id = ?4 AND rev = ?5",
                params![u.role, u.status, u.sealed, u.id, u.rev],
            )
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn put_grant(&self, g: &GrantRecord, now: i64) -> Result<()> {
        let g = g.clone();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE expires_at < ?1", params![now])
                .map_err(backend)?;
            c.execute(
                &format!("INSERT INTO grants ({GRANT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    g.kind,
                    g.key_hash,
                    g.family,
                    g.user_id,
                    g.sealed,
                    g.expires_at,
                    g.used_at
                ],
            )
            .map(|_| ())
            .map_err(unique)
        })
        .await
    }

    async fn get_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        now: i64,
    ) -> Result<Option<GrantRecord>> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = ?1 AND key_hash = ?2 AND expires_at > ?3"),
                params![kind, h, now],
                row_grant,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn use_grant(&self, kind: &str, key_hash: &[u8], now: i64) -> Result<GrantUse> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        // One writer thread: the read and the mark cannot interleave with
        // another use of the same grant.
        self.write(move |c| {
            let g = c
                .query_row(
                    &format!("SELECT {GRANT_COLS} FROM grants WHERE kind = ?1 AND key_hash = ?2 AND expires_at > ?3"),
                    params![kind, h, now],
                    row_grant,
                )
                .optional()
                .map_err(backend)?;
            let Some(g) = g else { return Ok(GrantUse::Missing) };
            if g.used_at.is_some() {
                return Ok(GrantUse::Reused(g));
            }
            c.execute(
                "UPDATE grants SET used_at = ?1 WHERE kind = ?2 AND key_hash = ?3",
                params![now, kind, h],
            )
            .map_err(backend)?;
            Ok(GrantUse::Fresh(g))
        })
        .await
    }

    async fn touch_grant(&self, kind: &str, key_hash: &[u8], expires_at: i64) -> Result<()> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.write(move |c| {
            c.execute(
                "UPDATE grants SET expires_at = ?1 WHERE kind = ?2 AND key_hash = ?3",
                params![expires_at, kind, h],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn delete_grant(&self, kind: &str, key_hash: &[u8]) -> Result<bool> {
        let (kind, h) = (kind.to_owned(), key_hash.to_vec());
        self.write(move |c| {
            c.execute(
                "DELETE FROM grants WHERE kind = ?1 AND key_hash = ?2",
                params![kind, h],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    async fn delete_family(&self, family: &str) -> Result<u64> {
        let family = family.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE family = ?1", params![family])
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn delete_user_grants(&self, user_id: &str) -> Result<u64> {
        let user_id = user_id.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM grants WHERE user_id = ?1", params![user_id])
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn add_revocation(&self, kind: &str, key: &str, at: i64) -> Result<i64> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO revocations (kind, key, at) VALUES (?1, ?2, ?3)",
                params![kind, key, at],
            )
            .map_err(backend)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn revocations_since(&self, after: i64, not_before: i64) -> Result<Vec<Revocation>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached("SELECT seq, kind, key, at FROM revocations WHERE seq > ?1 AND at >= ?2 ORDER BY seq")
                .map_err(backend)?;
            let rows = st
                .query_map(params![after, not_before], |r| {
                    Ok(Revocation {
                        seq: r.get(0)?,
                        kind: r.get(1)?,
                        key: r.get(2)?,
                        at: r.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn append_audit(&self, rows: Vec<NewAudit>) -> Result<()> {
        self.write(move |c| insert_audit(c, &rows)).await
    }

    async fn audit_unsealed(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {AUDIT_PENDING_COLS} FROM audit_pending p JOIN audit_log a ON a.id = p.audit_id \
                     WHERE p.audit_id > ?2 ORDER BY p.audit_id LIMIT ?1"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![limit as i64, after], row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_patient_entries(
        &self,
        after: Option<([u8; 8], i64)>,
        limit: u32,
    ) -> Result<Vec<([u8; 8], i64)>> {
        self.read(move |c| {
            let (k, id) = match after {
                Some((k, id)) => (k.to_vec(), id),
                None => (Vec::new(), i64::MIN),
            };
            let mut st = c
                .prepare_cached(
                    "SELECT patient, audit_id FROM audit_patient \
                     WHERE (patient, audit_id) > (?1, ?2) ORDER BY patient, audit_id LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![k, id, limit as i64], |r| {
                    let p: Vec<u8> = r.get(0)?;
                    Ok((query::patient_key(&p), r.get(1)?))
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_queue_clean(&self) -> Result<u64> {
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM audit_pending WHERE audit_id NOT IN (SELECT id FROM audit_log) \
                     OR audit_id IN (SELECT audit_id FROM audit_leaf)",
                    [],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn audit_unqueue(&self, ids: Vec<i64>) -> Result<()> {
        self.write(move |c| {
            let mut st = c
                .prepare_cached("DELETE FROM audit_pending WHERE audit_id = ?1")
                .map_err(backend)?;
            for id in ids {
                st.execute(params![id]).map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_seal(&self, first_index: u64, ids: Vec<i64>, cp: CheckpointRow) -> Result<bool> {
        self.write(move |c| {
            let end: i64 = c
                .query_row(
                    &format!("SELECT {TREE_SIZE}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            if end as u64 != first_index {
                return Ok(false);
            }
            // One statement, not one per record (per-row statements inside
            // the writer's SAVEPOINT grow SQLite's statement journal
            // quadratically: 15,000 records took 13 s). Positions follow
            // arrival (id) order; the single writer commits ids in order,
            // so the pending records up to the last one read are exactly
            // `ids`, which the count confirms (a mismatch rolls back). The
            // records themselves are not touched: a position is a narrow
            // row of its own.
            let Some(&last) = ids.last() else {
                return Ok(false);
            };
            let n = c
                .execute(
                    "INSERT INTO audit_leaf (leaf_index, audit_id) \
                     SELECT ?1 + ROW_NUMBER() OVER (ORDER BY audit_id) - 1, audit_id \
                     FROM audit_pending WHERE audit_id <= ?2",
                    params![first_index as i64, last],
                )
                .map_err(backend)?;
            if n != ids.len() {
                return Err(StoreError::Conflict);
            }
            c.execute(
                "DELETE FROM audit_pending WHERE audit_id <= ?1",
                params![last],
            )
            .map_err(backend)?;
            c.execute(
                "INSERT INTO audit_checkpoints (size, time, note, frontier) VALUES (?1, ?2, ?3, ?4)",
                params![cp.size as i64, cp.time, cp.note, cp.frontier],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
        .or_else(|e| match e {
            StoreError::Conflict | StoreError::Duplicate => Ok(false),
            o => Err(o),
        })
    }

    async fn audit_by_index(&self, from_index: u64, limit: u32) -> Result<Vec<AuditRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {AUDIT_COLS} FROM audit_leaf f JOIN audit_log a ON a.id = f.audit_id \
                     WHERE f.leaf_index >= ?1 ORDER BY f.leaf_index LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![from_index as i64, limit as i64], row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_tree_size(&self) -> Result<u64> {
        self.read(move |c| {
            c.query_row(&format!("SELECT {TREE_SIZE}"), [], |r| {
                Ok(r.get::<_, i64>(0)? as u64)
            })
            .map_err(backend)
        })
        .await
    }

    async fn audit_pending_count(&self) -> Result<u64> {
        self.read(move |c| {
            c.query_row("SELECT COUNT(*) FROM audit_pending", [], |r| {
                Ok(r.get::<_, i64>(0)? as u64)
            })
            .map_err(backend)
        })
        .await
    }

    async fn audit_counts(&self) -> Result<(u64, u64)> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT (SELECT COUNT(*) FROM audit_log), {TREE_SIZE}"),
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(backend)
        })
        .await
    }

    async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<AuditRow>> {
        let q = q.clone();
        self.read(move |c| {
            use rusqlite::types::Value as V;
            let (sql, args) = audit_search_sql(&q, |n| format!("?{n}"));
            let args: Vec<V> = args
                .into_iter()
                .map(|a| match a {
                    AuditArg::Text(t) => V::Text(t),
                    AuditArg::Int(i) => V::Integer(i),
                    AuditArg::Bytes(b) => V::Blob(b),
                    AuditArg::PatientKey(k) => V::Blob(k.to_vec()),
                })
                .collect();
            let mut st = c.prepare_cached(&sql).map_err(backend)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), row_audit)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn audit_get(&self, event_id: &str) -> Result<Option<AuditRow>> {
        let event_id = event_id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {AUDIT_COLS} FROM {AUDIT_FROM} WHERE a.event_id = ?1"),
                params![event_id],
                row_audit,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn checkpoints(&self, after_size: u64, limit: u32) -> Result<Vec<CheckpointRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT size, time, note, frontier FROM audit_checkpoints WHERE size > ?1 ORDER BY size LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![after_size as i64, limit as i64], row_checkpoint)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn latest_checkpoint_and_tree_size(&self) -> Result<(Option<CheckpointRow>, u64)> {
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT c.size, c.time, c.note, c.frontier, {TREE_SIZE} \
                     FROM (SELECT 1) LEFT JOIN \
                     (SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1) c ON 1"
                ),
                [],
                |r| {
                    let size: Option<i64> = r.get(0)?;
                    let cp = match size {
                        Some(_) => Some(row_checkpoint(r)?),
                        None => None,
                    };
                    Ok((cp, r.get::<_, i64>(4)? as u64))
                },
            )
            .map_err(backend)
        })
        .await
    }

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>> {
        self.read(move |c| {
            c.query_row(
                "SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                row_checkpoint,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn audit_prune(&self, before: i64, limit: u32) -> Result<u64> {
        self.write(move |c| {
            // One statement (per-row updates on a table with triggers are
            // quadratic inside the writer's SAVEPOINT; see audit_seal).
            let n = c
                .execute(
                    "UPDATE audit_log SET sealed = x'' WHERE id IN (SELECT a.id FROM audit_log a \
                     WHERE EXISTS (SELECT 1 FROM audit_leaf f WHERE f.audit_id = a.id) \
                     AND a.recorded < ?1 AND length(a.sealed) > 0 ORDER BY a.id LIMIT ?2)",
                    params![before, limit as i64],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn put_break_glass(&self, r: &BreakGlassRecord) -> Result<()> {
        let r = r.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO break_glass (id, user_id, started, expires, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.id, r.user_id, r.started, r.expires, r.sealed],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn break_glass_active(&self, user_id: &str, now: i64) -> Result<Vec<BreakGlassRecord>> {
        let user_id = user_id.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {BREAK_GLASS_COLS} FROM break_glass WHERE user_id = ?1 AND expires > ?2 ORDER BY started"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![user_id, now], row_break_glass)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn break_glass_list(&self, open_only: bool, limit: u32) -> Result<Vec<BreakGlassRecord>> {
        self.read(move |c| {
            let filter = if open_only { "WHERE reviewed_at IS NULL" } else { "" };
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {BREAK_GLASS_COLS} FROM break_glass {filter} ORDER BY started DESC LIMIT ?1"
                ))
                .map_err(backend)?;
            let rows = st
                .query_map(params![limit as i64], row_break_glass)
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn review_break_glass(
        &self,
        id: &str,
        reviewer: &str,
        at: i64,
        sealed_note: &[u8],
    ) -> Result<bool> {
        let (id, reviewer, note) = (id.to_owned(), reviewer.to_owned(), sealed_note.to_vec());
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE break_glass SET reviewed_at = ?2, reviewer = ?3, review_sealed = ?4 WHERE id = ?1 AND reviewed_at IS NULL",
                    params![id, at, reviewer, note],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn use_jti(&self, client_id: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool> {
        let (client_id, jti) = (client_id.to_owned(), jti.to_owned());
        self.write(move |c| {
            c.execute("DELETE FROM used_jti WHERE expires_at < ?1", params![now])
                .map_err(backend)?;
            let n = c
                .execute(
                    "INSERT INTO used_jti (client_id, jti, expires_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    params![client_id, jti, expires_at],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
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
