//! Tables and the services that own them: keys, resources and their search
//! index, accounts, grants, revocations, the breach register, blocked
//! addresses.
//!
//! # Layout
//! - [`keyring`]: data keys per patient compartment, created on demand and
//!   cached unwrapped in memory; MAC keys for tokens and cursors.
//! - [`key_events`]: other processes' key events (KEK rotation, erasure),
//!   the rows of keys that rotate in generations,
//!   and how a server follows them.
//! - [`auth_keys`]: the sign-in MAC key in generations (lookups try every
//!   live one; stored hashes name theirs).
//! - [`cursor_keys`]: paging-cursor keys in generations (the current and
//!   the previous one open cursors).
//! - [`search`]: search index entries on write (keyed blind hashes) and
//!   search parameters turned into store conditions on read.
//! - [`repo`]: resources over the store: seal on write, open on read,
//!   versioning rules. The only code that turns sealed rows into JSON.
//! - [`accounts`]: users: enrollment links, passwords, TOTP, recovery
//!   codes, lockout, ending sessions (shared by the CLI and sign-in pages).
//! - [`clients`]: registered clients as the token endpoint and sign-in
//!   pages see them.
//! - [`grants`]: bearer grants (codes, sessions, refresh tokens) stored as
//!   keyed hashes with sealed details.
//! - [`revocations`]: what every node refuses, refreshed from the shared
//!   feed every few seconds.
//! - [`incidents`]: the breach register, incidents as sealed append-only
//!   steps.
//! - [`blocks`]: network addresses refused everywhere (containment).

pub mod accounts;
pub mod auth_keys;
pub mod blocks;
pub mod clients;
pub mod cursor_keys;
pub mod grants;
pub mod incidents;
pub mod key_events;
pub mod keyring;
pub mod repo;
pub mod revocations;
pub mod search;
