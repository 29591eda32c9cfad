//! Streaming the audit log to a SIEM: as JSON lines to a file, and as
//! RFC 5424 syslog messages over TLS (RFC 5425).
//!
//! The exporter follows the Merkle tree, not arrival order: sealed records
//! have fixed positions on every backend (on PostgreSQL a record with a
//! lower id can commit after a higher one, so "id > last seen" could skip
//! it). Each line is a record's AuditEvent JSON, byte for byte the leaf the
//! checkpoints sign, so the SIEM can prove any line is in the log.
//!
//! Delivery is at least once: lines are appended and fsynced, then the next
//! position is saved (`FILE.pos`, written and renamed). A crash between the
//! two repeats some lines on restart; a SIEM deduplicates by AuditEvent id.
//! Nothing is lost while the exporter is stopped: it resumes from its
//! position. When the file passes `export_max_bytes` it is renamed to
//! `FILE.<unix ms>` and a new one started; the newest `export_keep` rotated
//! files are kept (the database keeps everything regardless).
//!
//! Configure it on one node: every node with `export_file` set exports the
//! whole log to its own file.

use crate::audit::log::{AuditError, AuditLog};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Records per pass.
const PASS: u32 = 5_000;

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub file: PathBuf,
    pub max_bytes: u64,
    pub keep: usize,
}

fn pos_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".pos");
    PathBuf::from(p)
}

fn read_pos(file: &Path) -> u64 {
    read_pos_at(&pos_path(file))
}

fn write_pos(file: &Path, pos: u64) -> std::io::Result<()> {
    write_pos_at(&pos_path(file), pos)
}

fn io(e: std::io::Error) -> AuditError {
    AuditError::Unavailable(format!("audit export: {e}"))
}

/// Rotate `file` if it is over the limit; drop rotated files beyond `keep`.
fn rotate(cfg: &ExportConfig) -> std::io::Result<()> {
    let size = std::fs::metadata(&cfg.file).map(|m| m.len()).unwrap_or(0);
    if size < cfg.max_bytes {
        return Ok(());
    }
    let mut rotated = cfg.file.as_os_str().to_owned();
    rotated.push(format!(".{}", crate::base::clock::now_ms()));
    std::fs::rename(&cfg.file, PathBuf::from(rotated))?;
    let (Some(dir), Some(name)) = (cfg.file.parent(), cfg.file.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut old: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let stamp = n.strip_prefix(&prefix)?.parse::<u64>().ok()?;
            Some((stamp, e.path()))
        })
        .collect();
    old.sort();
    while old.len() > cfg.keep {
        let (_, p) = old.remove(0);
        std::fs::remove_file(p)?;
    }
    Ok(())
}

impl AuditLog {
    /// The exact leaf bytes of the record expected at tree position `pos`
    /// (checked like any opened record), advancing `pos`; `None` for a
    /// record pruned after retention (exported long ago). A gap in the
    /// positions is tampering and stops the export.
    fn export_leaf(
        &self,
        r: &phylax_store::AuditRow,
        pos: &mut u64,
    ) -> Result<Option<Vec<u8>>, AuditError> {
        if r.leaf_index != Some(*pos) {
            return Err(AuditError::Integrity(format!(
                "tree position {pos} is missing"
            )));
        }
        *pos += 1;
        if r.sealed.is_empty() {
            return Ok(None);
        }
        self.leaf_bytes(r).map(Some)
    }

