//! `POST /fhir`: batch and transaction Bundles.
//!
//! **Transaction** (all or nothing). Entries are processed in the order the
//! specification prescribes, whatever their order in the Bundle: DELETE,
//! then POST, then PUT, then GET. Every entry is decided by the policy
//! first; one denied entry refuses the whole Bundle (403) before anything is
//! read or written. Server ids are assigned to POST entries, conditional
//! operations and references (`Patient?identifier=…`) are resolved, and
//! every reference to an entry's `fullUrl` (`urn:uuid:…`) is rewritten to
//! the id it received. Only then are the resources sealed, and every write
//! is committed in **one database transaction** ([`crate::data::repo::Repo::commit`]): when any
//! entry fails, or a concurrent writer moved a resource in between (409),
//! nothing is stored. GET entries run after the commit.
//!
//! **Batch** (independent entries). Each entry is dispatched through the
//! same FHIR routes as a standalone request, with the Bundle's caller, so it
//! gets the same validation, policy decision and audit record, and its own
//! status in the response; one entry failing does not affect the others.
//!
//! Both are bounded by the body limit and `http.max_bundle_entries`.

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::access::scoped::CheckedWrite;
use crate::base::clock::format_instant;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::pipeline;
use crate::rest::wire::{self as fhir_api, parse_type, prefer, Query};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{Issue, ResourceId, ResourceType, VersionId};
use phylax_store::Precondition;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tower::ServiceExt;

/// The methods an entry may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verb {
    // Declaration order is the transaction processing order.
    Delete,
    Post,
    Put,
    Get,
}

impl Verb {
    fn parse(s: &str) -> Option<Verb> {
        match s {
            "DELETE" => Some(Verb::Delete),
            "POST" => Some(Verb::Post),
            "PUT" => Some(Verb::Put),
            "GET" | "HEAD" => Some(Verb::Get),
            _ => None,
        }
    }

    fn method(self) -> Method {
        match self {
            Verb::Delete => Method::DELETE,
            Verb::Post => Method::POST,
            Verb::Put => Method::PUT,
            Verb::Get => Method::GET,
        }
    }
}

/// One Bundle entry's request, parsed.
#[derive(Debug)]
struct Entry {
    idx: usize,
    verb: Verb,
    /// Relative to the FHIR base, without a leading slash: `Patient/1`,
    /// `Patient?identifier=x`.
    url: String,
    full_url: Option<String>,
    resource: Option<Value>,
    if_none_exist: Option<String>,
    if_match: Option<String>,
}

impl Entry {
    fn path_and_query(&self) -> (&str, Option<&str>) {
        match self.url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.url.as_str(), None),
        }
    }
}

/// Attach the entry's position to an error, so the client can tell which
/// entry failed. Only our own messages and element paths are shown.
fn at_entry(idx: usize, e: Failure) -> Failure {
    let locate = |issues: Vec<Issue>| {
        issues
            .into_iter()
            .map(|mut i| {
                i.diagnostics = format!("Bundle.entry[{idx}]: {}", i.diagnostics);
                i
            })
            .collect()
    };
    match e {
        Failure::BadRequest(is) => Failure::BadRequest(locate(is)),
        Failure::Unprocessable(is) => Failure::Unprocessable(locate(is)),
        other => other,
    }
}

fn entry_error(idx: usize, msg: &str) -> Failure {
    Failure::bad_request(format!("Bundle.entry[{idx}]: {msg}"))
}

/// Parse the entries of a batch or transaction Bundle. An entry that does
/// not parse fails a transaction, and only itself in a batch.
fn parse_entries(st: &AppState, bundle: &Value) -> Result<Vec<Result<Entry, Failure>>, Failure> {
    let empty = Vec::new();
    let raw = bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if raw.len() > st.config.http.max_bundle_entries {
        return Err(Failure::bad_request(format!(
            "a Bundle may have at most {} entries",
            st.config.http.max_bundle_entries
        )));
    }
    let base = format!("{}/", st.fhir_base);
    Ok(raw
        .iter()
        .enumerate()
        .map(|(idx, e)| parse_entry(&base, idx, e))
        .collect())
}

