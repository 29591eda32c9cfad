//! Storage for Phylax. The store only ever sees sealed resource bodies,
//! wrapped keys and non-identifying metadata (types, ids, versions, times):
//! encryption happens above it, so no backend can leak PHI by construction.
//!
//! # Layout
//! - The storage traits, one per concern: [`MetaStore`], [`KeyStore`],
//!   [`ResourceStore`], [`AccountStore`], [`GrantStore`], [`AuditStore`],
//!   [`BreakGlassStore`], [`IncidentStore`]; [`Store`] is their sum (what a backend is) and
//!   [`prelude`] imports them all. Their record types ([`NewVersion`],
//!   [`StoredVersion`], [`ClientRecord`]…) are here too.
//! - [`sqlite`]: the embedded default. WAL, `synchronous=FULL`, one writer
//!   thread that group-commits concurrent writes, a pool of readers. One
//!   file per trait (`sqlite/keys.rs`, `sqlite/resources.rs`…), shared
//!   connection handling and row mapping in `sqlite/mod.rs`.
//! - [`postgres`]: the scale-out backend; several Phylax nodes may share one
//!   database. Row locks and unique constraints arbitrate concurrent
//!   writers. Laid out like `sqlite`.
//! - `pg_tls`: which PostgreSQL URLs may connect, and how: plaintext only
//!   on this machine, else TLS verified with libpq's `sslmode=verify-full`
//!   and `sslrootcert`.
//! - [`migrations`]: versioned schema, applied at start, per backend.
//! - [`query`]: search conditions over the index table, and the SQL they
//!   become (shared by both backends; only placeholders differ).
//! - [`snapshot`]: consistent copies of the whole database for backups
//!   (`SnapshotStore`, implemented in each backend's `snapshot.rs`) and
//!   putting one back into an empty place.
//! - `params`: the small numbers index entries use for (type, parameter),
//!   cached per store once committed.
//!
//! The same behavioural test suite (`tests/suite.rs`) runs against both.

pub mod migrations;
mod params;
mod pg_tls;
pub mod postgres;
pub mod query;
pub mod snapshot;
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
    /// Only versions sealed under one of these key scopes (`patient:{id}`,
    /// `tenant`): a caller limited to some patients pages through their
    /// versions only, so the page says nothing of others' (how many,
    /// when). `None`: every version.
    pub key_scopes: Option<Vec<String>>,
    pub limit: u32,
}

/// A registered SMART Backend Services client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: String,
    pub name: String,
    pub scope: String,
    /// The client's public JWKS, as JSON text (empty for public clients).
    pub jwks: String,
    pub disabled: bool,
    pub created_at: i64,
    /// Exact redirect URIs for the authorization-code flow (none for
    /// Backend Services clients).
    pub redirect_uris: Vec<String>,
    /// A public client (no credentials; PKCE is its only protection).
    pub public: bool,
    /// Operated by the same organisation as Phylax: users are not asked to
    /// consent to its scopes.
    pub first_party: bool,
    /// RFC 8705: its access tokens are bound to the TLS client certificate
    /// it presents at the token endpoint, and are refused without it.
    pub cert_bound: bool,
}

/// A user account. Everything identifying or secret (the username, the
/// password hash, the TOTP secret, recovery code hashes, the patient link)
/// is inside `sealed`; the store sees a keyed hash of the username for
/// lookups and the non-identifying role and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Random, stable, not derived from the username.
    pub id: String,
    /// Keyed blind hash of the normalised username (unique).
    pub username_hash: Vec<u8>,
    pub role: String,
    /// `active`, `disabled` or `locked`.
    pub status: String,
    /// Sealed account details (JSON), bound to the user id.
    pub sealed: Vec<u8>,
    /// Incremented by every update; updates name the revision they read.
    pub rev: i64,
    pub created_at: i64,
}

