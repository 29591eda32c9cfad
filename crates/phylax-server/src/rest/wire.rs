//! What every REST handler shares on the wire: typed inputs (resource
//! types, query parameters, `Prefer`, `Accept`, bodies read within their
//! limits and parsed strictly), outputs (FHIR JSON, Bundles built as they
//! stream, paging cursors), and conditional-interaction matching.

use crate::access::ctx::{AuditRefs, RequestCtx};
use crate::base::clock::format_instant;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::error::{outcome_response, FHIR_JSON};
use crate::state::FhirState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::json::parse_strict;
use phylax_fhir::validate::validate_resource;
use phylax_fhir::{Issue, IssueCode, OperationOutcome, ResourceType, Severity, VersionId};
use serde_json::{json, Value};
use std::sync::Arc;

pub(crate) type St = State<Arc<FhirState>>;

// ---------------------------------------------------------------- inputs

pub(crate) fn parse_type(t: &str) -> Result<ResourceType, Failure> {
    ResourceType::parse(t).ok_or(Failure::UnknownType)
}

/// Query parameters, decoded. Never logged.
pub(crate) struct Query(pub(crate) Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<String>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    /// Drop parameters only the server may set (they arrive in sealed
    /// cursors, never from clients).
    pub(crate) fn without_internal(mut self) -> Query {
        self.0
            .retain(|(k, _)| k != crate::data::search::COMPARTMENT_PARAM);
        self
    }
}

/// `Prefer` header values Phylax honours.
#[derive(Default)]
pub(crate) struct Prefer {
    pub(crate) ret: Option<String>,
    pub(crate) strict: bool,
}

pub(crate) fn prefer(h: &HeaderMap) -> Prefer {
    let mut p = Prefer::default();
    for v in h.get_all("prefer").iter().filter_map(|v| v.to_str().ok()) {
        for part in v.split([',', ';']).map(str::trim) {
            if let Some(r) = part.strip_prefix("return=") {
                p.ret = Some(r.trim_matches('"').to_owned());
            } else if part == "handling=strict" {
                p.strict = true;
            }
        }
    }
    p
}

/// Refuse formats other than JSON (`_format` or `Accept`).
pub(crate) fn check_accept(h: &HeaderMap, q: &Query) -> Result<(), Failure> {
    if let Some(f) = q.get("_format") {
        if !matches!(f, "json" | "application/json" | "application/fhir+json") {
            return Err(Failure::NotAcceptable);
        }
        return Ok(());
    }
    let Some(accept) = h.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let ok = accept.split(',').any(|a| {
        let m = a.split(';').next().unwrap_or("").trim();
        matches!(
            m,
            "*/*" | "application/*" | "application/json" | "application/fhir+json" | ""
        )
    });
    if ok {
        Ok(())
    } else {
        Err(Failure::NotAcceptable)
    }
}

pub(crate) fn check_content_type(h: &HeaderMap) -> Result<(), Failure> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/fhir+json" || mime == "application/json" {
        Ok(())
    } else {
        Err(Failure::UnsupportedMediaType)
    }
}

/// Read the body within the configured limit, parse strictly, validate.
pub(crate) async fn read_resource(
    st: &FhirState,
    h: &HeaderMap,
    body: Body,
) -> Result<(ResourceType, Value), Failure> {
    let value = read_json(st, h, body).await?;
    validated(value)
}

/// Validate a parsed resource: structural problems (not the right shape of
/// JSON for FHIR) are 400, content rule violations 422.
pub(crate) fn validated(value: Value) -> Result<(ResourceType, Value), Failure> {
    match validate_resource(&value) {
        Ok(t) => Ok((t, value)),
        Err(issues) => {
            if issues
                .iter()
                .any(|i| matches!(i.code, IssueCode::Structure | IssueCode::NotSupported))
            {
                Err(Failure::BadRequest(issues))
            } else {
                Err(Failure::Unprocessable(issues))
            }
        }
    }
}

/// How much of an oversized body is read and dropped before the 413
/// goes out: a client still sending when the answer comes would see a
/// reset stream (HTTP/2) or a closed connection instead of the 413. Past
/// this the connection's answer is cut short; the body deadline bounds
/// the time it takes (`crate::net::conn`).
pub(crate) const DRAIN_MAX: usize = 64 * 1024 * 1024;

