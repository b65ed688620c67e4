//! The PostgreSQL store on the machine's server: the conformance suite, then what only a
//! shared database has (several handles — hub replicas — on one database, retries of lost
//! races, schema creation).
//!
//! The server is at `TESSERA_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/
//! postgres`, trust auth, plain on loopback). Each test creates a database of its own,
//! `tessera_test_<pid>_<n>_<random>`, and drops it when done, a failing test too. A server
//! that cannot be reached fails every test, saying so: CI starts one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tessera_hub::revocation::Target;
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{
    ClientKind, ClientRecord, Committed, Effect, GrantRecord, GrantUse, IssuedToken, Postgres,
    RateLimit, Refused, RequestCommit, Store, StoreError, TokenKind, Unmatched, conformance,
};

const NOW: u64 = 1_700_000_000;

/// The server's URL (any database on it: the tests make their own).
fn server_url() -> String {
    std::env::var("TESSERA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` naming database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{name}{query}")
}

/// An administrative connection to the server.
async fn admin() -> tokio_postgres::Client {
    let url = server_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url} ({e}): these tests need a PostgreSQL \
                 server (CI's .ci/run starts one); start it, or point TESSERA_TEST_POSTGRES at \
                 one (trust auth, plain on loopback)"
            )
        });
    tokio::spawn(conn);
    client
}

/// A database of this test's own, dropped with this (also when the test panics).
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).expect("random bytes");
        let name = format!(
            "tessera_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            hex::encode(random)
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating the test database {name}: {e}"));
        let url = with_database(&server_url(), &name);
        Self { name, url }
    }

    /// A new hub schema in it.
    async fn create(&self) -> Postgres {
        Postgres::create(&self.url)
            .await
            .expect("create the schema")
    }

    /// Another handle on it: another hub replica.
    fn replica(&self) -> Postgres {
        Postgres::open_existing(&self.url).expect("open")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: this may run inside the test's runtime, or while it
        // unwinds. FORCE ends the connections the test's handles still hold.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                admin()
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

// --- the conformance suite, one test per check ---

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        /// The checks listed, in order.
        const LISTED: &[&str] = &[$(stringify!($check)),*];
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let db = TestDb::new().await;
                conformance::$check(db.create().await).await;
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
    commit_refusals_record_nothing,
    commit_spending_a_used_grant_keeps_the_family_revoked,
    commit_grant_race,
    request_reads,
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
    audit_query_filters,
    prune,
);

/// Every check `run_all` runs is listed above (one database each), so a check added to
/// the suite cannot be missed here; running `run_all` itself would repeat every check.
#[test]
fn every_check_of_the_suite_is_listed() {
    let suite = include_str!("../src/store/conformance.rs");
    let body = suite
        .split_once("pub async fn run_all")
        .and_then(|(_, rest)| rest.split_once("\n}\n"))
        .map(|(body, _)| body)
        .expect("run_all in conformance.rs");
    let in_suite: Vec<&str> = body
        .lines()
        .filter_map(|l| l.trim().strip_suffix("(make().await).await;"))
        .collect();
    assert!(in_suite.len() >= 30, "run_all not read: {in_suite:?}");
    assert_eq!(in_suite, LISTED, "the list above and run_all differ");
}

// --- PostgreSQL only ---

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