/// A short-lived bearer grant: an authorization code, a sign-in session, a
/// refresh token, or a sign-in in progress. Only a keyed hash of the bearer
/// secret is stored, so a database reader cannot use one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// `code`, `session`, `refresh`, `pending`…
    pub kind: String,
    pub key_hash: Vec<u8>,
    /// Grants that live and die together (a refresh-token rotation chain,
    /// a session's codes and tokens).
    pub family: String,
    pub user_id: String,
    /// Sealed details (JSON).
    pub sealed: Vec<u8>,
    /// Seconds since the epoch; an expired grant is as good as absent.
    pub expires_at: i64,
    /// When the grant was consumed, for single-use kinds.
    pub used_at: Option<i64>,
}

/// The result of consuming a single-use grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantUse {
    /// First use; it is now marked used.
    Fresh(GrantRecord),
    /// It had been used before (a replay): the record as it was.
    Reused(GrantRecord),
    /// No such grant, or expired.
    Missing,
}

/// A revocation every node must learn about within seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Increasing; nodes poll for entries after the last one they saw.
    pub seq: i64,
    /// `user` (every token issued to the user before `at`) or `family`.
    pub kind: String,
    pub key: String,
    pub at: i64,
}

/// One audit record to append. The AuditEvent itself is sealed above the
/// store; the columns beside it are what the log is searched by (the agent
/// is a user or client id, never a name; patients are keyed hashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAudit {
    /// The AuditEvent's id (unique).
    pub event_id: String,
    /// Milliseconds since the epoch.
    pub recorded: i64,
    /// `user:{id}`, a client id, or `anonymous`.
    pub agent: String,
    /// BALP action code (C R U D E).
    pub action: String,
    /// The event subtype code (`read`, `search-type`, `login`…).
    pub subtype: String,
    /// BALP outcome code (0, 4, 8).
    pub outcome: String,
    /// Keyed hashes of the ids of the patients the event concerns.
    pub patients: Vec<Vec<u8>>,
    /// RFC 9162 leaf hash of the AuditEvent's JSON bytes.
    pub leaf_hash: Vec<u8>,
    /// The sealed AuditEvent JSON.
    pub sealed: Vec<u8>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Arrival order (not the tree position).
    pub id: i64,
    /// Position in the Merkle tree, once a checkpoint has covered it.
    pub leaf_index: Option<u64>,
    pub event_id: String,
    pub recorded: i64,
    pub agent: String,
    pub action: String,
    pub subtype: String,
    pub outcome: String,
    pub leaf_hash: Vec<u8>,
    pub sealed: Vec<u8>,
}

/// A search of the audit log. Newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub patient: Option<Vec<u8>>,
    pub agent: Option<String>,
    /// One record by its AuditEvent id (`_id`).
    pub event_id: Option<String>,
    pub action: Option<String>,
    pub subtype: Option<String>,
    /// `recorded >= from`.
    pub from: Option<i64>,
    /// `recorded < to`.
    pub to: Option<i64>,
    /// Paging: only `id < before_id`.
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// A signed checkpoint of the audit log's Merkle tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    pub size: u64,
    pub time: i64,
    /// The signed note text.
    pub note: String,
    /// The tree's right edge at `size` (`Frontier::to_bytes`), from which
    /// a node goes on sealing without rereading the tree. Empty for
    /// checkpoints written before it was kept. Not trusted: its root must
    /// match the note's signed one.
    pub frontier: Vec<u8>,
}

/// A break-the-glass grant: emergency access by one user to one patient,
/// until `expires`, waiting for an auditor's review. The patient, reason
/// and purpose are sealed (bound to the id); the review note too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassRecord {
    pub id: String,
    pub user_id: String,
    pub started: i64,
    pub expires: i64,
    pub sealed: Vec<u8>,
    pub reviewed_at: Option<i64>,
    pub reviewer: Option<String>,
    pub review_sealed: Option<Vec<u8>>,
}

