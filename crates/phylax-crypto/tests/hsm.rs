//! The PKCS#11 KEK provider against a real SoftHSM2 token (set up by
//! scripts/test-softhsm.sh, which scripts/test runs). Without the token
//! the tests skip, except under `CI=true`, where they fail.
#![allow(clippy::unwrap_used)]

use phylax_crypto::kek::hsm::HsmConfig;
use phylax_crypto::kek::{Kek, KekSpec, Provider, Retired};
use phylax_crypto::{CryptoError, Secret};
use std::path::PathBuf;

/// One test at a time: `pkcs11-tool`, a second process, writes to the
/// same SoftHSM2 token files, and SoftHSM2 does not take writers from two
/// processes at once.
static TOKEN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(label: &str) -> Option<HsmConfig> {
    let (Ok(module), Ok(token), Ok(pin)) = (
        std::env::var("PHYLAX_TEST_HSM_MODULE"),
        std::env::var("PHYLAX_TEST_HSM_TOKEN"),
        std::env::var("PHYLAX_TEST_HSM_PIN_FILE"),
    ) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no SoftHSM2 token: run the tests through scripts/test"
        );
        eprintln!("skipping: no SoftHSM2 token (run through scripts/test)");
        return None;
    };
    Some(HsmConfig {
        module: PathBuf::from(module),
        token,
        pin: Secret::new(std::fs::read(pin).unwrap()),
        key_label: format!("{label}-{}", std::process::id()),
    })
}

fn pin_text(c: &HsmConfig) -> String {
    String::from_utf8(c.pin.expose().to_vec())
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn the_kek_lives_in_the_hsm_and_rotates_there() {
    let _one = TOKEN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(cfg) = config("kek-rotate") else {
        return;
    };
    let kek = Kek::hsm_create(&cfg, 1).unwrap();
    assert_eq!(kek.generations(), vec![(1, Provider::Hsm)]);
    // A label in use is never taken over by a second instance: one
    // instance's rotation would destroy the other's KEK.
    let e = Kek::hsm_create(&cfg, 1).unwrap_err();
    assert!(e.to_string().contains("already holds keys labelled"), "{e}");
    assert!(kek.check_value().is_none(), "no key bytes to fingerprint");
    let secret = Secret::new(vec![3u8; 32]);
    let w = kek.wrap("data-key", "patient:1", &secret).unwrap();
    assert_eq!(Kek::generation_of(&w), Some(1));
    assert_eq!(
        kek.unwrap("data-key", "patient:1", &w).unwrap().expose(),
        secret.expose()
    );
    // Bound to purpose and scope, and every byte is authenticated.
    assert!(kek.unwrap("data-key", "patient:2", &w).is_err());
    assert!(kek.unwrap("token", "patient:1", &w).is_err());
    for i in 0..w.len() {
        let mut t = w.clone();
        t[i] ^= 0x40;
        assert!(kek.unwrap("data-key", "patient:1", &t).is_err(), "byte {i}");
    }
    // A second process view (a node) opens the same generation.
    let node = Kek::open(KekSpec {
        hsm: config("kek-rotate"),
        ..Default::default()
    })
    .unwrap();
    assert!(node.unwrap("data-key", "patient:1", &w).is_ok());
    // Rotation inside the HSM.
    assert_eq!(kek.add_generation(1).unwrap(), 2);
    let w2 = kek.rewrap("data-key", "patient:1", &w).unwrap();
    assert_eq!(Kek::generation_of(&w2), Some(2));
    assert!(
        node.unwrap("data-key", "patient:1", &w2).is_ok(),
        "found by reload"
    );
    assert_eq!(kek.retire(1).unwrap(), Retired::Destroyed);
    let reopened = Kek::open(KekSpec {
        hsm: config("kek-rotate"),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(reopened.generations(), vec![(2, Provider::Hsm)]);
    assert!(matches!(
        reopened.unwrap("data-key", "patient:1", &w),
        Err(CryptoError::UnknownGeneration(1))
    ));
    assert!(reopened.unwrap("data-key", "patient:1", &w2).is_ok());

    // Rate, for docs/PERFORMANCE.md (printed, not asserted: a test is no
    // benchmark).
    let n = 2000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        kek.rewrap("data-key", "patient:1", &w2).unwrap();
    }
    eprintln!(
        "SoftHSM2 re-wraps: {:.0}/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
}

/// A key object that could leave the HSM is refused, not used.
#[test]
fn an_extractable_key_is_refused() {
    let _one = TOKEN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(cfg) = config("kek-extractable") else {
        return;
    };
    let status = std::process::Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(&cfg.module)
        .args(["--token-label", &cfg.token, "--login", "--pin"])
        .arg(pin_text(&cfg))
        .args([
            "--keygen",
            "--key-type",
            "AES:32",
            "--extractable",
            "--label",
        ])
        .arg(format!("{}-1", cfg.key_label))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let err = Kek::open(KekSpec {
        hsm: Some(cfg),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("can leave the HSM"), "{err}");
}

#[test]
fn a_wrong_pin_or_token_fails_clearly() {
    let _one = TOKEN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut cfg) = config("kek-pin") else {
        return;
    };
    cfg.token = "no-such-token".into();
    let e = Kek::open(KekSpec {
        hsm: Some(cfg),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("no token labelled"), "{e}");
}
