//! Resources over the store: seal on write, open on read, FHIR versioning.
//!
//! Every version is sealed under the data key of its patient compartment
//! (or the tenant key) with additional data binding it to
//! `(type, id, version, key scope)`: a row copied onto another resource or
//! version, or a key scope rewritten in the database, fails to open, and the
//! read is refused (fail closed) rather than served.

use crate::data::keyring::{KeyError, KeyRing};
use phylax_crypto::{BlindIndexKey, DataKey};
use phylax_fhir::{compartment, ResourceId, ResourceType, VersionId};
use phylax_store::{
    DynStore, HistoryQuery, IndexRow, MetaStore, NewAudit, NewVersion, Precondition, ResourceStore,
    SearchQuery, StoreError, StoredVersion,
};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

/// A resource body. It carries PHI: no `Display`, and `Debug` is redacted.
/// Getting at the JSON is an explicit call.
///
/// A body opened from storage keeps the JSON text it was sealed as and is
/// parsed into a tree only when something asks for the tree: a search
/// page or a read is answered by copying that text into the response,
/// where parsing every result into a `Value` and serialising it again was
/// most of a many-result search's server CPU (docs/PERFORMANCE.md). The
/// text and the tree never disagree: neither can be changed once made.
///
/// Opening does not parse the text either. It is serde_json's output for
/// a validated tree, sealed by this server with AES-256-GCM, and it opened
/// under the data key bound to this resource and version: nothing without
/// that key can make text that opens, and anyone with it could seal valid
/// JSON saying anything. A second parse on every open proved nothing an
/// attacker can change and cost about 2% of a family search's whole
/// machine (docs/PERFORMANCE.md). Opening checks that the text is UTF-8
/// and an object's braces; THREAT_MODEL.md ("Stored bodies") says why
/// that suffices.
pub struct Resource(Body);

/// A body is either text from storage (with its tree, once built) or a
/// tree built in this process; never neither.
enum Body {
    /// The sealed JSON text (authenticated by the AEAD; see [`Resource`]),
    /// and its tree once something asked for it.
    Text {
        raw: Box<str>,
        tree: OnceLock<Value>,
    },
    Tree(Value),
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resource([PHI REDACTED])")
    }
}

/// Parse authenticated text into a tree. Text that opened under its data
/// key is what this server sealed, so the fallback is unreachable without
/// that key; it exists so that no path can panic on stored data, and says
/// so in the log if it is ever taken.
fn tree_of(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| {
        tracing::error!(
            event = "repo.stored_text_not_json",
            "a stored body opened under its key but is not JSON"
        );
        Value::Null
    })
}

impl Resource {
    /// Take a parsed and validated body.
    pub fn new(v: Value) -> Resource {
        Resource(Body::Tree(v))
    }

    /// A body opened from storage (authenticated plaintext, moved in, not
    /// copied): `None` unless it is UTF-8 from `{` to `}`. Not a JSON
    /// parse, by design (see [`Resource`]).
    fn stored(plain: Vec<u8>) -> Option<Resource> {
        let raw = String::from_utf8(plain).ok()?;
        if !(raw.starts_with('{') && raw.ends_with('}')) {
            return None;
        }
        Some(Resource(Body::Text {
            raw: raw.into_boxed_str(),
            tree: OnceLock::new(),
        }))
    }

    /// The length of its stored text (0 for a tree built in memory: only
    /// bodies just written are trees, and they are not paged).
    pub fn stored_len(&self) -> usize {
        match &self.0 {
            Body::Text { raw, .. } => raw.len(),
            Body::Tree(_) => 0,
        }
    }

    /// Whether the stored text may contain `needle` (a cheap test that
    /// saves a parse when it cannot; a parsed tree answers `true`).
    pub fn may_contain(&self, needle: &str) -> bool {
        self.at_most(needle) > 0
    }

    /// How many times the stored text contains `needle` at most (a parsed
    /// tree answers `usize::MAX`: unknown without serialising).
    pub fn at_most(&self, needle: &str) -> usize {
        match &self.0 {
            Body::Text { raw, .. } => raw.matches(needle).count(),
            Body::Tree(_) => usize::MAX,
        }
    }

    /// The JSON, for inspection or serialisation. Never log it.
    pub fn json(&self) -> &Value {
        match &self.0 {
            Body::Text { raw, tree } => tree.get_or_init(|| tree_of(raw)),
            Body::Tree(v) => v,
        }
    }

