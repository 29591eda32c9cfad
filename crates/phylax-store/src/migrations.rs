//! Versioned schema migrations. Each backend has its own SQL for the same
//! logical schema; versions are recorded in `schema_migrations` and applied
//! in order at start, inside a transaction (and, on PostgreSQL, under an
//! advisory lock so that several nodes starting at once apply them once).
//!
//! Never edit a released migration: add a new one.

/// (version, SQL) for SQLite.
pub const SQLITE: &[(i64, &str)] = &[
    (
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
    ),
    (
        2,
        r#"
-- Search index: keyed blind hashes, time ranges and numbers; never
-- plaintext values (see docs/THREAT_MODEL.md).
CREATE TABLE search_index (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    hash BLOB,
    lo INTEGER,
    hi INTEGER,
    num REAL
);
-- Partial indexes: each entry kind lands in exactly one lookup index (plus
-- the per-resource one used to replace a resource's entries).
CREATE INDEX search_index_hash ON search_index (rtype, param, hash) WHERE hash IS NOT NULL;
CREATE INDEX search_index_lo ON search_index (rtype, param, lo) WHERE lo IS NOT NULL;
CREATE INDEX search_index_num ON search_index (rtype, param, num) WHERE num IS NOT NULL;
CREATE INDEX search_index_resource ON search_index (rtype, id);
"#,
    ),
    (
        3,
        r#"
-- Fixed planner statistics. Blind hashes give ANALYZE nothing useful to
-- learn (and a young database teaches it the wrong shapes), while the
-- shape of the index is structural: a resource has tens of entries, a
-- hash value can be shared by many resources (a common code). With these
-- figures SQLite drives a search from the chosen IN list and checks every
-- other condition through (rtype, id), which keeps selective searches
-- logarithmic. Phylax never runs ANALYZE or PRAGMA optimize over them.
ANALYZE;
DELETE FROM sqlite_stat1;
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('search_index', 'search_index_hash', '10000000 1000000 20000 100'),
    ('search_index', 'search_index_lo', '10000000 1000000 20000 2'),
    ('search_index', 'search_index_num', '10000000 1000000 20000 2'),
    ('search_index', 'search_index_resource', '10000000 1000000 10'),
    ('resources', 'sqlite_autoindex_resources_1', '1000000 100000 1'),
    ('resources', 'resources_type_seq', '1000000 100000 100000 1'),
    ('resource_versions', 'sqlite_autoindex_resource_versions_1', '2000000 200000 2 1'),
    ('resource_versions', 'resource_versions_type_seq', '2000000 200000 1');
"#,
    ),
    (
        4,
        r#"
-- The hash index also carries the resource id: the list a search is driven
-- from is read from the index alone, and "does this resource have this
-- hash" (every other equality condition) is one point lookup, whatever the
-- planner believes about how common the hash is.
DROP INDEX search_index_hash;
CREATE INDEX search_index_hash ON search_index (rtype, param, hash, id) WHERE hash IS NOT NULL;
DELETE FROM sqlite_stat1 WHERE idx = 'search_index_hash';
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('search_index', 'search_index_hash', '10000000 1000000 20000 100 1');
"#,
    ),
    (
        5,
        r#"
-- Per-resource entries by parameter: the lookup every non-driving
-- condition makes for each candidate row ("this resource's date entries").
DROP INDEX search_index_resource;
CREATE INDEX search_index_resource ON search_index (rtype, id, param);
DELETE FROM sqlite_stat1 WHERE idx = 'search_index_resource';
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('search_index', 'search_index_resource', '10000000 1000000 10 3');
"#,
    ),
    (
        6,
        r#"
-- People and their grants (issue 4). Identifying and secret details are
-- sealed above the store; see docs/AUTHENTICATION.md.
ALTER TABLE clients ADD COLUMN redirect_uris TEXT NOT NULL DEFAULT '';
ALTER TABLE clients ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
ALTER TABLE clients ADD COLUMN first_party INTEGER NOT NULL DEFAULT 0;
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username_hash BLOB NOT NULL UNIQUE,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    sealed BLOB NOT NULL,
    rev INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE grants (
    kind TEXT NOT NULL,
    key_hash BLOB NOT NULL,
    family TEXT NOT NULL,
    user_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    PRIMARY KEY (kind, key_hash)
);
CREATE INDEX grants_family ON grants (family);
CREATE INDEX grants_user ON grants (user_id);
CREATE INDEX grants_expires ON grants (expires_at);
CREATE TABLE revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL
);
"#,
    ),
    (
        7,
        r#"
-- The audit log (issue 6; docs/AUDIT.md). Append-only: the triggers refuse
-- deletes and any change except giving an unsealed record its position in
-- the Merkle tree once. (Someone with the database file can drop triggers;
-- the signed checkpoints are what catch that.)
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    leaf_index INTEGER UNIQUE,
    event_id TEXT NOT NULL UNIQUE,
    recorded INTEGER NOT NULL,
    agent TEXT NOT NULL,
    action TEXT NOT NULL,
    subtype TEXT NOT NULL,
    outcome TEXT NOT NULL,
    leaf_hash BLOB NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX audit_unsealed ON audit_log (id) WHERE leaf_index IS NULL;
CREATE INDEX audit_recorded ON audit_log (recorded);
CREATE INDEX audit_agent ON audit_log (agent, id);
CREATE TABLE audit_patient (
    patient BLOB NOT NULL,
    audit_id INTEGER NOT NULL,
    PRIMARY KEY (patient, audit_id)
) WITHOUT ROWID;
CREATE TABLE audit_checkpoints (
    size INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    note TEXT NOT NULL
);
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_log
WHEN OLD.leaf_index IS NOT NULL OR NEW.id IS NOT OLD.id OR NEW.event_id IS NOT OLD.event_id
  OR NEW.recorded IS NOT OLD.recorded OR NEW.agent IS NOT OLD.agent OR NEW.action IS NOT OLD.action
  OR NEW.subtype IS NOT OLD.subtype OR NEW.outcome IS NOT OLD.outcome
  OR NEW.leaf_hash IS NOT OLD.leaf_hash OR NEW.sealed IS NOT OLD.sealed
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_patient_no_delete BEFORE DELETE ON audit_patient
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"#,
    ),
    (
        8,
        r#"
-- Break-the-glass grants (docs/ACCESS_CONTROL.md). A grant's facts never
-- change after it is made; only its review is set, once.
CREATE TABLE break_glass (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    started INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    reviewed_at INTEGER,
    reviewer TEXT,
    review_sealed BLOB
);
CREATE INDEX break_glass_user ON break_glass (user_id, expires);
CREATE INDEX break_glass_open ON break_glass (started) WHERE reviewed_at IS NULL;
CREATE TRIGGER break_glass_no_delete BEFORE DELETE ON break_glass
BEGIN SELECT RAISE(ABORT, 'break-the-glass grants are kept'); END;
CREATE TRIGGER break_glass_review_once BEFORE UPDATE ON break_glass
WHEN OLD.reviewed_at IS NOT NULL OR NEW.id IS NOT OLD.id OR NEW.user_id IS NOT OLD.user_id
  OR NEW.started IS NOT OLD.started OR NEW.expires IS NOT OLD.expires OR NEW.sealed IS NOT OLD.sealed
BEGIN SELECT RAISE(ABORT, 'break-the-glass grants are kept'); END;
"#,
    ),
    (
        9,
        r#"
-- Retention (docs/AUDIT.md): a sealed record's body may be emptied once
-- its retention has passed (the application decides when; `phylax audit
-- verify` flags a body emptied too early). Its leaf hash and every other
-- column stay, so the Merkle tree still verifies.
DROP TRIGGER audit_no_update;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_log
WHEN NOT (
       (OLD.leaf_index IS NULL AND NEW.sealed IS OLD.sealed)
    OR (OLD.leaf_index IS NOT NULL AND NEW.leaf_index IS OLD.leaf_index
        AND length(OLD.sealed) > 0 AND length(NEW.sealed) = 0)
  )
  OR NEW.id IS NOT OLD.id OR NEW.event_id IS NOT OLD.event_id
  OR NEW.recorded IS NOT OLD.recorded OR NEW.agent IS NOT OLD.agent OR NEW.action IS NOT OLD.action
  OR NEW.subtype IS NOT OLD.subtype OR NEW.outcome IS NOT OLD.outcome
  OR NEW.leaf_hash IS NOT OLD.leaf_hash
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"#,
    ),
    (
        10,
        r#"
-- Compact search entries (docs/ARCHITECTURE.md, "The search index").
-- An entry names its resource by the current version's `seq` (unique and
-- increasing, replaced with every version exactly as the entries are) and
-- its parameter by a small number from `search_params`, instead of
-- repeating the type, the 36-character id and the parameter code in the
-- row and in both of its indexes. Entries shrink to about a third, and
-- the rows and the per-resource index of new versions are appended at one
-- end instead of scattered by random ids; only the hash index stays
-- scattered (keyed hashes, by design).
CREATE TABLE search_params (
    pid INTEGER PRIMARY KEY,
    rtype TEXT NOT NULL,
    param TEXT NOT NULL,
    UNIQUE (rtype, param)
);
CREATE TABLE search_entries (
    seq INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    hash BLOB,
    lo INTEGER,
    hi INTEGER,
    num REAL
);
INSERT INTO search_params (rtype, param)
    SELECT DISTINCT rtype, param FROM search_index ORDER BY rtype, param;
INSERT INTO search_entries (seq, pid, hash, lo, hi, num)
    SELECT r.seq, p.pid, i.hash, i.lo, i.hi, i.num
    FROM search_index i
    JOIN resources r ON r.rtype = i.rtype AND r.id = i.id
    JOIN search_params p ON p.rtype = i.rtype AND p.param = i.param
    ORDER BY r.seq;
DROP TABLE search_index;
CREATE INDEX search_entries_hash ON search_entries (pid, hash, seq) WHERE hash IS NOT NULL;
CREATE INDEX search_entries_lo ON search_entries (pid, lo) WHERE lo IS NOT NULL;
CREATE INDEX search_entries_num ON search_entries (pid, num) WHERE num IS NOT NULL;
CREATE INDEX search_entries_seq ON search_entries (seq, pid);
CREATE UNIQUE INDEX resources_seq ON resources (seq);
-- Fixed statistics, as in migration 3 (the same shapes under new names).
DELETE FROM sqlite_stat1 WHERE tbl = 'search_index';
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('search_entries', 'search_entries_hash', '10000000 20000 100 1'),
    ('search_entries', 'search_entries_lo', '10000000 20000 2'),
    ('search_entries', 'search_entries_num', '10000000 20000 2'),
    ('search_entries', 'search_entries_seq', '10000000 10 3'),
    ('resources', 'resources_seq', '1000000 1');
"#,
    ),
    (
        11,
        r#"
-- Tree positions in a narrow table of their own (docs/AUDIT.md,
-- "Storage"). The sealer used to give each record its position with an
-- UPDATE of the record: the ~2 KiB row and its indexes were written a
-- second time (a quarter of the audit writer's time under load) and, on
-- PostgreSQL, every record left a dead tuple for autovacuum. Now the sealer
-- inserts (position, record) pairs, and records waiting for a position are
-- listed in `audit_pending`, which it empties. `audit_log.leaf_index`
-- keeps the positions of records sealed before this migration (copied
-- here) and stays NULL for later ones: `audit_leaf` is the authority.
CREATE TABLE audit_leaf (
    leaf_index INTEGER PRIMARY KEY,
    audit_id INTEGER NOT NULL UNIQUE
);
INSERT INTO audit_leaf (leaf_index, audit_id)
    SELECT leaf_index, id FROM audit_log WHERE leaf_index IS NOT NULL ORDER BY leaf_index;
CREATE TABLE audit_pending (audit_id INTEGER PRIMARY KEY);
INSERT INTO audit_pending (audit_id) SELECT id FROM audit_log WHERE leaf_index IS NULL;
DROP INDEX audit_unsealed;
CREATE TRIGGER audit_leaf_no_delete BEFORE DELETE ON audit_leaf
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_leaf_no_update BEFORE UPDATE ON audit_leaf
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
-- The only change a record may still see: retention emptying the body of
-- a record that is in the tree (migration 9).
DROP TRIGGER audit_no_update;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_log
WHEN NOT (length(OLD.sealed) > 0 AND length(NEW.sealed) = 0
          AND EXISTS (SELECT 1 FROM audit_leaf WHERE audit_id = OLD.id))
  OR NEW.leaf_index IS NOT OLD.leaf_index
  OR NEW.id IS NOT OLD.id OR NEW.event_id IS NOT OLD.event_id
  OR NEW.recorded IS NOT OLD.recorded OR NEW.agent IS NOT OLD.agent OR NEW.action IS NOT OLD.action
  OR NEW.subtype IS NOT OLD.subtype OR NEW.outcome IS NOT OLD.outcome
  OR NEW.leaf_hash IS NOT OLD.leaf_hash
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"#,
    ),
    (
        12,
        r#"
-- Each checkpoint keeps the tree's right edge (the roots of its perfect
-- subtrees, 32 bytes each, largest first) so that a starting node goes on
-- sealing from the newest checkpoint instead of rereading every record
-- sealed before it (docs/AUDIT.md, "Storage"). NULL for checkpoints
-- written before: the first seal after the upgrade reads the tree once.
ALTER TABLE audit_checkpoints ADD COLUMN frontier BLOB;
-- Checkpoints were protected against deletion only; a stored edge makes
-- an edit worth refusing too (PostgreSQL has refused both since its
-- migration 8).
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"#,
    ),
    (
        13,
        r#"
-- Patient entries are keyed by the first 8 bytes of the patient's keyed
-- hash instead of all 32 (`query::patient_key`; why, and what a collision
-- means, there). The table is rebuilt: DROP TABLE fires no delete
-- trigger, and the triggers are made again on the new table, now
-- refusing edits as well as deletes (as PostgreSQL's always have).
CREATE TABLE audit_patient_v13 (
    patient BLOB NOT NULL,
    audit_id INTEGER NOT NULL,
    PRIMARY KEY (patient, audit_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO audit_patient_v13 (patient, audit_id)
    SELECT substr(patient, 1, 8), audit_id FROM audit_patient ORDER BY 1, 2;
DROP TABLE audit_patient;
ALTER TABLE audit_patient_v13 RENAME TO audit_patient;
CREATE TRIGGER audit_patient_no_delete BEFORE DELETE ON audit_patient
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_patient_no_update BEFORE UPDATE ON audit_patient
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"#,
    ),
    (
        14,
        r#"
-- RFC 8705: a client whose access tokens are bound to its TLS client
-- certificate (it must present one at the token endpoint and with every
-- token).
ALTER TABLE clients ADD COLUMN cert_bound INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        15,
        r#"
-- The breach register (issue 26; docs/INCIDENT_RESPONSE.md): every step of
-- every incident, in order, sealed (titles and notes are free text that
-- may name patients). Append-only: an incident's history is evidence, so
-- a step is never changed or removed; a correction is a new step. Steps
-- are numbered per incident (one writer wins each number) and each seal
-- binds its number and the previous step (a chain).
CREATE TABLE incident_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    incident TEXT NOT NULL,
    step INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sealed BLOB NOT NULL,
    UNIQUE (incident, step)
);
CREATE TRIGGER incident_events_no_delete BEFORE DELETE ON incident_events
BEGIN SELECT RAISE(ABORT, 'the breach register is append-only'); END;
CREATE TRIGGER incident_events_no_update BEFORE UPDATE ON incident_events
BEGIN SELECT RAISE(ABORT, 'the breach register is append-only'); END;
"#,
    ),
];

/// (version, SQL) for PostgreSQL. Version 2 moves the two hot write paths
/// into functions so each is one round trip (the same checks, server-side).
pub const POSTGRES: &[(i64, &str)] = &[
    (
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
    ),
    (
        2,
        r#"
-- Append a version if the precondition holds (p_expected NULL = the id was
-- never used). Returns the new seq, or NULL when the precondition fails.
-- A concurrent first insert surfaces as a unique violation.
CREATE FUNCTION phylax_append_version(
    p_rtype TEXT, p_id TEXT, p_version BIGINT, p_expected BIGINT,
    p_last_updated BIGINT, p_deleted BOOLEAN, p_key_scope TEXT, p_body BYTEA
) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    cur BIGINT;
    new_seq BIGINT;
BEGIN
    SELECT version INTO cur FROM resources WHERE rtype = p_rtype AND id = p_id FOR UPDATE;
    IF cur IS DISTINCT FROM p_expected OR p_version <> COALESCE(p_expected, 0) + 1 THEN
        RETURN NULL;
    END IF;
    INSERT INTO resource_versions (rtype, id, version, last_updated, deleted, key_scope, body)
        VALUES (p_rtype, p_id, p_version, p_last_updated, p_deleted, p_key_scope, p_body)
        RETURNING seq INTO new_seq;
    INSERT INTO resources (rtype, id, version, seq, deleted)
        VALUES (p_rtype, p_id, p_version, new_seq, p_deleted)
        ON CONFLICT (rtype, id) DO UPDATE
        SET version = excluded.version, seq = excluded.seq, deleted = excluded.deleted;
    RETURN new_seq;
END;
$$;

-- Store a wrapped key unless one exists; return the stored one. The commit
-- needs no flush of its own: WAL is one ordered stream, so the synchronous
-- commit of any version sealed under this key flushes this insert first,
-- and a key whose data never commits is harmless.
CREATE FUNCTION phylax_put_wrapped_key(p_scope TEXT, p_wrapped BYTEA, p_now BIGINT)
RETURNS BYTEA LANGUAGE plpgsql AS $$
DECLARE
    out BYTEA;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO wrapped_keys (scope, wrapped, created_at) VALUES (p_scope, p_wrapped, p_now)
        ON CONFLICT (scope) DO NOTHING;
    SELECT wrapped INTO out FROM wrapped_keys WHERE scope = p_scope;
    RETURN out;
END;
$$;
"#,
    ),
    (
        3,
        r#"
-- Search index: keyed blind hashes, time ranges and numbers; never
-- plaintext values (see docs/THREAT_MODEL.md).
CREATE TABLE search_index (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    hash BYTEA,
    lo BIGINT,
    hi BIGINT,
    num DOUBLE PRECISION
);
-- Partial indexes: each entry kind lands in exactly one lookup index (plus
-- the per-resource one used to replace a resource's entries).
CREATE INDEX search_index_hash ON search_index (rtype, param, hash) WHERE hash IS NOT NULL;
CREATE INDEX search_index_lo ON search_index (rtype, param, lo) WHERE lo IS NOT NULL;
CREATE INDEX search_index_num ON search_index (rtype, param, num) WHERE num IS NOT NULL;
CREATE INDEX search_index_resource ON search_index (rtype, id);

-- The append now also replaces the resource's index entries, in the same
-- statement and transaction as the version.
DROP FUNCTION phylax_append_version(TEXT, TEXT, BIGINT, BIGINT, BIGINT, BOOLEAN, TEXT, BYTEA);
CREATE FUNCTION phylax_append_version(
    p_rtype TEXT, p_id TEXT, p_version BIGINT, p_expected BIGINT,
    p_last_updated BIGINT, p_deleted BOOLEAN, p_key_scope TEXT, p_body BYTEA,
    p_params TEXT[], p_hashes BYTEA[], p_lo BIGINT[], p_hi BIGINT[], p_num DOUBLE PRECISION[]
) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    cur BIGINT;
    new_seq BIGINT;
BEGIN
    SELECT version INTO cur FROM resources WHERE rtype = p_rtype AND id = p_id FOR UPDATE;
    IF cur IS DISTINCT FROM p_expected OR p_version <> COALESCE(p_expected, 0) + 1 THEN
        RETURN NULL;
    END IF;
    INSERT INTO resource_versions (rtype, id, version, last_updated, deleted, key_scope, body)
        VALUES (p_rtype, p_id, p_version, p_last_updated, p_deleted, p_key_scope, p_body)
        RETURNING seq INTO new_seq;
    INSERT INTO resources (rtype, id, version, seq, deleted)
        VALUES (p_rtype, p_id, p_version, new_seq, p_deleted)
        ON CONFLICT (rtype, id) DO UPDATE
        SET version = excluded.version, seq = excluded.seq, deleted = excluded.deleted;
    DELETE FROM search_index WHERE rtype = p_rtype AND id = p_id;
    IF NOT p_deleted THEN
        INSERT INTO search_index (rtype, id, param, hash, lo, hi, num)
            SELECT p_rtype, p_id, u.param, u.hash, u.lo, u.hi, u.num
            FROM unnest(p_params, p_hashes, p_lo, p_hi, p_num) AS u(param, hash, lo, hi, num);
    END IF;
    RETURN new_seq;
END;
$$;
"#,
    ),
    (
        4,
        r#"
-- The hash index also carries the resource id (see SQLite migration 4):
-- index-only scans for the driving list, point lookups for the others.
DROP INDEX search_index_hash;
CREATE INDEX search_index_hash ON search_index (rtype, param, hash, id) WHERE hash IS NOT NULL;
"#,
    ),
    (
        5,
        r#"
-- Types, ids and parameter codes are ASCII by construction: compare them
-- bytewise. A locale collation (even C.UTF-8) makes every B-tree step a
-- strcoll call, which dominated the cost of selective searches.
ALTER TABLE resources ALTER COLUMN rtype TYPE TEXT COLLATE "C", ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE resource_versions ALTER COLUMN rtype TYPE TEXT COLLATE "C", ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE search_index ALTER COLUMN rtype TYPE TEXT COLLATE "C", ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN param TYPE TEXT COLLATE "C";
"#,
    ),
    (
        6,
        r#"
-- Per-resource entries by parameter (see SQLite migration 5). With three
-- equality columns the planner prefers it for per-row probes even before
-- the table has statistics.
DROP INDEX search_index_resource;
CREATE INDEX search_index_resource ON search_index (rtype, id, param);
"#,
    ),
    (
        7,
        r#"
-- People and their grants (see SQLite migration 6).
ALTER TABLE clients ADD COLUMN redirect_uris TEXT NOT NULL DEFAULT '';
ALTER TABLE clients ADD COLUMN public BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE clients ADD COLUMN first_party BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username_hash BYTEA NOT NULL UNIQUE,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    rev BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE grants (
    kind TEXT NOT NULL,
    key_hash BYTEA NOT NULL,
    family TEXT NOT NULL,
    user_id TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    PRIMARY KEY (kind, key_hash)
);
CREATE INDEX grants_family ON grants (family);
CREATE INDEX grants_user ON grants (user_id);
CREATE INDEX grants_expires ON grants (expires_at);
CREATE TABLE revocations (
    seq BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX revocations_at ON revocations (at);
"#,
    ),
    (
        8,
        r#"
-- The audit log (see SQLite migration 7).
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    leaf_index BIGINT UNIQUE,
    event_id TEXT COLLATE "C" NOT NULL UNIQUE,
    recorded BIGINT NOT NULL,
    agent TEXT COLLATE "C" NOT NULL,
    action TEXT COLLATE "C" NOT NULL,
    subtype TEXT COLLATE "C" NOT NULL,
    outcome TEXT COLLATE "C" NOT NULL,
    leaf_hash BYTEA NOT NULL,
    sealed BYTEA NOT NULL
);
CREATE INDEX audit_unsealed ON audit_log (id) WHERE leaf_index IS NULL;
CREATE INDEX audit_recorded ON audit_log (recorded);
CREATE INDEX audit_agent ON audit_log (agent, id);
CREATE TABLE audit_patient (
    patient BYTEA NOT NULL,
    audit_id BIGINT NOT NULL,
    PRIMARY KEY (patient, audit_id)
);
CREATE TABLE audit_checkpoints (
    size BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    note TEXT NOT NULL
);
CREATE FUNCTION phylax_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_log' AND OLD.leaf_index IS NULL
       AND (NEW.id, NEW.event_id, NEW.recorded, NEW.agent, NEW.action, NEW.subtype,
            NEW.outcome, NEW.leaf_hash, NEW.sealed)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.event_id, OLD.recorded, OLD.agent, OLD.action, OLD.subtype,
            OLD.outcome, OLD.leaf_hash, OLD.sealed) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit records are append-only';
END;
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_append_only();
CREATE TRIGGER audit_patient_append_only BEFORE UPDATE OR DELETE ON audit_patient
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_append_only();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_append_only();
"#,
    ),
    (
        9,
        r#"
-- Break-the-glass grants (see SQLite migration 8).
CREATE TABLE break_glass (
    id TEXT COLLATE "C" PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    started BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    reviewed_at BIGINT,
    reviewer TEXT,
    review_sealed BYTEA
);
CREATE INDEX break_glass_user ON break_glass (user_id, expires);
CREATE INDEX break_glass_open ON break_glass (started) WHERE reviewed_at IS NULL;
CREATE FUNCTION phylax_break_glass_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.reviewed_at IS NULL
       AND (NEW.id, NEW.user_id, NEW.started, NEW.expires, NEW.sealed)
           IS NOT DISTINCT FROM (OLD.id, OLD.user_id, OLD.started, OLD.expires, OLD.sealed) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'break-the-glass grants are kept';
END;
$$;
CREATE TRIGGER break_glass_kept BEFORE UPDATE OR DELETE ON break_glass
    FOR EACH ROW EXECUTE FUNCTION phylax_break_glass_kept();
"#,
    ),
    (
        10,
        r#"
-- Retention (see SQLite migration 9): emptying a sealed record's body once.
CREATE OR REPLACE FUNCTION phylax_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_log'
       AND (NEW.id, NEW.event_id, NEW.recorded, NEW.agent, NEW.action, NEW.subtype,
            NEW.outcome, NEW.leaf_hash)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.event_id, OLD.recorded, OLD.agent, OLD.action, OLD.subtype,
            OLD.outcome, OLD.leaf_hash) THEN
        IF OLD.leaf_index IS NULL AND NEW.sealed IS NOT DISTINCT FROM OLD.sealed THEN
            RETURN NEW;
        END IF;
        IF OLD.leaf_index IS NOT NULL AND NEW.leaf_index IS NOT DISTINCT FROM OLD.leaf_index
           AND octet_length(OLD.sealed) > 0 AND octet_length(NEW.sealed) = 0 THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'audit records are append-only';
END;
$$;
"#,
    ),
    (
        11,
        r#"
-- Compact search entries (see SQLite migration 10): entries name their
-- resource by the current version's seq and their parameter by a small
-- number.
CREATE TABLE search_params (
    pid INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    rtype TEXT COLLATE "C" NOT NULL,
    param TEXT COLLATE "C" NOT NULL,
    UNIQUE (rtype, param)
);
CREATE TABLE search_entries (
    seq BIGINT NOT NULL,
    pid INTEGER NOT NULL,
    hash BYTEA,
    lo BIGINT,
    hi BIGINT,
    num DOUBLE PRECISION
);
INSERT INTO search_params (rtype, param)
    SELECT DISTINCT rtype, param FROM search_index ORDER BY rtype, param;
INSERT INTO search_entries (seq, pid, hash, lo, hi, num)
    SELECT r.seq, p.pid, i.hash, i.lo, i.hi, i.num
    FROM search_index i
    JOIN resources r ON r.rtype = i.rtype AND r.id = i.id
    JOIN search_params p ON p.rtype = i.rtype AND p.param = i.param
    ORDER BY r.seq;
DROP TABLE search_index;
CREATE INDEX search_entries_hash ON search_entries (pid, hash, seq) WHERE hash IS NOT NULL;
CREATE INDEX search_entries_lo ON search_entries (pid, lo) WHERE lo IS NOT NULL;
CREATE INDEX search_entries_num ON search_entries (pid, num) WHERE num IS NOT NULL;
CREATE INDEX search_entries_seq ON search_entries (seq, pid);
CREATE UNIQUE INDEX resources_seq ON resources (seq);

-- The append replaces the entries of the version it supersedes (by that
-- version's seq; a first version has none to delete) with the new ones.
DROP FUNCTION phylax_append_version(TEXT, TEXT, BIGINT, BIGINT, BIGINT, BOOLEAN, TEXT, BYTEA,
    TEXT[], BYTEA[], BIGINT[], BIGINT[], DOUBLE PRECISION[]);
CREATE FUNCTION phylax_append_version(
    p_rtype TEXT, p_id TEXT, p_version BIGINT, p_expected BIGINT,
    p_last_updated BIGINT, p_deleted BOOLEAN, p_key_scope TEXT, p_body BYTEA,
    p_pids INTEGER[], p_hashes BYTEA[], p_lo BIGINT[], p_hi BIGINT[], p_num DOUBLE PRECISION[]
) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    cur BIGINT;
    old_seq BIGINT;
    new_seq BIGINT;
BEGIN
    SELECT version, seq INTO cur, old_seq FROM resources WHERE rtype = p_rtype AND id = p_id FOR UPDATE;
    IF cur IS DISTINCT FROM p_expected OR p_version <> COALESCE(p_expected, 0) + 1 THEN
        RETURN NULL;
    END IF;
    INSERT INTO resource_versions (rtype, id, version, last_updated, deleted, key_scope, body)
        VALUES (p_rtype, p_id, p_version, p_last_updated, p_deleted, p_key_scope, p_body)
        RETURNING seq INTO new_seq;
    INSERT INTO resources (rtype, id, version, seq, deleted)
        VALUES (p_rtype, p_id, p_version, new_seq, p_deleted)
        ON CONFLICT (rtype, id) DO UPDATE
        SET version = excluded.version, seq = excluded.seq, deleted = excluded.deleted;
    IF old_seq IS NOT NULL THEN
        DELETE FROM search_entries WHERE seq = old_seq;
    END IF;
    IF NOT p_deleted THEN
        INSERT INTO search_entries (seq, pid, hash, lo, hi, num)
            SELECT new_seq, u.pid, u.hash, u.lo, u.hi, u.num
            FROM unnest(p_pids, p_hashes, p_lo, p_hi, p_num) AS u(pid, hash, lo, hi, num);
    END IF;
    RETURN new_seq;
END;
$$;
"#,
    ),
    (
        12,
        r#"
-- Tree positions in a narrow table of their own (see SQLite migration 11).
CREATE TABLE audit_leaf (
    leaf_index BIGINT PRIMARY KEY,
    audit_id BIGINT NOT NULL UNIQUE
);
INSERT INTO audit_leaf (leaf_index, audit_id)
    SELECT leaf_index, id FROM audit_log WHERE leaf_index IS NOT NULL ORDER BY leaf_index;
CREATE TABLE audit_pending (audit_id BIGINT PRIMARY KEY);
INSERT INTO audit_pending (audit_id) SELECT id FROM audit_log WHERE leaf_index IS NULL;
DROP INDEX audit_unsealed;
CREATE OR REPLACE FUNCTION phylax_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Retention may empty the body of a record that is in the tree; no
    -- other change, and no delete, of any audit table.
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_log'
       AND (NEW.id, NEW.leaf_index, NEW.event_id, NEW.recorded, NEW.agent, NEW.action,
            NEW.subtype, NEW.outcome, NEW.leaf_hash)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.leaf_index, OLD.event_id, OLD.recorded, OLD.agent, OLD.action,
            OLD.subtype, OLD.outcome, OLD.leaf_hash)
       AND octet_length(OLD.sealed) > 0 AND octet_length(NEW.sealed) = 0
       AND EXISTS (SELECT 1 FROM audit_leaf WHERE audit_id = OLD.id) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit records are append-only';
END;
$$;
CREATE TRIGGER audit_leaf_append_only BEFORE UPDATE OR DELETE ON audit_leaf
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_append_only();
"#,
    ),
    (
        13,
        r#"
-- Each checkpoint keeps the tree's right edge (see SQLite migration 12).
ALTER TABLE audit_checkpoints ADD COLUMN frontier BYTEA;
"#,
    ),
    (
        14,
        r#"
-- Sealed bytes stay in their row up to a page. By default PostgreSQL moves
-- any value that makes a row longer than 2 KiB out to the table's TOAST
-- relation, after trying to compress it. Sealed bytes never compress, and
-- an audit record is 2-4 KiB (larger for a search that returns many
-- patients), so every record paid a failed compression, a TOAST insert per
-- 2 KiB chunk with its index entry, and a lookup per read. Rows up to a
-- page (8160 bytes, the largest target an 8 KiB-page server allows) now
-- stay inline; larger values are still compressed or moved out as before.
-- Rows written before this migration keep their storage until rewritten.
ALTER TABLE audit_log SET (toast_tuple_target = 8160);
ALTER TABLE resource_versions SET (toast_tuple_target = 8160);
"#,
    ),
    (
        15,
        r#"
-- Patient entries are keyed by the first 8 bytes of the patient's keyed
-- hash, as a BIGINT, instead of all 32 bytes (`query::patient_key`): a
-- family search writes about 24 of them, and a 64-bit key took a quarter
-- less time to insert (docs/PERFORMANCE.md). The table is rebuilt; DROP
-- TABLE fires no row trigger, and the trigger is made again. The cast
-- reads the 8 bytes big-endian, as `query::patient_key_int` does.
CREATE TABLE audit_patient_v15 (
    patient BIGINT NOT NULL,
    audit_id BIGINT NOT NULL,
    PRIMARY KEY (patient, audit_id)
);
INSERT INTO audit_patient_v15 (patient, audit_id)
    SELECT DISTINCT ('x' || encode(substr(patient, 1, 8), 'hex'))::bit(64)::bigint, audit_id
    FROM audit_patient ORDER BY 1, 2;
DROP TABLE audit_patient;
ALTER TABLE audit_patient_v15 RENAME TO audit_patient;
ALTER INDEX audit_patient_v15_pkey RENAME TO audit_patient_pkey;
-- The audit tables other than audit_log refuse every edit and delete with
-- a function of their own. They used phylax_audit_append_only(), whose
-- test names audit_log's columns: PL/pgSQL plans the whole condition, so
-- on these tables it failed with `record "new" has no field "id"` before
-- reaching its own message. The change was refused either way; now the
-- reason says why.
CREATE FUNCTION phylax_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END;
$$;
CREATE TRIGGER audit_patient_append_only BEFORE UPDATE OR DELETE ON audit_patient
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_refuse();
DROP TRIGGER audit_leaf_append_only ON audit_leaf;
CREATE TRIGGER audit_leaf_append_only BEFORE UPDATE OR DELETE ON audit_leaf
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_refuse();
DROP TRIGGER checkpoints_append_only ON audit_checkpoints;
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION phylax_audit_refuse();
"#,
    ),
    (
        16,
        r#"
-- RFC 8705: access tokens bound to the client's TLS certificate.
ALTER TABLE clients ADD COLUMN cert_bound BOOLEAN NOT NULL DEFAULT false;
"#,
    ),
    (
        17,
        r#"
-- The breach register (issue 26): append-only, as on SQLite.
CREATE TABLE incident_events (
    seq BIGSERIAL PRIMARY KEY,
    incident TEXT COLLATE "C" NOT NULL,
    step BIGINT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    UNIQUE (incident, step)
);
CREATE FUNCTION phylax_incident_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the breach register is append-only';
END;
$$;
CREATE TRIGGER incident_events_append_only BEFORE UPDATE OR DELETE ON incident_events
    FOR EACH ROW EXECUTE FUNCTION phylax_incident_refuse();
CREATE TRIGGER incident_events_no_truncate BEFORE TRUNCATE ON incident_events
    FOR EACH STATEMENT EXECUTE FUNCTION phylax_incident_refuse();
"#,
    ),
];

/// Refuse a database whose schema is newer than these migrations: a newer
/// release upgraded it, and this one does not know what its tables now
/// hold, so it could misread them (as releases from before audit-record
/// compression read compressed records as tampered with; those releases
/// predate this check, which protects rollbacks from here on). Fail
/// closed at start, with a reason an operator can act on.
pub(crate) fn refuse_newer(current: i64, known: &[(i64, &str)]) -> crate::Result<()> {
    let newest = known.last().map_or(0, |(v, _)| *v);
    if current > newest {
        return Err(crate::StoreError::Unavailable(format!(
            "the database schema is version {current}, newer than this release knows \
             ({newest}): a newer Phylax upgraded it; run that release, or restore the \
             backup taken before the upgrade"
        )));
    }
    Ok(())
}
