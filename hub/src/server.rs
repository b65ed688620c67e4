//! `serve`: runs the pipeline over MQTT until shutdown, without ever waiting on a full
//! queue in a loop that something else needs to drain.
//!
//! ```text
//! MQTT event loop ─▶ incoming queue (full: dropped, counted)
//!   ─▶ dispatcher, per message: admission limiter by the client id of the topic
//!        admitted  ─▶ work queue (serve.queue) ─▶ request workers (serve.concurrency)
//!                     full ─▶ refusal queue ─▶ refusal worker: `overloaded`
//!                     quarantined client ─▶ refusal queue ─▶ refusal worker: `quarantined`
//!        limited   ─▶ refusal queue ─▶ refusal worker: `rate_limited` (once a second)
//!        otherwise ─▶ dropped: counted, audited once a second per client
//!        echoes    ─▶ echo queue ─▶ confirmer (full: dropped, counted)
//! workers, refusal worker, dispatcher ─▶ audit channel (full: dropped, counted)
//!   ─▶ audit writer: audit log (refusals aggregated) and event stream (try_publish)
//! workers: each decision ─▶ anomaly detector (quarantines at once) ─▶ alert queue (full:
//!   dropped, counted) ─▶ alerter: alerts topic (try_publish), audit log, webhook queues
//!   (full: dropped, counted) ─▶ one delivery task per webhook
//! ```
//!
//! - The MQTT event loop ([`mqtt::connection`]) never waits for anyone but the network: a
//!   full incoming queue drops the message (counted), so it always drains the requests the
//!   workers' `publish` calls wait on.
//! - The dispatcher never waits either: each message on a request topic passes the
//!   in-memory admission limiter ([`crate::limiter`]) before anything is done with it, then
//!   goes to the work queue; a full work queue gets an `overloaded` answer from the refusal
//!   worker (signed, nothing else done); a full refusal queue, and a client over its
//!   admission limit already told so, get nothing (counted and audited, aggregated).
//! - A fixed pool of request workers takes from the work queue: no task per message.
//! - Audit events and the event stream are best effort on the way (dropped and counted
//!   when the writer is behind); the writer folds identical refusals of one client into
//!   one row per window ([`Aggregator`]), so a flood grows the audit log per window, not
//!   per message.
//! - On every (re)connection one task subscribes again, republishes the retained key set
//!   and revocation snapshot, and publishes any revocation recorded but not yet broadcast.
//!   One heartbeat task prunes the store, republishes what the broker has not echoed back
//!   (every unconfirmed delta, at most `MAX_CONTROLS_PER_HEARTBEAT` (256) control
//!   messages, oldest first), the snapshots that changed, and a signed heartbeat per
//!   stream, issued when it is built, after the rest; then logs what was dropped or
//!   refused since the last one. Echoes of the hub's own deltas and control messages are
//!   verified by one confirmer task, which drops what it cannot keep up with.
//! - Anomaly detection ([`crate::anomaly`]) sees every decision of the workers before its
//!   answer goes out; an alert that quarantines its client does so at once, and the
//!   dispatcher refuses the client's later requests `quarantined` without reading them. The
//!   alerter publishes, audits and notifies off the request path, and ends the quarantines
//!   that run out, once a second; webhooks are delivered by tasks of their own
//!   ([`crate::webhooks`]).
//! - Every task is in one `JoinSet`: one that panics or ends while the hub serves stops
//!   the hub with an error. So does a store that refuses writes for good (read-only, I/O
//!   error, full disk: [`StoreError::is_persistent_write_failure`]), seen by the audit
//!   writer, which writes after every request: the request that met it was answered
//!   `internal`, and the hub stops rather than answer every later one so. A shutdown
//!   stops taking requests, lets the workers answer what is queued and running within
//!   `serve.drain_s`, then sends DISCONNECT and waits for the event loop to have sent it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tessera_mqtt::MqttClient;
use tessera_shared::message::ErrorCode;
use tessera_shared::topic;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::anomaly::{Alert, AlertKind, Decision, Detector};
use crate::clock::Clock;
use crate::keys::{self, Kek, KeyRing};
use crate::limiter::{Admission, Limit, Limiter};
use crate::metrics::Metrics;
use crate::mqtt::{self, Counter, Incoming, MqttConfig, MqttError, Notice, QoS, Queues};
use crate::pipeline::{Echo, Hub, Publication, Refusal};
use crate::policy_change;
use crate::revocation::PendingControl;
use crate::store::{AuditEvent, Store, StoreError};
use crate::webhooks::{NotificationKind, Webhooks};

/// Tunables of the serving loop.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// Subscribe through an MQTT 5 shared subscription (several hub replicas).
    pub shared_subscription: bool,
    /// Request workers: requests handled at once.
    pub concurrency: usize,
    /// Requests waiting for a worker at most; beyond, they are answered `overloaded`.
    pub queue: usize,
    /// The in-memory per-client admission limit, checked before anything else.
    pub admission: Limit,
    /// How long a shutdown waits for queued and running requests.
    pub drain: Duration,
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
    /// Where the HTTP listener (`/metrics`, `/healthz`, `/readyz`: [`crate::http`])
    /// listens; `None` for none.
    pub http: Option<std::net::SocketAddr>,
}

/// Control messages republished per heartbeat at most, oldest first: a broker that never
/// echoes them (an ACL that does not let the hub read `client/+/control`) must not make
/// every heartbeat republish every control message still owed.
const MAX_CONTROLS_PER_HEARTBEAT: usize = 256;

/// Heartbeats after which a control message the hub keeps republishing counts as never
/// confirmed (one or two may be in flight, or the connection was just restored).
const UNCONFIRMED_CONTROL_HEARTBEATS: u64 = 3;

/// The rumqttc request queue: replies and broadcasts wait for room in it (the event loop
/// drains it continuously); refusals and events are dropped when it is full.
const MQTT_REQUESTS: usize = 1024;
/// Incoming messages waiting for the dispatcher, at most; more are dropped (and counted).
const INCOMING_MESSAGES: usize = 4096;
/// Payload bytes of those messages at most.
const INCOMING_BYTES: usize = 16 << 20;
/// Payload bytes of the requests in the work queue at most (its depth is
/// `serve.queue`): 16 of the largest revoke requests.
const QUEUE_BYTES: usize = 16 << 20;
/// Requests waiting for their `overloaded` or `rate_limited` answer, at most.
const REFUSAL_QUEUE: usize = 256;
/// Payload bytes of those at most.
const REFUSAL_QUEUE_BYTES: usize = 4 << 20;
/// Echoes waiting to be verified at most; more are dropped (they come again).
const ECHO_QUEUE: usize = 1024;
/// Payload bytes of those at most (a delta is at most 16 KB; anything larger on those
/// topics is not the hub's).
const ECHO_QUEUE_BYTES: usize = 4 << 20;
/// Audit events waiting for the writer at most; more are dropped (and counted).
const AUDIT_QUEUE: usize = 4096;
/// Audit events the writer takes per round at most.
const AUDIT_BATCH: usize = 1024;
/// Identical refusals of one client are one audit row per this many milliseconds.
const AUDIT_WINDOW_MS: u64 = 10_000;
/// (client, action, outcome) kept apart at most; beyond, refusals aggregate under `*`.
const AUDIT_MAX_KEYS: usize = 1024;
/// Clients whose dropped messages are counted apart, per second; beyond, under `*`.
const MAX_DROP_CLIENTS: usize = 1024;
/// Alerts waiting for the alerter at most; more are dropped (and counted).
const ALERT_QUEUE: usize = 1024;
/// How long a shutdown waits for the broker to take the DISCONNECT.
const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);

/// Where the serving loop's messages go: the broker, or a list in tests.
trait Outbox: Sync {
    /// Publishes one message (QoS 1); `false` if it could not be handed over.
    fn publish(&self, p: &Publication) -> impl Future<Output = bool> + Send;
}

