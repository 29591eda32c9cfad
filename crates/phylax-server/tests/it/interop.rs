//! Interoperability: an independent FHIR client library (Python `fhirpy`)
//! drives Phylax over real HTTPS with a SMART Backend Services token.
//!
//! The interpreter comes from `PHYLAX_PYTHON` (scripts/test creates a venv
//! with fhirpy and sets it) or `python3`. Without fhirpy the test is skipped
//! with a note, except under `CI=true`, where it fails.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use crate::common;

use common::{Backend, TestServer};
use std::process::Command;

fn python() -> Option<String> {
    let py = std::env::var("PHYLAX_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import fhirpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(py);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {py} cannot import fhirpy: run scripts/test (it installs fhirpy in a venv)");
    }
    eprintln!("note: fhirpy not available to {py}; skipping the interop test (run scripts/test)");
    None
}

async fn run(backend: Backend) {
    let Some(py) = python() else { return };
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let tok = s.token("system/*.cruds").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/fhirpy_check.py");
    let fhir = s.fhir.clone();
    let ca = s.data_dir.join("tls/ca.pem");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .env("PHYLAX_FHIR_URL", fhir)
            .env("PHYLAX_TOKEN", tok)
            .env("PHYLAX_CA", ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fhirpy interop failed ({backend:?}):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    for check in [
        "chained search",
        "_has reverse chaining",
        "urn:uuid references resolved",
        "$everything returns the compartment",
        "a failed transaction left nothing behind",
    ] {
        assert!(stdout.contains(check), "{check} did not run:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirpy_drives_phylax_sqlite() {
    run(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirpy_drives_phylax_postgres() {
    run(Backend::Postgres).await;
}
