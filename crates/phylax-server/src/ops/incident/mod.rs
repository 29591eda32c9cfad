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
            "incident {} step 0: opened (severity {}) by {by}",
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
    audited(
        st,
        Action::Update,
        format!("incident {id} step {}: {kind}", inc.last_step()),
    )
    .await?;
    Ok(inc)
}

/// One incident, or all (reading the register is recorded too: it names
/// what the organisation knows about its breaches).
pub async fn read(st: &AppState, id: Option<&IncidentId>) -> Result<Vec<Incident>, ResponseError> {
    let out = match id {
        Some(id) => vec![st.incidents.get(id).await?],
        None => st.incidents.list().await?,
    };
    against_audit_log(st, &out, id.is_none()).await?;
    let what = match id {
        Some(id) => format!("incident {id} read"),
        None => format!("breach register read ({} incidents)", out.len()),
    };
    audited(st, Action::Read, what).await?;
    Ok(out)
}

/// The register's steps must reach as far as the audit log says they
/// did: every step is also an audit record (`incident ID step N: …`), and
/// the audit log is tamper-evident, so a step deleted from the end of an
/// incident, or a whole incident deleted (`all`: the register read
/// whole), shows here. (A step deleted from the middle breaks the
/// register's own chain.)
async fn against_audit_log(
    st: &AppState,
    incidents: &[Incident],
    all: bool,
) -> Result<(), ResponseError> {
    st.audit
        .flush()
        .await
        .map_err(|e| ResponseError::Audit(e.to_string()))?;
    let mut recorded: std::collections::BTreeMap<String, u64> = Default::default();
    let mut before = None;
    loop {
        let rows = st
            .audit
            .search(&phylax_store::AuditQuery {
                subtype: Some("incident".into()),
                before_id: before,
                limit: 1000,
                ..Default::default()
            })
            .await
            .map_err(|e| ResponseError::Audit(e.to_string()))?;
        let Some(last) = rows.last() else { break };
        before = Some(last.id);
        for r in &rows {
            let v = st
                .audit
                .open_row(r)
                .map_err(|e| ResponseError::Audit(e.to_string()))?;
            let Some((inc, n)) = v["outcomeDesc"].as_str().and_then(step_of) else {
                continue;
            };
            let e = recorded.entry(inc).or_default();
            *e = (*e).max(n);
        }
    }
    for (inc, n) in recorded {
        let held = incidents.iter().find(|i| i.id.as_str() == inc);
        match held {
            Some(i) if i.last_step() < n => {
                return Err(IncidentError::Invalid(format!(
                    "the breach register is missing steps of incident {inc}: the audit log records step {n}, the register ends at step {} (steps were deleted)",
                    i.last_step()
                ))
                .into())
            }
            None if all => {
                return Err(IncidentError::Invalid(format!(
                    "the breach register is missing incident {inc}, which the audit log records (it was deleted)"
                ))
                .into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// `incident ID step N: …` → (ID, N).
fn step_of(desc: &str) -> Option<(String, u64)> {
    let rest = desc.strip_prefix("incident ")?;
    let (id, rest) = rest.split_once(' ')?;
    let n = rest.strip_prefix("step ")?;
    let n: u64 = n
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((id.to_owned(), n))
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
    // A log shorter than one an earlier scope verified was cut: with no
    // checkpoint kept outside the database, the register is the witness.
    let seen = st
        .incidents
        .list()
        .await?
        .iter()
        .flat_map(|i| i.steps.iter())
        .filter_map(|(_, s)| match s {
            Step::Scoped { scope, .. } => scope["log"]["checkpoint_size"].as_u64(),
            _ => None,
        })
        .max();
    if let Some(m) = seen {
        if s.log.checkpoint_size.unwrap_or(0) < m {
            return Err(scope::ScopeError::Tampered(format!(
                "the audit log's tree is shorter ({}) than an earlier scope verified ({m}): records were cut off",
                s.log.checkpoint_size.unwrap_or(0)
            ))
            .into());
        }
    }
    let value = serde_json::to_value(&s).map_err(|e| IncidentError::Unavailable(e.to_string()))?;
    let inc = st
        .incidents
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
            "incident {id} step {}: scoped {} ({} records, {} individuals)",
            inc.last_step(),
            who.label(),
            s.records,
            s.individuals
        ),
    )
    .await?;
    Ok(s)
}
