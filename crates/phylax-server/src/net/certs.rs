//! The server certificate: loaded from files, checked, and swapped in
//! while the server runs.
//!
//! At start a certificate that would weaken TLS is refused: expired or not
//! yet valid, an RSA key under 2048 bits, an elliptic curve other than
//! P-256 or P-384, or a private key that does not match the certificate.
//! [`ServerCert`] is the rustls certificate resolver: every new handshake
//! takes the certificate current at that moment, so replacing it changes
//! nothing for connections already open. [`ServerCert::watch`] reloads it
//! when the files change (looked at every two seconds) or on SIGHUP; a
//! replacement that fails the checks is logged and the old certificate
//! stays. An OCSP response in DER, kept fresh by the operator (docs/
//! OPERATIONS.md, "TLS"), is stapled to every handshake when configured
//! (and present: without it the server serves unstapled, and says so).

use der::Decode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
/// Errors of certificate generation, loading and checks.
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("cannot write {0}: {1}")]
    Write(String, String),
    #[error("invalid TLS material in {0}")]
    Invalid(String),
    #[error("TLS key file {0} must not be readable by group or others (chmod 600)")]
    Permissions(String),
    #[error("refusing a weak or unusable TLS certificate: {0}")]
    Weak(String),
}

/// Where the certificate chain, its key and an optional OCSP response are.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ocsp: Option<PathBuf>,
    /// The CA of client certificates (mutual TLS), if any.
    pub client_ca: Option<PathBuf>,
}

/// What the checks learnt about a loaded certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Seconds since the epoch.
    pub not_after: i64,
    /// The leaf certificate's DER, SHA-256, hex.
    pub fingerprint: String,
    pub stapled: bool,
}

fn invalid(p: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Weak(format!("{}: {why}", p.display()))
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.display().to_string(), e.to_string()))
}

/// The RSA public key's modulus and exponent (RFC 8017, A.1.1).
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    exponent: der::asn1::UintRef<'a>,
}

const RSA: &str = "1.2.840.113549.1.1.1";
const EC: &str = "1.2.840.10045.2.1";
const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";

/// Validity and key strength of the leaf certificate.
fn check_leaf(path: &Path, der_bytes: &[u8], now: i64) -> Result<i64, TlsError> {
    let cert = x509_cert::Certificate::from_der(der_bytes).map_err(|e| invalid(path, e))?;
    let tbs = &cert.tbs_certificate;
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs() as i64;
    let (nb, na) = (
        secs(&tbs.validity.not_before),
        secs(&tbs.validity.not_after),
    );
    if na < now {
        return Err(invalid(path, "the certificate has expired"));
    }
    if nb > now + 300 {
        return Err(invalid(path, "the certificate is not valid yet"));
    }
    let spki = &tbs.subject_public_key_info;
    match spki.algorithm.oid.to_string().as_str() {
        RSA => {
            let bytes = spki.subject_public_key.raw_bytes();
            let key = RsaPublicKey::from_der(bytes).map_err(|e| invalid(path, e))?;
            let m = key.modulus.as_bytes();
            let bits = m.len() * 8 - m.first().map_or(8, |b| b.leading_zeros() as usize);
            if bits < 2048 {
                return Err(invalid(
                    path,
                    format!("an RSA key of {bits} bits (at least 2048)"),
                ));
            }
            let _ = key.exponent;
        }
        EC => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                .map(|o| o.to_string())
                .unwrap_or_default();
            if curve != P256 && curve != P384 {
                return Err(invalid(path, "an elliptic curve other than P-256 or P-384"));
            }
        }
        other => {
            return Err(invalid(
                path,
                format!("an unsupported key algorithm ({other})"),
            ))
        }
    }
    Ok(na)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Load and check the certificate, its key and the OCSP response.
