//! The bounds every setting must stay within (docs/OPERATIONS.md), checked when the file is loaded.

use super::*;

impl Config {
    /// Every setting within its documented bounds (docs/OPERATIONS.md);
    /// the first that is not is named.
    pub(super) fn check(&self) -> Result<(), String> {
        self.check_http()?;
        self.check_auth()?;
        self.check_audit_and_detect()?;
        self.check_access()?;
        self.check_keys()?;
        self.check_backup()?;
        if self.audit.retention_days < 365 {
            return Err("audit.retention_days must be at least 365".into());
        }
        Ok(())
    }

    /// `[backup]`.
    pub(super) fn check_backup(&self) -> Result<(), String> {
        let b = &self.backup;
        if !(1..=365).contains(&b.drill_interval_days) {
            return Err("backup.drill_interval_days must be 1–365".into());
        }
        if !(1..=10_000).contains(&b.keep) || !(1..=3650).contains(&b.keep_days) {
            return Err("backup.keep must be 1–10000 and backup.keep_days 1–3650".into());
        }
        if b.interval()?.is_some() && (b.dir.is_none() || b.recipients_file.is_none()) {
            return Err("backup.schedule needs backup.dir and backup.recipients_file".into());
        }
        Ok(())
    }

    /// Where the KEK comes from, and `[keys]`.
    pub(super) fn check_keys(&self) -> Result<(), String> {
        if !(1..=3650).contains(&self.keys.max_age_days) {
            return Err("keys.max_age_days must be 1–3650".into());
        }
        if self.keys.retention_years > 100 {
            return Err("keys.retention_years must be 0–100".into());
        }
        if self.key_file.is_none() && self.hsm.is_none() {
            return Err("name the KEK: key_file, or an [hsm] section".into());
        }
        if let Some(h) = &self.hsm {
            if h.pin_file.is_some() == h.pin_env.is_some() {
                return Err(
                    "[hsm]: give exactly one of pin_file and pin_env (never the PIN itself)".into(),
                );
            }
            if h.token.is_empty() || h.key_label.is_empty() {
                return Err("[hsm]: token and key_label must not be empty".into());
            }
        }
        Ok(())
    }

    /// `public_url` and `[http]`.
    pub(super) fn check_http(&self) -> Result<(), String> {
        if !(self.public_url.starts_with("https://") || self.public_url.starts_with("http://"))
            || self.public_url.ends_with('/')
        {
            return Err("public_url must be an http(s) URL without a trailing slash".into());
        }
        if let Some(a) =
            self.http.base_aliases.iter().find(|a| {
                !(a.starts_with("https://") || a.starts_with("http://")) || a.ends_with('/')
            })
        {
            return Err(format!(
                "http.base_aliases: {a:?} must be an http(s) FHIR base URL without a trailing slash"
            ));
        }
        if self.http.max_connections == 0
            || [
                self.http.header_timeout_secs,
                self.http.idle_timeout_secs,
                self.http.body_timeout_secs,
            ]
            .iter()
            .any(|t| !(1..=3600).contains(t))
        {
            return Err("http.max_connections must be at least 1, and http.header_timeout_secs, idle_timeout_secs and body_timeout_secs 1 to 3600".into());
        }
        if self.http.max_response_bytes < 1024 {
            return Err("http.max_response_bytes must be at least 1024".into());
        }
        if self.http.max_body_bytes < 1024 {
            return Err("http.max_body_bytes must be at least 1024".into());
        }
        if self.http.max_page_size == 0
            || self.http.default_page_size == 0
            || self.http.default_page_size > self.http.max_page_size
        {
            return Err(
                "page sizes must be positive and default_page_size <= max_page_size".into(),
            );
        }
        Ok(())
    }

