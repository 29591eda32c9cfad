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
use std::fmt::Write;
use std::sync::Arc;

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

/// The newest backup and restore drill (docs/BACKUP.md): what an alert
/// on "no drill within the interval" or "last drill failed" needs.
async fn backup_metrics(out: &mut String, st: &AppState, now: i64) {
    let store = st.key_store();
    if let Ok(Some(t)) = crate::backup::create::last_backup(store).await {
        let _ = writeln!(
            out,
            "# HELP phylax_backup_last_timestamp_seconds When the newest backup was written."
        );
        let _ = writeln!(out, "# TYPE phylax_backup_last_timestamp_seconds gauge");
        let _ = writeln!(out, "phylax_backup_last_timestamp_seconds {}", t / 1000);
    }
    let last = crate::backup::drill::last_drill(store).await.ok().flatten();
    let interval_ms = i64::from(st.config.backup.drill_interval_days) * 86_400_000;
    let overdue = last
        .as_ref()
        .is_none_or(|d| now - d.at_ms > interval_ms || !d.ok);
    let _ = writeln!(out, "# HELP phylax_backup_drill_overdue 1 when no restore drill passed within [backup] drill_interval_days.");
    let _ = writeln!(out, "# TYPE phylax_backup_drill_overdue gauge");
    let _ = writeln!(out, "phylax_backup_drill_overdue {}", u8::from(overdue));
    if let Some(d) = last {
        let _ = writeln!(
            out,
            "# HELP phylax_backup_drill_last_timestamp_seconds When the newest restore drill ran."
        );
        let _ = writeln!(
            out,
            "# TYPE phylax_backup_drill_last_timestamp_seconds gauge"
        );
        let _ = writeln!(
            out,
            "phylax_backup_drill_last_timestamp_seconds {}",
            d.at_ms / 1000
        );
        let _ = writeln!(
            out,
            "# HELP phylax_backup_drill_last_success 1 when the newest restore drill passed."
        );
        let _ = writeln!(out, "# TYPE phylax_backup_drill_last_success gauge");
        let _ = writeln!(out, "phylax_backup_drill_last_success {}", u8::from(d.ok));
        let _ = writeln!(out, "# HELP phylax_backup_drill_last_duration_seconds How long the newest restore drill's restore took (the RTO it shows).");
        let _ = writeln!(
            out,
            "# TYPE phylax_backup_drill_last_duration_seconds gauge"
        );
        let _ = writeln!(
            out,
            "phylax_backup_drill_last_duration_seconds {}",
            d.rto_secs
        );
    }
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
        let (sealed, waiting) = st.audit.sizes().await?;
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
    if let Ok(Some(cp)) = st.audit.latest_checkpoint().await {
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
    // The keys in force: the newest generation of those that rotate.
    let store = st.key_store();
    let index_row = crate::data::key_events::index_generation(store)
        .await
        .map(crate::data::key_events::index_key_row);
    let token_row = crate::data::key_events::token_generation(store)
        .await
        .map(crate::data::key_events::token_key_row);
    for (purpose, row) in [
        (
            "checkpoint",
            Ok(crate::data::keyring::checkpoint_row(
                st.audit.checkpoint_generation(),
            )),
        ),
        ("blind_index", index_row),
        ("token", token_row),
    ] {
        let Ok(row) = row else { continue };
        let row = row.as_str();
        if let Ok(Some(t)) = st.keys.created(row).await {
            let _ = writeln!(
                out,
                "phylax_key_age_seconds{{purpose=\"{purpose}\"}} {}",
                now / 1000 - t
            );
        }
    }
    backup_metrics(&mut out, &st, now).await;
    let newest_signing = st.authn.signing.read().len();
    if let Ok(Some(t)) = st.keys.created(&format!("sig:sig-{newest_signing}")).await {
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
