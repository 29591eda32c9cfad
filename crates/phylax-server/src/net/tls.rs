//! TLS: certificate generation for new instances and the rustls server
//! configuration (the accept loop and its limits are [`crate::net::conn`]).
//!
//! Only TLS 1.3 and TLS 1.2 are enabled, and only forward-secret AEAD suites
//! (ECDHE with AES-GCM or ChaCha20-Poly1305). ALPN offers h2 and http/1.1.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::ring as provider;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

pub use super::certs::TlsError;

/// PEM texts of a freshly generated local CA and server certificate. The
/// private keys are zeroized when this is dropped.
pub struct GeneratedTls {
    pub ca_cert_pem: String,
    pub ca_key_pem: phylax_crypto::Secret,
    pub server_cert_pem: String,
    pub server_key_pem: phylax_crypto::Secret,
}

impl std::fmt::Debug for GeneratedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeneratedTls([REDACTED])")
    }
}

fn g(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// Generate a local CA (10 years) and a server certificate (365 days, under
/// the 366 Mozilla's "intermediate" configuration allows) for
/// `localhost`, 127.0.0.1, ::1 and any extra names or addresses.
pub fn generate(extra_names: &[String]) -> Result<GeneratedTls, TlsError> {
    let now = chrono::Utc::now();
    let date = |d: chrono::DateTime<chrono::Utc>| {
        use chrono::Datelike;
        rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Phylax local CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "Phylax");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = date(now - chrono::Duration::days(1));
    ca.not_after = date(now + chrono::Duration::days(3650));
    let ca_cert = ca.self_signed(&ca_key).map_err(g)?;

    let srv_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let mut names = vec!["localhost".to_string()];
    names.extend(
        extra_names
            .iter()
            .filter(|n| n.parse::<IpAddr>().is_err())
            .cloned(),
    );
    let mut sp = CertificateParams::new(names).map_err(g)?;
    sp.distinguished_name
        .push(DnType::CommonName, "Phylax server");
    let mut ips: Vec<IpAddr> = vec![
        "127.0.0.1"
            .parse()
            .map_err(|_| TlsError::Generate("ip".into()))?,
        "::1".parse().map_err(|_| TlsError::Generate("ip".into()))?,
    ];
    ips.extend(extra_names.iter().filter_map(|n| n.parse::<IpAddr>().ok()));
    ips.dedup();
    for ip in ips {
        sp.subject_alt_names.push(SanType::IpAddress(ip));
    }
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // Strict RFC 5280 validators (Python's `cryptography`, which sslyze
    // uses) require the authority key identifier on the leaf.
    sp.use_authority_key_identifier_extension = true;
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    sp.not_before = date(now - chrono::Duration::days(1));
    sp.not_after = date(now + chrono::Duration::days(365));
    let srv_cert = sp.signed_by(&srv_key, &ca_cert, &ca_key).map_err(g)?;
    Ok(GeneratedTls {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: phylax_crypto::Secret::new(ca_key.serialize_pem().into_bytes()),
        server_cert_pem: srv_cert.pem(),
        server_key_pem: phylax_crypto::Secret::new(srv_key.serialize_pem().into_bytes()),
    })
}

/// Write a private file with mode 0600, refusing to overwrite.
pub fn write_private(path: &Path, content: &[u8]) -> Result<(), TlsError> {
    let w = |e: std::io::Error| TlsError::Write(path.display().to_string(), e.to_string());
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(w)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(w)?;
    f.write_all(content).and_then(|_| f.sync_all()).map_err(w)
}

/// The server's rustls configuration over a certificate with no OCSP
/// response (tests, tools); [`server_tls`] for the server itself.
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(server_tls(crate::net::certs::CertFiles {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        ocsp: None,
        client_ca: None,
    })?
    .0)
}

/// The server's rustls configuration and the certificate it presents,
/// which [`crate::net::certs::ServerCert::watch`] can reload while serving.
pub fn server_tls(
    files: crate::net::certs::CertFiles,
) -> Result<
    (
        Arc<rustls::ServerConfig>,
        Arc<crate::net::certs::ServerCert>,
    ),
    TlsError,
> {
    let client_ca = files.client_ca.clone();
    let cert = crate::net::certs::ServerCert::load(files)?;
    let mut prov = provider::default_provider();
    prov.cipher_suites = allowed_suites();
    let prov = Arc::new(prov);
    let builder = rustls::ServerConfig::builder_with_provider(prov.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|_| TlsError::Invalid("protocol versions".into()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(&ca, prov)?),
    };
    let mut cfg = builder.with_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), cert))
}

/// Mutual TLS, optional: a client may present a certificate issued by the
/// CA in `ca` (it is verified: chain, validity, client-auth usage); one
/// without a certificate still connects and authenticates with OAuth as
/// before. A certificate that does not verify ends the handshake.
fn client_verifier(
    ca: &Path,
    prov: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |why: String| TlsError::Invalid(format!("tls.client_ca {}: {why}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), prov)
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// Forward-secret AEAD suites only. (rustls supports nothing weaker, but
/// the list is explicit so a dependency update cannot widen it silently.)
pub fn allowed_suites() -> Vec<rustls::SupportedCipherSuite> {
    use provider::cipher_suite::*;
    vec![
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// Serve `router` over TLS on `listener` until `shutdown` resolves, with
/// the default connection limits ([`crate::net::conn`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::net::conn::serve(
        listener,
        Some(config),
        router,
        crate::net::conn::Limits::default(),
        shutdown,
    )
    .await
}