    /// Append every sealed record past the saved position to the export
    /// file. Returns how many lines were written. Each record is checked
    /// (`open_row`) before it leaves: a tampered record stops the export.
    pub async fn export_pass(&self, cfg: &ExportConfig) -> Result<u64, AuditError> {
        let mut pos = read_pos(&cfg.file);
        let mut written = 0;
        loop {
            let rows = self.store().audit_by_index(pos, PASS).await?;
            if rows.is_empty() {
                return Ok(written);
            }
            let mut buf = Vec::with_capacity(rows.len() * 2048);
            for r in &rows {
                if let Some(leaf) = self.export_leaf(r, &mut pos)? {
                    buf.extend(leaf);
                    buf.push(b'\n');
                }
            }
            let file = cfg.file.clone();
            let cfg2 = cfg.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                rotate(&cfg2)?;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)?;
                f.write_all(&buf)?;
                f.sync_all()?;
                write_pos(&file, pos)
            })
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
            .map_err(io)?;
            written += rows.len() as u64;
        }
    }

    /// Export every few seconds until the process ends.
    pub fn spawn_exporter(self: &Arc<Self>, cfg: ExportConfig, every: std::time::Duration) {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(log) = log.upgrade() else { return };
                if let Err(e) = log.export_pass(&cfg).await {
                    tracing::error!(event = "audit.export_failed", error = %e,
                        "audit export stalled; it resumes from its saved position");
                }
            }
        });
    }
}

/// Where sealed records go over syslog (RFC 5424 messages, RFC 5425
/// octet-counted framing, TLS).
#[derive(Debug, Clone)]
pub struct SyslogConfig {
    pub host: String,
    pub port: u16,
    /// The saved position (next tree position to send).
    pub pos_file: PathBuf,
    /// The HOSTNAME field of each message.
    pub hostname: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// A TLS client configuration trusting only the CA certificates in `pem`.
pub fn syslog_tls(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(c.map_err(|_| "unreadable CA certificate".to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CA certificate in syslog_ca_file".into());
    }
    let mut prov = rustls::crypto::ring::default_provider();
    prov.cipher_suites = crate::net::tls::allowed_suites();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(prov))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// One RFC 5424 message (facility 13 "log audit", severity 6 "info"),
/// with the AuditEvent JSON as MSG, framed by its length (RFC 5425).
fn syslog_frame(hostname: &str, recorded_ms: i64, json: &[u8]) -> Vec<u8> {
    let head = format!(
        "<110>1 {} {hostname} phylax - audit - ",
        phylax_audit::event::instant(recorded_ms)
    );
    let len = head.len() + json.len();
    let mut out = format!("{len} {head}").into_bytes();
    out.extend_from_slice(json);
    out
}

impl AuditLog {
    /// Send every sealed record past the saved position to the syslog
    /// collector, then save the position. Returns how many were sent. A
    /// collector that is down costs nothing but delay: the database is the
    /// spool, and the next pass resumes from the saved position.
    pub async fn syslog_pass(&self, cfg: &SyslogConfig) -> Result<u64, AuditError> {
        use tokio::io::AsyncWriteExt;
        let mut pos = read_pos_at(&cfg.pos_file);
        let first = self.store().audit_by_index(pos, 1).await?;
        if first.is_empty() {
            return Ok(0);
        }
        let unavailable = |e: String| AuditError::Unavailable(format!("syslog: {e}"));
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)),
        )
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
            .map_err(|e| unavailable(e.to_string()))?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut sent = 0;
        loop {
            let rows = self.store().audit_by_index(pos, 1000).await?;
            if rows.is_empty() {
                break;
            }
            let mut buf = Vec::with_capacity(rows.len() * 2200);
            for r in &rows {
                if let Some(leaf) = self.export_leaf(r, &mut pos)? {
                    buf.extend(syslog_frame(&cfg.hostname, r.recorded, &leaf));
                }
            }
            tls.write_all(&buf)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            tls.flush().await.map_err(|e| unavailable(e.to_string()))?;
            write_pos_at(&cfg.pos_file, pos).map_err(io)?;
            sent += rows.len() as u64;
        }
        let _ = tls.shutdown().await;
        Ok(sent)
    }

    /// Send to syslog every few seconds until the process ends.
    pub fn spawn_syslog(self: &Arc<Self>, cfg: SyslogConfig, every: std::time::Duration) {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(log) = log.upgrade() else { return };
                if let Err(e) = log.syslog_pass(&cfg).await {
                    tracing::warn!(event = "audit.syslog_failed", error = %e,
                        "audit records not sent to syslog yet; retrying from the saved position");
                }
            }
        });
    }
}

fn read_pos_at(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_pos_at(p: &Path, pos: u64) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pos}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, p)
}
