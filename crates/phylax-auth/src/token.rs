//! Phylax access tokens.
//!
//! A token is a compact JWS (`HS256`, `typ: at+jwt`) over the claims below,
//! MACed with a 256-bit key that is generated at init and stored wrapped by
//! the KEK, so every node sharing a database verifies every node's tokens
//! without a database round trip. Verification is constant-time and checks
//! the header exactly (no algorithm negotiation: `alg: none` and key
//! confusion are impossible). Tokens live at most 15 minutes.
//!
//! The key rotates (`phylax keys rotate --tokens`): new tokens are MACed
//! with the newest key, and a token MACed with the one before still
//! verifies until it must have expired (its key was replaced at most 15
//! minutes and a minute of clock skew before); older keys verify nothing.

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
    /// Present on tokens issued to a signed-in user: the user's role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// SMART launch context: the patient whose compartment `patient/`
    /// scopes refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The grant family (session / refresh chain) this token came from;
    /// revoking the family revokes the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
    /// When the user last authenticated, and how (RFC 8176 values:
    /// `pwd`, `otp`, `hwk`/`user`), for step-up decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amr: Option<Vec<String>>,
    /// `urn:phylax:acr:mfa` when a second factor was used, else
    /// `urn:phylax:acr:pwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// RFC 8705 §3.1: the token is bound to the TLS client certificate
    /// with this thumbprint, and is refused on a connection without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The `cnf` claim of a certificate-bound token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confirmation {
    /// The certificate's SHA-256 thumbprint, base64url.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// What a user's access token says beyond the client and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserContext {
    pub user_id: String,
    pub role: String,
    pub patient: Option<String>,
    pub family: String,
    pub auth_time: i64,
    pub amr: Vec<String>,
}

/// ACR values Phylax asserts.
pub const ACR_MFA: &str = "urn:phylax:acr:mfa";
pub const ACR_PWD: &str = "urn:phylax:acr:pwd";

impl AccessClaims {
    /// Did the user complete a second factor within `max_age` seconds?
    /// Sensitive operations (exports, break-the-glass, admin changes)
    /// demand this (step-up).
    pub fn recent_mfa(&self, now: i64, max_age: i64) -> bool {
        self.acr.as_deref() == Some(ACR_MFA)
            && self
                .auth_time
                .is_some_and(|t| t <= now && now - t <= max_age)
    }
}

/// The keys tokens are MACed with: the current one, and the one before
/// with the time (seconds) until which tokens it MACed may still be alive.
struct TokenKeys {
    current: std::sync::Arc<MacKey>,
    previous: Option<(std::sync::Arc<MacKey>, i64)>,
}

