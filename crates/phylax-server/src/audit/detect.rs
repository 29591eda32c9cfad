//! Real-time detection on the audit stream.
//!
//! Every record a node commits is also handed to its detector, which keeps
//! sliding windows in memory and raises alerts when a rule's threshold is
//! crossed. An alert is itself an AuditEvent (`Security Alert` / `alert`),
//! a `detect.alert` log line, a `phylax_alerts_total` count, and, if a
//! webhook is configured, an HMAC-SHA-256-signed POST that is spooled to
//! disk first and retried until the receiver answers 2xx. Rules may also
//! respond on their own: `lock` locks the account (ending its sessions and
//! tokens on every node).
//!
//! Rules (thresholds and windows in `[detect]`):
//! - `brute-force-account`: failed sign-ins for one account;
//! - `brute-force-ip`: failed sign-ins from one address;
//! - `password-spraying`: failed sign-ins from one address across accounts;
//! - `mfa-failures`: refused second factors for one account;
//! - `token-replay`: a used code or rotated refresh token came back;
//! - `cloned-passkey`: a passkey's signature counter went backwards;
//! - `scraping`: one user or client touching many distinct patients;
//! - `off-hours`: patient data accessed outside the configured hours;
//! - `privilege-change`: a role changed or an account was reset;
//! - `audit-verification`: the log no longer matches its checkpoints;
//! - `break-the-glass`: emergency access was granted;
//! - `outside-care`: a user repeatedly refused patients outside their care
//!   relationships (probing);
//! - `vip-access`: a user touched a flagged (VIP) patient's record;
//! - `dormant-account`: an account signed in after a long silence;
//! - `own-family-name`: a user looked up patients sharing their family name.
//!
//! Limits: windows are per node (with several nodes each sees its own
//! traffic), and a restart empties them.

use crate::audit::alert::{Alert, Detector, Msg};
use crate::audit::log::{AuditLog, AuthEvent};
use crate::base::config::DetectConfig;
use phylax_audit::event::{Action, AuditFacts, EventKind, Outcome};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

/// Sliding-window state. Pure: `observe` returns the alerts to raise.
#[derive(Debug)]
pub struct Rules {
    /// Shared, so that each record takes a reference count, not a copy.
    cfg: Arc<DetectConfig>,
    failures_by_user: HashMap<String, VecDeque<i64>>,
    failures_by_ip: HashMap<String, VecDeque<(i64, Option<String>)>>,
    mfa_by_user: HashMap<String, VecDeque<i64>>,
    patients_by_agent: HashMap<String, Touched>,
    reach_denials_by_user: HashMap<String, VecDeque<i64>>,
    /// Flagged (VIP) patients, kept current by the server.
    vip: VipSet,
    /// (rule, key) → time of the last alert, so a rule fires once per window.
    fired: HashMap<(&'static str, String), i64>,
}

/// The patients one agent touched within a window, each once, with the
/// time of its last touch, least recently touched first: a touch moves
/// the patient to the back, expiry pops from the front, and the number of
/// distinct patients is the map's length. All O(1) per touch, and memory
/// follows the number of distinct patients, not of touches. Keeping every
/// touch (as this did before) held 48,000 entries a second for a backend
/// client running family searches, about 29 million over the default
/// 10-minute window, and its hashing was most of the detector's time
/// (docs/PERFORMANCE.md). Keys are hashed with SipHash under a random
/// key, since patient ids can be chosen by clients.
#[derive(Debug, Default)]
struct Touched {
    last: hashlink::LinkedHashMap<String, i64, std::collections::hash_map::RandomState>,
}

impl Touched {
    fn touch(&mut self, now: i64, patient: &str) {
        match self.last.to_back(patient) {
            Some(t) => *t = (*t).max(now),
            None => {
                self.last.insert(patient.to_owned(), now);
            }
        }
    }

