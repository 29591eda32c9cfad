//! How a PostgreSQL URL is allowed to reach its server.
//!
//! Phylax's rows are sealed, but the connection also carries blind index
//! hashes, plaintext clinical dates and codes, the shape of every query and
//! the database password's challenge: an attacker on the path between a
//! node and a remote database learns what the sealing was meant to hide,
//! or impersonates the database. So the rule fails closed:
//!
//! - a server on this machine (a Unix socket, `localhost`, a loopback
//!   address) may be reached without TLS;
//! - any other server must be reached with TLS that verifies its
//!   certificate chain *and* its name: libpq's own parameters,
//!   `sslmode=verify-full&sslrootcert=/path/to/ca.pem`, are read from the
//!   URL (tokio-postgres does not know them) and become a rustls client
//!   that trusts only that CA. Weaker modes (`prefer`, `require`, which
//!   encrypt without checking who answers, and `verify-ca`) are refused
//!   for a remote host rather than silently accepted.
//!
//! There is deliberately no switch for plaintext to a remote host.

use crate::{Result, StoreError};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use std::sync::Arc;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

fn refuse(msg: impl Into<String>) -> StoreError {
    StoreError::Unavailable(msg.into())
}

/// True when every host of `cfg` is on this machine.
fn local_only(cfg: &tokio_postgres::Config) -> bool {
    let addrs_local = cfg.get_hostaddrs().iter().all(|a| a.is_loopback());
    let hosts_local = cfg.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    });
    addrs_local && hosts_local
}

/// A rustls client trusting only the CA certificates in `pem`.
fn client_trusting(pem: &[u8]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|_| refuse("sslrootcert: unreadable certificate"))?;
        roots
            .add(c)
            .map_err(|_| refuse("sslrootcert: unusable certificate"))?;
    }
    if roots.is_empty() {
        return Err(refuse("sslrootcert: no certificate in the file"));
    }
    let prov = rustls::crypto::ring::default_provider();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(prov))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| refuse(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

/// The connection settings and TLS connector for `url` (a `postgres://`
/// URL), or why the URL is refused. The returned config's `sslmode` is
/// `require` when TLS is used (so tokio-postgres never falls back to
/// plaintext) and `disable` otherwise.
pub(crate) fn prepare(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let invalid = || refuse("invalid PostgreSQL URL");
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut mode: Option<String> = None;
    let mut root: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| invalid())
        };
        match k {
            "sslmode" => mode = Some(decoded()?),
            "sslrootcert" => root = Some(decoded()?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut cfg: tokio_postgres::Config = rest.parse().map_err(|_| invalid())?;
    let local = local_only(&cfg);
    let tls = match (mode.as_deref(), root) {
        (Some("verify-full"), Some(path)) => {
            let pem = std::fs::read(&path)
                .map_err(|_| refuse("sslrootcert: the file cannot be read"))?;
            cfg.ssl_mode(SslMode::Require);
            client_trusting(&pem)?
        }
        (Some("verify-full"), None) => {
            return Err(refuse(
                "sslmode=verify-full needs sslrootcert=FILE (the CA that signed the server's certificate)",
            ))
        }
        (_, Some(_)) => {
            return Err(refuse(
                "sslrootcert is used only with sslmode=verify-full",
            ))
        }
        (None | Some("disable" | "allow" | "prefer"), None) if local => {
            cfg.ssl_mode(SslMode::Disable);
            // Never used: TLS is disabled for this connection.
            client_trusting_nothing()?
        }
        (Some(m @ ("require" | "verify-ca")), None) => {
            return Err(refuse(format!(
                "sslmode={m} is not accepted: use sslmode=verify-full with sslrootcert=FILE, which also checks the server's name"
            )))
        }
        (None | Some("disable" | "allow" | "prefer"), None) => {
            return Err(refuse(
                "a PostgreSQL server on another host must be reached over verified TLS: add sslmode=verify-full&sslrootcert=FILE to the URL",
            ))
        }
        (Some(_), None) => return Err(refuse("unknown sslmode")),
    };
    Ok((cfg, MakeRustlsConnect::new(tls)))
}

/// A client configuration with no trusted roots, for connections that
/// never negotiate TLS.
/// The libpq connection string for PostgreSQL's own tools (`pg_dump`,
/// `pg_restore`) reaching the server `url` names, under the same rule as
/// [`prepare`] (checked first), and the password apart: it goes into the
/// tool's environment, not onto its command line.
pub(crate) fn libpq(url: &str) -> Result<(String, Option<String>)> {
    let (cfg, _) = prepare(url)?;
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(n) => n.clone(),
            Host::Unix(p) => p.to_string_lossy().into_owned(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", quote(&hosts.join(","))));
    }
    let ports: Vec<String> = cfg.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", quote(&ports.join(","))));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={}", quote(u)));
    }
    if let Some(d) = cfg.get_dbname() {
        parts.push(format!("dbname={}", quote(d)));
    }
    if let Some(o) = cfg.get_options() {
        parts.push(format!("options={}", quote(o)));
    }
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |name: &str| {
        query.split('&').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k == name).then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    };
    match (param("sslmode").as_deref(), param("sslrootcert")) {
        (Some("verify-full"), Some(root)) => {
            parts.push("sslmode='verify-full'".into());
            parts.push(format!("sslrootcert={}", quote(&root)));
        }
        // `prepare` allowed it: a server on this machine.
        _ => parts.push("sslmode='disable'".into()),
    }
    let password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    Ok((parts.join(" "), password))
}

