//! Key material and authenticated encryption for Phylax. No other crate
//! handles raw key bytes: they get opaque handles from here.
//!
//! # Layout
//! - [`kek`]: the key-encryption key (KEK) in numbered generations, from a
//!   0600 key file, an environment variable or a PKCS#11 HSM (where it is
//!   a non-extractable key); it wraps every other key and never touches
//!   the database.
//! - [`datakey`]: data keys (per patient compartment, per tenant) and the
//!   record seal: AES-256-GCM under a fresh per-record subkey, with additional
//!   data that binds a ciphertext to its resource type, id and version.
//! - [`blind`]: keyed blind indexes for searching values that are never
//!   stored in plaintext.
//! - [`mac`]: HMAC-SHA-256 keys for tokens and tamper-proof cursors, with
//!   constant-time verification.
//! - [`password`]: Argon2id password hashes (PHC strings, OWASP minimum
//!   enforced, upgrade on sign-in, equal cost for unknown users).
//! - [`totp`]: RFC 6238 one-time passwords with a ±1 step window and the
//!   matched step returned for replay refusal.
//! - [`signing`]: ECDSA P-256 (`ES256`) keys for `id_token`s, wrapped by
//!   the KEK, public halves published as a JWKS.
//! - [`log_signing`]: the Ed25519 key that signs audit-log checkpoints,
//!   separate from data keys and token keys.
//! - [`archive`]: age encryption of backup archives, streaming, to the
//!   same X25519 recipients as the KEK escrow.
//! - [`secret`]: a zeroizing byte container with a redacted `Debug`.
//!
//! Primitives come from `ring` (audited, AES-NI accelerated), the
//! RustCrypto `argon2` crate and, for the KEK escrow, the `age` crate (the
//! file format the `age` tool reads); nothing here implements a primitive
//! itself.

pub mod archive;
pub mod blind;
pub mod datakey;
pub mod kek;
pub mod log_signing;
pub mod mac;
pub mod password;
pub mod secret;
pub mod signing;
pub mod totp;

pub use blind::BlindIndexKey;
pub use datakey::DataKey;
pub use kek::Kek;
pub use mac::MacKey;
pub use secret::Secret;

/// Errors from key handling and decryption. Messages never contain key
/// bytes, key ids or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {0} must not be readable by group or others (chmod 600)")]
    KeyFilePermissions(String),
    #[error("key file could not be read: {0}")]
    KeyFileIo(String),
    #[error("key file already exists: {0}")]
    KeyFileExists(String),
    #[error("key material is malformed")]
    MalformedKey,
    #[error("decryption failed: wrong key, or the data was altered or moved")]
    Decrypt,
    #[error("password hashing parameters below the OWASP minimum or out of range")]
    WeakParameters,
    #[error("the system random number generator failed")]
    Random,
    #[error("HSM: {0}")]
    Hsm(String),
    #[error("no KEK: the key file, PHYLAX_KEK and the HSM hold no generation")]
    NoKek,
    #[error("KEK generation {0} is held by two providers")]
    DuplicateGeneration(u32),
    #[error("KEK generation {0} is not available (retired, or another node added it and this one cannot see it)")]
    UnknownGeneration(u32),
    #[error("the KEK comes from PHYLAX_KEK, which only the operator can change: add the next generation there (docs/KEYS.md)")]
    EnvironmentKek,
    #[error("refusing to retire the only KEK generation")]
    LastGeneration,
    #[error("KEK generation {0} is held by an HSM and cannot leave it: escrow it with the HSM's own backup (docs/KEYS.md)")]
    HsmEscrow(u32),
    #[error("escrow: {0}")]
    Escrow(String),
    #[error("backup archive: {0}")]
    Archive(String),
}

/// Fill a fixed-size array from the OS CSPRNG.
pub fn random_array<const N: usize>() -> Result<[u8; N], CryptoError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError::Random)?;
    Ok(out)
}
