//! Incident response for the operator's CLI (`phylax incident …`;
//! docs/INCIDENT_RESPONSE.md): the breach register's incidents, each step
//! audited, and what a security officer needs on the day of a breach.
//!
//! # Layout
//! - this file: opening, annotating and closing incidents (the register
//!   is [`crate::data::incidents`]); every step is written to the register
//!   and recorded in the audit log (ids and counts, never the text).
//! - [`scope`]: whose data a principal touched, from the verified audit
//!   log.
//! - [`contain`]: stop users, clients and addresses everywhere at once,
//!   rotate the keys the incident calls for.
//! - [`deadlines`]: notification obligations and their deadlines (pure).
//! - [`report`]: the notification report (deadlines, counts by state, the
//!   risk assessment) and the patients' letters in an encrypted archive.
//! - [`drill`]: a scripted breach against a serving node, timed from
//!   attack to detection, scope and containment, and recorded.

pub mod contain;
pub mod deadlines;
pub mod drill;
pub mod report;
pub mod scope;

use crate::data::incidents::{Incident, IncidentError, IncidentId, Severity, Step};
use crate::state::AppState;
use phylax_audit::event::Action;

/// An incident step that could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Register(#[from] IncidentError),
    #[error(transparent)]
    Scope(#[from] scope::ScopeError),
    #[error("not recorded in the audit log: {0}")]
    Audit(String),
}

async fn audited(st: &AppState, action: Action, detail: String) -> Result<(), ResponseError> {
    st.audit
        .record_admin("incident", action, detail)
        .await
        .map_err(|e| ResponseError::Audit(e.to_string()))
}

/// Open an incident.
pub async fn open(
    st: &AppState,
    title: &str,
    severity: Severity,
    discovered: i64,
    by: &str,
) -> Result<Incident, ResponseError> {
    let now = crate::base::clock::now_ms();
    let inc = st
        .incidents
        .open(title, severity, discovered, by, now)
        .await?;
    audited(
        st,
        Action::Create,
        format!(
            "incident {} opened (severity {}) by {by}",
            inc.id,
            severity.as_str()
        ),
    )
    .await?;
    Ok(inc)
}

/// Add a note, or close the incident.
pub async fn step(st: &AppState, id: &IncidentId, step: Step) -> Result<Incident, ResponseError> {
    let kind = step.kind();
    let inc = st
        .incidents
        .append(id, step, crate::base::clock::now_ms())
        .await?;
    audited(st, Action::Update, format!("incident {id}: {kind}")).await?;
    Ok(inc)
}

/// One incident, or all (reading the register is recorded too: it names
/// what the organisation knows about its breaches).
pub async fn read(st: &AppState, id: Option<&IncidentId>) -> Result<Vec<Incident>, ResponseError> {
    let out = match id {
        Some(id) => vec![st.incidents.get(id).await?],
        None => st.incidents.list().await?,
    };
    let what = match id {
        Some(id) => format!("incident {id} read"),
        None => format!("breach register read ({} incidents)", out.len()),
    };
    audited(st, Action::Read, what).await?;
    Ok(out)
}

/// Scope `who` in `w` for an open incident, record the result in the
/// register and the audit log.
pub async fn scope(
    st: &AppState,
    id: &IncidentId,
    who: &scope::Who,
    w: scope::Window,
    outside: &[String],
    by: &str,
) -> Result<scope::Scope, ResponseError> {
    let inc = st.incidents.get(id).await?;
    if !inc.is_open() {
        return Err(IncidentError::Closed(id.to_string()).into());
    }
    let s = scope::scope(st, who, w, outside).await?;
    let value = serde_json::to_value(&s).map_err(|e| IncidentError::Unavailable(e.to_string()))?;
    st.incidents
        .append(
            id,
            Step::Scoped {
                by: by.to_owned(),
                scope: value,
            },
            crate::base::clock::now_ms(),
        )
        .await?;
    audited(
        st,
        Action::Execute,
        format!(
            "incident {id}: scoped {} ({} records, {} individuals)",
            who.label(),
            s.records,
            s.individuals
        ),
    )
    .await?;
    Ok(s)
}