pub fn load(files: &CertFiles) -> Result<(Arc<CertifiedKey>, CertSummary), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&files.key)
        .map_err(|e| TlsError::Read(files.key.display().to_string(), e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(TlsError::Permissions(files.key.display().to_string()));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Invalid(files.cert.display().to_string()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::Invalid(files.cert.display().to_string()))?;
    let not_after = check_leaf(&files.cert, leaf, now_secs())?;
    let fingerprint = hex::encode(phylax_audit::merkle::sha256(leaf));
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|_| TlsError::Invalid(files.key.display().to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| TlsError::Invalid(files.key.display().to_string()))?;
    let mut ck = CertifiedKey::new(certs, signer);
    // The private key must belong to the certificate; a key whose public
    // half cannot be told is refused too.
    ck.keys_match()
        .map_err(|_| invalid(&files.key, "the private key does not match the certificate"))?;
    if let Some(p) = &files.ocsp {
        // Stapling is an optimisation for clients (they can ask the CA
        // themselves): a missing or empty response is served without,
        // and said.
        match read(p) {
            Ok(r) if !r.is_empty() => ck.ocsp = Some(r),
            _ => tracing::warn!(
                file = %p.display(),
                "no OCSP response to staple (missing or empty): serving without"
            ),
        }
    }
    let stapled = ck.ocsp.is_some();
    Ok((
        Arc::new(ck),
        CertSummary {
            not_after,
            fingerprint,
            stapled,
        },
    ))
}

/// Modification times of the files, to notice a replacement.
fn stamps(files: &CertFiles) -> Vec<Option<SystemTime>> {
    [Some(&files.cert), Some(&files.key), files.ocsp.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The certificate the server presents, replaceable while it runs.
pub struct ServerCert {
    files: CertFiles,
    current: parking_lot::RwLock<(Arc<CertifiedKey>, CertSummary)>,
    seen: parking_lot::Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

/// A certificate expiring sooner than this is logged at every load.
const EXPIRY_WARNING: i64 = 14 * 86_400;
/// How often the files are looked at.
pub const WATCH: Duration = Duration::from_secs(2);

impl ServerCert {
    /// Load the certificate; refuses a weak one (see the module doc).
    pub fn load(files: CertFiles) -> Result<Arc<ServerCert>, TlsError> {
        let seen = stamps(&files);
        let loaded = load(&files)?;
        warn_if_expiring(&loaded.1);
        Ok(Arc::new(ServerCert {
            files,
            current: parking_lot::RwLock::new(loaded),
            seen: parking_lot::Mutex::new(seen),
        }))
    }

    /// What is being presented now.
    pub fn summary(&self) -> CertSummary {
        self.current.read().1.clone()
    }

    /// Load the files again and present them to new connections if they
    /// pass the checks; on failure the current certificate stays.
    pub fn reload(&self) -> Result<CertSummary, TlsError> {
        *self.seen.lock() = stamps(&self.files);
        let loaded = load(&self.files)?;
        warn_if_expiring(&loaded.1);
        let summary = loaded.1.clone();
        *self.current.write() = loaded;
        Ok(summary)
    }

    /// Reload when the files change or on SIGHUP, until the certificate is
    /// dropped.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let signalled = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        _ = tokio::time::sleep(WATCH) => false,
                    },
                    None => {
                        tokio::time::sleep(WATCH).await;
                        false
                    }
                };
                let Some(me) = weak.upgrade() else { return };
                let changed = stamps(&me.files) != *me.seen.lock();
                if !(signalled || changed) {
                    continue;
                }
                match me.reload() {
                    Ok(s) => tracing::info!(
                        fingerprint = %s.fingerprint,
                        not_after = s.not_after,
                        stapled = s.stapled,
                        "TLS certificate reloaded; new connections use it"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS certificate not reloaded: the current one stays"
                    ),
                }
            }
        });
    }
}

fn warn_if_expiring(s: &CertSummary) {
    let left = s.not_after - now_secs();
    if left < EXPIRY_WARNING {
        tracing::warn!(
            days_left = left / 86_400,
            "the TLS certificate expires soon: replace the files (they are reloaded while serving)"
        );
    }
}