/// Read a request body of at most `limit` bytes: 413 past the limit
/// (announced or not; the rest is drained up to [`DRAIN_MAX`] so the
/// client reads the answer over HTTP/1.1 and HTTP/2 alike), 408 past the
/// body deadline, 400 if the body breaks off.
pub(crate) async fn read_body(h: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, Failure> {
    use http_body_util::BodyExt;
    let announced = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = body;
    let mut out: Vec<u8> = Vec::with_capacity(announced.unwrap_or(0).min(limit));
    let mut seen = 0usize;
    let too_big = announced.is_some_and(|n| n > limit);
    if too_big && announced.is_some_and(|n| n > DRAIN_MAX) {
        return Err(Failure::PayloadTooLarge(limit));
    }
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(|e| body_error(&e))?.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_MAX {
            break;
        }
        if !too_big && seen <= limit {
            out.extend_from_slice(&chunk);
        }
    }
    if too_big || seen > limit {
        return Err(Failure::PayloadTooLarge(limit));
    }
    Ok(out)
}

/// What a broken body answers: 408 past the body deadline
/// (`crate::net::conn`), else 400.
pub(crate) fn body_error(e: &axum::Error) -> Failure {
    if crate::net::conn::is_body_timeout(e) {
        Failure::RequestTimeout
    } else {
        Failure::bad_request("the request body could not be read")
    }
}

// ------------------------------------------------------- operation input

/// The `Parameters` resource an operation was sent (400 otherwise).
pub(crate) fn parameters(value: &Value) -> Result<&Value, Failure> {
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(Failure::bad_request("send a Parameters resource"));
    }
    Ok(value)
}

/// The parameter called `name` of a `Parameters` resource.
pub(crate) fn param<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

/// The required `reason` (valueString) of an operation, trimmed: at most
/// `max` characters, and no control characters (reasons are shown to
/// reviewers in terminals, where escapes could rewrite the screen).
pub(crate) fn reason(parameters: &Value, max: usize) -> Result<&str, Failure> {
    let reason = param(parameters, "reason")
        .and_then(|p| p.get("valueString"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| Failure::bad_request("a reason (valueString) is required"))?;
    if reason.chars().any(char::is_control) {
        return Err(Failure::bad_request(
            "the reason may not contain control characters (line breaks, escapes)",
        ));
    }
    if reason.chars().count() > max {
        return Err(Failure::bad_request(format!(
            "the reason is limited to {max} characters"
        )));
    }
    Ok(reason)
}

/// Read the body within the configured limit and parse it strictly.
pub(crate) async fn read_json(st: &FhirState, h: &HeaderMap, body: Body) -> Result<Value, Failure> {
    check_content_type(h)?;
    let limit = st.config.http.max_body_bytes;
    let bytes = read_body(h, body, limit).await?;
    parse_strict(&bytes).map_err(|e| {
        Failure::BadRequest(vec![Issue::error(
            IssueCode::Structure,
            format!("invalid JSON: {}", e.message()),
        )])
    })
}

pub(crate) fn parse_if_match(h: &HeaderMap) -> Result<Option<VersionId>, Failure> {
    let Some(v) = h.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| Failure::bad_request("malformed If-Match"))?;
    parse_etag(s)
        .map(Some)
        .ok_or_else(|| Failure::bad_request("If-Match must be an ETag such as W/\"3\""))
}

/// The version an ETag names (`W/"3"`, `"3"` or `3`).
pub(crate) fn parse_etag(s: &str) -> Option<VersionId> {
    let s = s.trim();
    VersionId::parse(s.strip_prefix("W/").unwrap_or(s).trim_matches('"'))
}

// ---------------------------------------------------------------- outputs

pub(crate) fn fhir_json(status: StatusCode, v: &Value) -> Response {
    // Straight to bytes: `to_string` goes through `fmt::Write`, slower for
    // a large Bundle. Serialising a `Value` cannot fail (its keys are
    // strings, its numbers finite); the fallback only avoids an unwrap.
    let body = serde_json::to_vec(v).unwrap_or_else(|_| v.to_string().into_bytes());
    fhir_bytes(status, body)
}

