//! Writes: planning a version (sealed, indexed, references canonical), the write guard at every step, commit with the audit records, the create/update/delete interactions.

use super::*;

impl Repo {
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
        // Under the data-key generation in force (docs/KEYS.md).
        let generation = self.keys.data_generation();
        let key = self
            .keys
            .for_write(&crate::data::keyring::key_name(&scope, generation))
            .await?;
        let index = self.index(rtype, &body);
        let plain = serde_json::to_vec(&body).map_err(|e| StoreError::Backend(e.to_string()))?;
        let sealed = key
            .seal_gen(
                generation,
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
    pub(super) async fn seal_and_append(
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
    pub(super) async fn append(
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
}
