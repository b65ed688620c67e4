//! The SQLite store on real files: the conformance suite, then what only a database file
//! has (durability across a reopen, migrations, WAL, several handles on one file).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;
use tessera_hub::revocation::Target;
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{
    ClientKind, ClientRecord, Committed, Effect, GrantRecord, GrantUse, IssuedToken, KeyRecord,
    RateLimit, Refused, RequestCommit, Sqlite, Store, StoreError, TokenKind, Unmatched,
    conformance,
};
use tessera_shared::revocation::{Addressed, Entry, MAX_LEEWAY, Stream};

const NOW: u64 = 1_700_000_000;

/// A fresh database file in its own directory; the directory goes when the `TempDir` does.
fn fresh() -> (TempDir, Sqlite) {
    let dir = TempDir::new().expect("temp dir");
    let store = Sqlite::open(&dir.path().join("hub.db")).expect("open");
    (dir, store)
}

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("hub.db")
}

fn pragma(path: &Path, name: &str) -> String {
    let conn = rusqlite::Connection::open(path).expect("open with rusqlite");
    conn.pragma_query_value(None, name, |r| {
        Ok(match r.get_ref(0)? {
            rusqlite::types::ValueRef::Integer(i) => i.to_string(),
            rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            other => format!("{other:?}"),
        })
    })
    .expect("pragma")
}

// --- the conformance suite, one test per check ---

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (_dir, store) = fresh();
                conformance::$check(store).await;
            }
        )*
    };
}

conformance!(
    registry,
    enrollment,
    client_revocation,
    nonces,
    nonces_race,
    rate_limit,
    rate_limit_race,
    issued_tokens,
    record_issued_is_atomic,
    grant_lifecycle,
    grant_check_order,
    grant_use_race,
    revoke_grants_of,
    revoke_targets,
    revoke_subject_per_audience,
    revoke_is_all_or_nothing,
    revoke_skips_what_names_nothing_when_asked,
    set_role_revokes_in_the_same_transaction,
    revoke_mass_in_changes_that_fit_a_page,
    revocation_streams,
    revocation_sequence_race,
    control_messages,
    signing_keys,
    audit_log,
    prune,
);

/// `run_all` too, so a check added to the suite but not listed above still runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_conformance_suite_passes_on_files() {
    let dir = TempDir::new().expect("temp dir");
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        let path = dir
            .path()
            .join(format!("hub-{}.db", n.fetch_add(1, Ordering::Relaxed)));
        async move { Sqlite::open(&path).expect("open") }
    })
    .await;
}

// --- SQLite only ---

fn device(id: &str) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind: ClientKind::Device,
        public_key: None,
        role: "sensor".to_owned(),
        groups: vec!["kitchen".to_owned()],
        enrollment_code_key: Some([7; 32]),
        enrolled_at: None,
        revoked_at: None,
        created_at: NOW,
    }
}

fn app(id: &str) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind: ClientKind::App,
        public_key: Some(vec![4; 65]),
        role: "controller".to_owned(),
        groups: Vec::new(),
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: NOW,
    }
}

fn access(n: u8) -> IssuedToken {
    IssuedToken {
        cti: [n; 16],
        hash: [n; 32],
        kind: TokenKind::Access,
        subject: "app-a".to_owned(),
        audience: "dev-a".to_owned(),
        scope: "light.read".to_owned(),
        issued_at: NOW,
        expires_at: NOW + 3600,
    }
}

fn grant(n: u8, family: u8) -> GrantRecord {
    GrantRecord {
        hash: [n; 32],
        family: [family; 16],
        client: "app-a".to_owned(),
        kind: TokenKind::Access,
        audience: "dev-a".to_owned(),
        scope: "light.read".to_owned(),
        expires_at: NOW + 86_400,
        created_at: NOW,
    }
}

