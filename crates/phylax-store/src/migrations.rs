//! Versioned schema migrations. Each backend has its own SQL for the same
//! logical schema; versions are recorded in `schema_migrations` and applied
//! in order at start, inside a transaction (and, on PostgreSQL, under an
//! advisory lock so that several nodes starting at once apply them once).
//!
//! Never edit a released migration: add a new one.

/// (version, SQL) for SQLite.
pub const SQLITE: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE wrapped_keys (scope TEXT PRIMARY KEY, wrapped BLOB NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE resource_versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    key_scope TEXT NOT NULL,
    body BLOB,
    UNIQUE (rtype, id, version)
);
CREATE INDEX resource_versions_type_seq ON resource_versions (rtype, seq);
CREATE TABLE resources (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (rtype, id)
);
CREATE INDEX resources_type_seq ON resources (rtype, deleted, seq);
CREATE TABLE clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    jwks TEXT NOT NULL,
    disabled INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE used_jti (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX used_jti_expires ON used_jti (expires_at);
"#,
)];

/// (version, SQL) for PostgreSQL.
pub const POSTGRES: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE wrapped_keys (scope TEXT PRIMARY KEY, wrapped BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE resource_versions (
    seq BIGSERIAL PRIMARY KEY,
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL,
    key_scope TEXT NOT NULL,
    body BYTEA,
    UNIQUE (rtype, id, version)
);
CREATE INDEX resource_versions_type_seq ON resource_versions (rtype, seq);
CREATE TABLE resources (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL,
    PRIMARY KEY (rtype, id)
);
CREATE INDEX resources_type_seq ON resources (rtype, deleted, seq);
CREATE TABLE clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    jwks TEXT NOT NULL,
    disabled BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE used_jti (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX used_jti_expires ON used_jti (expires_at);
"#,
)];
