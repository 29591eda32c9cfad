//! Password hashing: Argon2id, parameters stored with each hash (PHC
//! string format) and upgraded on the next successful sign-in.
//!
//! Threats handled:
//! - **Offline cracking of a stolen database**: Argon2id with at least
//!   OWASP's minimum (m = 19 MiB, t = 2, p = 1); weaker settings are refused
//!   at construction, so a configuration typo cannot weaken new hashes.
//! - **Account enumeration by timing**: [`PasswordHasher::verify`] with no
//!   stored hash verifies against a dummy hash made with the same
//!   parameters, so an unknown user costs what a known one does.
//! - **Unicode ambiguity**: passwords are NFKC-normalised before hashing
//!   (NIST SP 800-63B §3.1.1.2), so the same password typed on two keyboards
//!   is the same password.
//!
//! Hashing is deliberately slow (tens of milliseconds optimised): callers
//! on an async runtime must run it on a blocking thread.

use crate::secret::Secret;
use crate::{random_array, CryptoError};
use argon2::password_hash::{PasswordHash, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::fmt;
use unicode_normalization::UnicodeNormalization;

/// A password as typed, NFKC-normalised. Zeroized on drop, no `Display`,
/// redacted `Debug`.
pub struct Password(Secret);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

impl Password {
    pub fn new(typed: &str) -> Password {
        Password(Secret::new(typed.nfkc().collect::<String>().into_bytes()))
    }

    /// Length in Unicode code points (what NIST's length rules count).
    pub fn chars(&self) -> usize {
        // The bytes came from a `String` in `new`.
        std::str::from_utf8(self.0.expose()).map_or(0, |s| s.chars().count())
    }

    /// The normalised text, for the strength estimator. Do not log it.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(self.0.expose()).unwrap_or("")
    }
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordParams {
    m_kib: u32,
    t: u32,
    p: u32,
}

impl PasswordParams {
    /// OWASP Password Storage Cheat Sheet minimum for Argon2id.
    pub const MINIMUM: PasswordParams = PasswordParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };

    /// Refuses anything below [`PasswordParams::MINIMUM`] in memory or time.
    pub fn new(m_kib: u32, t: u32, p: u32) -> Result<PasswordParams, CryptoError> {
        if m_kib < Self::MINIMUM.m_kib || t < Self::MINIMUM.t || p == 0 || p > 16 {
            return Err(CryptoError::WeakParameters);
        }
        if m_kib > 4 * 1024 * 1024 || t > 64 {
            return Err(CryptoError::WeakParameters);
        }
        Ok(PasswordParams { m_kib, t, p })
    }

    pub fn m_kib(&self) -> u32 {
        self.m_kib
    }
    pub fn t(&self) -> u32 {
        self.t
    }
    pub fn p(&self) -> u32 {
        self.p
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Correct password. `rehash` is true when the stored hash used weaker
    /// parameters (or another algorithm) than the current configuration:
    /// hash the password again and store the new hash.
    Match {
        rehash: bool,
    },
    Mismatch,
}

/// Hashes and verifies passwords with fixed parameters.
pub struct PasswordHasher {
    params: PasswordParams,
    argon: Argon2<'static>,
    dummy: String,
}

impl fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// Builds the hasher and its dummy hash (one Argon2id run).
    pub fn new(params: PasswordParams) -> Result<PasswordHasher, CryptoError> {
        let p = Params::new(params.m_kib, params.t, params.p, None)
            .map_err(|_| CryptoError::WeakParameters)?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, p);
        let mut h = PasswordHasher {
            params,
            argon,
            dummy: String::new(),
        };
        let junk = random_array::<24>()?;
        h.dummy = h.hash_bytes(&junk)?;
        Ok(h)
    }

    pub fn params(&self) -> PasswordParams {
        self.params
    }

    /// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    pub fn hash(&self, pw: &Password) -> Result<String, CryptoError> {
        self.hash_bytes(pw.0.expose())
    }

    fn hash_bytes(&self, pw: &[u8]) -> Result<String, CryptoError> {
        use argon2::password_hash::PasswordHasher as _;
        let salt_bytes = random_array::<16>()?;
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| CryptoError::Random)?;
        self.argon
            .hash_password(pw, &salt)
            .map(|h| h.to_string())
            .map_err(|_| CryptoError::WeakParameters)
    }

    /// Verify `pw` against `stored`. With `stored = None` (unknown user, or
    /// a user without a password) the dummy hash is verified instead and the
    /// answer is `Mismatch`, at the same cost. A stored string that does not
    /// parse is a mismatch, never a panic.
    pub fn verify(&self, stored: Option<&str>, pw: &Password) -> Verified {
        let (phc, real) = match stored {
            Some(s) => (s, true),
            None => (self.dummy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(phc) else {
            // Still spend the time, so a corrupt row is not a timing oracle.
            let _ = self.check(&self.dummy, pw);
            return Verified::Mismatch;
        };
        // The hash's own parameters are used for checking (a verifier built
        // from them), so old hashes keep verifying after an upgrade.
        let ok = self.check_parsed(&parsed, pw);
        if !(ok && real) {
            return Verified::Mismatch;
        }
        Verified::Match {
            rehash: self.weaker(&parsed),
        }
    }

    fn check(&self, phc: &str, pw: &Password) -> bool {
        PasswordHash::new(phc).is_ok_and(|p| self.check_parsed(&p, pw))
    }

    fn check_parsed(&self, parsed: &PasswordHash<'_>, pw: &Password) -> bool {
        Argon2::default()
            .verify_password(pw.0.expose(), parsed)
            .is_ok()
    }

    fn weaker(&self, parsed: &PasswordHash<'_>) -> bool {
        if parsed.algorithm.as_str() != "argon2id" {
            return true;
        }
        match Params::try_from(parsed) {
            Ok(p) => {
                p.m_cost() < self.params.m_kib
                    || p.t_cost() < self.params.t
                    || p.p_cost() != self.params.p
            }
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> PasswordHasher {
        PasswordHasher::new(PasswordParams::MINIMUM).unwrap()
    }

    #[test]
    fn refuses_weak_parameters() {
        assert!(PasswordParams::new(8 * 1024, 2, 1).is_err());
        assert!(PasswordParams::new(19 * 1024, 1, 1).is_err());
        assert!(PasswordParams::new(19 * 1024, 2, 0).is_err());
        assert!(PasswordParams::new(64 * 1024, 3, 1).is_ok());
    }

    #[test]
    fn hash_verify_wrong_password_and_phc_format() {
        let h = hasher();
        let stored = h
            .hash(&Password::new("correct horse battery staple"))
            .unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{stored}"
        );
        assert!(!stored.contains("correct"));
        assert_eq!(
            h.verify(
                Some(&stored),
                &Password::new("correct horse battery staple")
            ),
            Verified::Match { rehash: false }
        );
        assert_eq!(
            h.verify(Some(&stored), &Password::new("correct horse battery stapl")),
            Verified::Mismatch
        );
        // Salted: the same password never gives the same hash.
        assert_ne!(
            stored,
            h.hash(&Password::new("correct horse battery staple"))
                .unwrap()
        );
        // Garbage and unknown users are mismatches, not panics.
        assert_eq!(
            h.verify(Some("not a hash"), &Password::new("x")),
            Verified::Mismatch
        );
        assert_eq!(h.verify(None, &Password::new("x")), Verified::Mismatch);
        // Change one character inside the hash (not the last: its low bits
        // are padding).
        let i = stored.len() - 10;
        let c = if &stored[i..=i] == "A" { "B" } else { "A" };
        let tampered = format!("{}{c}{}", &stored[..i], &stored[i + 1..]);
        assert_eq!(
            h.verify(
                Some(&tampered),
                &Password::new("correct horse battery staple")
            ),
            Verified::Mismatch
        );
    }

    #[test]
    fn unicode_is_normalised() {
        let h = hasher();
        // "é" precomposed vs e + combining acute; fullwidth vs ASCII digits.
        let stored = h
            .hash(&Password::new("caf\u{e9} \u{ff11}\u{ff12}3 long enough"))
            .unwrap();
        assert!(matches!(
            h.verify(Some(&stored), &Password::new("cafe\u{301} 123 long enough")),
            Verified::Match { .. }
        ));
        assert_eq!(Password::new("cafe\u{301}").chars(), 4);
    }

    #[test]
    fn weaker_hashes_ask_for_rehash() {
        let old = hasher();
        let stored = old.hash(&Password::new("a long passphrase here")).unwrap();
        let new = PasswordHasher::new(PasswordParams::new(20 * 1024, 2, 1).unwrap()).unwrap();
        assert_eq!(
            new.verify(Some(&stored), &Password::new("a long passphrase here")),
            Verified::Match { rehash: true }
        );
    }

    #[test]
    fn debug_is_redacted() {
        assert!(!format!("{:?}", Password::new("hunter2hunter2")).contains("hunter2"));
    }
}
