//! The server certificate (docs/OPERATIONS.md, "TLS"): weak ones refused at
//! start, replaced while serving without dropping connections, an OCSP
//! response stapled; and an external scanner (sslyze) finds no old
//! protocol and no suite without forward secrecy or an AEAD.

use crate::common;
use common::{Backend, TestServer};
use phylax_server::net::certs::CertFiles;
use phylax_server::net::tls::{self, TlsError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn write_key(p: &Path, pem: &[u8]) {
    std::fs::write(p, pem).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A self-signed P-256 certificate valid from `from` to `to` (days from now).
fn self_signed(from: i64, to: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let day = |d: i64| {
        use chrono::Datelike;
        let t = chrono::Utc::now() + chrono::Duration::days(d);
        rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8)
    };
    p.not_before = day(from);
    p.not_after = day(to);
    (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn files(dir: &Path, cert: &str, key: &str) -> CertFiles {
    std::fs::write(dir.join("c.pem"), cert).unwrap();
    write_key(&dir.join("k.pem"), key.as_bytes());
    CertFiles {
        cert: dir.join("c.pem"),
        key: dir.join("k.pem"),
        ocsp: None,
        client_ca: None,
    }
}

fn refused(f: &CertFiles, why: &str) {
    match tls::server_tls(f.clone()) {
        Err(TlsError::Weak(m)) => assert!(m.contains(why), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted a certificate with {why}"),
    }
}

#[test]
fn weak_certificates_are_refused_at_start() {
    let d = tempfile::tempdir().unwrap();
    let (good, good_key) = self_signed(-1, 30);
    assert!(tls::server_tls(files(d.path(), &good, &good_key)).is_ok());
    let (old, old_key) = self_signed(-60, -1);
    refused(&files(d.path(), &old, &old_key), "expired");
    let (future, future_key) = self_signed(5, 60);
    refused(&files(d.path(), &future, &future_key), "not valid yet");
    let (_, other_key) = self_signed(-1, 30);
    refused(&files(d.path(), &good, &other_key), "does not match");
    // RSA under 2048 bits, made with the openssl tool.
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(d.path().join("rk.pem"))
        .arg("-out")
        .arg(d.path().join("rc.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rsa = CertFiles {
        cert: d.path().join("rc.pem"),
        key: d.path().join("rk.pem"),
        ocsp: None,
        client_ca: None,
    };
    std::fs::set_permissions(&rsa.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    refused(&rsa, "1024 bits");
    // A key file others can read.
    let f = files(d.path(), &good, &good_key);
    std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(tls::server_tls(f), Err(TlsError::Permissions(_))));
}

fn client_trusting(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .tls_info(true)
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// The DER of the certificate the server presented on this response's
/// connection.
async fn presented(c: &reqwest::Client, url: &str) -> Result<Vec<u8>, reqwest::Error> {
    let r = c.get(url).send().await?;
    Ok(r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_used_without_a_restart_or_a_dropped_connection() {
    use rustls::pki_types::pem::PemObject;
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    let url = format!("{}/metadata", s.fhir);
    let old_ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let old_client = client_trusting(&old_ca);
    let before = presented(&old_client, &url).await.unwrap();
    // A replacement from another CA, written over the files the
    // configuration names (as a renewal job would).
    let next = tls::generate(&[]).unwrap();
    let next_client = client_trusting(next.ca_cert_pem.as_bytes());
    assert!(presented(&next_client, &url).await.is_err(), "not yet");
    let cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    std::fs::write(
        s.data_dir.join("tls/server.pem"),
        format!("{}{}", next.server_cert_pem, next.ca_cert_pem),
    )
    .unwrap();
    write_key(&cfg.tls.key, next.server_key_pem.expose());
    let mut after = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(der) = presented(&next_client, &url).await {
            after = Some(der);
            break;
        }
    }
    let after = after.expect("the new certificate was picked up within 10 s");
    let next_der =
        rustls::pki_types::CertificateDer::from_pem_slice(next.server_cert_pem.as_bytes()).unwrap();
    assert_eq!(after, next_der.as_ref());
    // The connection opened before the change is still up, with the old
    // certificate: nothing was dropped.
    assert_eq!(presented(&old_client, &url).await.unwrap(), before);
    assert_eq!(
        s.cert.summary().fingerprint,
        hex::encode(phylax_audit::merkle::sha256(&after))
    );
    // A broken replacement (a key that does not match) is refused; the
    // server keeps presenting the good one.
    let (_, stray_key) = self_signed(-1, 30);
    write_key(&cfg.tls.key, stray_key.as_bytes());
    assert!(s.cert.reload().is_err());
    assert_eq!(
        presented(&client_trusting(next.ca_cert_pem.as_bytes()), &url)
            .await
            .unwrap(),
        after
    );
}

/// Records the OCSP response the server staples.
#[derive(Debug)]
struct Stapled {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    got: parking_lot::Mutex<Vec<u8>>,
}

impl rustls::client::danger::ServerCertVerifier for Stapled {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.got.lock() = ocsp_response.to_vec();
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsp_response_is_stapled() {
    use rustls::pki_types::pem::PemObject;
    // The operator's renewal job keeps the response in a file; its bytes
    // go to every client that asks for the certificate's status.
    let response = b"\x30\x03\x0a\x01\x00".to_vec(); // OCSPResponse, status successful
    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.tls.ocsp = Some("tls/ocsp.der".into())
    })
    .await;
    // Configured before the renewal job first ran: served unstapled;
    // then the file appears and is picked up like a new certificate.
    let s = s.unwrap();
    assert!(!s.cert.summary().stapled);
    std::fs::write(s.data_dir.join("tls/ocsp.der"), &response).unwrap();
    for _ in 0..50 {
        if s.cert.summary().stapled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s.cert.summary().stapled, "picked up by the file watch");
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Stapled {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap(),
        got: Default::default(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.base.trim_start_matches("https://"))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(*verifier.got.lock(), response);
}

/// sslyze, an independent TLS scanner (PyPI; scripts/test installs it in
/// the test venv), against a running server: no SSL 2/3, TLS 1.0 or 1.1;
/// TLS 1.2 suites only ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3;
/// the certificate validates against the instance's CA; and Mozilla's
/// "intermediate" configuration is met but for sslyze's own naming of the
/// P-256 curve (it reports `secp256r1`, Mozilla's list says `prime256v1`:
/// the same curve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_scanner_finds_only_strong_tls() {
    let python = match std::env::var("PHYLAX_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true needs PHYLAX_PYTHON (scripts/test)"
            );
            return;
        }
    };
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    let target = s.base.trim_start_matches("https://").to_owned();
    let json = s.dir.path().join("sslyze.json");
    let mut cmd = std::process::Command::new(&python);
    cmd.args([
        "-m",
        "sslyze",
        "--mozilla_config=intermediate",
        "--certinfo_ca_file",
    ])
    .arg(s.data_dir.join("tls/ca.pem"))
    .arg(format!("--json_out={}", json.display()))
    .arg(&target);
    // The scan takes seconds; the server keeps running on the runtime.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &v["server_scan_results"][0]["scan_result"];
    let accepted = |k: &str| -> Vec<String> {
        r[k]["result"]["accepted_cipher_suites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["cipher_suite"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for old in [
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ] {
        assert!(accepted(old).is_empty(), "{old}: {:?}", accepted(old));
    }
    let tls12 = accepted("tls_1_2_cipher_suites");
    assert!(!tls12.is_empty());
    for c in &tls12 {
        assert!(
            c.contains("ECDHE")
                && (c.contains("GCM") || c.contains("CHACHA20"))
                && !c.contains("CBC"),
            "{c}"
        );
    }
    assert!(!accepted("tls_1_3_cipher_suites").is_empty());
    let deployment = &r["certificate_info"]["result"]["certificate_deployments"][0];
    let supplied = deployment["path_validation_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["trust_store"]["name"] == "Supplied CA file")
        .unwrap();
    assert_eq!(supplied["was_validation_successful"], true, "{supplied}");
    // Mozilla "intermediate": every finding is sslyze's P-256 naming, or
    // the public trust stores not knowing the instance's own CA.
    let compliance = text
        .split("COMPLIANCE AGAINST MOZILLA")
        .nth(1)
        .unwrap_or_else(|| panic!("no compliance section:\n{text}"));
    for line in compliance
        .lines()
        .filter(|l| l.trim_start().starts_with("* "))
    {
        let l = line.trim();
        assert!(
            l.contains("secp256r1") || l.starts_with("* certificate_path_validation"),
            "Mozilla intermediate: {l}\n{text}"
        );
    }
}