fn client_trusting_nothing() -> Result<rustls::ClientConfig> {
    let prov = rustls::crypto::ring::default_provider();
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(prov))
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(format!("TLS: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        match prepare(url) {
            Ok(_) => panic!("accepted: {url}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn plaintext_to_loopback_only() {
        for url in [
            "postgres://u:p@localhost/db",
            "postgres://u:p@127.0.0.1:5433/db",
            "postgres://u:p@[::1]/db",
            "postgres://u:p@localhost/db?sslmode=prefer",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
        ] {
            let (cfg, _) = prepare(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(cfg.get_ssl_mode(), SslMode::Disable, "{url}");
        }
        for url in [
            "postgres://u:p@db.example/db",
            "postgres://u:p@db.example/db?sslmode=prefer",
            "postgres://u:p@192.0.2.10/db?sslmode=disable",
            // One remote host among local ones is still remote.
            "postgres://u:p@localhost,db.example/db",
            "postgres://u:p@localhost/db?hostaddr=192.0.2.10",
        ] {
            assert!(err(url).contains("verify-full"), "{url}");
        }
    }

    #[test]
    fn weak_or_incomplete_tls_settings_are_refused() {
        assert!(err("postgres://u@db.example/db?sslmode=require").contains("not accepted"));
        assert!(err("postgres://u@localhost/db?sslmode=verify-ca").contains("not accepted"));
        assert!(err("postgres://u@db.example/db?sslmode=verify-full").contains("sslrootcert"));
        assert!(err("postgres://u@db.example/db?sslrootcert=%2Fx").contains("only with"));
        assert!(err("postgres://u@db.example/db?sslmode=bogus").contains("unknown"));
        assert!(err(
            "postgres://u@db.example/db?sslmode=verify-full&sslrootcert=%2Fnonexistent%2Fca.pem"
        )
        .contains("cannot be read"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, b"not a certificate").unwrap();
        let url = format!(
            "postgres://u@db.example/db?sslmode=verify-full&sslrootcert={}",
            p.display()
        );
        assert!(err(&url).contains("no certificate"));
    }

    /// Other parameters survive the rewrite, byte for byte.
    #[test]
    fn other_parameters_are_kept() {
        let (cfg, _) =
            prepare("postgres://u@localhost/db?options=-c%20search_path%3Dx&sslmode=disable")
                .unwrap();
        assert_eq!(cfg.get_options(), Some("-c search_path=x"));
    }
}