#[tokio::test]
async fn everything_survives_closing_and_reopening_the_database() {
    let dir = TempDir::new().expect("temp dir");
    let path = db_path(&dir);
    let key = KeyRecord {
        kid: [1; 8],
        public_key: vec![4; 65],
        sealed_private_key: vec![9; 60],
        created_at: NOW,
        active_from: NOW + 60,
        retire_after: Some(NOW + 7200),
        published_at: Some(NOW),
    };
    {
        let store = Sqlite::open(&path).expect("open");
        store.add_client(device("dev-a")).await.expect("add_client");
        store.add_client(app("app-a")).await.expect("add_client");
        store
            .enroll("dev-a", &[5; 65], NOW + 1)
            .await
            .expect("enroll");
        store
            .record_issued(access(1), Some(grant(1, 1)))
            .await
            .expect("record_issued");
        store
            .record_issued(access(2), Some(grant(2, 2)))
            .await
            .expect("record_issued");
        assert!(matches!(
            store.use_grant(&[2; 32], NOW).await.expect("use_grant"),
            GrantUse::Fresh(_)
        ));
        let out = store
            .revoke(vec![Target::TokenHash([2; 32])], NOW, 30, Unmatched::Refuse)
            .await
            .expect("revoke");
        store
            .mark_published(vec![(out.changes[0].stream.clone(), 1, 1)])
            .await
            .expect("mark_published");
        store
            .revoke(
                vec![Target::TokenHash([1; 32])],
                NOW + 1,
                30,
                Unmatched::Refuse,
            )
            .await
            .expect("revoke");
        store.add_key(key.clone()).await.expect("add_key");
        assert!(
            store
                .remember_nonce("app-a", &[3; 16], NOW, NOW + 60)
                .await
                .expect("remember_nonce")
        );
        store
            .audit(vec![tessera_hub::store::AuditEvent {
                at_ms: NOW * 1000,
                actor: "cli".to_owned(),
                action: "register".to_owned(),
                target: "dev-a".to_owned(),
                outcome: "ok".to_owned(),
                reason: "registered".to_owned(),
                count: 1,
            }])
            .await
            .expect("audit");
    }

    let store = Sqlite::open(&path).expect("reopen");
    let mut enrolled = device("dev-a");
    enrolled.public_key = Some(vec![5; 65]);
    enrolled.enrolled_at = Some(NOW + 1);
    enrolled.enrollment_code_key = None;
    assert_eq!(
        store.clients(None).await.expect("clients"),
        [app("app-a"), enrolled]
    );
    assert_eq!(
        store.issued(&[1; 16]).await.expect("issued"),
        Some(access(1))
    );
    // The used grant is still used (a replay is detected), the other still fresh.
    assert!(matches!(
        store.use_grant(&[2; 32], NOW + 2).await.expect("use_grant"),
        GrantUse::Reused(_)
    ));
    assert_eq!(
        store.use_grant(&[1; 32], NOW + 2).await.expect("use_grant"),
        GrantUse::Fresh(grant(1, 1))
    );
    // The unpublished revocation is still to be broadcast; the published one is not.
    let stream = Stream::of_device("dev-a").name().to_string();
    let unpublished = store
        .unpublished_changes(u64::MAX)
        .await
        .expect("unpublished_changes");
    assert_eq!(
        unpublished
            .iter()
            .map(|c| (c.stream.as_str(), c.seq, c.created_at, c.entries.clone()))
            .collect::<Vec<_>>(),
        [(
            stream.as_str(),
            2,
            NOW + 1,
            vec![
                Addressed::new(
                    "dev-a",
                    Entry::Token {
                        hash: [1; 32],
                        expires_at: NOW + 3600 + 30,
                    }
                )
                .expect("id")
            ]
        )]
    );
    let read = store
        .stream_entries(&stream, 1, NOW, 30, usize::MAX)
        .await
        .expect("stream_entries");
    assert_eq!((read.latest, read.changes.len()), (2, 2));
    store
        .record_issued(access(3), None)
        .await
        .expect("record_issued");
    let out = store
        .revoke(
            vec![Target::TokenHash([3; 32])],
            NOW + 2,
            30,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke");
    assert_eq!(out.changes[0].seq, 3, "numbering continues");
    assert_eq!(store.keys().await.expect("keys"), [key]);
    assert!(
        !store
            .remember_nonce("app-a", &[3; 16], NOW + 1, NOW + 61)
            .await
            .expect("remember_nonce"),
        "the nonce cache survives a restart"
    );
    assert_eq!(store.audit_tail(10).await.expect("audit_tail").len(), 1);
}

#[test]
fn opening_applies_the_migrations_and_sets_user_version() {
    let (dir, store) = fresh();
    drop(store);
    assert_eq!(
        pragma(&db_path(&dir), "user_version"),
        Sqlite::SCHEMA_VERSION.to_string()
    );
    const { assert!(Sqlite::SCHEMA_VERSION >= 1) };
    // Reopening an up-to-date database migrates nothing and fails nothing.
    drop(Sqlite::open(&db_path(&dir)).expect("reopen"));
    assert_eq!(
        pragma(&db_path(&dir), "user_version"),
        Sqlite::SCHEMA_VERSION.to_string()
    );
}

#[test]
fn a_database_from_a_newer_hub_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let path = db_path(&dir);
    drop(Sqlite::open(&path).expect("open"));
    let newer = Sqlite::SCHEMA_VERSION + 1;
    rusqlite::Connection::open(&path)
        .expect("open with rusqlite")
        .pragma_update(None, "user_version", newer)
        .expect("set user_version");

    match Sqlite::open(&path) {
        Err(StoreError::Corrupt(message)) => {
            assert!(
                message.contains(&format!("schema version {newer} is newer"))
                    && message.contains("upgrade the hub"),
                "unclear message: {message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Refusing changed nothing.
    assert_eq!(pragma(&path, "user_version"), newer.to_string());
}

#[test]
fn the_database_is_in_wal_mode() {
    let (dir, store) = fresh();
    drop(store);
    // journal_mode=WAL is persistent: a fresh connection sees it.
    assert_eq!(pragma(&db_path(&dir), "journal_mode"), "wal");
}

#[test]
fn a_file_that_is_not_a_database_is_a_backend_error() {
    let dir = TempDir::new().expect("temp dir");
    let path = db_path(&dir);
    std::fs::write(
        &path,
        b"this is not an SQLite database, not even close......",
    )
    .expect("write");
    let r = Sqlite::open(&path);
    assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
}

/// Two handles on one file stand for two hub processes: the write lock, not the in-process
/// mutex, must keep grant use and sequence numbers atomic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handles_on_one_file_cannot_both_use_a_grant() {
    let dir = TempDir::new().expect("temp dir");
    let a = Arc::new(Sqlite::open(&db_path(&dir)).expect("open"));
    let b = Arc::new(Sqlite::open(&db_path(&dir)).expect("open"));
    a.add_client(app("app-a")).await.expect("add_client");
    a.record_issued(access(1), Some(grant(1, 1)))
        .await
        .expect("record_issued");

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.spawn(async move { s.use_grant(&[1; 32], NOW).await.expect("use_grant") });
    }
    let mut fresh = 0;
    while let Some(outcome) = tasks.join_next().await {
        if matches!(outcome.expect("task"), GrantUse::Fresh(_)) {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);

    for n in 10..18 {
        a.record_issued(access(n), None)
            .await
            .expect("record_issued");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let s = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.spawn(async move {
            let out = s
                .revoke(
                    vec![Target::TokenHash([10 + i; 32])],
                    NOW,
                    30,
                    Unmatched::Refuse,
                )
                .await
                .expect("revoke");
            out.changes[0].seq
        });
    }
    let mut seqs = Vec::new();
    while let Some(seq) = tasks.join_next().await {
        seqs.push(seq.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
}

/// Requests committed at once each get their answer only once durable, all of them
/// survive a reopen, and one failing request does not take the others of its batch down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_are_each_durable_and_fail_alone() {
    let dir = TempDir::new().expect("temp dir");
    {
        let store = Arc::new(Sqlite::open(&db_path(&dir)).expect("open"));
        store.add_client(app("app-a")).await.expect("add_client");
        let before = store.write_stats();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..64u8 {
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                // Every eighth reuses a nonce another task used: exactly one of each pair
                // commits.
                let nonce = if n % 8 == 7 { n - 1 } else { n };
                let r = store
                    .commit(RequestCommit {
                        client: "app-a".into(),
                        nonce: [nonce; 16],
                        nonce_expires_at: NOW + 60,
                        now_ms: NOW * 1000,
                        rate: RateLimit::NONE,
                        effect: Effect::Issue {
                            token: access(100 + n),
                            grant: None,
                            spends: None,
                        },
                    })
                    .await
                    .expect("commit");
                (n, r)
            });
        }
        let mut done = 0;
        let mut replays = 0;
        while let Some(result) = tasks.join_next().await {
            match result.expect("task") {
                (_, Ok(Committed::Done)) => done += 1,
                (_, Err(Refused::Replay)) => replays += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((done, replays), (56, 8));
        let stats = store.write_stats();
        assert!(stats.writes - before.writes >= 64, "{stats:?}");
        assert!(stats.transactions - before.transactions <= 64, "{stats:?}");
    }
    let store = Sqlite::open(&db_path(&dir)).expect("reopen");
    let mut recorded = 0;
    for n in 0..64u8 {
        recorded += usize::from(
            store
                .issued(&[100 + n; 16])
                .await
                .expect("issued")
                .is_some(),
        );
    }
    assert_eq!(
        recorded, 56,
        "every committed token survives, no refused one"
    );
}

#[tokio::test]
async fn removing_a_client_removes_its_grants() {
    let (_dir, store) = fresh();
    store.add_client(app("app-a")).await.expect("add_client");
    store
        .record_issued(access(1), Some(grant(1, 1)))
        .await
        .expect("record_issued");
    assert!(store.remove_client("app-a").await.expect("remove_client"));
    // Registered again under the same id, it does not inherit the old grants.
    store.add_client(app("app-a")).await.expect("add_client");
    assert_eq!(
        store.use_grant(&[1; 32], NOW).await.expect("use_grant"),
        GrantUse::Unknown
    );
    // The issued token stays on record.
    assert_eq!(
        store.issued(&[1; 16]).await.expect("issued"),
        Some(access(1))
    );
}

#[tokio::test]
async fn times_beyond_sqlite_integers_are_refused_not_wrapped() {
    let (_dir, store) = fresh();
    store.add_client(app("app-a")).await.expect("add_client");
    let mut forever = access(1);
    forever.expires_at = u64::MAX;
    let r = store.record_issued(forever, None).await;
    assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
    // Nothing was half-written.
    assert_eq!(store.issued(&[1; 16]).await.expect("issued"), None);
    // Query bounds saturate instead: u64::MAX means "everything".
    store
        .record_issued(access(2), None)
        .await
        .expect("record_issued");
    store
        .revoke(vec![Target::TokenHash([2; 32])], NOW, 30, Unmatched::Refuse)
        .await
        .expect("revoke");
    assert_eq!(
        store
            .unpublished_changes(u64::MAX)
            .await
            .expect("unpublished_changes")
            .len(),
        1
    );
    assert_eq!(
        store
            .unsent_controls(u64::MAX, usize::MAX)
            .await
            .expect("unsent_controls"),
        []
    );
}

/// A database of schema version 1 (one global revocation list) is migrated: every old
/// entry that still covers a recorded token moves to the streams of those tokens, as
/// unpublished changes the hub publishes when it starts; entries that cover nothing go.
#[tokio::test]
async fn a_version_1_database_keeps_its_revocations_on_the_new_streams() {
    let dir = TempDir::new().expect("temp dir");
    let path = db_path(&dir);
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(include_str!("schema_v1.sql"))
            .expect("version 1 schema");
        conn.execute_batch(&format!(
            "INSERT INTO clients (id, kind, role, created_at) VALUES ('app-a', 'app', 'c', {NOW});
             INSERT INTO issued_tokens VALUES
                (x'{cti1}', x'{h1}', 'access', 'app-a', 'dev-a', 'door:open', {NOW}, {exp}),
                (x'{cti2}', x'{h2}', 'device', 'dev-b', 'tessera', 'telemetry:write', {NOW}, {exp}),
                (x'{cti3}', x'{h3}', 'device', 'dev-b', 'tessera', 'telemetry:write', {NOW}, {exp3});
             INSERT INTO revocations (seq, created_at, published) VALUES (1, {NOW}, 1), (2, {NOW}, 0);
             INSERT INTO revocation_entries VALUES
                (1, 0, x'{h1}', NULL, NULL, {exp}),
                (1, 1, x'{h9}', NULL, NULL, {exp}),
                (2, 0, NULL, 'dev-b', {before}, {exp});
             PRAGMA user_version = 1;",
            cti1 = "01".repeat(16),
            cti2 = "02".repeat(16),
            cti3 = "03".repeat(16),
            h3 = "33".repeat(32),
            exp3 = NOW + 300,
            h1 = "11".repeat(32),
            h2 = "22".repeat(32),
            h9 = "99".repeat(32),
            exp = NOW + 600,
            before = NOW + 1,
        ))
        .expect("version 1 data");
    }
    let store = Sqlite::open(&path).expect("open migrates");
    assert_eq!(
        pragma(&path, "user_version"),
        Sqlite::SCHEMA_VERSION.to_string()
    );
    let mut changes = store
        .unpublished_changes(u64::MAX)
        .await
        .expect("unpublished_changes");
    changes.sort_by(|a, b| a.stream.cmp(&b.stream));
    let device_stream = Stream::of_device("dev-a").name().to_string();
    // Each entry lasts at least until its token's `exp` plus the largest leeway a policy
    // may set (the old value was the bare `exp` here); the subject entry covering two
    // tokens of one audience is one entry, not one per token.
    let until = NOW + 600 + MAX_LEEWAY;
    let mut expected = vec![
        (
            device_stream,
            vec![
                Addressed::new(
                    "dev-a",
                    Entry::Token {
                        hash: [0x11; 32],
                        expires_at: until,
                    },
                )
                .expect("id"),
            ],
        ),
        (
            "service/tessera".to_owned(),
            vec![
                Addressed::new(
                    "tessera",
                    Entry::for_subject("dev-b", NOW + 1, until).expect("id"),
                )
                .expect("id"),
            ],
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        changes
            .iter()
            .map(|c| (c.stream.clone(), c.entries.clone()))
            .collect::<Vec<_>>(),
        expected
    );
    assert!(changes.iter().all(|c| c.seq == 1));
}

/// A database of the first released schema, with a registry, a signing key, a grant, a
/// nonce and an audit row in it, is migrated to the current schema when opened, and its data
/// is read and changed through the store as if it had always been current.
#[tokio::test]
async fn a_version_1_database_with_data_migrates_and_stays_usable() {
    let dir = TempDir::new().expect("temp dir");
    let path = db_path(&dir);
    let key_k = format!("04{}", "0a".repeat(64));
    let key_a = format!("04{}", "0b".repeat(64));
    let key_o = format!("04{}", "0c".repeat(64));
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(include_str!("schema_v1.sql"))
            .expect("version 1 schema");
        conn.execute_batch(&format!(
            "INSERT INTO clients (id, kind, public_key, role, enrollment_code_key, enrolled_at,
                                  revoked_at, created_at) VALUES
                ('dev-k', 'device', x'{key_k}', 'sensor', NULL, {enrolled}, NULL, {NOW}),
                ('dev-c', 'device', NULL, 'sensor', x'{code}', NULL, NULL, {NOW}),
                ('app-a', 'app', x'{key_a}', 'controller', NULL, NULL, NULL, {NOW}),
                ('ops-a', 'operator', x'{key_o}', 'ops', NULL, NULL, NULL, {NOW});
             INSERT INTO client_groups VALUES
                ('dev-k', 0, 'kitchen'), ('dev-k', 1, 'hall'), ('dev-c', 0, 'hall');
             INSERT INTO signing_keys VALUES
                (x'{kid}', x'{key_a}', x'{sealed}', {NOW}, {NOW}, NULL);
             INSERT INTO counters VALUES ('keyset_version', 7);
             INSERT INTO grants VALUES
                (x'{grant}', x'{family}', 'app-a', 'access', 'dev-k', 'door:open',
                 {grant_exp}, {NOW}, 0, 0);
             INSERT INTO nonces VALUES ('app-a', x'{nonce}', {nonce_exp});
             INSERT INTO audit_log (at_ms, actor, action, target, outcome, reason) VALUES
                ({at_ms}, 'cli', 'register', 'dev-k', 'ok', 'registered');
             PRAGMA user_version = 1;",
            enrolled = NOW + 10,
            code = "07".repeat(32),
            kid = "0d".repeat(8),
            sealed = "0e".repeat(48),
            grant = "44".repeat(32),
            family = "55".repeat(16),
            grant_exp = NOW + 86_400,
            nonce = "66".repeat(16),
            nonce_exp = NOW + 60,
            at_ms = NOW * 1000,
        ))
        .expect("version 1 data");
    }

    let store = Sqlite::open(&path).expect("open migrates");
    assert_eq!(
        pragma(&path, "user_version"),
        Sqlite::SCHEMA_VERSION.to_string()
    );
    // The registry reads back whole.
    let dev_k = store.client("dev-k").await.expect("client").expect("dev-k");
    assert_eq!(dev_k.groups, ["kitchen", "hall"]);
    assert_eq!(
        dev_k.public_key.as_deref(),
        Some(&hex::decode(&key_k).expect("hex")[..])
    );
    assert_eq!(dev_k.enrolled_at, Some(NOW + 10));
    let dev_c = store.client("dev-c").await.expect("client").expect("dev-c");
    assert_eq!(dev_c.enrollment_code_key, Some([7; 32]));
    let ids: Vec<String> = store
        .clients(None)
        .await
        .expect("clients")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["app-a", "dev-c", "dev-k", "ops-a"]);
    // The signing key counts as published (version 1 keys were all published).
    let keys = store.keys().await.expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].published_at, Some(NOW));
    // Grants, nonces and the audit log are still there.
    let grant = store
        .grant(&[0x44; 32])
        .await
        .expect("grant")
        .expect("stored");
    assert_eq!(grant.record.client, "app-a");
    assert!(!grant.used && !grant.family_revoked);
    assert!(
        store
            .nonce_seen("app-a", &[0x66; 16], NOW)
            .await
            .expect("nonce_seen")
    );
    let audit = store.audit_tail(10).await.expect("audit_tail");
    assert_eq!((audit.len(), audit[0].count), (1, 1));

    // And it is usable: revoking a migrated device whole retires its key (a table of a later
    // version), which is then refused for a new device; new clients register.
    store
        .revoke(
            vec![Target::Device("dev-k".to_owned())],
            NOW + 20,
            30,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke a migrated device");
    let dev_k = store.client("dev-k").await.expect("client").expect("dev-k");
    assert_eq!((dev_k.revoked_at, dev_k.public_key), (Some(NOW + 20), None));
    let mut reuse = device("dev-new");
    reuse.public_key = Some(hex::decode(&key_k).expect("hex"));
    reuse.enrollment_code_key = None;
    assert!(matches!(
        store.add_client(reuse).await,
        Err(StoreError::Conflict(_))
    ));
    store.add_client(device("dev-new")).await.expect("add");
    drop(store);
    // Reopening migrates nothing more.
    drop(Sqlite::open(&path).expect("reopen"));
    assert_eq!(
        pragma(&path, "user_version"),
        Sqlite::SCHEMA_VERSION.to_string()
    );
}

