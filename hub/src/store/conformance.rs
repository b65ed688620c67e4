//! The conformance suite every [`Store`] backend must pass.
//!
//! This is test code compiled into the library, so that the integration tests of any backend
//! (SQLite here, PostgreSQL elsewhere) run the same checks: each check takes a fresh, empty
//! store, drives it through the trait only, and panics (`assert!`, `expect`) on the first
//! deviation. Nothing in the hub calls it.
//!
//! Every time is passed explicitly, so no check sleeps, reads a clock or depends on timing;
//! the concurrency checks spawn tasks and hold for any interleaving. Backend-specific
//! properties (durability across a reopen, schema migrations, several handles on one
//! database) belong in that backend's own tests.
//!
//! Run everything with [`run_all`], or call the checks one by one to get one test each.

use std::future::Future;
use std::sync::Arc;

use tessera_shared::revocation::Entry;

use super::{
    AuditEvent, ClientKind, ClientRecord, GrantRecord, GrantUse, IssuedToken, KeyRecord, Pruned,
    RevocationRecord, Store, StoreError, TokenKind,
};

/// An arbitrary "now" for the checks, Unix seconds.
const NOW: u64 = 1_700_000_000;

/// How many tasks the concurrency checks race.
const RACERS: usize = 8;

/// Runs every check, each on a store from `make`, which must return a fresh, empty store
/// every time it is called.
pub async fn run_all<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    registry(make().await).await;
    enrollment(make().await).await;
    client_revocation(make().await).await;
    nonces(make().await).await;
    nonces_race(make().await).await;
    rate_limit(make().await).await;
    rate_limit_race(make().await).await;
    issued_tokens(make().await).await;
    record_issued_is_atomic(make().await).await;
    grant_lifecycle(make().await).await;
    grant_check_order(make().await).await;
    grant_use_race(make().await).await;
    revoke_grants_of(make().await).await;
    revocation_log(make().await).await;
    revocation_snapshot(make().await).await;
    revocation_sequence_race(make().await).await;
    signing_keys(make().await).await;
    keyset_version(make().await).await;
    audit_log(make().await).await;
    prune(make().await).await;
}

// --- fixtures ---

fn public_key(n: u8) -> Vec<u8> {
    let mut key = vec![n; 65];
    key[0] = 0x04;
    key
}

fn device(id: &str) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind: ClientKind::Device,
        public_key: None,
        role: "sensor".to_owned(),
        // Deliberately not in alphabetical order: the order is kept.
        groups: vec!["kitchen".to_owned(), "ground-floor".to_owned()],
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
        public_key: Some(public_key(1)),
        role: "controller".to_owned(),
        groups: Vec::new(),
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: NOW + 1,
    }
}

fn operator(id: &str) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind: ClientKind::Operator,
        public_key: Some(public_key(2)),
        role: "admin".to_owned(),
        groups: Vec::new(),
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: NOW + 2,
    }
}

fn token(
    n: u8,
    kind: TokenKind,
    subject: &str,
    audience: &str,
    issued_at: u64,
    expires_at: u64,
) -> IssuedToken {
    IssuedToken {
        cti: [n; 16],
        hash: [n; 32],
        kind,
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        scope: "light.read light.write".to_owned(),
        issued_at,
        expires_at,
    }
}

/// An access token for `app` numbered `n`, valid for an hour from [`NOW`].
fn access(n: u8, app: &str) -> IssuedToken {
    token(n, TokenKind::Access, app, "dev-a", NOW, NOW + 3600)
}

fn grant(n: u8, family: u8, client: &str, expires_at: u64) -> GrantRecord {
    GrantRecord {
        hash: [n; 32],
        family: [family; 16],
        client: client.to_owned(),
        kind: TokenKind::Access,
        audience: "dev-a".to_owned(),
        scope: "light.read".to_owned(),
        expires_at,
        created_at: NOW,
    }
}

fn token_entry(n: u8, expires_at: u64) -> Entry {
    Entry::Token {
        hash: [n; 32],
        expires_at,
    }
}

fn subject_entry(subject: &str, issued_before: u64, expires_at: u64) -> Entry {
    Entry::for_subject(subject, issued_before, expires_at).expect("a valid subject")
}

fn key_record(n: u8, created_at: u64) -> KeyRecord {
    KeyRecord {
        kid: [n; 8],
        public_key: public_key(n),
        sealed_private_key: vec![n; 60],
        created_at,
        active_from: created_at + 60,
        retire_after: None,
    }
}