pub(crate) fn fhir_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

/// One resource as the response body: its stored text when it has one.
pub(crate) fn resource_json(status: StatusCode, b: &crate::data::repo::Resource) -> Response {
    fhir_bytes(status, b.to_bytes())
}

/// A Bundle whose resources may be stored JSON text (see
/// `repo::Resource`): search pages are built as this, not as a `Value`,
/// and written by hand around the stored text, which goes in as it is.
pub(crate) struct BundleOut {
    head: serde_json::Map<String, Value>,
    entry: Vec<EntryOut>,
}

impl BundleOut {
    pub(crate) fn set_total(&mut self, n: u64) {
        self.head.insert("total".into(), n.into());
    }

    /// The Bundle's JSON: the head's members, then `"entry"`.
    fn write(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        // The head is a map of plain values; its closing brace is replaced
        // by the entries.
        serde_json::to_writer(&mut *out, &self.head)?;
        out.pop();
        if !self.head.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"entry\":[");
        for (i, e) in self.entry.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            if let Some(u) = &e.full_url {
                out.extend_from_slice(b"\"fullUrl\":");
                serde_json::to_writer(&mut *out, u)?;
                out.push(b',');
            }
            out.extend_from_slice(b"\"resource\":");
            e.resource.write_to(out)?;
            out.extend_from_slice(b",\"search\":{\"mode\":");
            serde_json::to_writer(&mut *out, e.mode)?;
            out.extend_from_slice(b"}}");
        }
        out.extend_from_slice(b"]}");
        Ok(())
    }

    pub(crate) fn into_response(self, status: StatusCode) -> Response {
        // Sized up front: stored text goes in as it is, so its length is
        // most of the body's, and growing a page of fifty resources by
        // doubling copied it several times.
        let est = 512
            + self
                .entry
                .iter()
                .map(|e| {
                    160 + e.full_url.as_ref().map_or(0, String::len)
                        + e.resource.text_len().unwrap_or(1024)
                })
                .sum::<usize>();
        let mut body = Vec::with_capacity(est);
        // Every part serialises infallibly (string keys, finite numbers,
        // authenticated stored text); an error would be a bug.
        match self.write(&mut body) {
            Ok(()) => fhir_bytes(status, body),
            Err(e) => Failure::Internal(format!("serialising a Bundle: {e}")).into_response(),
        }
    }
}

/// An entry of a [`BundleOut`].
pub(crate) struct EntryOut {
    full_url: Option<String>,
    resource: crate::data::repo::BodyOut,
    /// `search.mode`.
    mode: &'static str,
}

impl EntryOut {
    pub(crate) fn new(
        full_url: Option<String>,
        resource: crate::data::repo::BodyOut,
        mode: &'static str,
    ) -> EntryOut {
        EntryOut {
            full_url,
            resource,
            mode,
        }
    }
}

pub(crate) fn http_date(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    httpdate::fmt_http_date(t)
}

pub(crate) fn version_headers(
    r: &mut Response,
    st: &FhirState,
    v: &ResourceVersion,
    location: bool,
) {
    let h = r.headers_mut();
    if let Ok(e) = HeaderValue::from_str(&format!("W/\"{}\"", v.version)) {
        h.insert(header::ETAG, e);
    }
    if let Ok(d) = HeaderValue::from_str(&http_date(v.last_updated)) {
        h.insert(header::LAST_MODIFIED, d);
    }
    if location {
        let loc = format!(
            "{}/{}/{}/_history/{}",
            st.fhir_base, v.rtype, v.id, v.version
        );
        if let Ok(l) = HeaderValue::from_str(&loc) {
            h.insert(header::LOCATION, l.clone());
            h.insert(header::CONTENT_LOCATION, l);
        }
    }
}