    /// The JSON, moved into a response being built. Never log it.
    pub fn into_json(self) -> Value {
        match self.0 {
            Body::Text { raw, tree } => tree.into_inner().unwrap_or_else(|| tree_of(&raw)),
            Body::Tree(v) => v,
        }
    }

    /// The body for a response: its stored text when it has one (no
    /// parse, no re-serialisation), else its tree. Never log it.
    pub fn into_out(self) -> BodyOut {
        match self.0 {
            Body::Text { raw, .. } => BodyOut::Text(raw),
            Body::Tree(v) => BodyOut::Tree(v),
        }
    }

    /// Serialise for a response (see [`Resource::into_out`]). Serialising
    /// a `Value` cannot fail; the fallback only avoids an unwrap.
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.0 {
            Body::Text { raw, .. } => raw.as_bytes().to_vec(),
            Body::Tree(v) => serde_json::to_vec(v).unwrap_or_else(|_| v.to_string().into_bytes()),
        }
    }
}

/// A resource body on its way into a response. PHI: `Debug` is redacted.
pub enum BodyOut {
    /// Stored text, written into the response as it is.
    Text(Box<str>),
    Tree(Value),
}

impl BodyOut {
    /// Append the body's JSON to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            BodyOut::Text(t) => {
                out.extend_from_slice(t.as_bytes());
                Ok(())
            }
            BodyOut::Tree(v) => serde_json::to_writer(out, v),
        }
    }

    /// The length of its JSON if known without serialising (stored text).
    pub fn text_len(&self) -> Option<usize> {
        match self {
            BodyOut::Text(t) => Some(t.len()),
            BodyOut::Tree(_) => None,
        }
    }
}

impl std::fmt::Debug for BodyOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyOut([PHI REDACTED])")
    }
}

/// One version as the API sees it.
#[derive(Debug)]
pub struct ResourceVersion {
    pub seq: i64,
    pub rtype: ResourceType,
    pub id: ResourceId,
    pub version: VersionId,
    /// Milliseconds since the epoch.
    pub last_updated: i64,
    pub deleted: bool,
    pub body: Option<Resource>,
    /// The patient whose compartment holds this version's body (from the
    /// key scope it is sealed under, which the AEAD authenticates, and
    /// which was computed from the body when it was written); `None` for
    /// tombstones and bodies outside every patient compartment.
    pub patient: Option<String>,
}

/// A sealed version ready to commit (see [`Repo::commit`]).
#[derive(Debug)]
pub struct PlannedWrite {
    new: NewVersion,
    pre: Precondition,
    out: ResourceVersion,
}