impl Outbox for MqttClient {
    /// Logs (not fails) when the client is gone: the caller is shutting down then.
    async fn publish(&self, p: &Publication) -> bool {
        match MqttClient::publish(
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

/// Where best-effort messages go without waiting (the alerts): the broker, or a list in
/// tests.
trait Notices: Send + Sync {
    /// Hands one message over (QoS 1) if there is room; `false` if not.
    fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool;
}

impl Notices for MqttClient {
    fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool {
        MqttClient::try_publish(self, topic, QoS::AtLeastOnce, false, payload).is_ok()
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
            // Worked out from the keys themselves: the same across restarts and replicas,
            // higher after every key created or retired.
            let version = hub.keys.read().await.keyset_version();
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

/// Everything published on (re)connection: subscriptions and the key set; then, by the
/// holder of the housekeeping lease only (the other replicas would publish the same
/// again), whatever was recorded but not confirmed (deltas and control messages), every
/// stream's snapshot (the broker may have lost its retained messages) and a round of
/// heartbeats.
async fn on_connected<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &MqttClient,
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
    let leading = hold_lease(hub).await;
    if leading {
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
    }
    publish_all(client, &pubs).await;
    announce_keys(hub, announce_s).await;
    if leading {
        publish_snapshots(hub, client, true).await;
        publish_heartbeats(hub, client).await;
    }
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
    let now = hub.clock.now();
    match hub.heartbeats(&streams, now).await {
        Ok(pubs) => {
            publish_all(client, &pubs).await;
            hub.metrics.heartbeat(now);
        }
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

/// Reloads the policy from `path` at every `SIGHUP`, one reload at a time, as long as the
/// returned future runs ([`policy_change::reload`]: a reload that would strand registered
/// clients or revoke more than `limits` allows is refused unless forced, every reload is
/// logged and audited, and one that revokes nothing records nothing to publish; what one
/// revokes goes out with the next heartbeat).
///
/// The handler is installed here, before the future is first polled, so a `SIGHUP` sent
/// once this returns reloads rather than kills the process. Fails if it cannot be
/// installed (outside a tokio runtime with signals enabled, for one).
pub fn reload_policy_on_hangup<S: Store>(
    hub: Arc<Hub<S>>,
    path: std::path::PathBuf,
    limits: policy_change::ReloadLimits,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        while hup.recv().await.is_some() {
            reload_policy(&hub, &path, &limits).await;
        }
    })
}

/// One policy reload ([`policy_change::reload`], which logs and audits its result itself),
/// counted in the metrics as a revocation of kind `policy_reload` when it revoked tokens.
async fn reload_policy<S: Store>(
    hub: &Hub<S>,
    path: &std::path::Path,
    limits: &policy_change::ReloadLimits,
) {
    let reloaded =
        policy_change::reload(&hub.store, &hub.policy, path, limits, hub.clock.now_ms()).await;
    if matches!(&reloaded, Ok(r) if r.revoked.is_some()) {
        hub.metrics.revocation("policy_reload");
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

/// One heartbeat of the hub holding the housekeeping lease: [`every_replica`]'s part, then
/// [`housekeeping`].
async fn heartbeat<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &impl Outbox,
    kek: Option<&Kek>,
    audit_retention_s: u64,
    announce_s: u64,
    watch: &mut ControlWatch,
) {
    every_replica(hub, keyset, client, kek, announce_s).await;
    housekeeping(hub, client, audit_retention_s, watch).await;
}

/// What every replica does at its heartbeat, lease or not: picks up rotated signing keys
/// (each signs with the active key) and updates its gauges.
async fn every_replica<S: Store>(
    hub: &Hub<S>,
    keyset: &KeySetState,
    client: &impl Outbox,
    kek: Option<&Kek>,
    announce_s: u64,
) {
    if let Some(kek) = kek {
        reload_keys(hub, keyset, kek, client, announce_s).await;
    }
    let now = hub.clock.now();
    match hub
        .store
        .revocation_entries(now, tessera_shared::revocation::MAX_LEEWAY)
        .await
    {
        Ok(n) => {
            hub.metrics
                .revocation_entries
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::error!(error = %e, "cannot count the revocation entries"),
    }
    match hub.store.live_tokens(now).await {
        Ok(live) => {
            for (kind, n) in [("device", live.device), ("access", live.access)] {
                hub.metrics
                    .tokens_live
                    .get_or_create(&crate::metrics::KindLabels { kind })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot count the live tokens"),
    }
}

/// What the holder of the housekeeping lease does at its heartbeat, once per interval
/// across replicas: prunes, publishes what is unpublished or unconfirmed, snapshots and
/// heartbeats.
async fn housekeeping<S: Store>(
    hub: &Hub<S>,
    client: &impl Outbox,
    audit_retention_s: u64,
    watch: &mut ControlWatch,
) {
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

/// What the serving loop dropped or refused instead of waiting, by reason: the counts of
/// the summary line logged at every heartbeat (and at shutdown) when any grew.
#[derive(Debug, Clone, Default)]
struct Shed {
    /// `rate_limited` answers of the admission limiter (one a second per client at most).
    rate_limited_answered: Counter,
    /// Messages over the admission limit, dropped unanswered.
    rate_limited_dropped: Counter,
    /// `overloaded` answers: the work queue was full.
    overloaded_answered: Counter,
    /// Requests dropped unanswered: the work queue and the refusal queue were full.
    overloaded_dropped: Counter,
    /// `rate_limited` or `overloaded` answers not sent: the MQTT request queue was full.
    answers_dropped: Counter,
    /// Audit events dropped: the audit writer was behind (the log undercounts then).
    audit_dropped: Counter,
    /// Events not published on the event stream: the MQTT request queue was full.
    events_dropped: Counter,
    /// Echoes of the hub's own deltas and control messages not verified: the confirmer
    /// was behind (they are published and seen again later).
    echoes_dropped: Counter,
    /// `quarantined` answers (not overload: not in the summary).
    quarantined_answered: Counter,
}

/// [`Shed`] read at one moment, with the MQTT layer's own drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ShedCounts {
    mqtt_queue_full: u64,
    rate_limited_answered: u64,
    rate_limited_dropped: u64,
    overloaded_answered: u64,
    overloaded_dropped: u64,
    answers_dropped: u64,
    audit_dropped: u64,
    events_dropped: u64,
    echoes_dropped: u64,
}

impl ShedCounts {
    fn read(shed: &Shed, mqtt_dropped: &Counter) -> Self {
        Self {
            mqtt_queue_full: mqtt_dropped.get(),
            rate_limited_answered: shed.rate_limited_answered.get(),
            rate_limited_dropped: shed.rate_limited_dropped.get(),
            overloaded_answered: shed.overloaded_answered.get(),
            overloaded_dropped: shed.overloaded_dropped.get(),
            answers_dropped: shed.answers_dropped.get(),
            audit_dropped: shed.audit_dropped.get(),
            events_dropped: shed.events_dropped.get(),
            echoes_dropped: shed.echoes_dropped.get(),
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            mqtt_queue_full: self.mqtt_queue_full - earlier.mqtt_queue_full,
            rate_limited_answered: self.rate_limited_answered - earlier.rate_limited_answered,
            rate_limited_dropped: self.rate_limited_dropped - earlier.rate_limited_dropped,
            overloaded_answered: self.overloaded_answered - earlier.overloaded_answered,
            overloaded_dropped: self.overloaded_dropped - earlier.overloaded_dropped,
            answers_dropped: self.answers_dropped - earlier.answers_dropped,
            audit_dropped: self.audit_dropped - earlier.audit_dropped,
            events_dropped: self.events_dropped - earlier.events_dropped,
            echoes_dropped: self.echoes_dropped - earlier.echoes_dropped,
        }
    }
}

/// Logs what was dropped or refused since the last summary, when anything was.
#[derive(Debug)]
struct Summary {
    shed: Shed,
    mqtt_dropped: Counter,
    last: ShedCounts,
}

impl Summary {
    fn log(&mut self, when: &str) {
        let now = ShedCounts::read(&self.shed, &self.mqtt_dropped);
        let d = now.since(&self.last);
        self.last = now;
        if d == ShedCounts::default() {
            return;
        }
        tracing::warn!(
            when,
            mqtt_queue_full = d.mqtt_queue_full,
            rate_limited_answered = d.rate_limited_answered,
            rate_limited_dropped = d.rate_limited_dropped,
            overloaded_answered = d.overloaded_answered,
            overloaded_dropped = d.overloaded_dropped,
            answers_dropped = d.answers_dropped,
            audit_dropped = d.audit_dropped,
            events_dropped = d.events_dropped,
            echoes_dropped = d.echoes_dropped,
            "overload: messages dropped or refused since the last summary"
        );
    }
}

/// A request off the wire, waiting for a worker (or for its refusal).
#[derive(Debug)]
struct Job {
    requester: String,
    payload: Vec<u8>,
}

/// A request to answer with `code` without handling it.
#[derive(Debug)]
struct Refuse {
    job: Job,
    code: ErrorCode,
}

/// What counts against a queue's byte budget.
trait Weighed {
    fn bytes(&self) -> usize;
}

impl Weighed for Job {
    fn bytes(&self) -> usize {
        self.payload.len()
    }
}

impl Weighed for Incoming {
    fn bytes(&self) -> usize {
        self.payload.len()
    }
}

impl Weighed for Refuse {
    fn bytes(&self) -> usize {
        self.job.payload.len()
    }
}

/// The sending end of a queue bounded in items and in payload bytes, that never waits:
/// a full queue hands the item back.
#[derive(Debug)]
struct QueueTx<T> {
    tx: mpsc::Sender<T>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Items waiting, for the metrics.
    depth: Gauge,
}

/// The receiving end, shared by the workers that take from it.
#[derive(Debug)]
struct QueueRx<T> {
    rx: tokio::sync::Mutex<mpsc::Receiver<T>>,
    bytes: Arc<AtomicUsize>,
    depth: Gauge,
}

/// A queue of `depth` items and `max_bytes` payload bytes at most, its depth kept in
/// `gauge`.
fn queue<T: Weighed>(
    depth: usize,
    max_bytes: usize,
    gauge: Gauge,
) -> (QueueTx<T>, Arc<QueueRx<T>>) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        QueueTx {
            tx,
            bytes: Arc::clone(&bytes),
            max_bytes,
            depth: gauge.clone(),
        },
        Arc::new(QueueRx {
            rx: tokio::sync::Mutex::new(rx),
            bytes,
            depth: gauge,
        }),
    )
}

impl<T: Weighed> QueueTx<T> {
    fn try_push(&self, item: T) -> Result<(), T> {
        let len = item.bytes();
        let before = self.bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(item);
        }
        // Counted before it can be taken, so the gauge never goes below zero.
        self.depth.inc();
        self.tx.try_send(item).map_err(|e| {
            self.depth.dec();
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item) => {
                    item
                }
            }
        })
    }
}

impl<T: Weighed> QueueRx<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    async fn pop(&self) -> Option<T> {
        let item = self.rx.lock().await.recv().await?;
        self.depth.dec();
        self.bytes.fetch_sub(item.bytes(), Ordering::Relaxed);
        Some(item)
    }

    /// The next item if one is there and no other taker is waiting.
    fn try_pop(&self) -> Option<T> {
        let item = self.rx.try_lock().ok()?.try_recv().ok()?;
        self.depth.dec();
        self.bytes.fetch_sub(item.bytes(), Ordering::Relaxed);
        Some(item)
    }
}

/// The audit channel's sending end: never waits, counts what it drops.
#[derive(Debug, Clone)]
struct AuditTx {
    tx: mpsc::Sender<AuditEvent>,
    dropped: Counter,
}

impl AuditTx {
    fn send(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.add(1);
        }
    }
}

/// Messages dropped unanswered since the last flush, per client: audited as one event per
/// client and reason a second (action `unread`: the hub did not read them), so that
/// dropping a message costs the dispatcher a counter, not an allocation.
#[derive(Debug, Default)]
struct Drops {
    counts: HashMap<String, DropCounts>,
}

#[derive(Debug, Default, Clone, Copy)]
struct DropCounts {
    rate_limited: u64,
    overloaded: u64,
}

impl Drops {
    fn note(&mut self, client: &str, code: ErrorCode) {
        let counts = match self.counts.get_mut(client) {
            Some(counts) => counts,
            None => {
                // More clients at once than kept apart: counted together.
                let key = if self.counts.len() < MAX_DROP_CLIENTS {
                    client
                } else {
                    MANY_CLIENTS
                };
                self.counts.entry(key.to_owned()).or_default()
            }
        };
        match code {
            ErrorCode::RateLimited => counts.rate_limited += 1,
            _ => counts.overloaded += 1,
        }
    }

    /// The audit events for the drops so far, and a fresh start.
    fn flush(&mut self, at_ms: u64, admission: Limit) -> Vec<AuditEvent> {
        let mut events = Vec::new();
        for (client, counts) in self.counts.drain() {
            for (code, count, reason) in [
                (
                    ErrorCode::RateLimited,
                    counts.rate_limited,
                    format!(
                        "over the admission limit ({} a second after a burst of {}): \
                         dropped unanswered",
                        admission.per_second, admission.burst
                    ),
                ),
                (
                    ErrorCode::Overloaded,
                    counts.overloaded,
                    "the hub is overloaded: dropped unanswered".to_owned(),
                ),
            ] {
                if count > 0 {
                    events.push(AuditEvent {
                        at_ms,
                        actor: client.clone(),
                        action: UNREAD.to_owned(),
                        target: String::new(),
                        outcome: code.name().to_owned(),
                        reason,
                        count,
                    });
                }
            }
        }
        events
    }
}

/// The action of audit events for messages dropped before the hub read them.
const UNREAD: &str = "unread";

/// Sorts every incoming message, without waiting for anything: echoes to the confirmer,
/// requests through the admission limiter to the work queue, refusals to the refusal
/// queue; what does not fit is dropped and counted.
struct Dispatcher {
    limiter: Limiter,
    /// The limiter's clock: monotonic, from here.
    started: tokio::time::Instant,
    admission: Limit,
    work: QueueTx<Job>,
    refusals: QueueTx<Refuse>,
    echoes: QueueTx<Incoming>,
    audit: AuditTx,
    drops: Drops,
    shed: Shed,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    monitoring: Arc<Monitoring>,
}

impl Dispatcher {
    fn dispatch(&mut self, msg: Incoming) {
        if topic::delta_stream(&msg.topic).is_some()
            || topic::controlled_device(&msg.topic).is_some()
        {
            // An echo not verified now is published and seen again later.
            if self.echoes.try_push(msg).is_err() {
                self.shed.echoes_dropped.add(1);
            }
            return;
        }
        let Some(requester) = topic::requesting_client(&msg.topic) else {
            return;
        };
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match self.limiter.admit(requester, now_ms) {
            Admission::Admit => {
                let job = Job {
                    requester: requester.to_owned(),
                    payload: msg.payload,
                };
                // Before anything costs the hub more: a quarantined client gets its
                // refusal (within the admission limit, like any other message).
                if self
                    .monitoring
                    .quarantined_until(requester, self.clock.now_ms())
                    .is_some()
                {
                    self.refuse(job, ErrorCode::Quarantined);
                    return;
                }
                if let Err(job) = self.work.try_push(job) {
                    self.refuse(job, ErrorCode::Overloaded);
                }
            }
            Admission::Refuse => {
                let job = Job {
                    requester: requester.to_owned(),
                    payload: msg.payload,
                };
                self.refuse(job, ErrorCode::RateLimited);
            }
            Admission::Drop => {
                self.shed.rate_limited_dropped.add(1);
                self.metrics
                    .admission_refusal(ErrorCode::RateLimited.name(), "dropped");
                self.drops.note(requester, ErrorCode::RateLimited);
            }
        }
    }

    fn refuse(&mut self, job: Job, code: ErrorCode) {
        if let Err(refused) = self.refusals.try_push(Refuse { job, code }) {
            self.metrics.admission_refusal(code.name(), "dropped");
            match code {
                // The client's requests are refused anyway; nothing to audit.
                ErrorCode::Quarantined => return,
                ErrorCode::RateLimited => self.shed.rate_limited_dropped.add(1),
                _ => self.shed.overloaded_dropped.add(1),
            }
            self.drops.note(&refused.job.requester, code);
        }
    }

