//! `GET /metrics`: Prometheus text exposition (format 0.0.4).
//!
//! Labels are fixed vocabularies only (interaction names, status codes,
//! event kinds): no patient id, user id, client id, path or query ever
//! becomes a label, so a metrics store never holds PHI or a map of who
//! looked at whom.
//!
//! Access: disabled (404) unless `[metrics] token_sha256` is set; a scrape
//! must then send `Authorization: Bearer <token>` whose SHA-256 matches
//! (compared in constant time). Prometheus reads the token from a file
//! (`authorization.credentials_file`).

use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Hist>>,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    alerts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    rate_limited: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// One FHIR interaction finished.
    pub fn request(&self, interaction: &'static str, status: u16, secs: f64) {
        *self
            .requests
            .lock()
            .entry((interaction, status))
            .or_default() += 1;
        let mut l = self.latency.lock();
        let h = l.entry(interaction).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.n += 1;
    }

    /// A request refused by a rate limit (`fhir`, `token`).
    pub fn rate_limited(&self, kind: &'static str) {
        *self.rate_limited.lock().entry(kind).or_default() += 1;
    }

    /// A refused sign-in step or token request (`login`, `mfa`, `token`).
    pub fn auth_failure(&self, kind: &'static str) {
        *self.auth_failures.lock().entry(kind).or_default() += 1;
    }

    /// An alert raised by a detection rule.
    pub fn alert(&self, rule: &'static str, severity: &'static str) {
        *self.alerts.lock().entry((rule, severity)).or_default() += 1;
    }

    /// The counters in Prometheus text format (the part this type owns).
    pub fn exposition(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP phylax_requests_total FHIR interactions by interaction and HTTP status."
        );
        let _ = writeln!(out, "# TYPE phylax_requests_total counter");
        for ((i, s), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "phylax_requests_total{{interaction=\"{i}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP phylax_request_duration_seconds Time to answer FHIR interactions, audit record included.");
        let _ = writeln!(out, "# TYPE phylax_request_duration_seconds histogram");
        for (i, h) in self.latency.lock().iter() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "phylax_request_duration_seconds_bucket{{interaction=\"{i}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "phylax_request_duration_seconds_bucket{{interaction=\"{i}\",le=\"+Inf\"}} {}",
                h.n
            );
            let _ = writeln!(
                out,
                "phylax_request_duration_seconds_sum{{interaction=\"{i}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "phylax_request_duration_seconds_count{{interaction=\"{i}\"}} {}",
                h.n
            );
        }
        let _ = writeln!(
            out,
            "# HELP phylax_auth_failures_total Refused sign-in steps and token requests."
        );
        let _ = writeln!(out, "# TYPE phylax_auth_failures_total counter");
        for (k, n) in self.auth_failures.lock().iter() {
            let _ = writeln!(out, "phylax_auth_failures_total{{kind=\"{k}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP phylax_rate_limited_total Requests refused by a rate limit (429)."
        );
        let _ = writeln!(out, "# TYPE phylax_rate_limited_total counter");
        for (k, n) in self.rate_limited.lock().iter() {
            let _ = writeln!(out, "phylax_rate_limited_total{{kind=\"{k}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP phylax_alerts_total Alerts raised, by detection rule and severity."
        );
        let _ = writeln!(out, "# TYPE phylax_alerts_total counter");
        for ((r, s), n) in self.alerts.lock().iter() {
            let _ = writeln!(
                out,
                "phylax_alerts_total{{rule=\"{r}\",severity=\"{s}\"}} {n}"
            );
        }
    }
}

fn authorized(st: &AppState, h: &HeaderMap) -> bool {
    use subtle::ConstantTimeEq;
    let Some(want) = st
        .config
        .metrics
        .token_sha256
        .as_deref()
        .and_then(|x| hex::decode(x).ok())
    else {
        return false;
    };
    let Some(token) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let got = ring_sha256(token.as_bytes());
    got.len() == want.len() && bool::from(got.ct_eq(&want))
}

fn ring_sha256(b: &[u8]) -> Vec<u8> {
    phylax_audit::merkle::sha256(b).to_vec()
}

pub async fn metrics(State(st): State<Arc<AppState>>, h: HeaderMap) -> Response {
    if st.config.metrics.token_sha256.is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !authorized(&st, &h) {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let mut out = String::new();
    st.metrics.render(&mut out);
    let now = crate::base::clock::now_ms();
    let _ = writeln!(out, "# HELP phylax_audit_records Records in the audit log, and how many are sealed into the Merkle tree.");
    let _ = writeln!(out, "# TYPE phylax_audit_records gauge");
    // Sealed plus waiting, not a count of the log: that reads every
    // record (110 ms at a million on PostgreSQL, growing) on every scrape.
    let counts = async {
        let sealed = st.store.audit_tree_size().await?;
        let waiting = st.store.audit_pending_count().await?;
        Ok::<_, phylax_store::StoreError>((sealed + waiting, sealed))
    };
    match counts.await {
        Ok((all, sealed)) => {
            let _ = writeln!(out, "phylax_audit_records{{state=\"all\"}} {all}");
            let _ = writeln!(out, "phylax_audit_records{{state=\"sealed\"}} {sealed}");
        }
        Err(e) => tracing::warn!(error = %e, "metrics: audit counts unavailable"),
    }
    if let Some((syncs, records)) = st.audit.journal_stats() {
        let _ = writeln!(out, "# HELP phylax_audit_journal_syncs_total Syncs of this node's audit journal (records per sync shows how well group commit works).");
        let _ = writeln!(out, "# TYPE phylax_audit_journal_syncs_total counter");
        let _ = writeln!(out, "phylax_audit_journal_syncs_total {syncs}");
        let _ = writeln!(
            out,
            "# HELP phylax_audit_journal_records_total Audit records made durable by this node's journal."
        );
        let _ = writeln!(out, "# TYPE phylax_audit_journal_records_total counter");
        let _ = writeln!(out, "phylax_audit_journal_records_total {records}");
    }
    if let Ok(Some(cp)) = st.store.latest_checkpoint().await {
        let _ = writeln!(
            out,
            "# HELP phylax_audit_checkpoint_age_seconds Time since the newest signed checkpoint."
        );
        let _ = writeln!(out, "# TYPE phylax_audit_checkpoint_age_seconds gauge");
        let _ = writeln!(
            out,
            "phylax_audit_checkpoint_age_seconds {}",
            (now - cp.time) as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "# HELP phylax_key_age_seconds Age of the keys in use, by purpose."
    );
    let _ = writeln!(out, "# TYPE phylax_key_age_seconds gauge");
    for (purpose, row) in [
        ("checkpoint", "log:checkpoint-1"),
        ("blind_index", "mac:blind-index"),
        ("token", "mac:token"),
    ] {
        if let Ok(Some(t)) = st.store.wrapped_key_created(row).await {
            let _ = writeln!(
                out,
                "phylax_key_age_seconds{{purpose=\"{purpose}\"}} {}",
                now / 1000 - t
            );
        }
    }
    let newest_signing = st.signing.read().len();
    if let Ok(Some(t)) = st
        .store
        .wrapped_key_created(&format!("sig:sig-{newest_signing}"))
        .await
    {
        let _ = writeln!(
            out,
            "phylax_key_age_seconds{{purpose=\"id_token_signing\"}} {}",
            now / 1000 - t
        );
    }
    let mut r = (StatusCode::OK, out).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
