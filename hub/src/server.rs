//! `serve`: runs the pipeline over MQTT until shutdown.
//!
//! One task polls the MQTT event loop ([`mqtt`](crate::mqtt)); this task dispatches each
//! request to its own tokio task (bounded by a semaphore), so one slow or malicious
//! client never holds up the others. On every (re)connection the hub subscribes again,
//! republishes the retained key set and revocation snapshot, and publishes any revocation
//! recorded but not yet broadcast (for example because the hub was killed after
//! acknowledging it). A heartbeat prunes the store, republishes what the broker has not
//! echoed back (every unconfirmed delta, at most `MAX_CONTROLS_PER_HEARTBEAT` (256) control
//! messages, oldest first), the snapshots that changed, and a signed heartbeat per stream,
//! issued when it is built, after the rest. Echoes of the hub's own deltas and control
//! messages are verified off the loop, at most `ECHO_CONCURRENCY` (64) at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::AsyncClient;
use tessera_shared::topic;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::keys::{self, Kek, KeyRing};
use crate::mqtt::{self, MqttConfig, MqttError, Notice, QoS};
use crate::pipeline::{Echo, Hub, Publication};
use crate::revocation::PendingControl;
use crate::store::{AuditEvent, Store};

/// Tunables of the serving loop.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// Subscribe through an MQTT 5 shared subscription (several hub replicas).
    pub shared_subscription: bool,
    /// Requests handled at once.
    pub concurrency: usize,
    /// Seconds between revocation heartbeats.
    pub heartbeat_s: u64,
    /// How long the audit log keeps a decision, seconds.
    pub audit_retention_s: u64,
    /// The key-encryption secret, to pick up keys added by `keys rotate` (and drop
    /// retired ones) at each heartbeat without a restart. `None` keeps the keys loaded at
    /// start.
    pub kek: Option<Arc<Kek>>,
    /// Seconds a key is published before it signs (counted from its first publication).
    pub rotation_announce_s: u64,
}

/// Control messages republished per heartbeat at most, oldest first: a broker that never
/// echoes them (an ACL that does not let the hub read `client/+/control`) must not make
/// every heartbeat republish every control message still owed.
const MAX_CONTROLS_PER_HEARTBEAT: usize = 256;

/// Heartbeats after which a control message the hub keeps republishing counts as never
/// confirmed (one or two may be in flight, or the connection was just restored).
const UNCONFIRMED_CONTROL_HEARTBEATS: u64 = 3;

/// Echoes verified at once. An echo is one signature check; when all are busy, further
/// echoes are dropped: an echo not recorded is published and seen again later.
const ECHO_CONCURRENCY: usize = 64;

/// Where the serving loop's messages go: the broker, or a list in tests.
trait Outbox: Sync {
    /// Publishes one message (QoS 1); `false` if it could not be handed over.
    fn publish(&self, p: &Publication) -> impl Future<Output = bool> + Send;
}

impl Outbox for AsyncClient {
    /// Logs (not fails) when the client is gone: the caller is shutting down then.
    async fn publish(&self, p: &Publication) -> bool {
        match AsyncClient::publish(
            self,
            p.topic.clone(),
            QoS::AtLeastOnce,
            p.retain,
            p.payload.clone(),
        )
        .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %p.topic, error = %e, "publish failed");
                false
            }
        }
    }
}

async fn publish_all(out: &impl Outbox, pubs: &[Publication]) {
    for p in pubs {
        out.publish(p).await;
    }
}

/// The signed key set as last published. Reconnections republish it unchanged; only a
/// change of keys gives it a new version, so devices rewrite their stores only when
/// something changed.
#[derive(Default)]
struct KeySetState(tokio::sync::Mutex<Option<Publication>>);

impl KeySetState {
    /// The key set to publish; numbered and signed again when `renumber` is set or none
    /// was made yet.
    async fn publication<S: Store>(&self, hub: &Hub<S>, renumber: bool) -> Option<Publication> {
        let mut current = self.0.lock().await;
        if renumber || current.is_none() {
            let version = match hub.store.next_keyset_version().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot number key set");
                    return current.clone();
                }
            };
            match hub.keyset_publication(version).await {
                Ok(p) => *current = Some(p),
                Err(r) => tracing::error!(reason = %r.reason, "cannot build key set"),
            }
        }
        current.clone()
    }
}

