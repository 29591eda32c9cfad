//! Alerts and the handle that feeds the detector: what the audit log and
//! the access layer need to raise an alert or show a record to the rules,
//! without depending on the rules themselves ([`crate::audit::detect`]).

use phylax_audit::event::AuditFacts;

/// An alert raised by a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub rule: &'static str,
    pub severity: &'static str,
    /// Fixed text with ids only.
    pub detail: String,
    /// The user concerned, if any (for automatic responses).
    pub user: Option<String>,
}

#[derive(Debug)]
pub(crate) enum Msg {
    /// A committed record, for the rules.
    Record(Box<AuditFacts>),
    /// An alert raised outside the rules.
    Alert(Alert),
    /// An alert raised outside the rules, at most once per window per key.
    Once(Alert, String),
}

/// The running detector: rules, responses and delivery.
#[derive(Debug)]
pub struct Detector {
    pub(crate) tx: tokio::sync::mpsc::Sender<Msg>,
}

impl Detector {
    /// Hand a committed record to the rules (never blocks a request: under
    /// overload records are dropped from detection, not from the log).
    pub fn observe(&self, f: &AuditFacts) {
        self.observe_owned(f.clone());
    }

    /// [`Detector::observe`] for facts the caller is done with.
    pub fn observe_owned(&self, f: AuditFacts) {
        if self.tx.try_send(Msg::Record(Box::new(f))).is_err() {
            tracing::warn!(
                event = "detect.overloaded",
                "detector queue full; a record was not evaluated"
            );
        }
    }

    /// Raise an alert from outside the rules (the sealer's verification).
    /// [`Detector::raise`], at most once per `[detect] window_secs` for
    /// the same rule and `key`.
    pub fn raise_once(&self, a: Alert, key: String) {
        if self.tx.try_send(Msg::Once(a, key)).is_err() {
            tracing::warn!(
                event = "detect.overloaded",
                "detector queue full; an alert was not delivered"
            );
        }
    }

    pub fn raise(&self, a: Alert) {
        if self.tx.try_send(Msg::Alert(a)).is_err() {
            tracing::warn!(
                event = "detect.overloaded",
                "detector queue full; an alert was not delivered"
            );
        }
    }
}
