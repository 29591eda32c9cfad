//! FHIR search over sealed data, on both backends.
//!
//! # Layout
//! - [`demographics`]: patient demographics: strings, tokens, birth dates,
//!   ids, and results that move with updates and deletes.
//! - [`clinical`]: clinical parameters: references, codes and text, dates and
//!   quantities with prefixes.
//! - [`paging`]: paging through sealed cursors, POST search, hostile input,
//!   previous links and pages bounded by size.
//! - [`reindex`]: data stored before the search index is reindexed when the
//!   server starts.
//! - [`compartments`]: patient compartment search and `$everything`.
//! - [`includes`]: `_include`, `_revinclude` (and `:iterate`) under the
//!   access policy, chains and reverse chains.
//! - [`conditional`]: conditional create, update and delete.
//! - [`results`]: `_sort`, `_summary`, `_elements` and `_total`.
//! - [`composites`]: composite and combo parameters pair values from the same
//!   element.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{get, TestServer, FJ};
use serde_json::{json, Value};

async fn create(s: &TestServer, tok: &str, body: Value) -> String {
    let t = body["resourceType"].as_str().unwrap().to_owned();
    let r = s
        .http
        .post(s.url(&format!("/{t}")))
        .bearer_auth(tok)
        .header("content-type", FJ)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Ids of the matches, sorted; asserts the search succeeded and `total` agrees.
async fn ids(s: &TestServer, tok: &str, q: &str) -> Vec<String> {
    let (st, b) = get(s, tok, q).await;
    assert_eq!(st, 200, "{q}: {b}");
    let mut out: Vec<String> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(b["total"], json!(out.len()), "{q}");
    out.sort();
    out
}

fn sorted(mut v: Vec<&String>) -> Vec<String> {
    v.sort();
    v.into_iter().cloned().collect()
}

mod clinical;
mod compartments;
mod composites;
mod conditional;
mod demographics;
mod includes;
mod paging;
mod reindex;
mod results;
