//! `phylax incident contain`: stop a principal everywhere at once.
//!
//! - **A user:** disabled; password, second factors, recovery codes and
//!   any enrollment link cleared; every grant deleted and a revocation
//!   published, so every node refuses their access tokens within seconds
//!   (the revocation feed, [`crate::data::revocations`]). They come back
//!   only through an administrator and a new enrollment link.
//! - **A client:** disabled; every node refuses its tokens, and those of
//!   users signed in through it, within seconds (the disabled-client
//!   list), and the token endpoint issues it nothing more.
//! - **An address:** blocked on every route of every node, sign-in and
//!   token endpoints included ([`crate::data::blocks`]).
//! - **Keys:** the access-token MAC key and the id_token signing key are
//!   rotated by default; the data keys when asked (if the data may have
//!   left sealed: every version re-encrypted under new keys).
//!
//! Each action is recorded in the audit log as it is taken, and the whole
//! list, with times, as the incident's `contained` step. A failure stops
//! there: what was done is still recorded, and the error says what was
//! not.

use super::{audited, ResponseError};
use crate::data::incidents::{IncidentError, IncidentId, Step};
use crate::keys::KeyAdmin;
use crate::state::AppState;
use phylax_audit::event::Action;
use serde::Serialize;
use std::net::IpAddr;

/// What to contain.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// User account ids.
    pub users: Vec<String>,
    /// OAuth client ids.
    pub clients: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// Rotate the access-token MAC key and the id_token signing key.
    pub rotate_tokens: bool,
    /// Rotate (and re-encrypt under) the data keys.
    pub rotate_data_keys: bool,
}

/// What containment did.
#[derive(Debug, Clone, Serialize)]
pub struct Contained {
    pub incident: String,
    /// (RFC 3339 time, action), in order.
    pub actions: Vec<(String, String)>,
    /// Seconds from the first action to the last.
    pub seconds: f64,
}

/// Contain `plan` for the open incident `id`. `keys` rotates keys (the
/// operator's key administration over the same instance); without it no
/// key is rotated and the plan must not ask for it.
pub async fn contain(
    st: &AppState,
    keys: Option<&KeyAdmin<'_>>,
    id: &IncidentId,
    plan: &Plan,
    by: &str,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Contained, ResponseError> {
    let inc = st.incidents.get(id).await?;
    if !inc.is_open() {
        return Err(IncidentError::Closed(id.to_string()).into());
    }
    if plan.users.is_empty()
        && plan.clients.is_empty()
        && plan.addresses.is_empty()
        && !plan.rotate_tokens
        && !plan.rotate_data_keys
    {
        return Err(IncidentError::Invalid("nothing to contain".into()).into());
    }
    let started = std::time::Instant::now();
    let mut done = Done {
        st,
        id,
        actions: Vec::new(),
    };
    let result = run(&mut done, keys, plan, progress).await;
    let actions = done.actions;
    // What was done is recorded even when a later action failed.
    if !actions.is_empty() {
        let inc = st
            .incidents
            .append(
                id,
                Step::Contained {
                    by: by.to_owned(),
                    actions: actions.iter().map(|(t, a)| format!("{t} {a}")).collect(),
                },
                crate::base::clock::now_ms(),
            )
            .await?;
        audited(
            st,
            Action::Update,
            format!(
                "incident {id} step {}: contained ({} actions)",
                inc.last_step(),
                actions.len()
            ),
        )
        .await?;
    }
    result?;
    Ok(Contained {
        incident: id.to_string(),
        actions,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The actions taken so far.
struct Done<'a> {
    st: &'a AppState,
    id: &'a IncidentId,
    actions: Vec<(String, String)>,
}

impl Done<'_> {
    async fn did(&mut self, action: String) -> Result<(), ResponseError> {
        let now = crate::base::clock::now_ms();
        audited(
            self.st,
            Action::Update,
            format!("incident {}: contained: {action}", self.id),
        )
        .await?;
        self.actions
            .push((crate::base::clock::format_instant(now), action));
        Ok(())
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ResponseError {
    ResponseError::Register(IncidentError::Unavailable(format!("{what}: {e}")))
}

async fn run(
    d: &mut Done<'_>,
    keys: Option<&KeyAdmin<'_>>,
    plan: &Plan,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(), ResponseError> {
    let st = d.st;
    let now = || crate::base::clock::now_secs();
    for u in &plan.users {
        st.accounts
            .contain(u, now())
            .await
            .map_err(|e| failed(&format!("user {u}"), e))?;
        d.did(format!(
            "user {u} disabled; password, second factors and recovery codes cleared; sessions and tokens revoked"
        ))
        .await?;
    }
    for c in &plan.clients {
        let found = st
            .clients
            .set_disabled(c, true)
            .await
            .map_err(|e| failed(&format!("client {c}"), e))?;
        if !found {
            return Err(IncidentError::Invalid(format!("no client {c}")).into());
        }
        st.disabled_clients.write().insert(c.clone());
        d.did(format!(
            "client {c} disabled; its tokens and those issued through it refused"
        ))
        .await?;
    }
    for a in &plan.addresses {
        st.blocks
            .block(*a, Some(d.id.as_str()), crate::base::clock::now_ms())
            .await
            .map_err(|e| failed(&format!("address {a}"), e))?;
        d.did(format!("address {a} blocked")).await?;
    }
    if plan.rotate_tokens || plan.rotate_data_keys {
        let Some(k) = keys else {
            return Err(
                IncidentError::Invalid("key rotation needs the key administration".into()).into(),
            );
        };
        if plan.rotate_tokens {
            let r = k
                .rotate_tokens()
                .await
                .map_err(|e| failed("the access-token key", e))?;
            d.did(format!(
                "access-token key rotated ({}); tokens of the previous key verify until {} unless revoked",
                r.key,
                crate::base::clock::format_instant(r.previous_valid_until * 1000)
            ))
            .await?;
            let kid = st
                .keys
                .rotate_signing()
                .await
                .map_err(|e| failed("the signing key", e))?;
            d.did(format!("id_token signing key rotated ({kid})"))
                .await?;
        }
        if plan.rotate_data_keys {
            let r = k
                .rotate_data_keys(progress)
                .await
                .map_err(|e| failed("the data keys", e))?;
            d.did(format!(
                "data keys rotated to generation {}; {} versions re-encrypted, {} older keys deleted",
                r.generation, r.resealed, r.retired
            ))
            .await?;
        }
    }
    Ok(())
}
