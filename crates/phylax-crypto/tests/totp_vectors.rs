#![allow(clippy::unwrap_used)]
//! RFC 6238 Appendix B vectors from ../shared/testdata/totp.

use phylax_crypto::totp::{Totp, TotpAlgorithm};
use phylax_crypto::Secret;
use std::path::PathBuf;

fn vectors() -> Option<serde_json::Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata/totp/rfc6238.json");
    match std::fs::read(&p) {
        Ok(b) => Some(serde_json::from_slice(&b).unwrap()),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {} is missing: {e}",
                p.display()
            );
            eprintln!("skipping: {} not found ({e})", p.display());
            None
        }
    }
}

#[test]
fn rfc6238_appendix_b() {
    let Some(v) = vectors() else { return };
    let list = v["vectors"].as_array().unwrap();
    assert_eq!(list.len(), 18, "all eighteen vectors");
    for x in list {
        let alg = match x["algorithm"].as_str().unwrap() {
            "SHA1" => TotpAlgorithm::Sha1,
            "SHA256" => TotpAlgorithm::Sha256,
            "SHA512" => TotpAlgorithm::Sha512,
            other => panic!("unknown algorithm {other}"),
        };
        assert_eq!(x["t0"].as_u64().unwrap(), 0);
        let secret = Secret::new(x["secret_ascii"].as_str().unwrap().as_bytes().to_vec());
        let t = Totp::new(
            secret,
            alg,
            x["digits"].as_u64().unwrap() as u32,
            x["period"].as_u64().unwrap(),
        )
        .unwrap();
        let time = x["time"].as_u64().unwrap();
        let want = x["totp"].as_str().unwrap();
        assert_eq!(t.code_at(time), want, "{x}");
        assert_eq!(t.verify(want, time, None), Some(t.step(time)));
    }
}
