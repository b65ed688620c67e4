//! The schema of every backend, in one place: each backend's migrations, one step per
//! schema version, append-only (a released step is never edited).
//!
//! The backends hold the same tables with the same meaning; only the types differ
//! (SQLite's `STRICT` `INTEGER`/`BLOB`, PostgreSQL's `BIGINT`/`BYTEA`/`BOOLEAN`). A change
//! to the schema adds a step to **both** lists below, and the conformance suite, which
//! runs against both, checks they still agree.
//!
//! - SQLite tracks its version in `PRAGMA user_version` ([`sqlite::MIGRATIONS`]: five
//!   steps, since SQLite databases of earlier hubs exist and must be migrated).
//! - PostgreSQL tracks it in the one-row table `tessera_schema` ([`postgres::MIGRATIONS`]).
//!   The PostgreSQL backend started at SQLite's version 5: its step 1 is that schema
//!   whole. Both lists grow together from here.

/// The SQLite schema (see [`super::Sqlite`]).
pub(in crate::store) mod sqlite {
    use rusqlite::Transaction;

    use crate::store::StoreResult;

    /// One schema migration step.
    pub(in crate::store) enum Step {
        /// Plain SQL.
        Sql(&'static str),
        /// SQL that needs code: data the database cannot compute itself.
        Code(fn(&Transaction<'_>) -> StoreResult<()>),
    }

    /// The schema, one step per version: step `i` takes the database from `user_version` `i` to
    /// `i + 1`. Steps are append-only; a released step is never edited.
    pub(in crate::store) const MIGRATIONS: &[Step] = &[
        // 1: the initial schema.
        Step::Sql(
            "
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
        ",
        ),
        // 2: revocation streams (PROTOCOL.md §11): changes numbered per stream, entries
        // addressed to an audience, control messages owed to devices.
        Step::Code(super::super::sqlite::streams_migration),
        // 3: an audit row may stand for several identical decisions (a flood aggregated).
        Step::Sql(
            "ALTER TABLE audit_log ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count >= 1);",
        ),
        // 4: the keys of devices revoked whole, never accepted again (PROTOCOL.md §8.5.1).
        Step::Sql(
            "CREATE TABLE retired_keys (
                public_key BLOB PRIMARY KEY NOT NULL,
                client TEXT NOT NULL,
                retired_at INTEGER NOT NULL
            ) STRICT;",
        ),
        // 5: the audit log read by time (`tessera-hub audit --since/--until`) and pruned by
        // time, without scanning it whole. Rows arrive in time order, so the index only grows
        // at its end.
        Step::Sql("CREATE INDEX audit_log_by_time ON audit_log (at_ms);"),
    ];

    /// The tables of schema version 2.
    pub(in crate::store) const STREAMS_SCHEMA: &str = "
        CREATE TABLE revocation_streams (
            name TEXT PRIMARY KEY NOT NULL,
            seq INTEGER NOT NULL CHECK (seq >= 0),
            snapshot_seq INTEGER NOT NULL DEFAULT 0,
            snapshot_pages INTEGER NOT NULL DEFAULT 0
        ) STRICT;

        CREATE TABLE revocation_changes (
            stream TEXT NOT NULL REFERENCES revocation_streams (name),
            seq INTEGER NOT NULL CHECK (seq > 0),
            created_at INTEGER NOT NULL,
            published INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1)),
            PRIMARY KEY (stream, seq)
        ) STRICT;
        CREATE INDEX revocation_changes_unpublished ON revocation_changes (created_at)
            WHERE published = 0;

        -- A token entry has token_hash; a subject entry has subject and issued_before.
        CREATE TABLE stream_entries (
            stream TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ordinal INTEGER NOT NULL,
            audience TEXT NOT NULL,
            token_hash BLOB CHECK (token_hash IS NULL OR length(token_hash) = 32),
            subject TEXT,
            issued_before INTEGER,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (stream, seq, ordinal),
            FOREIGN KEY (stream, seq) REFERENCES revocation_changes (stream, seq) ON DELETE CASCADE,
            CHECK ((token_hash IS NOT NULL AND subject IS NULL AND issued_before IS NULL)
                OR (token_hash IS NULL AND subject IS NOT NULL AND issued_before IS NOT NULL))
        ) STRICT;
        CREATE INDEX stream_entries_by_expiry ON stream_entries (expires_at);
        CREATE INDEX stream_entries_by_hash ON stream_entries (token_hash)
            WHERE token_hash IS NOT NULL;

        CREATE TABLE pending_controls (
            device TEXT NOT NULL,
            command INTEGER NOT NULL,
            issued_at INTEGER NOT NULL,
            PRIMARY KEY (device, command, issued_at)
        ) STRICT;
        CREATE INDEX pending_controls_by_time ON pending_controls (issued_at);

        CREATE INDEX issued_tokens_by_hash ON issued_tokens (hash);
        -- Tokens of this client issued before this time are revoked (subject revocation): a
        -- token decided before it but recorded after is refused (see record_issued).
        ALTER TABLE clients ADD COLUMN tokens_revoked_before INTEGER;
        CREATE INDEX client_groups_by_name ON client_groups (name);
        CREATE INDEX clients_by_role ON clients (role);

        -- When a key set holding the key was first published (PROTOCOL.md §10): a key counts
        -- its announce period from then, and never signs before. Keys of version 1 were all
        -- published by the running hub already.
        ALTER TABLE signing_keys ADD COLUMN published_at INTEGER;
        UPDATE signing_keys SET published_at = created_at;
    ";
}