fn parse_entry(base: &str, idx: usize, e: &Value) -> Result<Entry, Failure> {
    let req = e
        .get("request")
        .ok_or_else(|| entry_error(idx, "request is required in a batch or transaction"))?;
    let verb = req
        .get("method")
        .and_then(Value::as_str)
        .and_then(Verb::parse)
        .ok_or_else(|| entry_error(idx, "request.method must be GET, HEAD, POST, PUT or DELETE"))?;
    let url = req
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| entry_error(idx, "request.url is required"))?;
    let url = url
        .strip_prefix(base)
        .unwrap_or(url)
        .trim_start_matches('/')
        .to_owned();
    let first = url.split(['?', '/']).next().unwrap_or("");
    let path = url.split('?').next().unwrap_or("");
    if first.is_empty() || path.contains(':') || url.contains('#') {
        // Includes a POST to the base (a Bundle inside a Bundle).
        return Err(entry_error(
            idx,
            "request.url must name a resource type on this server",
        ));
    }
    let resource = e.get("resource").cloned();
    if matches!(verb, Verb::Post | Verb::Put) && resource.is_none() {
        return Err(entry_error(idx, "POST and PUT entries need a resource"));
    }
    let s = |k: &str| req.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok(Entry {
        idx,
        verb,
        url,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_owned),
        resource,
        if_none_exist: s("ifNoneExist"),
        if_match: s("ifMatch"),
    })
}

/// `POST /fhir` with a Bundle of type `batch` or `transaction`.
pub async fn system_post(
    State(st): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(routes): Extension<EntryRoutes>,
    h: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let bundle = fhir_api::read_json(&st, &h, body).await?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(Failure::bad_request(
                "POST to the base accepts a Bundle of type batch or transaction",
            ));
        }
        // The Bundle's own structure is checked here; each entry's resource
        // is validated as that entry is processed (a batch entry fails on
        // its own; a transaction's after its references are resolved).
        let mut skeleton = bundle.clone();
        if let Some(es) = skeleton.get_mut("entry").and_then(Value::as_array_mut) {
            for e in es.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("resource");
            }
        }
        fhir_api::validated(skeleton)?;
        let entries = parse_entries(&st, &bundle)?;
        match bundle.get("type").and_then(Value::as_str) {
            Some("transaction") => {
                let entries = entries.into_iter().collect::<Result<Vec<_>, _>>()?;
                Ok(transaction(&st, &ctx, &h, entries, routes).await)
            }
            Some("batch") => Ok(batch(&st, &ctx, &h, entries, routes).await),
            _ => Err(Failure::bad_request(
                "POST to the base accepts a Bundle of type batch or transaction",
            )),
        }
    }
    .await;
    match result {
        // Entries' resources are masked like any response.
        Ok(r) => match crate::rest::mask::masks_of(&ctx) {
            Some(m) => crate::rest::mask::apply(r, m).await,
            None => r,
        },
        Err(e) => {
            let status = e.status().as_u16();
            match pipeline::record(&st, &ctx, "batch", AuditRefs::default(), status, None).await {
                Ok(()) => e.into_response(),
                Err(a) => a.into_response(),
            }
        }
    }
}

// ---------------------------------------------------------------- batch

/// Run one request through the FHIR routes as if it had arrived on its own,
/// with the Bundle's caller. Returns the response entry.
async fn dispatch(svc: &Router, ctx: &RequestCtx, outer: &HeaderMap, e: &Entry) -> (Value, usize) {
    let mut b = Request::builder()
        .method(e.verb.method())
        .uri(format!("/fhir/{}", e.url));
    for (k, v) in [
        (header::IF_MATCH.as_str(), &e.if_match),
        ("if-none-exist", &e.if_none_exist),
    ] {
        if let Some(v) = v.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            b = b.header(k, v);
        }
    }
    for v in outer.get_all("prefer") {
        b = b.header("prefer", v.clone());
    }
    let body = match &e.resource {
        Some(r) => {
            b = b.header(header::CONTENT_TYPE, "application/fhir+json");
            Body::from(r.to_string())
        }
        None => Body::empty(),
    };
    let req = match b.body(body) {
        Ok(mut r) => {
            r.extensions_mut().insert(ctx.clone());
            r
        }
        Err(_) => {
            return response_entry_sized(
                entry_error(e.idx, "request.url is not a valid URL").into_response(),
            )
            .await
        }
    };
    match svc.clone().oneshot(req).await {
        Ok(r) => response_entry_sized(r).await,
        Err(never) => match never {},
    }
}

