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
//! - **Reused files**: an indexed segment is not deleted but kept (up to
//!   [`POOL`] of them, grown to [`KEEP_AHEAD`] times what they last held) and overwritten
//!   as a later current file. An `fdatasync` after an append must also
//!   write the inode with the file's new size (on a journaling file system,
//!   commit it: another device flush per sync); after an overwrite of
//!   blocks already on disk it flushes only the data. Each use of a file
//!   has a random 64-bit *generation*, written in the file's header and in
//!   every frame (under the frame's checksum), so the frames of an earlier
//!   use that remain past the end of the new ones are never read as
//!   records.

use phylax_audit::merkle::sha256;
use phylax_store::{AuditStore, NewAudit};
use std::fs::{File, OpenOptions};
use std::io::Read;
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

/// Frames of the first format (files without a header, never reused);
/// still read, so that journals left by an older version are recovered.
const MAGIC_V1: &[u8; 4] = b"PXJ1";
/// A file's header: this magic, then the file's generation (u64 LE).
const HEADER: &[u8; 4] = b"PXJ2";
const HEADER_LEN: u64 = 12;
/// A frame of a file with a header.
const FRAME: &[u8; 4] = b"PXF2";
const CURRENT: &str = "current.log";
const LOCK: &str = "lock";
/// Indexed segments waiting to be reused as the current file.
const FREE_PREFIX: &str = "free-";

/// Most indexed segments kept for reuse per node.
const POOL: usize = 3;
/// A kept segment is grown (with zeros written, so that its blocks are
/// allocated and on disk) to [`KEEP_AHEAD`] times what it last held, within
/// these bounds; a larger one is deleted instead of kept.
const KEEP_MIN: u64 = 64 << 10;
const KEEP_MAX: u64 = 16 << 20;
/// How much room a kept file gets, against what the last one held: the
/// current file only becomes a segment when the previous indexing pass has
/// ended, and under load passes vary in length; a file that overflows is
/// appended to again, with the size change to commit on every sync.
const KEEP_AHEAD: u64 = 4;

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Cmd {
    Append(Box<NewAudit>, Reply<()>),
    /// Close the current file as a segment (if it has records) and start
    /// a new one; answers with the segment's path and how many of its
    /// bytes were written in this use.
    Rotate(Reply<Option<(PathBuf, u64)>>),
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
    store: Arc<dyn AuditStore>,
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

/// One record as a checksummed frame of a file of generation `generation`
/// (the generation is the first field of the payload, under the checksum).
pub fn encode(r: &NewAudit, generation: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(r.sealed.len() + 256);
    p.extend_from_slice(&generation.to_le_bytes());
    payload(&mut p, r);
    frame(FRAME, &p)
}

fn payload(p: &mut Vec<u8>, r: &NewAudit) {
    put(p, r.event_id.as_bytes());
    p.extend_from_slice(&r.recorded.to_le_bytes());
    for s in [&r.agent, &r.action, &r.subtype, &r.outcome] {
        put(p, s.as_bytes());
    }
    put(p, &r.leaf_hash);
    put(p, &r.sealed);
    p.extend_from_slice(&(r.patients.len() as u32).to_le_bytes());
    for h in &r.patients {
        put(p, h);
    }
}

fn frame(magic: &[u8; 4], p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len() + 24);
    out.extend_from_slice(magic);
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(p);
    out.extend_from_slice(&sha256(p)[..16]);
    out
}

/// A file's header for generation `generation`.
fn header(generation: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(HEADER);
    h[4..].copy_from_slice(&generation.to_le_bytes());
    h
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
/// at the first torn or corrupt frame, and at the first frame of another
/// generation than the file's header (what is left of the file's previous
/// use): a batch is acknowledged only after it is synced, so anything after
/// it was never acknowledged in this use of the file.
pub fn decode(b: &[u8]) -> Vec<NewAudit> {
    decode_counted(b).0
}

/// [`decode`], and how many bytes the records (and the header) took.
fn decode_counted(b: &[u8]) -> (Vec<NewAudit>, usize) {
    if b.len() >= HEADER_LEN as usize && &b[..4] == HEADER {
        let generation = &b[4..HEADER_LEN as usize];
        let (out, n) = frames(&b[HEADER_LEN as usize..], FRAME, |p| {
            (p.get(..8) == Some(generation)).then(|| &p[8..])
        });
        (out, n + HEADER_LEN as usize)
    } else {
        frames(b, MAGIC_V1, Some)
    }
}

fn frames<'a>(
    b: &'a [u8],
    magic: &[u8; 4],
    open: impl Fn(&'a [u8]) -> Option<&'a [u8]>,
) -> (Vec<NewAudit>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let rest = &b[at..];
        if rest.len() < 8 || &rest[..4] != magic {
            return (out, at);
        }
        let n = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let Some(frame) = rest.get(8..8 + n + 16) else {
            return (out, at);
        };
        let (payload, sum) = frame.split_at(n);
        if sha256(payload)[..16] != *sum {
            return (out, at);
        }
        match open(payload).and_then(decode_payload) {
            Some(r) => out.push(r),
            None => return (out, at),
        }
        at += 8 + n + 16;
    }
}