    /// Audits the messages dropped since the last call (see [`Drops`]).
    fn flush_drops(&mut self) {
        for event in self.drops.flush(self.clock.now_ms(), self.admission) {
            self.audit.send(event);
        }
    }
}

/// Handles requests from the work queue until it closes.
async fn worker<S: Store>(
    hub: Arc<Hub<S>>,
    client: MqttClient,
    work: Arc<QueueRx<Job>>,
    audit: AuditTx,
    monitoring: Arc<Monitoring>,
) {
    while let Some(job) = work.pop().await {
        // A request is handled in a task of its own so that a bug it triggers (a panic)
        // costs that request, not the worker, and nothing a client sends stops the hub.
        let requester = job.requester.clone();
        let handling = tokio::spawn({
            let hub = Arc::clone(&hub);
            let monitoring = Arc::clone(&monitoring);
            async move {
                hub.handle_with(&job.requester, &job.payload, Some(&*monitoring))
                    .await
            }
        });
        let handled = match handling.await {
            Ok(handled) => handled,
            Err(e) => {
                tracing::error!(
                    %requester,
                    error = %e,
                    "handling a request failed (a bug): it is not answered"
                );
                continue;
            }
        };
        // Before the answer goes out: a client that hears back has its quarantine, if
        // this decision started one, in force already.
        for decision in handled.decision.iter().chain(&handled.reported) {
            monitoring.observe(decision, hub.clock.now_ms());
        }
        // The event loop never waits for anyone, so these complete once the broker takes
        // what is ahead of them.
        if let Some(reply) = &handled.reply {
            Outbox::publish(&client, reply).await;
        }
        publish_all(&client, &handled.broadcast).await;
        if let Some(event) = handled.audit {
            monitoring.notify_revocation(&event);
            audit.send(event);
        }
    }
}

/// Answers requests from the refusal queue with their refusal (signed, nothing else done)
/// until it closes. One task: refusals never take more than one core.
async fn refuser<S: Store>(
    hub: Arc<Hub<S>>,
    client: MqttClient,
    refusals: Arc<QueueRx<Refuse>>,
    audit: AuditTx,
    shed: Shed,
    admission: Limit,
    monitoring: Arc<Monitoring>,
) {
    while let Some(Refuse { job, code }) = refusals.pop().await {
        let (reason, answered) = match code {
            ErrorCode::Quarantined => (
                match monitoring.quarantined_until(&job.requester, hub.clock.now_ms()) {
                    Some(until) => format!(
                        "this client is quarantined after an anomaly alert until {} (Unix \
                         s); an operator can lift it",
                        until / 1000
                    ),
                    None => "this client was quarantined after an anomaly alert".to_owned(),
                },
                &shed.quarantined_answered,
            ),
            ErrorCode::RateLimited => (
                format!(
                    "over the admission limit ({} a second after a burst of {}); requests \
                     are dropped unanswered for a second after this answer",
                    admission.per_second, admission.burst
                ),
                &shed.rate_limited_answered,
            ),
            _ => (
                "the hub has more requests queued than it takes; retry after a backoff".to_owned(),
                &shed.overloaded_answered,
            ),
        };
        let handled = hub
            .refuse(&job.requester, &job.payload, Refusal::new(code, reason))
            .await;
        if let Some(reply) = handled.reply {
            // Best effort: a refusal never waits for room.
            let result =
                match client.try_publish(reply.topic, QoS::AtLeastOnce, false, reply.payload) {
                    Ok(()) => {
                        answered.add(1);
                        "answered"
                    }
                    Err(_) => {
                        shed.answers_dropped.add(1);
                        "dropped"
                    }
                };
            hub.metrics.admission_refusal(code.name(), result);
        }
        if let Some(event) = handled.audit {
            audit.send(event);
        }
    }
}

/// Anomaly detection, quarantines and notifications, shared by the dispatcher (which
/// refuses quarantined clients), the workers (which report every decision and
/// revocation) and the alerter (which publishes, audits and notifies). Never waits: the
/// detector's lock is held only to count, and alerts go to the alerter through a bounded
/// queue that drops (counted) when full; the quarantine itself is in force at once.
pub(crate) struct Monitoring {
    detector: std::sync::Mutex<Detector>,
    alerts: mpsc::Sender<Alert>,
    webhooks: Webhooks,
    metrics: Arc<Metrics>,
}

impl crate::anomaly::Quarantines for Monitoring {
    fn lift(&self, client: &str, by: &str, now_ms: u64) -> Option<u64> {
        Monitoring::lift(self, client, by, now_ms)
    }
}

/// The quarantines the dashboard shows, without keeping the monitoring alive (the
/// alerter stops once it holds the last reference).
struct DashboardQuarantines(std::sync::Weak<Monitoring>);

impl crate::dashboard::QuarantineList for DashboardQuarantines {
    fn quarantines(&self, now_ms: u64) -> Vec<(String, u64)> {
        self.0
            .upgrade()
            .map(|m| m.detector().quarantines(now_ms))
            .unwrap_or_default()
    }
}

impl Monitoring {
    /// The monitoring of `detector`, notifying `webhooks`, and the receiving end of its
    /// alerts (for [`alerter`]).
    pub(crate) fn new(
        detector: Detector,
        webhooks: Webhooks,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<Alert>) {
        let (alerts, rx) = mpsc::channel(ALERT_QUEUE);
        (
            Self {
                detector: std::sync::Mutex::new(detector),
                alerts,
                webhooks,
                metrics,
            },
            rx,
        )
    }

    fn detector(&self) -> std::sync::MutexGuard<'_, Detector> {
        self.detector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Until when `client` is quarantined, if it is at `now_ms`.
    pub(crate) fn quarantined_until(&self, client: &str, now_ms: u64) -> Option<u64> {
        self.detector().quarantined_until(client, now_ms)
    }

    /// Takes one decision of the pipeline; passes on the alerts it raises.
    pub(crate) fn observe(&self, decision: &Decision, now_ms: u64) {
        let (alerts, quarantined) = {
            let mut detector = self.detector();
            let alerts = detector.observe(decision, now_ms);
            (alerts, detector.quarantined())
        };
        if alerts.is_empty() {
            return;
        }
        self.metrics
            .quarantined_clients
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        for alert in alerts {
            tracing::warn!(
                alert = alert.kind.as_str(),
                client = %alert.client,
                count = alert.count,
                quarantined_until_ms = alert.quarantined_until_ms,
                reason = %alert.reason,
                "anomaly alert"
            );
            self.metrics.alert(alert.kind.as_str());
            if alert.quarantined_until_ms.is_some() {
                self.metrics.quarantines.inc();
            }
            self.pass_on(alert);
        }
    }

    /// Lifts `client`'s quarantine for operator `by`; returns until when it would have
    /// lasted, if it was in force.
    pub(crate) fn lift(&self, client: &str, by: &str, now_ms: u64) -> Option<u64> {
        let (until, quarantined) = {
            let mut detector = self.detector();
            let until = detector.lift(client, now_ms);
            (until, detector.quarantined())
        };
        self.metrics
            .quarantined_clients
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        if let Some(until) = until {
            tracing::info!(client, by, "quarantine lifted");
            self.metrics
                .quarantine_ends
                .get_or_create(&crate::metrics::EndLabels { how: "lifted" })
                .inc();
            self.pass_on(Alert {
                at_ms: now_ms,
                kind: AlertKind::QuarantineLifted,
                client: client.to_owned(),
                actor: by.to_owned(),
                count: 0,
                reason: format!("lifted by {by}; it would have lasted until {until} ms"),
                quarantined_until_ms: None,
            });
        }
        until
    }

    /// Ends the quarantines that ran out by `now_ms` (and forgets idle tracks).
    fn expire(&self, now_ms: u64) {
        let (ended, quarantined) = {
            let mut detector = self.detector();
            let ended = detector.expire(now_ms);
            (ended, detector.quarantined())
        };
        self.metrics
            .quarantined_clients
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        for end in ended {
            tracing::info!(client = %end.client, "quarantine expired");
            self.metrics
                .quarantine_ends
                .get_or_create(&crate::metrics::EndLabels { how: "expired" })
                .inc();
            self.pass_on(end);
        }
    }

    fn pass_on(&self, alert: Alert) {
        if self.alerts.try_send(alert).is_err() {
            self.metrics.alerts_dropped.inc();
        }
    }

    /// Notifies the webhooks that take revocations of a revocation the pipeline committed,
    /// or one made outside a request (`event` is any decision; only successful `revoke`s
    /// and [`policy_change::POLICY_REVOKE`] rows are notified).
    pub(crate) fn notify_revocation(&self, event: &AuditEvent) {
        if (event.action != tessera_shared::message::Operation::Revoke.name()
            && event.action != policy_change::POLICY_REVOKE)
            || event.outcome != "ok"
        {
            return;
        }
        self.webhooks.notify(
            NotificationKind::Revocation,
            serde_json::json!({
                "at_ms": event.at_ms,
                "actor": event.actor,
                "target": event.target,
                "reason": event.reason,
            }),
        );
    }
}

/// The audit rows of an alerts-topic message: the alert (or the quarantine's end) and,
/// when it quarantined the client, the quarantine.
fn alert_rows(alert: &Alert) -> Vec<AuditEvent> {
    let (action, outcome) = match alert.kind {
        // The operator's `lift_quarantine` request is its own audit row.
        AlertKind::QuarantineLifted => return Vec::new(),
        AlertKind::QuarantineExpired => ("quarantine_expiry", "ok"),
        kind => ("alert", kind.as_str()),
    };
    let mut rows = vec![AuditEvent {
        at_ms: alert.at_ms,
        actor: alert.actor.clone(),
        action: action.to_owned(),
        target: alert.client.clone(),
        outcome: outcome.to_owned(),
        reason: alert.reason.clone(),
        count: alert.count.max(1),
    }];
    if let Some(until) = alert.quarantined_until_ms {
        rows.push(AuditEvent {
            at_ms: alert.at_ms,
            actor: alert.actor.clone(),
            action: "quarantine".to_owned(),
            target: alert.client.clone(),
            outcome: "ok".to_owned(),
            reason: format!("after a {} alert, until {until} ms", alert.kind.as_str()),
            count: 1,
        });
    }
    rows
}

/// Publishes alerts on the alerts topic, writes them to the audit log and notifies the
/// webhooks, off the request path; once a second ends the quarantines that ran out.
/// Stops when every sender is gone (after the rest of the serving loop).
async fn alerter<S: Store>(
    hub: Arc<Hub<S>>,
    client: impl Notices,
    monitoring: Arc<Monitoring>,
    mut rx: mpsc::Receiver<Alert>,
    storage: StorageAlarm,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        let mut alerts = Vec::new();
        tokio::select! {
            alert = rx.recv() => match alert {
                Some(alert) => alerts.push(alert),
                None => return,
            },
            _ = tick.tick() => monitoring.expire(hub.clock.now_ms()),
            _ = stop.wait_for(|stop| *stop), if !stopping => stopping = true,
        }
        while alerts.len() < AUDIT_BATCH {
            let Ok(alert) = rx.try_recv() else { break };
            alerts.push(alert);
        }
        if alerts.is_empty() {
            // At shutdown: what is queued goes out, then the task ends (the workers that
            // could add more have stopped by then, or are abandoned with the rest).
            if stopping && rx.is_empty() && Arc::strong_count(&monitoring) <= 1 {
                return;
            }
            continue;
        }
        let mut rows = Vec::new();
        for alert in &alerts {
            let json = alert.to_json();
            let payload = serde_json::to_vec(&json).unwrap_or_default();
            if !client.try_publish(topic::ALERTS, payload) {
                tracing::warn!(client = %alert.client, "alert not published: MQTT queue full");
            }
            monitoring.webhooks.notify(NotificationKind::Alert, json);
            rows.extend(alert_rows(alert));
        }
        match hub.store.audit(rows).await {
            Ok(()) => hub.metrics.store_written(true),
            Err(e) => {
                tracing::error!(error = %e, "cannot write alerts to the audit log");
                if e.is_persistent_write_failure() {
                    hub.metrics.store_written(false);
                }
                storage.check("writing alerts to the audit log", &e);
            }
        }
    }
}

/// How far back each look at the audit log for revocations made outside a request reaches
/// before the last look: a row may be appended a little after its time (a role change
/// from another process stamps the second it began).
const OUT_OF_BAND_LATE_MS: u64 = 60_000;

/// Revocations made outside a request ([`policy_change::POLICY_REVOKE`] audit rows: a
/// policy reload or load at start, `client set-role` from another process) notified to the
/// webhooks, as the operators' `revoke` requests are. Each look reads the rows since the
/// last look (less [`OUT_OF_BAND_LATE_MS`]) and notifies those not notified yet.
#[derive(Debug)]
struct OutOfBand {
    /// When the last look was (Unix ms); `None` before the first.
    looked_ms: Option<u64>,
    /// The rows notified within the late margin: (time, target, reason).
    notified: HashSet<(u64, String, String)>,
}

impl OutOfBand {
    /// The first look reaches back the late margin: a reload at start, just before serving,
    /// is notified too (and a restart may notify again what the process before it did:
    /// at least once).
    fn new() -> Self {
        Self {
            looked_ms: None,
            notified: HashSet::new(),
        }
    }

    /// One look: notifies the new rows; counts role changes' revocations in the metrics
    /// (a reload's are counted where it runs, [`reload_policy`]).
    async fn look<S: Store>(&mut self, hub: &Hub<S>, monitoring: &Monitoring) {
        let now_ms = hub.clock.now_ms();
        let since = self
            .looked_ms
            .unwrap_or(now_ms)
            .saturating_sub(OUT_OF_BAND_LATE_MS);
        let filter = crate::store::AuditFilter {
            action: Some(policy_change::POLICY_REVOKE.to_owned()),
            since_ms: Some(since),
            ..crate::store::AuditFilter::tail(1024)
        };
        let rows = match hub.store.audit_query(&filter).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit log for revocations to notify");
                return;
            }
        };
        self.notified.retain(|(at, _, _)| *at >= since);
        for row in rows {
            let key = (row.at_ms, row.target.clone(), row.reason.clone());
            if self.notified.insert(key) {
                if row.target.starts_with("client ") {
                    hub.metrics.revocation("set_role");
                }
                monitoring.notify_revocation(&row);
            }
        }
        self.looked_ms = Some(now_ms);
    }
}

