//! Crashes: a hub killed with SIGKILL right after acknowledging a revocation still
//! publishes it when it comes back, a revocation recorded while it was down is broadcast on
//! its return, and a restarted hub keeps signing with the same trust anchor and still
//! refuses the requests it saw before as replays.
//!
//! Each test kills its own hub, so none is shared. The heartbeat is an hour, so whatever is
//! published after a restart comes from the restart itself.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::{Answer, Client};
use tessera_shared::keyset::{KeySet, KeySetOutcome};
use tessera_shared::message::{ErrorCode, RequestBody, RevokeTarget};
use tessera_shared::revocation::{Stream, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;
use tessera_tests::hub::{
    RevocationPage, RevokeCounts, TestHub, expect_delta, fetch_stream, read_snapshot, unix_now,
};
use tessera_tests::{MqttProbe, QoS};

const WAIT: Duration = Duration::from_secs(5);

async fn start() -> Result<TestHub> {
    TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .policy_append(
            "[roles.viewer]\nkind = \"app\"\n\n[[access]]\napp_roles = [\"viewer\"]\n\
             device_groups = [\"building-a\"]\nscopes = [\"telemetry:read\"]\n",
        )
        .start()
        .await
}

async fn access_token(
    app: &mut Client,
    device: &'static str,
    scope: &'static str,
) -> Result<Vec<u8>> {
    match app
        .request(
            RequestBody::AccessToken {
                device,
                scope: Scopes::parse(scope).unwrap(),
            },
            WAIT,
        )
        .await?
    {
        Answer::Token { token, .. } => Ok(token),
        other => bail!("expected a token, got {other:?}"),
    }
}

async fn subscribed(hub: &TestHub, id: &str, filter: &str) -> Result<MqttProbe> {
    let probe = hub.broker().probe(id).await?;
    probe.subscribe_granted(filter, QoS::AtLeastOnce).await?;
    Ok(probe)
}

/// Reads the retained snapshot of `stream` from a fresh subscription until its pages reach
/// change `seq`, for at most `timeout`; returns it and whether the broker delivered every
/// page as a retained message.
async fn snapshot_at(
    hub: &TestHub,
    stream: &Stream<'_>,
    seq: u64,
    timeout: Duration,
) -> Result<(RevocationPage, bool)> {
    let mut probe = hub.broker().probe("rs-snapshot-reader").await?;
    read_snapshot(&mut probe, &hub.trust_anchor(), stream, seq, timeout)
        .await
        .with_context(|| format!("hub log:\n{}", hub.log()))
}

/// Everything `fetch_revocations` serves of `stream`, which must have a change.
async fn fetched(
    client: &mut Client,
    hub: &TestHub,
    stream: &Stream<'_>,
) -> Result<RevocationPage> {
    fetch_stream(client, &hub.trust_anchor(), stream)
        .await?
        .with_context(|| format!("{} has no change", stream.name()))
}

#[tokio::test]
async fn a_revocation_acknowledged_just_before_a_kill_9_is_published_after_the_restart()
-> Result<()> {
    let hub = start().await?;
    hub.dir().add_device("rs-door", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("rs-app", "controller")?;
    let ops_key = hub.dir().add_operator("rs-ops", "ops")?;
    let stream = Stream::of_device("rs-door");
    let mut deltas = subscribed(&hub, "rs-deltas", &topic::revocation_delta(&stream)).await?;
    let mut app = hub.client("rs-app", &app_key).await?;
    let token = access_token(&mut app, "rs-door", "door:open").await?;
    let hash = token_hash(&token);
    let mut ops = hub.client("rs-ops", &ops_key).await?;

    let answer = ops
        .request(RequestBody::Revoke(RevokeTarget::TokenHash(hash)), WAIT)
        .await?;
    hub.kill_9()?;
    let counts = RevokeCounts::from_answer(&answer)?;
    assert_eq!((counts.revoked, counts.entries), (1, 1), "{counts:?}");

    hub.restart().await?;
    // The answer to fetch_revocations holds it, from a client that outlived the hub.
    let answer = fetched(&mut ops, &hub, &stream).await?;
    assert!(answer.lists_token("rs-door", &hash), "{answer:?}");
    // The first and only change of the device's stream on this hub.
    assert_eq!(
        (answer.from, answer.to, answer.seq),
        (1, 1, 1),
        "{answer:?}"
    );
    let seq = answer.seq;
    // So does the retained snapshot: read it as a new subscriber would.
    let (snapshot, _) = snapshot_at(&hub, &stream, seq, WAIT).await?;
    assert!(snapshot.lists_token("rs-door", &hash), "{snapshot:?}");
    let (retained, was_retained) = snapshot_at(&hub, &stream, seq, WAIT).await?;
    assert!(
        was_retained && retained.lists_token("rs-door", &hash),
        "{retained:?}"
    );
    // And the delta went out: before the kill, or re-broadcast after the restart.
    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), &stream, seq, WAIT)
        .await
        .with_context(|| format!("hub log:\n{}", hub.log()))?;
    assert!(delta.lists_token("rs-door", &hash), "{delta:?}");
    ops.close().await;
    app.close().await;
    Ok(())
}

