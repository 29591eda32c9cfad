//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP).
//!
//! Defaults are what every authenticator app understands: HMAC-SHA-1, six
//! digits, 30-second steps. Verification accepts the current step and one
//! on either side (clock drift), compares in constant time, and returns the
//! step that matched so the caller can refuse any step at or before the last
//! one accepted: **each code works at most once**.
//!
//! SHA-1 here is HMAC-SHA-1 as RFC 6238 specifies; its collision weakness
//! does not apply to HMAC, and apps that only speak SHA-1 are the common case.

use crate::secret::Secret;
use crate::{random_array, CryptoError};
use ring::hmac;
use std::fmt;
use subtle::ConstantTimeEq;

/// The HMAC behind the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotpAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl TotpAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            TotpAlgorithm::Sha1 => "SHA1",
            TotpAlgorithm::Sha256 => "SHA256",
            TotpAlgorithm::Sha512 => "SHA512",
        }
    }

    fn ring(self) -> hmac::Algorithm {
        match self {
            TotpAlgorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            TotpAlgorithm::Sha256 => hmac::HMAC_SHA256,
            TotpAlgorithm::Sha512 => hmac::HMAC_SHA512,
        }
    }
}

/// Steps on either side of now that are still accepted.
pub const SKEW_STEPS: u64 = 1;

/// A TOTP generator/verifier for one enrolled secret.
pub struct Totp {
    secret: Secret,
    key: hmac::Key,
    alg: TotpAlgorithm,
    digits: u32,
    period: u64,
}

impl fmt::Debug for Totp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Totp")
            .field("alg", &self.alg)
            .field("digits", &self.digits)
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

impl Totp {
    /// `digits` 6..=8, `period` 15..=120 s, secret at least 16 bytes
    /// (RFC 4226 §4 asks for 128 bits; 160 recommended).
    pub fn new(
        secret: Secret,
        alg: TotpAlgorithm,
        digits: u32,
        period: u64,
    ) -> Result<Totp, CryptoError> {
        if !(6..=8).contains(&digits) || !(15..=120).contains(&period) || secret.len() < 16 {
            return Err(CryptoError::MalformedKey);
        }
        let key = hmac::Key::new(alg.ring(), secret.expose());
        Ok(Totp {
            secret,
            key,
            alg,
            digits,
            period,
        })
    }

    /// A fresh 160-bit secret with the app-compatible defaults.
    pub fn generate() -> Result<Totp, CryptoError> {
        let mut raw = random_array::<20>()?;
        let t = Totp::new(Secret::new(raw.to_vec()), TotpAlgorithm::Sha1, 6, 30);
        zeroize::Zeroize::zeroize(&mut raw);
        t
    }

    /// Rebuild from stored secret bytes with the defaults.
    pub fn from_secret(secret: Secret) -> Result<Totp, CryptoError> {
        Totp::new(secret, TotpAlgorithm::Sha1, 6, 30)
    }

    pub fn algorithm(&self) -> TotpAlgorithm {
        self.alg
    }
    pub fn digits(&self) -> u32 {
        self.digits
    }
    pub fn period(&self) -> u64 {
        self.period
    }

    /// The raw secret, for sealing at rest. Never log it.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The secret in RFC 4648 base32 without padding, as `otpauth://` URIs
    /// carry it. This is the secret itself: show it once, at enrollment.
    pub fn secret_base32(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(self.secret.expose())
    }

    /// The time step containing `unix_secs` (T0 = 0).
    pub fn step(&self, unix_secs: u64) -> u64 {
        unix_secs / self.period
    }

    /// The code for a step (RFC 4226 dynamic truncation).
    pub fn code_for_step(&self, step: u64) -> String {
        let tag = hmac::sign(&self.key, &step.to_be_bytes());
        let h = tag.as_ref();
        // The offset is the low nibble of the last byte; every HMAC output
        // here is ≥ 20 bytes, so offset + 3 is in range.
        let o = (h[h.len() - 1] & 0x0f) as usize;
        let bin = (u32::from(h[o] & 0x7f) << 24)
            | (u32::from(h[o + 1]) << 16)
            | (u32::from(h[o + 2]) << 8)
            | u32::from(h[o + 3]);
        let v = bin % 10u32.pow(self.digits);
        format!("{v:0width$}", width = self.digits as usize)
    }

    pub fn code_at(&self, unix_secs: u64) -> String {
        self.code_for_step(self.step(unix_secs))
    }

    /// Check a typed code at time `now`. Accepts steps `now-1..=now+1`
    /// that are strictly after `last_used` (the last step this secret
    /// accepted), and returns the step that matched so the caller can store
    /// it. Every candidate is compared, in constant time, whatever matches.
    pub fn verify(&self, typed: &str, now: u64, last_used: Option<u64>) -> Option<u64> {
        let typed: String = typed.chars().filter(|c| !c.is_whitespace()).collect();
        if typed.len() != self.digits as usize || !typed.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let cur = self.step(now);
        let mut found: Option<u64> = None;
        for step in cur.saturating_sub(SKEW_STEPS)..=cur + SKEW_STEPS {
            let ok: bool = self
                .code_for_step(step)
                .as_bytes()
                .ct_eq(typed.as_bytes())
                .into();
            if ok && last_used.is_none_or(|l| step > l) && found.is_none() {
                found = Some(step);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_replay() {
        let t = Totp::generate().unwrap();
        let now = 1_800_000_015;
        let code = t.code_at(now);
        let step = t.verify(&code, now, None).expect("current code");
        assert_eq!(step, t.step(now));
        assert_eq!(t.verify(&code, now, Some(step)), None, "replay refused");
        // One step of drift either way is fine, two is not.
        assert!(t.verify(&t.code_at(now - 30), now, None).is_some());
        assert!(t.verify(&t.code_at(now + 30), now, None).is_some());
        assert!(t.verify(&t.code_at(now - 60), now, None).is_none());
        assert!(t.verify(&t.code_at(now + 60), now, None).is_none());
        // A code older than the last accepted one is refused even in window.
        assert!(t
            .verify(&t.code_at(now - 30), now, Some(t.step(now)))
            .is_none());
        // Malformed input.
        for bad in ["", "12345", "1234567", "12a456", "１２３４５６"] {
            assert!(t.verify(bad, now, None).is_none(), "{bad}");
        }
        // Spaces as apps display them ("123 456") are fine.
        let spaced = format!("{} {}", &code[..3], &code[3..]);
        assert!(t.verify(&spaced, now, None).is_some());
    }

    #[test]
    fn rejects_short_secrets_and_odd_settings() {
        assert!(Totp::new(Secret::new(vec![1; 10]), TotpAlgorithm::Sha1, 6, 30).is_err());
        assert!(Totp::new(Secret::new(vec![1; 20]), TotpAlgorithm::Sha1, 5, 30).is_err());
        assert!(Totp::new(Secret::new(vec![1; 20]), TotpAlgorithm::Sha1, 6, 1).is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let t = Totp::generate().unwrap();
        assert!(!format!("{t:?}").contains(&t.secret_base32()));
    }
}
