//! Reads: opening sealed rows (authenticated, keys fetched once per page), current versions, versions, history, listings and unconfined searches for the scoped repository.

use super::*;

/// The key-ring name of the data key a sealed row needs: its scope, and
/// the generation its header names (a header that names none opens with
/// no key, and is reported as an integrity failure).
fn row_key_name<'a>(row: &'a StoredVersion, sealed: &[u8]) -> std::borrow::Cow<'a, str> {
    let generation = phylax_crypto::datakey::record_generation(sealed).unwrap_or(1);
    crate::data::keyring::key_name(&row.key_scope, generation)
}

impl Repo {
    /// Open a stored row. A row that fails to authenticate is an integrity
    /// failure: never served, always reported.
    pub(super) async fn open(&self, row: StoredVersion) -> Result<ResourceVersion, RepoError> {
        self.open_with(row, None).await
    }

    /// [`Repo::open`] with the row's data key, if the caller already has
    /// it (a page looks each key up once, see [`Repo::open_all`]).
    pub(super) async fn open_with(
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
                    None => match self.keys.for_read(&row_key_name(&row, &sealed)).await {
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

    /// Open a looked-up row that must exist and be live.
    pub(super) async fn open_live(
        &self,
        row: Option<StoredVersion>,
    ) -> Result<ResourceVersion, RepoError> {
        let v = self.open(row.ok_or(RepoError::NotFound)?).await?;
        if v.deleted {
            return Err(RepoError::Gone(v.version));
        }
        Ok(v)
    }

    pub(super) async fn open_all(
        &self,
        rows: Vec<StoredVersion>,
    ) -> Result<Vec<ResourceVersion>, RepoError> {
        // Each row's key is looked up in memory once, the page's under one
        // lock; those not there are fetched together (one round trip), then
        // the rows are opened one by one.
        let names: Vec<Option<std::borrow::Cow<'_, str>>> = rows
            .iter()
            .map(|r| r.sealed.as_ref().map(|s| row_key_name(r, s)))
            .collect();
        let keys = {
            let scopes: Vec<Option<&str>> = names.iter().map(|n| n.as_deref()).collect();
            self.keys.cached_all(&scopes)
        };
        self.keys
            .prefetch(
                names
                    .iter()
                    .zip(&keys)
                    .filter(|(n, k)| n.is_some() && k.is_none())
                    .filter_map(|(n, _)| n.as_deref()),
            )
            .await?;
        let keys: Vec<Option<Arc<DataKey>>> = keys;
        drop(names);
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

    /// How many current resources match a search (nothing opened);
    /// through [`crate::access::scoped::Scoped`], which adds the caller's
    /// conditions.
    pub async fn count_unconfined(&self, q: &SearchQuery) -> Result<u64, RepoError> {
        Ok(self.store.search_count(q).await?)
    }
}
