//! Transaction: every entry decided, ids and references resolved, then
//! every write committed at once through the scoped repository.

use super::entry::{at_entry, entry_error, Entry, Verb};
use super::routing::{dispatch, entry_router, status_line, EntryRoutes};
use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::access::scoped::{CheckedWrite, Current, Scoped};
use crate::base::clock::format_instant;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::pipeline;
use crate::rest::wire::{self, parse_type, prefer, Query};
use crate::state::FhirState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phylax_auth::policy::Interaction;
use phylax_fhir::{ResourceId, ResourceType};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What one transaction entry will do, once resolved.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Index into the planned writes; `created` picks 201 over 200.
    Write { planned: usize, created: bool },
    /// A conditional create that matched: nothing written.
    Existing(Box<ResourceVersion>),
    /// A delete with nothing to delete.
    NothingDeleted,
    /// A GET, answered after the commit.
    Get,
}

/// A PUT or POST waiting for its references to be rewritten.
pub(super) struct PendingPut {
    pub(super) idx: usize,
    /// What it replaces, as the caller may see it.
    pub(super) current: Current,
    pub(super) created: bool,
    pub(super) body: Value,
}

/// Audit bookkeeping per entry: (interaction, type, id).
pub(super) type Audited = (&'static str, Option<&'static str>, Option<String>);

pub(super) fn criteria(q: &str) -> Vec<(String, String)> {
    Query::parse(Some(q.to_owned())).without_internal().0
}

/// Resolve a conditional URL (`Type?criteria`) to at most one resource.
pub(super) async fn resolve_one(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    q: &str,
) -> Result<Option<ResourceVersion>, Failure> {
    let mut m = wire::conditional_matches(st, ctx, rtype, &criteria(q)).await?;
    if m.len() > 1 {
        return Err(Failure::PreconditionFailed);
    }
    Ok(m.pop())
}

/// Rewrite every `reference` in `v` found in `map`.
pub(super) fn rewrite_references(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match (k.as_str(), x) {
                    ("reference", Value::String(s)) => {
                        if let Some(to) = map.get(s.as_str()) {
                            *s = to.clone();
                        }
                    }
                    (_, x) => rewrite_references(x, map),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_references(x, map)),
        _ => {}
    }
}

pub(super) async fn transaction(
    st: &Arc<FhirState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    mut entries: Vec<Entry>,
    routes: EntryRoutes,
) -> Response {
    match run_transaction(st, ctx, h, &mut entries, routes).await {
        // Care relationships and consents it changed were refreshed as it
        // committed (`Scoped::commit`).
        Ok(r) => r,
        Err(e) => {
            let status = e.status().as_u16();
            let rule = e.denied_by();
            match pipeline::record(st, ctx, "transaction", AuditRefs::default(), status, rule).await
            {
                Ok(()) => e.into_response(),
                Err(a) => a.into_response(),
            }
        }
    }
}

/// A transaction's run: decide every entry, plan every write, commit them
/// at once, then answer in the Bundle's order.
pub(super) async fn run_transaction(
    st: &Arc<FhirState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    entries: &mut [Entry],
    routes: EntryRoutes,
) -> Result<Response, Failure> {
    let n = entries.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (entries[i].verb, i));
    // 1. Policy for every entry before anything else happens (one denial
    // refuses all); the rest runs as decided work.
    let decisions = interactions(entries, &order)?;
    pipeline::run_all(st, ctx, &decisions, || async {
        // 2. Resolve ids: deletes, then creates, then updates.
        let mut plan = Plan::new(st, ctx, n);
        for &i in &order {
            plan.resolve(i, &mut entries[i]).await?;
        }
        // 3. References: entries' fullUrls, then conditional references.
        plan.resolve_references().await?;
        // 4. Seal, then commit every write at once (every write's audit
        // record commits with the writes: all or nothing).
        let (written, outcomes, audited) = plan.commit().await?;
        // 5. Responses in the Bundle's order; GETs run now.
        respond(st, ctx, h, entries, routes, &written, &outcomes, audited).await
    })
    .await
}

