//! Access administration behind `phylax access …`: explaining one
//! decision, the periodic access review, and the break-the-glass review
//! queue. None of these print resource content: an explanation names rules
//! and counts, never names, values or the patients a resource concerns.

use crate::access::holds::{Approval, HoldError};
use crate::access::reach as access;
use crate::base::error::Failure;
use crate::state::AppState;
use phylax_auth::policy::{
    decide_instance, Decision, Interaction, Principal, Reach, ResourceFacts,
};
use phylax_auth::ScopeSet;
use phylax_fhir::{ResourceId, ResourceType};
use phylax_store::AuditQuery;
use serde::Serialize;
use std::collections::BTreeSet;

/// Who an explanation is for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A user, with the scopes an app would have (default: all their role
    /// allows).
    User {
        username: String,
        scope: Option<String>,
    },
    /// A registered client, with its registered scopes.
    Client { client_id: String },
}

/// One explained decision.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    /// The rule that decided (`allow` when allowed).
    pub rule: String,
    /// The steps, in order, each `step: outcome`.
    pub steps: Vec<String>,
}

/// Parse an interaction name as the CLI takes it.
pub fn parse_interaction(s: &str) -> Option<Interaction> {
    Some(match s {
        "read" => Interaction::Read,
        "vread" => Interaction::VRead,
        "create" => Interaction::Create,
        "update" => Interaction::Update,
        "delete" => Interaction::Delete,
        "history" => Interaction::HistoryInstance,
        "search" => Interaction::SearchType,
        "everything" => Interaction::PatientEverything,
        _ => return None,
    })
}

/// "Would `who` be allowed `what` on `Type/id`, and by which rule?" The
/// same functions the server runs, with the facts of now.
pub async fn explain(
    st: &AppState,
    who: &Subject,
    rtype: &ResourceType,
    id: &ResourceId,
    what: Interaction,
) -> Result<Explanation, Failure> {
    let mut steps = Vec::new();
    let principal = match subject(st, who, &mut steps).await? {
        Ok(p) => p,
        Err(e) => return Ok(e),
    };
    let deny = |rule: &str, steps: Vec<String>| Explanation {
        allowed: false,
        rule: rule.to_owned(),
        steps,
    };
    match decide_instance(&principal, what, Some(rtype.as_str()), Some(id.as_str())) {
        Decision::Allow => steps.push(format!(
            "type level ({} on {rtype}): allowed by role and scopes",
            what.as_str()
        )),
        Decision::Deny(rule) => {
            steps.push(format!("type level ({} on {rtype}): {rule}", what.as_str()));
            return Ok(deny(rule, steps));
        }
    }
    let acc = match access::access_for(&st.gate, &principal).await {
        Ok(a) => a,
        Err(e) => {
            let rule = e.denied_by().unwrap_or("access could not be established");
            steps.push(format!("reach: {rule}"));
            return Ok(deny(rule, steps));
        }
    };
    steps.push(match &acc.reach {
        Reach::All => "reach: every patient (type grants decide)".into(),
        Reach::Patients(set) => format!(
            "reach: {} patient(s){}",
            set.len(),
            if acc.emergency.is_empty() {
                String::new()
            } else {
                format!(", {} through break-the-glass", acc.emergency.len())
            }
        ),
    });
    let (patients, restricted) = match access::explain_facts(&st.gate, rtype, id).await {
        Ok(f) => f,
        Err(crate::data::repo::RepoError::NotFound) => {
            steps.push("resource: does not exist".into());
            return Ok(deny("resource: not found", steps));
        }
        Err(crate::data::repo::RepoError::Gone(_)) => {
            steps.push("resource: deleted".into());
            return Ok(deny("resource: deleted", steps));
        }
        Err(e) => return Err(e.into()),
    };
    let reached = patients.iter().filter(|p| acc.reaches(p)).count();
    steps.push(format!(
        "resource: in {} patient compartment(s), {} of them reached; restricted label: {}",
        patients.len(),
        reached,
        if restricted { "yes" } else { "no" }
    ));
    let decision = phylax_auth::policy::decide_resource(
        &acc,
        &ResourceFacts {
            rtype: rtype.as_str(),
            patients: &patients,
            restricted,
        },
    );
    Ok(match decision {
        Decision::Allow => {
            steps.push("resource level: allowed".into());
            Explanation {
                allowed: true,
                rule: "allow".into(),
                steps,
            }
        }
        Decision::Deny(rule) => {
            steps.push(format!("resource level: {rule}"));
            deny(rule, steps)
        }
    })
}

