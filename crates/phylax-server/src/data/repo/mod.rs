//! Resources over the store: seal on write, open on read, FHIR versioning.
//!
//! Every version is sealed under the data key of its patient compartment
//! (or the tenant key) with additional data binding it to
//! `(type, id, version, key scope)`: a row copied onto another resource or
//! version, or a key scope rewritten in the database, fails to open, and the
//! read is refused (fail closed) rather than served.
//!
//! # Layout
//! - this file: the body, version and planned-write types, the write
//!   guard the access layer supplies ([`WriteGuard`]), the repository and
//!   its search index upkeep;
//! - [`read`]: opening sealed rows; reads, history, unconfined searches
//!   (for `crate::access::scoped::Scoped` only);
//! - [`write`]: planning, guarding and committing versions.

mod read;
mod write;

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
pub fn aad(rtype: &str, id: &str, version: u64, scope: &str) -> Vec<u8> {
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
    /// The blind-index key and its generation counter, shared by every
    /// clone: replaced (and the counter moved on) when the index key
    /// rotates (docs/KEYS.md).
    blind: Arc<parking_lot::RwLock<(u64, Arc<BlindIndexKey>)>>,
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
            blind: Arc::new(parking_lot::RwLock::new((0, Arc::new(blind)))),
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

    /// The blind-index key in force (with the previous one while the
    /// index is rebuilt).
    pub fn blind_key(&self) -> Arc<BlindIndexKey> {
        self.blind.read().1.clone()
    }

    /// The key with its generation counter (which changes each time the
    /// key is replaced), read together, for caches of index entries.
    pub fn blind_snapshot(&self) -> (u64, Arc<BlindIndexKey>) {
        let b = self.blind.read();
        (b.0, b.1.clone())
    }

    /// Index and search with `key` from now on.
    pub fn set_blind_key(&self, key: BlindIndexKey) {
        let mut b = self.blind.write();
        *b = (b.0 + 1, Arc::new(key));
    }

    fn index(&self, rtype: &ResourceType, body: &Value) -> Vec<IndexRow> {
        crate::data::search::index_rows(&self.blind_key(), &self.fhir_base, rtype, body)
    }

    /// A stored version's body sealed again under data-key `generation`
    /// (a data-key rotation, docs/KEYS.md): opened with the key its header
    /// names, sealed with the scope's key of that generation, bound to the
    /// same resource, version and scope. A body that does not open is an
    /// integrity failure (nothing is written for it).
    pub async fn reseal(
        &self,
        v: &phylax_store::SealedVersion,
        generation: u32,
    ) -> Result<Vec<u8>, RepoError> {
        use crate::data::keyring::key_name;
        let integrity = || RepoError::Integrity {
            rtype: v.rtype.clone(),
            id: v.id.clone(),
            version: v.version,
        };
        let from = phylax_crypto::datakey::record_generation(&v.sealed).ok_or_else(integrity)?;
        let old = match self.keys.for_read(&key_name(&v.key_scope, from)).await {
            Ok(k) => k,
            Err(KeyError::Unwrap | KeyError::Missing) => return Err(integrity()),
            Err(e) => return Err(e.into()),
        };
        let ad = aad(&v.rtype, &v.id, v.version, &v.key_scope);
        let mut plain = old.open(&ad, &v.sealed).map_err(|_| integrity())?;
        let new = self
            .keys
            .for_write(&key_name(&v.key_scope, generation))
            .await?;
        let sealed = new.seal_gen(generation, &ad, &plain);
        zeroize::Zeroize::zeroize(&mut plain);
        sealed.map_err(|_| KeyError::Random.into())
    }

    /// Whether a stored version opens: its data key unwraps and its body
    /// authenticates (a restore proves every one does).
    pub async fn opens(&self, v: &phylax_store::SealedVersion) -> Result<bool, RepoError> {
        Ok(self.plaintext(v).await?.is_some())
    }

    /// A stored version's body, opened (zeroed when dropped); `None` when
    /// its key is gone or it does not authenticate.
    pub async fn plaintext(
        &self,
        v: &phylax_store::SealedVersion,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, RepoError> {
        use crate::data::keyring::key_name;
        let Some(g) = phylax_crypto::datakey::record_generation(&v.sealed) else {
            return Ok(None);
        };
        let key = match self.keys.for_read(&key_name(&v.key_scope, g)).await {
            Ok(k) => k,
            Err(KeyError::Unwrap | KeyError::Missing) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let ad = aad(&v.rtype, &v.id, v.version, &v.key_scope);
        Ok(key.open(&ad, &v.sealed).ok().map(zeroize::Zeroizing::new))
    }

    /// Give every current resource its index entries, once per instance
    /// (data written before the search index existed). Idempotent, so
    /// nodes starting together may both run it.
    pub async fn reindex_if_needed(&self) -> Result<u64, RepoError> {
        if self.meta.get_meta(INDEX_DONE).await?.is_some() {
            return Ok(0);
        }
        let n = self.rebuild_index(None, &|_| {}).await?;
        self.meta.put_meta_if_absent(INDEX_DONE, b"1").await?;
        Ok(n)
    }

    /// Index every current resource (written at `since_seq` or later,
    /// when given) again, under the key in force: a blind-index key
    /// rotation (docs/KEYS.md). A resource written meanwhile keeps the
    /// entries its write gave it (the write used the key in force too).
    /// `progress` hears the count so far. How many were indexed.
    pub async fn rebuild_index(
        &self,
        since_seq: Option<i64>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, RepoError> {
        let mut n = 0;
        for t in phylax_fhir::defs::definitions().resource_types() {
            let Some(rtype) = ResourceType::parse(t) else {
                continue;
            };
            let mut before = None;
            'pages: loop {
                let page = self.list(&rtype, before, 500).await?;
                let Some(last) = page.last() else { break };
                before = Some(last.seq);
                for v in &page {
                    if since_seq.is_some_and(|s| v.seq < s) {
                        break 'pages;
                    }
                    if let Some(b) = &v.body {
                        let rows = self.index(&rtype, b.json());
                        self.store
                            .set_index(rtype.as_str(), v.id.as_str(), Some(v.seq), rows)
                            .await?;
                        n += 1;
                    }
                }
                progress(n);
            }
        }
        Ok(n)
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