fn event(n: u64) -> AuditEvent {
    AuditEvent {
        at_ms: NOW * 1000 + n,
        actor: format!("app-{n}"),
        action: "access_token".to_owned(),
        target: "dev-a".to_owned(),
        outcome: if n.is_multiple_of(2) { "ok" } else { "denied" }.to_owned(),
        reason: format!("event {n}"),
    }
}

fn is_conflict<T>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict(_)))
}

fn is_not_found<T>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound(_)))
}

/// Records `t` with grant `g`, for checks about grants.
async fn record<S: Store>(store: &S, t: IssuedToken, g: &GrantRecord) {
    store
        .record_issued(t, Some(g.clone()))
        .await
        .expect("record_issued");
}

/// Runs `RACERS` copies of `f` at once and returns their results (in completion order).
async fn race<S, T, F, Fut>(store: &Arc<S>, f: F) -> Vec<T>
where
    S: Store,
    T: Send + 'static,
    F: Fn(Arc<S>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..RACERS {
        tasks.spawn(f(Arc::clone(store)));
    }
    let mut out = Vec::with_capacity(RACERS);
    while let Some(result) = tasks.join_next().await {
        out.push(result.expect("a racing task panicked"));
    }
    out
}

fn sorted_by_cti(mut tokens: Vec<IssuedToken>) -> Vec<IssuedToken> {
    tokens.sort_by_key(|t| t.cti);
    tokens
}

// --- registry ---

/// Clients are added, read, listed by kind in id order, changed and removed; a duplicate id
/// is a conflict.
pub async fn registry<S: Store>(store: S) {
    assert_eq!(store.clients(None).await.expect("clients"), []);
    assert_eq!(store.client("dev-a").await.expect("client"), None);

    for c in [
        device("dev-b"),
        app("app-a"),
        operator("op-a"),
        device("dev-a"),
    ] {
        store.add_client(c).await.expect("add_client");
    }
    assert_eq!(
        store.client("dev-b").await.expect("client"),
        Some(device("dev-b"))
    );
    assert_eq!(
        store.client("app-a").await.expect("client"),
        Some(app("app-a"))
    );
    assert_eq!(
        store.clients(None).await.expect("clients"),
        [
            app("app-a"),
            device("dev-a"),
            device("dev-b"),
            operator("op-a")
        ]
    );
    assert_eq!(
        store
            .clients(Some(ClientKind::Device))
            .await
            .expect("clients"),
        [device("dev-a"), device("dev-b")]
    );
    assert_eq!(
        store.clients(Some(ClientKind::App)).await.expect("clients"),
        [app("app-a")]
    );
    assert_eq!(
        store
            .clients(Some(ClientKind::Operator))
            .await
            .expect("clients"),
        [operator("op-a")]
    );

    // A duplicate id is refused and changes nothing, whatever its kind.
    let mut other = app("dev-b");
    other.role = "intruder".to_owned();
    let r = store.add_client(other).await;
    assert!(is_conflict(&r), "duplicate id: {r:?}");
    assert_eq!(
        store.client("dev-b").await.expect("client"),
        Some(device("dev-b"))
    );

    store.set_role("dev-b", "camera").await.expect("set_role");
    let mut expected = device("dev-b");
    expected.role = "camera".to_owned();
    assert_eq!(store.client("dev-b").await.expect("client"), Some(expected));
    let r = store.set_role("nobody", "camera").await;
    assert!(is_not_found(&r), "set_role of an unknown client: {r:?}");

    assert!(store.remove_client("dev-b").await.expect("remove_client"));
    assert_eq!(store.client("dev-b").await.expect("client"), None);
    assert!(!store.remove_client("dev-b").await.expect("remove_client"));
    assert_eq!(
        store
            .clients(Some(ClientKind::Device))
            .await
            .expect("clients"),
        [device("dev-a")]
    );

    // The id is free again, and nothing of the old record (its groups) comes back.
    let mut again = device("dev-b");
    again.groups = vec!["attic".to_owned()];
    store.add_client(again.clone()).await.expect("add_client");
    assert_eq!(store.client("dev-b").await.expect("client"), Some(again));
}

