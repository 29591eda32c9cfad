//! A Bundle's entries, parsed into typed requests (method, URL,
//! resource, conditions), and errors that name the entry.

use crate::base::error::Failure;
use crate::state::FhirState;
use axum::http::Method;
use phylax_fhir::Issue;
use serde_json::Value;

/// The methods an entry may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Verb {
    // Declaration order is the transaction processing order.
    Delete,
    Post,
    Put,
    Get,
}

impl Verb {
    pub(super) fn parse(s: &str) -> Option<Verb> {
        match s {
            "DELETE" => Some(Verb::Delete),
            "POST" => Some(Verb::Post),
            "PUT" => Some(Verb::Put),
            "GET" | "HEAD" => Some(Verb::Get),
            _ => None,
        }
    }

    pub(super) fn method(self) -> Method {
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
pub(super) struct Entry {
    pub(super) idx: usize,
    pub(super) verb: Verb,
    /// Relative to the FHIR base, without a leading slash: `Patient/1`,
    /// `Patient?identifier=x`.
    pub(super) url: String,
    pub(super) full_url: Option<String>,
    pub(super) resource: Option<Value>,
    pub(super) if_none_exist: Option<String>,
    pub(super) if_match: Option<String>,
}

impl Entry {
    pub(super) fn path_and_query(&self) -> (&str, Option<&str>) {
        match self.url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.url.as_str(), None),
        }
    }
}

/// Attach the entry's position to an error, so the client can tell which
/// entry failed. Only our own messages and element paths are shown.
pub(super) fn at_entry(idx: usize, e: Failure) -> Failure {
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

pub(super) fn entry_error(idx: usize, msg: &str) -> Failure {
    Failure::bad_request(format!("Bundle.entry[{idx}]: {msg}"))
}

/// Parse the entries of a batch or transaction Bundle. An entry that does
/// not parse fails a transaction, and only itself in a batch.
pub(super) fn parse_entries(
    st: &FhirState,
    bundle: &Value,
) -> Result<Vec<Result<Entry, Failure>>, Failure> {
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

pub(super) fn parse_entry(base: &str, idx: usize, e: &Value) -> Result<Entry, Failure> {
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