#[tokio::test]
async fn a_revocation_recorded_while_the_hub_is_down_is_broadcast_when_it_comes_back() -> Result<()>
{
    let hub = start().await?;
    hub.dir()
        .add_device("rs-door-2", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("rs-app-2", "controller")?;
    let stream = Stream::of_device("rs-door-2");
    let delta_topic = topic::revocation_delta(&stream).to_string();
    let mut deltas = subscribed(&hub, "rs-deltas-2", &delta_topic).await?;
    let mut app = hub.client("rs-app-2", &app_key).await?;
    let token = access_token(&mut app, "rs-door-2", "door:open").await?;

    hub.kill_9()?;
    let printed = hub
        .dir()
        .run(&["client", "set-role", "rs-app-2", "viewer"])?;
    assert!(
        printed.contains("; 1 token it no longer allows is revoked (1 entry"),
        "set-role revoked the door token: {printed}"
    );
    let hash = token_hash(&token);
    deltas
        .expect_no_message(&delta_topic, Duration::from_millis(300))
        .await?;

    hub.restart().await?;
    // The first change of the device's stream on this hub.
    let seq = 1;
    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), &stream, seq, WAIT)
        .await
        .with_context(|| format!("hub log:\n{}", hub.log()))?;
    assert!(delta.lists_token("rs-door-2", &hash), "{delta:?}");
    let (snapshot, _) = snapshot_at(&hub, &stream, seq, WAIT).await?;
    assert!(snapshot.lists_token("rs-door-2", &hash), "{snapshot:?}");

    // Marked published: the next restart does not send it again. (Duplicates are harmless
    // to receivers, so the first restart may have sent it more than once.)
    deltas.take_messages();
    hub.restart().await?;
    let (snapshot, _) = snapshot_at(&hub, &stream, seq, WAIT).await?;
    assert!(snapshot.lists_token("rs-door-2", &hash));
    deltas
        .expect_no_message(&delta_topic, Duration::from_millis(300))
        .await?;
    app.close().await;
    Ok(())
}