/// Enrollment sets the key and time and consumes the code; repeating it with the same key
/// changes nothing; another key, or an unknown device, is refused.
pub async fn enrollment<S: Store>(store: S) {
    store.add_client(device("dev-a")).await.expect("add_client");
    store
        .enroll("dev-a", &public_key(1), NOW + 10)
        .await
        .expect("enroll");
    let mut enrolled = device("dev-a");
    enrolled.public_key = Some(public_key(1));
    enrolled.enrolled_at = Some(NOW + 10);
    enrolled.enrollment_code_key = None;
    assert_eq!(
        store.client("dev-a").await.expect("client"),
        Some(enrolled.clone())
    );

    store
        .enroll("dev-a", &public_key(1), NOW + 20)
        .await
        .expect("enrolling again with the same key");
    assert_eq!(
        store.client("dev-a").await.expect("client"),
        Some(enrolled.clone())
    );

    let r = store.enroll("dev-a", &public_key(2), NOW + 30).await;
    assert!(is_conflict(&r), "enrolling with another key: {r:?}");
    assert_eq!(store.client("dev-a").await.expect("client"), Some(enrolled));

    // A device registered with a key cannot enroll with another one.
    let mut provisioned = device("dev-b");
    provisioned.public_key = Some(public_key(3));
    store.add_client(provisioned).await.expect("add_client");
    let r = store.enroll("dev-b", &public_key(4), NOW).await;
    assert!(is_conflict(&r), "enrolling over a registered key: {r:?}");

    let r = store.enroll("nobody", &public_key(1), NOW).await;
    assert!(is_not_found(&r), "enrolling an unknown client: {r:?}");
}

/// Revoking a client records when, clears a device's enrollment (key, time, code) but keeps
/// the record; a revoked device cannot enroll again, not even with its old key.
pub async fn client_revocation<S: Store>(store: S) {
    store.add_client(device("dev-a")).await.expect("add_client");
    store.add_client(device("dev-b")).await.expect("add_client");
    store.add_client(app("app-a")).await.expect("add_client");
    store
        .enroll("dev-a", &public_key(1), NOW + 10)
        .await
        .expect("enroll");

    store
        .revoke_client("dev-a", NOW + 100)
        .await
        .expect("revoke_client");
    let mut revoked = device("dev-a");
    revoked.revoked_at = Some(NOW + 100);
    revoked.public_key = None;
    revoked.enrolled_at = None;
    revoked.enrollment_code_key = None;
    assert_eq!(store.client("dev-a").await.expect("client"), Some(revoked));
    let r = store.enroll("dev-a", &public_key(1), NOW + 200).await;
    assert!(is_conflict(&r), "enrolling a revoked device: {r:?}");

    // A device revoked before enrolling loses its unused code.
    store
        .revoke_client("dev-b", NOW + 100)
        .await
        .expect("revoke_client");
    let rec = store.client("dev-b").await.expect("client").expect("kept");
    assert_eq!(rec.revoked_at, Some(NOW + 100));
    assert_eq!(rec.enrollment_code_key, None);
    let r = store.enroll("dev-b", &public_key(2), NOW + 200).await;
    assert!(is_conflict(&r), "enrolling a revoked device: {r:?}");

    store
        .revoke_client("app-a", NOW + 5)
        .await
        .expect("revoke_client");
    let rec = store.client("app-a").await.expect("client").expect("kept");
    assert_eq!(rec.revoked_at, Some(NOW + 5));
    assert_eq!(store.clients(None).await.expect("clients").len(), 3);

    let r = store.revoke_client("nobody", NOW).await;
    assert!(is_not_found(&r), "revoking an unknown client: {r:?}");
}

// --- replay and rate limiting ---

/// A nonce is refused while recorded (through its `expires_at`), per client, and accepted
/// again once expired; a refused replay does not extend the record.
pub async fn nonces<S: Store>(store: S) {
    let (n1, n2) = ([1; 16], [2; 16]);
    let remember = |client: &'static str, nonce: [u8; 16], now: u64| {
        let store = &store;
        async move {
            store
                .remember_nonce(client, &nonce, now, now + 60)
                .await
                .expect("remember_nonce")
        }
    };
    assert!(remember("app-a", n1, NOW).await, "first use");
    assert!(!remember("app-a", n1, NOW + 30).await, "replay");
    assert!(
        !remember("app-a", n1, NOW + 60).await,
        "replay at expires_at"
    );
    assert!(
        remember("app-b", n1, NOW + 30).await,
        "another client's nonce"
    );
    assert!(remember("app-a", n2, NOW + 30).await, "another nonce");
    // Expired at NOW + 60 (the replays above did not extend it): a new request.
    assert!(remember("app-a", n1, NOW + 61).await, "after expiry");
    assert!(
        !remember("app-a", n1, NOW + 62).await,
        "replay of the new one"
    );
    // Pruning expired nonces forgets nothing unexpired.
    assert!(
        !remember("app-b", n1, NOW + 90).await,
        "unexpired, other client"
    );
    assert!(
        remember("app-b", n1, NOW + 91).await,
        "expired, other client"
    );
}

