//! The audit journal: where the records of reads, searches and security
//! events become durable before their responses leave, cheaply.
//!
//! Committing each small batch of records straight into the database cost
//! more than the reads themselves (B-tree pages of six indexes copied into
//! the WAL per batch, page-cache churn: docs/PERFORMANCE.md). A running
//! server instead appends each group-committed batch to a local file, one
//! `fdatasync` per batch (sequential writes), and answers; an indexer moves
//! the file's records into the audit tables in one transaction every
//! [`INDEX_EVERY`], where they are searched, sealed into the Merkle tree and
//! exported as before. Writes still commit their records inside their own
//! transaction.
//!
//! - **Durability**: a record is acknowledged only after its batch is on
//!   disk. A crash loses nothing acknowledged: the next start (of this node
//!   or any node sharing the data directory) moves leftover journal files
//!   into the database. A torn last batch was never acknowledged and is
//!   ignored; each frame carries a checksum.
//! - **Fail closed**: a journal that cannot be written (full disk) fails the
//!   request with 503, as the database writer did. If the database is down,
//!   records wait on disk and the indexer retries.
//! - **Nodes**: each server process has its own directory under
//!   `DIR/audit-journal/`, locked while it runs; a start moves the files of
//!   unlocked (dead) directories. Replays are idempotent (event ids are
//!   unique; already stored records are skipped).
//! - **Visibility**: journal records reach the searchable tables within
//!   [`INDEX_EVERY`]; the AuditEvent API flushes first, so a reader sees
//!   every record acknowledged before its request.

use phylax_audit::merkle::sha256;
use phylax_store::{DynStore, NewAudit};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often journal records move into the database.
pub const INDEX_EVERY: Duration = Duration::from_millis(50);

/// Most records in one appended batch.
const BATCH_MAX: usize = 4096;

/// Longest a batch waits for records that are on their way (see
/// [`Ticket`]) before it is synced anyway.
const GATHER_MAX: Duration = Duration::from_millis(1);

const MAGIC: &[u8; 4] = b"PXJ1";
const CURRENT: &str = "current.log";
const LOCK: &str = "lock";

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Cmd {
    Append(Box<NewAudit>, Reply<()>),
    /// Close the current file as a segment (if it has records) and start
    /// a new one; answers with the segment's path.
    Rotate(Reply<Option<PathBuf>>),
    /// A [`Ticket`] was dropped without a record: re-check the wait.
    Nudge,
}

/// A running node's journal.
pub struct Journal {
    tx: smpsc::Sender<Cmd>,
    /// Requests that will append a record soon (their [`Ticket`]s).
    coming: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    dir: PathBuf,
    store: DynStore,
    /// One indexing pass at a time.
    indexing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn put(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// One record as a checksummed frame.
pub fn encode(r: &NewAudit) -> Vec<u8> {
    let mut p = Vec::with_capacity(r.sealed.len() + 256);
    put(&mut p, r.event_id.as_bytes());
    p.extend_from_slice(&r.recorded.to_le_bytes());
    for s in [&r.agent, &r.action, &r.subtype, &r.outcome] {
        put(&mut p, s.as_bytes());
    }
    put(&mut p, &r.leaf_hash);
    put(&mut p, &r.sealed);
    p.extend_from_slice(&(r.patients.len() as u32).to_le_bytes());
    for h in &r.patients {
        put(&mut p, h);
    }
    let mut out = Vec::with_capacity(p.len() + 24);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&p);
    out.extend_from_slice(&sha256(&p)[..16]);
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

fn decode_payload(p: &[u8]) -> Option<NewAudit> {
    let mut c = Cursor(p);
    let event_id = c.text()?;
    let recorded = i64::from_le_bytes(c.take(8)?.try_into().ok()?);
    let agent = c.text()?;
    let action = c.text()?;
    let subtype = c.text()?;
    let outcome = c.text()?;
    let leaf_hash = c.bytes()?;
    let sealed = c.bytes()?;
    let n = c.u32()? as usize;
    let mut patients = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        patients.push(c.bytes()?);
    }
    c.0.is_empty().then_some(NewAudit {
        event_id,
        recorded,
        agent,
        action,
        subtype,
        outcome,
        patients,
        leaf_hash,
        sealed,
    })
}

/// Every whole, intact frame of a journal file, in order. Decoding stops
/// at the first torn or corrupt frame: a batch is acknowledged only after
/// it is synced, so anything after it was never acknowledged.
pub fn decode(mut b: &[u8]) -> Vec<NewAudit> {
    let mut out = Vec::new();
    loop {
        if b.len() < 8 || &b[..4] != MAGIC {
            return out;
        }
        let n = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let Some(frame) = b.get(8..8 + n + 16) else {
            return out;
        };
        let (payload, sum) = frame.split_at(n);
        if sha256(payload)[..16] != *sum {
            return out;
        }
        match decode_payload(payload) {
            Some(r) => out.push(r),
            None => return out,
        }
        b = &b[8 + n + 16..];
    }
}

fn open_current(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(CURRENT))
}