/// Step 1: what the policy decides for every write entry, in order (GETs
/// are decided by their route when they run).
fn interactions(
    entries: &[Entry],
    order: &[usize],
) -> Result<Vec<(Interaction, ResourceType)>, Failure> {
    let mut out = Vec::new();
    for &i in order {
        let e = &entries[i];
        let (path, _) = e.path_and_query();
        let t = path.split('/').next().unwrap_or("");
        let rtype = parse_type(t).map_err(|_| entry_error(e.idx, "unknown resource type"))?;
        if rtype.as_str() == crate::rest::audit_api::AUDIT_TYPE && e.verb != Verb::Get {
            return Err(at_entry(e.idx, crate::rest::audit_api::refuse_write()));
        }
        let what = match e.verb {
            Verb::Delete => Interaction::Delete,
            Verb::Post => Interaction::Create,
            Verb::Put => Interaction::Update,
            Verb::Get => continue, // decided by the route when it runs
        };
        out.push((what, rtype));
    }
    Ok(out)
}

/// A transaction being planned (steps 2 to 4): what each entry will do.
struct Plan<'a> {
    st: &'a FhirState,
    ctx: &'a RequestCtx,
    /// Checks each written or replaced resource against the caller's
    /// reach and drafts the writes' audit records.
    scoped: Scoped<'a>,
    outcomes: Vec<Option<Outcome>>,
    audited: Vec<Option<Audited>>,
    planned: Vec<CheckedWrite>,
    pending: Vec<PendingPut>,
    /// Every resource an entry writes (one entry per resource).
    targets: HashSet<(String, String)>,
    /// `fullUrl`s and conditional references, to the `Type/id` they name.
    map: HashMap<String, String>,
}

/// An entry's request URL, split: `Type`, then `id` or `?criteria`.
struct Target {
    idx: usize,
    rtype: ResourceType,
    id: Option<String>,
    query: Option<String>,
}