/// Of many replicas presented the same nonce at once, exactly one accepts it.
pub async fn nonces_race<S: Store>(store: S) {
    let store = Arc::new(store);
    let accepted = race(&store, |s| async move {
        s.remember_nonce("app-a", &[9; 16], NOW, NOW + 60)
            .await
            .expect("remember_nonce")
    })
    .await;
    assert_eq!(accepted.iter().filter(|a| **a).count(), 1, "{accepted:?}");
}

/// The bucket holds `burst` tokens, refills at `per_second` up to `burst`, is kept per
/// client, and a clock going backwards refills nothing.
pub async fn rate_limit<S: Store>(store: S) {
    let t0 = NOW * 1000;
    let take = |client: &'static str, now_ms: u64, burst: u32, per_second: f64| {
        let store = &store;
        async move {
            store
                .take_rate_token(client, now_ms, burst, per_second)
                .await
                .expect("take_rate_token")
        }
    };
    for i in 0..3 {
        assert!(take("app-a", t0, 3, 1.0).await, "token {i} of the burst");
    }
    assert!(!take("app-a", t0, 3, 1.0).await, "burst spent");
    assert!(!take("app-a", t0 + 999, 3, 1.0).await, "not yet refilled");
    assert!(
        take("app-a", t0 + 1000, 3, 1.0).await,
        "one token after 1 s"
    );
    assert!(!take("app-a", t0 + 1000, 3, 1.0).await, "and only one");
    // A long pause refills to the burst, no further.
    for i in 0..3 {
        assert!(take("app-a", t0 + 100_000, 3, 1.0).await, "token {i}");
    }
    assert!(
        !take("app-a", t0 + 100_000, 3, 1.0).await,
        "capped at burst"
    );
    // An earlier time (a replica with a slower clock) refills nothing, and breaks nothing.
    assert!(!take("app-a", t0, 3, 1.0).await, "clock went back");
    assert!(take("app-a", t0 + 101_000, 3, 1.0).await, "refilled after");

    // Buckets are per client.
    assert!(take("app-b", t0 + 100_000, 3, 1.0).await, "another client");

    // Fractional rates.
    assert!(take("app-c", t0, 1, 0.5).await);
    assert!(
        !take("app-c", t0 + 1999, 1, 0.5).await,
        "half a token per second"
    );
    assert!(take("app-c", t0 + 2000, 1, 0.5).await);

    // No burst, no tokens.
    assert!(!take("app-d", t0, 0, 10.0).await, "burst 0");
}

/// Of many requests racing for a bucket, exactly `burst` get a token.
pub async fn rate_limit_race<S: Store>(store: S) {
    let store = Arc::new(store);
    let taken = race(&store, |s| async move {
        s.take_rate_token("app-a", NOW * 1000, 3, 1.0)
            .await
            .expect("take_rate_token")
    })
    .await;
    assert_eq!(taken.iter().filter(|t| **t).count(), 3, "{taken:?}");
}

// --- issuance ---

/// Issued tokens are found by `cti`, by subject and by audience, unexpired ones only
/// (a token is expired from its `expires_at` on).
pub async fn issued_tokens<S: Store>(store: S) {
    let device_token = token(
        1,
        TokenKind::Device,
        "dev-a",
        "tessera-hub",
        NOW,
        NOW + 3600,
    );
    let a_to_a = token(2, TokenKind::Access, "app-a", "dev-a", NOW, NOW + 300);
    let a_to_b = token(3, TokenKind::Access, "app-a", "dev-b", NOW + 10, NOW + 600);
    let b_to_a = token(4, TokenKind::Access, "app-b", "dev-a", NOW + 20, NOW + 900);
    for t in [&device_token, &a_to_a, &a_to_b, &b_to_a] {
        store
            .record_issued(t.clone(), None)
            .await
            .expect("record_issued");
    }

    assert_eq!(
        store.issued(&[2; 16]).await.expect("issued"),
        Some(a_to_a.clone())
    );
    assert_eq!(store.issued(&[9; 16]).await.expect("issued"), None);

    let to = |subject: &'static str, now: u64| {
        let store = &store;
        async move { sorted_by_cti(store.issued_to(subject, now).await.expect("issued_to")) }
    };
    assert_eq!(to("app-a", NOW).await, [a_to_a.clone(), a_to_b.clone()]);
    assert_eq!(
        to("app-a", NOW + 299).await,
        [a_to_a.clone(), a_to_b.clone()]
    );
    assert_eq!(to("app-a", NOW + 300).await, vec![a_to_b.clone()]);
    assert_eq!(to("app-a", NOW + 600).await, []);
    assert_eq!(to("dev-a", NOW).await, [device_token]);
    assert_eq!(to("nobody", NOW).await, []);

    let aimed_at = |audience: &'static str, now: u64| {
        let store = &store;
        async move { sorted_by_cti(store.issued_for(audience, now).await.expect("issued_for")) }
    };
    assert_eq!(aimed_at("dev-a", NOW).await, [a_to_a, b_to_a.clone()]);
    assert_eq!(aimed_at("dev-a", NOW + 300).await, [b_to_a]);
    assert_eq!(aimed_at("dev-b", NOW + 599).await, [a_to_b]);
    assert_eq!(aimed_at("dev-c", NOW).await, []);
}