fn sync_dir(dir: &Path) {
    // Makes renames and new files durable; failure only risks a replay,
    // which is idempotent.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The synced file must still be the journal's current file: records
/// written into a file whose directory was deleted, moved or unmounted
/// would be lost to recovery, so that is a failure (503), not a success.
fn still_there(dir: &Path, f: &File) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let open = f.metadata().map_err(|e| e.to_string())?;
    match std::fs::metadata(dir.join(CURRENT)) {
        Ok(m) if m.ino() == open.ino() && m.dev() == open.dev() => Ok(()),
        _ => Err("the audit journal file is gone from its directory".into()),
    }
}

/// A request's promise that it will append a record soon: the writer
/// holds a batch's sync back (at most [`GATHER_MAX`]) while such requests
/// are still working, so that one sync covers them too. Redeemed (the count
/// falls) just before the record is sent; dropped unredeemed when the
/// request ends without one, which wakes a waiting writer.
///
/// Why: a sync costs the disk's flush latency and, on a virtual machine,
/// about 0.1 ms of CPU (the exit to the hypervisor). Under load, syncing
/// whatever has arrived at once made batches of about three records and
/// spent a tenth of the machine's CPU on syncs. Like PostgreSQL's
/// `commit_delay` with `commit_siblings`, the wait only happens when other
/// requests are in flight: a lone request is synced at once.
#[derive(Debug)]
pub struct Ticket(Option<(Arc<AtomicUsize>, smpsc::Sender<Cmd>)>);

impl Ticket {
    /// A ticket that holds nothing back (no journal).
    pub fn none() -> Ticket {
        Ticket(None)
    }

    /// The record is about to be appended (its arrival wakes the writer).
    pub fn redeem(mut self) {
        if let Some((c, _)) = self.0.take() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // No record after all: tell a waiting writer not to wait for it.
        if let Some((c, tx)) = self.0.take() {
            c.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(Cmd::Nudge);
        }
    }
}

/// What the writer has done since the start (for `/metrics`: records per
/// sync is how well the group commit works).
#[derive(Debug, Default)]
pub struct Stats {
    pub syncs: AtomicU64,
    pub records: AtomicU64,
}

