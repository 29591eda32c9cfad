//! SMART App Launch v2 scope requests for the authorization-code flow:
//! resource scopes (`patient/`, `user/`) plus the launch and identity
//! scopes (`openid`, `fhirUser`, `launch/patient`, `offline_access`,
//! `online_access`). What a token gets is the intersection of what the
//! app asked for, what the app is registered for, and what the user's
//! role can hold, never more.

use crate::scopes::{Context, Scope, ScopeSet};
use std::fmt;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmartScopes {
    pub resources: ScopeSet,
    pub openid: bool,
    pub fhir_user: bool,
    pub launch_patient: bool,
    pub offline_access: bool,
    pub online_access: bool,
}

/// Which contexts a user may hold scopes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A patient: `patient/` scopes for their own compartment.
    Patient,
    /// Workforce: `user/` scopes.
    Workforce,
}

impl SmartScopes {
    /// Parse an authorization request's `scope`, ignoring what Phylax does
    /// not grant (SMART: the server may grant fewer scopes than asked).
    pub fn parse_request(s: &str) -> SmartScopes {
        let mut out = SmartScopes {
            resources: ScopeSet::parse_lenient(s),
            ..Default::default()
        };
        for t in s.split_whitespace() {
            out.special(t);
        }
        out
    }

    fn special(&mut self, t: &str) -> bool {
        let slot = match t {
            "openid" => &mut self.openid,
            "fhirUser" => &mut self.fhir_user,
            "launch/patient" => &mut self.launch_patient,
            "offline_access" => &mut self.offline_access,
            "online_access" => &mut self.online_access,
            _ => return false,
        };
        *slot = true;
        true
    }

    /// Parse what an app is registered for: every token must be a
    /// `patient/` or `user/` resource scope or one of the special scopes.
    pub fn parse_registration(s: &str) -> Result<SmartScopes, String> {
        let mut out = SmartScopes::default();
        let mut res = Vec::new();
        for t in s.split_whitespace() {
            if out.special(t) {
                continue;
            }
            match Scope::parse(t) {
                Some(sc) if sc.context != Context::System => res.push(t),
                _ => return Err(format!("not a valid app scope: {t}")),
            }
        }
        out.resources = ScopeSet::parse_lenient(&res.join(" "));
        if out.resources.is_empty() {
            return Err("at least one patient/ or user/ resource scope is required".into());
        }
        Ok(out)
    }

    /// The grant: requested ∩ registered, restricted to the holder's
    /// context. `offline_access` and `online_access` need registration too.
    pub fn grant(requested: &SmartScopes, registered: &SmartScopes, holder: Holder) -> SmartScopes {
        let ctx = match holder {
            Holder::Patient => Context::Patient,
            Holder::Workforce => Context::User,
        };
        let allowed: Vec<String> = registered
            .resources
            .iter()
            .filter(|s| s.context == ctx)
            .map(|s| s.to_string())
            .collect();
        let registered_ctx = ScopeSet::parse_lenient(&allowed.join(" "));
        let both = |a: bool, b: bool| a && b;
        SmartScopes {
            resources: ScopeSet::grant(&requested.resources, &registered_ctx),
            openid: both(requested.openid, registered.openid),
            fhir_user: both(requested.fhir_user, registered.fhir_user),
            launch_patient: both(requested.launch_patient, registered.launch_patient)
                && holder == Holder::Patient,
            offline_access: both(requested.offline_access, registered.offline_access),
            online_access: both(requested.online_access, registered.online_access),
        }
    }

    /// Patient-context scopes need a patient in the launch context.
    pub fn has_patient_scopes(&self) -> bool {
        self.resources.iter().any(|s| s.context == Context::Patient)
    }

    /// Does the grant include a refresh token?
    pub fn wants_refresh(&self) -> bool {
        self.offline_access || self.online_access
    }
}

impl fmt::Display for SmartScopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        for (on, name) in [
            (self.launch_patient, "launch/patient"),
            (self.openid, "openid"),
            (self.fhir_user, "fhirUser"),
            (self.offline_access, "offline_access"),
            (self.online_access, "online_access"),
        ] {
            if on {
                parts.push(name.into());
            }
        }
        let res = self.resources.to_string();
        if !res.is_empty() {
            parts.push(res);
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_is_an_intersection_in_the_holders_context() {
        let reg = SmartScopes::parse_registration(
            "patient/*.rs user/Patient.rs launch/patient openid fhirUser offline_access",
        )
        .unwrap();
        let req = SmartScopes::parse_request(
            "patient/Observation.rs patient/Patient.cruds user/*.cruds launch/patient openid offline_access online_access system/*.cruds junk",
        );
        let p = SmartScopes::grant(&req, &reg, Holder::Patient);
        assert_eq!(
            p.to_string(),
            "launch/patient openid offline_access patient/Observation.rs patient/Patient.rs"
        );
        let w = SmartScopes::grant(&req, &reg, Holder::Workforce);
        assert_eq!(w.to_string(), "openid offline_access user/Patient.rs");
        assert!(
            !w.launch_patient,
            "only patients get their own launch context here"
        );
        assert!(p.has_patient_scopes() && !w.has_patient_scopes());
    }

    #[test]
    fn registration_is_strict() {
        assert!(SmartScopes::parse_registration("system/*.rs").is_err());
        assert!(SmartScopes::parse_registration("patient/*.rs typo").is_err());
        assert!(
            SmartScopes::parse_registration("openid").is_err(),
            "needs a resource scope"
        );
    }
}