/// Looks for revocations made outside a request every `every_s` ([`OutOfBand`]) while
/// this hub holds the housekeeping lease, until `stop`.
async fn out_of_band_notifier<S: Store>(
    hub: Arc<Hub<S>>,
    monitoring: Arc<Monitoring>,
    every_s: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(every_s.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out_of_band = OutOfBand::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if hold_lease(&hub).await {
            out_of_band.look(&hub, &monitoring).await;
        } else {
            // The holder notifies; on taking the lease, reach back only the late margin.
            out_of_band = OutOfBand::new();
        }
    }
}

/// Verifies what the broker delivered back to the hub (its own deltas and control
/// messages) and confirms it in batches (one store commit for many).
async fn confirmer<S: Store>(hub: Arc<Hub<S>>, echoes: Arc<QueueRx<Incoming>>) {
    let mut changes = Vec::new();
    let mut controls = Vec::new();
    while let Some(first) = echoes.pop().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            match hub.echo(&msg.topic, &msg.payload).await {
                Some(Echo::Changes(stream, from, to)) => changes.push((stream, from, to)),
                Some(Echo::Control(c)) => controls.push(c),
                None => {}
            }
            next = if changes.len() + controls.len() < 4096 {
                echoes.try_pop()
            } else {
                None
            };
        }
        if !changes.is_empty()
            && let Err(e) = hub.store.mark_published(std::mem::take(&mut changes)).await
        {
            tracing::error!(error = %e, "cannot mark revocation changes published");
        }
        if !controls.is_empty()
            && let Err(e) = hub
                .store
                .mark_controls_sent(std::mem::take(&mut controls))
                .await
        {
            tracing::error!(error = %e, "cannot mark control messages sent");
        }
    }
}

/// Identical refusals (same client, action and outcome) folded into one audit row per
/// window: the first is written at once, the others as one row with their count when the
/// window ends. Successes are one row each. Pure: the caller passes the time.
#[derive(Debug)]
struct Aggregator {
    window_ms: u64,
    max_keys: usize,
    open: HashMap<(String, String, String), Window>,
}

#[derive(Debug)]
struct Window {
    ends_ms: u64,
    /// The refusals after the first, as one event (the first of them, with the count).
    pending: Option<AuditEvent>,
}

/// The actor of refusals aggregated over many clients (not a valid client id).
const MANY_CLIENTS: &str = "*";

impl Aggregator {
    fn new(window_ms: u64, max_keys: usize) -> Self {
        Self {
            window_ms,
            max_keys,
            open: HashMap::new(),
        }
    }

    /// Takes one decision; returns it if it is to be written now.
    fn add(&mut self, mut event: AuditEvent, now_ms: u64) -> Option<AuditEvent> {
        if event.outcome == "ok" {
            return Some(event);
        }
        let mut key = (
            event.actor.clone(),
            event.action.clone(),
            event.outcome.clone(),
        );
        // More clients refused at once than the hub keeps apart: one row for them all.
        if self.open.len() >= self.max_keys && !self.open.contains_key(&key) {
            MANY_CLIENTS.clone_into(&mut key.0);
            MANY_CLIENTS.clone_into(&mut event.actor);
        }
        match self.open.get_mut(&key) {
            Some(window) => {
                match &mut window.pending {
                    Some(pending) => pending.count += event.count,
                    None => window.pending = Some(event),
                }
                None
            }
            None => {
                self.open.insert(
                    key,
                    Window {
                        ends_ms: now_ms.saturating_add(self.window_ms),
                        pending: None,
                    },
                );
                Some(event)
            }
        }
    }

    /// The aggregated rows of the windows that ended by `now_ms`. A window that had more
    /// refusals starts another one (a flood goes on: one row per window); a quiet one is
    /// forgotten (the next refusal is written at once again).
    fn due(&mut self, now_ms: u64) -> Vec<AuditEvent> {
        let mut rows = Vec::new();
        let window_ms = self.window_ms;
        self.open.retain(|_, window| {
            if window.ends_ms > now_ms {
                return true;
            }
            match window.pending.take() {
                Some(row) => {
                    rows.push(row);
                    window.ends_ms = now_ms.saturating_add(window_ms);
                    true
                }
                None => false,
            }
        });
        rows
    }

    /// Every row still pending (at shutdown).
    fn drain(&mut self) -> Vec<AuditEvent> {
        self.open
            .drain()
            .filter_map(|(_, window)| window.pending)
            .collect()
    }
}

/// Writes the audit log and publishes the event stream, off the request path: events
/// arrive without waiting ([`AuditTx`]), identical refusals are aggregated
/// ([`Aggregator`]), and what is written goes out in batches.
async fn audit_writer<S: Store>(
    hub: Arc<Hub<S>>,
    client: MqttClient,
    mut rx: mpsc::Receiver<AuditEvent>,
    shed: Shed,
    storage: StorageAlarm,
) {
    let mut aggregator = Aggregator::new(AUDIT_WINDOW_MS, AUDIT_MAX_KEYS);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rows = Vec::new();
    loop {
        let open = tokio::select! {
            event = rx.recv() => match event {
                Some(event) => {
                    let now = hub.clock.now_ms();
                    rows.extend(aggregator.add(event, now));
                    // Take what else is there, a bounded amount per round.
                    for _ in 0..AUDIT_BATCH {
                        let Ok(event) = rx.try_recv() else { break };
                        rows.extend(aggregator.add(event, now));
                    }
                    true
                }
                None => false,
            },
            _ = tick.tick() => {
                rows.extend(aggregator.due(hub.clock.now_ms()));
                true
            }
        };
        if !open {
            rows.extend(aggregator.drain());
        }
        if !rows.is_empty() {
            for row in &rows {
                let json = crate::events::to_json(row);
                // The event stream is best effort (QoS 0); the audit log is the record.
                if client
                    .try_publish(topic::EVENTS, QoS::AtMostOnce, false, json)
                    .is_err()
                {
                    shed.events_dropped.add(1);
                }
            }
            match hub.store.audit(std::mem::take(&mut rows)).await {
                Ok(()) => hub.metrics.store_written(true),
                Err(e) => {
                    tracing::error!(error = %e, "cannot write audit log");
                    if e.is_persistent_write_failure() {
                        hub.metrics.store_written(false);
                    }
                    storage.check("writing the audit log", &e);
                }
            }
        }
        if !open {
            return;
        }
    }
}

/// On every (re)connection reported on `connected`, subscribes and republishes
/// ([`on_connected`]), one connection at a time, until `stop`.
async fn connector<S: Store>(
    hub: Arc<Hub<S>>,
    keyset: Arc<KeySetState>,
    client: MqttClient,
    shared: bool,
    announce_s: u64,
    mut connected: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = connected.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = on_connected(&hub, &keyset, &client, shared, announce_s).await {
            tracing::error!(error = %e, "cannot subscribe");
        }
    }
}

/// The heartbeat: one task, so a heartbeat that takes longer than the interval delays the
/// next one rather than overlapping it. Logs the overload summary after each.
#[allow(clippy::too_many_arguments)] // the heartbeat's own settings, passed once
async fn beating<S: Store>(
    hub: Arc<Hub<S>>,
    keyset: Arc<KeySetState>,
    client: MqttClient,
    kek: Option<Arc<Kek>>,
    retention_s: u64,
    announce_s: u64,
    interval_s: u64,
    summary: Arc<std::sync::Mutex<Summary>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut beat = tokio::time::interval(Duration::from_secs(interval_s.max(1)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = ControlWatch::default();
    let mut leading = false;
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let lead = hold_lease(&hub).await;
        if lead != leading {
            if lead {
                tracing::info!("holding the housekeeping lease: this hub publishes heartbeats");
            } else {
                tracing::info!("another hub holds the housekeeping lease");
            }
            leading = lead;
        }
        if lead {
            heartbeat(
                &hub,
                &keyset,
                &client,
                kek.as_deref(),
                retention_s,
                announce_s,
                &mut watch,
            )
            .await;
        } else {
            every_replica(&hub, &keyset, &client, kek.as_deref(), announce_s).await;
        }
        summary
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .log("heartbeat");
    }
}

/// Whether this hub holds the housekeeping lease ([`Store::hold_lease`]), noted in the
/// metrics; a store that cannot say counts as not holding it.
async fn hold_lease<S: Store>(hub: &Hub<S>) -> bool {
    let held = hub.store.hold_lease().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot take or keep the housekeeping lease");
        false
    });
    hub.metrics.lease(held);
    held
}

/// Raised once the store refuses writes for good; the serving loop then stops the hub.
#[derive(Debug, Clone)]
struct StorageAlarm(watch::Sender<Option<String>>);

impl StorageAlarm {
    fn new() -> (Self, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        (Self(tx), rx)
    }

    /// Raises the alarm if `e` is a persistent write failure (the first one is kept).
    fn check(&self, what: &str, e: &StoreError) {
        if e.is_persistent_write_failure() {
            self.0.send_if_modified(|first| {
                let raise = first.is_none();
                if raise {
                    *first = Some(format!("{what}: {e}"));
                }
                raise
            });
        }
    }
}

/// How a background task ended.
#[derive(Debug)]
struct Ended {
    name: &'static str,
    id: tokio::task::Id,
    how: How,
}

#[derive(Debug)]
enum How {
    Returned,
    Panicked(String),
    Cancelled,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            How::Returned => f.write_str("stopped"),
            How::Panicked(message) => write!(f, "panicked: {message}"),
            How::Cancelled => f.write_str("was cancelled"),
        }
    }
}

/// The serving loop's background tasks, with their names: none of them may end while the
/// hub serves.
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    running: HashMap<tokio::task::Id, (&'static str, tokio::task::AbortHandle)>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::Id {
        let handle = self.set.spawn(task);
        let id = handle.id();
        self.running.insert(id, (name, handle));
        id
    }

    /// The next task to end; never, while none is left.
    async fn next_end(&mut self) -> Ended {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match joined {
            Ok((id, ())) => (id, How::Returned),
            Err(e) if e.is_panic() => {
                let id = e.id();
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                (id, How::Panicked(message))
            }
            Err(e) => (e.id(), How::Cancelled),
        };
        let name = self.running.remove(&id).map_or("unknown", |(name, _)| name);
        Ended { name, id, how }
    }

    fn is_running(&self, id: tokio::task::Id) -> bool {
        self.running.contains_key(&id)
    }

    /// Tasks still running other than `except`.
    fn others(&self, except: tokio::task::Id) -> usize {
        self.running.len() - usize::from(self.is_running(except))
    }

    /// Aborts every task but `except`; returns how many.
    fn abort_others(&self, except: tokio::task::Id) -> usize {
        let mut n = 0;
        for (id, (_, handle)) in &self.running {
            if *id != except {
                handle.abort();
                n += 1;
            }
        }
        n
    }

    /// Waits for task `id` to end.
    async fn wait(&mut self, id: tokio::task::Id) -> Vec<Ended> {
        let mut others = Vec::new();
        while self.is_running(id) {
            let ended = self.next_end().await;
            if ended.id != id {
                others.push(ended);
            }
        }
        others
    }
}

/// Why serving stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The MQTT connection could not be set up.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// The webhooks' HTTP client cannot be built (no TLS trust roots, say).
    #[error("cannot set up the webhooks' HTTP client: {0}")]
    Webhooks(reqwest::Error),
    /// The HTTP listener (`[http] listen`) cannot listen.
    #[error("cannot listen for HTTP on {addr} (`[http] listen`): {source}")]
    Http {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A background task ended (panicked, or returned) while the hub served: the hub
    /// stopped rather than serve without it.
    #[error("the hub's {task} task {how}; the hub stopped")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// How it ended.
        how: String,
    },
    /// The store refused a write for good (read-only, I/O error, full disk): the hub
    /// stopped rather than answer every request `internal`.
    #[error(
        "the hub's database cannot be written ({error}); the hub stopped rather than answer \
         every request `internal`: make the database writable again (read-only file or file \
         system, permissions, full disk) and start the hub"
    )]
    StorageFailed {
        /// The store's error, with what was being written.
        error: String,
    },
}

/// Serves until `shutdown` completes, then drains (within `config.drain`), disconnects
/// cleanly and returns `Ok`. Returns an error if the connection cannot be set up, or if a
/// background task panics or ends while serving (after stopping the rest the same way).
pub async fn run<S: Store>(
    hub: Arc<Hub<S>>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_dashboard(hub, config, None, shutdown).await
}

