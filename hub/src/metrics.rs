//! The hub's metrics: every name, type and label in one place (documented in
//! docs/METRICS.md, which is the contract), registered once, rendered in the
//! OpenMetrics / Prometheus text format by `prometheus-client`.
//!
//! Labels are bounded: operations, error code names, token and revocation kinds, queue
//! names. Never a client id: a flood of made-up ids must not grow the hub's memory or the
//! monitoring system's series.
//!
//! The same values answer `/readyz` ([`Metrics::readiness`]): the broker connection,
//! the last store write and the last heartbeat are recorded here as they happen.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::WriteStats;

/// The prefix of every metric name.
pub const PREFIX: &str = "tessera_hub";

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `tessera_hub_requests_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The request's operation (`device_token`, `refresh`…; `unknown` if undecodable).
    pub operation: &'static str,
    /// `ok`, or the error code's name (`denied`, `replay`…).
    pub outcome: &'static str,
}

/// Labels of a single `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    /// Token kind (`device`, `access`, `refresh_grant`) or revocation target kind.
    pub kind: &'static str,
}

/// `tessera_hub_admission_refusals_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `overloaded`, `rate_limited` or `quarantined`.
    pub code: &'static str,
    /// `answered` (a signed refusal went out) or `dropped` (nothing was sent).
    pub result: &'static str,
}

/// `tessera_hub_queue_depth` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueueLabels {
    /// `work` (requests waiting for a worker) or `refusal` (waiting for their refusal).
    pub queue: &'static str,
}

/// `tessera_hub_alerts_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AlertLabels {
    /// The rule (`refusals`, `grant_reuse`, `not_granted`, `issuance_spike`,
    /// `revoked_use`).
    pub kind: &'static str,
}

/// `tessera_hub_quarantine_ends_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndLabels {
    /// `lifted` (by an operator) or `expired`.
    pub how: &'static str,
}

/// Labels of the webhook metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WebhookLabels {
    /// The webhook's configured name (bounded by the config file).
    pub webhook: String,
}

/// `tessera_hub_webhook_deliveries_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// The webhook's configured name.
    pub webhook: String,
    /// `delivered` (a 2xx answer) or `failed` (an attempt that failed).
    pub result: &'static str,
}