impl<'a> Plan<'a> {
    fn new(st: &'a FhirState, ctx: &'a RequestCtx, n: usize) -> Plan<'a> {
        Plan {
            st,
            ctx,
            scoped: st.scoped(ctx),
            outcomes: (0..n).map(|_| None).collect(),
            audited: (0..n).map(|_| None).collect(),
            planned: Vec::new(),
            pending: Vec::new(),
            targets: HashSet::new(),
            map: HashMap::new(),
        }
    }

    fn claim(&mut self, idx: usize, rtype: &ResourceType, id: &ResourceId) -> Result<(), Failure> {
        if self.targets.insert((rtype.to_string(), id.to_string())) {
            Ok(())
        } else {
            Err(entry_error(
                idx,
                "the same resource appears in more than one entry",
            ))
        }
    }

    /// Step 2 for entry `i`.
    async fn resolve(&mut self, i: usize, e: &mut Entry) -> Result<(), Failure> {
        let idx = e.idx;
        let (path, q) = e.path_and_query();
        let mut segs = path.split('/');
        let rtype = parse_type(segs.next().unwrap_or(""))
            .map_err(|_| entry_error(idx, "unknown resource type"))?;
        let id = segs.next().map(str::to_owned);
        if segs.next().is_some() && e.verb != Verb::Get {
            return Err(entry_error(
                idx,
                "request.url must be Type, Type/id or Type?criteria",
            ));
        }
        let t = Target {
            idx,
            rtype,
            id,
            query: q.map(str::to_owned),
        };
        match e.verb {
            Verb::Get => {
                self.outcomes[i] = Some(Outcome::Get);
                Ok(())
            }
            Verb::Delete => self.delete(i, t).await,
            Verb::Post => self.post(i, e, t).await,
            Verb::Put => self.put(i, e, t).await,
        }
    }

    async fn delete(&mut self, i: usize, t: Target) -> Result<(), Failure> {
        let (idx, rtype) = (t.idx, &t.rtype);
        let conditional = t.query.is_some();
        let id = match (t.id, t.query) {
            (Some(id), None) => Some(
                ResourceId::parse(&id).ok_or_else(|| entry_error(idx, "not a valid FHIR id"))?,
            ),
            (None, Some(q)) => resolve_one(self.st, self.ctx, rtype, &q)
                .await
                .map_err(|x| at_entry(idx, x))?
                .map(|m| m.id),
            _ => return Err(entry_error(idx, "DELETE needs Type/id or Type?criteria")),
        };
        let cur = match &id {
            Some(id) => self
                .scoped
                .existing(rtype, id)
                .await
                .map_err(|x| at_entry(idx, x.into()))?,
            None => None,
        };
        match (id, cur) {
            (Some(id), Some(cur)) if !cur.is_deleted() => {
                let w = self
                    .scoped
                    .plan_delete(cur)
                    .map_err(|x| at_entry(idx, x.into()))?;
                self.claim(idx, rtype, &id)?;
                self.planned.push(w);
                self.outcomes[i] = Some(Outcome::Write {
                    planned: self.planned.len() - 1,
                    created: false,
                });
            }
            // Deleting an id that never existed: 404, as on its own.
            (Some(_), None) if !conditional => return Err(at_entry(idx, Failure::NotFound)),
            _ => {
                self.audited[i] = Some(("delete", Some(rtype.as_str()), None));
                self.outcomes[i] = Some(Outcome::NothingDeleted);
            }
        }
        Ok(())
    }

    async fn post(&mut self, i: usize, e: &mut Entry, t: Target) -> Result<(), Failure> {
        let (idx, rtype) = (t.idx, t.rtype);
        if t.id.is_some() || t.query.is_some() {
            return Err(entry_error(idx, "POST goes to Type, without an id"));
        }
        let body = e.resource.take().unwrap_or(Value::Null);
        check_body_type(idx, &body, &rtype)?;
        if let Some(cond) = &e.if_none_exist {
            let cond = cond.trim_start_matches('?').to_owned();
            if let Some(m) = resolve_one(self.st, self.ctx, &rtype, &cond)
                .await
                .map_err(|x| at_entry(idx, x))?
            {
                if let Some(f) = &e.full_url {
                    self.map.insert(f.clone(), format!("{}/{}", m.rtype, m.id));
                }
                self.audited[i] = Some(("create", Some(rtype.as_str()), Some(m.id.to_string())));
                self.outcomes[i] = Some(Outcome::Existing(Box::new(m)));
                return Ok(());
            }
        }
        let current = self.scoped.fresh(&rtype);
        let id = current.id().clone();
        self.claim(idx, &rtype, &id)?;
        if let Some(f) = &e.full_url {
            self.map.insert(f.clone(), format!("{rtype}/{id}"));
        }
        self.pending.push(PendingPut {
            idx: i,
            current,
            created: true,
            body,
        });
        Ok(())
    }

    /// The id a PUT entry writes: from its URL, or the one resource its
    /// criteria select, or (no match) the body's id or a new one.
    async fn put_id(&self, t: &Target, body_id: Option<&str>) -> Result<ResourceId, Failure> {
        let idx = t.idx;
        match (&t.id, &t.query) {
            (Some(id), None) => {
                let id =
                    ResourceId::parse(id).ok_or_else(|| entry_error(idx, "not a valid FHIR id"))?;
                if body_id != Some(id.as_str()) {
                    return Err(entry_error(
                        idx,
                        "the resource id must match the id in request.url",
                    ));
                }
                Ok(id)
            }
            (None, Some(q)) => {
                match resolve_one(self.st, self.ctx, &t.rtype, q)
                    .await
                    .map_err(|x| at_entry(idx, x))?
                {
                    Some(m) => {
                        if body_id.is_some_and(|b| b != m.id.as_str()) {
                            return Err(entry_error(
                                idx,
                                "the resource id does not match the resource the criteria select",
                            ));
                        }
                        Ok(m.id)
                    }
                    None => match body_id {
                        Some(b) => ResourceId::parse(b)
                            .ok_or_else(|| entry_error(idx, "not a valid FHIR id")),
                        None => Ok(ResourceId::from_uuid(uuid::Uuid::new_v4())),
                    },
                }
            }
            _ => Err(entry_error(idx, "PUT needs Type/id or Type?criteria")),
        }
    }

    async fn put(&mut self, i: usize, e: &mut Entry, t: Target) -> Result<(), Failure> {
        let idx = t.idx;
        let mut body = e.resource.take().unwrap_or(Value::Null);
        check_body_type(idx, &body, &t.rtype)?;
        let body_id = body.get("id").and_then(Value::as_str).map(str::to_owned);
        let id = self.put_id(&t, body_id.as_deref()).await?;
        let rtype = t.rtype;
        if let Some(o) = body.as_object_mut() {
            o.insert("id".into(), json!(id.as_str()));
        }
        self.claim(idx, &rtype, &id)?;
        let if_match = match &e.if_match {
            Some(m) => Some(
                wire::parse_etag(m)
                    .ok_or_else(|| entry_error(idx, "ifMatch must be an ETag such as W/\"3\""))?,
            ),
            None => None,
        };
        let current = self
            .scoped
            .current(&rtype, &id)
            .await
            .map_err(|x| at_entry(idx, x.into()))?;
        let created = if current.is_absent() {
            if if_match.is_some() {
                return Err(at_entry(idx, Failure::PreconditionFailed));
            }
            if !self.st.config.http.allow_update_create {
                return Err(at_entry(
                    idx,
                    Failure::MethodNotAllowed("update-as-create is not allowed on this server"),
                ));
            }
            pipeline::allow(self.st, self.ctx, Interaction::UpdateCreate, &rtype).await?;
            true
        } else {
            let cur_v = current.version().ok_or(Failure::Conflict)?;
            if if_match.is_some_and(|m| m != cur_v) {
                return Err(at_entry(idx, Failure::PreconditionFailed));
            }
            current.is_deleted()
        };
        if let Some(f) = &e.full_url {
            self.map.insert(f.clone(), format!("{rtype}/{id}"));
        }
        self.pending.push(PendingPut {
            idx: i,
            current,
            created,
            body,
        });
        Ok(())
    }

    /// Step 3: every reference the written resources make to an entry's
    /// `fullUrl` or by criteria, resolved.
    async fn resolve_references(&mut self) -> Result<(), Failure> {
        let mut refs = Vec::new();
        for p in &self.pending {
            wire::collect_references(&p.body, &mut refs);
        }
        refs.sort();
        refs.dedup();
        for r in refs {
            if self.map.contains_key(&r) {
                continue;
            }
            if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
                return Err(Failure::bad_request(
                    "a reference names a urn: fullUrl that no entry in the transaction has",
                ));
            }
            if let Some((t, q)) = r.split_once('?') {
                let rtype = parse_type(t).map_err(|_| {
                    Failure::bad_request("a conditional reference names an unknown type")
                })?;
                match resolve_one(self.st, self.ctx, &rtype, q).await? {
                    Some(m) => {
                        self.map.insert(r.clone(), format!("{}/{}", m.rtype, m.id));
                    }
                    None => return Err(Failure::PreconditionFailed),
                }
            }
        }
        Ok(())
    }

    /// Step 4: seal every pending write with its references rewritten,
    /// check it as it will be stored, and commit all at once. Returns the
    /// written versions and each entry's outcome and audit bookkeeping.
    #[allow(clippy::type_complexity)]
    async fn commit(
        mut self,
    ) -> Result<
        (
            Vec<ResourceVersion>,
            Vec<Option<Outcome>>,
            Vec<Option<Audited>>,
        ),
        Failure,
    > {
        for mut p in std::mem::take(&mut self.pending) {
            rewrite_references(&mut p.body, &self.map);
            // Validated once its references are final (a conditional
            // reference is not a valid reference until resolved).
            let (_, body) = wire::validated(p.body).map_err(|e| at_entry(p.idx, e))?;
            // Checked as it will be stored (references in canonical form).
            let w = self
                .scoped
                .plan_put(&p.current, body)
                .await
                .map_err(|x| at_entry(p.idx, x.into()))?;
            self.planned.push(w);
            self.outcomes[p.idx] = Some(Outcome::Write {
                planned: self.planned.len() - 1,
                created: p.created,
            });
        }
        let written = self.scoped.commit(self.planned).await?;
        Ok((written, self.outcomes, self.audited))
    }
}