/// After a key set went out: a key published for the first time signs only the announce
/// period later (PROTOCOL.md §10).
async fn announce_keys<S: Store>(hub: &Hub<S>, announce_s: u64) {
    let now = hub.clock.now();
    let policy = hub.policy.current();
    let mut ring = hub.keys.write().await;
    match keys::announce_published(
        &hub.store,
        &mut ring,
        now,
        announce_s,
        policy.longest_token_lifetime_s(),
        policy.leeway_s(),
    )
    .await
    {
        Ok(true) => tracing::info!(
            announce_s,
            "a new signing key is published; it signs after the announce period"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot record the publication of a signing key"),
    }
}

/// Everything published on (re)connection: subscriptions, the key set, whatever was
/// recorded but not confirmed (deltas and control messages), every stream's snapshot (the
/// broker may have lost its retained messages) and a round of heartbeats.
async fn on_connected<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &AsyncClient,
    shared: bool,
    announce_s: u64,
) -> Result<(), MqttError> {
    let filter = if shared {
        topic::ALL_REQUESTS_SHARED
    } else {
        topic::ALL_REQUESTS
    };
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    // Our own deltas and control messages coming back confirm the broker took them.
    client
        .subscribe(topic::ALL_REVOCATION_DELTAS, QoS::AtLeastOnce)
        .await?;
    client
        .subscribe(topic::ALL_CONTROLS, QoS::AtLeastOnce)
        .await?;
    let mut pubs = Vec::new();
    pubs.extend(keyset.publication(hub, false).await);
    match hub
        .pending_broadcasts(u64::MAX, MAX_CONTROLS_PER_HEARTBEAT)
        .await
    {
        Ok(p) => {
            if !p.is_empty() {
                tracing::info!(count = p.len(), "re-broadcasting unconfirmed revocations");
            }
            pubs.extend(p);
        }
        Err(r) => tracing::error!(reason = %r.reason, "cannot read unpublished revocations"),
    }
    publish_all(client, &pubs).await;
    announce_keys(hub, announce_s).await;
    publish_snapshots(hub, client, true).await;
    publish_heartbeats(hub, client).await;
    Ok(())
}

/// Publishes the retained snapshot of every stream whose snapshot is out of date (or of
/// every stream, with `all`), and records what was published.
async fn publish_snapshots<S: Store>(hub: &Hub<S>, client: &impl Outbox, all: bool) {
    let streams = match hub.store.streams().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the revocation streams");
            return;
        }
    };
    let now = hub.clock.now();
    for state in streams.iter().filter(|s| all || s.snapshot_seq < s.seq) {
        match hub.snapshot_publications(state, now).await {
            Ok((pubs, latest)) => {
                let pages = pubs.iter().filter(|p| !p.payload.is_empty()).count() as u64;
                publish_all(client, &pubs).await;
                if let Err(e) = hub
                    .store
                    .set_snapshot_published(&state.name, latest, pages)
                    .await
                {
                    tracing::error!(stream = %state.name, error = %e, "cannot record the snapshot");
                }
            }
            Err(r) => {
                tracing::error!(stream = %state.name, reason = %r.reason, "cannot build the snapshot")
            }
        }
    }
}

/// Publishes a heartbeat on every stream, issued now: the clock is read here, after
/// whatever was published before, so a heartbeat never leaves already aged by a backlog.
async fn publish_heartbeats<S: Store>(hub: &Hub<S>, client: &impl Outbox) {
    let streams = match hub.store.streams().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the revocation streams");
            return;
        }
    };
    match hub.heartbeats(&streams, hub.clock.now()).await {
        Ok(pubs) => publish_all(client, &pubs).await,
        Err(r) => tracing::error!(reason = %r.reason, "cannot build the heartbeats"),
    }
}