/// The writer thread: appends batches, one sync each.
fn writer(
    dir: PathBuf,
    rx: smpsc::Receiver<Cmd>,
    coming: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    gather: Duration,
) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The open current file and how many bytes of it are acknowledged.
    let mut file: Option<(File, u64)> = None;
    let mut seq: u64 = 0;
    let reopen = |dir: &Path| -> Option<(File, u64)> {
        let f = open_current(dir).ok()?;
        let len = f.metadata().ok()?.len();
        Some((f, len))
    };
    while let Ok(first) = rx.recv() {
        let mut cmds = vec![first];
        while cmds.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        // Group commit: while more requests are about to append than the
        // machine has cores, wait for them (bounded) so that one sync
        // covers them too. The last few are left to work while the sync
        // runs, rather than idling every core during it.
        let until = Instant::now() + gather;
        while cmds.len() < BATCH_MAX && coming.load(Ordering::Acquire) > cores {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        let mut buf = Vec::new();
        let mut replies = Vec::new();
        let mut rotations = Vec::new();
        for c in cmds {
            match c {
                Cmd::Append(r, reply) => {
                    buf.extend_from_slice(&encode(&r));
                    replies.push(reply);
                }
                Cmd::Rotate(reply) => rotations.push(reply),
                Cmd::Nudge => {}
            }
        }
        if !replies.is_empty() {
            if file.is_none() {
                file = reopen(&dir);
            }
            let res = match file.as_mut() {
                Some((f, _)) => f
                    .write_all(&buf)
                    .and_then(|()| f.sync_data())
                    .map_err(|e| e.to_string())
                    .and_then(|()| still_there(&dir, f)),
                None => Err("audit journal not open".to_owned()),
            };
            match &res {
                Ok(()) => {
                    if let Some((_, len)) = file.as_mut() {
                        *len += buf.len() as u64;
                    }
                    stats.syncs.fetch_add(1, Ordering::Relaxed);
                    stats
                        .records
                        .fetch_add(replies.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(event = "audit.journal_failed", error = %e, "audit records could not be journaled");
                    // Cut the failed batch off (its requests get 503: no
                    // record may claim they were served), then reopen on
                    // the next batch.
                    if let Some((f, len)) = file.take() {
                        let _ = f.set_len(len);
                        let _ = f.sync_data();
                    }
                }
            }
            for r in replies {
                let _ = r.send(res.clone());
            }
        }
        for reply in rotations {
            if file.is_none() {
                file = reopen(&dir);
            }
            let res = match &file {
                None | Some((_, 0)) => Ok(None),
                Some(_) => {
                    seq += 1;
                    let seg = dir.join(format!("seg-{:020}-{seq}.log", crate::now_ms()));
                    match std::fs::rename(dir.join(CURRENT), &seg) {
                        Ok(()) => {
                            file = reopen(&dir);
                            sync_dir(&dir);
                            Ok(Some(seg))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            let _ = reply.send(res);
        }
    }
}

/// Journal segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".log"))
        })
        .collect();
    v.sort();
    v
}

/// Move one segment's records into the database, then delete it.
async fn index_file(store: &DynStore, path: &Path) -> Result<usize, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    let rows = decode(&bytes);
    let n = rows.len();
    if !rows.is_empty() {
        if let Err(first) = store.append_audit(rows).await {
            // A replay after a crash between commit and delete: skip what
            // is already stored, then try once more. (Decoded again rather
            // than cloned up front: this is the rare path.)
            let mut fresh = Vec::with_capacity(n);
            for r in decode(&bytes) {
                match store.audit_get(&r.event_id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => fresh.push(r),
                    Err(_) => return Err(first.to_string()),
                }
            }
            if !fresh.is_empty() {
                store.append_audit(fresh).await.map_err(|e| e.to_string())?;
            }
        }
    }
    std::fs::remove_file(path).map_err(|e| e.to_string())?;
    Ok(n)
}

impl Journal {
    /// Open this node's journal under `root` (created), first moving the
    /// records of any dead node's journal into the database.
    pub async fn open(root: &Path, store: DynStore) -> Result<Arc<Journal>, String> {
        Journal::open_with(root, store, GATHER_MAX).await
    }

    /// [`Journal::open`] with another longest wait for announced records.
    async fn open_with(
        root: &Path,
        store: DynStore,
        gather: Duration,
    ) -> Result<Arc<Journal>, String> {
        std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
        let dir = root.join(uuid::Uuid::new_v4().to_string());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let lock = File::create(dir.join(LOCK)).map_err(|e| e.to_string())?;
        lock.try_lock().map_err(|e| e.to_string())?;
        recover(root, &dir, &store).await?;
        let (tx, rx) = smpsc::channel();
        let wdir = dir.clone();
        let coming = Arc::new(AtomicUsize::new(0));
        let wcoming = coming.clone();
        let stats = Arc::new(Stats::default());
        let wstats = stats.clone();
        std::thread::Builder::new()
            .name("audit-journal".into())
            .spawn(move || {
                // Held for the writer's life: other nodes see this
                // directory as live.
                let _lock = lock;
                writer(wdir, rx, wcoming, wstats, gather)
            })
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Journal {
            tx,
            coming,
            stats,
            dir,
            store,
            indexing: tokio::sync::Mutex::new(()),
        }))
    }

    /// Syncs and records appended since the start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.syncs.load(Ordering::Relaxed),
            self.stats.records.load(Ordering::Relaxed),
        )
    }

    /// Announce a record that will be appended soon (see [`Ticket`]).
    pub fn ticket(&self) -> Ticket {
        self.coming.fetch_add(1, Ordering::AcqRel);
        Ticket(Some((self.coming.clone(), self.tx.clone())))
    }

    /// Append one record; `Ok` once its batch is on disk.
    pub async fn append(&self, r: NewAudit) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append(Box::new(r), tx))
            .map_err(|_| "audit journal stopped".to_owned())?;
        rx.await.map_err(|_| "audit journal stopped".to_owned())?
    }

    /// Move every journaled record into the database now. Returns how many.
    pub async fn flush(&self) -> Result<usize, String> {
        let _one = self.indexing.lock().await;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Rotate(tx))
            .map_err(|_| "audit journal stopped".to_owned())?;
        rx.await.map_err(|_| "audit journal stopped".to_owned())??;
        let mut n = 0;
        for seg in segments(&self.dir) {
            n += index_file(&self.store, &seg).await?;
        }
        Ok(n)
    }

    /// Flush every [`INDEX_EVERY`] while the journal is alive.
    pub fn spawn_indexer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INDEX_EVERY).await;
                let Some(j) = weak.upgrade() else { return };
                if let Err(e) = j.flush().await {
                    tracing::error!(event = "audit.index_failed", error = %e, "journaled audit records not yet in the database; retrying");
                }
            }
        });
    }
}

