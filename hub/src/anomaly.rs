//! Anomaly detection and quarantine: what one client's decisions say about it, the
//! alerts that follow, and the clients refused for a while because of them.
//!
//! The [`Detector`] is pure: the serving loop hands it each decision of the pipeline
//! ([`Decision`]) with the time, and it returns the alerts raised; it keeps the
//! quarantines (in memory, with their expiry) that the serving loop checks before it
//! queues a request. Rules, each counted per client over tumbling windows of
//! `anomaly.window_s`:
//!
//! | alert | raised when | evidence authenticated by the client's key |
//! |---|---|---|
//! | `refusals` | `anomaly.refusals` refusals of one client in a window (`bad_signature`, `replay`, `stale`, `malformed`, `denied`, `revoked`) | no: see below |
//! | `grant_reuse` | a refresh grant presented again by its owner (the hub revoked its family) | yes |
//! | `not_granted` | `anomaly.not_granted` requests for a scope or operation the client's role never grants | yes |
//! | `issuance_spike` | more tokens issued to one client in a window than `anomaly.issuance_factor` times its own norm (and at least `anomaly.issuance_min`) | yes |
//! | `revoked_use` | `anomaly.revoked_uses` requests by a revoked client, presenting a revoked grant, or presentations of a revoked access token reported by the devices they were made to | yes (a reported presentation carries the holder's signature) |
//!
//! Memory is bounded: only registered clients are tracked apart, at most
//! `anomaly.max_clients` of them (and as many quarantines); refusals of unregistered ids,
//! and of clients beyond the cap, are counted together under `*` (like the audit
//! [`Aggregator`](crate::server)), which can raise a `refusals` alert at
//! `anomaly.unregistered_refusals` but is never quarantined. Tracks idle for
//! [`IDLE_WINDOWS`] windows are forgotten.
//!
//! Who can get a client quarantined: a `refusals` alert counts refusals the hub could not
//! tie to the client's key (a bad signature is by definition not the client's). What ties
//! them to the client is the request topic, which the broker ACL (`tessera-hub
//! broker-acl`) lets only the holder of the client's broker credentials publish on: a
//! burst of forged requests there means those credentials are out of the client's hands.
//! On a broker without per-client ACLs (the embedded demo broker) anyone can publish on
//! any topic: take `refusals` out of `anomaly.quarantine_on` there, and only rules proven
//! by the client's own signature quarantine. Unregistered ids never get anyone
//! quarantined: they only ever count under `*`.

use std::collections::HashMap;

use serde::Deserialize;
use tessera_shared::message::ErrorCode;

/// The client id under which unregistered ids, and clients beyond the cap, are counted.
pub const MANY_CLIENTS: &str = "*";

/// Windows without any decision after which a client's track (and its issuance norm) is
/// forgotten.
pub const IDLE_WINDOWS: u64 = 60;

/// Weight of the last closed window in a client's issuance norm (an exponentially
/// weighted mean of tokens issued per window).
const NORM_WEIGHT: f64 = 0.25;

/// What an alert is about; also the `kind` of the other messages on the alerts topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Repeated refusals within a window.
    Refusals,
    /// A refresh grant presented again by its owner.
    GrantReuse,
    /// Requests for scopes or operations the client's role never grants.
    NotGranted,
    /// Tokens issued far above the client's own norm.
    IssuanceSpike,
    /// Requests by a revoked client, or with a revoked grant.
    RevokedUse,
    /// Not an alert: an operator lifted a quarantine.
    QuarantineLifted,
    /// Not an alert: a quarantine ran out.
    QuarantineExpired,
}

impl AlertKind {
    /// The rules (the kinds `anomaly.quarantine_on` may list).
    pub const RULES: [AlertKind; 5] = [
        Self::Refusals,
        Self::GrantReuse,
        Self::NotGranted,
        Self::IssuanceSpike,
        Self::RevokedUse,
    ];