/// Who an explanation is for, as the policy sees them; an explanation of
/// its own when the account or client cannot act at all.
async fn subject(
    st: &AppState,
    who: &Subject,
    steps: &mut Vec<String>,
) -> Result<Result<Principal, Explanation>, Failure> {
    Ok(Ok(match who {
        Subject::User { username, scope } => {
            let u = st
                .accounts
                .find(username)
                .await
                .map_err(|e| Failure::Unavailable(e.to_string()))?
                .ok_or(Failure::NotFound)?;
            let role = st
                .roles
                .get(u.role())
                .cloned()
                .ok_or_else(|| Failure::Internal("the user's role no longer exists".into()))?;
            let scope = scope.clone().unwrap_or_else(|| {
                if role.patient {
                    "patient/*.cruds".into()
                } else {
                    "user/*.cruds".into()
                }
            });
            steps.push(format!(
                "user: role {}, status {}, reach rule {}, labelled data {}, break-the-glass {}, relationships {}",
                role.name,
                u.rec.status,
                role.reach.as_str(),
                if role.labelled {
                    "allowed"
                } else {
                    "not allowed"
                },
                if role.break_glass {
                    "allowed"
                } else {
                    "not allowed"
                },
                if role.relationships {
                    "may change"
                } else {
                    "may not change"
                }
            ));
            if u.rec.status != "active" {
                steps.push("account: not active, so no token works".into());
                return Ok(Err(Explanation {
                    allowed: false,
                    rule: "account: not active".into(),
                    steps: std::mem::take(steps),
                }));
            }
            steps.push(format!("scopes: {scope}"));
            Principal::User {
                user_id: u.id().to_owned(),
                role,
                client_id: "explain".into(),
                scopes: ScopeSet::parse_lenient(&scope),
                patient: u.patient().map(str::to_owned),
                token_id: "explain".into(),
                // Break-the-glass is asked for separately; an explanation
                // does not assume a fresh second factor.
                mfa_at: None,
            }
        }
        Subject::Client { client_id } => {
            let c = st
                .clients
                .get(client_id)
                .await
                .map_err(|e| Failure::Unavailable(e.to_string()))?
                .ok_or(Failure::NotFound)?;
            steps.push(format!(
                "client: {} registered scopes {}",
                if c.disabled { "disabled," } else { "active," },
                c.scope
            ));
            if c.disabled {
                return Ok(Err(Explanation {
                    allowed: false,
                    rule: "client: disabled".into(),
                    steps: std::mem::take(steps),
                }));
            }
            Principal::Client {
                client_id: c.id,
                scopes: ScopeSet::parse_lenient(&c.scope),
                token_id: "explain".into(),
            }
        }
    }))
}

/// One account in an access review.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewRow {
    /// `user` or `client`.
    pub kind: &'static str,
    pub id: String,
    /// Username or client name (identifying: the review is for the
    /// security officer).
    pub name: String,
    pub role: Option<String>,
    pub scopes: Option<String>,
    pub status: String,
    pub mfa: Option<bool>,
    /// Last sign-in (users) or token (clients), ms since the epoch.
    pub last_active: Option<i64>,
    /// No sign-in (or token) within the period.
    pub dormant: bool,
    /// Permission letters (`cruds`) the role or scopes grant that were not
    /// used within the period.
    pub unused: String,
    /// May change who reaches whom (the relationships permission: the
    /// role's, or the client listed in `access.relationship_clients`).
    pub relationships: bool,
}

/// Permission letter an audited interaction used.
fn perm_of(subtype: &str) -> Option<char> {
    Some(match subtype {
        "read" | "vread" | "history-instance" | "operation" => 'r',
        "search-type" | "history-type" | "history-system" => 's',
        "create" => 'c',
        "update" => 'u',
        "delete" => 'd',
        _ => return None,
    })
}

/// Letters used by `agent` since `from`, read from the audit log's
/// plaintext columns (no record is decrypted).
async fn used(
    st: &AppState,
    agent: &str,
    from: i64,
) -> Result<(BTreeSet<char>, Option<i64>), Failure> {
    let mut out = BTreeSet::new();
    let mut last = None;
    let mut before = None;
    loop {
        let rows = st
            .audit
            .search(&AuditQuery {
                agent: Some(agent.to_owned()),
                from: Some(from),
                before_id: before,
                limit: 1000,
                ..Default::default()
            })
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        for r in &rows {
            last = last.max(Some(r.recorded));
            if r.outcome == "0" {
                if let Some(p) = perm_of(&r.subtype) {
                    out.insert(p);
                }
            }
        }
        match rows.last() {
            Some(r) if rows.len() == 1000 => before = Some(r.id),
            _ => break,
        }
    }
    Ok((out, last))
}