/// A token and its grant are recorded together or not at all; a duplicate `cti` or grant
/// hash is a conflict.
pub async fn record_issued_is_atomic<S: Store>(store: S) {
    store.add_client(app("app-a")).await.expect("add_client");
    let g1 = grant(1, 1, "app-a", NOW + 1000);
    record(&store, access(1, "app-a"), &g1).await;

    // Duplicate cti: the new grant is not recorded either.
    let g2 = grant(2, 2, "app-a", NOW + 1000);
    let r = store.record_issued(access(1, "app-a"), Some(g2)).await;
    assert!(is_conflict(&r), "duplicate cti: {r:?}");
    assert_eq!(
        store.use_grant(&[2; 32], NOW).await.expect("use_grant"),
        GrantUse::Unknown
    );

    // Duplicate grant: the new token is not recorded either.
    let r = store.record_issued(access(3, "app-a"), Some(g1)).await;
    assert!(is_conflict(&r), "duplicate grant: {r:?}");
    assert_eq!(store.issued(&[3; 16]).await.expect("issued"), None);
    assert_eq!(
        store
            .issued_to("app-a", NOW)
            .await
            .expect("issued_to")
            .len(),
        1
    );
}

/// A grant is used once; presenting it again revokes its family, including the grant it
/// was rotated into and any grant rotated into the family later; other families are not
/// affected; an expired grant and an unknown hash are reported as such.
pub async fn grant_lifecycle<S: Store>(store: S) {
    store.add_client(app("app-a")).await.expect("add_client");
    let g1 = grant(1, 1, "app-a", NOW + 1000);
    record(&store, access(1, "app-a"), &g1).await;
    assert_eq!(
        store.use_grant(&g1.hash, NOW).await.expect("use_grant"),
        GrantUse::Fresh(g1.clone())
    );

    // Rotation: the refresh issued g2 in the same family.
    let g2 = grant(2, 1, "app-a", NOW + 1000);
    record(&store, access(2, "app-a"), &g2).await;

    // g1 is replayed (someone kept a copy): the family is revoked.
    assert_eq!(
        store
            .use_grant(&g1.hash, NOW + 10)
            .await
            .expect("use_grant"),
        GrantUse::Reused(g1.clone())
    );
    assert_eq!(
        store
            .use_grant(&g2.hash, NOW + 11)
            .await
            .expect("use_grant"),
        GrantUse::Revoked(g2)
    );
    assert_eq!(
        store
            .use_grant(&g1.hash, NOW + 12)
            .await
            .expect("use_grant"),
        GrantUse::Revoked(g1)
    );

    // Another replica rotating into the family after the reuse was detected.
    let g3 = grant(3, 1, "app-a", NOW + 1000);
    record(&store, access(3, "app-a"), &g3).await;
    assert_eq!(
        store
            .use_grant(&g3.hash, NOW + 13)
            .await
            .expect("use_grant"),
        GrantUse::Revoked(g3)
    );

    // Other families are unaffected.
    let g4 = grant(4, 2, "app-a", NOW + 500);
    record(&store, access(4, "app-a"), &g4).await;
    assert_eq!(
        store
            .use_grant(&g4.hash, NOW + 499)
            .await
            .expect("use_grant"),
        GrantUse::Fresh(g4)
    );

    // Expired from its expires_at on.
    let g5 = grant(5, 3, "app-a", NOW + 500);
    record(&store, access(5, "app-a"), &g5).await;
    assert_eq!(
        store
            .use_grant(&g5.hash, NOW + 500)
            .await
            .expect("use_grant"),
        GrantUse::Expired(g5)
    );

    assert_eq!(
        store.use_grant(&[99; 32], NOW).await.expect("use_grant"),
        GrantUse::Unknown
    );
}