/// Step 5: the response entries in the Bundle's order (GETs run now), the
/// audit records of entries that wrote nothing, and the transaction's own.
#[allow(clippy::too_many_arguments)]
async fn respond(
    st: &Arc<FhirState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    entries: &[Entry],
    routes: EntryRoutes,
    written: &[ResourceVersion],
    outcomes: &[Option<Outcome>],
    audited: Vec<Option<Audited>>,
) -> Result<Response, Failure> {
    let minimal = prefer(h).ret.as_deref() == Some("minimal");
    let svc = entry_router(st, routes);
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let entry = match &outcomes[i] {
            Some(Outcome::Write { planned, created }) => {
                let v = &written[*planned];
                let status = if v.deleted {
                    StatusCode::NO_CONTENT
                } else if *created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                version_entry(st, v, status, minimal)
            }
            Some(Outcome::Existing(v)) => version_entry(st, v, StatusCode::OK, minimal),
            Some(Outcome::NothingDeleted) => {
                json!({"response": {"status": status_line(StatusCode::NO_CONTENT)}})
            }
            Some(Outcome::Get) | None => dispatch(&svc, ctx, h, e).await.0,
        };
        out.push(entry);
    }
    // Entries that wrote nothing (an existing match, nothing to delete).
    for (i, a) in audited.into_iter().enumerate() {
        if let Some((what, t, id)) = a {
            let status = out[i]["response"]["status"]
                .as_str()
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            let mut refs = AuditRefs::default();
            if let (Some(t), Some(id)) = (t.and_then(ResourceType::parse), id) {
                refs.add(&t, &id, None);
            }
            pipeline::record(st, ctx, what, refs, status, None).await?;
        }
    }
    pipeline::record(st, ctx, "transaction", AuditRefs::default(), 200, None).await?;
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "transaction-response",
        "entry": out,
    });
    Ok(wire::fhir_json(StatusCode::OK, &bundle))
}

