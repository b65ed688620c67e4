//! Policy reloads reviewed against the store: a policy that leaves registered clients
//! without a role, or that would revoke more than the configured share of the live tokens,
//! is refused and audited unless a force marker names it; every reload is audited with
//! what it revoked; a reload that revokes nothing records (and so publishes) nothing.
//!
//! An in-memory store with registered clients and issued tokens, the policy file in a
//! temporary directory, and the hub's time passed in: no broker, no clock. One test sends
//! this test process a real `SIGHUP`, to the handler the serving hub installs.

use std::path::{Path, PathBuf};

use tessera_hub::policy::{self, Policy, SharedPolicy};
use tessera_hub::policy_change::{self, Objection, ReloadError, ReloadLimits};
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{
    AuditEvent, ClientKind, ClientRecord, IssuedToken, Sqlite, Store, TokenKind,
};
use tessera_shared::crypto::sha256;

const T0: u64 = 1_767_225_600;

const POLICY: &str = r#"
[defaults]
leeway_s = 30
device_token_lifetime_s = 900
access_token_lifetime_s = 300
grant_lifetime_s = 86400
device_audience = "tessera"

[groups]
building-a = "Doors in building A"

[roles.lock]
kind = "device"
scopes = ["telemetry:write", "events:publish"]

[roles.controller]
kind = "app"

[roles.ops]
kind = "operator"
operations = ["revoke"]

[[access]]
app_roles = ["controller"]
device_groups = ["building-a"]
scopes = ["door:open", "light:on"]
"#;

/// [`POLICY`] with one more device role (a widened policy).
fn widened() -> String {
    format!("{POLICY}\n[roles.sensor]\nkind = \"device\"\nscopes = [\"telemetry:write\"]\n")
}

