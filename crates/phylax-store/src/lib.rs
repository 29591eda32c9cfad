//! Storage for Phylax. The store only ever sees sealed resource bodies,
//! wrapped keys and non-identifying metadata (types, ids, versions, times):
//! encryption happens above it, so no backend can leak PHI by construction.
//!
//! # Layout
//! - [`Store`]: the narrow async trait every backend implements, with its
//!   record types ([`NewVersion`], [`StoredVersion`], [`ClientRecord`]…).
//! - [`sqlite`]: the embedded default. WAL, `synchronous=FULL`, one writer
//!   thread that group-commits concurrent writes, a pool of readers.
//! - [`postgres`]: the scale-out backend; several Phylax nodes may share one
//!   database. Row locks and unique constraints arbitrate concurrent writers.
//! - [`migrations`]: versioned schema, applied at start, per backend.
//! - [`query`]: search conditions over the index table, and the SQL they
//!   become (shared by both backends; only placeholders differ).
//!
//! The same behavioural test suite (`tests/suite.rs`) runs against both.

pub mod migrations;
pub mod postgres;
pub mod query;
pub mod sqlite;

pub use query::{Cond, NumOp, RangeOp, SearchQuery};

use async_trait::async_trait;
use std::sync::Arc;

/// Storage errors. `Display` is for logs on the server side; the HTTP layer
/// maps these to OperationOutcomes that reveal nothing of the backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The precondition of a write failed (version moved, or the resource
    /// already exists / does not exist).
    #[error("write precondition failed")]
    Conflict,
    /// A unique value (client id, key scope) already exists.
    #[error("duplicate entry")]
    Duplicate,
    #[error("database error: {0}")]
    Backend(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What must be true about the current version for a write to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// The resource id has never been used (create; update-as-create).
    Absent,
    /// The current version is exactly this one (update, delete).
    CurrentIs(u64),
}

/// A new version to append.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub rtype: String,
    pub id: String,
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub last_updated: i64,
    pub deleted: bool,
    /// Which data key sealed the body (e.g. `patient:{id}` or `tenant`).
    pub key_scope: String,
    /// Sealed body; `None` for a delete tombstone.
    pub sealed: Option<Vec<u8>>,
    /// Search index entries for this version. They replace the resource's
    /// previous entries in the same transaction (a tombstone removes them).
    pub index: Vec<IndexRow>,
}

/// One search index entry: a keyed blind hash, a time range, or a number
/// (see docs/ARCHITECTURE.md for which parameter uses which).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    pub param: String,
    pub hash: Option<Vec<u8>>,
    /// `[lo, hi)` in milliseconds.
    pub lo: Option<i64>,
    pub hi: Option<i64>,
    pub num: Option<f64>,
}

/// A stored version.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    /// Global, strictly increasing write order.
    pub seq: i64,
    pub rtype: String,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub deleted: bool,
    pub key_scope: String,
    pub sealed: Option<Vec<u8>>,
}

/// Which history to list.
#[derive(Debug, Clone)]
pub enum HistoryScope {
    System,
    Type(String),
    Instance(String, String),
}

#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    /// Only versions with `last_updated >= since` (ms).
    pub since: Option<i64>,
    /// Only versions with `seq < before_seq` (paging cursor; newest first).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// A registered SMART Backend Services client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: String,
    pub name: String,
    pub scope: String,
    /// The client's public JWKS, as JSON text.
    pub jwks: String,
    pub disabled: bool,
    pub created_at: i64,
}

/// The storage interface. All methods are durable when they return `Ok`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Which backend this is, for logs and metrics ("sqlite", "postgres").
    fn backend(&self) -> &'static str;

    /// Instance metadata (e.g. the KEK check value).
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Store `value` under `key` unless a value exists; return what is stored.
    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>>;

    /// A KEK-wrapped key by scope.
    async fn get_wrapped_key(&self, scope: &str) -> Result<Option<Vec<u8>>>;
    /// Store a wrapped key unless one exists for the scope (another node may
    /// have raced us); return the one that is stored.
    async fn put_wrapped_key_if_absent(
        &self,
        scope: &str,
        wrapped: &[u8],
        now: i64,
    ) -> Result<Vec<u8>>;

    /// Append a version if the precondition holds, atomically updating the
    /// current pointer. Returns the global sequence number.
    async fn append_version(&self, v: NewVersion, pre: Precondition) -> Result<i64>;
    /// Append several versions **all or nothing** (a FHIR transaction):
    /// if any precondition fails, nothing is written and the result is
    /// `Conflict`. Returns each version's sequence number, in input order.
    /// The same resource may not appear twice.
    async fn append_versions(&self, vs: Vec<(NewVersion, Precondition)>) -> Result<Vec<i64>>;
    /// The current version of a resource (including a tombstone).
    async fn read_current(&self, rtype: &str, id: &str) -> Result<Option<StoredVersion>>;
    /// A specific version.
    async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>>;
    /// History, newest first.
    async fn history(&self, q: &HistoryQuery) -> Result<Vec<StoredVersion>>;
    /// Current, non-deleted resources of a type, newest write first, with
    /// `seq < before_seq` when paging.
    async fn list_current(
        &self,
        rtype: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredVersion>>;
    /// Current, non-deleted resources matching every condition group,
    /// newest write first, `seq < before_seq` when paging.
    async fn search(&self, q: &SearchQuery) -> Result<Vec<StoredVersion>>;
    /// How many current resources match (ignores paging).
    async fn search_count(&self, q: &SearchQuery) -> Result<u64>;
    /// Replace a resource's index entries (used when reindexing).
    async fn set_index(&self, rtype: &str, id: &str, rows: Vec<IndexRow>) -> Result<()>;

    async fn add_client(&self, c: &ClientRecord) -> Result<()>;
    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>>;
    async fn list_clients(&self) -> Result<Vec<ClientRecord>>;
    /// Returns false if no such client.
    async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<bool>;

    /// Record a client assertion's `jti`. Returns false if it was already
    /// used (a replay). Expired entries are purged opportunistically.
    async fn use_jti(&self, client_id: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool>;
}

pub type DynStore = Arc<dyn Store>;

/// Open a store from a database URL: `sqlite:PATH` or `postgres://…`.
pub async fn open(url: &str) -> Result<DynStore> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url, None).await?))
    } else {
        Err(StoreError::Unavailable(
            "database URL must start with sqlite: or postgres://".into(),
        ))
    }
}