/// The order of the checks: a revoked family beats expiry, and expiry beats reuse.
pub async fn grant_check_order<S: Store>(store: S) {
    store.add_client(app("app-a")).await.expect("add_client");

    let used = grant(1, 1, "app-a", NOW + 100);
    record(&store, access(1, "app-a"), &used).await;
    assert!(matches!(
        store.use_grant(&used.hash, NOW).await.expect("use_grant"),
        GrantUse::Fresh(_)
    ));
    assert_eq!(
        store
            .use_grant(&used.hash, NOW + 100)
            .await
            .expect("use_grant"),
        GrantUse::Expired(used)
    );

    let revoked = grant(2, 2, "app-a", NOW + 100);
    record(&store, access(2, "app-a"), &revoked).await;
    assert!(matches!(
        store
            .use_grant(&revoked.hash, NOW)
            .await
            .expect("use_grant"),
        GrantUse::Fresh(_)
    ));
    assert!(matches!(
        store
            .use_grant(&revoked.hash, NOW + 1)
            .await
            .expect("use_grant"),
        GrantUse::Reused(_)
    ));
    assert_eq!(
        store
            .use_grant(&revoked.hash, NOW + 200)
            .await
            .expect("use_grant"),
        GrantUse::Revoked(revoked)
    );
}

/// Of many replicas presented the same fresh grant at once, exactly one gets `Fresh`; the
/// next one detects the reuse and the rest find the family revoked.
pub async fn grant_use_race<S: Store>(store: S) {
    store.add_client(app("app-a")).await.expect("add_client");
    let g = grant(1, 1, "app-a", NOW + 1000);
    record(&store, access(1, "app-a"), &g).await;
    let store = Arc::new(store);
    let outcomes = race(&store, |s| async move {
        s.use_grant(&[1; 32], NOW).await.expect("use_grant")
    })
    .await;
    let count = |f: fn(&GrantUse) -> bool| outcomes.iter().filter(|o| f(o)).count();
    assert_eq!(
        count(|o| matches!(o, GrantUse::Fresh(_))),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        count(|o| matches!(o, GrantUse::Reused(_))),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        count(|o| matches!(o, GrantUse::Revoked(_))),
        RACERS - 2,
        "{outcomes:?}"
    );
}

/// Revoking a client's grants revokes every family it has (counting the grants that were
/// still usable), and nothing of other clients or of families issued afterwards.
pub async fn revoke_grants_of<S: Store>(store: S) {
    store.add_client(app("app-a")).await.expect("add_client");
    store.add_client(app("app-b")).await.expect("add_client");
    let a1 = grant(1, 1, "app-a", NOW + 1000);
    let b1 = grant(2, 2, "app-a", NOW + 1000);
    let b2 = grant(3, 2, "app-a", NOW + 1000);
    let other = grant(4, 3, "app-b", NOW + 1000);
    record(&store, access(1, "app-a"), &a1).await;
    record(&store, access(2, "app-a"), &b1).await;
    assert!(matches!(
        store.use_grant(&b1.hash, NOW).await.expect("use_grant"),
        GrantUse::Fresh(_)
    ));
    record(&store, access(3, "app-a"), &b2).await;
    record(&store, access(4, "app-b"), &other).await;

    // a1 and b2 were usable; b1 was used already.
    assert_eq!(
        store
            .revoke_grants_of("app-a")
            .await
            .expect("revoke_grants_of"),
        2
    );
    for g in [a1, b1, b2] {
        assert_eq!(
            store.use_grant(&g.hash, NOW + 1).await.expect("use_grant"),
            GrantUse::Revoked(g)
        );
    }
    assert_eq!(
        store
            .use_grant(&other.hash, NOW + 1)
            .await
            .expect("use_grant"),
        GrantUse::Fresh(other)
    );
    assert_eq!(
        store
            .revoke_grants_of("app-a")
            .await
            .expect("revoke_grants_of"),
        0
    );
    assert_eq!(
        store
            .revoke_grants_of("nobody")
            .await
            .expect("revoke_grants_of"),
        0
    );

    let later = grant(5, 4, "app-a", NOW + 1000);
    record(&store, access(5, "app-a"), &later).await;
    assert_eq!(
        store
            .use_grant(&later.hash, NOW + 2)
            .await
            .expect("use_grant"),
        GrantUse::Fresh(later)
    );
}

// --- revocation ---

fn revocation(seq: u64, entries: Vec<Entry>, created_at: u64) -> RevocationRecord {
    RevocationRecord {
        seq,
        entries,
        created_at,
        published: false,
    }
}