/// The open current file: where the next batch goes, and its generation.
struct Current {
    file: File,
    id: FileId,
    /// Bytes written and acknowledged (the next batch's offset).
    at: u64,
    generation: u64,
}

/// A new current file: a kept segment if there is one (overwritten in
/// place), else a new empty file. A current file left behind (by a failed
/// batch) is first turned into a segment, so that its acknowledged records
/// are indexed, never overwritten. The directory is synced before any
/// record goes into the file: a record acknowledged in a file that a crash
/// could leave under another name (or none) would be lost to recovery.
fn start_current(dir: &Path, seq: &mut u64) -> std::io::Result<Current> {
    let cur = dir.join(CURRENT);
    if cur.exists() {
        *seq += 1;
        std::fs::rename(&cur, segment_name(dir, *seq))?;
    }
    // The first kept file that can be taken (renamed to the current name).
    let mut reused = false;
    for free in kept(dir) {
        if std::fs::rename(free, &cur).is_ok() {
            reused = true;
            break;
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!reused)
        .open(&cur)?;
    let generation = uuid::Uuid::new_v4().as_u64_pair().0;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&header(generation), 0)?;
    let id = file_id_of(&file)?;
    sync_dir(dir);
    Ok(Current {
        file,
        id,
        at: HEADER_LEN,
        generation,
    })
}

fn segment_name(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!(
        "seg-{:020}-{seq}.log",
        crate::base::clock::now_ms()
    ))
}

/// Files named with `prefix` and ending in `.log` in `dir`, sorted.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".log"))
        })
        .collect();
    v.sort();
    v
}

/// Indexed segments kept for reuse.
fn kept(dir: &Path) -> Vec<PathBuf> {
    named(dir, FREE_PREFIX)
}

/// After its records are in the database: keep an indexed segment for
/// reuse (grown ahead of what it held, its new blocks written and synced)
/// or, when enough are kept or it is too large, delete it. Its contents
/// need not be erased: they are sealed records that are already in the
/// database, and a reuse writes a new generation over its header.
fn keep_or_remove(dir: &Path, seg: &Path, held: u64) -> std::io::Result<()> {
    let want = held.saturating_mul(KEEP_AHEAD).clamp(KEEP_MIN, KEEP_MAX);
    let len = std::fs::metadata(seg)?.len();
    if kept(dir).len() >= POOL || len > KEEP_MAX {
        return std::fs::remove_file(seg);
    }
    if len < want {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(seg)?;
        // Zeros written, not `fallocate`d: an overwrite of an unwritten
        // extent changes the extent tree, which `fdatasync` must commit.
        let zeros = vec![0u8; usize::try_from(want - len).unwrap_or(0)];
        f.write_all_at(&zeros, len)?;
        f.sync_all()?;
    }
    let free = dir.join(format!("{FREE_PREFIX}{}.log", uuid::Uuid::new_v4()));
    // Not synced: if a crash undoes the rename, the segment is indexed
    // again, which skips what is already stored.
    std::fs::rename(seg, free)
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
///
/// Only the inode and device are asked for (`statx` with that mask), never
/// the timestamps: since Linux 6.13 a query of a file's times makes its
/// next write take a fine-grained time, so the inode changes with every
/// batch and each `fdatasync` writes it too (measured: 140–190 µs per
/// overwrite and sync with a `stat` after each, 100–130 µs without).
fn still_there(dir: &Path, id: FileId) -> Result<(), String> {
    match file_id_at(&dir.join(CURRENT)) {
        Ok(now) if now == id => Ok(()),
        _ => Err("the audit journal file is gone from its directory".into()),
    }
}

/// Which file a path or an open file is (device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u32, u32, u64);

fn file_id(x: rustix::fs::Statx) -> FileId {
    FileId(x.stx_dev_major, x.stx_dev_minor, x.stx_ino)
}

fn file_id_at(path: &Path) -> std::io::Result<FileId> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    Ok(file_id(statx(
        CWD,
        path,
        AtFlags::empty(),
        StatxFlags::INO,
    )?))
}