    /// Forget patients last touched before `since`. Records arrive in
    /// about the order they were made; one that arrives a little late
    /// still moves its patient to the back (keeping the later of the two
    /// times for a patient already there), so that patient expires when
    /// it reaches the front: at most that little late, never early.
    fn expire(&mut self, since: i64) {
        while self.last.front().is_some_and(|(_, t)| *t < since) {
            self.last.pop_front();
        }
    }

    fn distinct(&self) -> usize {
        self.last.len()
    }
}

/// Count an event at `now` and return how many fall within the window.
fn bump(q: &mut VecDeque<i64>, now: i64, win: i64) -> usize {
    q.push_back(now);
    while q.front().is_some_and(|t| *t < now - win) {
        q.pop_front();
    }
    q.len()
}

fn prune<T>(q: &mut VecDeque<(i64, T)>, since: i64) {
    while q.front().is_some_and(|(t, _)| *t < since) {
        q.pop_front();
    }
}

/// The flagged (VIP) patients' ids, shared with the server that keeps it
/// current (`AppState::refresh_vip`).
pub type VipSet = Arc<parking_lot::RwLock<HashSet<String>>>;

impl Rules {
    pub fn new(cfg: DetectConfig) -> Rules {
        Rules::with_vip(cfg, VipSet::default())
    }

    pub fn with_vip(cfg: DetectConfig, vip: VipSet) -> Rules {
        Rules {
            cfg: Arc::new(cfg),
            failures_by_user: HashMap::new(),
            failures_by_ip: HashMap::new(),
            mfa_by_user: HashMap::new(),
            patients_by_agent: HashMap::new(),
            reach_denials_by_user: HashMap::new(),
            vip,
            fired: HashMap::new(),
        }
    }

    fn once(&mut self, rule: &'static str, key: &str, now: i64, window_ms: i64) -> bool {
        let k = (rule, key.to_owned());
        match self.fired.get(&k) {
            Some(t) if now - t < window_ms => false,
            _ => {
                self.fired.insert(k, now);
                true
            }
        }
    }

    /// Feed one committed record; returns the alerts it triggers.
    pub fn observe(&mut self, f: &AuditFacts) -> Vec<Alert> {
        let mut out = Vec::new();
        let user = f.user.as_ref().map(|u| u.id.clone());
        let failed = f.outcome != Outcome::Success;
        match &f.kind {
            EventKind::Login if failed => {
                let second_factor = f
                    .outcome_desc
                    .as_deref()
                    .is_some_and(|d| d.contains("second factor"));
                if second_factor {
                    self.failed_second_factor(f, user.as_deref(), &mut out);
                } else {
                    self.failed_sign_in(f, user.as_deref(), &mut out);
                }
            }
            EventKind::Security(kind) => security_alert(kind, f, user, &mut out),
            EventKind::Rest(_)
                if failed
                    && f.outcome_desc
                        .as_deref()
                        .is_some_and(|d| d.contains("denied by reach")) =>
            {
                self.refused_outside_care(f, user, &mut out);
            }
            EventKind::Rest(_) if !failed && !f.patients.is_empty() => {
                self.patient_access(f, user.as_deref(), &mut out);
            }
            _ => {}
        }
        out
    }

    fn window(&self) -> i64 {
        self.cfg.window_secs as i64 * 1000
    }

    /// `mfa-failures`: refused second factors for one account.
    fn failed_second_factor(&mut self, f: &AuditFacts, user: Option<&str>, out: &mut Vec<Alert>) {
        let (now, win, c) = (f.recorded_ms, self.window(), self.cfg.clone());
        let Some(u) = user else { return };
        let n = bump(self.mfa_by_user.entry(u.to_owned()).or_default(), now, win);
        if n >= c.mfa_failures as usize && self.once("mfa-failures", u, now, win) {
            out.push(Alert {
                rule: "mfa-failures",
                severity: "high",
                detail: format!(
                    "{} refused second factors for user {u} within {} s",
                    c.mfa_failures, c.window_secs
                ),
                user: Some(u.to_owned()),
            });
        }
    }