    /// The name on the alerts topic, in the audit log and the metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Refusals => "refusals",
            Self::GrantReuse => "grant_reuse",
            Self::NotGranted => "not_granted",
            Self::IssuanceSpike => "issuance_spike",
            Self::RevokedUse => "revoked_use",
            Self::QuarantineLifted => "quarantine_lifted",
            Self::QuarantineExpired => "quarantine_expired",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What the pipeline saw in a request beyond its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The owner presented a refresh grant already used: its family was revoked.
    GrantReused,
    /// Policy refused a scope or an operation the client's role does not grant (or the
    /// client presented a refresh grant issued to another client).
    NotGranted,
    /// The client is revoked, or presented a revoked grant, or a device reported its
    /// presentation of a revoked access token.
    RevokedUse,
}

/// Where the pipeline lifts quarantines for an operator's `lift_quarantine` request: the
/// serving loop's quarantines ([`crate::server`]).
pub trait Quarantines: Send + Sync {
    /// Lifts `client`'s quarantine for operator `by` at `now_ms`; returns until when it
    /// would have lasted, if it was in force.
    fn lift(&self, client: &str, by: &str, now_ms: u64) -> Option<u64>;
}

/// One decision of the pipeline, as the detector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The client id of the request topic.
    pub client: String,
    /// Whether the hub found the client registered (only those are tracked apart).
    pub registered: bool,
    /// The refusal's code; `None` for a success.
    pub refused: Option<ErrorCode>,
    /// Whether a token was issued.
    pub issued: bool,
    /// What else the pipeline saw.
    pub signal: Option<Signal>,
}

/// `[anomaly]`: the thresholds, and what quarantines.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Detection on or off (quarantines too).
    pub enabled: bool,
    /// The window the counts are kept over, seconds.
    pub window_s: u64,
    /// Refusals of one registered client in a window that raise `refusals`.
    pub refusals: u32,
    /// Refusals of unregistered ids (and clients beyond the cap), together, in a window
    /// that raise `refusals` for `*`.
    pub unregistered_refusals: u32,
    /// Requests for what the role never grants in a window that raise `not_granted`.
    pub not_granted: u32,
    /// Requests by a revoked client (or with a revoked grant) in a window that raise
    /// `revoked_use`.
    pub revoked_uses: u32,
    /// Tokens issued in a window above this many times the client's norm raise
    /// `issuance_spike`...
    pub issuance_factor: f64,
    /// ...and at least this many.
    pub issuance_min: u32,
    /// How long an alert of a kind in `quarantine_on` quarantines the client, seconds;
    /// 0 never quarantines.
    pub quarantine_s: u64,
    /// The alerts that quarantine.
    pub quarantine_on: Vec<AlertKind>,
    /// Clients tracked apart (and quarantined) at most.
    pub max_clients: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 60,
            refusals: 20,
            unregistered_refusals: 200,
            not_granted: 3,
            revoked_uses: 3,
            issuance_factor: 10.0,
            issuance_min: 30,
            quarantine_s: 900,
            // Opt-in: alerts only until the operator chooses what quarantines (a
            // misconfigured app, a device restored from a backup, or on a broker without
            // per-client ACLs anyone at all, could otherwise lock a client out).
            quarantine_on: Vec::new(),
            max_clients: 65_536,
        }
    }
}

impl AnomalyConfig {
    /// What is wrong with the values, if anything (the config file names the section).
    pub fn check(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.window_s) {
            return Err("anomaly.window_s must be 1..=86400".into());
        }
        if self.refusals == 0
            || self.unregistered_refusals == 0
            || self.not_granted == 0
            || self.revoked_uses == 0
            || self.issuance_min == 0
        {
            return Err(
                "anomaly.refusals, unregistered_refusals, not_granted, revoked_uses and \
                 issuance_min must be positive"
                    .into(),
            );
        }
        if !(self.issuance_factor >= 1.0 && self.issuance_factor.is_finite()) {
            return Err("anomaly.issuance_factor must be at least 1".into());
        }
        if self.quarantine_s > 30 * 86_400 {
            return Err("anomaly.quarantine_s must be 0..=2592000".into());
        }
        if let Some(k) = self
            .quarantine_on
            .iter()
            .find(|k| !AlertKind::RULES.contains(k))
        {
            return Err(format!(
                "anomaly.quarantine_on: `{}` is not a rule",
                k.as_str()
            ));
        }
        if !(1..=1 << 20).contains(&self.max_clients) {
            return Err("anomaly.max_clients must be 1..=1048576".into());
        }
        Ok(())
    }
}