fn granted_letters(
    role: Option<&phylax_auth::roles::RoleDef>,
    scopes: Option<&ScopeSet>,
) -> String {
    use phylax_auth::scopes::Perm;
    let letters = [
        ('c', Perm::Create),
        ('r', Perm::Read),
        ('u', Perm::Update),
        ('d', Perm::Delete),
        ('s', Perm::Search),
    ];
    letters
        .iter()
        .filter(|(_, p)| {
            role.is_none_or(|r| r.grants.iter().any(|g| g.perms.contains(p)))
                && scopes.is_none_or(|s| s.iter().any(|sc| sc.perms.contains(p)))
        })
        .map(|(c, _)| *c)
        .collect()
}

/// The periodic access review: every user and client, their privileges,
/// second factor, last activity, dormant accounts and privileges unused
/// within `period_days`.
pub async fn review(
    st: &AppState,
    period_days: u32,
    now_ms: i64,
) -> Result<Vec<ReviewRow>, Failure> {
    // Usage comes from the audit log: move journaled records in first, so
    // an access acknowledged a moment ago counts as used.
    st.audit
        .flush()
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let from = now_ms - i64::from(period_days) * 86_400_000;
    let mut out = Vec::new();
    let users = st
        .accounts
        .list()
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    for u in users {
        let role = st.roles.get(u.role()).cloned();
        let (used, _) = used(st, &format!("user:{}", u.id()), from).await?;
        let granted = granted_letters(role.as_deref(), None);
        let last = u.last_sign_in().map(|s| s * 1000);
        let dormant = match last {
            Some(t) => t < from,
            None => u.rec.created_at * 1000 < from,
        };
        out.push(ReviewRow {
            kind: "user",
            id: u.id().to_owned(),
            name: u.username().to_owned(),
            role: Some(u.role().to_owned()),
            scopes: None,
            status: u.rec.status.clone(),
            mfa: Some(u.has_mfa()),
            last_active: last,
            dormant,
            unused: granted.chars().filter(|c| !used.contains(c)).collect(),
            relationships: role.as_ref().is_some_and(|r| r.relationships),
        });
    }
    let clients = st
        .clients
        .list()
        .await
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    for c in clients {
        let scopes = ScopeSet::parse_lenient(&c.scope);
        let (used, last) = used(st, &c.id, from).await?;
        let granted = granted_letters(None, Some(&scopes));
        let dormant = match last {
            Some(t) => t < from,
            None => c.created_at * 1000 < from,
        };
        out.push(ReviewRow {
            kind: "client",
            id: c.id.clone(),
            name: c.name.clone(),
            role: None,
            scopes: Some(c.scope.clone()),
            status: if c.disabled { "disabled" } else { "active" }.into(),
            mfa: None,
            last_active: last,
            dormant,
            unused: granted.chars().filter(|ch| !used.contains(ch)).collect(),
            relationships: st.config.access.relationship_clients.contains(&c.id),
        });
    }
    Ok(out)
}

/// `phylax access held`: relationship versions held since the upgrade
/// (`Type/id/version`), sorted.
pub fn held(st: &AppState) -> Vec<String> {
    st.gate.held_relationships()
}

/// `phylax access approve`: release held relationship versions. The
/// request is checked first (a resource named must have a held version;
/// a refused one changes and records nothing), then recorded in the audit
/// log (the resources approved, or for `--all` how many versions), and
/// not made when it cannot be recorded. Returns how many versions were
/// released.
pub async fn approve(st: &AppState, a: Approval) -> Result<usize, ApproveError> {
    let released = st.gate.releases(&a).await?;
    let detail = match &a {
        Approval::All => format!(
            "approving every held relationship version ({} held)",
            released.len()
        ),
        Approval::Resources(rs) => format!(
            "approving the held relationship versions of {} ({} versions)",
            rs.join(", "),
            released.len()
        ),
    };
    st.audit
        .record_admin(
            "relationships-approve",
            phylax_audit::event::Action::Update,
            detail,
        )
        .await
        .map_err(|e| ApproveError::Unrecorded(e.to_string()))?;
    Ok(st.gate.approve_relationships(a).await?)
}

/// Why `phylax access approve` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error(transparent)]
    Hold(#[from] HoldError),
    #[error("not recorded in the audit log, so not approved: {0}")]
    Unrecorded(String),
}