/// The response to a successful write, honouring `Prefer: return=`.
pub(crate) fn write_response(
    st: &FhirState,
    h: &HeaderMap,
    status: StatusCode,
    v: &ResourceVersion,
) -> Response {
    let mut r = match prefer(h).ret.as_deref() {
        Some("minimal") => status.into_response(),
        Some("OperationOutcome") => {
            let oo = OperationOutcome::single(Issue {
                severity: Severity::Information,
                code: IssueCode::Informational,
                diagnostics: format!(
                    "{} {}",
                    if status == StatusCode::CREATED {
                        "created"
                    } else {
                        "updated"
                    },
                    v.rtype
                ),
                expression: None,
            });
            outcome_response(status, &oo)
        }
        _ => match &v.body {
            Some(b) => resource_json(status, b),
            None => status.into_response(),
        },
    };
    version_headers(&mut r, st, v, true);
    r.extensions_mut().insert(AuditRefs::of_versions([v]));
    r
}

/// Mark a write's response: its audit record was committed with it.
pub(crate) fn committed(mut r: Response, proof: crate::access::scoped::AuditCommitted) -> Response {
    r.extensions_mut().insert(proof);
    r
}

pub(crate) fn read_response(st: &FhirState, v: &ResourceVersion) -> Response {
    let mut r = match &v.body {
        Some(b) => resource_json(StatusCode::OK, b),
        None => Failure::Gone.into_response(),
    };
    version_headers(&mut r, st, v, false);
    r.extensions_mut().insert(AuditRefs::of_versions([v]));
    r
}

/// A Bundle of results (`searchset` or `history`).
///
/// Built by moving `links` and `entries` in: `json!` would serialise them
/// into a new tree (a deep copy of every resource in the page), which was
/// a large share of a many-result search's CPU, most of it in `malloc`.
pub(crate) fn bundle(kind: &str, links: Vec<Value>, entries: Vec<Value>) -> Value {
    let mut m = bundle_head(kind, links);
    m.insert("entry".into(), Value::Array(entries));
    Value::Object(m)
}

pub(crate) fn bundle_head(kind: &str, links: Vec<Value>) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("resourceType".into(), "Bundle".into());
    m.insert("id".into(), uuid::Uuid::new_v4().to_string().into());
    m.insert(
        "meta".into(),
        json!({"lastUpdated": format_instant(crate::base::clock::now_ms())}),
    );
    m.insert("type".into(), kind.into());
    m.insert("link".into(), Value::Array(links));
    m
}

/// A [`BundleOut`] (see `bundle`).
pub(crate) fn bundle_out(kind: &str, links: Vec<Value>, entries: Vec<EntryOut>) -> BundleOut {
    BundleOut {
        head: bundle_head(kind, links),
        entry: entries,
    }
}

/// A Bundle entry for a resource; `resource` is moved in, not copied
/// (see `bundle`).
pub(crate) fn entry(full_url: String, resource: Value, mode: &str) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("fullUrl".into(), full_url.into());
    m.insert("resource".into(), resource);
    m.insert("search".into(), json!({ "mode": mode }));
    Value::Object(m)
}

// ---------------------------------------------------------------- cursors

/// Paging cursors are opaque and MACed: `base64url(state).base64url(tag)`,
/// where the state names the listing it belongs to. An edited cursor, or one
/// replayed against another listing, is refused.
pub(crate) fn make_cursor(st: &FhirState, listing: &str, before_seq: i64) -> String {
    let msg = format!("v1|{listing}|{before_seq}");
    let tag = st.cursors.sign(msg.as_bytes());
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&msg),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

pub(crate) fn open_cursor(st: &FhirState, listing: &str, cursor: &str) -> Result<i64, Failure> {
    let bad = || Failure::bad_request("invalid or tampered paging cursor");
    let (m, t) = cursor.split_once('.').ok_or_else(bad)?;
    let msg = URL_SAFE_NO_PAD.decode(m).map_err(|_| bad())?;
    let tag = URL_SAFE_NO_PAD.decode(t).map_err(|_| bad())?;
    if !st.cursors.verify(&msg, &tag) {
        return Err(bad());
    }
    let msg = String::from_utf8(msg).map_err(|_| bad())?;
    let rest = msg.strip_prefix("v1|").ok_or_else(bad)?;
    let (l, seq) = rest.rsplit_once('|').ok_or_else(bad)?;
    if l != listing {
        return Err(bad());
    }
    seq.parse().map_err(|_| bad())
}