/// Reloads the signing keys; if the set changed (a key added by `keys rotate`, or one
/// retired), publishes the new key set.
async fn reload_keys<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    kek: &Kek,
    client: &impl Outbox,
    announce_s: u64,
) {
    let now = hub.clock.now();
    let ring = match KeyRing::load(&hub.store, kek, &hub.config.hub_id, now).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot reload signing keys; keeping the loaded ones");
            return;
        }
    };
    if ring.kids() == hub.keys.read().await.kids() {
        return;
    }
    *hub.keys.write().await = ring;
    tracing::info!("signing keys changed: publishing the new key set");
    if let Some(p) = keyset.publication(hub, true).await {
        publish_all(client, &[p]).await;
        announce_keys(hub, announce_s).await;
    }
}

/// Drops records that can no longer matter (see [`Hub::prune`]).
async fn prune<S: Store>(hub: &Hub<S>, audit_retention_s: u64) {
    match hub.prune(audit_retention_s).await {
        Ok(p) if p != Default::default() => tracing::debug!(?p, "pruned expired records"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot prune expired records"),
    }
}

/// The control messages the heartbeats republish, each with the time it was first
/// republished, so the ones the broker never echoes back show.
#[derive(Debug, Default)]
struct ControlWatch {
    republished_since: HashMap<PendingControl, u64>,
}

impl ControlWatch {
    /// Notes the control messages republished at `now` (forgetting those no longer
    /// owed) and returns how many have been republished for longer than
    /// [`UNCONFIRMED_CONTROL_HEARTBEATS`] heartbeats of `heartbeat_s`.
    fn republished(&mut self, owed: &[PendingControl], now: u64, heartbeat_s: u64) -> usize {
        let mut still = HashMap::with_capacity(owed.len());
        for c in owed {
            let since = self.republished_since.get(c).copied().unwrap_or(now);
            still.insert(c.clone(), since);
        }
        self.republished_since = still;
        let limit = UNCONFIRMED_CONTROL_HEARTBEATS.saturating_mul(heartbeat_s.max(1));
        self.republished_since
            .values()
            .filter(|since| now.saturating_sub(**since) >= limit)
            .count()
    }
}

async fn heartbeat<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &impl Outbox,
    kek: Option<&Kek>,
    audit_retention_s: u64,
    announce_s: u64,
    watch: &mut ControlWatch,
) {
    if let Some(kek) = kek {
        reload_keys(hub, keyset, kek, client, announce_s).await;
    }
    prune(hub, audit_retention_s).await;
    let now = hub.clock.now();
    // Revocations recorded outside a request (role changes from the CLI, a policy
    // reload) go out now, and those whose broadcast the broker has not confirmed go out
    // again; those recorded in the last two seconds are most likely still on their way
    // (a duplicate would be harmless anyway).
    let settled = now.saturating_sub(2);
    match hub
        .pending_broadcasts(settled, MAX_CONTROLS_PER_HEARTBEAT)
        .await
    {
        Ok(pubs) => publish_all(client, &pubs).await,
        Err(r) => tracing::error!(reason = %r.reason, "cannot read unpublished revocations"),
    }
    match hub
        .store
        .unsent_controls(settled, MAX_CONTROLS_PER_HEARTBEAT)
        .await
    {
        Ok(owed) => {
            let stale = watch.republished(&owed, now, hub.config.heartbeat_s);
            if stale > 0 {
                tracing::warn!(
                    count = stale,
                    heartbeats = UNCONFIRMED_CONTROL_HEARTBEATS,
                    "control messages republished for several heartbeats were never seen back \
                     from the broker: the broker ACL may not let the hub read \
                     client/+/control; regenerate it with `tessera-hub broker-acl`"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the control messages owed"),
    }
    publish_snapshots(hub, client, false).await;
    publish_heartbeats(hub, client).await;
}

/// Verifies one message seen on a delta or control topic off the loop and hands what it
/// confirms to the confirmer, unless [`ECHO_CONCURRENCY`] verifications are running
/// already: then it is dropped (it is published and seen again later) and this returns
/// `false`. Anyone allowed to publish there must not be able to make the hub pile up
/// signature checks.
fn confirm_echo<S: Store>(
    hub: &Arc<Hub<S>>,
    permits: &Arc<Semaphore>,
    echo_tx: &mpsc::Sender<Echo>,
    topic: String,
    payload: Vec<u8>,
) -> bool {
    let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
        return false;
    };
    let (hub, echo_tx) = (Arc::clone(hub), echo_tx.clone());
    tokio::spawn(async move {
        let _permit = permit;
        if let Some(echo) = hub.echo(&topic, &payload).await {
            // Never wait: an echo not recorded now is published and seen again later.
            let _ = echo_tx.try_send(echo);
        }
    });
    true
}

/// Confirms what the broker delivered back to the hub, in batches (one store commit for
/// many deltas and control messages).
async fn confirmer<S: Store>(hub: Arc<Hub<S>>, mut rx: mpsc::Receiver<Echo>) {
    let mut changes = Vec::new();
    let mut controls = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(echo) = next {
            match echo {
                Echo::Changes(stream, from, to) => changes.push((stream, from, to)),
                Echo::Control(c) => controls.push(c),
            }
            next = if changes.len() + controls.len() < 4096 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = hub.store.mark_published(std::mem::take(&mut changes)).await {
            tracing::error!(error = %e, "cannot mark revocation changes published");
        }
        if let Err(e) = hub
            .store
            .mark_controls_sent(std::mem::take(&mut controls))
            .await
        {
            tracing::error!(error = %e, "cannot mark control messages sent");
        }
    }
}

/// Writes audit events in batches, off the request path.
async fn audit_writer<S: Store>(
    hub: Arc<Hub<S>>,
    client: AsyncClient,
    mut rx: mpsc::Receiver<AuditEvent>,
) {
    let mut batch = Vec::new();
    while let Some(ev) = rx.recv().await {
        batch.push(ev);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        for ev in &batch {
            let json = crate::events::to_json(ev);
            // The event stream is best effort (QoS 0); the audit log is the record.
            let _ = client.try_publish(topic::EVENTS, QoS::AtMostOnce, false, json);
        }
        if let Err(e) = hub.store.audit(std::mem::take(&mut batch)).await {
            tracing::error!(error = %e, "cannot write audit log");
        }
    }
}

/// Serves until `shutdown` completes, then disconnects cleanly.
pub async fn run<S: Store>(
    hub: Arc<Hub<S>>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MqttError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (client, mut notices) = mqtt::connect(&config.mqtt, 1024, stop_rx)?;
    let (audit_tx, audit_rx) = mpsc::channel(4096);
    let writer = tokio::spawn(audit_writer(hub.clone(), client.clone(), audit_rx));
    let (echo_tx, echo_rx) = mpsc::channel(16 * 1024);
    let confirming = tokio::spawn(confirmer(hub.clone(), echo_rx));
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let echo_permits = Arc::new(Semaphore::new(ECHO_CONCURRENCY));
    let keyset = Arc::new(KeySetState::default());
    // One heartbeat task: a heartbeat that takes longer than the interval delays the next
    // one rather than overlapping it.
    let beating = {
        let (hub, client, kek) = (hub.clone(), client.clone(), config.kek.clone());
        let (keyset, retention) = (keyset.clone(), config.audit_retention_s);
        let interval_s = config.heartbeat_s.max(1);
        let announce_s = config.rotation_announce_s;
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(Duration::from_secs(interval_s));
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut watch = ControlWatch::default();
            loop {
                beat.tick().await;
                heartbeat(
                    &hub,
                    &keyset,
                    &client,
                    kek.as_deref(),
                    retention,
                    announce_s,
                    &mut watch,
                )
                .await;
            }
        })
    };
    tokio::pin!(shutdown);
    tracing::info!(broker = %config.mqtt.host, port = config.mqtt.port, "hub serving");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            notice = notices.recv() => match notice {
                None => break,
                Some(Notice::Connected) => {
                    tracing::info!("connected to broker");
                    let (hub, client, shared) =
                        (hub.clone(), client.clone(), config.shared_subscription);
                    let (keyset, announce_s) = (keyset.clone(), config.rotation_announce_s);
                    tokio::spawn(async move {
                        if let Err(e) =
                            on_connected(&hub, &keyset, &client, shared, announce_s).await
                        {
                            tracing::error!(error = %e, "cannot subscribe");
                        }
                    });
                }
                Some(Notice::Disconnected(reason)) => {
                    tracing::warn!(%reason, "disconnected from broker");
                }
                Some(Notice::Message(msg))
                    if topic::delta_stream(&msg.topic).is_some()
                        || topic::controlled_device(&msg.topic).is_some() =>
                {
                    confirm_echo(&hub, &echo_permits, &echo_tx, msg.topic, msg.payload);
                }
                Some(Notice::Message(msg)) => {
                    let Some(requester) = topic::requesting_client(&msg.topic) else {
                        continue;
                    };
                    let requester = requester.to_string();
                    let Ok(permit) = permits.clone().acquire_owned().await else { break };
                    let (hub, client, audit_tx) = (hub.clone(), client.clone(), audit_tx.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let handled = hub.handle(&requester, &msg.payload).await;
                        if let Some(reply) = &handled.reply {
                            Outbox::publish(&client, reply).await;
                        }
                        publish_all(&client, &handled.broadcast).await;
                        if let Some(ev) = handled.audit {
                            let _ = audit_tx.send(ev).await;
                        }
                    });
                }
            }
        }
    }
    tracing::info!("shutting down: finishing requests in flight");
    // Every permit back means every request task has published its reply.
    let _ = permits
        .acquire_many(u32::try_from(config.concurrency.max(1)).unwrap_or(u32::MAX))
        .await;
    beating.abort();
    drop(audit_tx);
    drop(echo_tx);
    let _ = writer.await;
    let _ = confirming.await;
    let _ = client.disconnect().await;
    // Let the event loop flush the DISCONNECT before it stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tessera_shared::cose::Sign1;
    use tessera_shared::message::Command;
    use tessera_shared::revocation::StreamMessage;
    use tokio::sync::RwLock;

    use super::*;
    use crate::clock::{Clock, FakeClock};
    use crate::pipeline::PipelineConfig;
    use crate::policy::{Policy, SharedPolicy};
    use crate::revocation::Target;
    use crate::store::{ClientKind, ClientRecord, Sqlite, Unmatched};

    const T0: u64 = 1_767_225_600;

    /// An outbox where each message takes a second of the fake clock: a backlog takes a
    /// while to go out.
    struct SlowOutbox {
        clock: FakeClock,
        sent: Mutex<Vec<Publication>>,
    }

    impl Outbox for SlowOutbox {
        async fn publish(&self, p: &Publication) -> bool {
            self.sent.lock().expect("lock").push(p.clone());
            self.clock.advance_ms(1000);
            true
        }
    }

    impl SlowOutbox {
        fn new(clock: &FakeClock) -> Self {
            Self {
                clock: clock.clone(),
                sent: Mutex::new(Vec::new()),
            }
        }

        fn sent(&self) -> Vec<Publication> {
            self.sent.lock().expect("lock").clone()
        }
    }

    async fn hub(clock: &FakeClock) -> Arc<Hub<Sqlite>> {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![9; 32]).expect("kek");
        keys::create_key(&store, &kek, "hub", T0, T0, Some(T0))
            .await
            .expect("key");
        let ring = KeyRing::load(&store, &kek, "hub", T0).await.expect("ring");
        let policy = Policy::from_toml(Policy::DEFAULT_TOML, "policy.toml").expect("policy");
        Arc::new(Hub {
            store,
            policy: SharedPolicy::new(policy),
            keys: RwLock::new(ring),
            clock: Arc::new(clock.clone()),
            config: PipelineConfig::default(),
        })
    }

    /// Registers `n` enrolled devices `{prefix}-0000…` and revokes them whole at `at`:
    /// a control message owed to each.
    async fn owe_controls(hub: &Hub<Sqlite>, prefix: &str, n: usize, at: u64) {
        let devices: Vec<ClientRecord> = (0..n)
            .map(|i| ClientRecord {
                id: format!("{prefix}-{i:04}"),
                kind: ClientKind::Device,
                public_key: Some(vec![4; 65]),
                role: "sensor".into(),
                groups: Vec::new(),
                enrollment_code_key: None,
                enrolled_at: Some(at - 100),
                revoked_at: None,
                created_at: at - 100,
            })
            .collect();
        let ids = devices.iter().map(|d| d.id.clone()).collect();
        hub.store.add_clients(devices).await.expect("add_clients");
        let out = hub
            .store
            .revoke(vec![Target::Devices(ids)], at, 30, Unmatched::Refuse)
            .await
            .expect("revoke");
        assert_eq!(out.controls.len(), n);
    }

    fn controls(sent: &[Publication]) -> Vec<String> {
        sent.iter()
            .filter_map(|p| topic::controlled_device(&p.topic).map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn heartbeats_are_issued_when_they_go_out_not_aged_by_the_backlog_before_them() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        owe_controls(&hub, "dev", 5, T0 - 10).await;
        let out = SlowOutbox::new(&clock);
        heartbeat(
            &hub,
            &KeySetState::default(),
            &out,
            None,
            86_400,
            300,
            &mut ControlWatch::default(),
        )
        .await;
        let sent = out.sent();
        assert_eq!(controls(&sent).len(), 5);
        let anchor = hub.active_public_key().await;
        let mut beats = 0;
        for p in sent.iter().filter(|p| p.topic.ends_with("/heartbeat")) {
            let payload = Sign1::decode(&p.payload)
                .expect("decode")
                .verify(&anchor)
                .expect("verify");
            let StreamMessage::Heartbeat(hb) = StreamMessage::decode(payload).expect("decode")
            else {
                panic!("not a heartbeat");
            };
            // Five seconds went into the backlog first.
            assert_eq!(hb.issued_at(), T0 + 5);
            beats += 1;
        }
        assert!(beats > 256, "{beats} heartbeats");
    }

    #[tokio::test]
    async fn a_heartbeat_republishes_at_most_its_share_of_control_messages_oldest_first() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        owe_controls(&hub, "new", MAX_CONTROLS_PER_HEARTBEAT, T0 - 10).await;
        owe_controls(&hub, "old", 10, T0 - 20).await;
        let out = SlowOutbox::new(&clock);
        heartbeat(
            &hub,
            &KeySetState::default(),
            &out,
            None,
            86_400,
            300,
            &mut ControlWatch::default(),
        )
        .await;
        let told = controls(&out.sent());
        assert_eq!(told.len(), MAX_CONTROLS_PER_HEARTBEAT);
        for i in 0..10 {
            assert!(told.contains(&format!("old-{i:04}")), "old-{i:04}");
        }
    }

    #[test]
    fn control_messages_count_as_unconfirmed_only_after_several_heartbeats_of_republishing() {
        let c = |device: &str| PendingControl {
            device: device.into(),
            command: Command::Revoked,
            issued_at: T0,
        };
        let mut watch = ControlWatch::default();
        assert_eq!(watch.republished(&[c("a")], T0, 30), 0);
        assert_eq!(watch.republished(&[c("a"), c("b")], T0 + 60, 30), 0);
        assert_eq!(watch.republished(&[c("a"), c("b")], T0 + 90, 30), 1);
        // Confirmed (no longer owed): forgotten.
        assert_eq!(watch.republished(&[c("b")], T0 + 150, 30), 1);
        assert_eq!(watch.republished(&[c("a")], T0 + 180, 30), 0);
    }

    #[tokio::test]
    async fn echoes_beyond_the_verification_limit_are_dropped_not_queued() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        let permits = Arc::new(Semaphore::new(1));
        let (tx, mut rx) = mpsc::channel(8);
        let control = hub
            .control("dev-0000", Command::Revoked, clock.now())
            .await
            .expect("control");
        let busy = Arc::clone(&permits).try_acquire_owned().expect("permit");
        assert!(!confirm_echo(
            &hub,
            &permits,
            &tx,
            control.topic.clone(),
            control.payload.clone()
        ));
        drop(busy);
        assert!(confirm_echo(
            &hub,
            &permits,
            &tx,
            control.topic,
            control.payload
        ));
        let echo = rx.recv().await.expect("confirmed");
        assert!(matches!(echo, Echo::Control(c) if c.device == "dev-0000"));
        assert!(
            rx.try_recv().is_err(),
            "the dropped echo was never verified"
        );
    }
}
