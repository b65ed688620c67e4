//! Which store failures stop the hub ([`StoreError::is_persistent_write_failure`]), with
//! the errors the SQLite store really returns: a write to a read-only database is one; a
//! database another writer holds locked past the busy timeout is not (it passes), nor is a
//! refusal of one write.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tessera_hub::store::{AuditEvent, Sqlite, Store, StoreError};

fn event() -> AuditEvent {
    AuditEvent {
        at_ms: 1_700_000_000_000,
        actor: "test".into(),
        action: "probe".into(),
        target: String::new(),
        outcome: "ok".into(),
        reason: String::new(),
        count: 1,
    }
}

fn created(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path().join("hub.db");
    drop(Sqlite::create(&path).expect("create"));
    path
}

#[tokio::test]
async fn a_write_to_a_read_only_database_is_a_persistent_write_failure() {
    let dir = TempDir::new().expect("temp dir");
    let path = created(&dir);
    // SQLite's own read-only mode: what a read-only file or file system gives a connection,
    // whoever runs the test (modes do not stop root).
    let uri = format!("file:{}?mode=ro", path.display());
    let store = Sqlite::open(Path::new(&uri)).expect("a read-only database opens");
    let e = store
        .audit(vec![event()])
        .await
        .expect_err("a read-only database takes no write");
    assert!(e.is_persistent_write_failure(), "{e}");
    assert!(e.to_string().contains("readonly"), "{e}");
}

#[tokio::test]
async fn a_database_locked_by_another_writer_past_the_busy_timeout_is_transient() {
    let dir = TempDir::new().expect("temp dir");
    let path = created(&dir);
    let store = Sqlite::open(&path).expect("open");
    let other = rusqlite::Connection::open(&path).expect("another connection");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let e = tokio::time::timeout(Duration::from_secs(30), store.audit(vec![event()]))
        .await
        .expect("the busy timeout ends the wait")
        .expect_err("the lock is held");
    assert!(!e.is_persistent_write_failure(), "{e}");
    other.execute_batch("ROLLBACK").expect("release");
    store
        .audit(vec![event()])
        .await
        .expect("writes again once the lock is released");
}

#[test]
fn a_refusal_of_one_write_is_not_a_storage_failure() {
    for e in [
        StoreError::Conflict("client dev-1 exists".into()),
        StoreError::NotFound("client dev-2".into()),
    ] {
        assert!(!e.is_persistent_write_failure(), "{e}");
    }
    assert!(StoreError::Backend("x: disk I/O error".into()).is_persistent_write_failure());
    assert!(
        StoreError::Backend("x: database or disk is full".into()).is_persistent_write_failure()
    );
    assert!(!StoreError::Backend("x: database is locked".into()).is_persistent_write_failure());
}
