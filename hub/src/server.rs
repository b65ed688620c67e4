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

use crate::keys::{Kek, KeyRing};
use crate::mqtt::{self, MqttConfig, MqttError, Notice, QoS};
use crate::pipeline::{Hub, Publication};
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

/// Everything published on (re)connection.
async fn on_connected<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &AsyncClient,
    shared: bool,
) -> Result<(), MqttError> {
    let filter = if shared {
        topic::ALL_REQUESTS_SHARED
    } else {
        topic::ALL_REQUESTS
    };
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    // Our own deltas coming back confirm the broker took them (see `confirm_delta`).
    client
        .subscribe(topic::REVOCATION_DELTA, QoS::AtLeastOnce)
        .await?;
    let now = hub.clock.now();
    let mut pubs = Vec::new();
    pubs.extend(keyset.publication(hub, false).await);
    match hub.pending_broadcasts().await {
        Ok(p) => {
            if !p.is_empty() {
                tracing::info!(count = p.len(), "re-broadcasting unpublished revocations");
            }
            pubs.extend(p);
        }
        Err(r) => tracing::error!(reason = %r.reason, "cannot read unpublished revocations"),
    }
    match hub.signed_snapshot(now).await {
        Ok(s) => pubs.push(Publication {
            topic: topic::REVOCATION_SNAPSHOT.into(),
            payload: s,
            retain: true,
        }),
        Err(r) => tracing::error!(reason = %r.reason, "cannot build snapshot"),
    }
    publish_all(client, &pubs).await;
    Ok(())
}

/// Reloads the signing keys; if the set changed (a key added by `keys rotate`, or one
/// retired), publishes the new key set.
async fn reload_keys<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    kek: &Kek,
    client: &AsyncClient,
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
) {
    if let Some(kek) = kek {
        reload_keys(hub, keyset, kek, client).await;
    }
    prune(hub, audit_retention_s).await;
    let now = hub.clock.now();
    // Revocations recorded outside a request (role changes from the CLI, a policy
    // reload) or whose broadcast failed go out with the next heartbeat.
    let mut pubs = hub.pending_broadcasts().await.unwrap_or_default();
    match hub.signed_snapshot_and_heartbeat(now).await {
        Ok((snapshot, beat)) => pubs.extend([
            Publication {
                topic: topic::REVOCATION_SNAPSHOT.into(),
                payload: snapshot,
                retain: true,
            },
            Publication {
                topic: topic::REVOCATION_HEARTBEAT.into(),
                payload: beat,
                retain: false,
            },
        ]),
        Err(r) => tracing::error!(reason = %r.reason, "cannot build the heartbeat"),
    }
    publish_all(client, &pubs).await;
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
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let keyset = Arc::new(KeySetState::default());
    let mut beat = tokio::time::interval(Duration::from_secs(config.heartbeat_s.max(1)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    tracing::info!(broker = %config.mqtt.host, port = config.mqtt.port, "hub serving");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = beat.tick() => {
                let (hub, client, kek) = (hub.clone(), client.clone(), config.kek.clone());
                let (keyset, retention) = (keyset.clone(), config.audit_retention_s);
                tokio::spawn(async move {
                    heartbeat(&hub, &keyset, &client, kek.as_deref(), retention).await;
                });
            }
            notice = notices.recv() => match notice {
                None => break,
                Some(Notice::Connected) => {
                    tracing::info!("connected to broker");
                    let (hub, client, shared) =
                        (hub.clone(), client.clone(), config.shared_subscription);
                    let keyset = keyset.clone();
                    tokio::spawn(async move {
                        if let Err(e) = on_connected(&hub, &keyset, &client, shared).await {
                            tracing::error!(error = %e, "cannot subscribe");
                        }
                    });
                }
                Some(Notice::Disconnected(reason)) => {
                    tracing::warn!(%reason, "disconnected from broker");
                }
                Some(Notice::Message(msg)) if msg.topic == topic::REVOCATION_DELTA => {
                    let hub = hub.clone();
                    tokio::spawn(async move { hub.confirm_delta(&msg.payload).await });
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
    drop(audit_tx);
    let _ = writer.await;
    let _ = client.disconnect().await;
    // Let the event loop flush the DISCONNECT before it stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    Ok(())
}