/// `device import` looks a whole file's ids and keys up in one query each.
#[tokio::test]
async fn ids_and_retired_keys_are_looked_up_all_at_once() {
    let (_dir, store) = fresh();
    let mut keyed = device("dev-keyed");
    keyed.public_key = Some(vec![4; 65]);
    keyed.enrollment_code_key = None;
    store
        .add_clients(vec![device("dev-a"), keyed, app("app-a")])
        .await
        .expect("add_clients");
    let ids: Vec<String> = (0..10_000).map(|i| format!("new-{i}")).collect();
    let taken = store
        .registered_among(
            ids.into_iter()
                .chain(["dev-a".to_owned(), "app-a".to_owned()])
                .collect(),
        )
        .await
        .expect("registered_among");
    assert_eq!(taken.len(), 2);
    assert!(taken.contains("dev-a") && taken.contains("app-a"));

    assert!(
        store
            .retired_among(vec![vec![4; 65]])
            .await
            .expect("retired_among")
            .is_empty(),
        "a registered key is not retired"
    );
    store
        .revoke(
            vec![Target::Device("dev-keyed".to_owned())],
            NOW,
            30,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke");
    let retired = store
        .retired_among(vec![vec![4; 65], vec![5; 65]])
        .await
        .expect("retired_among");
    assert_eq!(
        retired.into_iter().collect::<Vec<_>>(),
        [(vec![4; 65], "dev-keyed".to_owned())]
    );
}
