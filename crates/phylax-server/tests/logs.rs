//! Logs carry no PHI. This test binary installs a JSON log subscriber at
//! TRACE level that writes into memory, drives the server through normal
//! and failing requests carrying PHI-like values, and then searches every
//! log line for those values.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

#[path = "it/common/mod.rs"]
mod common;

use common::{Backend, TestServer};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Buf {
    static B: OnceLock<Buf> = OnceLock::new();
    B.get_or_init(|| {
        let buf = Buf::default();
        let w = buf.clone();
        // TRACE everywhere, through the same filter the binary uses.
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(phylax_server::base::logging::filter("trace"))
            .with_writer(move || w.clone())
            .init();
        buf
    })
}

const PHI: &[&str] = &[
    "Vandermeerschaum",
    "Octaviana",
    "1957-03-14",
    "SSN-123-45-6789",
    "Pemberton Crescent",
    "nephroblastosis",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_phi_in_logs() {
    let buf = logs();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(s) = TestServer::start(backend).await else {
            continue;
        };
        let tok = s.token("system/*.cruds").await;
        let fj = "application/fhir+json";
        let p = json!({"resourceType": "Patient", "name": [{"family": "Vandermeerschaum", "given": ["Octaviana"]}],
                       "birthDate": "1957-03-14", "identifier": [{"value": "SSN-123-45-6789"}],
                       "address": [{"line": ["Pemberton Crescent"]}]});
        let r = s
            .http
            .post(s.url("/Patient"))
            .bearer_auth(&tok)
            .header("content-type", fj)
            .body(p.to_string())
            .send()
            .await
            .unwrap();
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.http
            .get(s.url(&format!("/Patient/{id}")))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        s.http
            .get(s.url(&format!("/Patient/{id}/_history")))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        // Failures that carry PHI in bodies, queries and headers.
        let bad = json!({"resourceType": "Patient", "name": "Vandermeerschaum", "birthDate": "1957-03-14x", "note": "nephroblastosis"});
        s.http
            .post(s.url("/Patient"))
            .bearer_auth(&tok)
            .header("content-type", fj)
            .body(bad.to_string())
            .send()
            .await
            .unwrap();
        s.http
            .post(s.url("/Patient"))
            .bearer_auth(&tok)
            .header("content-type", fj)
            .body("{\"Octaviana\": ")
            .send()
            .await
            .unwrap();
        s.http
            .get(s.url("/Patient?name=Vandermeerschaum&birthdate=1957-03-14"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        s.http
            .get(s.url("/Patient/Vandermeerschaum"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        s.http
            .get(s.url("/Patient?name=Octaviana"))
            .header("authorization", "Bearer Octaviana")
            .send()
            .await
            .unwrap();
        s.http
            .post(s.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "Octaviana"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", "Vandermeerschaum"),
            ])
            .send()
            .await
            .unwrap();
    }
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("\"request_id\""), "logs were captured");
    for needle in PHI {
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        assert!(
            hits.is_empty(),
            "PHI value {needle:?} found in logs: {hits:#?}"
        );
    }
}
