//! SMART App Launch scopes.
//!
//! v2 form `context/Resource.cruds` (permission letters in order, any
//! non-empty subset) and v1 form `context/Resource.read|write|*`, with
//! `Resource` a resource type or `*`. Phylax's foundation grants only
//! `system/` scopes (Backend Services); granular v2 scopes with a query
//! (`?category=…`) are not granted yet and are dropped from requests.

/// The audit log's resource type.
pub const AUDIT_TYPE: &str = "AuditEvent";

use std::collections::BTreeSet;
use std::fmt;

/// An interaction a scope permission letter covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Perm {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

const ORDER: [(Perm, char); 5] = [
    (Perm::Create, 'c'),
    (Perm::Read, 'r'),
    (Perm::Update, 'u'),
    (Perm::Delete, 'd'),
    (Perm::Search, 's'),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Context {
    System,
    User,
    Patient,
}

impl Context {
    fn as_str(self) -> &'static str {
        match self {
            Context::System => "system",
            Context::User => "user",
            Context::Patient => "patient",
        }
    }
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub context: Context,
    /// `None` = `*` (every resource type).
    pub resource: Option<String>,
    pub perms: BTreeSet<Perm>,
}

impl Scope {
    /// Parse one scope token. Returns `None` for anything that is not a
    /// well-formed resource scope (callers decide whether to ignore it).
    pub fn parse(s: &str) -> Option<Scope> {
        let (ctx, rest) = s.split_once('/')?;
        let context = match ctx {
            "system" => Context::System,
            "user" => Context::User,
            "patient" => Context::Patient,
            _ => return None,
        };
        let (res, perm) = rest.split_once('.')?;
        let resource = match res {
            "*" => None,
            t if phylax_fhir_type_ok(t) => Some(t.to_owned()),
            _ => return None,
        };
        let perms: BTreeSet<Perm> = match perm {
            "read" => [Perm::Read, Perm::Search].into(),
            "write" => [Perm::Create, Perm::Update, Perm::Delete].into(),
            "*" => ORDER.iter().map(|(p, _)| *p).collect(),
            letters => {
                // v2: a non-empty subsequence of "cruds", in that order.
                let mut out = BTreeSet::new();
                let mut idx = 0;
                for ch in letters.chars() {
                    let pos = ORDER[idx..].iter().position(|(_, c)| *c == ch)?;
                    out.insert(ORDER[idx + pos].0);
                    idx += pos + 1;
                }
                if out.is_empty() {
                    return None;
                }
                out
            }
        };
        Some(Scope {
            context,
            resource,
            perms,
        })
    }

    /// A `system/` wildcard covers every type except audit records: a
    /// backend client reads the audit log only with a scope that names
    /// `AuditEvent` (a SIEM connector's `system/AuditEvent.rs`), never as a
    /// side effect of `system/*.rs`. (Users are gated by their role: only
    /// auditors may read AuditEvents, whatever their scopes.)
    fn covers_type(&self, rtype: &str) -> bool {
        match self.resource.as_deref() {
            None => !(self.context == Context::System && rtype == AUDIT_TYPE),
            Some(r) => r == rtype,
        }
    }

    /// The part of `self` (requested) that `granted` allows.
    fn intersect(&self, granted: &Scope) -> Option<Scope> {
        if self.context != granted.context {
            return None;
        }
        let resource = match (&self.resource, &granted.resource) {
            (None, None) => None,
            // A requested wildcard does not mean the audit log either: a
            // client registered for it must ask for it by name.
            (None, Some(g)) if self.covers_type(g) => Some(g.clone()),
            (None, Some(_)) => return None,
            // A wildcard registration never yields the audit log, even
            // when the request names it ([`Scope::covers_type`]).
            (Some(r), None) if granted.covers_type(r) => Some(r.clone()),
            (Some(_), None) => return None,
            (Some(r), Some(g)) if r == g => Some(r.clone()),
            _ => return None,
        };
        let perms: BTreeSet<Perm> = self.perms.intersection(&granted.perms).copied().collect();
        (!perms.is_empty()).then_some(Scope {
            context: self.context,
            resource,
            perms,
        })
    }
}

/// Resource types are checked by the FHIR crate at the HTTP boundary; here
/// we only need the lexical shape, to keep this crate free of definitions.
fn phylax_fhir_type_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphanumeric())
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letters: String = ORDER
            .iter()
            .filter(|(p, _)| self.perms.contains(p))
            .map(|(_, c)| *c)
            .collect();
        write!(
            f,
            "{}/{}.{}",
            self.context.as_str(),
            self.resource.as_deref().unwrap_or("*"),
            letters
        )
    }
}

/// A set of scopes, as granted in a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    scopes: BTreeSet<Scope>,
}

impl ScopeSet {
    /// Parse a space-separated scope string, ignoring tokens that are not
    /// resource scopes (e.g. `openid`, `launch`); they are never granted here.
    pub fn parse_lenient(s: &str) -> ScopeSet {
        ScopeSet {
            scopes: s.split_whitespace().filter_map(Scope::parse).collect(),
        }
    }

    /// Parse strictly: every token must be a resource scope in `context`.
    /// Used when registering clients, where a typo must not pass silently.
    pub fn parse_strict(s: &str, context: Context) -> Result<ScopeSet, String> {
        let mut scopes = BTreeSet::new();
        for tok in s.split_whitespace() {
            match Scope::parse(tok) {
                Some(sc) if sc.context == context => {
                    scopes.insert(sc);
                }
                _ => return Err(format!("not a valid {} scope: {tok}", context.as_str())),
            }
        }
        if scopes.is_empty() {
            return Err("at least one scope is required".into());
        }
        Ok(ScopeSet { scopes })
    }