/// An alert, or a quarantine's end: one message on the alerts topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// When, Unix milliseconds (hub clock).
    pub at_ms: u64,
    /// What happened.
    pub kind: AlertKind,
    /// The client it is about (`*` for many).
    pub client: String,
    /// Who acted: `hub`, or the operator who lifted a quarantine.
    pub actor: String,
    /// The decisions that raised it (0 for a quarantine's end).
    pub count: u64,
    /// Why, for people.
    pub reason: String,
    /// Until when the client is quarantined because of it, Unix milliseconds.
    pub quarantined_until_ms: Option<u64>,
}

impl Alert {
    /// The message as JSON (the shape of docs/PROTOCOL.md §7.5).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "at_ms": self.at_ms,
            "kind": self.kind.as_str(),
            "client": self.client,
            "actor": self.actor,
            "count": self.count,
            "reason": self.reason,
            "quarantined_until_ms": self.quarantined_until_ms,
        })
    }
}

/// The counts of one client (or of `*`) in the current window.
#[derive(Debug, Default)]
struct Track {
    window_start_ms: u64,
    last_seen_ms: u64,
    refusals: u32,
    by_code: [u32; 16],
    not_granted: u32,
    revoked_uses: u32,
    issued: u32,
    /// Tokens issued per window, exponentially weighted over the closed windows.
    norm: f64,
    /// The kinds already raised in this window (each once per window).
    alerted: u8,
}

impl Track {
    fn new(now_ms: u64) -> Self {
        Self {
            window_start_ms: now_ms,
            last_seen_ms: now_ms,
            ..Self::default()
        }
    }

    /// Closes the windows that ended by `now_ms`, folding their issuance into the norm.
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.window_start_ms) / window_ms;
        if elapsed == 0 {
            return;
        }
        self.norm = self.norm * (1.0 - NORM_WEIGHT) + f64::from(self.issued) * NORM_WEIGHT;
        // Windows with nothing issued count as zeros.
        let idle = i32::try_from(elapsed - 1).unwrap_or(i32::MAX);
        self.norm *= (1.0 - NORM_WEIGHT).powi(idle);
        let norm = self.norm;
        *self = Self {
            window_start_ms: self.window_start_ms + elapsed.saturating_mul(window_ms),
            last_seen_ms: self.last_seen_ms,
            norm,
            ..Self::default()
        };
    }

    /// Whether `kind` is raised now: `count` reached `threshold` and it was not raised
    /// in this window yet.
    fn reached(&mut self, kind: AlertKind, count: u32, threshold: u32) -> bool {
        if count < threshold || self.alerted & kind.bit() != 0 {
            return false;
        }
        self.alerted |= kind.bit();
        true
    }

    fn codes(&self) -> String {
        let mut parts = Vec::new();
        for (n, count) in self.by_code.iter().enumerate() {
            if *count > 0
                && let Some(code) = ErrorCode::from_u64(n as u64)
            {
                parts.push(format!("{} {count}", code.name()));
            }
        }
        parts.join(", ")
    }
}

/// Refusals that count towards `refusals`: the client's doing (or its credentials'), not
/// the hub's (`internal`, `overloaded`), not the admission limit's (`rate_limited`, which
/// already bounds a flood), not a quarantine's.
fn counts_as_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::UnknownClient
            | ErrorCode::BadSignature
            | ErrorCode::Replay
            | ErrorCode::Stale
            | ErrorCode::Malformed
            | ErrorCode::Denied
            | ErrorCode::Revoked
    )
}