    /// `[auth]`: tokens, lockout, passwords, sessions, Argon2id, passkeys.
    pub(super) fn check_auth(&self) -> Result<(), String> {
        let a = &self.auth;
        if !(1..=900).contains(&a.token_lifetime_secs) {
            return Err("auth.token_lifetime_secs must be between 1 and 900".into());
        }
        if !(60..=86_400).contains(&a.lockout_secs) {
            return Err("auth.lockout_secs must be between 60 and 86400".into());
        }
        if !(1..=100).contains(&a.lockout_threshold) {
            return Err(
                "auth.lockout_threshold must be between 1 and 100 (NIST SP 800-63B)".into(),
            );
        }
        if !(8..=15).contains(&a.password_min_length) {
            return Err("auth.password_min_length must be between 8 and 15".into());
        }
        if !(60..=24 * 3600).contains(&a.session_idle_secs)
            || !(a.session_idle_secs..=7 * 24 * 3600).contains(&a.session_max_secs)
        {
            return Err("auth.session_idle_secs must be 60 s–24 h and session_max_secs between it and 7 days".into());
        }
        if !(60..=365 * 24 * 3600).contains(&a.offline_refresh_secs) {
            return Err("auth.offline_refresh_secs must be between 60 s and 365 days".into());
        }
        if !(30..=3600).contains(&a.step_up_secs) {
            return Err("auth.step_up_secs must be between 30 and 3600".into());
        }
        if !(300..=30 * 24 * 3600).contains(&a.enrollment_secs) {
            return Err("auth.enrollment_secs must be between 5 minutes and 30 days".into());
        }
        if phylax_crypto::password::PasswordParams::new(
            a.argon2_memory_kib,
            a.argon2_iterations,
            a.argon2_parallelism,
        )
        .is_err()
        {
            return Err("auth.argon2_* are below the OWASP minimum (19456 KiB, 2 iterations, 1 lane) or out of range".into());
        }
        if !(1..=256).contains(&a.argon2_max_concurrent) || !(1..=60).contains(&a.argon2_queue_secs)
        {
            return Err(
                "auth.argon2_max_concurrent must be 1 to 256 and auth.argon2_queue_secs 1 to 60"
                    .into(),
            );
        }
        let roles = self.roles()?;
        for r in a.mfa_optional_roles.iter().chain(&a.uv_required_roles) {
            if roles.get(r).is_none() {
                return Err(format!(
                    "auth.mfa_optional_roles / uv_required_roles: unknown role {r}"
                ));
            }
        }
        if self.passkey_party().is_err() {
            return Err("auth.passkey_rp_id must be a domain (default: the host of public_url) and passkey_origins https origins".into());
        }
        Ok(())
    }

    /// `[audit]`, `[metrics]` and `[detect]`.
    pub(super) fn check_audit_and_detect(&self) -> Result<(), String> {
        if !(1..=300).contains(&self.audit.checkpoint_secs) {
            return Err("audit.checkpoint_secs must be between 1 and 300".into());
        }
        if self
            .metrics
            .token_sha256
            .as_deref()
            .is_some_and(|h| h.len() != 64 || hex::decode(h).is_err())
        {
            return Err(
                "metrics.token_sha256 must be 64 hex digits (sha256sum of the token)".into(),
            );
        }
        let d = &self.detect;
        if d.webhook_url.is_some()
            && (d.webhook_secret_file.is_none()
                || d.webhook_ca_file.is_none()
                || !d
                    .webhook_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://")))
        {
            return Err("detect.webhook_url must be https:// and needs webhook_secret_file and webhook_ca_file".into());
        }
        if d.business_hours_utc.is_some_and(|(a, b)| a > 23 || b > 24) {
            return Err("detect.business_hours_utc must be hours 0–24".into());
        }
        if let Some(t) = &self.audit.syslog_tls {
            let ok = t
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok || self.audit.syslog_ca_file.is_none() {
                return Err(
                    "audit.syslog_tls must be host:port and needs audit.syslog_ca_file".into(),
                );
            }
        }
        if self.audit.export_max_bytes < 4096 {
            return Err("audit.export_max_bytes must be at least 4096".into());
        }
        Ok(())
    }

    /// `[access]`.
    pub(super) fn check_access(&self) -> Result<(), String> {
        for l in &self.access.restricted_labels {
            if l.split_once('|')
                .is_none_or(|(s, c)| s.is_empty() || c.is_empty())
            {
                return Err(format!(
                    "access.restricted_labels: {l:?} must be system|code"
                ));
            }
        }
        if !(1..=24 * 60).contains(&self.access.break_glass_minutes) {
            return Err("access.break_glass_minutes must be 1 to 1440".into());
        }
        if !(60..=3600).contains(&self.access.break_glass_mfa_max_age_secs) {
            return Err("access.break_glass_mfa_max_age_secs must be 60 to 3600".into());
        }
        if self.access.max_reach == 0 {
            return Err("access.max_reach must be positive".into());
        }
        Ok(())
    }
}