    /// `brute-force-account`, `brute-force-ip` and `password-spraying`:
    /// failed sign-ins per account and per address.
    fn failed_sign_in(&mut self, f: &AuditFacts, user: Option<&str>, out: &mut Vec<Alert>) {
        let (now, win, c) = (f.recorded_ms, self.window(), self.cfg.clone());
        if let Some(u) = user {
            let n = bump(
                self.failures_by_user.entry(u.to_owned()).or_default(),
                now,
                win,
            );
            if n >= c.failed_logins_per_account as usize
                && self.once("brute-force-account", u, now, win)
            {
                out.push(Alert {
                    rule: "brute-force-account",
                    severity: "high",
                    detail: format!(
                        "{} failed sign-ins for user {u} within {} s",
                        c.failed_logins_per_account, c.window_secs
                    ),
                    user: Some(u.to_owned()),
                });
            }
        }
        let Some(ip) = f.ip.map(|i| i.to_string()) else {
            return;
        };
        let q = self.failures_by_ip.entry(ip.clone()).or_default();
        q.push_back((now, user.map(str::to_owned)));
        prune(q, now - win);
        let n = q.len();
        let distinct: HashSet<&String> = q.iter().filter_map(|(_, u)| u.as_ref()).collect();
        let accounts = distinct.len();
        if n >= c.failed_logins_per_ip as usize && self.once("brute-force-ip", &ip, now, win) {
            out.push(Alert {
                rule: "brute-force-ip",
                severity: "high",
                detail: format!("{n} failed sign-ins from {ip} within {} s", c.window_secs),
                user: None,
            });
        }
        if accounts >= c.spray_accounts as usize && self.once("password-spraying", &ip, now, win) {
            out.push(Alert {
                rule: "password-spraying",
                severity: "critical",
                detail: format!(
                    "failed sign-ins for {accounts} accounts from {ip} within {} s",
                    c.window_secs
                ),
                user: None,
            });
        }
    }

    /// `outside-care`: a user repeatedly refused patients outside their
    /// care relationships.
    fn refused_outside_care(&mut self, f: &AuditFacts, user: Option<String>, out: &mut Vec<Alert>) {
        let (now, win, c) = (f.recorded_ms, self.window(), self.cfg.clone());
        let Some(u) = user else { return };
        let n = bump(
            self.reach_denials_by_user.entry(u.clone()).or_default(),
            now,
            win,
        );
        if n >= c.outside_care_denials as usize && self.once("outside-care", &u, now, win) {
            out.push(Alert {
                rule: "outside-care",
                severity: "medium",
                detail: format!(
                    "user {u} was refused {n} times within {} s for patients outside their care relationships",
                    c.window_secs
                ),
                user: Some(u),
            });
        }
    }