/// Revocations are numbered 1, 2, 3… and stay unpublished, entries intact and in order,
/// until marked; marking covers every earlier one and never goes back.
pub async fn revocation_log<S: Store>(store: S) {
    assert_eq!(
        store
            .unpublished_revocations()
            .await
            .expect("unpublished_revocations"),
        []
    );
    let e1 = vec![token_entry(1, NOW + 300)];
    let e2 = vec![
        subject_entry("dev-a", NOW, NOW + 3600),
        token_entry(2, NOW + 60),
    ];
    let e4 = vec![token_entry(4, NOW + 900)];
    let append = |entries: Vec<Entry>, now: u64| {
        let store = &store;
        async move {
            store
                .append_revocation(entries, now)
                .await
                .expect("append_revocation")
        }
    };
    let unpublished = || async {
        store
            .unpublished_revocations()
            .await
            .expect("unpublished_revocations")
    };

    assert_eq!(append(e1.clone(), NOW).await, 1);
    assert_eq!(append(e2.clone(), NOW + 1).await, 2);
    assert_eq!(append(Vec::new(), NOW + 2).await, 3);
    assert_eq!(
        unpublished().await,
        [
            revocation(1, e1, NOW),
            revocation(2, e2, NOW + 1),
            revocation(3, Vec::new(), NOW + 2)
        ]
    );

    store.mark_published(2).await.expect("mark_published");
    assert_eq!(unpublished().await, [revocation(3, Vec::new(), NOW + 2)]);

    assert_eq!(append(e4.clone(), NOW + 3).await, 4);
    assert_eq!(
        unpublished().await,
        [
            revocation(3, Vec::new(), NOW + 2),
            revocation(4, e4, NOW + 3)
        ]
    );
    store.mark_published(4).await.expect("mark_published");
    assert_eq!(unpublished().await, []);
    store.mark_published(1).await.expect("mark_published");
    assert_eq!(unpublished().await, []);
    assert_eq!(append(Vec::new(), NOW + 4).await, 5);
}

/// A snapshot carries the last sequence number (0 before any revocation, published or
/// not) and every entry until its `expires_at + leeway` has passed, in sequence order.
pub async fn revocation_snapshot<S: Store>(store: S) {
    let snapshot = |now: u64, leeway: u64| {
        let store = &store;
        async move {
            store
                .revocation_snapshot(now, leeway)
                .await
                .expect("revocation_snapshot")
        }
    };
    assert_eq!(snapshot(NOW, 30).await, (0, Vec::new()));

    let t1 = token_entry(1, NOW + 100);
    let dev = subject_entry("dev-a", NOW, NOW + 1000);
    let t2 = token_entry(2, NOW + 50);
    store
        .append_revocation(vec![t1.clone(), dev.clone()], NOW)
        .await
        .expect("append_revocation");
    store
        .append_revocation(vec![t2.clone()], NOW + 1)
        .await
        .expect("append_revocation");

    assert_eq!(
        snapshot(NOW, 30).await,
        (2, vec![t1.clone(), dev.clone(), t2.clone()])
    );
    assert_eq!(
        snapshot(NOW + 80, 30).await,
        (2, vec![t1.clone(), dev.clone(), t2]),
        "kept through expires_at + leeway"
    );
    assert_eq!(snapshot(NOW + 81, 30).await, (2, vec![t1, dev.clone()]));
    assert_eq!(snapshot(NOW + 131, 30).await, (2, vec![dev.clone()]));
    assert_eq!(snapshot(NOW + 1000, 0).await, (2, vec![dev]));
    assert_eq!(snapshot(NOW + 1001, 0).await, (2, Vec::new()));

    store.mark_published(2).await.expect("mark_published");
    assert_eq!(snapshot(NOW, 30).await.1.len(), 3, "published or not");
    // A leeway larger than `now` keeps everything (no underflow).
    assert_eq!(snapshot(10, 100).await.1.len(), 3);
}

/// Revocations appended at once still get 1, 2, 3… with no gap and no duplicate.
pub async fn revocation_sequence_race<S: Store>(store: S) {
    let store = Arc::new(store);
    let mut seqs = race(&store, |s| async move {
        s.append_revocation(vec![token_entry(1, NOW + 60)], NOW)
            .await
            .expect("append_revocation")
    })
    .await;
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=RACERS as u64).collect();
    assert_eq!(seqs, expected);
    let unpublished = store
        .unpublished_revocations()
        .await
        .expect("unpublished_revocations");
    assert_eq!(
        unpublished.iter().map(|r| r.seq).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        store
            .revocation_snapshot(NOW, 0)
            .await
            .expect("revocation_snapshot")
            .0,
        RACERS as u64
    );
}

// --- signing keys ---

