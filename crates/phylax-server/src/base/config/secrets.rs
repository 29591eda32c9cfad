//! `phylax config check`: secrets where they must not be. The
//! configuration never holds a secret (docs/KEYS.md, "Memory and
//! secrets"); this reads the file as plain TOML, before any schema, so that
//! a PIN or password pasted into it is reported as what it is rather than
//! as an unknown setting, then checks the files that do hold secrets.

use super::{Config, CONFIG_FILE};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One thing `config check` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    /// `error` (fix it before starting) or `warning`.
    pub severity: &'static str,
    /// The setting (`hsm.pin_file`, `audit.webhook_url`…) or file.
    pub setting: String,
    pub message: String,
}

fn error(setting: impl Into<String>, message: impl Into<String>) -> Finding {
    Finding {
        severity: "error",
        setting: setting.into(),
        message: message.into(),
    }
}

/// Setting names that only a secret would have. (Phylax has no such
/// setting, so any of these is also an unknown setting; the check names it
/// for what it is.)
fn secret_name(key: &str) -> bool {
    const NAMES: [&str; 10] = [
        "pin",
        "password",
        "passwd",
        "secret",
        "private_key",
        "kek",
        "api_key",
        "access_token",
        "bearer_token",
        "client_secret",
    ];
    let k = key.to_ascii_lowercase();
    NAMES
        .iter()
        .any(|s| k == *s || k.ends_with(&format!("_{s}")))
}

/// A value that is itself key material or carries a credential.
fn secret_value(v: &str) -> Option<&'static str> {
    if v.contains("-----BEGIN") {
        return Some("a PEM block (key material) inline");
    }
    let (_, rest) = v.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Anything before the `@` is a user name, a password or a token.
    if authority.contains('@') {
        return Some("a URL with credentials in it");
    }
    // Query parameters that carry a credential.
    let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&') {
        let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
        if [
            "key",
            "api_key",
            "apikey",
            "token",
            "access_token",
            "secret",
            "password",
            "sig",
            "signature",
            "code",
            "auth",
        ]
        .contains(&name.as_str())
        {
            return Some("a URL with a credential in its query");
        }
    }
    // Webhook URLs whose path is the secret.
    let host = authority
        .split(':')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if (host == "hooks.slack.com" && rest.contains("/services/"))
        || (host.ends_with("discord.com") && rest.contains("/api/webhooks/"))
        || host.ends_with(".webhook.office.com")
    {
        return Some("a webhook URL whose path is its secret");
    }
    None
}

fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<Finding>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if secret_name(k) && !matches!(v, toml::Value::Table(_) | toml::Value::Boolean(_)) {
                    out.push(error(
                        &name,
                        "looks like a secret in plaintext: put it in a 0600 file or an environment variable (docs/KEYS.md)",
                    ));
                    continue;
                }
                walk(&name, v, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                walk(&format!("{prefix}[{i}]"), v, out);
            }
        }
        toml::Value::String(s) => {
            if let Some(what) = secret_value(s) {
                out.push(error(prefix, format!("holds {what}")));
            }
        }
        _ => {}
    }
}

/// A file holding a secret: it must exist and be readable by its owner only.
fn secret_file(setting: &str, p: &Path, out: &mut Vec<Finding>) {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(p) {
        Err(e) => out.push(error(setting, format!("{}: {}", p.display(), e.kind()))),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => out.push(error(
            setting,
            format!("{} is readable by group or others (chmod 600)", p.display()),
        )),
        Ok(_) => {}
    }
}

/// Everything `phylax config check` reports for the instance in `data_dir`.
pub fn check(data_dir: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let path = data_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return vec![error(CONFIG_FILE, format!("cannot read: {}", e.kind()))],
    };
    match text.parse::<toml::Table>() {
        Ok(t) => walk("", &toml::Value::Table(t), &mut out),
        Err(e) => out.push(error(CONFIG_FILE, format!("not TOML: {}", e.message()))),
    }
    if !out.is_empty() {
        return out;
    }
    let config = match Config::load(data_dir) {
        Ok(c) => c,
        Err(e) => return vec![error(CONFIG_FILE, e.to_string())],
    };
    let abs = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            data_dir.join(p)
        }
    };
    if std::env::var_os("PHYLAX_KEK").is_none() {
        if let Some(k) = &config.key_file {
            secret_file("key_file", &abs(k), &mut out);
            if abs(k).starts_with(data_dir) {
                out.push(error(
                    "key_file",
                    "inside the data directory: a copy of the data would carry its key",
                ));
            }
        }
    } else if config.hsm.is_some() {
        out.push(error(
            "PHYLAX_KEK",
            "set, but the KEK is in the HSM ([hsm]): unset it",
        ));
    }
    if let Some(h) = &config.hsm {
        if let Some(f) = &h.pin_file {
            secret_file("hsm.pin_file", &abs(f), &mut out);
        }
        if let Some(v) = &h.pin_env {
            if std::env::var_os(v).is_none() {
                out.push(Finding {
                    severity: "warning",
                    setting: "hsm.pin_env".into(),
                    message: format!(
                        "{v} is not set in this environment (the server needs it at start)"
                    ),
                });
            }
        }
    }
    secret_file("tls.key", &abs(&config.tls.key), &mut out);
    if let Some(f) = &config.detect.webhook_secret_file {
        secret_file("detect.webhook_secret_file", &abs(f), &mut out);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_that_are_secrets() {
        for k in [
            "pin",
            "password",
            "db_password",
            "secret",
            "webhook_secret",
            "api_key",
            "hsm_pin",
            "kek",
        ] {
            assert!(secret_name(k), "{k}");
        }
        for k in [
            "pin_file",
            "pin_env",
            "webhook_secret_file",
            "token_sha256",
            "token",
            "password_min_length",
            "token_lifetime_secs",
            "key_label",
            "listen",
        ] {
            assert!(!secret_name(k), "{k}");
        }
        // Made-up examples of what the check must catch, not secrets.
        assert!(secret_value("-----BEGIN PRIVATE KEY-----\nMII").is_some()); // pragma: allowlist secret
        assert!(secret_value("https://u:p@siem.example/x").is_some()); // pragma: allowlist secret
        assert!(secret_value("postgres://phylax:pw@db/phylax").is_some()); // pragma: allowlist secret
        assert!(secret_value("https://ghp_abc@siem.example/x").is_some()); // pragma: allowlist secret
        assert!(secret_value("https://siem.example/ingest?api_key=x").is_some()); // pragma: allowlist secret
        assert!(secret_value("https://hooks.slack.com/services/T0/B0/x").is_some()); // pragma: allowlist secret
        assert!(secret_value("https://siem.example/x?user=a@b").is_none());
        assert!(secret_value("https://siem.example/alerts").is_none());
        assert!(secret_value("/var/lib/phylax").is_none());
    }
}