pub struct TokenIssuer {
    keys: parking_lot::RwLock<TokenKeys>,
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
            keys: parking_lot::RwLock::new(TokenKeys {
                current: std::sync::Arc::new(key),
                previous: None,
            }),
            issuer,
            audience,
            lifetime: lifetime_secs.clamp(1, MAX_LIFETIME_SECS),
        }
    }

    pub fn lifetime(&self) -> i64 {
        self.lifetime
    }

    /// Keep verifying tokens MACed with `previous` (the key before the
    /// current one) until the time (seconds) given with it.
    pub fn with_previous(self, previous: Option<(MacKey, i64)>) -> Self {
        {
            let mut k = self.keys.write();
            k.previous = previous.map(|(k, until)| (std::sync::Arc::new(k), until));
        }
        self
    }

    /// Use `current` for new tokens; keep verifying tokens MACed with
    /// `previous` until the time (seconds) given with it.
    pub fn set_keys(&self, current: MacKey, previous: Option<(MacKey, i64)>) {
        *self.keys.write() = TokenKeys {
            current: std::sync::Arc::new(current),
            previous: previous.map(|(k, until)| (std::sync::Arc::new(k), until)),
        };
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
            role: None,
            patient: None,
            fam: None,
            auth_time: None,
            amr: None,
            acr: None,
            cnf: None,
        };
        self.sign(claims)
    }

    /// A token for a signed-in user acting through an app. `scope` is the
    /// granted scope string (resource and SMART scopes).
    pub fn issue_user(
        &self,
        client_id: &str,
        scope: &str,
        user: &UserContext,
        now: i64,
    ) -> Result<(String, AccessClaims), AuthError> {
        let mfa = user.amr.iter().any(|m| m != "pwd");
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: user.user_id.clone(),
            aud: self.audience.clone(),
            exp: now + self.lifetime,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.to_owned(),
            client_id: client_id.to_owned(),
            role: Some(user.role.clone()),
            patient: user.patient.clone(),
            fam: Some(user.family.clone()),
            auth_time: Some(user.auth_time),
            amr: Some(user.amr.clone()),
            acr: Some(if mfa { ACR_MFA } else { ACR_PWD }.to_owned()),
            cnf: None,
        };
        self.sign(claims)
    }

    /// [`TokenIssuer::issue`] bound to a TLS client certificate (RFC 8705).
    pub fn issue_bound(
        &self,
        client_id: &str,
        scopes: &ScopeSet,
        now: i64,
        thumbprint: &str,
    ) -> Result<(String, AccessClaims), AuthError> {
        let (_, mut claims) = self.issue(client_id, scopes, now)?;
        claims.cnf = Some(Confirmation {
            x5t_s256: thumbprint.to_owned(),
        });
        self.sign(claims)
    }

    /// [`TokenIssuer::issue_user`] bound to a TLS client certificate.
    pub fn issue_user_bound(
        &self,
        client_id: &str,
        scope: &str,
        user: &UserContext,
        now: i64,
        thumbprint: &str,
    ) -> Result<(String, AccessClaims), AuthError> {
        let (_, mut claims) = self.issue_user(client_id, scope, user, now)?;
        claims.cnf = Some(Confirmation {
            x5t_s256: thumbprint.to_owned(),
        });
        self.sign(claims)
    }

    fn sign(&self, claims: AccessClaims) -> Result<(String, AccessClaims), AuthError> {
        let payload =
            serde_json::to_vec(&claims).map_err(|_| AuthError::InvalidRequest("claims"))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let key = self.keys.read().current.clone();
        let tag = key.sign(signing_input.as_bytes());
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
        let (current, previous) = {
            let k = self.keys.read();
            (k.current.clone(), k.previous.clone())
        };
        let by_previous = || {
            previous
                .as_ref()
                .is_some_and(|(k, until)| now <= *until && k.verify(signing_input.as_bytes(), &tag))
        };
        if !current.verify(signing_input.as_bytes(), &tag) && !by_previous() {
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

/// Sign an OpenID Connect `id_token` (compact JWS, `ES256`) with `key`.
pub fn sign_id_token(
    key: &phylax_crypto::signing::SigningKey,
    claims: &serde_json::Value,
) -> Result<String, AuthError> {
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": key.kid()});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes())?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// The public JWK of a signing key.
pub fn public_jwk(key: &phylax_crypto::signing::SigningKey) -> serde_json::Value {
    let (x, y) = key.public_xy();
    serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": key.kid(), "use": "sig", "alg": "ES256"})
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

    /// After a rotation, tokens MACed with the previous key verify until
    /// the time given with it, then not; keys before it never.
    #[test]
    fn rotated_keys_overlap_for_a_token_lifetime() {
        let (t, kek) = issuer();
        let scopes = ScopeSet::parse_lenient("system/Patient.rs");
        let (old, _) = t.issue("c1", &scopes, 1000).unwrap();
        let (k2, _) = MacKey::generate_wrapped(&kek, "token@2").unwrap();
        // Rotate: k2 signs, the key `old` was MACed with stays previous.
        let prev = {
            let k = t.keys.read();
            k.current.clone()
        };
        *t.keys.write() = TokenKeys {
            current: std::sync::Arc::new(k2),
            previous: Some((prev, 1200)),
        };
        assert!(
            t.verify(&old, 1100).is_ok(),
            "previous key, inside the overlap"
        );
        let (new, _) = t.issue("c1", &scopes, 1100).unwrap();
        assert!(t.verify(&new, 1101).is_ok());
        assert!(t.verify(&old, 1201).is_err(), "overlap over");
        let (k3, _) = MacKey::generate_wrapped(&kek, "token@3").unwrap();
        t.set_keys(k3, None);
        assert!(
            t.verify(&new, 1102).is_err(),
            "no previous: old keys verify nothing"
        );
    }

    /// A bound token carries the thumbprint, under the MAC: it cannot be
    /// removed or changed without breaking the token.
    #[test]
    fn certificate_bound_tokens_carry_their_thumbprint() {
        let (t, _) = issuer();
        let scopes = ScopeSet::parse_lenient("system/Patient.rs");
        let (tok, c) = t.issue_bound("c1", &scopes, 1000, "abc").unwrap();
        assert_eq!(c.cnf.as_ref().unwrap().x5t_s256, "abc");
        let v = t.verify(&tok, 1001).unwrap();
        assert_eq!(v.cnf, c.cnf);
        let payload = tok.split('.').nth(1).unwrap();
        let json = URL_SAFE_NO_PAD.decode(payload).unwrap();
        assert!(String::from_utf8(json)
            .unwrap()
            .contains(r#""cnf":{"x5t#S256":"abc"}"#));
        let (plain, _) = t.issue("c1", &scopes, 1000).unwrap();
        assert!(t.verify(&plain, 1001).unwrap().cnf.is_none());
        // Stripping the claim means forging the MAC.
        let unbound = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap()
                .replace(r#","cnf":{"x5t#S256":"abc"}"#, ""),
        );
        let parts: Vec<&str> = tok.split('.').collect();
        let forged = format!("{}.{unbound}.{}", parts[0], parts[2]);
        assert!(t.verify(&forged, 1001).is_err());
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
    fn user_tokens_carry_context_and_step_up() {
        let (t, _) = issuer();
        let u = UserContext {
            user_id: "u1".into(),
            role: "clinician".into(),
            patient: None,
            family: "f1".into(),
            auth_time: 900,
            amr: vec!["pwd".into(), "otp".into()],
        };
        let (tok, c) = t.issue_user("app", "user/*.rs openid", &u, 1000).unwrap();
        let v = t.verify(&tok, 1001).unwrap();
        assert_eq!(v, c);
        assert_eq!(
            (v.sub.as_str(), v.role.as_deref(), v.fam.as_deref()),
            ("u1", Some("clinician"), Some("f1"))
        );
        assert!(v.recent_mfa(1001, 300));
        assert!(!v.recent_mfa(1300, 300), "MFA older than five minutes");
        let pwd_only = UserContext {
            amr: vec!["pwd".into()],
            ..u
        };
        let (_, c2) = t.issue_user("app", "user/*.rs", &pwd_only, 1000).unwrap();
        assert!(!c2.recent_mfa(1001, 300));
        // Client tokens carry none of it.
        let (_, c3) = t
            .issue("c1", &ScopeSet::parse_lenient("system/*.rs"), 1000)
            .unwrap();
        assert!(c3.role.is_none() && !c3.recent_mfa(1001, 300));
    }

    #[test]
    fn lifetime_is_capped() {
        let (kek, _) = Kek::generate().unwrap();
        let (k, _) = MacKey::generate_wrapped(&kek, "token").unwrap();
        let t = TokenIssuer::new(k, "i".into(), "a".into(), 86_400);
        assert_eq!(t.lifetime(), MAX_LIFETIME_SECS);
    }
}
