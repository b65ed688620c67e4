//! Crashes: a hub killed with SIGKILL right after acknowledging a revocation still
//! publishes it when it comes back, a revocation recorded while it was down is broadcast on
//! its return, and a restarted hub keeps signing with the same trust anchor and still
//! refuses the requests it saw before as replays.
//!
//! Each test kills its own hub, so none is shared. The heartbeat is an hour, so whatever is
//! published after a restart comes from the restart itself.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::{Answer, Client};
use tessera_shared::keyset::{KeySet, KeySetOutcome};
use tessera_shared::message::{ErrorCode, RequestBody, RevokeTarget};
use tessera_shared::revocation::token_hash;
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;
use tessera_tests::hub::{RevocationMessage, TestHub, expect_delta, unix_now};
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

/// Reads snapshots from a fresh subscription until one is at `seq` or later, for at most
/// `timeout`; returns it and whether the broker delivered it as the retained message.
async fn snapshot_at(
    hub: &TestHub,
    seq: u64,
    timeout: Duration,
) -> Result<(RevocationMessage, bool)> {
    let mut probe = subscribed(hub, "rs-snapshot-reader", topic::REVOCATION_SNAPSHOT).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let message = probe
            .expect_message(
                topic::REVOCATION_SNAPSHOT,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await
            .with_context(|| format!("no snapshot at sequence {seq}"))?;
        let snapshot = RevocationMessage::snapshot(&message.payload, &hub.trust_anchor())?;
        if snapshot.seq >= seq {
            return Ok((snapshot, message.retain));
        }
    }
}

async fn fetched(client: &mut Client, hub: &TestHub) -> Result<RevocationMessage> {
    match client.request(RequestBody::FetchRevocations, WAIT).await? {
        Answer::Revocations { snapshot } => {
            RevocationMessage::snapshot(&snapshot, &hub.trust_anchor())
        }
        other => bail!("expected the snapshot, got {other:?}"),
    }
}

#[tokio::test]
async fn a_revocation_acknowledged_just_before_a_kill_9_is_published_after_the_restart()
-> Result<()> {
    let hub = start().await?;
    hub.dir().add_device("rs-door", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("rs-app", "controller")?;
    let ops_key = hub.dir().add_operator("rs-ops", "ops")?;
    let mut deltas = subscribed(&hub, "rs-deltas", topic::REVOCATION_DELTA).await?;
    let mut app = hub.client("rs-app", &app_key).await?;
    let token = access_token(&mut app, "rs-door", "door:open").await?;
    let hash = token_hash(&token);
    let mut ops = hub.client("rs-ops", &ops_key).await?;

    let answer = ops
        .request(RequestBody::Revoke(RevokeTarget::TokenHash(hash)), WAIT)
        .await?;
    hub.kill_9()?;
    let Answer::Revoked { seq } = answer else {
        bail!("expected Revoked, got {answer:?}")
    };

    hub.restart().await?;
    // The retained snapshot holds it: read it as a new subscriber would.
    let (snapshot, _) = snapshot_at(&hub, seq, WAIT).await?;
    assert!(snapshot.lists_token(&hash), "{snapshot:?}");
    let (retained, was_retained) = snapshot_at(&hub, seq, WAIT).await?;
    assert!(was_retained && retained.lists_token(&hash), "{retained:?}");
    // So does the answer to fetch_revocations, from a client that outlived the hub.
    let answer = fetched(&mut ops, &hub).await?;
    assert!(answer.seq >= seq && answer.lists_token(&hash), "{answer:?}");
    // And the delta went out: before the kill, or re-broadcast after the restart.
    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), seq, WAIT)
        .await
        .with_context(|| format!("hub log:\n{}", hub.log()))?;
    assert!(delta.lists_token(&hash), "{delta:?}");
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
    let mut deltas = subscribed(&hub, "rs-deltas-2", topic::REVOCATION_DELTA).await?;
    let mut app = hub.client("rs-app-2", &app_key).await?;
    let token = access_token(&mut app, "rs-door-2", "door:open").await?;

    hub.kill_9()?;
    let printed = hub
        .dir()
        .run(&["client", "set-role", "rs-app-2", "viewer"])?;
    let seq: u64 = printed
        .split("(sequence ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("set-role revoked nothing: {printed}"))?
        .parse()?;
    deltas
        .expect_no_message(topic::REVOCATION_DELTA, Duration::from_millis(300))
        .await?;

    hub.restart().await?;
    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), seq, WAIT)
        .await
        .with_context(|| format!("hub log:\n{}", hub.log()))?;
    assert!(delta.lists_token(&token_hash(&token)), "{delta:?}");
    let (snapshot, _) = snapshot_at(&hub, seq, WAIT).await?;
    assert!(snapshot.lists_token(&token_hash(&token)), "{snapshot:?}");

    // Marked published: the next restart does not send it again. (Duplicates are harmless
    // to receivers, so the first restart may have sent it more than once.)
    deltas.take_messages();
    hub.restart().await?;
    let (snapshot, _) = snapshot_at(&hub, seq, WAIT).await?;
    assert!(snapshot.lists_token(&token_hash(&token)));
    deltas
        .expect_no_message(topic::REVOCATION_DELTA, Duration::from_millis(300))
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
    let request = raw.request(RequestBody::FetchRevocations)?;
    assert!(raw.send(&request).await?.outcome.is_ok());

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