/// The PostgreSQL schema (see [`super::Postgres`]).
pub(in crate::store) mod postgres {
    /// The schema, one step per version: step `i` takes the database from version `i` to
    /// `i + 1` (version 0: no `tessera_schema` table yet). Each step runs in the migrating
    /// transaction, under an advisory lock, so replicas starting together migrate once.
    pub(in crate::store) const MIGRATIONS: &[&str] = &[
        // 1: the schema of SQLite's version 5.
        "
    CREATE TABLE clients (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'app', 'operator')),
        public_key BYTEA,
        role TEXT NOT NULL,
        enrollment_code_key BYTEA CHECK (enrollment_code_key IS NULL
                                         OR length(enrollment_code_key) = 32),
        enrolled_at BIGINT,
        revoked_at BIGINT,
        created_at BIGINT NOT NULL,
        -- Tokens of this client issued before this time are revoked (subject revocation):
        -- a token decided before it but recorded after is refused.
        tokens_revoked_before BIGINT
    );
    CREATE INDEX clients_by_role ON clients (role);

    CREATE TABLE client_groups (
        client TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        ordinal BIGINT NOT NULL,
        name TEXT NOT NULL,
        PRIMARY KEY (client, ordinal)
    );
    CREATE INDEX client_groups_by_name ON client_groups (name);

    CREATE TABLE issued_tokens (
        cti BYTEA PRIMARY KEY,
        hash BYTEA NOT NULL CHECK (length(hash) = 32),
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        subject TEXT NOT NULL,
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        issued_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX issued_tokens_by_subject ON issued_tokens (subject, expires_at);
    CREATE INDEX issued_tokens_by_audience ON issued_tokens (audience, expires_at);
    CREATE INDEX issued_tokens_by_expiry ON issued_tokens (expires_at);
    CREATE INDEX issued_tokens_by_hash ON issued_tokens (hash);

    -- family_revoked is kept on every grant of the family; a grant recorded into a family
    -- that is already revoked starts revoked.
    CREATE TABLE grants (
        hash BYTEA PRIMARY KEY CHECK (length(hash) = 32),
        family BYTEA NOT NULL CHECK (length(family) = 16),
        client TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        used BOOLEAN NOT NULL DEFAULT FALSE,
        family_revoked BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX grants_by_family ON grants (family);
    CREATE INDEX grants_by_client ON grants (client);

    -- One row per stream: its latest change number, raised in the transaction that
    -- appends changes, so numbers are gapless across every replica (no SEQUENCE: a
    -- sequence value taken by a transaction that rolls back is lost, a gap).
    CREATE TABLE revocation_streams (
        name TEXT PRIMARY KEY,
        seq BIGINT NOT NULL CHECK (seq >= 0),
        snapshot_seq BIGINT NOT NULL DEFAULT 0,
        snapshot_pages BIGINT NOT NULL DEFAULT 0
    );

    CREATE TABLE revocation_changes (
        stream TEXT NOT NULL REFERENCES revocation_streams (name),
        seq BIGINT NOT NULL CHECK (seq > 0),
        created_at BIGINT NOT NULL,
        published BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (stream, seq)
    );
    CREATE INDEX revocation_changes_unpublished ON revocation_changes (created_at)
        WHERE NOT published;

    -- A token entry has token_hash; a subject entry has subject and issued_before.
    CREATE TABLE stream_entries (
        stream TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ordinal BIGINT NOT NULL,
        audience TEXT NOT NULL,
        token_hash BYTEA CHECK (token_hash IS NULL OR length(token_hash) = 32),
        subject TEXT,
        issued_before BIGINT,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (stream, seq, ordinal),
        FOREIGN KEY (stream, seq) REFERENCES revocation_changes (stream, seq)
            ON DELETE CASCADE,
        CHECK ((token_hash IS NOT NULL AND subject IS NULL AND issued_before IS NULL)
            OR (token_hash IS NULL AND subject IS NOT NULL AND issued_before IS NOT NULL))
    );
    CREATE INDEX stream_entries_by_expiry ON stream_entries (expires_at);
    CREATE INDEX stream_entries_by_hash ON stream_entries (token_hash)
        WHERE token_hash IS NOT NULL;

    CREATE TABLE pending_controls (
        device TEXT NOT NULL,
        command BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        PRIMARY KEY (device, command, issued_at)
    );
    CREATE INDEX pending_controls_by_time ON pending_controls (issued_at);

    CREATE TABLE nonces (
        client TEXT NOT NULL,
        nonce BYTEA NOT NULL CHECK (length(nonce) = 16),
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (client, nonce)
    );
    CREATE INDEX nonces_by_expiry ON nonces (expires_at);

    CREATE TABLE rate_buckets (
        client TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        updated_ms BIGINT NOT NULL
    );

    -- id: the order keys were added in (SQLite's rowid).
    CREATE TABLE signing_keys (
        id BIGINT GENERATED ALWAYS AS IDENTITY,
        kid BYTEA PRIMARY KEY CHECK (length(kid) = 8),
        public_key BYTEA NOT NULL,
        sealed_private_key BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        active_from BIGINT NOT NULL,
        retire_after BIGINT,
        published_at BIGINT
    );

    -- The keys of devices revoked whole, never accepted again (PROTOCOL.md §8.5.1).
    CREATE TABLE retired_keys (
        public_key BYTEA PRIMARY KEY,
        client TEXT NOT NULL,
        retired_at BIGINT NOT NULL
    );

    CREATE TABLE audit_log (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        count BIGINT NOT NULL DEFAULT 1 CHECK (count >= 1)
    );
    CREATE INDEX audit_log_by_time ON audit_log (at_ms, id);
    ",
    ];
}