impl PlannedWrite {
    pub fn rtype(&self) -> &ResourceType {
        &self.out.rtype
    }
    pub fn id(&self) -> &ResourceId {
        &self.out.id
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("not found")]
    NotFound,
    #[error("deleted")]
    Gone(VersionId),
    #[error("version conflict")]
    VersionMismatch,
    #[error("update-as-create is disabled")]
    CreateViaUpdateDisabled,
    #[error("concurrent modification")]
    Conflict,
    #[error("stored record failed authentication (type {rtype}, id {id}, version {version})")]
    Integrity {
        rtype: String,
        id: String,
        version: u64,
    },
    /// Outside the writer's reach: `hidden` for the existing resource
    /// (answered as not found), else the new content (refused).
    #[error("access: {rule}")]
    Denied { hidden: bool, rule: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A failed write: a lost precondition is a conflict, anything else the
/// store's error.
fn write_error(e: StoreError) -> RepoError {
    match e {
        StoreError::Conflict => RepoError::Conflict,
        o => RepoError::Store(o),
    }
}

/// What a body's seal is bound to: `phylax/resource/v1␀type␀id␀version␀scope`.
/// Built by appending (every search opens a page of bodies; `format!`
/// showed in profiles).
fn aad(rtype: &str, id: &str, version: u64, scope: &str) -> Vec<u8> {
    use std::io::Write as _;
    const PREFIX: &[u8] = b"phylax/resource/v1\0";
    let mut a = Vec::with_capacity(PREFIX.len() + rtype.len() + id.len() + scope.len() + 24);
    a.extend_from_slice(PREFIX);
    a.extend_from_slice(rtype.as_bytes());
    a.push(0);
    a.extend_from_slice(id.as_bytes());
    a.push(0);
    // Writing to a Vec cannot fail.
    let _ = write!(a, "{version}");
    a.push(0);
    a.extend_from_slice(scope.as_bytes());
    a
}

/// Attempts at an unconditional update when other writers keep winning.
const UPDATE_RETRIES: usize = 5;

#[derive(Debug, Clone)]
pub struct Repo {
    store: Arc<dyn ResourceStore>,
    /// Instance metadata (whether the search index is complete).
    meta: Arc<dyn MetaStore>,
    keys: Arc<KeyRing>,
    blind: Arc<BlindIndexKey>,
    fhir_base: String,
    /// `fhir_base` and its configured aliases: references absolute to any
    /// of them are stored relative.
    bases: Arc<Vec<String>>,
}

/// The checks and audit record of one caller's writes, supplied by the
/// access layer (`crate::access::write::WriteAuditor`): the repository's
/// write paths that serve a request take one and call it at each step, so
/// no write path can leave a check out. (Only start-up jobs and tests
/// write without one.)
pub trait WriteGuard: Sync {
    /// Whether a write of `rtype` must open the version it replaces.
    fn opens_existing(&self, rtype: &ResourceType) -> bool;
    /// Whether the writer is limited to some patients.
    fn limited(&self) -> bool;
    /// The version a write replaces must be within the writer's reach.
    fn guard_existing(&self, v: &ResourceVersion) -> Result<(), RepoError>;
    /// The new content (absent for a delete), and the change from `old`.
    fn guard_new(
        &self,
        rtype: &ResourceType,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), RepoError>;
    /// Patients a write opens or closes beyond those it names.
    fn opened<'a>(
        &'a self,
        w: &'a PlannedWrite,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<String>, RepoError>> + Send + 'a>,
    >;
    /// The sealed record of one successful write.
    fn draft(
        &self,
        interaction: &'static str,
        rtype: &str,
        id: &str,
        patients: Vec<String>,
        status: u16,
    ) -> Result<NewAudit, RepoError>;
}

/// A write's guard and the interaction it records.
type WriteAudit<'a> = (&'a dyn WriteGuard, &'static str);

impl PlannedWrite {
    /// The content to be stored (absent for a delete), as sealed.
    pub fn body(&self) -> Option<&Value> {
        self.out.body.as_ref().map(Resource::json)
    }

    /// The patient whose compartment the write is in, from its key scope.
    pub fn patient(&self) -> Option<&str> {
        self.new.key_scope.strip_prefix("patient:")
    }

    /// The resource's type and id.
    pub fn target(&self) -> (&ResourceType, &ResourceId) {
        (&self.out.rtype, &self.out.id)
    }

    /// The version this write replaces, if any.
    pub fn replaces(&self) -> Option<VersionId> {
        self.out
            .version
            .get()
            .checked_sub(1)
            .and_then(VersionId::new)
    }

    /// The sealed audit record of this write, to commit with it. `opened`:
    /// patients the write opens or closes beyond those it names (a
    /// PractitionerRole's, [`WriteGuard::opened`]).
    pub fn audit(
        &self,
        a: &dyn WriteGuard,
        interaction: &'static str,
        opened: &[String],
    ) -> Result<NewAudit, RepoError> {
        let status = if self.new.deleted {
            204
        } else if self.pre == Precondition::Absent {
            201
        } else {
            200
        };
        // Every patient the written resource names (a delete: the one its
        // data key belongs to), not only the first.
        let mut patients = match &self.out.body {
            Some(b) => compartment::patients_of(&self.out.rtype, b.json()),
            None => self.patient().map(str::to_owned).into_iter().collect(),
        };
        for p in opened {
            if !patients.contains(p) {
                patients.push(p.clone());
            }
        }
        a.draft(interaction, &self.new.rtype, &self.new.id, patients, status)
    }
}

/// Meta key recording that every current resource has index entries.
const INDEX_DONE: &str = "search_index_v1";

impl Repo {
    pub fn new(
        store: DynStore,
        keys: Arc<KeyRing>,
        blind: BlindIndexKey,
        fhir_base: String,
    ) -> Repo {
        Repo {
            meta: store.clone(),
            store,
            keys,
            blind: Arc::new(blind),
            bases: Arc::new(vec![fhir_base.clone()]),
            fhir_base,
        }
    }

    /// Also treat references absolute to `aliases` as this server's.
    pub fn with_aliases(mut self, aliases: &[String]) -> Repo {
        let mut bases = vec![self.fhir_base.clone()];
        bases.extend(aliases.iter().cloned());
        self.bases = Arc::new(bases);
        self
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// This server's FHIR base and its configured aliases.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    pub fn blind_key(&self) -> &BlindIndexKey {
        &self.blind
    }

    fn index(&self, rtype: &ResourceType, body: &Value) -> Vec<IndexRow> {
        crate::data::search::index_rows(&self.blind, &self.fhir_base, rtype, body)
    }

    /// Give every current resource its index entries, once per instance
    /// (data written before the search index existed). Idempotent, so
    /// nodes starting together may both run it.
    pub async fn reindex_if_needed(&self) -> Result<u64, RepoError> {
        if self.meta.get_meta(INDEX_DONE).await?.is_some() {
            return Ok(0);
        }
        let mut n = 0;
        for t in phylax_fhir::defs::definitions().resource_types() {
            let Some(rtype) = ResourceType::parse(t) else {
                continue;
            };
            let mut before = None;
            loop {
                let page = self.list(&rtype, before, 500).await?;
                let Some(last) = page.last() else { break };
                before = Some(last.seq);
                for v in &page {
                    if let Some(b) = &v.body {
                        let rows = self.index(&rtype, b.json());
                        self.store
                            .set_index(rtype.as_str(), v.id.as_str(), rows)
                            .await?;
                        n += 1;
                    }
                }
            }
        }
        self.meta.put_meta_if_absent(INDEX_DONE, b"1").await?;
        Ok(n)
    }

    /// How many current resources match a search (nothing opened);
    /// through [`crate::access::scoped::Scoped`], which adds the caller's
    /// conditions.
    pub async fn count_unconfined(&self, q: &SearchQuery) -> Result<u64, RepoError> {
        Ok(self.store.search_count(q).await?)
    }

    /// Current resources matching a search (see `crate::data::search`),
    /// **unconfined**: whatever any caller may see. Requests search
    /// through [`crate::access::scoped::Scoped`], which adds the caller's
    /// conditions and checks what comes back; this is for the server's own
    /// lookups (care relationships, the VIP list) and for `Scoped`.
    pub async fn search_unconfined(
        &self,
        q: &SearchQuery,
    ) -> Result<Vec<ResourceVersion>, RepoError> {
        let rows = self.store.search(q).await?;
        self.open_all(rows).await
    }

    /// One page of a search: at most `keep` resources, opened, and whether
    /// the store had more (`q.limit` should be `keep + 1`). The row that
    /// only tells there is a next page is never decrypted.
    pub async fn search_page_unconfined(
        &self,
        q: &SearchQuery,
        keep: usize,
    ) -> Result<(Vec<ResourceVersion>, bool), RepoError> {
        let mut rows = self.store.search(q).await?;
        let more = rows.len() > keep;
        rows.truncate(keep);
        Ok((self.open_all(rows).await?, more))
    }

    /// Seal a new version without writing it: a write to commit later, on
    /// its own or with others in one all-or-nothing transaction.
    pub async fn plan_put(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        version: VersionId,
        mut body: Value,
        pre: Precondition,
    ) -> Result<PlannedWrite, RepoError> {
        let now = crate::base::clock::now_ms();
        // One canonical form for references to this server's resources:
        // whose data this is must not depend on how a reference is written
        // (phylax_fhir::reference).
        phylax_fhir::reference::canonicalize(&mut body, &self.bases);
        // Server-owned fields: id, versionId, lastUpdated.
        if let Some(obj) = body.as_object_mut() {
            obj.insert("id".into(), json!(id.as_str()));
            let meta = obj.entry("meta").or_insert_with(|| json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("versionId".into(), json!(version.to_string()));
                m.insert(
                    "lastUpdated".into(),
                    json!(crate::base::clock::format_instant(now)),
                );
            }
        }
        let patient = compartment::patient_of(rtype, &body);
        let scope = match &patient {
            Some(p) => format!("patient:{p}"),
            None => "tenant".to_owned(),
        };
        let key = self.keys.for_write(&scope).await?;
        let index = self.index(rtype, &body);
        let plain = serde_json::to_vec(&body).map_err(|e| StoreError::Backend(e.to_string()))?;
        let sealed = key
            .seal(
                &aad(rtype.as_str(), id.as_str(), version.get(), &scope),
                &plain,
            )
            .map_err(|_| KeyError::Random)?;
        Ok(PlannedWrite {
            new: NewVersion {
                rtype: rtype.as_str().to_owned(),
                id: id.as_str().to_owned(),
                version: version.get(),
                last_updated: now,
                deleted: false,
                key_scope: scope,
                sealed: Some(sealed),
                index,
            },
            pre,
            out: ResourceVersion {
                seq: 0,
                rtype: rtype.clone(),
                id: id.clone(),
                version,
                last_updated: now,
                deleted: false,
                body: Some(Resource::new(body)),
                patient,
            },
        })
    }

    /// A delete tombstone for the live current version `cur`.
    pub fn plan_delete(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        cur: &StoredVersion,
    ) -> Result<PlannedWrite, RepoError> {
        let now = crate::base::clock::now_ms();
        let version = VersionId::new(cur.version + 1).ok_or(RepoError::Conflict)?;
        Ok(PlannedWrite {
            new: NewVersion {
                rtype: rtype.as_str().to_owned(),
                id: id.as_str().to_owned(),
                version: version.get(),
                last_updated: now,
                deleted: true,
                key_scope: cur.key_scope.clone(),
                sealed: None,
                index: Vec::new(),
            },
            pre: Precondition::CurrentIs(cur.version),
            out: ResourceVersion {
                seq: 0,
                rtype: rtype.clone(),
                id: id.clone(),
                version,
                last_updated: now,
                deleted: true,
                body: None,
                patient: None,
            },
        })
    }

    /// Commit planned writes all or nothing. `Conflict` when any
    /// precondition no longer holds (nothing was written).
    pub async fn commit(
        &self,
        writes: Vec<PlannedWrite>,
        audit: Vec<NewAudit>,
    ) -> Result<Vec<ResourceVersion>, RepoError> {
        let (batch, outs): (Vec<_>, Vec<_>) =
            writes.into_iter().map(|w| ((w.new, w.pre), w.out)).unzip();
        let seqs = self
            .store
            .append_versions(batch, audit)
            .await
            .map_err(write_error)?;
        Ok(outs
            .into_iter()
            .zip(seqs)
            .map(|(mut o, seq)| {
                o.seq = seq;
                o
            })
            .collect())
    }

    /// The stored current row (possibly a tombstone), unopened.
    pub async fn current_row(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
    ) -> Result<Option<StoredVersion>, RepoError> {
        Ok(self.store.read_current(rtype.as_str(), id.as_str()).await?)
    }

    #[allow(clippy::too_many_arguments)]
    async fn seal_and_append(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        version: VersionId,
        body: Value,
        pre: Precondition,
        audit: Option<WriteAudit<'_>>,
        old: Option<&Value>,
    ) -> Result<ResourceVersion, RepoError> {
        let w = self.plan_put(rtype, id, version, body, pre).await?;
        self.append(w, audit, old).await
    }

    /// Write one planned version on its own, with its audit record in the
    /// same transaction. `old` is the live version's body it replaces, as
    /// [`Repo::guard_existing`] opened it.
    async fn append(
        &self,
        w: PlannedWrite,
        audit: Option<WriteAudit<'_>>,
        old: Option<&Value>,
    ) -> Result<ResourceVersion, RepoError> {
        let rows = match audit {
            Some((a, interaction)) => {
                // The new content must be within the writer's reach, and a
                // change of who reaches whom needs the permission.
                a.guard_new(&w.out.rtype, old, w.out.body.as_ref().map(Resource::json))?;
                let opened = a.opened(&w).await?;
                vec![w.audit(a, interaction, &opened)?]
            }
            None => Vec::new(),
        };
        let seq = self
            .store
            .append_version(w.new, w.pre, rows)
            .await
            .map_err(write_error)?;
        Ok(ResourceVersion { seq, ..w.out })
    }

    /// Open a stored row. A row that fails to authenticate is an integrity
    /// failure: never served, always reported.
    async fn open(&self, row: StoredVersion) -> Result<ResourceVersion, RepoError> {
        self.open_with(row, None).await
    }

    /// [`Repo::open`] with the row's data key, if the caller already has
    /// it (a page looks each key up once, see [`Repo::open_all`]).
    async fn open_with(
        &self,
        mut row: StoredVersion,
        key: Option<Arc<DataKey>>,
    ) -> Result<ResourceVersion, RepoError> {
        let integrity = |row: &StoredVersion| RepoError::Integrity {
            rtype: row.rtype.clone(),
            id: row.id.clone(),
            version: row.version,
        };
        let (Some(rtype), Some(id), Some(version)) = (
            ResourceType::parse(&row.rtype),
            ResourceId::parse(&row.id),
            VersionId::new(row.version),
        ) else {
            return Err(integrity(&row));
        };
        let body = match (row.sealed.take(), row.deleted) {
            (None, true) => None,
            (Some(sealed), false) => {
                let key = match key {
                    Some(k) => k,
                    None => match self.keys.for_read(&row.key_scope).await {
                        Ok(k) => k,
                        Err(KeyError::Unwrap | KeyError::Missing) => return Err(integrity(&row)),
                        Err(e) => return Err(e.into()),
                    },
                };
                // Decrypted in place: the row's bytes become the text.
                let plain = key
                    .open_owned(
                        &aad(&row.rtype, &row.id, row.version, &row.key_scope),
                        sealed,
                    )
                    .map_err(|_| integrity(&row))?;
                Some(Resource::stored(plain).ok_or_else(|| integrity(&row))?)
            }
            _ => return Err(integrity(&row)),
        };
        Ok(ResourceVersion {
            seq: row.seq,
            rtype,
            id,
            version,
            last_updated: row.last_updated,
            deleted: row.deleted,
            patient: body
                .as_ref()
                .and_then(|_| row.key_scope.strip_prefix("patient:").map(str::to_owned)),
            body,
        })
    }

    /// Create with a server-assigned id (a random UUID: ids reveal nothing).
    pub async fn create(
        &self,
        rtype: &ResourceType,
        body: Value,
        audit: Option<&dyn WriteGuard>,
    ) -> Result<ResourceVersion, RepoError> {
        let id = ResourceId::from_uuid(uuid::Uuid::new_v4());
        self.seal_and_append(
            rtype,
            &id,
            VersionId::FIRST,
            body,
            Precondition::Absent,
            audit.map(|a| (a, "create")),
            None,
        )
        .await
    }

    /// Update (or create with the client's id when allowed). Returns the new
    /// version and whether it was created.
    pub async fn update(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        body: Value,
        if_match: Option<VersionId>,
        allow_create: bool,
        audit: Option<&dyn WriteGuard>,
    ) -> Result<(ResourceVersion, bool), RepoError> {
        for _ in 0..UPDATE_RETRIES {
            let current = self.store.read_current(rtype.as_str(), id.as_str()).await?;
            let old = self.guard_existing(audit, rtype, current.as_ref()).await?;
            let (next, pre, created) = match (&current, if_match) {
                (None, Some(_)) => return Err(RepoError::VersionMismatch),
                (None, None) if !allow_create => return Err(RepoError::CreateViaUpdateDisabled),
                (None, None) => (VersionId::FIRST, Precondition::Absent, true),
                (Some(cur), m) => {
                    let cur_v = VersionId::new(cur.version).ok_or(RepoError::Conflict)?;
                    if m.is_some_and(|m| m != cur_v) {
                        return Err(RepoError::VersionMismatch);
                    }
                    (
                        cur_v.next(),
                        Precondition::CurrentIs(cur.version),
                        cur.deleted,
                    )
                }
            };
            match self
                .seal_and_append(
                    rtype,
                    id,
                    next,
                    body.clone(),
                    pre,
                    audit.map(|a| (a, "update")),
                    old.as_ref()
                        .and_then(|v| v.body.as_ref())
                        .map(Resource::json),
                )
                .await
            {
                Ok(v) => return Ok((v, created)),
                Err(RepoError::Conflict) if if_match.is_some() => {
                    return Err(RepoError::VersionMismatch)
                }
                Err(RepoError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RepoError::Conflict)
    }

    /// Delete: append a tombstone. Returns `Ok(None)` when the resource is
    /// already deleted (idempotent), `NotFound` when it never existed.
    pub async fn delete(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        audit: Option<&dyn WriteGuard>,
    ) -> Result<Option<ResourceVersion>, RepoError> {
        for _ in 0..UPDATE_RETRIES {
            let Some(cur) = self.store.read_current(rtype.as_str(), id.as_str()).await? else {
                return Err(RepoError::NotFound);
            };
            let old = self.guard_existing(audit, rtype, Some(&cur)).await?;
            if cur.deleted {
                return Ok(None);
            }
            match self
                .append(
                    self.plan_delete(rtype, id, &cur)?,
                    audit.map(|a| (a, "delete")),
                    old.as_ref()
                        .and_then(|v| v.body.as_ref())
                        .map(Resource::json),
                )
                .await
            {
                Ok(v) => return Ok(Some(v)),
                Err(RepoError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RepoError::Conflict)
    }

    /// The resource a write replaces must be within the writer's reach.
    /// Returns the live version it opened, when the write's checks need it
    /// ([`WriteGuard::opens_existing`]), for
    /// [`WriteGuard::guard_new`] to compare.
    ///
    /// A writer limited to some patients learns nothing from a write about
    /// ids it cannot see: an id that does not exist, a deleted resource
    /// whose last content it could not see, and a hidden live resource all
    /// answer alike (404), so PUT and DELETE are no existence oracle.
    pub async fn guard_existing(
        &self,
        audit: Option<&dyn WriteGuard>,
        rtype: &ResourceType,
        current: Option<&StoredVersion>,
    ) -> Result<Option<ResourceVersion>, RepoError> {
        let Some(a) = audit else {
            return Ok(None);
        };
        let hidden = RepoError::Denied {
            hidden: true,
            rule: "reach: no resource the caller may write has this id",
        };
        let Some(cur) = current else {
            return if a.limited() { Err(hidden) } else { Ok(None) };
        };
        if cur.deleted {
            if !a.limited() {
                return Ok(None);
            }
            // Only a writer who could see what was deleted learns that it was.
            let last = match cur.version.checked_sub(1).filter(|v| *v > 0) {
                Some(v) => self.store.read_version(&cur.rtype, &cur.id, v).await?,
                None => None,
            };
            // The last live version stands as the one replaced: bringing a
            // deleted resource back is no fresh start (a deleted Patient
            // recreated naming the writer as GP changes its relationships).
            return match last {
                Some(row) if !row.deleted => {
                    let v = self.open(row).await?;
                    a.guard_existing(&v)?;
                    Ok(Some(v))
                }
                _ => Err(hidden),
            };
        }
        if !a.opens_existing(rtype) {
            return Ok(None);
        }
        let v = self.open(cur.clone()).await?;
        a.guard_existing(&v)?;
        Ok(Some(v))
    }

    /// Open a looked-up row that must exist and be live.
    async fn open_live(&self, row: Option<StoredVersion>) -> Result<ResourceVersion, RepoError> {
        let v = self.open(row.ok_or(RepoError::NotFound)?).await?;
        if v.deleted {
            return Err(RepoError::Gone(v.version));
        }
        Ok(v)
    }

    async fn open_all(&self, rows: Vec<StoredVersion>) -> Result<Vec<ResourceVersion>, RepoError> {
        // Each row's key is looked up in memory once, the page's under one
        // lock; those not there are fetched together (one round trip), then
        // the rows are opened one by one.
        let keys = {
            let scopes: Vec<Option<&str>> = rows
                .iter()
                .map(|r| r.sealed.as_ref().map(|_| r.key_scope.as_str()))
                .collect();
            self.keys.cached_all(&scopes)
        };
        self.keys
            .prefetch(
                rows.iter()
                    .zip(&keys)
                    .filter(|(r, k)| r.sealed.is_some() && k.is_none())
                    .map(|(r, _)| r.key_scope.as_str()),
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (r, k) in rows.into_iter().zip(keys) {
            out.push(self.open_with(r, k).await?);
        }
        Ok(out)
    }

    /// The current version; `Gone` if deleted.
    pub async fn read(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
    ) -> Result<ResourceVersion, RepoError> {
        let row = self.store.read_current(rtype.as_str(), id.as_str()).await?;
        self.open_live(row).await
    }

    /// A specific version; `Gone` if that version is a tombstone.
    pub async fn vread(
        &self,
        rtype: &ResourceType,
        id: &ResourceId,
        version: VersionId,
    ) -> Result<ResourceVersion, RepoError> {
        let row = self
            .store
            .read_version(rtype.as_str(), id.as_str(), version.get())
            .await?;
        self.open_live(row).await
    }

    pub async fn history(&self, q: &HistoryQuery) -> Result<Vec<ResourceVersion>, RepoError> {
        let rows = self.store.history(q).await?;
        self.open_all(rows).await
    }

    pub async fn list(
        &self,
        rtype: &ResourceType,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ResourceVersion>, RepoError> {
        let rows = self
            .store
            .list_current(rtype.as_str(), before_seq, limit)
            .await?;
        self.open_all(rows).await
    }
}

impl From<RepoError> for crate::base::error::Failure {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound => crate::base::error::Failure::NotFound,
            RepoError::Gone(_) => crate::base::error::Failure::Gone,
            RepoError::VersionMismatch => crate::base::error::Failure::PreconditionFailed,
            RepoError::CreateViaUpdateDisabled => crate::base::error::Failure::MethodNotAllowed(
                "update-as-create is not allowed on this server",
            ),
            RepoError::Conflict => crate::base::error::Failure::Conflict,
            RepoError::Denied { hidden: true, rule } => crate::base::error::Failure::Hidden(rule),
            RepoError::Denied {
                hidden: false,
                rule,
            } => crate::base::error::Failure::Refused(rule),
            e @ RepoError::Integrity { .. } => {
                crate::base::error::Failure::Integrity(e.to_string())
            }
            RepoError::Store(phylax_store::StoreError::Unavailable(c)) => {
                crate::base::error::Failure::Unavailable(c)
            }
            other => crate::base::error::Failure::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_is_served_as_is_and_parsed_only_on_demand() {
        let text = br#"{"resourceType":"Patient","id":"p1","birthDate":"1970-01-01","multipleBirthInteger":2}"#;
        let r = Resource::stored(text.to_vec()).unwrap();
        assert!(
            matches!(&r.0, Body::Text { tree, .. } if tree.get().is_none()),
            "opening must not parse"
        );
        assert_eq!(r.to_bytes(), text.to_vec());
        assert_eq!(r.json()["birthDate"], "1970-01-01");
        // Text and tree agree; the text still answers after a parse.
        assert_eq!(r.to_bytes(), text.to_vec());
        assert_eq!(*r.json(), serde_json::from_slice::<Value>(text).unwrap());
        let mut out = Vec::new();
        Resource::stored(text.to_vec())
            .unwrap()
            .into_out()
            .write_to(&mut out)
            .unwrap();
        assert_eq!(out, text.to_vec());
        assert_eq!(
            Resource::stored(text.to_vec()).unwrap().into_json()["id"],
            "p1"
        );
    }

    #[test]
    fn stored_text_that_is_not_an_object_does_not_open() {
        for bad in [
            &b""[..],
            b"{",
            b"}",
            b"{\"a\":1}x",
            b" {\"a\":1}",
            b"\xff\xfe",
            b"{\"a\":\"\xff\"}",
            b"[1,2]",
            b"\"{}\"",
            b"null",
        ] {
            assert!(Resource::stored(bad.to_vec()).is_none(), "{bad:?}");
        }
        // Text that only looks like an object opens (it could only have
        // been sealed with the data key); its tree is then null, never a
        // panic.
        let odd = Resource::stored(b"{\"a\":}".to_vec()).unwrap();
        assert_eq!(*odd.json(), Value::Null);
    }

    #[test]
    fn seals_stay_bound_to_the_same_bytes() {
        assert_eq!(
            aad("Patient", "p-1", 12, "patient:p-1"),
            b"phylax/resource/v1\0Patient\0p-1\x0012\x00patient:p-1".to_vec()
        );
        assert_eq!(
            aad("Observation", "o", u64::MAX, ""),
            format!("phylax/resource/v1\0Observation\0o\0{}\0", u64::MAX).into_bytes()
        );
    }

    #[test]
    fn built_bodies_serialise_their_tree() {
        let v = json!({"resourceType": "Observation", "status": "final"});
        let r = Resource::new(v.clone());
        assert_eq!(r.to_bytes(), serde_json::to_vec(&v).unwrap());
        let mut out = Vec::new();
        r.into_out().write_to(&mut out).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), v);
    }
}