/// One step of an incident in the breach register: opened, a note, an
/// alert that joined it, a scope, a containment, a report, closed. The
/// details (title, notes, findings) are sealed, bound to the incident,
/// kind and time; the register is the fold of the steps in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentEventRow {
    /// The store's order (ignored on append).
    pub seq: i64,
    pub incident: String,
    /// The step's number within its incident (0 for the opening); a
    /// number already taken is [`StoreError::Duplicate`].
    pub step: i64,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub kind: String,
    pub sealed: Vec<u8>,
}

// The storage interface, as one trait per concern (the backends implement
// each in its own file; a subsystem holds only the ones it needs). All
// methods are durable when they return `Ok`.

/// Storage of instance metadata.
#[async_trait]
pub trait MetaStore: Send + Sync + std::fmt::Debug + 'static {
    /// Instance metadata (e.g. the KEK check value).
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Store `value` under `key` unless a value exists; return what is stored.
    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>>;

    /// Every entry whose key starts with `prefix`, in no particular order
    /// (an append-only list read whole, so that a missing entry shows as
    /// a gap instead of ending the list).
    async fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
}

/// Storage of KEK-wrapped keys (data keys, MAC keys, signing keys) and
/// when each was created.
#[async_trait]
pub trait KeyStore: Send + Sync + std::fmt::Debug + 'static {
    /// A KEK-wrapped key by scope.
    async fn get_wrapped_key(&self, scope: &str) -> Result<Option<Vec<u8>>>;

    /// Several wrapped keys in one read: `(scope, wrapped)` for those that
    /// exist, in no particular order (a search page's keys, fetched
    /// together instead of one round trip per result).
    async fn get_wrapped_keys(&self, scopes: &[String]) -> Result<Vec<(String, Vec<u8>)>>;

    /// Store a wrapped key unless one exists for the scope (another node may
    /// have raced us); return the one that is stored.
    async fn put_wrapped_key_if_absent(
        &self,
        scope: &str,
        wrapped: &[u8],
        now: i64,
    ) -> Result<Vec<u8>>;

    /// When a wrapped key was stored (seconds), for key-age metrics.
    /// [`KeyStore::put_wrapped_key_if_absent`] for many rows in one
    /// transaction (a data-key rotation makes a page's new keys together).
    /// Returns what is stored for each, in the order given.
    async fn put_wrapped_keys_if_absent(
        &self,
        rows: Vec<(String, Vec<u8>)>,
        now: i64,
    ) -> Result<Vec<Vec<u8>>>;

    async fn wrapped_key_created(&self, scope: &str) -> Result<Option<i64>>;

    /// A page of wrapped keys in the order of the table's key index (the
    /// database's collation), the first after `after` (a rotation walks
    /// them all).
    async fn list_wrapped_keys(&self, after: &str, limit: u32) -> Result<Vec<WrappedKeyRow>>;

    /// A page of wrapped keys in the order cheapest to rewrite them all,
    /// starting at `from` (`None`: the beginning; else the position the
    /// page before returned), and the position after it (`None`: that was
    /// the last page). SQLite walks the table in storage order, so a page
    /// of rewrites touches few table pages (key names are created in no
    /// particular order); PostgreSQL walks the key index.
    async fn wrapped_keys_page(
        &self,
        from: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<WrappedKeyRow>, Option<String>)> {
        let rows = self.list_wrapped_keys(from.unwrap_or(""), limit).await?;
        let next = (rows.len() == limit as usize)
            .then(|| rows.last().map(|r| r.scope.clone()))
            .flatten();
        Ok((rows, next))
    }

    /// Delete a wrapped key (a retired token key); whether there was one.
    async fn delete_wrapped_key(&self, scope: &str) -> Result<bool>;

    /// Delete wrapped keys in one transaction (a data-key rotation's
    /// retired generation); how many there were.
    async fn delete_wrapped_keys(&self, scopes: Vec<String>) -> Result<u64>;

    /// Every wrapped key whose kind (the scope up to its first `:`) is not
    /// `kind` (the few keys that are not data keys).
    async fn wrapped_keys_except(&self, kind: &str) -> Result<Vec<WrappedKeyRow>>;

    /// Replace each `(scope, old, new)` whose stored bytes are still `old`,
    /// in one transaction; returns how many were replaced. A key changed
    /// meanwhile (erased, or re-wrapped by another process) is left alone.
    async fn replace_wrapped_keys(&self, rows: Vec<(String, Vec<u8>, Vec<u8>)>) -> Result<u64>;

    /// Wrapped keys grouped by kind (the scope up to its first `:`) and
    /// the first bytes of the wrapped form (which name the KEK generation;
    /// [`WRAP_HEAD`] bytes, or one byte for the oldest format), with the
    /// count and the oldest and newest creation time of each group.
    async fn wrapped_key_stats(&self) -> Result<Vec<WrappedKeyStats>>;
}