/// [`POLICY`] without `light:on` for the controller: it disallows one live token of five.
fn without_light() -> String {
    POLICY.replace(r#"["door:open", "light:on"]"#, r#"["door:open"]"#)
}

/// [`POLICY`] without `events:publish` for locks: it disallows both device tokens, two
/// live tokens of five.
fn without_events() -> String {
    POLICY.replace(r#", "events:publish""#, "")
}

fn client(id: &str, kind: ClientKind, role: &str) -> ClientRecord {
    let mut key = vec![0x04; 65];
    key[1] = u8::try_from(id.len()).expect("a short id");
    key[2] = id.as_bytes()[id.len() - 1];
    ClientRecord {
        id: id.to_owned(),
        kind,
        public_key: Some(key),
        role: role.to_owned(),
        groups: if kind == ClientKind::Device {
            vec!["building-a".to_owned()]
        } else {
            Vec::new()
        },
        enrollment_code_key: None,
        enrolled_at: Some(T0 - 1000),
        revoked_at: None,
        created_at: T0 - 1000,
    }
}

fn token(n: u8, kind: TokenKind, subject: &str, audience: &str, scope: &str) -> IssuedToken {
    IssuedToken {
        cti: [n; 16],
        hash: [n; 32],
        kind,
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        scope: scope.to_owned(),
        issued_at: T0 - 10,
        expires_at: T0 + 290,
    }
}

/// A hub's store, its policy file and its policy in force: two locks, a controller app
/// and an operator; five live tokens (each lock's device token, the app's `door:open` on
/// both locks and `light:on` on lock-1).
struct Hub {
    store: Sqlite,
    policy: SharedPolicy,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Hub {
    async fn new() -> Self {
        let store = Sqlite::open_in_memory().expect("store");
        store
            .add_clients(vec![
                client("lock-1", ClientKind::Device, "lock"),
                client("lock-2", ClientKind::Device, "lock"),
                client("app-1", ClientKind::App, "controller"),
                client("ops-1", ClientKind::Operator, "ops"),
            ])
            .await
            .expect("clients");
        let device = "telemetry:write events:publish";
        for t in [
            token(1, TokenKind::Device, "lock-1", "tessera", device),
            token(2, TokenKind::Device, "lock-2", "tessera", device),
            token(3, TokenKind::Access, "app-1", "lock-1", "door:open"),
            token(4, TokenKind::Access, "app-1", "lock-2", "door:open"),
            token(5, TokenKind::Access, "app-1", "lock-1", "light:on"),
        ] {
            store.record_issued(t, None).await.expect("record");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).expect("write");
        Self {
            store,
            policy: SharedPolicy::load(&path).expect("valid"),
            _dir: dir,
            path,
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("write");
    }

    /// The operator's force marker for the file as it is now, as `sha256sum` writes it.
    fn force(&self) {
        let text = std::fs::read(&self.path).expect("read");
        std::fs::write(
            policy::force_marker(&self.path),
            format!("{}  policy.toml\n", hex::encode(sha256(&[&text]))),
        )
        .expect("write the marker");
    }

    async fn reload(&self) -> Result<policy_change::Reloaded, ReloadError> {
        self.reload_with(ReloadLimits::default()).await
    }

    async fn reload_with(
        &self,
        limits: ReloadLimits,
    ) -> Result<policy_change::Reloaded, ReloadError> {
        policy_change::reload(&self.store, &self.policy, &self.path, &limits, T0 * 1000).await
    }

    /// Every revocation change recorded: (stream, latest change number).
    async fn changes(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .store
            .streams()
            .await
            .expect("streams")
            .into_iter()
            .map(|s| (s.name, s.seq))
            .collect();
        out.sort();
        out
    }

    async fn audited(&self) -> Vec<AuditEvent> {
        self.store
            .audit_tail(100)
            .await
            .expect("audit")
            .into_iter()
            .filter(|e| e.action == "policy_reload")
            .collect()
    }

    fn in_force(&self) -> Policy {
        (*self.policy.current()).clone()
    }
}

fn policy(text: &str) -> Policy {
    Policy::from_toml(text, "policy.toml").expect("valid")
}

fn marker(path: &Path) -> bool {
    policy::force_marker(path).exists()
}

#[tokio::test]
async fn an_empty_policy_file_is_refused_the_old_policy_stays_and_the_refusal_is_audited() {
    let hub = Hub::new().await;
    hub.write("");

    let err = hub.reload().await.expect_err("refused");
    let ReloadError::Refused { objections, .. } = &err else {
        panic!("refused for its effect: {err}");
    };
    assert!(
        matches!(&objections[..], [
            Objection::ClientsWithoutRole(clients),
            Objection::TooManyRevoked { revoked: 5, live: 5, max_percent: 50 },
        ] if clients.len() == 4),
        "{objections:?}"
    );
    let message = err.to_string();
    for part in [
        "4 registered clients would have no role",
        "app-1 (role \"controller\" is not defined)",
        "it would revoke 5 of the 5 live tokens",
        "policy.toml.force",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }

    assert_eq!(hub.in_force(), policy(POLICY), "the old policy stays");
    assert_eq!(
        hub.changes().await,
        [],
        "nothing revoked, nothing to publish"
    );
    let audited = hub.audited().await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(
        (audited[0].actor.as_str(), audited[0].outcome.as_str()),
        ("hub", "denied")
    );
    assert!(audited[0].target.ends_with("policy.toml"));
    assert!(
        audited[0].reason.contains("would have no role"),
        "{}",
        audited[0].reason
    );
}

#[tokio::test]
async fn policy_check_names_every_registered_client_a_file_leaves_without_a_role() {
    let hub = Hub::new().await;
    // Locks become "door" devices, and "ops" an app role.
    let renamed = POLICY.replace("[roles.lock]", "[roles.door]").replace(
        "[roles.ops]\nkind = \"operator\"\noperations = [\"revoke\"]",
        "[roles.ops]\nkind = \"app\"",
    );
    let objections =
        policy_change::check(&hub.store, &policy(&renamed), &ReloadLimits::default(), T0)
            .await
            .expect("check");
    let [Objection::ClientsWithoutRole(clients), ..] = &objections[..] else {
        panic!("{objections:?}");
    };
    let named: Vec<(&str, &str)> = clients
        .iter()
        .map(|c| (c.client.as_str(), c.code.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            ("lock-1", "unknown_role"),
            ("lock-2", "unknown_role"),
            ("ops-1", "wrong_kind"),
        ]
    );
    // The policy in force raises nothing.
    assert_eq!(
        policy_change::check(&hub.store, &policy(POLICY), &ReloadLimits::default(), T0)
            .await
            .expect("check"),
        []
    );
}

#[tokio::test]
async fn a_revoked_client_needs_no_role() {
    let hub = Hub::new().await;
    hub.store
        .revoke(
            vec![tessera_hub::revocation::Target::Device("lock-2".into())],
            T0 - 5,
            30,
            tessera_hub::store::Unmatched::Refuse,
        )
        .await
        .expect("revoked");
    let no_locks = POLICY.replace(
        "[roles.lock]\nkind = \"device\"\nscopes = [\"telemetry:write\", \"events:publish\"]\n",
        "",
    );
    assert!(!no_locks.contains("roles.lock"));
    let review = policy_change::review(&hub.store, None, &policy(&no_locks), T0)
        .await
        .expect("review");
    let roleless: Vec<&str> = review.roleless.iter().map(|c| c.client.as_str()).collect();
    assert_eq!(roleless, ["lock-1"]);
    // lock-2's tokens, and the app's on lock-2, went with it.
    assert_eq!(review.live_tokens, 3);
}

#[tokio::test]
async fn a_forced_policy_is_applied_once_and_the_reload_audits_what_it_revoked() {
    let hub = Hub::new().await;
    hub.write("");
    hub.force();

    let applied = hub.reload().await.expect("forced");
    let revoked = applied.revoked.as_ref().expect("revoked");
    assert_eq!((revoked.revoked, applied.live_tokens), (5, 5));
    assert_eq!(applied.forced_over.len(), 2);
    assert_eq!(hub.in_force().roles().count(), 0);
    assert!(!marker(&hub.path), "a marker forces one reload");
    let audited = hub.audited().await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].outcome, "ok");
    let reason = &audited[0].reason;
    assert!(
        reason.contains("revoked 5 of the 5 live tokens") && reason.contains("forced over"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_force_marker_for_other_contents_forces_nothing_and_is_dropped() {
    let hub = Hub::new().await;
    hub.write("");
    hub.force();
    // The file changes after the operator forced it.
    hub.write("[defaults]\nleeway_s = 30\n");

    assert!(matches!(
        hub.reload().await,
        Err(ReloadError::Refused { .. })
    ));
    assert_eq!(hub.in_force(), policy(POLICY));
    assert!(!marker(&hub.path));
    assert_eq!(hub.changes().await, []);
}

#[tokio::test]
async fn a_narrowing_that_revokes_more_than_the_configured_share_is_refused_until_forced() {
    let hub = Hub::new().await;
    hub.write(&without_events());
    let strict = ReloadLimits {
        max_revoked_percent: 30,
    };

    // Two of five live tokens is 40 %.
    let err = hub.reload_with(strict).await.expect_err("refused");
    assert!(
        matches!(&err, ReloadError::Refused { objections, .. } if objections[..] == [
            Objection::TooManyRevoked { revoked: 2, live: 5, max_percent: 30 }
        ]),
        "{err}"
    );
    assert_eq!(hub.in_force(), policy(POLICY));
    assert_eq!(hub.changes().await, []);

    // Within the default 50 % it is applied.
    let applied = hub.reload().await.expect("applied");
    assert_eq!(applied.revoked.expect("revoked").revoked, 2);
    assert_eq!(hub.in_force(), policy(&without_events()));
}

#[tokio::test]
async fn reloading_an_unchanged_or_widened_policy_revokes_records_and_publishes_nothing() {
    let hub = Hub::new().await;
    for text in [POLICY.to_owned(), widened()] {
        hub.write(&text);
        let applied = hub.reload().await.expect("applied");
        assert_eq!(applied.revoked, None);
        assert_eq!(applied.live_tokens, 5);
        assert_eq!(hub.changes().await, [], "no new revocation change");
    }
    let audited = hub.audited().await;
    assert_eq!(audited.len(), 2, "every reload is audited: {audited:?}");
    assert!(
        audited
            .iter()
            .all(|e| e.outcome == "ok" && e.reason.ends_with("revoked nothing")),
        "{audited:?}"
    );
}

#[tokio::test]
async fn after_a_narrowing_the_same_file_again_revokes_nothing_and_is_not_refused() {
    let hub = Hub::new().await;
    hub.write(&without_light());
    let first = hub.reload().await.expect("applied");
    assert_eq!(first.revoked.expect("revoked").revoked, 1);
    let after_first = hub.changes().await;
    assert_eq!(after_first.len(), 1);

    // The revoked token is still unexpired, but revoked already: it counts neither as
    // live nor as one to revoke, so a strict limit does not refuse the same file again.
    let applied = hub
        .reload_with(ReloadLimits {
            max_revoked_percent: 0,
        })
        .await
        .expect("applied");
    assert_eq!((applied.revoked, applied.live_tokens), (None, 4));
    assert_eq!(hub.changes().await, after_first, "no new change number");
}

#[tokio::test]
async fn an_unchanged_policy_is_not_refused_for_clients_the_policy_in_force_already_strands() {
    let hub = Hub::new().await;
    // Forced: the locks lose their role.
    let no_locks = without_events().replace(
        "[roles.lock]\nkind = \"device\"\nscopes = [\"telemetry:write\"]\n",
        "",
    );
    assert!(!no_locks.contains("roles.lock"));
    hub.write(&no_locks);
    assert!(matches!(
        hub.reload().await,
        Err(ReloadError::Refused { .. })
    ));
    hub.force();
    hub.reload().await.expect("forced");

    // The same file again, or an edit elsewhere, strands no one new.
    hub.reload().await.expect("unchanged");
    hub.write(&no_locks.replace("leeway_s = 30", "leeway_s = 45"));
    let applied = hub.reload().await.expect("an unrelated edit");
    assert_eq!(applied.revoked, None);
    assert_eq!(hub.in_force().leeway_s(), 45);
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_audited() {
    let hub = Hub::new().await;
    hub.write("[roles.lock]\nkind = \"device\"\n");
    assert!(matches!(hub.reload().await, Err(ReloadError::Invalid(_))));
    assert_eq!(hub.in_force(), policy(POLICY));
    let audited = hub.audited().await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].outcome, "malformed");
    assert!(
        audited[0].reason.contains("needs at least one scope"),
        "{}",
        audited[0].reason
    );
}

/// The serving hub's `SIGHUP` handler, on a hub built from [`Hub`]'s store and policy.
#[tokio::test]
async fn a_sighup_reloads_through_the_review_and_an_emptied_file_changes_nothing() {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_hub::clock::FakeClock;
    use tessera_hub::keys::{self, Kek, KeyRing};
    use tessera_hub::pipeline::{self, PipelineConfig};

    let fixture = Hub::new().await;
    let kek = Kek::from_bytes(vec![9; 32]).expect("kek");
    keys::create_key(&fixture.store, &kek, "hub-1", T0, T0, Some(T0))
        .await
        .expect("key");
    let ring = KeyRing::load(&fixture.store, &kek, "hub-1", T0)
        .await
        .expect("ring");
    let hub = Arc::new(pipeline::Hub {
        store: fixture.store.clone(),
        policy: fixture.policy.clone(),
        keys: tokio::sync::RwLock::new(ring),
        clock: Arc::new(FakeClock::at_ms(T0 * 1000)),
        config: PipelineConfig::default(),
        rng: Arc::new(tessera_hub::rng::SeededRng::new([3; 32])),
        metrics: Arc::new(tessera_hub::metrics::Metrics::new()),
    });
    let metrics = hub.metrics.clone();
    let reloads = tessera_hub::server::reload_policy_on_hangup(
        hub,
        fixture.path.clone(),
        ReloadLimits::default(),
    )
    .expect("the handler is installed");
    let reloading = tokio::spawn(reloads);

    let hang_up = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    };
    // Waits for the `n`th reload's audit event, up to a generous deadline.
    let reloaded = |n: usize| {
        let fixture = &fixture;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let audited = fixture.audited().await;
                if audited.len() >= n {
                    return audited;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no reload audited after SIGHUP: {audited:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    fixture.write("");
    hang_up();
    let audited = reloaded(1).await;
    assert_eq!(audited[0].outcome, "denied", "{audited:?}");
    assert_eq!(fixture.in_force(), policy(POLICY));
    assert_eq!(fixture.changes().await, []);

    fixture.write(&widened());
    hang_up();
    let audited = reloaded(2).await;
    assert_eq!(
        (
            audited[1].outcome.as_str(),
            audited[1].reason.ends_with("revoked nothing")
        ),
        ("ok", true),
        "{audited:?}"
    );
    assert_eq!(fixture.in_force(), policy(&widened()));
    assert_eq!(fixture.changes().await, []);
    let counted = "tessera_hub_revocations_total{kind=\"policy_reload\"} 1";
    let rendered = || metrics.render(T0, tessera_hub::store::WriteStats::default());
    assert!(!rendered().contains("policy_reload"), "{}", rendered());

    // A narrowing that revokes is counted as a revocation in the metrics.
    fixture.write(&without_light());
    hang_up();
    let audited = reloaded(3).await;
    assert_eq!(audited[2].outcome, "ok", "{audited:?}");
    assert!(rendered().contains(counted), "{}", rendered());
    reloading.abort();
}

#[tokio::test]
async fn a_device_audience_that_is_a_registered_clients_id_is_refused_even_when_forced() {
    let hub = Hub::new().await;
    // lock-1 would take every device token of the fleet as its own.
    hub.write(&POLICY.replace(
        r#"device_audience = "tessera""#,
        r#"device_audience = "lock-1""#,
    ));
    hub.force();

    let err = hub.reload().await.expect_err("refused");
    assert!(
        matches!(&err, ReloadError::AudienceTaken { audience, .. } if audience == "lock-1"),
        "{err}"
    );
    assert!(err.to_string().contains("does not override"), "{err}");
    assert_eq!(hub.in_force(), policy(POLICY), "the old policy stays");
    assert_eq!(hub.changes().await, [], "nothing revoked");
    let audited = hub.audited().await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].outcome, "denied");
    assert!(
        audited[0].reason.contains("device_audience"),
        "{}",
        audited[0].reason
    );
}
