//! The single authorization decision. Every FHIR interaction is described as
//! an [`Interaction`] on an optional resource type and decided here, so later
//! rules (roles, compartments, consent, labels, break-the-glass) extend one
//! function instead of every handler. Deny by default.

use crate::scopes::{Context, Perm, ScopeSet};

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A SMART Backend Services client acting for itself (`system/` scopes).
    Client {
        client_id: String,
        scopes: ScopeSet,
        /// The access token's `jti`, for audit correlation.
        token_id: String,
    },
    /// A signed-in user acting through an app (`user/` or `patient/`
    /// scopes).
    User {
        user_id: String,
        /// The user's role as defined now (looked up when the token is
        /// checked, so a changed definition applies at once).
        role: std::sync::Arc<crate::roles::RoleDef>,
        client_id: String,
        scopes: ScopeSet,
        /// The launch-context patient for `patient/` scopes.
        patient: Option<String>,
        token_id: String,
    },
}

impl Principal {
    pub fn id(&self) -> &str {
        match self {
            Principal::Client { client_id, .. } => client_id,
            Principal::User { user_id, .. } => user_id,
        }
    }

    /// The access token's id.
    pub fn token_id(&self) -> &str {
        match self {
            Principal::Client { token_id, .. } | Principal::User { token_id, .. } => token_id,
        }
    }
}

/// A FHIR interaction, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    VRead,
    Create,
    Update,
    /// PUT to an id that does not exist yet (needs create and update).
    UpdateCreate,
    Delete,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    SearchType,
    /// `Patient/{id}/$everything`: the patient's read; each compartment type
    /// is then filtered by its own search permission.
    PatientEverything,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::VRead => "vread",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::UpdateCreate => "update-create",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::PatientEverything => "operation-everything",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the rule that denied (for logs and audit, not clients).
    Deny(&'static str),
}

/// Decide whether `who` may perform `what` on `rtype` (None for system-level).
pub fn decide(who: &Principal, what: Interaction, rtype: Option<&str>) -> Decision {
    decide_instance(who, what, rtype, None)
}

/// A workforce user: the token's `user/` scopes **and** the role's grants
/// must both allow every permission the interaction needs.
fn decide_user(
    scopes: &ScopeSet,
    role: &crate::roles::RoleDef,
    what: Interaction,
    rtype: Option<&str>,
) -> Decision {
    let ctx = Context::User;
    let need = needs(what);
    if what == Interaction::HistorySystem {
        let ok = [Perm::Read, Perm::Search]
            .iter()
            .all(|p| scopes.allows_all_types(ctx, *p) && role.allows_all(*p));
        return if ok {
            Decision::Allow
        } else {
            Decision::Deny("scope or role: system history needs every type")
        };
    }
    let Some(t) = rtype else {
        return Decision::Deny("no resource type");
    };
    if !need.iter().all(|p| scopes.allows(ctx, t, *p)) {
        return Decision::Deny("scope: not granted for this type and interaction");
    }
    if !need.iter().all(|p| role.allows(t, *p)) {
        return Decision::Deny("role: not permitted for this type and interaction");
    }
    Decision::Allow
}

/// The permissions an interaction needs (system history is decided apart).
fn needs(what: Interaction) -> &'static [Perm] {
    match what {
        Interaction::Read
        | Interaction::VRead
        | Interaction::HistoryInstance
        | Interaction::PatientEverything => &[Perm::Read],
        Interaction::Create => &[Perm::Create],
        Interaction::Update => &[Perm::Update],
        Interaction::UpdateCreate => &[Perm::Create, Perm::Update],
        Interaction::Delete => &[Perm::Delete],
        Interaction::HistoryType | Interaction::SearchType => &[Perm::Search],
        Interaction::HistorySystem => &[Perm::Read, Perm::Search],
    }
}