/// How many leading bytes of a wrapped key [`KeyStore::wrapped_key_stats`]
/// groups by: the format byte and the KEK generation.
pub const WRAP_HEAD: usize = 5;

/// One stored wrapped key.
#[derive(Debug, Clone)]
pub struct WrappedKeyRow {
    pub scope: String,
    pub wrapped: Vec<u8>,
    pub created_at: i64,
}

/// A group of [`KeyStore::wrapped_key_stats`].
#[derive(Debug, Clone)]
pub struct WrappedKeyStats {
    pub kind: String,
    pub head: Vec<u8>,
    pub count: u64,
    pub oldest: i64,
    pub newest: i64,
}

/// A stored version's sealed body and what its seal is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedVersion {
    pub seq: i64,
    pub rtype: String,
    pub id: String,
    pub version: u64,
    pub key_scope: String,
    pub sealed: Vec<u8>,
}

/// The header bytes of generation `g`'s records, for comparing stored
/// headers in SQL (big-endian, so byte order is number order).
pub fn generation_header(g: u32) -> Vec<u8> {
    let mut h = vec![2u8];
    h.extend_from_slice(&g.to_be_bytes());
    h
}

/// What [`ResourceStore::erase_key_scope`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    pub versions: u64,
    pub resources: u64,
    pub key_rows: u64,
}

/// Storage of resource versions, the current pointer and the search index.
#[async_trait]
pub trait ResourceStore: Send + Sync + std::fmt::Debug + 'static {
    /// Append a version if the precondition holds, atomically updating the
    /// current pointer. Returns the global sequence number.
    /// The audit records are appended in the same transaction: the write
    /// and its audit trail are durable together or not at all.
    async fn append_version(
        &self,
        v: NewVersion,
        pre: Precondition,
        audit: Vec<NewAudit>,
    ) -> Result<i64>;

    /// Append several versions **all or nothing** (a FHIR transaction),
    /// with their audit records: if any precondition fails, nothing is
    /// written and the result is `Conflict`. Returns each version's
    /// sequence number, in input order. The same resource may not appear
    /// twice.
    async fn append_versions(
        &self,
        vs: Vec<(NewVersion, Precondition)>,
        audit: Vec<NewAudit>,
    ) -> Result<Vec<i64>>;

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

    /// Replace a resource's index entries (used when reindexing), if its
    /// current version is still `at_seq` (when given): a reindex that read
    /// an older version must not overwrite a newer write's entries.
    /// Whether it did (no such resource, or a newer version: false).
    async fn set_index(
        &self,
        rtype: &str,
        id: &str,
        at_seq: Option<i64>,
        rows: Vec<IndexRow>,
    ) -> Result<bool>;

    /// Crypto-shredding, in one transaction: delete the wrapped key stored
    /// as `key_row`, every version sealed under `key_scope`, and every
    /// version, the current pointer and the index entries of each resource
    /// whose current version is sealed under it (its older versions from
    /// before it entered the scope are the patient's record now too).
    async fn erase_key_scope(&self, key_scope: &str, key_row: &str) -> Result<Erased>;

    /// Versions with a body sealed under a data-key generation below
    /// `below_generation` (the record header: `0x01` is generation 1,
    /// `0x02 ‖ generation` after), `seq > after_seq`, in `seq` order: what
    /// a data-key rotation still has to re-encrypt.
    async fn sealed_versions(
        &self,
        below_generation: u32,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<SealedVersion>>;

    /// How many versions [`ResourceStore::sealed_versions`] would list
    /// (counted in the database: nothing is sent).
    async fn count_sealed_versions(&self, below_generation: u32) -> Result<u64>;

    /// Replace version bodies, each only if the row still holds the bytes
    /// that were read (`(seq, old, new)`; a version erased or re-encrypted
    /// meanwhile is left alone), in one transaction. How many replaced.
    async fn reseal_versions(&self, rows: Vec<(i64, Vec<u8>, Vec<u8>)>) -> Result<u64>;

    /// How many versions are sealed under `key_scope`, and the newest
    /// `last_updated` among them (ms).
    async fn key_scope_summary(&self, key_scope: &str) -> Result<(u64, Option<i64>)>;
}

