//! Typed identifiers. Each is parsed once at the boundary; holding one is
//! proof that it is well-formed, so storage and crypto never re-check.

use crate::defs::definitions;
use std::fmt;

/// A concrete FHIR R4 resource type name (e.g. `Patient`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType(&'static str);

impl ResourceType {
    /// Parse a resource type name; `None` if R4 does not define it as a
    /// concrete resource type.
    pub fn parse(s: &str) -> Option<Self> {
        definitions()
            .resource_types()
            .binary_search_by(|t| t.as_str().cmp(s))
            .ok()
            .map(|i| ResourceType(definitions().resource_types()[i].as_str()))
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResourceType({})", self.0)
    }
}

/// Is `s` a valid FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`?
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A FHIR logical id. Server-assigned ids are random UUIDs, so an id reveals
/// nothing about the person; client-chosen ids (update-as-create) are
/// restricted to the FHIR id alphabet.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(s: &str) -> Option<Self> {
        is_valid_id(s).then(|| ResourceId(s.to_owned()))
    }

    /// Wrap a freshly generated id (a UUID string, always valid).
    pub fn from_uuid(u: impl fmt::Display) -> Self {
        ResourceId(u.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResourceId({})", self.0)
    }
}

/// A resource version number (1, 2, …). FHIR versionIds are strings; Phylax
/// assigns consecutive positive integers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct VersionId(u64);

impl VersionId {
    pub const FIRST: VersionId = VersionId(1);

    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok().filter(|v| *v > 0).map(VersionId)
    }

    pub fn new(v: u64) -> Option<Self> {
        (v > 0).then_some(VersionId(v))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn next(self) -> VersionId {
        VersionId(self.0 + 1)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types_ids_versions() {
        assert_eq!(ResourceType::parse("Patient").unwrap().as_str(), "Patient");
        assert!(ResourceType::parse("patient").is_none());
        assert!(ResourceType::parse("Resource").is_none());
        assert!(ResourceType::parse("Patient'; DROP TABLE").is_none());
        assert!(ResourceId::parse("abc-1.2").is_some());
        assert!(ResourceId::parse("").is_none());
        assert!(ResourceId::parse(&"a".repeat(65)).is_none());
        assert!(ResourceId::parse("a/b").is_none());
        assert!(ResourceId::parse("é").is_none());
        assert_eq!(VersionId::parse("12").unwrap().get(), 12);
        assert!(VersionId::parse("0").is_none());
        assert!(VersionId::parse("-1").is_none());
        assert!(VersionId::parse("99999999999999999999").is_none());
        assert!(VersionId::parse("1e3").is_none());
    }
}
