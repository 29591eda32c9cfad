#![allow(clippy::unwrap_used)]
//! RFC 9162 proof vectors from ../shared/testdata/merkle (transparency-dev):
//! every happy path verifies and every `wantErr` case is rejected.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use phylax_audit::merkle::{verify_consistency, verify_inclusion};
use std::path::{Path, PathBuf};

fn dir() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/merkle");
    if p.is_dir() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {} is missing",
        p.display()
    );
    eprintln!("skipping: {} not found", p.display());
    None
}

fn files(root: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

fn b64(v: &serde_json::Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap_or("")).unwrap()
}

fn proof(v: &serde_json::Value) -> Vec<Vec<u8>> {
    v.as_array()
        .map(|a| a.iter().map(b64).collect())
        .unwrap_or_default()
}

/// Run `check` on every vector file under `kind`; each must fail exactly
/// when it says `wantErr`. Returns (good, bad) counts.
fn run(kind: &str, check: impl Fn(&serde_json::Value) -> bool) -> Option<(usize, usize)> {
    let d = dir()?;
    let mut fs = Vec::new();
    files(&d.join(kind), &mut fs);
    assert!(fs.len() > 50, "only {} {kind} vectors found", fs.len());
    let (mut ok, mut bad) = (0, 0);
    for f in fs {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let want_err = v["wantErr"].as_bool().unwrap();
        assert_eq!(!check(&v), want_err, "{}", f.display());
        if want_err {
            bad += 1
        } else {
            ok += 1
        }
    }
    assert!(ok >= 5 && bad >= 50, "{ok} good, {bad} bad");
    Some((ok, bad))
}

#[test]
fn inclusion_vectors() {
    run("inclusion", |v| {
        verify_inclusion(
            v["leafIdx"].as_u64().unwrap(),
            v["treeSize"].as_u64().unwrap(),
            &b64(&v["leafHash"]),
            &proof(&v["proof"]),
            &b64(&v["root"]),
        )
        .is_ok()
    });
}

#[test]
fn consistency_vectors() {
    run("consistency", |v| {
        verify_consistency(
            v["size1"].as_u64().unwrap(),
            v["size2"].as_u64().unwrap(),
            &proof(&v["proof"]),
            &b64(&v["root1"]),
            &b64(&v["root2"]),
        )
        .is_ok()
    });
}