pub(super) fn check_body_type(
    idx: usize,
    body: &Value,
    rtype: &ResourceType,
) -> Result<(), Failure> {
    if body.get("resourceType").and_then(Value::as_str) == Some(rtype.as_str()) {
        Ok(())
    } else {
        Err(entry_error(
            idx,
            "the resource's type does not match request.url",
        ))
    }
}

pub(super) fn version_entry(
    st: &FhirState,
    v: &ResourceVersion,
    status: StatusCode,
    minimal: bool,
) -> Value {
    let mut resp = json!({"status": status_line(status)});
    if !v.deleted {
        resp["location"] = json!(format!("{}/{}/_history/{}", v.rtype, v.id, v.version));
    }
    resp["etag"] = json!(format!("W/\"{}\"", v.version));
    resp["lastModified"] = json!(format_instant(v.last_updated));
    let mut entry = json!({});
    if !v.deleted {
        entry["fullUrl"] = json!(format!("{}/{}/{}", st.fhir_base, v.rtype, v.id));
        if let (Some(b), false) = (&v.body, minimal) {
            entry["resource"] = b.json().clone();
        }
    }
    entry["response"] = resp;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_everywhere() {
        let mut v = json!({
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"reference": "Practitioner/x"}],
            "note": [{"text": "urn:uuid:1"}],
        });
        let mut refs = Vec::new();
        wire::collect_references(&v, &mut refs);
        assert_eq!(refs.len(), 3);
        let map = HashMap::from([
            ("urn:uuid:1".to_owned(), "Patient/a".to_owned()),
            ("urn:uuid:2".to_owned(), "Practitioner/b".to_owned()),
        ]);
        rewrite_references(&mut v, &map);
        assert_eq!(v["subject"]["reference"], "Patient/a");
        assert_eq!(v["performer"][0]["reference"], "Practitioner/b");
        assert_eq!(v["performer"][1]["reference"], "Practitioner/x");
        assert_eq!(v["note"][0]["text"], "urn:uuid:1", "only references change");
    }

    #[test]
    fn processing_order_is_the_specs() {
        let mut v = [Verb::Get, Verb::Put, Verb::Post, Verb::Delete];
        v.sort();
        assert_eq!(v, [Verb::Delete, Verb::Post, Verb::Put, Verb::Get]);
    }
}
