//! Counters for `GET /metrics` (served by [`crate::ops::metrics`]).
//!
//! Labels are fixed vocabularies only (interaction names, status codes,
//! event kinds): no patient id, user id, client id, path or query ever
//! becomes a label, so a metrics store never holds PHI or a map of who
//! looked at whom.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;

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

    pub fn render(&self, out: &mut String) {
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