/// Storage of registered clients and users.
#[async_trait]
pub trait AccountStore: Send + Sync + std::fmt::Debug + 'static {
    async fn add_client(&self, c: &ClientRecord) -> Result<()>;

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>>;

    async fn list_clients(&self) -> Result<Vec<ClientRecord>>;

    /// Returns false if no such client.
    async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<bool>;

    /// Create a user. `Duplicate` if the username hash or id exists.
    async fn add_user(&self, u: &UserRecord) -> Result<()>;

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>>;

    /// Delete a user row (one just made that lost a race for its name).
    /// Returns whether it existed.
    async fn delete_user(&self, id: &str) -> Result<bool>;

    async fn find_user(&self, username_hash: &[u8]) -> Result<Option<UserRecord>>;

    async fn list_users(&self) -> Result<Vec<UserRecord>>;

    /// Replace a user's role, status, username hash and sealed details if
    /// its revision is still `u.rev` (compare-and-swap); the stored
    /// revision becomes `u.rev + 1`. `Duplicate` if another user has the
    /// username hash. Returns false if the user changed meanwhile (or is gone):
    /// re-read and retry. This is what makes a TOTP step or a recovery code
    /// usable once even when two nodes race.
    async fn update_user(&self, u: &UserRecord) -> Result<bool>;
}