/// Latency buckets, seconds: 0.5 ms to about 16 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// Every metric of the hub, and the health facts `/readyz` reads.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests handled by the pipeline (admission refusals are counted apart).
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from a request's arrival at a worker to its signed answer, for requests
    /// that issued a token.
    pub issuance_seconds: Histogram,
    /// Tokens issued, by kind.
    pub tokens_issued: Family<KindLabels, Counter>,
    /// Unexpired tokens, by kind (`device`, `access`; updated at every heartbeat).
    pub tokens_live: Family<KindLabels, Gauge>,
    /// Refresh grants presented again by their owner (the family is revoked).
    pub grant_reuse: Counter,
    /// Revocations committed, by target kind.
    pub revocations: Family<KindLabels, Counter>,
    /// Revocation entries in force, summed over streams (updated at every heartbeat).
    pub revocation_entries: Gauge,
    /// Unix time of the last heartbeat round published (0: none yet).
    pub last_heartbeat: Gauge,
    last_heartbeat_age: Gauge,
    /// 1 while this hub holds the housekeeping lease (always, on SQLite), 0 otherwise.
    lease_held: Gauge,
    /// Whether the lease was tried for yet.
    lease_tried: AtomicBool,
    /// 1 while connected to the broker.
    pub broker_connected: Gauge,
    /// Connections to the broker after the first.
    pub broker_reconnects: Counter,
    broker_connects: AtomicU64,
    /// Seconds a request's store commit took (group commit included).
    pub store_commit_seconds: Histogram,
    store_transactions: Counter,
    store_writes: Counter,
    store_seen: Mutex<WriteStats>,
    store_writable: AtomicBool,
    /// Requests waiting, by queue.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Requests refused before the pipeline (admission limit, overload, quarantine).
    pub admission_refusals: Family<RefusalLabels, Counter>,
    /// Anomaly alerts raised, by rule.
    pub alerts: Family<AlertLabels, Counter>,
    /// Alerts not published nor notified: the alert queue was full.
    pub alerts_dropped: Counter,
    /// Clients quarantined now.
    pub quarantined_clients: Gauge,
    /// Quarantines started (or extended) by an alert.
    pub quarantines: Counter,
    /// Quarantines ended, by how.
    pub quarantine_ends: Family<EndLabels, Counter>,
    /// Webhook delivery attempts, by webhook and result.
    pub webhook_deliveries: Family<DeliveryLabels, Counter>,
    /// Webhook notifications given up after their last attempt.
    pub webhook_dead_letters: Family<WebhookLabels, Counter>,
    /// Webhook notifications dropped: the webhook's queue was full.
    pub webhook_dropped: Family<WebhookLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handled, by operation and outcome (ok or the error code)",
            requests.clone(),
        );
        let issuance_seconds = Histogram::new(latency_buckets());
        registry.register(
            "issuance_duration_seconds",
            "Seconds from a worker taking a request to its signed answer, requests that issued a token",
            issuance_seconds.clone(),
        );
        let tokens_issued = Family::<KindLabels, Counter>::default();
        registry.register(
            "tokens_issued",
            "Tokens issued, by kind (device, access, refresh_grant)",
            tokens_issued.clone(),
        );
        let grant_reuse = Counter::default();
        registry.register(
            "refresh_grant_reuse",
            "Refresh grants presented again by their owner: each revoked its family",
            grant_reuse.clone(),
        );
        let tokens_live = Family::<KindLabels, Gauge>::default();
        registry.register(
            "tokens_live",
            "Unexpired tokens, by kind (updated at each heartbeat)",
            tokens_live.clone(),
        );
        // Shown from the start (0 until the first heartbeat counts them).
        for kind in ["device", "access"] {
            let _ = tokens_live.get_or_create(&KindLabels { kind });
        }
        let revocations = Family::<KindLabels, Counter>::default();
        registry.register(
            "revocations",
            "Revocations committed, by target kind",
            revocations.clone(),
        );
        let revocation_entries = Gauge::default();
        registry.register(
            "revocation_entries",
            "Revocation entries in force, summed over streams (updated at each heartbeat)",
            revocation_entries.clone(),
        );
        let last_heartbeat = Gauge::default();
        registry.register(
            "last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat round published (0: none yet)",
            last_heartbeat.clone(),
        );
        let last_heartbeat_age = Gauge::default();
        registry.register(
            "last_heartbeat_age_seconds",
            "Seconds since the last heartbeat round was published (-1: none yet)",
            last_heartbeat_age.clone(),
        );
        let lease_held = Gauge::default();
        registry.register(
            "lease_held",
            "1 while this hub holds the housekeeping lease (heartbeats, snapshots, pruning), \
             else 0",
            lease_held.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while the hub is connected to the broker, else 0",
            broker_connected.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Connections to the broker after the first one",
            broker_reconnects.clone(),
        );
        let store_commit_seconds = Histogram::new(latency_buckets());
        registry.register(
            "store_commit_duration_seconds",
            "Seconds a request's store commit took until durable (group commit included)",
            store_commit_seconds.clone(),
        );
        let store_transactions = Counter::default();
        registry.register(
            "store_transactions",
            "Durable store transactions committed",
            store_transactions.clone(),
        );
        let store_writes = Counter::default();
        registry.register(
            "store_writes",
            "Writes those transactions carried (requests, audit batches, registry changes)",
            store_writes.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests waiting, by queue (work: for a worker; refusal: for their refusal)",
            queue_depth.clone(),
        );
        let admission_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "admission_refusals",
            "Requests refused before the pipeline, by code and whether an answer went out",
            admission_refusals.clone(),
        );
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register(
            "alerts",
            "Anomaly alerts raised, by rule (docs/OPERATING.md, Alerts)",
            alerts.clone(),
        );
        let alerts_dropped = Counter::default();
        registry.register(
            "alerts_dropped",
            "Alerts neither published nor notified: the alert queue was full",
            alerts_dropped.clone(),
        );
        let quarantined_clients = Gauge::default();
        registry.register(
            "quarantined_clients",
            "Clients quarantined now (their requests are refused `quarantined`)",
            quarantined_clients.clone(),
        );
        let quarantines = Counter::default();
        registry.register(
            "quarantines",
            "Quarantines started or extended by an alert",
            quarantines.clone(),
        );
        let quarantine_ends = Family::<EndLabels, Counter>::default();
        registry.register(
            "quarantine_ends",
            "Quarantines ended, by how (lifted by an operator, expired)",
            quarantine_ends.clone(),
        );
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by webhook and result (delivered, failed)",
            webhook_deliveries.clone(),
        );
        let webhook_dead_letters = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_dead_letters",
            "Webhook notifications given up after their last attempt",
            webhook_dead_letters.clone(),
        );
        let webhook_dropped = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_dropped",
            "Webhook notifications dropped: the webhook's queue was full",
            webhook_dropped.clone(),
        );
        // Known label values start at zero, so rates and alerts see them before the first
        // event.
        for queue in ["work", "refusal"] {
            let _ = queue_depth.get_or_create(&QueueLabels { queue });
        }
        for kind in crate::anomaly::AlertKind::RULES {
            let _ = alerts.get_or_create(&AlertLabels {
                kind: kind.as_str(),
            });
        }
        for how in ["lifted", "expired"] {
            let _ = quarantine_ends.get_or_create(&EndLabels { how });
        }
        let _ = admission_refusals.get_or_create(&RefusalLabels {
            code: "quarantined",
            result: "answered",
        });
        for code in ["overloaded", "rate_limited"] {
            for result in ["answered", "dropped"] {
                let _ = admission_refusals.get_or_create(&RefusalLabels { code, result });
            }
        }
        Self {
            registry,
            requests,
            issuance_seconds,
            tokens_issued,
            tokens_live,
            grant_reuse,
            revocations,
            revocation_entries,
            last_heartbeat,
            last_heartbeat_age,
            lease_held,
            lease_tried: AtomicBool::new(false),
            broker_connected,
            broker_reconnects,
            broker_connects: AtomicU64::new(0),
            store_commit_seconds,
            store_transactions,
            store_writes,
            store_seen: Mutex::new(WriteStats::default()),
            store_writable: AtomicBool::new(true),
            queue_depth,
            admission_refusals,
            alerts,
            alerts_dropped,
            quarantined_clients,
            quarantines,
            quarantine_ends,
            webhook_deliveries,
            webhook_dead_letters,
            webhook_dropped,
        }
    }

    /// Counts one alert raised.
    pub fn alert(&self, kind: &'static str) {
        self.alerts.get_or_create(&AlertLabels { kind }).inc();
    }

    /// The counters of the webhook named `name` (created at zero).
    pub fn webhook(&self, name: &str) -> crate::webhooks::WebhookCounters {
        let webhook = || WebhookLabels {
            webhook: name.to_owned(),
        };
        let delivery = |result| DeliveryLabels {
            webhook: name.to_owned(),
            result,
        };
        // One label set at a time: a family's guard is held until the end of the
        // statement, and a second `get_or_create` in it would wait for it.
        let delivered = self
            .webhook_deliveries
            .get_or_create(&delivery("delivered"))
            .clone();
        let failed_attempts = self
            .webhook_deliveries
            .get_or_create(&delivery("failed"))
            .clone();
        let dead_letters = self.webhook_dead_letters.get_or_create(&webhook()).clone();
        let dropped = self.webhook_dropped.get_or_create(&webhook()).clone();
        crate::webhooks::WebhookCounters {
            delivered,
            failed_attempts,
            dead_letters,
            dropped,
        }
    }

    /// Counts one request answered by the pipeline.
    pub fn request(&self, operation: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { operation, outcome })
            .inc();
    }

    /// Counts one token (or refresh grant) issued.
    pub fn token_issued(&self, kind: &'static str) {
        self.tokens_issued.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts one revocation committed.
    pub fn revocation(&self, kind: &'static str) {
        self.revocations.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts one admission refusal.
    pub fn admission_refusal(&self, code: &'static str, result: &'static str) {
        self.admission_refusals
            .get_or_create(&RefusalLabels { code, result })
            .inc();
    }

    /// The depth gauge of a queue.
    pub fn queue(&self, queue: &'static str) -> Gauge {
        self.queue_depth
            .get_or_create(&QueueLabels { queue })
            .clone()
    }

    /// Records a (re)connection to the broker.
    pub fn broker_up(&self) {
        self.broker_connected.set(1);
        if self.broker_connects.fetch_add(1, Ordering::Relaxed) > 0 {
            self.broker_reconnects.inc();
        }
    }

    /// Records the loss of the broker connection.
    pub fn broker_down(&self) {
        self.broker_connected.set(0);
    }

    /// Records a heartbeat round published at `now` (Unix seconds).
    pub fn heartbeat(&self, now: u64) {
        self.last_heartbeat
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Records the outcome of a store write: `false` for a persistent write failure.
    pub fn store_written(&self, ok: bool) {
        self.store_writable.store(ok, Ordering::Relaxed);
    }

    /// Whether the last store write that could tell succeeded.
    pub fn store_writable(&self) -> bool {
        self.store_writable.load(Ordering::Relaxed)
    }

    /// The registry in the text format, with the values read at scrape time (heartbeat
    /// age at `now`, Unix seconds; the store's write counts) brought up to date first.
    pub fn render(&self, now: u64, written: WriteStats) -> String {
        let last = self.last_heartbeat.get();
        self.last_heartbeat_age.set(if last > 0 {
            i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(last)
        } else {
            -1
        });
        {
            // Counters only go up: add what the store counted since the last scrape.
            let mut seen = self
                .store_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.store_transactions
                .inc_by(written.transactions.saturating_sub(seen.transactions));
            self.store_writes
                .inc_by(written.writes.saturating_sub(seen.writes));
            *seen = written;
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Notes whether this hub holds the housekeeping lease after trying for it.
    pub fn lease(&self, held: bool) {
        self.lease_held.set(i64::from(held));
        self.lease_tried.store(true, Ordering::Relaxed);
    }

    /// What keeps the hub from being ready at `now` (Unix seconds), given whether its
    /// signing key signs and how often heartbeats go out; empty when ready.
    pub fn readiness(&self, now: u64, key_usable: bool, heartbeat_s: u64) -> Vec<String> {
        let mut not_ready = Vec::new();
        if self.broker_connected.get() != 1 {
            not_ready.push("broker: not connected".to_owned());
        }
        if !self.store_writable() {
            not_ready.push("store: the last write failed for good".to_owned());
        }
        if !key_usable {
            not_ready.push("signing key: cannot sign".to_owned());
        }
        // Heartbeats are the lease holder's duty: a replica without the lease need not
        // publish them (the holder's own readiness says whether it does).
        if self.lease_tried.load(Ordering::Relaxed) && self.lease_held.get() == 0 {
            return not_ready;
        }
        let last = u64::try_from(self.last_heartbeat.get()).unwrap_or(0);
        // Two intervals: one heartbeat may be in progress or just missed.
        let limit = heartbeat_s.max(1).saturating_mul(2);
        if last == 0 {
            not_ready.push("heartbeat: none published yet".to_owned());
        } else if now.saturating_sub(last) > limit {
            not_ready.push(format!(
                "heartbeat: last published {} s ago (limit {limit} s)",
                now.saturating_sub(last)
            ));
        }
        not_ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_without_the_lease_is_ready_without_heartbeats_of_its_own() {
        let m = Metrics::new();
        m.broker_up();
        assert!(
            m.readiness(1000, true, 30)
                .iter()
                .any(|r| r.starts_with("heartbeat"))
        );
        m.lease(false);
        assert_eq!(m.readiness(1000, true, 30), Vec::<String>::new());
        assert!(
            m.render(1000, WriteStats::default())
                .contains("tessera_hub_lease_held 0")
        );
        m.lease(true);
        assert!(
            m.readiness(1000, true, 30)
                .iter()
                .any(|r| r.starts_with("heartbeat"))
        );
        assert!(
            m.render(1000, WriteStats::default())
                .contains("tessera_hub_lease_held 1")
        );
    }

    #[test]
    fn a_fresh_hub_is_not_ready_until_connected_and_heartbeating() {
        let m = Metrics::new();
        let why = m.readiness(100, true, 30);
        assert_eq!(
            why,
            ["broker: not connected", "heartbeat: none published yet"]
        );
        m.broker_up();
        m.heartbeat(100);
        assert!(m.readiness(160, true, 30).is_empty());
        assert_eq!(
            m.readiness(161, true, 30),
            ["heartbeat: last published 61 s ago (limit 60 s)"]
        );
        m.store_written(false);
        assert_eq!(
            m.readiness(100, false, 30),
            [
                "store: the last write failed for good",
                "signing key: cannot sign"
            ]
        );
    }

    /// Every metric family the registry renders, by name (`# TYPE name type`).
    fn families() -> Vec<(String, String)> {
        let m = Metrics::new();
        // A family with no series yet renders nothing: give each one.
        m.request("refresh", "ok");
        m.token_issued("device");
        m.revocation("device");
        let _ = m.webhook("ops");
        m.render(0, WriteStats::default())
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
            .collect()
    }

    /// The name a family's samples are queried by: counters end in `_total`.
    fn sample_name(name: &str, kind: &str) -> String {
        if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_owned()
        }
    }

    #[test]
    fn every_metric_is_documented_with_its_type() {
        let doc = include_str!("../../docs/METRICS.md");
        let families = families();
        assert_eq!(families.len(), 25, "{families:?}");
        for (name, kind) in families {
            let row = format!("| `{}` | {kind} |", sample_name(&name, &kind));
            assert!(doc.contains(&row), "docs/METRICS.md lacks the row {row}");
        }
    }

    #[test]
    fn the_dashboard_and_alert_rules_name_only_metrics_the_hub_has() {
        let known: Vec<String> = families()
            .iter()
            .map(|(name, kind)| sample_name(name, kind))
            .collect();
        for (file, text) in [
            (
                "grafana-dashboard.json",
                include_str!("../../packaging/monitoring/grafana-dashboard.json"),
            ),
            (
                "tessera-hub.rules.yml",
                include_str!("../../packaging/monitoring/tessera-hub.rules.yml"),
            ),
        ] {
            let mut used = 0;
            for (at, _) in text.match_indices("tessera_hub_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name);
                assert!(
                    known.iter().any(|k| k == base),
                    "{file} names `{name}`, which the hub does not have"
                );
                used += 1;
            }
            assert!(used > 5, "{file}");
        }
    }

    #[test]
    fn reconnects_count_connections_after_the_first() {
        let m = Metrics::new();
        m.broker_up();
        m.broker_down();
        m.broker_up();
        m.broker_up();
        assert_eq!(m.broker_reconnects.get(), 2);
        assert_eq!(m.broker_connected.get(), 1);
    }

    #[test]
    fn rendering_adds_store_counts_once_and_ages_the_heartbeat() {
        let m = Metrics::new();
        m.heartbeat(1000);
        let stats = WriteStats {
            transactions: 3,
            writes: 7,
        };
        m.render(1000, stats);
        let text = m.render(1012, stats);
        assert!(
            text.contains("tessera_hub_store_transactions_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tessera_hub_store_writes_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("tessera_hub_last_heartbeat_age_seconds 12\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
