//! Phylax access tokens.
//!
//! A token is a compact JWS (`HS256`, `typ: at+jwt`) over the claims below,
//! MACed with a 256-bit key that is generated at init and stored wrapped by
//! the KEK, so every node sharing a database verifies every node's tokens
//! without a database round trip. Verification is constant-time and checks
//! the header exactly (no algorithm negotiation: `alg: none` and key
//! confusion are impossible). Tokens live at most 15 minutes.

use crate::scopes::ScopeSet;
use crate::AuthError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phylax_crypto::MacKey;
use serde::{Deserialize, Serialize};

/// Hard ceiling on access-token lifetime.
pub const MAX_LIFETIME_SECS: i64 = 15 * 60;
const HEADER: &str = r#"{"alg":"HS256","typ":"at+jwt"}"#;
const MAX_TOKEN_LEN: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub scope: String,
    pub client_id: String,
}

pub struct TokenIssuer {
    key: MacKey,
    issuer: String,
    audience: String,
    lifetime: i64,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// `lifetime_secs` is clamped to 1..=15 minutes.
    pub fn new(key: MacKey, issuer: String, audience: String, lifetime_secs: i64) -> Self {
        TokenIssuer {
            key,
            issuer,
            audience,
            lifetime: lifetime_secs.clamp(1, MAX_LIFETIME_SECS),
        }
    }

    pub fn lifetime(&self) -> i64 {
        self.lifetime
    }

    pub fn issue(
        &self,
        client_id: &str,
        scopes: &ScopeSet,
        now: i64,
    ) -> Result<(String, AccessClaims), AuthError> {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client_id.to_owned(),
            aud: self.audience.clone(),
            exp: now + self.lifetime,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scopes.to_string(),
            client_id: client_id.to_owned(),
        };
        let payload =
            serde_json::to_vec(&claims).map_err(|_| AuthError::InvalidRequest("claims"))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let tag = self.key.sign(signing_input.as_bytes());
        Ok((
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag)),
            claims,
        ))
    }

    /// Verify a bearer token. All failures are the same error to the caller.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::InvalidToken("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::InvalidToken("malformed"));
        };
        let tag = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| AuthError::InvalidToken("malformed"))?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        if !self.key.verify(signing_input.as_bytes(), &tag) {
            return Err(AuthError::InvalidToken("bad signature"));
        }
        // Authenticated from here on; the header is ours and fixed.
        if URL_SAFE_NO_PAD.decode(h).ok().as_deref() != Some(HEADER.as_bytes()) {
            return Err(AuthError::InvalidToken("unexpected header"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| AuthError::InvalidToken("malformed"))?;
        let c: AccessClaims =
            serde_json::from_slice(&bytes).map_err(|_| AuthError::InvalidToken("malformed"))?;
        if c.exp <= now {
            return Err(AuthError::InvalidToken("expired"));
        }
        if c.iat > now + 60 || c.exp - c.iat > MAX_LIFETIME_SECS {
            return Err(AuthError::InvalidToken("bad times"));
        }
        if c.iss != self.issuer || c.aud != self.audience {
            return Err(AuthError::InvalidToken("wrong issuer or audience"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phylax_crypto::Kek;

    fn issuer() -> (TokenIssuer, Kek) {
        let (kek, _) = Kek::generate().unwrap();
        let (k, _) = MacKey::generate_wrapped(&kek, "token").unwrap();
        (
            TokenIssuer::new(k, "https://h/auth".into(), "https://h/fhir".into(), 300),
            kek,
        )
    }

    #[test]
    fn issue_verify_expire_tamper() {
        let (t, kek) = issuer();
        let scopes = ScopeSet::parse_lenient("system/Patient.rs");
        let (tok, claims) = t.issue("c1", &scopes, 1000).unwrap();
        assert_eq!(t.verify(&tok, 1001).unwrap(), claims);
        assert_eq!(claims.exp, 1300);
        assert!(t.verify(&tok, 1300).is_err(), "expired");
        // Flip one character in each part.
        for i in [5, tok.len() / 2, tok.len() - 3] {
            let mut b = tok.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            assert!(t.verify(std::str::from_utf8(&b).unwrap(), 1001).is_err());
        }
        // Another instance's key.
        let (k2, _) = MacKey::generate_wrapped(&kek, "token").unwrap();
        let t2 = TokenIssuer::new(k2, "https://h/auth".into(), "https://h/fhir".into(), 300);
        assert!(t2.verify(&tok, 1001).is_err());
        // alg=none style forgery.
        let parts: Vec<&str> = tok.split('.').collect();
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(t.verify(&none, 1001).is_err());
        assert!(t.verify("", 1001).is_err());
        assert!(t.verify("a.b.c.d", 1001).is_err());
        assert!(t.verify(&"a".repeat(10_000), 1001).is_err());
    }

    #[test]
    fn lifetime_is_capped() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, _) = MacKey::generate_wrapped(&kek, "token").unwrap();
        let t = TokenIssuer::new(k, "i".into(), "a".into(), 86_400);
        assert_eq!(t.lifetime(), MAX_LIFETIME_SECS);
    }
}
