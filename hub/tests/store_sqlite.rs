//! The SQLite store on real files: the conformance suite, then what only a database file
//! has (durability across a reopen, migrations, WAL, several handles on one file).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;
use tessera_hub::store::{
    ClientKind, ClientRecord, GrantRecord, GrantUse, IssuedToken, KeyRecord, RevocationRecord,
    Sqlite, Store, StoreError, TokenKind, conformance,
};
use tessera_shared::revocation::Entry;

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
    revocation_log,
    revocation_snapshot,
    revocation_sequence_race,
    signing_keys,
    keyset_version,
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
    let dev_entry = Entry::for_subject("dev-a", NOW, NOW + 3600).expect("subject");
    let key = KeyRecord {
        kid: [1; 8],
        public_key: vec![4; 65],
        sealed_private_key: vec![9; 60],
        created_at: NOW,
        active_from: NOW + 60,
        retire_after: Some(NOW + 7200),
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
        assert_eq!(
            store
                .append_revocation(vec![dev_entry.clone()], NOW)
                .await
                .expect("append_revocation"),
            1
        );
        store
            .append_revocation(
                vec![Entry::Token {
                    hash: [1; 32],
                    expires_at: NOW + 3600,
                }],
                NOW + 1,
            )
            .await
            .expect("append_revocation");
        store.mark_published(1).await.expect("mark_published");
        store.add_key(key.clone()).await.expect("add_key");
        assert_eq!(store.next_keyset_version().await.expect("version"), 1);
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
    assert_eq!(
        store
            .unpublished_revocations()
            .await
            .expect("unpublished_revocations"),
        [RevocationRecord {
            seq: 2,
            entries: vec![Entry::Token {
                hash: [1; 32],
                expires_at: NOW + 3600,
            }],
            created_at: NOW + 1,
            published: false,
        }]
    );
    let (seq, entries) = store
        .revocation_snapshot(NOW, 30)
        .await
        .expect("revocation_snapshot");
    assert_eq!(seq, 2);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0], dev_entry);
    assert_eq!(
        store
            .append_revocation(Vec::new(), NOW + 2)
            .await
            .expect("append_revocation"),
        3,
        "numbering continues"
    );
    assert_eq!(store.keys().await.expect("keys"), [key]);
    assert_eq!(store.next_keyset_version().await.expect("version"), 2);
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

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.spawn(async move {
            s.append_revocation(Vec::new(), NOW)
                .await
                .expect("append_revocation")
        });
    }
    let mut seqs = Vec::new();
    while let Some(seq) = tasks.join_next().await {
        seqs.push(seq.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
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
    let r = store
        .append_revocation(
            vec![Entry::Token {
                hash: [1; 32],
                expires_at: u64::MAX,
            }],
            NOW,
        )
        .await;
    assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
    // Nothing was half-written: the next revocation is still number 1.
    assert_eq!(
        store
            .append_revocation(Vec::new(), NOW)
            .await
            .expect("append_revocation"),
        1
    );
    // Query bounds saturate instead: u64::MAX means "everything".
    store
        .mark_published(u64::MAX)
        .await
        .expect("mark_published");
    assert!(
        store
            .unpublished_revocations()
            .await
            .expect("unpublished_revocations")
            .is_empty()
    );
}