/// How Bundle entries are routed: the FHIR routes, handed to the Bundle
/// handler as a request extension by the router that registers it
/// ([`crate::rest::routes`]), so entries run exactly as if they had arrived
/// on their own (and this module need not know the routes).
#[derive(Clone, Copy)]
pub struct EntryRoutes(pub fn() -> Router<Arc<AppState>>);

impl std::fmt::Debug for EntryRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryRoutes")
    }
}

/// The FHIR routes, for running entries as if they had arrived on their
/// own (built once per Bundle).
fn entry_router(st: &Arc<AppState>, routes: EntryRoutes) -> Router {
    (routes.0)()
        .with_state(st.clone())
        .layer(axum::middleware::from_fn(
            crate::rest::error::normalize_errors,
        ))
}

/// Turn a response into a Bundle response entry.
async fn response_entry_for(r: Response) -> Value {
    response_entry_sized(r).await.0
}

/// [`response_entry_for`], with the size of the entry's resource.
async fn response_entry_sized(r: Response) -> (Value, usize) {
    let status = r.status();
    let (location, etag, modified) = {
        let hv = |n: header::HeaderName| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            hv(header::LOCATION),
            hv(header::ETAG),
            hv(header::LAST_MODIFIED),
        )
    };
    let last_modified = modified.and_then(|d| {
        httpdate::parse_http_date(&d).ok().map(|t| {
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            format_instant(ms)
        })
    });
    // Responses of our own routes: bounded by the same limits.
    let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let size = bytes.len();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let mut resp = json!({"status": status_line(status)});
    if let Some(l) = location {
        resp["location"] = json!(l);
    }
    if let Some(e) = etag {
        resp["etag"] = json!(e);
    }
    if let Some(m) = last_modified {
        resp["lastModified"] = json!(m);
    }
    let mut entry = json!({});
    match body {
        Some(b) if !status.is_success() => resp["outcome"] = b,
        Some(b) => entry["resource"] = b,
        None => {}
    }
    entry["response"] = resp;
    (entry, size)
}

fn status_line(s: StatusCode) -> String {
    format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""))
        .trim_end()
        .to_owned()
}

async fn batch(
    st: &Arc<AppState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    entries: Vec<Result<Entry, Failure>>,
    routes: EntryRoutes,
) -> Response {
    let svc = entry_router(st, routes);
    let mut out = Vec::with_capacity(entries.len());
    // The answer is assembled in memory: past `http.max_response_bytes`
    // the remaining entries are not run, each answered with a
    // `too-costly` outcome (nothing of theirs happened), so a batch of
    // thousands of searches cannot hold gigabytes.
    let cap = st.config.http.max_response_bytes;
    let mut total = 0usize;
    for e in entries {
        if total > cap {
            let idx = e.as_ref().map(|e| e.idx).unwrap_or(0);
            out.push(
                response_entry_for(
                    Failure::Unprocessable(vec![phylax_fhir::Issue::error(
                        phylax_fhir::IssueCode::TooCostly,
                        format!(
                            "entry {idx} was not processed: the batch's answer passed {cap} bytes (http.max_response_bytes); send the rest in another batch"
                        ),
                    )])
                    .into_response(),
                )
                .await,
            );
            continue;
        }
        let (entry, size) = match e {
            Ok(e) => dispatch(&svc, ctx, h, &e).await,
            Err(err) => response_entry_sized(err.into_response()).await,
        };
        total = total.saturating_add(size);
        out.push(entry);
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "batch-response",
        "entry": out,
    });
    if let Err(e) = pipeline::record(st, ctx, "batch", AuditRefs::default(), 200, None).await {
        return e.into_response();
    }
    fhir_api::fhir_json(StatusCode::OK, &bundle)
}

// ---------------------------------------------------------- transaction