    /// `vip-access`, `scraping` and `off-hours`: successful accesses to
    /// patients' data.
    fn patient_access(&mut self, f: &AuditFacts, user: Option<&str>, out: &mut Vec<Alert>) {
        let (now, win, c) = (f.recorded_ms, self.window(), self.cfg.clone());
        let agent = f.agent_key();
        // A workforce user touching a flagged patient (not the patient
        // themselves, not a system integration).
        if let (Some(u), Some(role)) = (user, f.user.as_ref().map(|x| x.role.as_str())) {
            if role != "patient" {
                let flagged: Vec<String> = {
                    let vip = self.vip.read();
                    f.patients
                        .iter()
                        .filter(|p| vip.contains(*p))
                        .cloned()
                        .collect()
                };
                for p in flagged {
                    if self.once("vip-access", &format!("{u}|{p}"), now, win) {
                        out.push(Alert {
                            rule: "vip-access",
                            severity: "medium",
                            detail: format!("user {u} accessed the flagged record of Patient/{p}"),
                            user: Some(u.to_owned()),
                        });
                    }
                }
            }
        }
        let n = {
            let q = self.patients_by_agent.entry(agent.clone()).or_default();
            for p in &f.patients {
                q.touch(now, p);
            }
            q.expire(now - c.scraping_window_secs as i64 * 1000);
            q.distinct()
        };
        if n >= c.scraping_patients as usize
            && self.once(
                "scraping",
                &agent,
                now,
                c.scraping_window_secs as i64 * 1000,
            )
        {
            out.push(Alert {
                rule: "scraping",
                severity: "high",
                detail: format!(
                    "{agent} touched {n} distinct patients within {} s",
                    c.scraping_window_secs
                ),
                user: user.map(str::to_owned),
            });
        }
        if let Some((from, to)) = c.business_hours_utc {
            let hour = ((now / 3_600_000) % 24) as u8;
            let inside = if from <= to {
                hour >= from && hour < to
            } else {
                hour >= from || hour < to
            };
            if !inside && self.once("off-hours", &agent, now, 3_600_000) {
                out.push(Alert {
                    rule: "off-hours",
                    severity: "medium",
                    detail: format!("{agent} accessed patient data at {hour:02}:00 UTC, outside {from:02}–{to:02}"),
                    user: user.map(str::to_owned),
                });
            }
        }
    }
}

/// Security events that are alerts by themselves: token replay, a cloned
/// passkey, break-the-glass, privilege changes.
fn security_alert(kind: &str, f: &AuditFacts, user: Option<String>, out: &mut Vec<Alert>) {
    let (rule, severity, detail, user) = match kind {
        "token-replay" => (
            "token-replay",
            "high",
            "a used authorization code or rotated refresh token was presented again; its grant family was revoked".to_owned(),
            user,
        ),
        "passkey-cloned" => (
            "cloned-passkey",
            "critical",
            format!(
                "a passkey of user {} reported a lower signature counter (possible clone)",
                user.clone().unwrap_or_default()
            ),
            user,
        ),
        "break-the-glass" => (
            "break-the-glass",
            "high",
            format!(
                "user {} used break-the-glass emergency access to a patient outside their care relationships",
                user.clone().unwrap_or_default()
            ),
            user,
        ),
        "role" => (
            "privilege-change",
            "medium",
            f.outcome_desc
                .clone()
                .unwrap_or_else(|| "role changed".into()),
            None,
        ),
        "user"
            if f.outcome_desc
                .as_deref()
                .is_some_and(|d| d.contains("second factors reset")) =>
        {
            (
                "privilege-change",
                "medium",
                f.outcome_desc.clone().unwrap_or_default(),
                None,
            )
        }
        _ => return,
    };
    out.push(Alert {
        rule,
        severity,
        detail,
        user,
    });
}

/// What the detector's task receives.
/// The AuditEvent that carries an alert (and marks it, so the detector
/// recognises alerts it is fed back and does not evaluate them).
fn alert_facts(a: &Alert) -> AuditFacts {
    AuditFacts {
        id: crate::audit::log::new_event_id(),
        recorded_ms: crate::base::clock::now_ms(),
        kind: EventKind::Security("alert"),
        action: Action::Execute,
        outcome: Outcome::Success,
        outcome_desc: Some(format!("{} [{}]: {}", a.rule, a.severity, a.detail)),
        user: None,
        client: Some("phylax-detector".into()),
        ip: None,
        token_id: None,
        request_id: String::new(),
        purpose: None,
        patients: Vec::new(),
        resources: Vec::new(),
        query_params: Vec::new(),
        query_type: None,
        token_family: None,
        observer: String::new(),
    }
}

/// What the detector needs from the rest of the server.
pub struct Responder {
    pub audit: Arc<AuditLog>,
    pub accounts: crate::data::accounts::Accounts,
    pub metrics: Arc<dyn Fn(&'static str, &'static str) + Send + Sync>,
    pub webhook: Option<Webhook>,
    /// The breach register, for rules in `incident_on`.
    pub incidents: crate::data::incidents::Incidents,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").finish_non_exhaustive()
    }
}