/// [`decide`] for an interaction on one known resource (`id`).
///
/// Patient-context access (`patient/` scopes) is deliberately narrow until
/// compartment enforcement covers every interaction (the least-privilege
/// issue): a patient's token may read and vread its own `Patient` resource
/// and nothing else. Denying is the fail-closed answer; a wider rule that
/// forgot one interaction would leak another patient's data.
pub fn decide_instance(
    who: &Principal,
    what: Interaction,
    rtype: Option<&str>,
    id: Option<&str>,
) -> Decision {
    let scopes = match who {
        Principal::Client { scopes, .. } => scopes,
        Principal::User {
            scopes,
            patient,
            role,
            ..
        } => {
            let patient_scoped = scopes.iter().any(|s| s.context == Context::Patient);
            if patient_scoped {
                let own = matches!(what, Interaction::Read | Interaction::VRead)
                    && rtype == Some("Patient")
                    && id.is_some()
                    && id == patient.as_deref();
                if !own {
                    return Decision::Deny("patient context: only the own Patient resource");
                }
                return if scopes.allows(Context::Patient, "Patient", Perm::Read)
                    && role.allows("Patient", Perm::Read)
                {
                    Decision::Allow
                } else {
                    Decision::Deny("scope or role: not granted for this type and interaction")
                };
            }
            return decide_user(scopes, role, what, rtype);
        }
    };
    let ctx = Context::System;
    // History across all types needs read+search on every type: it returns
    // resources of any type.
    if what == Interaction::HistorySystem {
        return if scopes.allows_all_types(ctx, Perm::Read)
            && scopes.allows_all_types(ctx, Perm::Search)
        {
            Decision::Allow
        } else {
            Decision::Deny("scope: system history needs system/*.rs")
        };
    }
    let need = needs(what);
    let Some(t) = rtype else {
        return Decision::Deny("no resource type");
    };
    if need.iter().all(|p| scopes.allows(ctx, t, *p)) {
        Decision::Allow
    } else {
        Decision::Deny("scope: not granted for this type and interaction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(scope: &str) -> Principal {
        Principal::Client {
            client_id: "c".into(),
            scopes: ScopeSet::parse_lenient(scope),
            token_id: "t".into(),
        }
    }

    #[test]
    fn decisions_follow_scopes() {
        use Interaction::*;
        let c = client("system/Patient.rs system/Observation.cu");
        assert_eq!(decide(&c, Read, Some("Patient")), Decision::Allow);
        assert_eq!(decide(&c, SearchType, Some("Patient")), Decision::Allow);
        assert!(matches!(
            decide(&c, Update, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&c, Delete, Some("Patient")),
            Decision::Deny(_)
        ));
        assert_eq!(decide(&c, Create, Some("Observation")), Decision::Allow);
        assert_eq!(
            decide(&c, UpdateCreate, Some("Observation")),
            Decision::Allow
        );
        assert!(matches!(
            decide(&c, Read, Some("Observation")),
            Decision::Deny(_)
        ));
        assert!(matches!(decide(&c, HistorySystem, None), Decision::Deny(_)));
        assert!(matches!(decide(&c, Read, None), Decision::Deny(_)));
        let w = client("system/*.rs");
        assert_eq!(decide(&w, HistorySystem, None), Decision::Allow);
        let cu = client("system/Patient.u");
        assert!(matches!(
            decide(&cu, UpdateCreate, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&client(""), Read, Some("Patient")),
            Decision::Deny(_)
        ));
    }

    fn role(name: &str) -> std::sync::Arc<crate::roles::RoleDef> {
        std::sync::Arc::new(
            crate::roles::builtin()
                .into_iter()
                .find(|r| r.name == name)
                .unwrap(),
        )
    }

    fn user_as(role_name: &str, scope: &str, patient: Option<&str>) -> Principal {
        Principal::User {
            user_id: "u".into(),
            role: role(role_name),
            client_id: "app".into(),
            scopes: ScopeSet::parse_lenient(scope),
            patient: patient.map(str::to_owned),
            token_id: "t".into(),
        }
    }

    fn user(scope: &str, patient: Option<&str>) -> Principal {
        let name = if patient.is_some() {
            "patient"
        } else {
            "clinician"
        };
        Principal::User {
            user_id: "u".into(),
            role: role(name),
            client_id: "app".into(),
            scopes: ScopeSet::parse_lenient(scope),
            patient: patient.map(str::to_owned),
            token_id: "t".into(),
        }
    }

    #[test]
    fn user_scopes_and_the_narrow_patient_context() {
        use Interaction::*;
        let u = user("user/Patient.rs", None);
        assert_eq!(decide(&u, Read, Some("Patient")), Decision::Allow);
        assert!(matches!(
            decide(&u, Update, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&u, Read, Some("Observation")),
            Decision::Deny(_)
        ));
        // system/ scopes in a user token grant nothing.
        assert!(matches!(
            decide(&user("system/*.cruds", None), Read, Some("Patient")),
            Decision::Deny(_)
        ));
        let p = user("patient/*.rs", Some("p1"));
        assert_eq!(
            decide_instance(&p, Read, Some("Patient"), Some("p1")),
            Decision::Allow
        );
        assert_eq!(
            decide_instance(&p, VRead, Some("Patient"), Some("p1")),
            Decision::Allow
        );
        assert!(
            matches!(
                decide_instance(&p, Read, Some("Patient"), Some("p2")),
                Decision::Deny(_)
            ),
            "another patient"
        );
        assert!(matches!(
            decide(&p, SearchType, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide_instance(&p, Read, Some("Observation"), Some("p1")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide_instance(&user("patient/*.rs", None), Read, Some("Patient"), None),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn role_and_scopes_intersect() {
        use Interaction::*;
        // Wide scopes, narrow role: the role wins.
        let fd = user_as("front-desk", "user/*.cruds", None);
        assert_eq!(decide(&fd, Create, Some("Patient")), Decision::Allow);
        assert_eq!(
            decide(&fd, SearchType, Some("Appointment")),
            Decision::Allow
        );
        assert!(
            matches!(decide(&fd, Read, Some("Observation")), Decision::Deny(r) if r.starts_with("role"))
        );
        assert!(matches!(
            decide(&fd, Delete, Some("Patient")),
            Decision::Deny(_)
        ));
        // Wide role, narrow scopes: the scopes win.
        let c = user_as("clinician", "user/Patient.rs", None);
        assert!(
            matches!(decide(&c, Read, Some("Observation")), Decision::Deny(r) if r.starts_with("scope"))
        );
        // Auditors read audit records only; admins no clinical data.
        let a = user_as("auditor", "user/*.cruds", None);
        assert_eq!(decide(&a, SearchType, Some("AuditEvent")), Decision::Allow);
        assert!(matches!(
            decide(&a, Read, Some("Patient")),
            Decision::Deny(_)
        ));
        let ad = user_as("admin", "user/*.cruds", None);
        assert_eq!(decide(&ad, Update, Some("Organization")), Decision::Allow);
        assert!(matches!(
            decide(&ad, Read, Some("Patient")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&ad, PatientEverything, Some("Patient")),
            Decision::Deny(_)
        ));
        // System history spans every type, audit records included: no
        // workforce role reaches it.
        for r in [
            "clinician",
            "nurse",
            "front-desk",
            "billing",
            "researcher",
            "auditor",
            "admin",
        ] {
            assert!(
                matches!(
                    decide(&user_as(r, "user/*.cruds", None), HistorySystem, None),
                    Decision::Deny(_)
                ),
                "{r}"
            );
        }
    }
}