/// [`run`], serving the operator dashboard ([`crate::dashboard`]) on the HTTP listener
/// too when `dashboard` is set (and `config.http` is: without a listener it is ignored,
/// with a warning).
pub async fn run_with_dashboard<S: Store>(
    hub: Arc<Hub<S>>,
    config: ServeConfig,
    dashboard: Option<crate::config::DashboardSection>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (mqtt_stop_tx, mqtt_stop_rx) = watch::channel(false);
    let queues = Queues {
        requests: MQTT_REQUESTS,
        incoming: INCOMING_MESSAGES,
        incoming_bytes: INCOMING_BYTES,
    };
    // Bound first: a listener that cannot listen stops the hub before it serves.
    let http = match config.http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Http { addr, source })?;
            Some(listener)
        }
        None => None,
    };
    let (client, mut notices, event_loop) = mqtt::connection(&config.mqtt, queues, mqtt_stop_rx)?;
    let shed = Shed::default();
    let summary = Arc::new(std::sync::Mutex::new(Summary {
        shed: shed.clone(),
        mqtt_dropped: notices.dropped(),
        last: ShedCounts::default(),
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (connected_tx, connected_rx) = watch::channel(0u64);
    let (storage, mut storage_failed) = StorageAlarm::new();
    let mut tasks = Tasks::default();
    let event_loop = tasks.spawn("MQTT event loop", async move {
        let stopped = event_loop.await;
        tracing::debug!(?stopped, "MQTT event loop stopped");
    });

    let (audit_tx, audit_rx) = mpsc::channel(AUDIT_QUEUE);
    let audit = AuditTx {
        tx: audit_tx,
        dropped: shed.audit_dropped.clone(),
    };
    tasks.spawn(
        "audit writer",
        audit_writer(
            hub.clone(),
            client.clone(),
            audit_rx,
            shed.clone(),
            storage.clone(),
        ),
    );
    let (webhooks, deliveries) = Webhooks::start(&hub.config.webhooks, &hub.metrics, &stop_rx)
        .map_err(ServeError::Webhooks)?;
    for delivery in deliveries {
        tasks.spawn("webhook delivery", delivery);
    }
    let (monitoring, alert_rx) = Monitoring::new(
        Detector::new(hub.config.anomaly.clone()),
        webhooks,
        hub.metrics.clone(),
    );
    let monitoring = Arc::new(monitoring);
    tasks.spawn(
        "alerter",
        alerter(
            hub.clone(),
            client.clone(),
            monitoring.clone(),
            alert_rx,
            storage.clone(),
            stop_rx.clone(),
        ),
    );
    let (echo_tx, echo_rx) = queue(ECHO_QUEUE, ECHO_QUEUE_BYTES, Gauge::default());
    tasks.spawn("echo confirmer", confirmer(hub.clone(), echo_rx));
    let (work, work_rx) = queue(config.queue, QUEUE_BYTES, hub.metrics.queue("work"));
    for _ in 0..config.concurrency.max(1) {
        tasks.spawn(
            "request worker",
            worker(
                hub.clone(),
                client.clone(),
                work_rx.clone(),
                audit.clone(),
                monitoring.clone(),
            ),
        );
    }
    let (refusals, refusal_rx) = queue(
        REFUSAL_QUEUE,
        REFUSAL_QUEUE_BYTES,
        hub.metrics.queue("refusal"),
    );
    tasks.spawn(
        "refusal worker",
        refuser(
            hub.clone(),
            client.clone(),
            refusal_rx,
            audit.clone(),
            shed.clone(),
            config.admission,
            monitoring.clone(),
        ),
    );
    let keyset = Arc::new(KeySetState::default());
    tasks.spawn(
        "connector",
        connector(
            hub.clone(),
            keyset.clone(),
            client.clone(),
            config.shared_subscription,
            config.rotation_announce_s,
            connected_rx,
            stop_rx.clone(),
        ),
    );
    tasks.spawn(
        "revocation notifier",
        out_of_band_notifier(
            hub.clone(),
            monitoring.clone(),
            config.heartbeat_s,
            stop_rx.clone(),
        ),
    );
    tasks.spawn(
        "heartbeat",
        beating(
            hub.clone(),
            keyset,
            client.clone(),
            config.kek.clone(),
            config.audit_retention_s,
            config.rotation_announce_s,
            config.heartbeat_s,
            summary.clone(),
            stop_rx.clone(),
        ),
    );
    if dashboard.is_some() && http.is_none() {
        tracing::warn!("the dashboard is configured but no HTTP listener: not served");
    }
    if let Some(listener) = http {
        let dashboard = dashboard.map(|d| {
            if !d.passwords.exists() {
                tracing::warn!(
                    file = %d.passwords.display(),
                    "no dashboard passwords yet: `tessera-hub dashboard-password OPERATOR` \
                     makes one"
                );
            }
            Arc::new(crate::dashboard::Dashboard::new(
                hub.clone(),
                &d,
                Arc::new(DashboardQuarantines(Arc::downgrade(&monitoring))),
            ))
        });
        match listener.local_addr() {
            Ok(addr) => tracing::info!(
                %addr,
                dashboard = dashboard.is_some(),
                "HTTP listener: /metrics, /healthz, /readyz{}",
                if dashboard.is_some() { ", /dashboard" } else { "" }
            ),
            Err(e) => tracing::warn!(error = %e, "HTTP listener address unknown"),
        }
        if let Some(d) = &dashboard {
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            tasks.spawn("dashboard sampler", d.clone().sampling(stopped));
        }
        let mut stop = stop_rx;
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let hub = hub.clone();
        tasks.spawn("HTTP listener", async move {
            if let Err(e) = crate::http::serve(listener, hub, dashboard, stopped).await {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        });
    }
    let mut dispatcher = Dispatcher {
        limiter: Limiter::new(config.admission),
        started: tokio::time::Instant::now(),
        admission: config.admission,
        work,
        refusals,
        echoes: echo_tx,
        audit,
        drops: Drops::default(),
        shed,
        metrics: hub.metrics.clone(),
        clock: hub.clock.clone(),
        monitoring,
    };
    let mut flush_drops = tokio::time::interval(Duration::from_secs(1));
    flush_drops.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    tokio::pin!(shutdown);
    tracing::info!(
        broker = %config.mqtt.host,
        port = config.mqtt.port,
        workers = config.concurrency,
        queue = config.queue,
        "hub serving"
    );
    let mut failure = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break None,
            ended = tasks.next_end() => break Some(ended),
            Ok(()) = storage_failed.changed() => break None,
            // Before the notices, which are always ready during a flood.
            _ = flush_drops.tick() => dispatcher.flush_drops(),
            notice = notices.recv() => match notice {
                Some(Notice::Message(msg)) => dispatcher.dispatch(msg),
                Some(Notice::Connected) => {
                    tracing::info!("connected to broker");
                    hub.metrics.broker_up();
                    connected_tx.send_modify(|n| *n += 1);
                }
                Some(Notice::Disconnected(reason)) => {
                    tracing::warn!(%reason, "disconnected from broker");
                    hub.metrics.broker_down();
                }
                // The event loop is gone (its task ends or has ended).
                None => break Some(Ended {
                    name: "MQTT event loop",
                    id: event_loop,
                    how: How::Returned,
                }),
            },
        }
    };
    if let Some(ended) = &failure {
        tracing::error!(
            task = ended.name,
            how = %ended.how,
            "a background task of the hub ended while serving: stopping the hub"
        );
    }
    let storage_error = storage_failed.borrow_and_update().clone();
    if let Some(error) = &storage_error {
        tracing::error!(
            %error,
            "the hub's database cannot be written: stopping the hub"
        );
    }

    // Stop taking work: with a shared subscription the broker gives new requests to the
    // other replicas. Closing the queues lets the workers finish what is queued and stop;
    // the audit writer and the confirmer stop when nobody can send them anything.
    tracing::info!(
        drain_s = config.drain.as_secs(),
        "shutting down: answering the requests queued and in flight"
    );
    let filter = if config.shared_subscription {
        topic::ALL_REQUESTS_SHARED
    } else {
        topic::ALL_REQUESTS
    };
    let _ = client.try_unsubscribe(filter);
    let _ = stop_tx.send(true);
    dispatcher.flush_drops();
    drop(dispatcher);
    let deadline = tokio::time::Instant::now() + config.drain;
    let mut abandoned = None;
    while tasks.others(event_loop) > 0 {
        tokio::select! {
            ended = tasks.next_end() => {
                if let How::Panicked(_) = ended.how {
                    tracing::error!(task = ended.name, how = %ended.how, "during shutdown");
                    failure.get_or_insert(ended);
                } else if ended.id == event_loop {
                    tracing::warn!("the MQTT event loop stopped before the drain ended");
                }
            }
            () = tokio::time::sleep_until(deadline), if abandoned.is_none() => {
                let n = tasks.abort_others(event_loop);
                tracing::warn!(
                    tasks = n,
                    "drain time over: abandoning the requests still queued or running"
                );
                abandoned = Some(n);
            }
        }
    }
    summary
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .log("shutdown");

    // DISCONNECT, and wait until the event loop has sent it (it stops then): everything
    // published before it has gone out too.
    if tasks.is_running(event_loop) {
        let flushed = tokio::time::timeout(DISCONNECT_FLUSH, async {
            if client.disconnect().await.is_ok() {
                tasks.wait(event_loop).await;
            }
        })
        .await;
        if flushed.is_err() || tasks.is_running(event_loop) {
            tracing::warn!("the broker did not take the DISCONNECT in time; closing anyway");
        }
        let _ = mqtt_stop_tx.send(true);
        tasks.wait(event_loop).await;
    }
    let written = hub.store.write_stats();
    // Also when the store failed only while the queued requests were answered.
    let storage_error = storage_error.or_else(|| storage_failed.borrow().clone());
    if let Some(error) = storage_error {
        return Err(ServeError::StorageFailed { error });
    }
    match failure {
        None => {
            tracing::info!(
                store_transactions = written.transactions,
                store_writes = written.writes,
                "hub stopped"
            );
            Ok(())
        }
        Some(ended) => Err(ServeError::TaskFailed {
            task: ended.name,
            how: ended.how.to_string(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use tessera_shared::cose::Sign1;
    use tessera_shared::message::Command;
    use tessera_shared::revocation::StreamMessage;
    use tokio::sync::RwLock;

    use super::*;
    use crate::clock::FakeClock;
    use crate::pipeline::PipelineConfig;
    use crate::policy::{Policy, SharedPolicy};
    use crate::revocation::Target;
    use crate::store::{ClientKind, ClientRecord, Sqlite, Unmatched};

    pub(crate) const T0: u64 = 1_767_225_600;

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

    /// A hub over an in-memory store with one signing key, at `clock`'s time (the HTTP
    /// listener's tests use it too).
    pub(crate) async fn hub(clock: &FakeClock) -> Arc<Hub<Sqlite>> {
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
            rng: Arc::new(crate::rng::SeededRng::new([7; 32])),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Registers `n` enrolled devices `{prefix}-0000…` and revokes them whole at `at`:
    /// a control message owed to each.
    async fn owe_controls(hub: &Hub<Sqlite>, prefix: &str, n: usize, at: u64) {
        let devices: Vec<ClientRecord> = (0..n)
            .map(|i| ClientRecord {
                id: format!("{prefix}-{i:04}"),
                kind: ClientKind::Device,
                // Each its own (fake) key: a revoked device's key is never registered again.
                public_key: Some({
                    let mut key = vec![4; 65];
                    key[1..3].copy_from_slice(&u16::try_from(i).unwrap_or(0).to_be_bytes());
                    key[3..3 + prefix.len()].copy_from_slice(prefix.as_bytes());
                    key
                }),
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
    async fn a_replica_without_the_lease_publishes_nothing_at_its_heartbeat() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        owe_controls(&hub, "dev", 5, T0 - 10).await;
        let out = SlowOutbox::new(&clock);
        every_replica(&hub, &KeySetState::default(), &out, None, 300).await;
        assert!(out.sent().is_empty(), "{:?}", out.sent().len());
        assert_eq!(hub.metrics.last_heartbeat.get(), 0);
        // Its live-token gauge is kept all the same.
        assert!(
            hub.metrics
                .render(T0, crate::store::WriteStats::default())
                .contains("tessera_hub_tokens_live{kind=\"device\"}")
        );
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

    #[tokio::test]
    async fn a_heartbeat_records_its_time_the_revocation_entries_in_force_and_live_tokens() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        // Three live tokens of one device, two of them revoked: an entry each.
        let device = ClientRecord {
            id: "dev-1".into(),
            kind: ClientKind::Device,
            public_key: Some(vec![4; 65]),
            role: "sensor".into(),
            groups: Vec::new(),
            enrollment_code_key: None,
            enrolled_at: Some(T0 - 100),
            revoked_at: None,
            created_at: T0 - 100,
        };
        hub.store.add_client(device).await.expect("add");
        for i in 0..3u8 {
            let token = crate::store::IssuedToken {
                cti: [i; tessera_shared::claims::CTI_LEN],
                hash: [i; 32],
                kind: crate::store::TokenKind::Device,
                subject: "dev-1".into(),
                audience: "tessera".into(),
                scope: "telemetry:write".into(),
                issued_at: T0 - 50,
                expires_at: T0 + 600,
            };
            hub.store
                .commit(crate::store::RequestCommit {
                    client: "dev-1".into(),
                    nonce: [i; 16],
                    nonce_expires_at: T0 + 60,
                    now_ms: (T0 - 50) * 1000,
                    rate: crate::store::RateLimit {
                        burst: 100,
                        per_second: 100.0,
                    },
                    effect: crate::store::Effect::Issue {
                        token,
                        grant: None,
                        spends: None,
                    },
                })
                .await
                .expect("store")
                .expect("issued");
        }
        hub.store
            .revoke(
                vec![Target::TokenHash([0; 32]), Target::TokenHash([1; 32])],
                T0 - 10,
                30,
                Unmatched::Refuse,
            )
            .await
            .expect("revoke");
        // What the streams carry, read entry by entry.
        let mut in_force = 0;
        for stream in hub.store.streams().await.expect("streams") {
            let read = hub
                .store
                .stream_entries(
                    &stream.name,
                    0,
                    T0,
                    tessera_shared::revocation::MAX_LEEWAY,
                    usize::MAX,
                )
                .await
                .expect("entries");
            in_force += read.changes.iter().map(|(_, e)| e.len()).sum::<usize>();
        }
        assert_eq!(in_force, 2);
        assert_eq!(hub.metrics.last_heartbeat.get(), 0);
        heartbeat(
            &hub,
            &KeySetState::default(),
            &SlowOutbox::new(&clock),
            None,
            86_400,
            300,
            &mut ControlWatch::default(),
        )
        .await;
        assert_eq!(
            hub.metrics.revocation_entries.get(),
            i64::try_from(in_force).expect("small")
        );
        // Live tokens: the three device tokens, unexpired (revoked or not), as the store
        // lists them one by one.
        let listed = hub
            .store
            .issued_to("dev-1", T0)
            .await
            .expect("tokens")
            .len();
        assert_eq!(listed, 3);
        let live = |kind| {
            hub.metrics
                .tokens_live
                .get_or_create(&crate::metrics::KindLabels { kind })
                .get()
        };
        assert_eq!((live("device"), live("access")), (3, 0));
        // The time the round was issued: after what went out before it (a second each
        // here), before the round itself went out.
        let last = u64::try_from(hub.metrics.last_heartbeat.get()).expect("set");
        assert!(T0 < last && last < clock.now(), "{last}");
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

    /// Where a test dispatcher's messages go: work, refusals, echoes, audit.
    type Outlets = (
        Arc<QueueRx<Job>>,
        Arc<QueueRx<Refuse>>,
        Arc<QueueRx<Incoming>>,
        mpsc::Receiver<AuditEvent>,
    );

    fn dispatcher(
        clock: &FakeClock,
        admission: Limit,
        work_depth: usize,
        refusal_depth: usize,
        echo_depth: usize,
    ) -> (Dispatcher, Outlets) {
        let (work, work_rx) = queue(work_depth, 1 << 20, Gauge::default());
        let (refusals, refusal_rx) = queue(refusal_depth, 1 << 20, Gauge::default());
        let (echoes, echo_rx) = queue(echo_depth, 1 << 20, Gauge::default());
        let (audit_tx, audit_rx) = mpsc::channel(64);
        let shed = Shed::default();
        let dispatcher = Dispatcher {
            limiter: Limiter::new(admission),
            started: tokio::time::Instant::now(),
            admission,
            work,
            refusals,
            echoes,
            audit: AuditTx {
                tx: audit_tx,
                dropped: shed.audit_dropped.clone(),
            },
            drops: Drops::default(),
            shed,
            metrics: Arc::new(Metrics::new()),
            clock: Arc::new(clock.clone()),
            monitoring: Arc::new(
                Monitoring::new(
                    Detector::new(crate::anomaly::AnomalyConfig::default()),
                    Webhooks::default(),
                    Arc::new(Metrics::new()),
                )
                .0,
            ),
        };
        (dispatcher, (work_rx, refusal_rx, echo_rx, audit_rx))
    }

    const GENEROUS: Limit = Limit {
        burst: 1000,
        per_second: 1000.0,
    };

    fn request(client: &str, payload: &[u8]) -> Incoming {
        Incoming {
            topic: topic::request(client).expect("id").to_string(),
            payload: payload.to_vec(),
        }
    }

    fn drain<T>(rx: &QueueRx<T>) -> Vec<T> {
        let mut rx = rx.rx.try_lock().expect("unlocked");
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn echoes_beyond_the_queue_are_dropped_and_counted_not_waited_for() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let (mut d, _outlets) = dispatcher(&clock, GENEROUS, 8, 8, 1);
        let echo = |device: &str| Incoming {
            topic: topic::control(device).expect("id").to_string(),
            payload: vec![1, 2, 3],
        };
        d.dispatch(echo("dev-1"));
        d.dispatch(echo("dev-2"));
        assert_eq!(d.shed.echoes_dropped.get(), 1);
    }

    #[tokio::test]
    async fn a_full_work_queue_gets_requests_refused_as_overloaded_and_a_full_refusal_queue_drops_them()
     {
        let clock = FakeClock::at_ms(T0 * 1000);
        let (mut d, (work, refusals, _echoes, mut audit)) = dispatcher(&clock, GENEROUS, 2, 1, 8);
        for i in 0..5 {
            d.dispatch(request(&format!("app-{i}"), b"anything"));
        }
        let queued: Vec<String> = drain(&work).into_iter().map(|j| j.requester).collect();
        assert_eq!(queued, ["app-0", "app-1"]);
        let refused: Vec<(String, ErrorCode)> = drain(&refusals)
            .into_iter()
            .map(|r| (r.job.requester, r.code))
            .collect();
        assert_eq!(refused, [("app-2".to_owned(), ErrorCode::Overloaded)]);
        assert_eq!(d.shed.overloaded_dropped.get(), 2);
        // The dropped ones are audited, once a second, a row per client.
        assert!(audit.try_recv().is_err());
        d.flush_drops();
        let mut audited: Vec<(String, String, u64)> = std::iter::from_fn(|| audit.try_recv().ok())
            .map(|e| (e.actor, e.outcome, e.count))
            .collect();
        audited.sort();
        assert_eq!(
            audited,
            [
                ("app-3".to_owned(), "overloaded".to_owned(), 1),
                ("app-4".to_owned(), "overloaded".to_owned(), 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_client_over_its_admission_limit_is_refused_once_and_its_other_messages_dropped() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let limit = Limit {
            burst: 2,
            per_second: 1.0,
        };
        let (mut d, (work, refusals, _echoes, mut audit)) = dispatcher(&clock, limit, 64, 64, 8);
        for _ in 0..50 {
            d.dispatch(request("attacker", b"garbage"));
        }
        d.dispatch(request("device", b"request"));
        let queued: Vec<String> = drain(&work).into_iter().map(|j| j.requester).collect();
        assert_eq!(queued, ["attacker", "attacker", "device"]);
        let refused: Vec<ErrorCode> = drain(&refusals).into_iter().map(|r| r.code).collect();
        assert_eq!(refused, [ErrorCode::RateLimited]);
        assert_eq!(d.shed.rate_limited_dropped.get(), 47);
        d.flush_drops();
        let audited: Vec<AuditEvent> = std::iter::from_fn(|| audit.try_recv().ok()).collect();
        assert_eq!(audited.len(), 1, "{audited:?}");
        assert_eq!(
            (audited[0].actor.as_str(), audited[0].action.as_str()),
            ("attacker", UNREAD)
        );
        assert_eq!(
            (audited[0].outcome.as_str(), audited[0].count),
            ("rate_limited", 47)
        );
    }

    #[tokio::test]
    async fn messages_on_no_request_topic_are_ignored() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let (mut d, (work, refusals, _echoes, _audit)) = dispatcher(&clock, GENEROUS, 8, 8, 8);
        d.dispatch(Incoming {
            topic: "tessera/v1/client/a/b/req".into(),
            payload: vec![],
        });
        assert!(drain(&work).is_empty() && drain(&refusals).is_empty());
    }

    #[test]
    fn drops_from_more_clients_than_kept_apart_are_counted_together() {
        let mut drops = Drops::default();
        for i in 0..MAX_DROP_CLIENTS + 10 {
            drops.note(&format!("id-{i}"), ErrorCode::RateLimited);
        }
        let events = drops.flush(0, GENEROUS);
        assert_eq!(events.len(), MAX_DROP_CLIENTS + 1);
        let many = events.iter().find(|e| e.actor == MANY_CLIENTS).expect("*");
        assert_eq!(many.count, 10);
        assert!(drops.flush(0, GENEROUS).is_empty(), "a fresh start");
    }

    #[test]
    fn a_queue_full_by_bytes_hands_the_job_back_and_taking_one_makes_room() {
        let (tx, rx) = queue::<Job>(8, 10, Gauge::default());
        let job = |n: usize| Job {
            requester: "app".into(),
            payload: vec![0; n],
        };
        assert!(tx.try_push(job(6)).is_ok());
        let back = tx.try_push(job(6)).expect_err("over 10 bytes");
        assert_eq!(back.payload.len(), 6);
        let taken = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(rx.pop())
            .expect("queued");
        assert_eq!(taken.payload.len(), 6);
        assert!(tx.try_push(job(10)).is_ok());
    }

    fn refusal(actor: &str, outcome: &str, at_ms: u64) -> AuditEvent {
        AuditEvent {
            at_ms,
            actor: actor.into(),
            action: "access_token".into(),
            target: String::new(),
            outcome: outcome.into(),
            reason: "why".into(),
            count: 1,
        }
    }

    #[test]
    fn identical_refusals_are_one_row_at_once_then_one_row_per_window_with_their_count() {
        let mut agg = Aggregator::new(10_000, 16);
        let first = agg
            .add(refusal("app", "replay", 0), 0)
            .expect("written at once");
        assert_eq!(first.count, 1);
        for t in 1..=1000 {
            assert!(agg.add(refusal("app", "replay", t), t).is_none());
        }
        assert!(agg.due(9_999).is_empty(), "the window is still open");
        let rows = agg.due(10_000);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].count, rows[0].at_ms),
            (1000, 1),
            "the first of them"
        );
        // The flood goes on: one row per window.
        for t in 10_001..=10_500 {
            assert!(agg.add(refusal("app", "replay", t), t).is_none());
        }
        let rows = agg.due(20_000);
        assert_eq!(rows.iter().map(|r| r.count).collect::<Vec<_>>(), [500]);
        // A quiet window closes it: the next refusal is written at once again.
        assert!(agg.due(30_000).is_empty());
        assert!(agg.add(refusal("app", "replay", 30_001), 30_001).is_some());
    }

    #[test]
    fn successes_are_one_row_each_and_other_clients_or_outcomes_are_kept_apart() {
        let mut agg = Aggregator::new(10_000, 16);
        let mut ok = refusal("app", "ok", 0);
        ok.outcome = "ok".into();
        assert!(agg.add(ok.clone(), 0).is_some());
        assert!(agg.add(ok, 0).is_some());
        assert!(agg.add(refusal("app", "replay", 0), 0).is_some());
        assert!(agg.add(refusal("app", "stale", 0), 0).is_some());
        assert!(agg.add(refusal("other", "replay", 0), 0).is_some());
        assert!(agg.add(refusal("app", "replay", 1), 1).is_none());
    }

    #[test]
    fn refusals_from_more_clients_than_kept_apart_aggregate_under_a_star_and_drain_at_shutdown() {
        let mut agg = Aggregator::new(10_000, 2);
        let mut written = 0;
        for i in 0..1000 {
            written += usize::from(
                agg.add(refusal(&format!("id-{i}"), "malformed", 5), 5)
                    .is_some(),
            );
        }
        // Two ids kept apart, and the first refusal of the rest under `*`.
        assert_eq!(written, 3);
        let rest = agg.drain();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].actor.as_str(), rest[0].count), (MANY_CLIENTS, 997));
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_with_its_name_and_message() {
        let mut tasks = Tasks::default();
        let quiet = tasks.spawn("quiet", std::future::pending());
        tasks.spawn("loud", async { panic!("boom") });
        let ended = tasks.next_end().await;
        assert_eq!(ended.name, "loud");
        assert!(
            matches!(&ended.how, How::Panicked(m) if m == "boom"),
            "{:?}",
            ended.how
        );
        assert!(tasks.is_running(quiet));
        assert_eq!(tasks.others(quiet), 0);
        assert_eq!(tasks.abort_others(ended.id), 1);
        let ended = tasks.next_end().await;
        assert_eq!((ended.name, ended.id), ("quiet", quiet));
        assert!(matches!(ended.how, How::Cancelled));
    }

    #[test]
    fn the_summary_counts_what_was_shed_since_the_last_one() {
        let shed = Shed::default();
        let mqtt = Counter::default();
        shed.rate_limited_dropped.add(5);
        mqtt.add(2);
        let first = ShedCounts::read(&shed, &mqtt);
        shed.rate_limited_dropped.add(3);
        let d = ShedCounts::read(&shed, &mqtt).since(&first);
        assert_eq!(
            d,
            ShedCounts {
                rate_limited_dropped: 3,
                ..ShedCounts::default()
            }
        );
    }

    /// Anomaly detection, quarantine, alerts and webhooks, in process: the pipeline of a
    /// real hub (in-memory store, fake clock), the serving loop's [`Monitoring`], its
    /// dispatcher and its alerter, without a broker.
    mod monitoring {
        use std::sync::atomic::AtomicUsize;

        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode};
        use tessera_shared::crypto::{P256Signer, Signer};
        use tessera_shared::message::{NONCE_LEN, Request, RequestBody, Response};
        use tessera_shared::scope::Scopes;
        use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

        use super::*;
        use crate::anomaly::{AlertKind, AnomalyConfig};
        use crate::pipeline::Handled;
        use crate::webhooks::{self, WebhookConfig};

        const APP: &str = "app-1";
        const OPERATOR: &str = "ops-1";
        const DEVICE: &str = "dev-1";
        const SECRET: &str = "a webhook secret of the test";

        fn signer(n: u8) -> P256Signer {
            let mut scalar = [0x31; 32];
            scalar[31] = n;
            P256Signer::from_scalar(&scalar).expect("scalar")
        }

        fn client(id: &str, kind: ClientKind, role: &str, key: u8) -> ClientRecord {
            ClientRecord {
                id: id.into(),
                kind,
                public_key: Some(signer(key).public_key().to_sec1().to_vec()),
                role: role.into(),
                groups: if kind == ClientKind::Device {
                    vec!["building-a".into()]
                } else {
                    Vec::new()
                },
                enrollment_code_key: None,
                enrolled_at: (kind == ClientKind::Device).then_some(T0 - 100),
                revoked_at: None,
                created_at: T0 - 100,
            }
        }

        /// What the alerter published on the alerts topic, as it happens.
        struct Published(UnboundedSender<(String, Vec<u8>)>);

        impl Notices for Published {
            fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool {
                self.0.send((topic.to_owned(), payload)).is_ok()
            }
        }

        /// A webhook receiver on 127.0.0.1:0 that answers 500 to its first `fail` requests
        /// and 200 to the rest, handing each request it accepts over.
        async fn receiver(fail: usize) -> (String, UnboundedReceiver<(HeaderMap, Bytes)>) {
            let (tx, rx) = unbounded_channel();
            let failing = Arc::new(AtomicUsize::new(fail));
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let (tx, failing) = (tx.clone(), failing.clone());
                    async move {
                        if failing
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        let _ = tx.send((headers, body));
                        StatusCode::NO_CONTENT
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move { axum::serve(listener, app).await });
            (format!("http://{addr}/hook"), rx)
        }

        fn webhook(url: &str) -> WebhookConfig {
            WebhookConfig {
                name: "ops".into(),
                url: url.into(),
                secret: SECRET.into(),
                events: vec![
                    webhooks::NotificationKind::Alert,
                    webhooks::NotificationKind::Revocation,
                ],
                max_attempts: 5,
                backoff_initial_ms: 1,
                backoff_max_ms: 10,
                timeout_ms: 10_000,
                queue: 64,
            }
        }

        struct Rig {
            clock: FakeClock,
            hub: Arc<Hub<Sqlite>>,
            monitoring: Arc<Monitoring>,
            published: UnboundedReceiver<(String, Vec<u8>)>,
            hooks: UnboundedReceiver<(HeaderMap, Bytes)>,
            _stop: watch::Sender<bool>,
            next: u64,
        }

        impl Rig {
            /// A hub with an app, an operator and an enrolled device; detection with
            /// `anomaly`; a webhook receiver failing its first `fail` requests; the
            /// alerter and the webhook's delivery running.
            async fn new(anomaly: AnomalyConfig, fail: usize) -> Self {
                let clock = FakeClock::at_ms(T0 * 1000);
                let hub = hub(&clock).await;
                for c in [
                    client(APP, ClientKind::App, "controller", 2),
                    client(OPERATOR, ClientKind::Operator, "ops", 1),
                    client(DEVICE, ClientKind::Device, "sensor", 3),
                ] {
                    hub.store.add_client(c).await.expect("client");
                }
                let (url, hooks) = receiver(fail).await;
                let (stop_tx, stop) = watch::channel(false);
                let (webhooks, deliveries) =
                    Webhooks::start(&[webhook(&url)], &hub.metrics, &stop).expect("client");
                for d in deliveries {
                    tokio::spawn(d);
                }
                let (monitoring, alerts) =
                    Monitoring::new(Detector::new(anomaly), webhooks, hub.metrics.clone());
                let monitoring = Arc::new(monitoring);
                let (tx, published) = unbounded_channel();
                let (storage, _) = StorageAlarm::new();
                tokio::spawn(alerter(
                    hub.clone(),
                    Published(tx),
                    monitoring.clone(),
                    alerts,
                    storage,
                    stop,
                ));
                Self {
                    clock,
                    hub,
                    monitoring,
                    published,
                    hooks,
                    _stop: stop_tx,
                    next: 0,
                }
            }

            /// A request of `client` signed with key `key`.
            fn request(&mut self, client: &str, key: u8, body: RequestBody<'_>) -> Vec<u8> {
                self.next += 1;
                let mut nonce = [0u8; NONCE_LEN];
                nonce[..8].copy_from_slice(&self.next.to_be_bytes());
                let request = Request {
                    client,
                    request_id: self.next,
                    issued_at: self.clock.now(),
                    nonce,
                    body,
                };
                let mut out = vec![0u8; 4096];
                let n = request.sign(&signer(key), &mut out).expect("sign");
                out.truncate(n);
                out
            }

            /// Handles a request as a worker does: the pipeline, then the decision to
            /// anomaly detection and the revocation to the webhooks. Returns the answer's
            /// refusal code, if refused, and the signed response.
            async fn send(&mut self, client: &str, key: u8, body: RequestBody<'_>) -> Handled {
                let payload = self.request(client, key, body);
                let handled = self
                    .hub
                    .handle_with(client, &payload, Some(&*self.monitoring))
                    .await;
                for d in handled.decision.iter().chain(&handled.reported) {
                    self.monitoring.observe(d, self.clock.now_ms());
                }
                if let Some(event) = &handled.audit {
                    self.monitoring.notify_revocation(event);
                }
                handled
            }

            /// The next message on the alerts topic, as JSON.
            async fn next_alert(&mut self) -> serde_json::Value {
                let (topic, payload) = self.published.recv().await.expect("alerter runs");
                assert_eq!(topic, topic::ALERTS);
                serde_json::from_slice(&payload).expect("JSON")
            }

            /// The next notification the webhook accepted, its signature checked.
            async fn next_hook(&mut self) -> serde_json::Value {
                let (headers, body) =
                    tokio::time::timeout(Duration::from_secs(60), self.hooks.recv())
                        .await
                        .expect("a notification within a minute")
                        .expect("receiver runs");
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                assert_eq!(
                    header(webhooks::SIGNATURE_HEADER),
                    webhooks::signature(SECRET.as_bytes(), &body)
                );
                let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                assert_eq!(header(webhooks::EVENT_HEADER), json["type"]);
                assert_eq!(header(webhooks::DELIVERY_HEADER), json["id"]);
                assert_eq!(header("content-type"), "application/json");
                json
            }
        }

        fn refused(handled: &Handled) -> Option<ErrorCode> {
            handled.decision.as_ref().and_then(|d| d.refused)
        }

        /// The response's body, decoded after its signature is checked.
        async fn token_grant(hub: &Hub<Sqlite>, handled: &Handled) -> Vec<u8> {
            let reply = handled.reply.as_ref().expect("reply");
            let anchor = hub.active_public_key().await;
            let payload = Sign1::decode(&reply.payload)
                .expect("decode")
                .verify(&anchor)
                .expect("verify");
            match Response::decode(payload).expect("response").outcome {
                Ok(tessera_shared::message::ResponseBody::Token {
                    grant: Some((grant, _)),
                    ..
                }) => grant.to_vec(),
                other => panic!("not a token with a grant: {other:?}"),
            }
        }

        /// Waits until `done` holds, checking every few milliseconds (a minute at most).
        async fn eventually(done: impl Fn() -> bool) {
            tokio::time::timeout(Duration::from_secs(60), async {
                while !done() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the condition holds within a minute");
        }

        fn metric(hub: &Hub<Sqlite>, line: &str) -> bool {
            hub.metrics
                .render(T0, crate::store::WriteStats::default())
                .lines()
                .any(|l| l == line)
        }

        #[tokio::test]
        async fn a_burst_of_forged_requests_alerts_quarantines_notifies_and_an_operator_lifts_it() {
            let anomaly = AnomalyConfig {
                refusals: 5,
                quarantine_on: vec![AlertKind::Refusals],
                ..AnomalyConfig::default()
            };
            // The receiver fails the first two deliveries: the third attempt delivers.
            let mut rig = Rig::new(anomaly, 2).await;
            // Signed with a key that is not the app's: forged.
            for i in 0..5 {
                let h = rig.send(APP, 9, RequestBody::DeviceToken).await;
                assert_eq!(refused(&h), Some(ErrorCode::BadSignature), "{i}");
                assert_eq!(
                    rig.monitoring
                        .quarantined_until(APP, rig.clock.now_ms())
                        .is_some(),
                    i == 4,
                    "quarantined at the fifth: {i}"
                );
            }
            let alert = rig.next_alert().await;
            assert_eq!(alert["kind"], "refusals");
            assert_eq!(alert["client"], APP);
            assert_eq!(alert["count"], 5);
            assert_eq!(alert["actor"], "hub");
            assert_eq!(alert["quarantined_until_ms"], (T0 + 900) * 1000);
            let hook = rig.next_hook().await;
            assert_eq!(hook["type"], "alert");
            assert_eq!(hook["kind"], "refusals");
            assert_eq!(hook["client"], APP);

            // The dispatcher refuses the quarantined client before anything else; others
            // go on.
            let (mut d, (work, refusals, _echoes, _audit)) =
                dispatcher(&rig.clock, GENEROUS, 8, 8, 8);
            d.monitoring = rig.monitoring.clone();
            d.dispatch(super::request(APP, b"anything"));
            d.dispatch(super::request(OPERATOR, b"anything"));
            let refused_codes: Vec<ErrorCode> =
                drain(&refusals).into_iter().map(|r| r.code).collect();
            assert_eq!(refused_codes, [ErrorCode::Quarantined]);
            let queued: Vec<String> = drain(&work).into_iter().map(|j| j.requester).collect();
            assert_eq!(queued, [OPERATOR]);

            // The audit log has the alert and the quarantine (the alerter wrote them before
            // it published the alert).
            let rows = rig.hub.store.audit_tail(100).await.expect("audit");
            let find = |action: &str| {
                rows.iter()
                    .find(|r| r.action == action && r.target == APP)
                    .unwrap_or_else(|| panic!("no {action} row: {rows:?}"))
                    .clone()
            };
            assert_eq!(find("alert").outcome, "refusals");
            assert_eq!(find("quarantine").outcome, "ok");

            // A device may not lift; the operator may, once.
            let h = rig
                .send(DEVICE, 3, RequestBody::LiftQuarantine { client: APP })
                .await;
            assert_eq!(refused(&h), Some(ErrorCode::Denied));
            let h = rig
                .send(OPERATOR, 1, RequestBody::LiftQuarantine { client: APP })
                .await;
            assert_eq!(refused(&h), None, "{:?}", h.audit);
            assert_eq!(h.audit.as_ref().map(|a| a.target.as_str()), Some(APP));
            assert_eq!(
                rig.monitoring.quarantined_until(APP, rig.clock.now_ms()),
                None
            );
            let h = rig
                .send(OPERATOR, 1, RequestBody::LiftQuarantine { client: APP })
                .await;
            assert_eq!(
                refused(&h),
                Some(ErrorCode::Denied),
                "not quarantined any more"
            );
            let lifted = rig.next_alert().await;
            assert_eq!(
                (&lifted["kind"], &lifted["actor"]),
                (&"quarantine_lifted".into(), &OPERATOR.into())
            );
            assert_eq!(rig.next_hook().await["kind"], "quarantine_lifted");
            // Without the serving loop's quarantines, a lift is not offered.
            let payload = rig.request(OPERATOR, 1, RequestBody::LiftQuarantine { client: APP });
            let h = rig.hub.handle(OPERATOR, &payload).await;
            assert_eq!(refused(&h), Some(ErrorCode::Unsupported));

            // The app is served again (its counts started afresh).
            let h = rig
                .send(
                    APP,
                    2,
                    RequestBody::FetchRevocations {
                        stream: tessera_shared::revocation::Stream::Devices(0),
                        from: 1,
                    },
                )
                .await;
            assert_ne!(refused(&h), Some(ErrorCode::Quarantined));

            // The metrics after this known sequence (the delivery task counts a delivery
            // once the receiver's answer is in, just after the receiver handed it over).
            let delivered = rig.hub.metrics.webhook("ops").delivered;
            eventually(|| delivered.get() == 2).await;
            for line in [
                "tessera_hub_alerts_total{kind=\"refusals\"} 1",
                "tessera_hub_alerts_total{kind=\"not_granted\"} 0",
                "tessera_hub_quarantines_total 1",
                "tessera_hub_quarantine_ends_total{how=\"lifted\"} 1",
                "tessera_hub_quarantine_ends_total{how=\"expired\"} 0",
                "tessera_hub_quarantined_clients 0",
                "tessera_hub_webhook_deliveries_total{webhook=\"ops\",result=\"delivered\"} 2",
                "tessera_hub_webhook_deliveries_total{webhook=\"ops\",result=\"failed\"} 2",
                "tessera_hub_webhook_dead_letters_total{webhook=\"ops\"} 0",
                "tessera_hub_webhook_dropped_total{webhook=\"ops\"} 0",
                "tessera_hub_requests_total{operation=\"lift_quarantine\",outcome=\"ok\"} 1",
            ] {
                assert!(metric(&rig.hub, line), "no `{line}` in the metrics");
            }
        }

        #[tokio::test]
        async fn a_quarantined_flood_costs_a_refusal_within_the_admission_limit_and_the_rest_is_dropped()
         {
            let rig = Rig::new(
                AnomalyConfig {
                    quarantine_on: vec![AlertKind::GrantReuse],
                    ..AnomalyConfig::default()
                },
                0,
            )
            .await;
            rig.monitoring.observe(
                &Decision {
                    client: APP.into(),
                    registered: true,
                    refused: Some(ErrorCode::Revoked),
                    issued: false,
                    signal: Some(crate::anomaly::Signal::GrantReused),
                },
                rig.clock.now_ms(),
            );
            let limit = Limit {
                burst: 3,
                per_second: 1.0,
            };
            let (mut d, (work, refusals, _echoes, mut audit)) =
                dispatcher(&rig.clock, limit, 8, 2, 8);
            d.monitoring = rig.monitoring.clone();
            for _ in 0..100 {
                d.dispatch(super::request(APP, b"anything"));
            }
            assert!(drain(&work).is_empty(), "nothing of it is read");
            // Three admitted: two `quarantined` answers fit the refusal queue, one does
            // not; then one `rate_limited` answer would, but the queue is full.
            let codes: Vec<ErrorCode> = drain(&refusals).into_iter().map(|r| r.code).collect();
            assert_eq!(codes, [ErrorCode::Quarantined, ErrorCode::Quarantined]);
            let count = |code, result| {
                d.metrics
                    .admission_refusals
                    .get_or_create(&crate::metrics::RefusalLabels { code, result })
                    .get()
            };
            assert_eq!(count("quarantined", "dropped"), 1);
            assert_eq!(count("rate_limited", "dropped"), 97);
            // Dropped quarantined requests are not audited one by one.
            d.flush_drops();
            let rows: Vec<AuditEvent> = std::iter::from_fn(|| audit.try_recv().ok()).collect();
            assert!(rows.iter().all(|r| r.outcome == "rate_limited"), "{rows:?}");
        }

        #[tokio::test]
        async fn a_quarantine_ends_by_itself_on_the_hubs_clock() {
            let mut rig = Rig::new(
                AnomalyConfig {
                    not_granted: 2,
                    quarantine_s: 60,
                    quarantine_on: vec![AlertKind::NotGranted],
                    ..AnomalyConfig::default()
                },
                0,
            )
            .await;
            let scope = Scopes::parse("door:unlock").expect("scope");
            for _ in 0..2 {
                let h = rig
                    .send(
                        APP,
                        2,
                        RequestBody::AccessToken {
                            device: DEVICE,
                            scope,
                        },
                    )
                    .await;
                assert_eq!(refused(&h), Some(ErrorCode::Denied));
            }
            let alert = rig.next_alert().await;
            assert_eq!(alert["kind"], "not_granted");
            assert!(metric(&rig.hub, "tessera_hub_quarantined_clients 1"));
            rig.clock.advance_ms(59_999);
            rig.monitoring.expire(rig.clock.now_ms());
            assert!(
                rig.monitoring
                    .quarantined_until(APP, rig.clock.now_ms())
                    .is_some()
            );
            rig.clock.advance_ms(1);
            // The alerter checks once a second; the test does not wait for it.
            rig.monitoring.expire(rig.clock.now_ms());
            assert_eq!(
                rig.monitoring.quarantined_until(APP, rig.clock.now_ms()),
                None
            );
            let ended = rig.next_alert().await;
            assert_eq!(
                (&ended["kind"], &ended["client"]),
                (&"quarantine_expired".into(), &APP.into())
            );
            assert!(metric(
                &rig.hub,
                "tessera_hub_quarantine_ends_total{how=\"expired\"} 1"
            ));
            assert!(metric(&rig.hub, "tessera_hub_quarantined_clients 0"));
            let rows = rig.hub.store.audit_tail(100).await.expect("audit");
            assert!(
                rows.iter()
                    .any(|r| r.action == "quarantine_expiry" && r.target == APP),
                "{rows:?}"
            );
        }

        #[tokio::test]
        async fn a_reused_refresh_grant_alerts_at_once_and_quarantines_when_configured_to() {
            let mut rig = Rig::new(
                AnomalyConfig {
                    quarantine_on: vec![AlertKind::GrantReuse],
                    ..AnomalyConfig::default()
                },
                0,
            )
            .await;
            let h = rig.send(DEVICE, 3, RequestBody::DeviceToken).await;
            let grant = token_grant(&rig.hub, &h).await;
            let h = rig
                .send(DEVICE, 3, RequestBody::Refresh { grant: &grant })
                .await;
            assert_eq!(refused(&h), None);
            let h = rig
                .send(DEVICE, 3, RequestBody::Refresh { grant: &grant })
                .await;
            assert_eq!(refused(&h), Some(ErrorCode::Revoked));
            let alert = rig.next_alert().await;
            assert_eq!(
                (&alert["kind"], &alert["client"]),
                (&"grant_reuse".into(), &DEVICE.into())
            );
            assert!(
                alert["quarantined_until_ms"].is_u64(),
                "listed in quarantine_on"
            );
            assert!(metric(&rig.hub, "tessera_hub_refresh_grant_reuse_total 1"));
            assert!(metric(
                &rig.hub,
                "tessera_hub_alerts_total{kind=\"grant_reuse\"} 1"
            ));
        }

        #[tokio::test]
        async fn requests_of_a_revoked_client_alert_as_use_after_revocation() {
            let mut rig = Rig::new(AnomalyConfig::default(), 0).await;
            let mut gone = client("dev-2", ClientKind::Device, "sensor", 4);
            gone.revoked_at = Some(T0 - 10);
            rig.hub.store.add_client(gone).await.expect("client");
            for _ in 0..3 {
                let h = rig.send("dev-2", 4, RequestBody::DeviceToken).await;
                assert_eq!(refused(&h), Some(ErrorCode::Revoked));
            }
            let alert = rig.next_alert().await;
            assert_eq!(
                (&alert["kind"], &alert["client"]),
                (&"revoked_use".into(), &"dev-2".into())
            );
            assert!(
                alert["quarantined_until_ms"].is_null(),
                "not in quarantine_on by default"
            );
        }

        #[tokio::test]
        async fn a_revocation_is_notified_to_the_webhook() {
            let mut rig = Rig::new(AnomalyConfig::default(), 0).await;
            let h = rig
                .send(
                    OPERATOR,
                    1,
                    RequestBody::Revoke(tessera_shared::message::RevokeTarget::Device(DEVICE)),
                )
                .await;
            assert_eq!(refused(&h), None, "{:?}", h.audit);
            let hook = rig.next_hook().await;
            assert_eq!(hook["type"], "revocation");
            assert_eq!(hook["actor"], OPERATOR);
            assert_eq!(hook["target"], format!("device {DEVICE}"));
        }

        #[tokio::test]
        async fn a_role_change_from_another_process_is_notified_once() {
            let mut rig = Rig::new(AnomalyConfig::default(), 0).await;
            let h = rig.send(DEVICE, 3, RequestBody::DeviceToken).await;
            assert_eq!(refused(&h), None, "{:?}", h.audit);
            // As `client set-role` does, on the store, outside the serving loop.
            let device = rig
                .hub
                .store
                .client(DEVICE)
                .await
                .expect("read")
                .expect("device");
            let policy = rig.hub.policy.current();
            let out = crate::policy_change::change_role(
                &rig.hub.store,
                &policy,
                &device,
                "retired",
                rig.clock.now(),
            )
            .await
            .expect("change_role");
            assert_eq!(out.map(|o| o.revoked), Some(1));
            let mut out_of_band = OutOfBand::new();
            out_of_band.look(&rig.hub, &rig.monitoring).await;
            let hook = rig.next_hook().await;
            assert_eq!(hook["type"], "revocation");
            assert_eq!(hook["actor"], "cli");
            assert_eq!(hook["target"], format!("client {DEVICE}"));
            assert!(
                hook["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("role retired: revoked 1 token")),
                "{hook}"
            );
            assert!(metric(
                &rig.hub,
                "tessera_hub_revocations_total{kind=\"set_role\"} 1"
            ));
            // A second look notifies nothing again: the next notification is the
            // operator's revocation that follows.
            rig.clock.advance_ms(1_000);
            out_of_band.look(&rig.hub, &rig.monitoring).await;
            let h = rig
                .send(
                    OPERATOR,
                    1,
                    RequestBody::Revoke(tessera_shared::message::RevokeTarget::Device(DEVICE)),
                )
                .await;
            assert_eq!(refused(&h), None, "{:?}", h.audit);
            let hook = rig.next_hook().await;
            assert_eq!(hook["actor"], OPERATOR, "{hook}");
            assert!(metric(
                &rig.hub,
                "tessera_hub_revocations_total{kind=\"set_role\"} 1"
            ));
        }

        #[tokio::test]
        async fn a_policy_reload_that_revokes_is_notified() {
            let mut rig = Rig::new(AnomalyConfig::default(), 0).await;
            let h = rig.send(DEVICE, 3, RequestBody::DeviceToken).await;
            assert_eq!(refused(&h), None, "{:?}", h.audit);
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("policy.toml");
            let narrower = Policy::DEFAULT_TOML.replace(
                r#"scopes = ["telemetry:write"]"#,
                r#"scopes = ["telemetry:read"]"#,
            );
            assert_ne!(narrower, Policy::DEFAULT_TOML);
            std::fs::write(&path, narrower).expect("write");
            let limits = policy_change::ReloadLimits {
                max_revoked_percent: 100,
            };
            reload_policy(&rig.hub, &path, &limits).await;
            OutOfBand::new().look(&rig.hub, &rig.monitoring).await;
            let hook = rig.next_hook().await;
            assert_eq!(hook["type"], "revocation");
            assert_eq!(hook["actor"], "hub");
            assert_eq!(hook["target"], format!("policy {}", path.display()));
            assert!(
                hook["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("policy reload: revoked 1 token")),
                "{hook}"
            );
            assert!(metric(
                &rig.hub,
                "tessera_hub_revocations_total{kind=\"policy_reload\"} 1"
            ));
        }

        #[tokio::test]
        async fn unregistered_ids_never_get_anyone_quarantined() {
            let mut rig = Rig::new(
                AnomalyConfig {
                    refusals: 2,
                    unregistered_refusals: 3,
                    ..AnomalyConfig::default()
                },
                0,
            )
            .await;
            for i in 0..3 {
                let h = rig
                    .send(&format!("ghost-{i}"), 9, RequestBody::DeviceToken)
                    .await;
                assert_eq!(refused(&h), Some(ErrorCode::UnknownClient));
                assert_eq!(h.decision.as_ref().map(|d| d.registered), Some(false));
            }
            let alert = rig.next_alert().await;
            assert_eq!(
                (&alert["kind"], &alert["client"]),
                (&"refusals".into(), &"*".into())
            );
            assert!(alert["quarantined_until_ms"].is_null());
            assert!(metric(&rig.hub, "tessera_hub_quarantined_clients 0"));
        }
    }
}
