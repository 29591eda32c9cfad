//! The FHIR REST core over real HTTPS, on both backends.
//!
//! # Layout
//! - [`crud`]: create, read, update, delete, version reads and history of one
//!   resource; update as create and its switch; `Prefer: return`.
//! - [`validation`]: validation at the door (structure, content, bodies,
//!   media types) and every resource type served.
//! - [`history`]: history paging, sealed cursors, `_since` and `_count`, type
//!   search paging.
//! - [`discovery`]: metadata and discovery documents, security headers, CORS.
//! - [`nodes`]: two nodes sharing one PostgreSQL database.
//! - [`connections`]: the connection layer: oversized and chunked bodies,
//!   slow and idle connections, rate limits, connection caps.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{TestServer, ALL, FJ};
use serde_json::{json, Value};

async fn send(
    s: &TestServer,
    tok: &str,
    m: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut r = s.http.request(m, s.url(path)).bearer_auth(tok);
    if let Some(b) = body {
        r = r.header("content-type", FJ).body(b.to_string());
    }
    r.send().await.unwrap()
}

mod connections;
mod crud;
mod discovery;
mod history;
mod nodes;
mod validation;