/// Keys are listed oldest first whatever the order they were added in; a duplicate kid is a
/// conflict; retiring sets `retire_after` of that key only.
pub async fn signing_keys<S: Store>(store: S) {
    assert_eq!(store.keys().await.expect("keys"), []);
    let newer = key_record(2, NOW + 100);
    let older = key_record(1, NOW);
    store.add_key(newer.clone()).await.expect("add_key");
    store.add_key(older.clone()).await.expect("add_key");
    assert_eq!(
        store.keys().await.expect("keys"),
        [older.clone(), newer.clone()]
    );

    let r = store.add_key(key_record(1, NOW + 200)).await;
    assert!(is_conflict(&r), "duplicate kid: {r:?}");

    store
        .retire_key(&older.kid, NOW + 500)
        .await
        .expect("retire_key");
    let mut retired = older;
    retired.retire_after = Some(NOW + 500);
    assert_eq!(store.keys().await.expect("keys"), [retired, newer]);

    let r = store.retire_key(&[9; 8], NOW).await;
    assert!(is_not_found(&r), "retiring an unknown key: {r:?}");
}

/// Key set versions only ever increase, even when replicas ask at once.
pub async fn keyset_version<S: Store>(store: S) {
    let v1 = store
        .next_keyset_version()
        .await
        .expect("next_keyset_version");
    let v2 = store
        .next_keyset_version()
        .await
        .expect("next_keyset_version");
    let v3 = store
        .next_keyset_version()
        .await
        .expect("next_keyset_version");
    assert!(v1 < v2 && v2 < v3, "{v1}, {v2}, {v3}");

    let store = Arc::new(store);
    let mut raced = race(&store, |s| async move {
        s.next_keyset_version().await.expect("next_keyset_version")
    })
    .await;
    raced.sort_unstable();
    raced.dedup();
    assert_eq!(raced.len(), RACERS, "no version handed out twice");
    assert!(raced.iter().all(|v| *v > v3));
    let after = store
        .next_keyset_version()
        .await
        .expect("next_keyset_version");
    assert!(raced.iter().all(|v| *v < after));
}

// --- audit ---

/// Audit batches are appended in order; the tail is the most recent events, newest last.
pub async fn audit_log<S: Store>(store: S) {
    assert_eq!(store.audit_tail(10).await.expect("audit_tail"), []);
    store
        .audit(vec![event(1), event(2), event(3)])
        .await
        .expect("audit");
    store.audit(Vec::new()).await.expect("audit of nothing");
    store.audit(vec![event(4)]).await.expect("audit");

    assert_eq!(
        store.audit_tail(2).await.expect("audit_tail"),
        [event(3), event(4)]
    );
    assert_eq!(
        store.audit_tail(10).await.expect("audit_tail"),
        [event(1), event(2), event(3), event(4)]
    );
    assert_eq!(store.audit_tail(0).await.expect("audit_tail"), []);
}

/// `prune` forgets exactly what has expired (and old audit events), and revocation
/// numbering carries on after it.
pub async fn prune<S: Store>(store: S) {
    let old = token(
        1,
        TokenKind::Access,
        "app-a",
        "dev-a",
        NOW - 7200,
        NOW - 3600,
    );
    let live = access(2, "app-a");
    record(&store, old.clone(), &grant(1, 1, "app-a", NOW - 3600)).await;
    record(&store, live.clone(), &grant(2, 2, "app-a", NOW + 3600)).await;
    let seq = store
        .append_revocation(
            vec![token_entry(1, NOW - 10), token_entry(2, NOW + 10)],
            NOW - 100,
        )
        .await
        .expect("append_revocation");
    store.audit(vec![event(1), event(2)]).await.expect("audit");

    let pruned = store.prune(NOW, NOW * 1000 + 2).await.expect("prune");
    assert_eq!(
        pruned,
        Pruned {
            tokens: 1,
            grants: 1,
            revocation_entries: 1,
            audit_events: 1,
        }
    );
    assert_eq!(store.issued(&old.cti).await.expect("issued"), None);
    assert_eq!(store.issued(&live.cti).await.expect("issued"), Some(live));
    assert_eq!(
        store.use_grant(&[1; 32], NOW).await.expect("use_grant"),
        GrantUse::Unknown
    );
    assert!(matches!(
        store.use_grant(&[2; 32], NOW).await.expect("use_grant"),
        GrantUse::Fresh(_)
    ));
    // Seen from before the pruning time, only the entry still in force is left.
    let (at, entries) = store
        .revocation_snapshot(NOW - 1000, 0)
        .await
        .expect("revocation_snapshot");
    assert_eq!((at, entries), (seq, vec![token_entry(2, NOW + 10)]));
    assert_eq!(
        store
            .append_revocation(vec![token_entry(3, NOW + 10)], NOW)
            .await
            .expect("append_revocation"),
        seq + 1,
        "sequence numbers are never reused"
    );
    assert_eq!(store.audit_tail(10).await.expect("audit_tail"), [event(2)]);
    assert_eq!(
        store.prune(NOW, NOW * 1000 + 2).await.expect("prune"),
        Pruned::default()
    );
}