/// Two handles, as two replicas would hold; `i` picks one.
fn either<'a>(a: &'a Arc<Postgres>, b: &'a Arc<Postgres>, i: usize) -> Arc<Postgres> {
    Arc::clone(if i.is_multiple_of(2) { a } else { b })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_spend_a_grant_once_and_issue_once_with_it() {
    let db = TestDb::new().await;
    let a = Arc::new(db.create().await);
    let b = Arc::new(db.replica());
    a.add_client(app("app-a")).await.expect("add_client");
    a.record_issued(access(1), Some(grant(1, 1)))
        .await
        .expect("record_issued");

    // Refreshes presenting the same grant, each issuing a new token and grant.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12u8 {
        let s = either(&a, &b, usize::from(i));
        tasks.spawn(async move {
            s.commit(RequestCommit {
                client: "app-a".to_owned(),
                nonce: [100 + i; 16],
                nonce_expires_at: NOW + 60,
                now_ms: NOW * 1000,
                rate: RateLimit::NONE,
                effect: Effect::Issue {
                    token: access(20 + i),
                    grant: Some(grant(20 + i, 1)),
                    spends: Some([1; 32]),
                },
            })
            .await
            .expect("commit")
        });
    }
    let mut issued = 0;
    let mut reused = 0;
    while let Some(done) = tasks.join_next().await {
        match done.expect("task") {
            Ok(Committed::Done) => issued += 1,
            Err(Refused::Grant(GrantUse::Reused(_))) => reused += 1,
            // After the reuse revoked the family.
            Err(Refused::Grant(GrantUse::Revoked(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(issued, 1, "one token issued with the grant");
    assert!(reused >= 1, "a second use is a reuse");
    let state = b.grant(&[1; 32]).await.expect("grant").expect("stored");
    assert!(state.used && state.family_revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_holds_the_lease_and_another_takes_it_when_it_is_gone() {
    let db = TestDb::new().await;
    let a = db.create().await;
    let b = db.replica();
    let c = db.replica();
    assert!(
        a.hold_lease().await.expect("lease"),
        "the first to try takes it"
    );
    assert!(a.hold_lease().await.expect("lease"), "and keeps it");
    assert!(
        !b.hold_lease().await.expect("lease"),
        "one holder at a time"
    );
    assert!(!c.hold_lease().await.expect("lease"));
    // The holder's process dies: its connections close, the server releases the lock.
    drop(a);
    tokio::time::timeout(Duration::from_secs(30), async {
        while !b.hold_lease().await.expect("lease") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("another replica takes the lease once its holder is gone");
    assert!(!c.hold_lease().await.expect("lease"), "still one holder");
    assert!(b.hold_lease().await.expect("lease"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_accept_a_nonce_once() {
    let db = TestDb::new().await;
    let a = Arc::new(db.create().await);
    let b = Arc::new(db.replica());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let s = either(&a, &b, i);
        tasks.spawn(async move {
            s.remember_nonce("dev-a", &[9; 16], NOW, NOW + 60)
                .await
                .expect("remember_nonce")
        });
    }
    let mut fresh = 0;
    while let Some(ok) = tasks.join_next().await {
        fresh += usize::from(ok.expect("task"));
    }
    assert_eq!(fresh, 1);
    assert!(b.nonce_seen("dev-a", &[9; 16], NOW).await.expect("read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequence_numbers_are_gapless_across_replicas_and_marked_exactly() {
    let db = TestDb::new().await;
    let a = Arc::new(db.create().await);
    let b = Arc::new(db.replica());
    a.add_client(app("app-a")).await.expect("add_client");
    const N: u8 = 16;
    for n in 0..N {
        a.record_issued(access(10 + n), None)
            .await
            .expect("record_issued");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = either(&a, &b, usize::from(i));
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
            assert_eq!(out.changes.len(), 1);
            out.changes[0].seq
        });
    }
    let mut seqs = Vec::new();
    while let Some(seq) = tasks.join_next().await {
        seqs.push(seq.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=u64::from(N)).collect::<Vec<u64>>());
    let streams = b.streams().await.expect("streams");
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].seq, u64::from(N));

    // One replica's echo of delta 5 marks delta 5, not the 4 before it.
    let stream = streams[0].name.clone();
    b.mark_published(vec![(stream.clone(), 5, 5)])
        .await
        .expect("mark_published");
    let unpublished: Vec<u64> = a
        .unpublished_changes(NOW)
        .await
        .expect("unpublished")
        .iter()
        .map(|c| c.seq)
        .collect();
    let expected: Vec<u64> = (1..=u64::from(N)).filter(|&s| s != 5).collect();
    assert_eq!(unpublished, expected);
}

/// A transaction that loses a race to another (here a raw transaction holding the
/// stream's counter row) fails with a serialization failure, and the store runs it again
/// instead of reporting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serialization_failure_is_retried_inside_the_store() {
    let db = TestDb::new().await;
    let store = Arc::new(db.create().await);
    store.add_client(app("app-a")).await.expect("add_client");
    for n in 1..=2 {
        store
            .record_issued(access(n), None)
            .await
            .expect("record_issued");
    }
    let first = store
        .revoke(vec![Target::TokenHash([1; 32])], NOW, 30, Unmatched::Refuse)
        .await
        .expect("first revoke");
    let stream = first.changes[0].stream.clone();

    let (mut raw, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("raw connection");
    tokio::spawn(conn);
    let raw_tx = raw.transaction().await.expect("begin");
    raw_tx
        .execute(
            "UPDATE revocation_streams SET snapshot_pages = snapshot_pages WHERE name = $1",
            &[&stream],
        )
        .await
        .expect("lock the counter row");

    let revoking = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .revoke(vec![Target::TokenHash([2; 32])], NOW, 30, Unmatched::Refuse)
                .await
        })
    };
    // Wait until the store's transaction waits for the row, then let the raw one commit.
    let watcher = admin().await;
    let mut waited = Duration::ZERO;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&db.name],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(waited < Duration::from_secs(30), "the store never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    raw_tx.commit().await.expect("commit the raw transaction");

    let second = revoking.await.expect("task").expect("revoke after a retry");
    assert_eq!(second.changes[0].seq, 2, "no gap after the retry");
    assert!(store.retries() >= 1, "the lost race was retried");
}

#[tokio::test]
async fn init_creates_the_schema_once_and_serve_needs_it() {
    let db = TestDb::new().await;
    // An empty database: the first use of an existing-hub handle says there is no hub.
    let err = db
        .replica()
        .keys()
        .await
        .expect_err("no schema in an empty database");
    assert!(matches!(err, StoreError::NoDatabase { .. }), "{err:?}");
    let store = db.create().await;
    assert!(store.keys().await.expect("keys").is_empty());
    let again = Postgres::create(&db.url).await;
    assert!(
        matches!(again, Err(StoreError::DatabaseExists { .. })),
        "{again:?}"
    );
    db.replica().check_writable().await.expect("writable");
}

#[tokio::test]
async fn an_unknown_database_is_a_database_error_with_its_source() {
    let url = with_database(&server_url(), "tessera_no_such_database");
    let err = Postgres::open(&url).await.expect_err("no such database");
    assert!(
        matches!(
            err,
            StoreError::Database {
                persistent: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some());
    assert!(
        err.to_string().contains("tessera_no_such_database"),
        "{err}"
    );
}
