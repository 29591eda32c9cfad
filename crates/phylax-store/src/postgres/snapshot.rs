//! `SnapshotStore` for PostgreSQL, driven by PostgreSQL's own tools: a
//! `REPEATABLE READ` transaction exports its snapshot, `pg_dump
//! --snapshot` dumps exactly that view (custom format, the instance's
//! schema only) while the facts are read in the same transaction, and
//! `pg_restore --single-transaction` puts a dump back into an empty schema
//! of the same name. The tools get the connection as a libpq conninfo
//! without the password (that goes in `PGPASSWORD`, not on a command line
//! other users can read in `ps`), under the same TLS rule as the server's
//! own connections (`pg_tls`).

use super::{pg, pool_err, row_checkpoint, PgStore};
use crate::snapshot::{leaf, sql, Facts, Pace, Snapshot, SnapshotStore};
use crate::{Result, StoreError};
use async_trait::async_trait;
use std::path::Path;
use tokio_postgres::IsolationLevel;

/// The dump's name inside the snapshot directory.
pub const FILE: &str = "phylax.pgdump";

#[async_trait]
impl SnapshotStore for PgStore {
    async fn snapshot(&self, dir: &Path, max_rate: Option<u64>) -> Result<Snapshot> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let id: String = tx
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(pg)?
            .get(0);
        let schema: String = tx
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg)?
            .try_get(0)
            .map_err(|_| StoreError::Unavailable("no current schema".into()))?;
        let file = dir.join(FILE);
        let (conninfo, password) = crate::pg_tls::libpq(&self.url)?;
        let mut cmd = tokio::process::Command::new("pg_dump");
        cmd.arg("--format=custom")
            // Sealed rows do not compress; the archive is encrypted anyway.
            .arg("--compress=0")
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg("--lock-wait-timeout=60000")
            .arg(format!("--snapshot={id}"))
            .arg(format!("--schema={}", quote_ident(&schema)))
            .arg("--dbname")
            .arg(&conninfo);
        // Both at once: the dump and the facts read the same snapshot,
        // which lives as long as this transaction. The dump comes through
        // a pipe, read at the pace asked for (pg_dump waits on the pipe).
        let (dumped, facts) = tokio::join!(
            dump_to(cmd, password.as_deref(), &file, max_rate),
            facts(&tx)
        );
        dumped?;
        let facts = facts?;
        tx.commit().await.map_err(pg)?;
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::Unavailable(format!("syncing the dump: {e}")))?;
        Ok(Snapshot {
            file,
            facts,
            schema: Some(schema),
        })
    }
}

/// Run pg_dump with its output (custom format) on a pipe, written to
/// `file` at most `max_rate` bytes a second.
async fn dump_to(
    mut cmd: tokio::process::Command,
    password: Option<&str>,
    file: &Path,
    max_rate: Option<u64>,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    cmd.env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let io = |e: std::io::Error| StoreError::Unavailable(format!("pg_dump: {e}"));
    let mut child = cmd.spawn().map_err(|e| {
        StoreError::Unavailable(if e.kind() == std::io::ErrorKind::NotFound {
            "pg_dump is not installed (the PostgreSQL client tools, e.g. apt-get install postgresql-client)".into()
        } else {
            format!("pg_dump: {e}")
        })
    })?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| io(std::io::Error::other("no pipe")))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| io(std::io::Error::other("no pipe")))?;
    let err_text = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut out = tokio::fs::File::create(file).await.map_err(io)?;
    let mut pace = Pace::new(max_rate);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await.map_err(io)?;
        tokio::time::sleep(pace.after(n as u64)).await;
    }
    out.sync_all().await.map_err(io)?;
    let status = child.wait().await.map_err(io)?;
    if !status.success() {
        let err = err_text.await.unwrap_or_default();
        let line = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        return Err(StoreError::Unavailable(format!("pg_dump: {}", line.trim())));
    }
    Ok(())
}

