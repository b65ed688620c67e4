//! `serve`: runs the pipeline over MQTT until shutdown.
//!
//! One task polls the MQTT event loop ([`mqtt`](crate::mqtt)); this task dispatches each
//! request to its own tokio task (bounded by a semaphore), so one slow or malicious
//! client never holds up the others. On every (re)connection the hub subscribes again,
//! republishes the retained key set and revocation snapshot, and publishes any revocation
//! recorded but not yet broadcast (for example because the hub was killed after
//! acknowledging it). A heartbeat republishes the signed snapshot and a signed heartbeat.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::AsyncClient;
use tessera_shared::topic;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::keys::{self, Kek, KeyRing};
use crate::mqtt::{self, MqttConfig, MqttError, Notice, QoS};
use crate::pipeline::{Echo, Hub, Publication};
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

/// Publishes one message, logging (not failing) when the client is gone: the caller is
/// shutting down then.
async fn publish(client: &AsyncClient, p: &Publication) -> bool {
    match client
        .publish(
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

async fn publish_all(client: &AsyncClient, pubs: &[Publication]) {
    for p in pubs {
        publish(client, p).await;
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
    let now = hub.clock.now();
    let mut pubs = Vec::new();
    pubs.extend(keyset.publication(hub, false).await);
    match hub.pending_broadcasts(u64::MAX).await {
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
    publish_heartbeats(hub, client, now).await;
    Ok(())
}

/// Publishes the retained snapshot of every stream whose snapshot is out of date (or of
/// every stream, with `all`), and records what was published.
async fn publish_snapshots<S: Store>(hub: &Hub<S>, client: &AsyncClient, all: bool) {
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

/// Publishes a heartbeat on every stream.
async fn publish_heartbeats<S: Store>(hub: &Hub<S>, client: &AsyncClient, now: u64) {
    let streams = match hub.store.streams().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the revocation streams");
            return;
        }
    };
    match hub.heartbeats(&streams, now).await {
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
    client: &AsyncClient,
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

/// Drops records that can no longer matter (see [`Store::prune`]).
async fn prune<S: Store>(hub: &Hub<S>, audit_retention_s: u64) {
    let now_ms = hub.clock.now_ms();
    let leeway = hub.policy.current().leeway_s();
    let expired_before = (now_ms / 1000).saturating_sub(leeway);
    let audit_before_ms = now_ms.saturating_sub(audit_retention_s.saturating_mul(1000));
    match hub.store.prune(expired_before, audit_before_ms).await {
        Ok(p) if p != Default::default() => tracing::debug!(?p, "pruned expired records"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot prune expired records"),
    }
}

async fn heartbeat<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &AsyncClient,
    kek: Option<&Kek>,
    audit_retention_s: u64,
    announce_s: u64,
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
    match hub.pending_broadcasts(settled).await {
        Ok(pubs) => publish_all(client, &pubs).await,
        Err(r) => tracing::error!(reason = %r.reason, "cannot read unpublished revocations"),
    }
    publish_snapshots(hub, client, false).await;
    publish_heartbeats(hub, client, now).await;
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
                Echo::Changes(stream, from, to) => {
                    changes.extend((from..=to).map(|seq| (stream.clone(), seq)));
                }
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
            loop {
                beat.tick().await;
                heartbeat(
                    &hub,
                    &keyset,
                    &client,
                    kek.as_deref(),
                    retention,
                    announce_s,
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
                    let (hub, echo_tx) = (hub.clone(), echo_tx.clone());
                    tokio::spawn(async move {
                        if let Some(echo) = hub.echo(&msg.topic, &msg.payload).await {
                            // Never wait: an echo not recorded now is published and seen
                            // again later.
                            let _ = echo_tx.try_send(echo);
                        }
                    });
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
                            publish(&client, reply).await;
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