/// Move the records of dead nodes' journals (directories whose lock is
/// free) into the database and remove those directories.
async fn recover(root: &Path, own: &Path, store: &DynStore) -> Result<(), String> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p != own)
        .collect();
    for d in dirs {
        let Ok(lock) = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(d.join(LOCK))
        else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // a live node
        }
        let cur = d.join(CURRENT);
        if cur.exists() {
            let seg = d.join(format!("seg-{:020}-recovered.log", crate::now_ms()));
            std::fs::rename(&cur, &seg).map_err(|e| e.to_string())?;
        }
        let mut n = 0;
        for seg in segments(&d) {
            n += index_file(store, &seg).await?;
        }
        drop(lock);
        let _ = std::fs::remove_dir_all(&d);
        if n > 0 {
            tracing::info!(
                records = n,
                "audit records recovered from a stopped node's journal"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u8) -> NewAudit {
        NewAudit {
            event_id: format!("e{i}"),
            recorded: 1_700_000_000_000 + i64::from(i),
            agent: "user:u".into(),
            action: "R".into(),
            subtype: "read".into(),
            outcome: "0".into(),
            patients: vec![vec![i; 32], vec![1, 2]],
            leaf_hash: vec![i; 32],
            sealed: vec![i; 100 + usize::from(i)],
        }
    }

    async fn journal(gather: Duration) -> (tempfile::TempDir, Arc<Journal>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
        let store = phylax_store::open(&url).await.unwrap();
        let j = Journal::open_with(&dir.path().join("journal"), store, gather)
            .await
            .unwrap();
        (dir, j)
    }

    /// Records of requests that announced themselves share syncs. They
    /// arrive 20 ms apart, far longer than a sync takes: without the wait,
    /// each would have its own. (The wait is stretched to 5 s here so that
    /// a loaded machine cannot outlast it.) Requests still working beyond
    /// the machine's core count are simulated by `cores` tickets held
    /// throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announced_records_share_a_sync() {
        let (_d, j) = journal(Duration::from_secs(5)).await;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let held: Vec<Ticket> = (0..cores).map(|_| j.ticket()).collect();
        let n = 8u8;
        let tickets: Vec<Ticket> = (0..n).map(|_| j.ticket()).collect();
        let mut tasks = Vec::new();
        for (i, t) in tickets.into_iter().enumerate() {
            let j = j.clone();
            let rt = tokio::runtime::Handle::current();
            tasks.push(tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(20 * i as u64));
                t.redeem();
                rt.block_on(j.append(rec(i as u8)))
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(held);
        let (syncs, records) = j.stats();
        assert_eq!(records, u64::from(n));
        assert!(syncs <= 2, "{syncs} syncs for {records} records");
        assert_eq!(j.flush().await.unwrap(), usize::from(n));
    }

    /// The wait is bounded, and tickets dropped without a record (a write
    /// commits its own) do not hold anyone back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outstanding_tickets_never_stall_a_record() {
        let (_d, j) = journal(GATHER_MAX).await;
        let held: Vec<Ticket> = (0..16).map(|_| j.ticket()).collect();
        let t0 = Instant::now();
        j.append(rec(1)).await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        let dropped: Vec<Ticket> = (0..16).map(|_| j.ticket()).collect();
        let j2 = j.clone();
        let pending = tokio::spawn(async move { j2.append(rec(2)).await });
        drop(dropped);
        drop(held);
        pending.await.unwrap().unwrap();
        assert_eq!(j.coming.load(Ordering::Acquire), 0);
        assert_eq!(j.stats().1, 2);
    }

    #[test]
    fn frames_round_trip_and_stop_at_damage() {
        let mut b = Vec::new();
        for i in 0..5 {
            b.extend_from_slice(&encode(&rec(i)));
        }
        let all = decode(&b);
        assert_eq!(all.len(), 5);
        assert_eq!(all[3].event_id, "e3");
        assert_eq!(all[3].patients, vec![vec![3u8; 32], vec![1, 2]]);
        assert_eq!(all[4].sealed.len(), 104);
        // A torn tail (a batch cut short by a crash) is dropped.
        assert_eq!(decode(&b[..b.len() - 5]).len(), 4);
        // A flipped byte ends decoding at that frame.
        let one = encode(&rec(0)).len();
        let mut bad = b.clone();
        bad[one + 20] ^= 1;
        assert_eq!(decode(&bad).len(), 1);
        assert!(decode(b"garbage").is_empty());
    }
}