/// `"name"`, as pg_dump's patterns and SQL take an exact identifier.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Run a PostgreSQL tool; its stderr (connection and lock messages, never
/// row data) becomes the error.
async fn run(
    mut cmd: tokio::process::Command,
    password: Option<&str>,
    tool: &str,
) -> Result<Vec<u8>> {
    cmd.env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().await.map_err(|e| {
        StoreError::Unavailable(if e.kind() == std::io::ErrorKind::NotFound {
            format!("{tool} is not installed (the PostgreSQL client tools, e.g. apt-get install postgresql-client)")
        } else {
            format!("{tool}: {e}")
        })
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        return Err(StoreError::Unavailable(format!("{tool}: {}", line.trim())));
    }
    Ok(out.stdout)
}

async fn facts(tx: &tokio_postgres::Transaction<'_>) -> Result<Facts> {
    let count = |q: &'static str| async move {
        tx.query_one(q, &[])
            .await
            .map(|r| r.get::<_, i64>(0) as u64)
            .map_err(pg)
    };
    let mut f = Facts {
        schema_version: tx.query_one(sql::SCHEMA, &[]).await.map_err(pg)?.get(0),
        resources: count(sql::RESOURCES).await?,
        versions: count(sql::VERSIONS).await?,
        audit_records: count(sql::AUDIT).await?,
        checkpoint: tx
            .query_opt(sql::CHECKPOINT, &[])
            .await
            .map_err(pg)?
            .map(|r| row_checkpoint(&r)),
        instance_id: tx
            .query_opt(sql::INSTANCE, &[])
            .await
            .map_err(pg)?
            .map(|r| String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned()),
        ..Facts::default()
    };
    for r in tx.query(sql::LEAVES, &[]).await.map_err(pg)? {
        let i: i64 = r.get(0);
        f.leaves
            .push(leaf(f.leaves.len(), i, r.get::<_, &[u8]>(1))?);
    }
    for r in tx.query(sql::ERASURES, &[]).await.map_err(pg)? {
        f.erasures.push((r.get(0), r.get(1)));
    }
    for r in tx.query(sql::CHECKPOINT_KEYS, &[]).await.map_err(pg)? {
        f.checkpoint_keys.push((r.get(0), r.get(1)));
    }
    for r in tx.query(sql::KEY_HEADS, &[]).await.map_err(pg)? {
        f.key_heads.insert(r.get(0), r.get::<_, i64>(1) as u64);
    }
    Ok(f)
}

/// `pg_restore` a dump of schema `schema` into `url`, whose schema must be
/// `schema` and empty (it is created when missing). One transaction: a
/// failure, or a kill, leaves the schema as it was.
pub(crate) async fn restore_dump(file: &Path, url: &str, schema: &str) -> Result<()> {
    let (cfg, tls) = crate::pg_tls::prepare(url)?;
    let (client, conn) = cfg.connect(tls).await.map_err(pg)?;
    let task = tokio::spawn(conn);
    let current = || async {
        client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg)
            .map(|r| r.get::<_, Option<String>>(0))
    };
    if current().await?.is_none() {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(schema)
            ))
            .await
            .map_err(pg)?;
    }
    match current().await? {
        Some(s) if s == schema => {}
        s => {
            return Err(StoreError::Unavailable(format!(
                "the backup holds PostgreSQL schema {schema}, and the target database's search_path starts with {}: restore into a database where it is {schema} (e.g. add options=-c%20search_path%3D{schema} to the URL)",
                s.as_deref().unwrap_or("no existing schema")
            )))
        }
    }
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await
        .map_err(pg)?
        .get(0);
    drop(client);
    task.abort();
    if tables > 0 {
        return Err(StoreError::Unavailable(format!(
            "schema {schema} of the target database holds {tables} table(s); a restore goes into an empty one, never over data"
        )));
    }
    let (conninfo, password) = crate::pg_tls::libpq(url)?;
    // Every entry but the schema itself, which exists now.
    let mut list = tokio::process::Command::new("pg_restore");
    list.arg("--list").arg(file);
    let toc = run(list, None, "pg_restore").await?;
    let toc = String::from_utf8_lossy(&toc);
    let skip = [
        format!(" SCHEMA - {schema} "),
        format!(" COMMENT - SCHEMA {schema} "),
    ];
    let kept: String = toc
        .lines()
        .filter(|l| !skip.iter().any(|s| format!("{l} ").contains(s.as_str())))
        .map(|l| format!("{l}\n"))
        .collect();
    let list_file = file.with_extension("toc");
    std::fs::write(&list_file, kept)
        .map_err(|e| StoreError::Unavailable(format!("writing the restore list: {e}")))?;
    let mut cmd = tokio::process::Command::new("pg_restore");
    cmd.arg("--single-transaction")
        .arg("--exit-on-error")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--use-list")
        .arg(&list_file)
        .arg("--dbname")
        .arg(&conninfo)
        .arg(file);
    let res = run(cmd, password.as_deref(), "pg_restore").await;
    let _ = std::fs::remove_file(&list_file);
    res.map(|_| ())
}

/// Empty the schema `url` works in (drop it with everything in it, and
/// create it again): a restore drill's scratch copy, thrown away.
pub(crate) async fn empty_schema(url: &str) -> Result<()> {
    let (cfg, tls) = crate::pg_tls::prepare(url)?;
    let (client, conn) = cfg.connect(tls).await.map_err(pg)?;
    let task = tokio::spawn(conn);
    let schema: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await
        .map_err(pg)?
        .get(0);
    if let Some(s) = schema {
        let q = quote_ident(&s);
        client
            .batch_execute(&format!("DROP SCHEMA {q} CASCADE; CREATE SCHEMA {q}"))
            .await
            .map_err(pg)?;
    }
    drop(client);
    task.abort();
    Ok(())
}
