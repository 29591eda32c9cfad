//! Which passwords may be chosen (NIST SP 800-63B rev. 4 §3.1.1.2).
//!
//! - Length, in Unicode code points after NFKC normalisation: at least 15
//!   while the account has no second factor (the password is then the only
//!   factor), at least the configured minimum once MFA is enrolled (default
//!   12, never below NIST's floor of 8), at most 256 (NIST: allow at least
//!   64).
//! - No composition rules and no periodic change: they make passwords
//!   weaker in practice.
//! - Refuse passwords an attacker would guess early: the `zxcvbn` estimator
//!   (dictionaries of common passwords, names, keyboard patterns, dates),
//!   given context words (the username, "phylax", the service name) so that
//!   `alice.phylax2024` does not pass for Alice. A score below 3 ("safely
//!   unguessable: moderate protection from offline slow-hash scenario") is
//!   refused.
//!
//! Messages say what to change, never echo the password.

use phylax_crypto::password::Password;

/// NIST's absolute floor for a password used with a second factor.
pub const NIST_FLOOR: usize = 8;
/// Minimum while the password is the only factor.
pub const SINGLE_FACTOR_MIN: usize = 15;
/// Longest accepted password (code points).
pub const MAX_LEN: usize = 256;
/// Lowest acceptable zxcvbn score (0–4).
pub const MIN_SCORE: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    min_with_mfa: usize,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy { min_with_mfa: 12 }
    }
}

/// Why a password was refused; `Display` is shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordProblem {
    #[error("use at least {0} characters")]
    TooShort(usize),
    #[error("use at most {MAX_LEN} characters")]
    TooLong,
    #[error("this password is too easy to guess (common words, names, patterns or your username); a few unrelated words make a strong passphrase")]
    Guessable,
}

impl PasswordPolicy {
    /// `min_with_mfa` below NIST's floor of 8 is raised to 8.
    pub fn new(min_with_mfa: usize) -> PasswordPolicy {
        PasswordPolicy {
            min_with_mfa: min_with_mfa.clamp(NIST_FLOOR, SINGLE_FACTOR_MIN),
        }
    }

    pub fn min_len(&self, has_mfa: bool) -> usize {
        if has_mfa {
            self.min_with_mfa
        } else {
            SINGLE_FACTOR_MIN
        }
    }

    /// Check a new password. `context` holds words an attacker would try
    /// for this account (username, service name).
    pub fn check(
        &self,
        pw: &Password,
        has_mfa: bool,
        context: &[&str],
    ) -> Result<(), PasswordProblem> {
        let n = pw.chars();
        let min = self.min_len(has_mfa);
        if n < min {
            return Err(PasswordProblem::TooShort(min));
        }
        if n > MAX_LEN {
            return Err(PasswordProblem::TooLong);
        }
        let text = pw.expose();
        let lower = text.to_lowercase();
        // The whole password being a context word plus decoration is caught
        // by zxcvbn's user-input dictionary; this catches it even where its
        // tokenizer would not (e.g. the username repeated).
        for w in context.iter().filter(|w| w.chars().count() >= 4) {
            let w = w.to_lowercase();
            if lower
                .replace(&w, "")
                .chars()
                .filter(|c| c.is_alphanumeric())
                .count()
                < 8
            {
                return Err(PasswordProblem::Guessable);
            }
        }
        // zxcvbn's cost grows with length; past 100 characters a password
        // that passed the checks above is not guessable by enumeration.
        let sample: String = text.chars().take(100).collect();
        let est = zxcvbn::zxcvbn(&sample, context);
        if (est.score() as u8) < MIN_SCORE {
            return Err(PasswordProblem::Guessable);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pw: &str, mfa: bool) -> Result<(), PasswordProblem> {
        PasswordPolicy::default().check(&Password::new(pw), mfa, &["alice", "phylax"])
    }

    #[test]
    fn lengths_follow_nist() {
        // 13 characters, strong: fine with MFA, too short without.
        assert_eq!(
            check("vX9#qLm2!rT7w", false),
            Err(PasswordProblem::TooShort(15))
        );
        assert_eq!(check("vX9#qLm2!rT7w", true), Ok(()));
        assert_eq!(
            check("vX9#qLm2!r", true),
            Err(PasswordProblem::TooShort(12))
        );
        assert_eq!(
            PasswordPolicy::new(4).min_len(true),
            8,
            "never below NIST's floor"
        );
        assert_eq!(PasswordPolicy::new(40).min_len(true), 15);
        // 64 is allowed; 257 is not.
        let long: String = "correct horse battery staple "
            .repeat(3)
            .chars()
            .take(64)
            .collect();
        assert_eq!(check(&long, false), Ok(()));
        assert_eq!(
            check(&"ab1!".repeat(65), false),
            Err(PasswordProblem::TooLong)
        );
    }

    #[test]
    fn common_and_contextual_passwords_are_refused() {
        for bad in [
            "passwordpassword",
            "123456789012345",
            "qwertyuiopasdfgh",
            "alicealicealice1",
            "phylaxphylax2024!",
            "iloveyouiloveyou",
        ] {
            assert_eq!(check(bad, false), Err(PasswordProblem::Guessable), "{bad}");
        }
        assert_eq!(check("glacier tulip orbit 47 saffron", false), Ok(()));
    }

    #[test]
    fn unicode_counts_code_points_and_is_allowed() {
        // Seventeen code points, many more bytes.
        assert_eq!(check("Grüße aus Zürich ⛰️🌲 ñandú", false), Ok(()));
        assert_eq!(
            check("ééééééééééééééé", false),
            Err(PasswordProblem::Guessable)
        );
    }
}
