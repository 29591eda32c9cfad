//! PKCE (RFC 7636), S256 only: `plain` would let anyone who sees the
//! authorization request redeem the code.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// A `code_challenge` as sent in the authorization request: the base64url
/// SHA-256 of the verifier (43 characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge(String);

impl Challenge {
    /// Only `S256` is accepted, and the challenge must have the right shape.
    pub fn parse(challenge: &str, method: &str) -> Option<Challenge> {
        if method != "S256" {
            return None;
        }
        let ok = challenge.len() == 43
            && URL_SAFE_NO_PAD
                .decode(challenge)
                .is_ok_and(|b| b.len() == 32);
        ok.then(|| Challenge(challenge.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does `verifier` (43–128 unreserved characters) hash to this challenge?
    /// Compared in constant time.
    pub fn verify(&self, verifier: &str) -> bool {
        let shape = (43..=128).contains(&verifier.len())
            && verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        if !shape {
            return false;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
        let computed = URL_SAFE_NO_PAD.encode(digest.as_ref());
        use subtle::ConstantTimeEq;
        computed.as_bytes().ct_eq(self.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7636_appendix_b() {
        let c = Challenge::parse("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "S256").unwrap();
        assert!(c.verify("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert!(!c.verify("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXl"));
        assert!(!c.verify("short"));
        assert!(!c.verify(&"a".repeat(129)));
        assert!(Challenge::parse("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "plain").is_none());
        assert!(Challenge::parse("tooshort", "S256").is_none());
        assert!(Challenge::parse(&"!".repeat(43), "S256").is_none());
    }
}