#[tokio::test]
async fn a_restarted_hub_serves_with_the_same_trust_anchor_and_still_refuses_replays() -> Result<()>
{
    let hub = start().await?;
    hub.dir()
        .add_device("rs-door-3", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("rs-app-3", "controller")?;
    let mut app = hub.client("rs-app-3", &app_key).await?;
    let before = access_token(&mut app, "rs-door-3", "door:open").await?;
    let raw_key = hub.dir().add_app("rs-app-3-raw", "controller")?;
    let mut raw = hub.raw("rs-app-3-raw", raw_key.signer()?).await?;
    let request = raw.request(RequestBody::AccessToken {
        device: "rs-door-3",
        scope: Scopes::parse("door:open").unwrap(),
    })?;
    raw.send(&request).await?.expect_token()?;

    hub.kill_9()?;
    hub.restart().await?;

    // The nonces it had seen survived the crash: a replay is still refused.
    raw.send(&request)
        .await?
        .expect_refusal(ErrorCode::Replay)?;

    // The client connected before the crash is served by the new process.
    let after = access_token(&mut app, "rs-door-3", "door:open").await?;
    app.close().await;
    let validation = |audience| Validation::new(unix_now(), audience).with_issuer("hub-e2e");
    let anchor = hub.trust_anchor();
    let (a, b) = (
        token::verify(&before, &anchor, &validation("rs-door-3"))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        token::verify(&after, &anchor, &validation("rs-door-3"))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    assert_eq!(a.kid(), b.kid(), "signed with the same key");
    assert_eq!(b.kid(), anchor.kid());

    // The retained key set verifies with the anchor and still holds it.
    let mut keys = subscribed(&hub, "rs-keys", topic::KEYS).await?;
    let message = keys.expect_message(topic::KEYS, WAIT).await?;
    assert!(message.retain);
    let mut set = KeySet::from_anchor(anchor);
    let outcome = set
        .update(&message.payload)
        .map_err(|e| anyhow::anyhow!("key set: {e}"))?;
    assert_eq!(outcome, KeySetOutcome::Updated);
    assert!(set.keys().contains(&anchor), "{:?}", set.keys());

    // `trust-anchor` prints what `init` printed.
    let printed = hub.dir().run(&["trust-anchor"])?;
    assert!(
        printed.contains(hub.dir().trust_anchor_cose_hex()),
        "{printed}"
    );
    Ok(())
}

/// Many apps asking at once (so their requests share the store's group commits), and the
/// hub killed with SIGKILL in the middle of it: every token the hub answered with is on
/// disk, with its hash, and the hub serves again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_acknowledged_in_a_burst_of_issuance_survives_a_kill_9() -> Result<()> {
    const APPS: usize = 8;
    const ACKNOWLEDGED: usize = 150;
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .config("rate_burst = 20", "rate_burst = 100000")
        .config("rate_per_second = 5.0", "rate_per_second = 100000.0")
        .config("admission_burst = 40", "admission_burst = 100000")
        .config(
            "admission_per_second = 10.0",
            "admission_per_second = 100000.0",
        )
        .start()
        .await?;
    hub.dir()
        .add_device("burst-door", "sensor", &["building-a"])?;
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..APPS {
        let id = format!("burst-app-{i}");
        let key = hub.dir().add_app(&id, "controller")?;
        let mut app = hub.client(&id, &key).await?;
        let acknowledged = std::sync::Arc::clone(&acknowledged);
        tasks.spawn(async move {
            // Bounded: ends at the first failure (the kill) or after 1,000 tokens.
            for _ in 0..1_000 {
                match access_token(&mut app, "burst-door", "door:open").await {
                    Ok(token) => acknowledged.lock().unwrap().push(token),
                    Err(_) => break,
                }
            }
        });
    }
    tessera_tests::wait::wait_until(
        "enough tokens acknowledged",
        Duration::from_secs(60),
        async || Ok((acknowledged.lock().unwrap().len() >= ACKNOWLEDGED).then_some(())),
    )
    .await?;
    hub.kill_9()?;
    while tasks.join_next().await.is_some() {}
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert!(acknowledged.len() >= ACKNOWLEDGED, "{}", acknowledged.len());

    // Read what is on disk as the next hub will (SQLite recovers its WAL on open).
    let store = tessera_hub::store::Sqlite::open(&hub.dir().database_path())?;
    let anchor = hub.trust_anchor();
    let mut missing = Vec::new();
    for token in &acknowledged {
        let claims = token::dangerous_verify_signature_only(token, &anchor)?;
        match tessera_hub::store::Store::issued(&store, claims.cti).await? {
            Some(issued) if issued.hash == token_hash(token) => {}
            other => missing.push((hex::encode(claims.cti), other)),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged tokens not on disk: {missing:?}",
        missing.len(),
        acknowledged.len()
    );
    drop(store);

    hub.restart().await?;
    let key = hub.dir().add_app("burst-after", "controller")?;
    let mut app = hub.client("burst-after", &key).await?;
    access_token(&mut app, "burst-door", "door:open").await?;
    Ok(())
}