/// Start the detector task; returns the handle records are fed to.
pub fn start(cfg: DetectConfig, r: Responder, vip: VipSet) -> Arc<Detector> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(10_000);
    let lock_on = cfg.lock_on.clone();
    let incident_on = cfg.incident_on.clone();
    let mut rules = Rules::with_vip(cfg, vip);
    if let Some(w) = &r.webhook {
        w.spawn_sender();
    }
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let alerts = match m {
                // An alert raised directly (not by a rule): deliver it.
                Msg::Alert(a) => vec![a],
                Msg::Once(a, key) => {
                    let win = rules.cfg.window_secs as i64 * 1000;
                    if rules.once(a.rule, &key, crate::base::clock::now_ms(), win) {
                        vec![a]
                    } else {
                        Vec::new()
                    }
                }
                Msg::Record(f) => rules.observe(&f),
            };
            for a in alerts {
                deliver(&r, &a, &lock_on).await;
                if incident_on.iter().any(|x| x == a.rule) {
                    to_incident(&r, &a).await;
                }
            }
        }
    });
    Arc::new(Detector { tx })
}

async fn deliver(r: &Responder, a: &Alert, lock_on: &[String]) {
    tracing::warn!(event = "detect.alert", rule = a.rule, severity = a.severity, detail = %a.detail, "alert");
    (r.metrics)(a.rule, a.severity);
    let mut f = alert_facts(a);
    f.observer = r.audit.origin().to_owned();
    if let Err(e) = r.audit.record_quiet(&f).await {
        tracing::error!(error = %e, "could not record an alert in the audit log");
    }
    if let Some(w) = &r.webhook {
        if let Err(e) = w.spool(a, &f) {
            tracing::error!(error = %e, "could not spool an alert for the webhook");
        }
    }
    if lock_on.iter().any(|x| x == a.rule) {
        if let Some(u) = &a.user {
            match r
                .accounts
                .set_status(
                    u,
                    crate::data::accounts::Status::Locked,
                    crate::base::clock::now_secs(),
                )
                .await
            {
                Ok(locked) => {
                    tracing::warn!(event = "detect.response", rule = a.rule, user_id = %u, "account locked by a detection rule");
                    let ev = AuthEvent {
                        kind: EventKind::Security("lockout"),
                        action: Action::Update,
                        outcome: Outcome::Success,
                        detail: format!("account locked automatically by rule {}", a.rule),
                        user: Some(phylax_audit::event::UserRef {
                            id: u.clone(),
                            role: locked.rec.role.clone(),
                        }),
                        client: Some("phylax-detector".into()),
                        ip: None,
                    };
                    let _ = r.audit.record_auth(ev).await;
                }
                Err(e) => tracing::error!(error = %e, "automatic lock failed"),
            }
        }
    }
}

/// Open an incident for an alert, or add it to the open incident the
/// same rule opened for the same subject: one incident per rule and
/// subject until someone closes it. The subject is the user, or for an
/// alert about no user (a client, an address) its detail, which names
/// them (ids only, and the same text each time the rule fires for them).
async fn to_incident(r: &Responder, a: &Alert) {
    use crate::data::incidents::{Severity, Step};
    const BY: &str = "detector";
    let now = crate::base::clock::now_ms();
    let subject = a.user.clone().unwrap_or_else(|| a.detail.clone());
    let step = Step::Alert {
        rule: a.rule.to_owned(),
        key: subject.clone(),
        detail: a.detail.clone(),
    };
    let open = match r.incidents.list().await {
        Ok(all) => all.into_iter().rev().find(|i| {
            i.is_open()
                && matches!(i.steps.first(), Some((_, Step::Opened { by, .. })) if by == BY)
                && i.steps.iter().any(|(_, s)| {
                    matches!(s, Step::Alert { rule, key, .. } if rule == a.rule && *key == subject)
                })
        }),
        Err(e) => {
            tracing::error!(error = %e, "the breach register could not be read; the alert opened no incident");
            return;
        }
    };
    let (id, opened) = match open {
        Some(i) => (i.id, false),
        None => {
            let severity = match a.severity {
                "critical" => Severity::Critical,
                "high" => Severity::High,
                "low" => Severity::Low,
                _ => Severity::Moderate,
            };
            let title = format!("alert: {}", a.rule);
            match r.incidents.open(&title, severity, now, BY, now).await {
                Ok(i) => (i.id, true),
                Err(e) => {
                    tracing::error!(error = %e, "the alert could not open an incident");
                    return;
                }
            }
        }
    };
    let n = match r.incidents.append(&id, step, now).await {
        Ok(i) => i.last_step(),
        Err(e) => {
            tracing::error!(error = %e, "the alert could not be added to its incident");
            return;
        }
    };
    tracing::warn!(event = "detect.incident", rule = a.rule, incident = %id, opened, "alert recorded in an incident");
    let _ = r
        .audit
        .record_admin(
            "incident",
            if opened {
                Action::Create
            } else {
                Action::Update
            },
            format!(
                "incident {id} step {n}: {} by alert {}",
                if opened { "opened" } else { "joined" },
                a.rule
            ),
        )
        .await;
}