/// Storage of bearer grants, revocations and used client-assertion ids.
#[async_trait]
pub trait GrantStore: Send + Sync + std::fmt::Debug + 'static {
    /// Store a grant (purging ones expired before `now` opportunistically).
    /// `Duplicate` if the key hash exists.
    async fn put_grant(&self, g: &GrantRecord, now: i64) -> Result<()>;

    /// A grant that has not expired at `now`.
    async fn get_grant(&self, kind: &str, key_hash: &[u8], now: i64)
        -> Result<Option<GrantRecord>>;

    /// Atomically mark a single-use grant used.
    async fn use_grant(&self, kind: &str, key_hash: &[u8], now: i64) -> Result<GrantUse>;

    /// Move an unexpired grant's expiry (a session's idle timeout).
    async fn touch_grant(&self, kind: &str, key_hash: &[u8], expires_at: i64) -> Result<()>;

    /// Delete one grant. Returns whether it existed.
    async fn delete_grant(&self, kind: &str, key_hash: &[u8]) -> Result<bool>;

    /// The latest expiry of any grant unexpired at `now` (`None`: none):
    /// until then grants hashed under a sign-in key may still be used.
    async fn max_grant_expiry(&self, now: i64) -> Result<Option<i64>>;

    /// Every grant unexpired at `now` (a data-key rotation seals their
    /// details again).
    async fn live_grants(&self, now: i64) -> Result<Vec<GrantRecord>>;

    /// Replace a grant's sealed details if they are still `old`
    /// (compare-and-swap). Returns whether it was replaced.
    async fn reseal_grant(
        &self,
        kind: &str,
        key_hash: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool>;

    /// Delete every grant of a family. Returns how many.
    async fn delete_family(&self, family: &str) -> Result<u64>;

    /// Delete every grant of a user. Returns how many.
    async fn delete_user_grants(&self, user_id: &str) -> Result<u64>;

    /// Publish a revocation; returns its sequence number.
    async fn add_revocation(&self, kind: &str, key: &str, at: i64) -> Result<i64>;

    /// Revocations with `seq > after`, oldest first, and none older than
    /// `not_before` (older ones cannot matter: every token they could cover
    /// has expired).
    async fn revocations_since(&self, after: i64, not_before: i64) -> Result<Vec<Revocation>>;

    /// Record a client assertion's `jti`. Returns false if it was already
    /// used (a replay). Expired entries are purged opportunistically.
    async fn use_jti(&self, client_id: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool>;
}

/// Storage of the audit log, its sealing queue, tree positions and checkpoints.
#[async_trait]
pub trait AuditStore: Send + Sync + std::fmt::Debug + 'static {
    /// Append audit records in one transaction (a group commit of many
    /// requests' records). Durable when it returns `Ok`.
    async fn append_audit(&self, rows: Vec<NewAudit>) -> Result<()>;

    /// Records no checkpoint covers yet with an id after `after`, in
    /// arrival order, whole (the sealer checks each before it gives it a
    /// tree position).
    async fn audit_unsealed(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>>;

    /// Drop sealing-queue entries that name no record or a record already
    /// in the tree (put there by hand: they would stall sealing). Returns
    /// how many.
    async fn audit_queue_clean(&self) -> Result<u64>;

    /// The per-patient entries (`(patient key, record id)`, the key as
    /// [`query::patient_key`] gives it), in key order after `after`: for
    /// `audit verify` to rebuild and compare.
    async fn audit_patient_entries(
        &self,
        after: Option<([u8; 8], i64)>,
        limit: u32,
    ) -> Result<Vec<([u8; 8], i64)>>;

    /// Take records off the sealing queue without sealing them (rows the
    /// sealer refused: not written by the server). They stay in
    /// `audit_log`, outside the tree, for `audit verify` to report.
    async fn audit_unqueue(&self, ids: Vec<i64>) -> Result<()>;

    /// Give the records `ids` the tree positions `first_index..` and store
    /// the checkpoint that covers them, atomically. Returns false (nothing
    /// changed) if the tree no longer ends at `first_index` (another node
    /// sealed meanwhile) or a record was sealed already.
    async fn audit_seal(&self, first_index: u64, ids: Vec<i64>, cp: CheckpointRow) -> Result<bool>;

    /// The number of sealed records (the tree's size): one index lookup,
    /// unlike [`AuditStore::audit_counts`], which counts every record.
    async fn audit_tree_size(&self) -> Result<u64>;

    /// The number of records waiting for a tree position (a short queue).
    /// With [`AuditStore::audit_tree_size`], every record: cheap enough for
    /// every metrics scrape, where counting the log is not.
    async fn audit_pending_count(&self) -> Result<u64>;

    /// Sealed records by tree position, from `from_index`, in order.
    async fn audit_by_index(&self, from_index: u64, limit: u32) -> Result<Vec<AuditRow>>;

    /// How many records exist, and how many are sealed into the tree.
    async fn audit_counts(&self) -> Result<(u64, u64)>;

    async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<AuditRow>>;

    async fn audit_get(&self, event_id: &str) -> Result<Option<AuditRow>>;

    /// Checkpoints with `size > after_size`, oldest first.
    async fn checkpoints(&self, after_size: u64, limit: u32) -> Result<Vec<CheckpointRow>>;

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>>;

    /// The newest checkpoint and the tree's size, read together (one
    /// statement, one snapshot): a seal by another node cannot fall
    /// between them, so a tree that differs from its newest checkpoint
    /// really does.
    async fn latest_checkpoint_and_tree_size(&self) -> Result<(Option<CheckpointRow>, u64)>;

    /// Empty the bodies of at most `limit` sealed records recorded before
    /// `before` (retention has passed; their leaf hashes stay, so the tree
    /// still verifies). Returns how many were pruned.
    async fn audit_prune(&self, before: i64, limit: u32) -> Result<u64>;
}

/// Storage of break-the-glass grants and their reviews.
#[async_trait]
pub trait BreakGlassStore: Send + Sync + std::fmt::Debug + 'static {
    /// Store a new break-the-glass grant (its id must be new).
    async fn put_break_glass(&self, r: &BreakGlassRecord) -> Result<()>;

    /// A user's grants that have not expired at `now`.
    async fn break_glass_active(&self, user_id: &str, now: i64) -> Result<Vec<BreakGlassRecord>>;

    /// Every grant (or only those not yet reviewed), newest first.
    async fn break_glass_list(&self, open_only: bool, limit: u32) -> Result<Vec<BreakGlassRecord>>;

    /// Close a grant's review once. `false` when there is no such grant or
    /// it was already reviewed (a review is never rewritten).
    async fn review_break_glass(
        &self,
        id: &str,
        reviewer: &str,
        at: i64,
        sealed_note: &[u8],
    ) -> Result<bool>;
}