fn file_id_of(f: &File) -> std::io::Result<FileId> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    Ok(file_id(statx(f, "", AtFlags::EMPTY_PATH, StatxFlags::INO)?))
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
    use std::os::unix::fs::FileExt;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut file: Option<Current> = None;
    let mut seq: u64 = 0;
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
        if file.is_none() && cmds.iter().any(|c| matches!(c, Cmd::Append(..))) {
            match start_current(&dir, &mut seq) {
                Ok(c) => file = Some(c),
                Err(e) => {
                    tracing::error!(event = "audit.journal_failed", error = %e, "audit journal file could not be opened")
                }
            }
        }
        let generation = file.as_ref().map_or(0, |c| c.generation);
        let mut buf = Vec::new();
        let mut replies = Vec::new();
        let mut rotations = Vec::new();
        for c in cmds {
            match c {
                Cmd::Append(r, reply) => {
                    buf.extend_from_slice(&encode(&r, generation));
                    replies.push(reply);
                }
                Cmd::Rotate(reply) => rotations.push(reply),
                Cmd::Nudge => {}
            }
        }
        if !replies.is_empty() {
            let res = match file.as_ref() {
                Some(c) => c
                    .file
                    .write_all_at(&buf, c.at)
                    .and_then(|()| c.file.sync_data())
                    .map_err(|e| e.to_string())
                    .and_then(|()| still_there(&dir, c.id)),
                None => Err("audit journal not open".to_owned()),
            };
            match &res {
                Ok(()) => {
                    if let Some(c) = file.as_mut() {
                        c.at += buf.len() as u64;
                    }
                    stats.syncs.fetch_add(1, Ordering::Relaxed);
                    stats
                        .records
                        .fetch_add(replies.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(event = "audit.journal_failed", error = %e, "audit records could not be journaled");
                    // Cut the failed batch off (its requests get 503: no
                    // record may claim they were served); the next batch
                    // starts a new file, and this one becomes a segment.
                    if let Some(c) = file.take() {
                        let _ = c.file.set_len(c.at);
                        let _ = c.file.sync_data();
                    }
                }
            }
            for r in replies {
                let _ = r.send(res.clone());
            }
        }
        for reply in rotations {
            let res = match &file {
                Some(c) if c.at > HEADER_LEN => {
                    let used = c.at;
                    seq += 1;
                    let seg = segment_name(&dir, seq);
                    // The indexer reads only the `used` bytes of a
                    // reused file (it would stop at the first frame of an
                    // earlier generation anyway).
                    match std::fs::rename(dir.join(CURRENT), &seg) {
                        Ok(()) => {
                            file = start_current(&dir, &mut seq).ok();
                            Ok(Some((seg, used)))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                _ => Ok(None),
            };
            let _ = reply.send(res);
        }
    }
}

/// Journal segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    named(dir, "seg-")
}

/// Move one segment's records into the database, then keep the file for
/// reuse (`keep` is the node's own directory) or delete it. Only the first
/// `limit` bytes are read when the writer said how many it wrote.
async fn index_file(
    store: &Arc<dyn AuditStore>,
    path: &Path,
    limit: Option<u64>,
    keep: Option<&Path>,
) -> Result<usize, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(limit.unwrap_or(u64::MAX)).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    let (rows, held) = decode_counted(&bytes);
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
    match keep {
        Some(dir) => {
            let (dir, seg) = (dir.to_owned(), path.to_owned());
            // Growing a kept file writes up to a few MiB: off the runtime.
            tokio::task::spawn_blocking(move || keep_or_remove(&dir, &seg, held as u64))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        None => std::fs::remove_file(path).map_err(|e| e.to_string())?,
    }
    Ok(n)
}

impl Journal {
    /// Open this node's journal under `root` (created), first moving the
    /// records of any dead node's journal into the database.
    pub async fn open(root: &Path, store: Arc<dyn AuditStore>) -> Result<Arc<Journal>, String> {
        Journal::open_with(root, store, GATHER_MAX).await
    }

    /// [`Journal::open`] with another longest wait for announced records.
    async fn open_with(
        root: &Path,
        store: Arc<dyn AuditStore>,
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
        let rotated = rx.await.map_err(|_| "audit journal stopped".to_owned())??;
        let mut n = 0;
        for seg in segments(&self.dir) {
            let limit = rotated
                .as_ref()
                .and_then(|(p, used)| (*p == seg).then_some(*used));
            n += index_file(&self.store, &seg, limit, Some(&self.dir)).await?;
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
async fn recover(root: &Path, own: &Path, store: &Arc<dyn AuditStore>) -> Result<(), String> {
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
            let seg = d.join(format!(
                "seg-{:020}-recovered.log",
                crate::base::clock::now_ms()
            ));
            std::fs::rename(&cur, &seg).map_err(|e| e.to_string())?;
        }
        let mut n = 0;
        for seg in segments(&d) {
            n += index_file(store, &seg, None, None).await?;
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

    fn file(generation: u64, recs: &[NewAudit]) -> Vec<u8> {
        let mut b = header(generation).to_vec();
        for r in recs {
            b.extend_from_slice(&encode(r, generation));
        }
        b
    }

    #[test]
    fn frames_round_trip_and_stop_at_damage() {
        let recs: Vec<NewAudit> = (0..5).map(rec).collect();
        let b = file(7, &recs);
        let all = decode(&b);
        assert_eq!(all.len(), 5);
        assert_eq!(all[3].event_id, "e3");
        assert_eq!(all[3].patients, vec![vec![3u8; 32], vec![1, 2]]);
        assert_eq!(all[4].sealed.len(), 104);
        assert_eq!(decode_counted(&b).1, b.len());
        // A torn tail (a batch cut short by a crash) is dropped.
        assert_eq!(decode(&b[..b.len() - 5]).len(), 4);
        // A flipped byte ends decoding at that frame.
        let one = encode(&rec(0), 7).len() + HEADER_LEN as usize;
        let mut bad = b.clone();
        bad[one + 20] ^= 1;
        assert_eq!(decode(&bad).len(), 1);
        // So does a flipped byte of the generation (under the checksum).
        let mut bad = b.clone();
        bad[one + 8] ^= 1;
        assert_eq!(decode(&bad).len(), 1);
        assert!(decode(b"garbage").is_empty());
        assert!(decode(&[0u8; 4096]).is_empty());
    }

    /// A reused file still holds its previous use's frames past the new
    /// ones. Even when a new frame has exactly the length of the old one it
    /// overwrote, so that the next old frame starts where a new one would
    /// and its checksum is intact, that frame is of another generation and
    /// is not read: the records of a previous use never come back as
    /// records of this one.
    #[test]
    fn a_reused_file_never_yields_its_previous_records() {
        let old: Vec<NewAudit> = (0..4).map(rec).collect();
        let mut b = file(1, &old);
        let mut new = rec(0);
        new.event_id = "n0".into(); // same length as "e0"
        let over = file(2, &[new]);
        b[..over.len()].copy_from_slice(&over);
        let got = decode(&b);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event_id, "n0");
        // Its header rewritten but nothing acknowledged yet: nothing.
        let mut b = file(1, &old);
        b[..HEADER_LEN as usize].copy_from_slice(&header(3));
        assert!(decode(&b).is_empty());
    }

    /// Journals written by the first format (no header) are still read, so
    /// that an upgrade after a crash recovers them.
    #[test]
    fn first_format_files_are_still_read() {
        let mut b = Vec::new();
        for i in 0..3 {
            let mut p = Vec::new();
            payload(&mut p, &rec(i));
            b.extend_from_slice(&frame(MAGIC_V1, &p));
        }
        let got = decode(&b);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].event_id, "e2");
    }

    /// Indexed segments are kept and reused as current files, grown ahead
    /// of need; across reuses every record reaches the database exactly
    /// once (none of a file's earlier records is indexed again) and at most
    /// [`POOL`] files are kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reused_files_index_each_record_once() {
        let (_d, j) = journal(GATHER_MAX).await;
        let mut total = 0;
        for round in 0..8u8 {
            let n = 5 - round % 3;
            for i in 0..n {
                let mut r = rec(i);
                r.event_id = format!("r{round}-{i}");
                j.append(r).await.unwrap();
            }
            assert_eq!(j.flush().await.unwrap(), usize::from(n), "round {round}");
            total += usize::from(n);
            assert!(kept(&j.dir).len() <= POOL);
        }
        // Reused: a kept file was taken as the current one and has room.
        let cur = std::fs::metadata(j.dir.join(CURRENT)).unwrap().len();
        assert!(cur >= KEEP_MIN, "current file is {cur} bytes");
        let stored = j
            .store
            .audit_search(&phylax_store::AuditQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(stored.len(), total);
    }
}