/// An HMAC-signed webhook with an on-disk spool.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub key: Arc<phylax_crypto::MacKey>,
    pub client: reqwest::Client,
    pub spool: PathBuf,
}

impl Webhook {
    /// Write the alert to the spool (one file per alert, named so that
    /// they sort in order); the sender posts and deletes them.
    fn spool(&self, a: &Alert, f: &AuditFacts) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.spool)?;
        let body = serde_json::json!({
            "rule": a.rule,
            "severity": a.severity,
            "detail": a.detail,
            "auditEvent": f.to_resource(),
        });
        let name = format!("{}.json", f.id);
        let tmp = self.spool.join(format!("{name}.tmp"));
        std::fs::write(&tmp, body.to_string())?;
        std::fs::rename(tmp, self.spool.join(name))
    }

    fn spawn_sender(&self) {
        let w = self.clone();
        tokio::spawn(async move {
            let mut backoff = 1u64;
            loop {
                match w.send_spooled().await {
                    Ok(()) => backoff = 1,
                    Err(e) => {
                        tracing::warn!(event = "detect.webhook_failed", error = %e, "alert webhook failed; alerts stay spooled and are retried");
                        backoff = (backoff * 2).min(60);
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(backoff)).await;
            }
        });
    }

    async fn send_spooled(&self) -> Result<(), String> {
        let Ok(dir) = std::fs::read_dir(&self.spool) else {
            return Ok(());
        };
        let mut files: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for p in files {
            let body = std::fs::read(&p).map_err(|e| e.to_string())?;
            let sig = hex::encode(self.key.sign(&body));
            let r = self
                .client
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-phylax-signature", format!("sha256={sig}"))
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("receiver answered {}", r.status()));
            }
            std::fs::remove_file(&p).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phylax_audit::event::UserRef;

    fn ev(kind: EventKind, outcome: Outcome, user: Option<&str>, ip: &str, t: i64) -> AuditFacts {
        AuditFacts {
            id: "x".into(),
            recorded_ms: t,
            kind,
            action: Action::Execute,
            outcome,
            outcome_desc: None,
            user: user.map(|u| UserRef {
                id: u.into(),
                role: "clinician".into(),
            }),
            client: Some("app".into()),
            ip: ip.parse().ok(),
            token_id: None,
            request_id: String::new(),
            purpose: None,
            patients: Vec::new(),
            resources: Vec::new(),
            query_params: Vec::new(),
            query_type: None,
            token_family: None,
            observer: String::new(),
        }
    }

    fn login_fail(user: Option<&str>, ip: &str, t: i64) -> AuditFacts {
        let mut f = ev(EventKind::Login, Outcome::MinorFailure, user, ip, t);
        f.outcome_desc = Some("password refused".into());
        f
    }

    fn read(agent: &str, patient: &str, t: i64) -> AuditFacts {
        let mut f = ev(
            EventKind::Rest("read"),
            Outcome::Success,
            Some(agent),
            "10.0.0.9",
            t,
        );
        f.patients = vec![patient.into()];
        f
    }

    fn fired(r: &mut Rules, evs: impl IntoIterator<Item = AuditFacts>) -> Vec<&'static str> {
        evs.into_iter()
            .flat_map(|e| r.observe(&e))
            .map(|a| a.rule)
            .collect()
    }

    const T0: i64 = 1_764_320_400_000; // 09:00 UTC

    #[test]
    fn a_normal_day_raises_nothing() {
        let mut r = Rules::new(DetectConfig {
            business_hours_utc: Some((7, 19)),
            ..DetectConfig::default()
        });
        let mut evs = Vec::new();
        // 30 clinicians, each reading 40 of their patients over the day,
        // two typos each, an MFA retry now and then.
        for c in 0..30 {
            let u = format!("u{c}");
            evs.push(login_fail(Some(&u), &format!("10.1.0.{c}"), T0 + c * 1000));
            evs.push(login_fail(
                Some(&u),
                &format!("10.1.0.{c}"),
                T0 + c * 1000 + 500,
            ));
            evs.push(ev(
                EventKind::Login,
                Outcome::Success,
                Some(&u),
                &format!("10.1.0.{c}"),
                T0 + c * 1000 + 900,
            ));
            for p in 0..40 {
                evs.push(read(&u, &format!("p{c}-{p}"), T0 + c * 1000 + p * 60_000));
            }
        }
        evs.push(ev(
            EventKind::Security("token"),
            Outcome::Success,
            Some("u1"),
            "10.1.0.1",
            T0,
        ));
        assert!(fired(&mut r, evs).is_empty());
    }

    #[test]
    fn a_window_counts_each_patient_once_until_its_last_touch_expires() {
        let mut w = Touched::default();
        for i in 0..10 {
            w.touch(i * 1000, &format!("p{i}"));
        }
        // A million more touches of the same ten patients: still ten
        // entries (memory follows patients, not touches).
        for i in 0..1_000_000i64 {
            w.touch(10_000 + i / 1000, &format!("p{}", i % 10));
        }
        assert_eq!(w.distinct(), 10);
        assert_eq!(w.last.len(), 10);
        // Only p3 is touched again later; at the end of a window that
        // began after the others' last touches, only it remains.
        w.touch(900_000, "p3");
        w.expire(800_000);
        assert_eq!(w.distinct(), 1);
        assert_eq!(
            w.last.front().map(|(p, t)| (p.as_str(), *t)),
            Some(("p3", 900_000))
        );
        // A record arriving late never moves a last touch back in time.
        w.touch(850_000, "p3");
        w.expire(880_000);
        assert_eq!(w.distinct(), 1);
        w.expire(900_001);
        assert_eq!(w.distinct(), 0);
    }

    #[test]
    fn scraping_counts_distinct_patients_within_its_window_only() {
        let cfg = DetectConfig::default();
        let win = cfg.scraping_window_secs as i64 * 1000;
        let threshold = cfg.scraping_patients as i64;
        let mut r = Rules::new(cfg);
        // One patient read ten thousand times is one patient.
        let f = fired(&mut r, (0..10_000).map(|i| read("busy", "p1", T0 + i)));
        assert!(f.is_empty(), "{f:?}");
        // One short of the threshold in each of two windows: no alert.
        let spread = |start: i64| {
            (0..threshold - 1).map(move |i| read("steady", &format!("w{start}-{i}"), start + i))
        };
        assert!(fired(&mut r, spread(T0)).is_empty());
        assert!(fired(&mut r, spread(T0 + win + 1000)).is_empty());
        // Two more within the second window cross it.
        let f = fired(
            &mut r,
            (0..2).map(|i| read("steady", &format!("x{i}"), T0 + win + 2000 + i)),
        );
        assert_eq!(f, vec!["scraping"]);
    }

    #[test]
    fn each_rule_fires_on_its_attack_once() {
        let mut r = Rules::new(DetectConfig {
            business_hours_utc: Some((7, 19)),
            ..DetectConfig::default()
        });
        // Brute force on one account from one address.
        let f = fired(
            &mut r,
            (0..8).map(|i| login_fail(Some("victim"), "203.0.113.5", T0 + i * 1000)),
        );
        assert_eq!(f, vec!["brute-force-account"]);
        // Spraying: one address, many accounts, one try each.
        let f = fired(
            &mut r,
            (0..6).map(|i| login_fail(Some(&format!("user{i}")), "198.51.100.7", T0 + i * 1000)),
        );
        assert_eq!(f, vec!["password-spraying"]);
        // Many failures from one address (unknown users).
        let f = fired(
            &mut r,
            (0..25).map(|i| login_fail(None, "192.0.2.1", T0 + i * 100)),
        );
        assert_eq!(f, vec!["brute-force-ip"]);
        // Second-factor failures.
        let f = fired(
            &mut r,
            (0..5).map(|i| {
                let mut e = login_fail(Some("mfa-victim"), "10.9.9.9", T0 + i * 1000);
                e.outcome_desc = Some("second factor refused".into());
                e
            }),
        );
        assert_eq!(f, vec!["mfa-failures"]);
        // Scraping: one user reading 250 different patients in minutes.
        let f = fired(
            &mut r,
            (0..250).map(|i| read("snoop", &format!("q{i}"), T0 + i * 1000)),
        );
        assert_eq!(f, vec!["scraping"]);
        // Off hours: 02:00 UTC.
        let f = fired(&mut r, [read("night", "p1", T0 - 7 * 3_600_000)]);
        assert_eq!(f, vec!["off-hours"]);
        // Token replay, cloned passkey, privilege change.
        let f = fired(
            &mut r,
            [
                ev(
                    EventKind::Security("token-replay"),
                    Outcome::MinorFailure,
                    Some("u"),
                    "10.0.0.1",
                    T0,
                ),
                ev(
                    EventKind::Security("passkey-cloned"),
                    Outcome::MinorFailure,
                    Some("u"),
                    "10.0.0.1",
                    T0,
                ),
                ev(
                    EventKind::Security("role"),
                    Outcome::Success,
                    None,
                    "10.0.0.1",
                    T0,
                ),
            ],
        );
        assert_eq!(
            f,
            vec!["token-replay", "cloned-passkey", "privilege-change"]
        );
        // Break-the-glass.
        let f = fired(
            &mut r,
            [ev(
                EventKind::Security("break-the-glass"),
                Outcome::Success,
                Some("er-doc"),
                "10.0.0.2",
                T0,
            )],
        );
        assert_eq!(f, vec!["break-the-glass"]);
        // Probing outside care relationships: three refusals by reach;
        // refusals by scope or role do not count.
        let denied = |rule: &str, t: i64| {
            let mut e = ev(
                EventKind::Rest("read"),
                Outcome::MinorFailure,
                Some("prober"),
                "10.0.0.3",
                t,
            );
            e.outcome_desc = Some(format!("HTTP 404; denied by {rule}: x"));
            e
        };
        let f = fired(
            &mut r,
            (0..5)
                .map(|i| denied("scope", T0 + i))
                .chain((0..2).map(|i| denied("reach", T0 + 10 + i))),
        );
        assert!(f.is_empty(), "{f:?}");
        let f = fired(&mut r, (0..3).map(|i| denied("reach", T0 + 20 + i)));
        assert_eq!(f, vec!["outside-care"]);
        // Flagged (VIP) records: a workforce user, once per patient; the
        // patient themselves and clients are not flagged.
        r.vip.write().insert("vip-1".into());
        let mut own = read("vip-1-user", "vip-1", T0);
        if let Some(u) = own.user.as_mut() {
            u.role = "patient".into();
        }
        let mut client = read("x", "vip-1", T0);
        client.user = None;
        let f = fired(
            &mut r,
            [
                read("nosy", "vip-1", T0),
                read("nosy", "vip-1", T0 + 5),
                own,
                client,
                read("nosy", "p2", T0),
            ],
        );
        assert_eq!(f, vec!["vip-access"]);
        // Windows: old failures do not count.
        let mut r2 = Rules::new(DetectConfig::default());
        let f = fired(
            &mut r2,
            (0..8).map(|i| login_fail(Some("slow"), "10.2.2.2", T0 + i * 400_000)),
        );
        assert!(f.is_empty(), "{f:?}");
    }
}