/// The breach register: incidents as an append-only list of steps.
#[async_trait]
pub trait IncidentStore: Send + Sync + std::fmt::Debug + 'static {
    /// Append one step; returns its `seq`. [`StoreError::Duplicate`] when
    /// the incident already has a step of that number (another writer
    /// appended first).
    async fn incident_append(&self, e: &IncidentEventRow) -> Result<i64>;

    /// The steps of one incident, or of every incident, by incident and
    /// step number.
    async fn incident_events(&self, incident: Option<&str>) -> Result<Vec<IncidentEventRow>>;
}

/// Every storage concern together: what a backend is.
pub trait Store:
    MetaStore
    + KeyStore
    + ResourceStore
    + AccountStore
    + GrantStore
    + AuditStore
    + BreakGlassStore
    + IncidentStore
    + snapshot::SnapshotStore
{
    /// Which backend this is, for logs and metrics ("sqlite", "postgres").
    fn backend(&self) -> &'static str;
}

pub type DynStore = Arc<dyn Store>;

/// Every storage trait, for code that holds a whole [`Store`]
/// (`use phylax_store::prelude::*`); a subsystem that needs one concern
/// imports (and, better, holds) only that trait.
pub mod prelude {
    pub use crate::snapshot::SnapshotStore;
    pub use crate::{
        AccountStore, AuditStore, BreakGlassStore, GrantStore, IncidentStore, KeyStore, MetaStore,
        ResourceStore, Store,
    };
}

/// Redirect URIs are stored one per line (registration refuses whitespace).
pub(crate) fn split_uris(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

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

/// Where a restore puts the database.
#[derive(Debug, Clone)]
pub enum Target<'a> {
    /// A new SQLite file (must not exist).
    Sqlite(&'a std::path::Path),
    /// A PostgreSQL URL whose schema (`search_path`) is `schema` and holds
    /// no table yet.
    Postgres { url: &'a str, schema: &'a str },
}

/// Put a snapshot file back. Refuses a place that holds anything.
pub async fn restore(file: &std::path::Path, target: Target<'_>) -> Result<()> {
    match target {
        Target::Sqlite(path) => sqlite::snapshot::restore_file(file, path).await,
        Target::Postgres { url, schema } => {
            postgres::snapshot::restore_dump(file, url, schema).await
        }
    }
}

/// Drop everything in the schema a PostgreSQL URL works in (a restore
/// drill's scratch copy), leaving it empty.
pub async fn drop_schema_tables(url: &str) -> Result<()> {
    postgres::snapshot::empty_schema(url).await
}
