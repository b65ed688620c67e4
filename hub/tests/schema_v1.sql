-- Schema version 1 of the SQLite store, as released: the starting point of the
-- migration test in store_sqlite.rs. Never edit it.
    CREATE TABLE clients (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'app', 'operator')),
        public_key BLOB,
        role TEXT NOT NULL,
        enrollment_code_key BLOB CHECK (enrollment_code_key IS NULL
                                        OR length(enrollment_code_key) = 32),
        enrolled_at INTEGER,
        revoked_at INTEGER,
        created_at INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE client_groups (
        client TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        name TEXT NOT NULL,
        PRIMARY KEY (client, ordinal)
    ) STRICT;

    CREATE TABLE issued_tokens (
        cti BLOB PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        subject TEXT NOT NULL,
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX issued_tokens_by_subject ON issued_tokens (subject, expires_at);
    CREATE INDEX issued_tokens_by_audience ON issued_tokens (audience, expires_at);
    CREATE INDEX issued_tokens_by_expiry ON issued_tokens (expires_at);

    -- family_revoked is kept on every grant of the family; a grant recorded into a family
    -- that is already revoked starts revoked (see record_issued).
    CREATE TABLE grants (
        hash BLOB PRIMARY KEY NOT NULL CHECK (length(hash) = 32),
        family BLOB NOT NULL CHECK (length(family) = 16),
        client TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
        family_revoked INTEGER NOT NULL DEFAULT 0 CHECK (family_revoked IN (0, 1))
    ) STRICT;
    CREATE INDEX grants_by_family ON grants (family);
    CREATE INDEX grants_by_client ON grants (client);

    -- seq is assigned as max + 1 inside the appending transaction: no gaps, no reuse.
    CREATE TABLE revocations (
        seq INTEGER PRIMARY KEY NOT NULL CHECK (seq > 0),
        created_at INTEGER NOT NULL,
        published INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1))
    ) STRICT;
    CREATE INDEX revocations_unpublished ON revocations (seq) WHERE published = 0;

    -- A token entry has token_hash; a subject entry has subject and issued_before.
    CREATE TABLE revocation_entries (
        seq INTEGER NOT NULL REFERENCES revocations (seq) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        token_hash BLOB CHECK (token_hash IS NULL OR length(token_hash) = 32),
        subject TEXT,
        issued_before INTEGER,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (seq, ordinal),
        CHECK ((token_hash IS NOT NULL AND subject IS NULL AND issued_before IS NULL)
            OR (token_hash IS NULL AND subject IS NOT NULL AND issued_before IS NOT NULL))
    ) STRICT;
    CREATE INDEX revocation_entries_by_expiry ON revocation_entries (expires_at);

    CREATE TABLE nonces (
        client TEXT NOT NULL,
        nonce BLOB NOT NULL CHECK (length(nonce) = 16),
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (client, nonce)
    ) STRICT;
    CREATE INDEX nonces_by_expiry ON nonces (expires_at);

    CREATE TABLE rate_buckets (
        client TEXT PRIMARY KEY NOT NULL,
        tokens REAL NOT NULL,
        updated_ms INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE signing_keys (
        kid BLOB PRIMARY KEY NOT NULL CHECK (length(kid) = 8),
        public_key BLOB NOT NULL,
        sealed_private_key BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        active_from INTEGER NOT NULL,
        retire_after INTEGER
    ) STRICT;

    -- Named monotonic counters (the key set version).
    CREATE TABLE counters (
        name TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL
    ) STRICT;