pub(crate) fn page_size(st: &FhirState, q: &Query) -> Result<u32, Failure> {
    match q.get("_count") {
        None => Ok(st.config.http.default_page_size),
        Some(c) => {
            let n: u64 = c
                .parse()
                .map_err(|_| Failure::bad_request("_count must be a non-negative integer"))?;
            Ok(n.clamp(1, st.config.http.max_page_size as u64) as u32)
        }
    }
}

pub(crate) fn parse_since(q: &Query) -> Result<Option<i64>, Failure> {
    let Some(s) = q.get("_since") else {
        return Ok(None);
    };
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| Some(d.timestamp_millis()))
        .map_err(|_| Failure::bad_request("_since must be an instant such as 2024-01-01T00:00:00Z"))
}

// ---------------------------------------------------------------- handlers

/// The resources a conditional operation's search selects (at most two:
/// the caller only needs to know none, one, or several). The caller must
/// be allowed to search the type; empty criteria are refused, since they
/// would select everything.
pub(crate) async fn conditional_matches(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<Vec<crate::data::repo::ResourceVersion>, Failure> {
    if decide(
        ctx.principal(),
        Interaction::SearchType,
        Some(rtype.as_str()),
    ) != Decision::Allow
    {
        return Err(Failure::Forbidden);
    }
    crate::rest::mask::check_params(ctx, rtype, params)?;
    let parsed = crate::data::search::parse(&st.gate.blind_key(), &st.fhir_base, rtype, params)?;
    if !parsed.unknown.is_empty() {
        // Ignoring an unknown criterion could match the wrong resource.
        return Err(Failure::BadRequest(
            parsed
                .unknown
                .iter()
                .map(|k| {
                    Issue::error(
                        IssueCode::NotSupported,
                        format!("unsupported search parameter: {k}"),
                    )
                })
                .collect(),
        ));
    }
    if parsed.and.is_empty() {
        return Err(Failure::bad_request(
            "a conditional operation needs search criteria",
        ));
    }
    // Only resources the caller may see can match (a conditional update
    // or delete must not reach past them).
    let q = phylax_store::SearchQuery {
        rtype: rtype.to_string(),
        and: parsed.and,
        before_seq: None,
        limit: 2,
    };
    st.scoped(ctx).search(q).await
}

/// Every `reference` string anywhere in `v`.
pub(crate) fn collect_references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("reference", Value::String(s)) => out.push(s.clone()),
                    _ => collect_references(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_references(x, out)),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::repo::BodyOut;

    fn written(b: &BundleOut) -> Value {
        let mut out = Vec::new();
        b.write(&mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn bundles_written_by_hand_are_the_json_they_describe() {
        let text = r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Ünïcødé \"q\""}]}"#;
        let tree = json!({"resourceType": "OperationOutcome", "issue": []});
        let mut b = bundle_out(
            "searchset",
            vec![json!({"relation": "self", "url": "https://x/fhir/Patient?a=\"b\""})],
            vec![
                EntryOut::new(
                    Some("https://x/fhir/Patient/p1".into()),
                    BodyOut::Text(text.into()),
                    "match",
                ),
                EntryOut::new(None, BodyOut::Tree(tree.clone()), "outcome"),
            ],
        );
        b.set_total(7);
        let v = written(&b);
        assert_eq!(v["resourceType"], "Bundle");
        assert_eq!(v["type"], "searchset");
        assert_eq!(v["total"], 7);
        assert_eq!(v["link"][0]["url"], "https://x/fhir/Patient?a=\"b\"");
        assert_eq!(
            v["entry"],
            json!([
                {"fullUrl": "https://x/fhir/Patient/p1",
                 "resource": serde_json::from_str::<Value>(text).unwrap(),
                 "search": {"mode": "match"}},
                {"resource": tree, "search": {"mode": "outcome"}},
            ])
        );
        // No entries: still an `entry` array, as before.
        let v = written(&bundle_out("searchset", Vec::new(), Vec::new()));
        assert_eq!(v["entry"], json!([]));
        // The stored text is copied byte for byte.
        let mut out = Vec::new();
        b.write(&mut out).unwrap();
        assert!(out.windows(text.len()).any(|w| w == text.as_bytes()));
    }
}