/// The detector and the quarantines. Pure: every method takes the time.
#[derive(Debug)]
pub struct Detector {
    config: AnomalyConfig,
    tracks: HashMap<String, Track>,
    many: Track,
    quarantined: HashMap<String, u64>,
}

impl Detector {
    /// A detector with nothing seen yet.
    pub fn new(config: AnomalyConfig) -> Self {
        Self {
            config,
            tracks: HashMap::new(),
            many: Track::default(),
            quarantined: HashMap::new(),
        }
    }

    /// The thresholds.
    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }

    /// Takes one decision at `now_ms`; returns the alerts it raises (and quarantines the
    /// client when one of them is in `quarantine_on`).
    pub fn observe(&mut self, d: &Decision, now_ms: u64) -> Vec<Alert> {
        if !self.config.enabled {
            return Vec::new();
        }
        let window_ms = self.config.window_s.max(1) * 1000;
        let apart = d.registered
            && d.client != MANY_CLIENTS
            && (self.tracks.contains_key(&d.client) || self.tracks.len() < self.config.max_clients);
        let track = if apart {
            self.tracks
                .entry(d.client.clone())
                .or_insert_with(|| Track::new(now_ms))
        } else {
            if self.many.last_seen_ms == 0 {
                self.many = Track::new(now_ms);
            }
            &mut self.many
        };
        track.roll(now_ms, window_ms);
        track.last_seen_ms = now_ms;
        let c = &self.config;
        let mut raised: Vec<(AlertKind, u64, String)> = Vec::new();
        if let Some(code) = d.refused.filter(|c| counts_as_refusal(*c)) {
            track.refusals += 1;
            if let Some(n) = usize::try_from(code.as_u64())
                .ok()
                .and_then(|i| track.by_code.get_mut(i))
            {
                *n += 1;
            }
            let threshold = if apart {
                c.refusals
            } else {
                c.unregistered_refusals
            };
            if track.reached(AlertKind::Refusals, track.refusals, threshold) {
                raised.push((
                    AlertKind::Refusals,
                    u64::from(track.refusals),
                    format!(
                        "{} refusals within {} s ({})",
                        track.refusals,
                        c.window_s,
                        track.codes()
                    ),
                ));
            }
        }
        match d.signal {
            Some(Signal::GrantReused) => raised.push((
                AlertKind::GrantReuse,
                1,
                "a refresh grant was presented again by its owner: its family is revoked (a \
                 copy of the client's stored grant is in other hands)"
                    .to_owned(),
            )),
            Some(Signal::NotGranted) => {
                track.not_granted += 1;
                if track.reached(AlertKind::NotGranted, track.not_granted, c.not_granted) {
                    raised.push((
                        AlertKind::NotGranted,
                        u64::from(track.not_granted),
                        format!(
                            "{} requests within {} s for scopes or operations its role never \
                             grants",
                            track.not_granted, c.window_s
                        ),
                    ));
                }
            }
            Some(Signal::RevokedUse) => {
                track.revoked_uses += 1;
                if track.reached(AlertKind::RevokedUse, track.revoked_uses, c.revoked_uses) {
                    raised.push((
                        AlertKind::RevokedUse,
                        u64::from(track.revoked_uses),
                        format!(
                            "{} uses within {} s of a revoked client, grant or token (requests, \
                             or presentations that devices reported)",
                            track.revoked_uses, c.window_s
                        ),
                    ));
                }
            }
            None => {}
        }
        if d.issued {
            track.issued += 1;
            // A client's first windows have no norm: the floor decides then.
            let threshold = (track.norm * c.issuance_factor)
                .ceil()
                .max(f64::from(c.issuance_min));
            if f64::from(track.issued) >= threshold && track.reached(AlertKind::IssuanceSpike, 1, 1)
            {
                raised.push((
                    AlertKind::IssuanceSpike,
                    u64::from(track.issued),
                    format!(
                        "{} tokens issued within {} s; its norm is {:.1} per window",
                        track.issued, c.window_s, track.norm
                    ),
                ));
            }
        }
        let client = if apart {
            d.client.as_str()
        } else {
            MANY_CLIENTS
        };
        raised
            .into_iter()
            .map(|(kind, count, reason)| {
                let quarantined_until_ms = if apart {
                    self.quarantine(client, kind, now_ms)
                } else {
                    None
                };
                let reason = match quarantined_until_ms {
                    Some(_) => format!("{reason}; quarantined for {} s", self.config.quarantine_s),
                    None => reason,
                };
                Alert {
                    at_ms: now_ms,
                    kind,
                    client: client.to_owned(),
                    actor: "hub".to_owned(),
                    count,
                    reason,
                    quarantined_until_ms,
                }
            })
            .collect()
    }

    /// Quarantines `client` after an alert of `kind` if the config says so; returns until
    /// when it is quarantined now (a quarantine in force is extended, never shortened).
    fn quarantine(&mut self, client: &str, kind: AlertKind, now_ms: u64) -> Option<u64> {
        let c = &self.config;
        if c.quarantine_s == 0 || !c.quarantine_on.contains(&kind) {
            return None;
        }
        let until = now_ms.saturating_add(c.quarantine_s * 1000);
        let full = self.quarantined.len() >= c.max_clients;
        match self.quarantined.get_mut(client) {
            Some(current) => *current = (*current).max(until),
            None if !full => {
                self.quarantined.insert(client.to_owned(), until);
            }
            None => {
                tracing::warn!(
                    client,
                    max = c.max_clients,
                    "too many clients quarantined at once: this one is not"
                );
                return None;
            }
        }
        self.quarantined.get(client).copied()
    }

    /// Until when `client` is quarantined, if it is at `now_ms`.
    pub fn quarantined_until(&self, client: &str, now_ms: u64) -> Option<u64> {
        self.quarantined
            .get(client)
            .copied()
            .filter(|until| *until > now_ms)
    }

    /// Clients quarantined now.
    pub fn quarantined(&self) -> usize {
        self.quarantined.len()
    }

    /// Lifts `client`'s quarantine; returns until when it would have lasted, if it was in
    /// force at `now_ms`. Its counts start afresh, so the same burst does not quarantine
    /// it again.
    pub fn lift(&mut self, client: &str, now_ms: u64) -> Option<u64> {
        let until = self.quarantined.remove(client)?;
        self.tracks.remove(client);
        (until > now_ms).then_some(until)
    }

    /// Ends the quarantines that ran out by `now_ms` and forgets the tracks idle for
    /// [`IDLE_WINDOWS`] windows; returns the ended quarantines as alerts-topic messages.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Alert> {
        let mut ended = Vec::new();
        self.quarantined.retain(|client, until| {
            if *until > now_ms {
                return true;
            }
            ended.push(Alert {
                at_ms: now_ms,
                kind: AlertKind::QuarantineExpired,
                client: client.clone(),
                actor: "hub".to_owned(),
                count: 0,
                reason: format!("the quarantine ended at {until} ms"),
                quarantined_until_ms: None,
            });
            false
        });
        let idle_ms = IDLE_WINDOWS.saturating_mul(self.config.window_s.max(1) * 1000);
        self.tracks
            .retain(|_, t| now_ms.saturating_sub(t.last_seen_ms) < idle_ms);
        ended
    }

    /// Clients tracked apart now.
    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }

    /// `(client, until Unix ms)` of every quarantine in force at `now_ms`, by client (for
    /// the dashboard).
    pub fn quarantines(&self, now_ms: u64) -> Vec<(String, u64)> {
        let mut q: Vec<(String, u64)> = self
            .quarantined
            .iter()
            .filter(|(_, until)| **until > now_ms)
            .map(|(client, until)| (client.clone(), *until))
            .collect();
        q.sort();
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_767_225_600_000;

    fn refused(client: &str, code: ErrorCode) -> Decision {
        Decision {
            client: client.into(),
            registered: true,
            refused: Some(code),
            issued: false,
            signal: None,
        }
    }

    fn issued(client: &str) -> Decision {
        Decision {
            client: client.into(),
            registered: true,
            refused: None,
            issued: true,
            signal: None,
        }
    }

    fn config() -> AnomalyConfig {
        AnomalyConfig {
            refusals: 5,
            unregistered_refusals: 10,
            issuance_min: 5,
            issuance_factor: 3.0,
            quarantine_s: 60,
            quarantine_on: vec![
                AlertKind::Refusals,
                AlertKind::GrantReuse,
                AlertKind::NotGranted,
            ],
            max_clients: 4,
            ..AnomalyConfig::default()
        }
    }

    #[test]
    fn the_default_config_is_valid() {
        assert_eq!(AnomalyConfig::default().check(), Ok(()));
        assert!(
            AnomalyConfig::default().quarantine_on.is_empty(),
            "quarantine is opt-in"
        );
        let bad = AnomalyConfig {
            quarantine_on: vec![AlertKind::QuarantineLifted],
            ..AnomalyConfig::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn repeated_refusals_within_a_window_raise_one_alert_and_quarantine_the_client() {
        let mut d = Detector::new(config());
        for i in 0..4 {
            assert!(
                d.observe(&refused("app", ErrorCode::BadSignature), T0 + i)
                    .is_empty()
            );
        }
        let alerts = d.observe(&refused("app", ErrorCode::Replay), T0 + 10);
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(
            (a.kind, a.client.as_str(), a.count),
            (AlertKind::Refusals, "app", 5)
        );
        assert!(
            a.reason.contains("bad_signature 4, replay 1"),
            "{}",
            a.reason
        );
        assert_eq!(a.quarantined_until_ms, Some(T0 + 10 + 60_000));
        assert_eq!(d.quarantined_until("app", T0 + 11), Some(T0 + 60_010));
        // Once per window.
        assert!(
            d.observe(&refused("app", ErrorCode::BadSignature), T0 + 20)
                .is_empty()
        );
        // Refusals the client did not cause do not count.
        let mut d = Detector::new(config());
        for i in 0..50 {
            for code in [
                ErrorCode::Overloaded,
                ErrorCode::RateLimited,
                ErrorCode::Internal,
            ] {
                assert!(d.observe(&refused("app", code), T0 + i).is_empty());
            }
        }
    }

    #[test]
    fn refusals_spread_over_windows_raise_nothing() {
        let mut d = Detector::new(config());
        for w in 0..10 {
            for i in 0..4 {
                let at = T0 + w * 60_000 + i;
                assert!(d.observe(&refused("app", ErrorCode::Stale), at).is_empty());
            }
        }
    }

    #[test]
    fn unregistered_ids_count_together_and_are_never_quarantined() {
        let mut d = Detector::new(config());
        let mut alerts = Vec::new();
        for i in 0..10 {
            let mut r = refused(&format!("ghost-{i}"), ErrorCode::UnknownClient);
            r.registered = false;
            alerts.extend(d.observe(&r, T0 + i));
        }
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].client, MANY_CLIENTS);
        assert_eq!(alerts[0].quarantined_until_ms, None);
        assert_eq!((d.tracked(), d.quarantined()), (0, 0));
    }

    #[test]
    fn clients_beyond_the_cap_count_together_and_memory_stays_bounded() {
        let mut d = Detector::new(config());
        for i in 0..10_000u64 {
            d.observe(&refused(&format!("app-{i}"), ErrorCode::Denied), T0 + i);
        }
        assert_eq!(d.tracked(), 4);
        assert_eq!(d.quarantined(), 0);
        // Idle tracks are forgotten.
        d.expire(T0 + IDLE_WINDOWS * 60_000 + 20_000);
        assert_eq!(d.tracked(), 0);
    }

    #[test]
    fn a_reused_grant_alerts_at_once_and_quarantines() {
        let mut d = Detector::new(config());
        let mut r = refused("dev", ErrorCode::Revoked);
        r.signal = Some(Signal::GrantReused);
        let alerts = d.observe(&r, T0);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].kind, AlertKind::GrantReuse);
        assert!(d.quarantined_until("dev", T0).is_some());
    }

    #[test]
    fn asking_again_and_again_for_what_was_never_granted_alerts() {
        let mut d = Detector::new(config());
        let mut r = refused("app", ErrorCode::Denied);
        r.signal = Some(Signal::NotGranted);
        assert!(d.observe(&r, T0).is_empty());
        assert!(d.observe(&r, T0 + 1).is_empty());
        let alerts = d.observe(&r, T0 + 2);
        assert_eq!(
            alerts.iter().map(|a| a.kind).collect::<Vec<_>>(),
            [AlertKind::NotGranted]
        );
    }

    #[test]
    fn use_after_revocation_alerts_without_quarantine_by_default() {
        let mut d = Detector::new(config());
        let mut r = refused("dev", ErrorCode::Revoked);
        r.signal = Some(Signal::RevokedUse);
        d.observe(&r, T0);
        d.observe(&r, T0 + 1);
        let alerts = d.observe(&r, T0 + 2);
        assert_eq!(alerts[0].kind, AlertKind::RevokedUse);
        assert_eq!(alerts[0].quarantined_until_ms, None);
    }

    #[test]
    fn issuance_far_above_the_clients_own_norm_alerts() {
        let mut d = Detector::new(config());
        // Four windows of 4 tokens: below the floor of 5.
        for w in 0..4 {
            for i in 0..4 {
                assert!(d.observe(&issued("app"), T0 + w * 60_000 + i).is_empty());
            }
        }
        // Four windows of 4 make a norm of about 2.7 (1, 1.75, 2.31, 2.73: a quarter of
        // each new window); three times that is 8.2: the 9th in a window alerts.
        let base = T0 + 4 * 60_000;
        for i in 0..8 {
            assert!(d.observe(&issued("app"), base + i).is_empty(), "{i}");
        }
        let alerts = d.observe(&issued("app"), base + 8);
        assert_eq!(alerts[0].kind, AlertKind::IssuanceSpike);
        assert_eq!(alerts[0].count, 9);
        assert_eq!(alerts[0].quarantined_until_ms, None, "not in quarantine_on");
        // A new client has no norm: the floor decides.
        for i in 0..4 {
            assert!(d.observe(&issued("new"), base + i).is_empty());
        }
        assert_eq!(d.observe(&issued("new"), base + 5).len(), 1);
    }

    #[test]
    fn a_quarantine_runs_out_or_is_lifted() {
        let mut d = Detector::new(config());
        let mut r = refused("dev", ErrorCode::Revoked);
        r.signal = Some(Signal::GrantReused);
        d.observe(&r, T0);
        assert!(d.expire(T0 + 59_999).is_empty());
        assert!(d.quarantined_until("dev", T0 + 59_999).is_some());
        let ended = d.expire(T0 + 60_000);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].kind, AlertKind::QuarantineExpired);
        assert_eq!(d.quarantined_until("dev", T0 + 60_000), None);
        d.observe(&r, T0 + 70_000);
        assert_eq!(d.lift("dev", T0 + 70_001), Some(T0 + 130_000));
        assert_eq!(d.quarantined_until("dev", T0 + 70_001), None);
        assert_eq!(d.lift("dev", T0 + 70_002), None, "lifted already");
    }

    #[test]
    fn nothing_is_raised_when_detection_is_off() {
        let mut d = Detector::new(AnomalyConfig {
            enabled: false,
            ..config()
        });
        for i in 0..100 {
            assert!(
                d.observe(&refused("app", ErrorCode::BadSignature), T0 + i)
                    .is_empty()
            );
        }
    }
}