    /// What of `requested` the `registered` set allows: the intersection,
    /// never the union.
    pub fn grant(requested: &ScopeSet, registered: &ScopeSet) -> ScopeSet {
        let mut scopes = BTreeSet::new();
        for r in &requested.scopes {
            for g in &registered.scopes {
                if let Some(i) = r.intersect(g) {
                    scopes.insert(i);
                }
            }
        }
        ScopeSet { scopes }
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// Does any scope in `context` allow `perm` on `rtype`?
    pub fn allows(&self, context: Context, rtype: &str, perm: Perm) -> bool {
        self.scopes
            .iter()
            .any(|s| s.context == context && s.covers_type(rtype) && s.perms.contains(&perm))
    }

    /// Does a wildcard (`*`) scope allow `perm` on every type?
    pub fn allows_all_types(&self, context: Context, perm: Perm) -> bool {
        self.scopes
            .iter()
            .any(|s| s.context == context && s.resource.is_none() && s.perms.contains(&perm))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.scopes {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_and_v1() {
        let s = Scope::parse("system/Patient.rs").unwrap();
        assert_eq!(s.to_string(), "system/Patient.rs");
        assert_eq!(Scope::parse("system/*.cruds").unwrap().perms.len(), 5);
        assert_eq!(
            Scope::parse("system/Observation.read").unwrap().to_string(),
            "system/Observation.rs"
        );
        assert_eq!(
            Scope::parse("system/*.write").unwrap().to_string(),
            "system/*.cud"
        );
        assert_eq!(
            Scope::parse("system/*.*").unwrap().to_string(),
            "system/*.cruds"
        );
        for bad in [
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.",
            "system/patient.r",
            "admin/Patient.r",
            "system/Patient.x",
            "Patient.r",
            "system/Patient.rs?category=x",
            "openid",
        ] {
            assert!(Scope::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn grant_is_the_intersection() {
        let reg = ScopeSet::parse_strict(
            "system/Patient.rs system/Observation.cruds",
            Context::System,
        )
        .unwrap();
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/*.cruds openid"), &reg);
        assert_eq!(g.to_string(), "system/Observation.cruds system/Patient.rs");
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/Patient.cruds"), &reg);
        assert_eq!(g.to_string(), "system/Patient.rs");
        let g = ScopeSet::grant(
            &ScopeSet::parse_lenient("system/Encounter.r user/Patient.r"),
            &reg,
        );
        assert!(g.is_empty());
        let wide = ScopeSet::parse_strict("system/*.rs", Context::System).unwrap();
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/Patient.r"), &wide);
        assert_eq!(g.to_string(), "system/Patient.r");
    }

    #[test]
    fn wildcards_do_not_reach_the_audit_log() {
        let g = ScopeSet::parse_lenient("system/*.rs system/AuditEvent.r");
        assert!(g.allows(Context::System, "Patient", Perm::Read));
        assert!(g.allows(Context::System, "AuditEvent", Perm::Read));
        assert!(!g.allows(Context::System, "AuditEvent", Perm::Search));
        let w = ScopeSet::parse_lenient("system/*.cruds");
        assert!(!w.allows(Context::System, "AuditEvent", Perm::Read));
        // Asking for it by name under a wildcard registration gets nothing.
        for reg in ["system/*.rs", "system/*.cruds"] {
            let reg = ScopeSet::parse_strict(reg, Context::System).unwrap();
            let g = ScopeSet::grant(
                &ScopeSet::parse_lenient("system/AuditEvent.rs system/Patient.r"),
                &reg,
            );
            assert_eq!(g.to_string(), "system/Patient.r");
        }
        // An explicit registration is what grants it.
        let reg =
            ScopeSet::parse_strict("system/*.rs system/AuditEvent.rs", Context::System).unwrap();
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/AuditEvent.rs"), &reg);
        assert_eq!(g.to_string(), "system/AuditEvent.rs");
        // A wildcard request is granted only what it asked for: not the
        // audit log a client is also registered for.
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/*.rs"), &reg);
        assert_eq!(g.to_string(), "system/*.rs");
        assert!(!g.allows(Context::System, "AuditEvent", Perm::Read));
        let reg = ScopeSet::parse_strict("system/Patient.rs system/AuditEvent.rs", Context::System)
            .unwrap();
        let g = ScopeSet::grant(&ScopeSet::parse_lenient("system/*.rs"), &reg);
        assert_eq!(g.to_string(), "system/Patient.rs");
    }

    #[test]
    fn allows_per_type_and_interaction() {
        let s = ScopeSet::parse_lenient("system/Patient.rs system/Observation.c");
        assert!(s.allows(Context::System, "Patient", Perm::Read));
        assert!(s.allows(Context::System, "Patient", Perm::Search));
        assert!(!s.allows(Context::System, "Patient", Perm::Update));
        assert!(!s.allows(Context::System, "Observation", Perm::Read));
        assert!(s.allows(Context::System, "Observation", Perm::Create));
        assert!(!s.allows(Context::User, "Patient", Perm::Read));
        assert!(!s.allows_all_types(Context::System, Perm::Read));
        assert!(ScopeSet::parse_strict("user/Patient.r", Context::System).is_err());
        assert!(ScopeSet::parse_strict("", Context::System).is_err());
    }
}