/// What one transaction entry will do, once resolved.
#[derive(Debug)]
enum Outcome {
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
struct PendingPut {
    idx: usize,
    rtype: ResourceType,
    id: ResourceId,
    version: VersionId,
    pre: Precondition,
    created: bool,
    body: Value,
    /// The live version it replaces, when the write's checks opened it.
    old: Option<crate::data::repo::ResourceVersion>,
}

/// Audit bookkeeping per entry: (interaction, type, id).
type Audited = (&'static str, Option<&'static str>, Option<String>);

/// Check the policy for an entry; a denial is recorded and refuses all.
async fn allow(
    st: &AppState,
    ctx: &RequestCtx,
    what: Interaction,
    rtype: &ResourceType,
) -> Result<(), Failure> {
    match decide(&ctx.principal, what, Some(rtype.as_str())) {
        Decision::Allow => Ok(()),
        Decision::Deny(rule) => {
            let _ = rtype;
            pipeline::record(
                st,
                ctx,
                what.as_str(),
                AuditRefs::default(),
                403,
                Some(rule),
            )
            .await?;
            Err(Failure::Forbidden)
        }
    }
}

fn criteria(q: &str) -> Vec<(String, String)> {
    Query::parse(Some(q.to_owned())).without_internal().0
}

/// Resolve a conditional URL (`Type?criteria`) to at most one resource.
async fn resolve_one(
    st: &AppState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    q: &str,
) -> Result<Option<ResourceVersion>, Failure> {
    let mut m = fhir_api::conditional_matches(st, ctx, rtype, &criteria(q)).await?;
    if m.len() > 1 {
        return Err(Failure::PreconditionFailed);
    }
    Ok(m.pop())
}

/// Rewrite every `reference` in `v` found in `map`.
fn rewrite_references(v: &mut Value, map: &HashMap<String, String>) {
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

async fn transaction(
    st: &Arc<AppState>,
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

async fn run_transaction(
    st: &Arc<AppState>,
    ctx: &RequestCtx,
    h: &HeaderMap,
    entries: &mut [Entry],
    routes: EntryRoutes,
) -> Result<Response, Failure> {
    let n = entries.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (entries[i].verb, i));

    // 1. Policy for every entry before anything else happens.
    for &i in &order {
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
        allow(st, ctx, what, &rtype).await?;
    }

    // Checks each written or replaced resource against the caller's reach
    // and drafts the writes' audit records.
    let scoped = st.scoped(ctx);

    // 2. Resolve ids: deletes, then creates, then updates.
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut audited: Vec<Option<Audited>> = (0..n).map(|_| None).collect();
    let mut planned: Vec<CheckedWrite> = Vec::new();
    let mut pending: Vec<PendingPut> = Vec::new();
    let mut targets: HashSet<(String, String)> = HashSet::new();
    let mut map: HashMap<String, String> = HashMap::new();
    let mut claim = |idx: usize, rtype: &ResourceType, id: &ResourceId| {
        if targets.insert((rtype.to_string(), id.to_string())) {
            Ok(())
        } else {
            Err(entry_error(
                idx,
                "the same resource appears in more than one entry",
            ))
        }
    };
    for &i in &order {
        let e = &mut entries[i];
        let idx = e.idx;
        let (path, q) = e.path_and_query();
        let mut segs = path.split('/');
        let rtype = parse_type(segs.next().unwrap_or(""))
            .map_err(|_| entry_error(idx, "unknown resource type"))?;
        let seg_id = segs.next().map(str::to_owned);
        if segs.next().is_some() && e.verb != Verb::Get {
            return Err(entry_error(
                idx,
                "request.url must be Type, Type/id or Type?criteria",
            ));
        }
        let q = q.map(str::to_owned);
        let conditional = q.is_some();
        match e.verb {
            Verb::Get => outcomes[i] = Some(Outcome::Get),
            Verb::Delete => {
                let id = match (seg_id, q) {
                    (Some(id), None) => Some(
                        ResourceId::parse(&id)
                            .ok_or_else(|| entry_error(idx, "not a valid FHIR id"))?,
                    ),
                    (None, Some(q)) => resolve_one(st, ctx, &rtype, &q)
                        .await
                        .map_err(|x| at_entry(idx, x))?
                        .map(|m| m.id),
                    _ => return Err(entry_error(idx, "DELETE needs Type/id or Type?criteria")),
                };
                let cur = match &id {
                    Some(id) => scoped.current_row(&rtype, id).await?,
                    None => None,
                };
                let old = match &cur {
                    Some(_) => scoped
                        .guard_existing(&rtype, cur.as_ref())
                        .await
                        .map_err(|x| at_entry(idx, x.into()))?,
                    None => None,
                };
                match (id, cur) {
                    (Some(id), Some(cur)) if !cur.deleted => {
                        let w = scoped.plan_delete(&rtype, &id, &cur)?;
                        let w = scoped
                            .check(w, old.as_ref(), "delete")
                            .map_err(|x| at_entry(idx, x.into()))?;
                        claim(idx, &rtype, &id)?;
                        planned.push(w);
                        outcomes[i] = Some(Outcome::Write {
                            planned: planned.len() - 1,
                            created: false,
                        });
                    }
                    // Deleting an id that never existed: 404, as on its own.
                    (Some(_), None) if !conditional => {
                        return Err(at_entry(idx, Failure::NotFound))
                    }
                    _ => {
                        audited[i] = Some(("delete", Some(rtype.as_str()), None));
                        outcomes[i] = Some(Outcome::NothingDeleted);
                    }
                }
            }
            Verb::Post => {
                if seg_id.is_some() || q.is_some() {
                    return Err(entry_error(idx, "POST goes to Type, without an id"));
                }
                let body = e.resource.take().unwrap_or(Value::Null);
                check_body_type(idx, &body, &rtype)?;
                if let Some(cond) = &e.if_none_exist {
                    let cond = cond.trim_start_matches('?').to_owned();
                    if let Some(m) = resolve_one(st, ctx, &rtype, &cond)
                        .await
                        .map_err(|x| at_entry(idx, x))?
                    {
                        if let Some(f) = &e.full_url {
                            map.insert(f.clone(), format!("{}/{}", m.rtype, m.id));
                        }
                        audited[i] = Some(("create", Some(rtype.as_str()), Some(m.id.to_string())));
                        outcomes[i] = Some(Outcome::Existing(Box::new(m)));
                        continue;
                    }
                }
                let id = ResourceId::from_uuid(uuid::Uuid::new_v4());
                claim(idx, &rtype, &id)?;
                if let Some(f) = &e.full_url {
                    map.insert(f.clone(), format!("{rtype}/{id}"));
                }
                pending.push(PendingPut {
                    idx: i,
                    rtype,
                    id,
                    version: VersionId::FIRST,
                    pre: Precondition::Absent,
                    created: true,
                    body,
                    old: None,
                });
            }
            Verb::Put => {
                let mut body = e.resource.take().unwrap_or(Value::Null);
                check_body_type(idx, &body, &rtype)?;
                let body_id = body.get("id").and_then(Value::as_str).map(str::to_owned);
                let id = match (seg_id, q) {
                    (Some(id), None) => {
                        let id = ResourceId::parse(&id)
                            .ok_or_else(|| entry_error(idx, "not a valid FHIR id"))?;
                        if body_id.as_deref() != Some(id.as_str()) {
                            return Err(entry_error(
                                idx,
                                "the resource id must match the id in request.url",
                            ));
                        }
                        id
                    }
                    (None, Some(q)) => {
                        match resolve_one(st, ctx, &rtype, &q)
                            .await
                            .map_err(|x| at_entry(idx, x))?
                        {
                            Some(m) => {
                                if body_id.as_deref().is_some_and(|b| b != m.id.as_str()) {
                                    return Err(entry_error(
                                        idx,
                                        "the resource id does not match the resource the criteria select",
                                    ));
                                }
                                m.id
                            }
                            None => match body_id.as_deref() {
                                Some(b) => ResourceId::parse(b)
                                    .ok_or_else(|| entry_error(idx, "not a valid FHIR id"))?,
                                None => ResourceId::from_uuid(uuid::Uuid::new_v4()),
                            },
                        }
                    }
                    _ => return Err(entry_error(idx, "PUT needs Type/id or Type?criteria")),
                };
                if let Some(o) = body.as_object_mut() {
                    o.insert("id".into(), json!(id.as_str()));
                }
                claim(idx, &rtype, &id)?;
                let if_match = match &e.if_match {
                    Some(m) => Some(fhir_api::parse_etag(m).ok_or_else(|| {
                        entry_error(idx, "ifMatch must be an ETag such as W/\"3\"")
                    })?),
                    None => None,
                };
                let cur = scoped.current_row(&rtype, &id).await?;
                let old = scoped
                    .guard_existing(&rtype, cur.as_ref())
                    .await
                    .map_err(|x| at_entry(idx, x.into()))?;
                let (version, pre, created) = match cur {
                    None => {
                        if if_match.is_some() {
                            return Err(at_entry(idx, Failure::PreconditionFailed));
                        }
                        if !st.config.http.allow_update_create {
                            return Err(at_entry(
                                idx,
                                Failure::MethodNotAllowed(
                                    "update-as-create is not allowed on this server",
                                ),
                            ));
                        }
                        allow(st, ctx, Interaction::UpdateCreate, &rtype).await?;
                        (VersionId::FIRST, Precondition::Absent, true)
                    }
                    Some(cur) => {
                        let cur_v = VersionId::new(cur.version).ok_or(Failure::Conflict)?;
                        if if_match.is_some_and(|m| m != cur_v) {
                            return Err(at_entry(idx, Failure::PreconditionFailed));
                        }
                        (
                            cur_v.next(),
                            Precondition::CurrentIs(cur.version),
                            cur.deleted,
                        )
                    }
                };
                if let Some(f) = &e.full_url {
                    map.insert(f.clone(), format!("{rtype}/{id}"));
                }
                pending.push(PendingPut {
                    idx: i,
                    rtype,
                    id,
                    version,
                    pre,
                    created,
                    body,
                    old,
                });
            }
        }
    }

    // 3. References: entries' fullUrls, then conditional references.
    let mut refs = Vec::new();
    for p in &pending {
        fhir_api::collect_references(&p.body, &mut refs);
    }
    refs.sort();
    refs.dedup();
    for r in refs {
        if map.contains_key(&r) {
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
            match resolve_one(st, ctx, &rtype, q).await? {
                Some(m) => {
                    map.insert(r.clone(), format!("{}/{}", m.rtype, m.id));
                }
                None => return Err(Failure::PreconditionFailed),
            }
        }
    }

    // 4. Seal, then commit every write at once.
    for mut p in pending {
        rewrite_references(&mut p.body, &map);
        // Validated once its references are final (a conditional reference
        // is not a valid reference until resolved).
        let (_, body) = fhir_api::validated(p.body).map_err(|e| at_entry(p.idx, e))?;
        p.body = body;
        let w = scoped
            .plan_put(&p.rtype, &p.id, p.version, p.body, p.pre)
            .await?;
        // Checked as it will be stored (references in canonical form).
        let what = if p.created { "create" } else { "update" };
        let w = scoped
            .check(w, p.old.as_ref(), what)
            .map_err(|x| at_entry(p.idx, x.into()))?;
        planned.push(w);
        outcomes[p.idx] = Some(Outcome::Write {
            planned: planned.len() - 1,
            created: p.created,
        });
    }
    // Every write's audit record commits with the writes: all or nothing.
    let written = scoped.commit(planned).await?;

    // 5. Responses in the Bundle's order; GETs run now.
    let minimal = prefer(h).ret.as_deref() == Some("minimal");
    let svc = entry_router(st, routes);
    let mut out = Vec::with_capacity(n);
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
    Ok(fhir_api::fhir_json(StatusCode::OK, &bundle))
}

fn check_body_type(idx: usize, body: &Value, rtype: &ResourceType) -> Result<(), Failure> {
    if body.get("resourceType").and_then(Value::as_str) == Some(rtype.as_str()) {
        Ok(())
    } else {
        Err(entry_error(
            idx,
            "the resource's type does not match request.url",
        ))
    }
}

fn version_entry(st: &AppState, v: &ResourceVersion, status: StatusCode, minimal: bool) -> Value {
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
        fhir_api::collect_references(&v, &mut refs);
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
