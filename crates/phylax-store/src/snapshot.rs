//! Consistent copies of the whole database, for backups (docs/BACKUP.md),
//! and putting one back into an empty place.
//!
//! - SQLite: the online backup API copying every page in one step, which
//!   reads one transaction's view
//!   while writers go on (WAL), and the facts are then read from the copy.
//! - PostgreSQL: a `REPEATABLE READ` transaction exports its snapshot
//!   (`pg_export_snapshot`); `pg_dump --snapshot` dumps exactly that view
//!   while the facts are read inside the same transaction. Restoring is
//!   `pg_restore --single-transaction` into an empty schema of the same
//!   name, so a failure leaves nothing behind.
//!
//! The facts ([`Facts`]) are what a backup's manifest states about the
//! copy: counts, the audit log's leaf hashes in tree order and its newest
//! signed checkpoint, the KEK generations the stored keys are wrapped
//! under, the erasure register.

use crate::{CheckpointRow, Result, StoreError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a snapshot holds, read from the snapshot itself.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub schema_version: i64,
    /// Resources (current pointers, deleted ones included).
    pub resources: u64,
    pub versions: u64,
    pub audit_records: u64,
    /// The audit log's leaf hashes, in tree order.
    pub leaves: Vec<[u8; 32]>,
    pub checkpoint: Option<CheckpointRow>,
    pub instance_id: Option<String>,
    /// Stored keys by their first bytes ([`crate::WRAP_HEAD`]): the KEK
    /// generation each is wrapped under.
    pub key_heads: BTreeMap<Vec<u8>, u64>,
    /// The erasure register (`erasure_v1:` meta records).
    pub erasures: Vec<(String, Vec<u8>)>,
    /// The audit checkpoint keys as stored (`log:checkpoint-N`, wrapped
    /// under the KEK): a restore proves with the KEK that the manifest's
    /// signer is the instance's own.
    pub checkpoint_keys: Vec<(String, Vec<u8>)>,
}

/// A copy written by [`SnapshotStore::snapshot`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The file written (inside the directory given).
    pub file: PathBuf,
    pub facts: Facts,
    /// PostgreSQL: the schema dumped (a restore goes into a schema of the
    /// same name).
    pub schema: Option<String>,
}

/// Taking a consistent copy of the database.
#[async_trait]
pub trait SnapshotStore {
    /// Write a consistent copy of the whole database into `dir` (which
    /// must exist) while other connections keep writing, at most
    /// `max_rate` bytes a second when given (so that the servers keep
    /// their throughput), and read its facts from the same snapshot.
    async fn snapshot(&self, dir: &Path, max_rate: Option<u64>) -> Result<Snapshot>;
}

/// Keeps work at or under a rate: after each piece, how long to wait.
#[derive(Debug)]
pub struct Pace {
    rate: Option<u64>,
    start: std::time::Instant,
    done: u64,
}

impl Pace {
    /// At most `rate` bytes a second (`None`: as fast as it goes).
    pub fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate: rate.filter(|r| *r > 0),
            start: std::time::Instant::now(),
            done: 0,
        }
    }

    /// `n` more bytes done: the wait that keeps the average at the rate.
    pub fn after(&mut self, n: u64) -> std::time::Duration {
        self.done += n;
        let Some(rate) = self.rate else {
            return std::time::Duration::ZERO;
        };
        let due = std::time::Duration::from_secs_f64(self.done as f64 / rate as f64);
        due.saturating_sub(self.start.elapsed())
    }
}

/// The queries behind [`Facts`], the same on both backends.
pub(crate) mod sql {
    pub const SCHEMA: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations";
    pub const RESOURCES: &str = "SELECT count(*) FROM resources";
    pub const VERSIONS: &str = "SELECT count(*) FROM resource_versions";
    pub const AUDIT: &str = "SELECT count(*) FROM audit_log";
    pub const LEAVES: &str = "SELECT f.leaf_index, l.leaf_hash FROM audit_leaf f \
        JOIN audit_log l ON l.id = f.audit_id ORDER BY f.leaf_index";
    pub const CHECKPOINT: &str =
        "SELECT size, time, note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1";
    pub const INSTANCE: &str = "SELECT value FROM meta WHERE key = 'instance_id'";
    pub const ERASURES: &str =
        "SELECT key, value FROM meta WHERE key LIKE 'erasure\\_v1:%' ESCAPE '\\' ORDER BY key";
    pub const CHECKPOINT_KEYS: &str = "SELECT scope, wrapped FROM wrapped_keys \
        WHERE scope LIKE 'log:checkpoint-%' ORDER BY scope";
    pub const KEY_HEADS: &str =
        "SELECT substr(wrapped, 1, 5), count(*) FROM wrapped_keys GROUP BY 1";
}

/// A leaf hash read back, checked for its position and length.
pub(crate) fn leaf(expected: usize, index: i64, hash: &[u8]) -> Result<[u8; 32]> {
    if index != expected as i64 {
        return Err(StoreError::Backend(format!(
            "audit tree position {expected} is missing (found {index})"
        )));
    }
    hash.try_into()
        .map_err(|_| StoreError::Backend(format!("audit leaf {index} is not 32 bytes")))
}
