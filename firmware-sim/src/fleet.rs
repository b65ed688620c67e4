//! A whole run: the broker and hub set up ([`crate::processes`]) or a running pair used
//! ([`crate::external`]), the fleet registered and started, the run's duration waited out with an optional progress line, every device
//! stopped and its [`Outcome`] gathered into a [`Summary`], and everything the run started
//! stopped again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_mqtt::{Incoming, MqttConfig, Notice, QoS};
use tessera_shared::agent::{AgentConfig, DEFAULT_REQUEST_TIMEOUT_MS, MIN_REQUEST_TIMEOUT_MS};
use tessera_shared::crypto::PublicKey;
use tessera_shared::message::EnrollmentCode;
use tessera_shared::schedule::Backoff;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Error;
use crate::attack::{self, APP, APP_ROLE, AttackBook, Attacker, FloodTally, MALLORY, Verdicts};
use crate::clock::DeviceClock;
use crate::device::{self, Live, Outcome, Spec};
use crate::external::{External, ExternalHub};
use crate::flash::Dice;
use crate::processes::{
    Broker, Hub, LOOPBACK, Located, OPERATOR, REVOKE_GROUP, locate_hub, locate_mosquitto,
};
use crate::usage::{self, Meter};

/// The token lifetime of a run with its own hub when `--lifetime` is not given.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);

/// How many devices a steady ramp boots per second at most: a fleet of 10,000 boots over
/// 20 s instead of 5, so the broker's accept queue and the hub's request queue are not
/// flooded by a start-up the scenario does not ask for (`storm` does).
pub const BOOTS_PER_S: u32 = 500;

/// The topic the broker's own fan-out is measured on (`revoke`): one unsigned message,
/// published once, to every device.
pub const PROBE_TOPIC: &str = "firmware-sim/probe";

/// Rounds of the broker's own fan-out; the round with the median p99 is reported.
const PROBE_ROUNDS: u8 = 3;

/// The audience of device tokens in the default policy (`device_audience`).
pub const DEVICE_AUDIENCE: &str = "tessera";

/// How long the devices may take to disconnect once told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Devices the `malicious` scenario's attacker goes after.
pub const VICTIMS: usize = 3;

/// What the fleet goes through. Every scenario boots the devices as `steady` does (but
/// `storm`); the others add one fault a third of the way into the run, or a condition
/// that lasts throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Devices boot spread over a short ramp (half a lifetime, at most 5 s), enroll and
    /// refresh for the whole run; nothing fails on purpose.
    Steady,
    /// Every device boots and enrolls at the same moment, then refreshes as in `steady`.
    Storm,
    /// The hub is killed (SIGKILL: no drain) and started again after the outage.
    HubCrash,
    /// Mosquitto is stopped and started again on the same port after the outage; devices
    /// and hub reconnect on their own.
    BrokerRestart,
    /// An operator revokes a share of the fleet: half of it (rounded up) registered in
    /// [`REVOKE_GROUP`] with one `revoke --group`, the rest with one `revoke --device` each.
    Revoke,
    /// Every device has a clock of its own: those that do not trust it
    /// (`--untrusted-clock-share`) a wrong one (a day off, or counting from zero, drifting
    /// up to 2 %), the others a nearly right one (±200 ms, ±100 ppm).
    ClockSkew,
    /// Power fails during a share (`--power-cut-rate`) of the flash writes; each device
    /// cut off boots again from what its flash reads back.
    PowerLoss,
    /// A compromised device of the fleet attacks the hub and a few devices from a third of
    /// the way in (see [`crate::attack`]).
    Malicious,
}

impl Scenario {
    /// Its name on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Storm => "storm",
            Self::HubCrash => "hub-crash",
            Self::BrokerRestart => "broker-restart",
            Self::Revoke => "revoke",
            Self::ClockSkew => "clock-skew",
            Self::PowerLoss => "power-loss",
            Self::Malicious => "malicious",
        }
    }

    /// Whether it takes the hub away for a while.
    fn has_outage(self) -> bool {
        matches!(self, Self::HubCrash | Self::BrokerRestart)
    }

    /// Whether something happens a third of the way in, run by [`Setup::inject`].
    fn has_event(self) -> bool {
        matches!(self, Self::HubCrash | Self::BrokerRestart | Self::Revoke)
    }

    /// Why it cannot run against a running broker and hub, if it cannot: it kills or
    /// restarts them, or changes the hub's policy or config.
    fn external_refusal(self) -> Option<&'static str> {
        match self {
            Self::HubCrash => {
                Some("kills and restarts the hub, which firmware-sim does only to a hub it started")
            }
            Self::BrokerRestart => Some(
                "stops and restarts the broker, which firmware-sim does only to a broker it \
                 started",
            ),
            Self::Revoke => Some(
                "adds a group to the hub's policy and an operator to revoke with, which \
                 firmware-sim does only to a hub it started",
            ),
            Self::Malicious => Some(
                "registers a control app and sets the hub's heartbeat to 2 s, which \
                 firmware-sim does only to a hub it started",
            ),
            Self::Steady | Self::Storm | Self::ClockSkew | Self::PowerLoss => None,
        }
    }
}

/// How `revoke` revokes its share of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevokeBy {
    /// Half of it (rounded up) with one `revoke --group`, the rest with one
    /// `revoke --device` each.
    #[default]
    Mixed,
    /// All of it with one `revoke --group` (the fan-out of one operator action).
    Group,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated devices.
    pub devices: usize,
    /// Lifetime of their device tokens (whole seconds), set in the hub's policy; `None`:
    /// [`DEFAULT_LIFETIME`], or with a running hub whatever its policy says (which the
    /// simulator cannot change: a lifetime given must match it).
    pub lifetime: Option<Duration>,
    /// How long the fleet runs once the hub serves.
    pub duration: Duration,
    /// What happens meanwhile.
    pub scenario: Scenario,
    /// How long the hub or broker stays down in `hub-crash` and `broker-restart`.
    pub outage: Duration,
    /// The share of the fleet `revoke` revokes, 0 to 1.
    pub revoke_share: f64,
    /// How `revoke` revokes it.
    pub revoke_by: RevokeBy,
    /// The share of the fleet whose machine does not trust its local clock
    /// (`trust_local_clock = false`), 0 to 1; `None`: half in `clock-skew`, all otherwise.
    pub untrusted_clock_share: Option<f64>,
    /// The share of flash writes power fails during in `power-loss`, 0 to 1.
    pub power_cut_rate: f64,
    /// `tessera-hub`, if not found by [`locate_hub`]'s search.
    pub hub_bin: Option<PathBuf>,
    /// Mosquitto, if not found by [`locate_mosquitto`]'s search.
    pub mosquitto: Option<PathBuf>,
    /// Print a progress line every second (on a terminal).
    pub progress: bool,
    /// A running broker and hub to use instead of starting them; `None`: the run's own.
    pub external: Option<External>,
}

impl Options {
    /// The share of untrusted clocks in effect.
    pub fn untrusted_share(&self) -> f64 {
        self.untrusted_clock_share
            .unwrap_or(if self.scenario == Scenario::ClockSkew {
                0.5
            } else {
                1.0
            })
    }
}
/// p50, p99 and max of a set of latencies, ms; `None` when there were none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// How many.
    pub count: usize,
    /// Median (nearest rank).
    pub p50: Option<u64>,
    /// 99th percentile (nearest rank).
    pub p99: Option<u64>,
    /// The largest.
    pub max: Option<u64>,
}

impl Percentiles {
    /// Of `values`, in any order.
    pub fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        let rank = |p: usize| {
            let n = values.len();
            (n > 0).then(|| values[(n * p).div_ceil(100).clamp(1, n) - 1])
        };
        Self {
            count: values.len(),
            p50: rank(50),
            p99: rank(99),
            max: values.last().copied(),
        }
    }

    fn to_json(self) -> serde_json::Value {
        json!({ "count": self.count, "p50": self.p50, "p99": self.p99, "max": self.max })
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The scenario.
    pub scenario: Scenario,
    /// Devices started.
    pub devices: usize,
    /// Token lifetime, s.
    pub lifetime_s: u64,
    /// Run duration, s.
    pub duration_s: f64,
    /// Device tokens the devices received (first tokens included).
    pub tokens_issued: u64,
    /// Times a device went from holding a valid token to holding none while the hub was
    /// reachable (and the device powered), after its first token since it booted.
    pub lapses: u64,
    /// Total time devices spent in those lapses, ms.
    pub lapse_ms: u64,
    /// Devices that never held a token.
    pub never_held: usize,
    /// Devices holding a valid token when the run ended.
    pub holding_at_end: usize,
    /// The fewest tokens one device received.
    pub min_tokens_per_device: u64,
    /// Refresh latency: first refresh request sent → new token held, ms.
    pub refresh_latency_ms: Percentiles,
    /// Boot → first token (enrollment with the one-time code), ms.
    pub first_token_ms: Percentiles,
    /// From the first device's start to the last device's first token, ms; `None` if a
    /// device never held one.
    pub all_holding_ms: Option<u64>,
    /// The most devices in a token exchange at once (enrolling, asking, refreshing): the
    /// whole fleet in a `storm`, a few in `steady`.
    pub peak_refreshing: u64,
    /// Refusals and failures by code, summed over the fleet.
    pub errors: BTreeMap<&'static str, u64>,
    /// Devices whose task failed (not a protocol refusal: a local fault), with the first
    /// such error.
    pub device_failures: usize,
    /// The first device failure.
    pub first_failure: Option<String>,
    /// Devices that needed more than one request for some token (a retry after a timeout
    /// or refusal).
    pub devices_retried: usize,
    /// In `hub-crash` and `broker-restart`: from the kill (or stop) to the hub serving
    /// again (the broker logs its subscription), ms; `None` if it never did.
    pub outage_ms: Option<u64>,
    /// In `hub-crash` and `broker-restart`: how long lapses were not counted, ms: the
    /// outage plus one retry window (see [`retry_window`]); `None` in `steady`.
    pub lapses_not_counted_ms: Option<u64>,
    /// In `revoke`: devices the operator revoked.
    pub revoked: usize,
    /// In `revoke`: of those, devices whose machine reported itself revoked (and wiped).
    pub revoked_wiped: usize,
    /// Of the revoked devices, those whose flash read back empty at the end.
    pub revoked_flash_empty: usize,
    /// In `revoke`: revoked devices that applied it before the hub's answer to the
    /// operator was seen on the broker (the hub tells the devices as it answers).
    pub revoked_before_answer: usize,
    /// Devices that reported themselves revoked though the operator did not revoke them.
    pub revoked_unexpectedly: usize,
    /// In `revoke`: from the operator's revoke request reaching the broker (seen by the
    /// simulator's own subscriber) to the device's machine reporting it revoked, ms.
    pub revocation_fanout_ms: Percentiles,
    /// In `revoke`: from the operator's revoke request to the hub's answer (the revocation
    /// durable), both seen on the broker, ms; one value per command.
    pub revocation_ack_ms: Percentiles,
    /// In `clock-skew` (and wherever some devices distrust their clock): the clocks.
    pub clocks: Clocks,
    /// In `power-loss`: what power cuts did.
    pub power: Power,
    /// In `malicious`: verdicts by kind of attack.
    pub attacks: BTreeMap<&'static str, Verdicts>,
    /// In `malicious`: the flood's figures.
    pub flood: FloodTally,
    /// In `malicious`: the app's own presentations to the victims (the control: they
    /// should pass), accepted and refused.
    pub legit_presentations: (u64, u64),
    /// The peak resident set (VmHWM) of the hub processes the run started (or of
    /// `--hub-pid`), MB; the largest over restarts. `None` if it could not be read.
    pub hub_rss_mb: Option<f64>,
    /// CPU time (user + system) of the hub processes during the run, s; `None` when no
    /// hub process is known (a running hub without `--hub-pid`).
    pub hub_cpu_s: Option<f64>,
    /// `hub_cpu_s` over the run's measured wall time: average cores busy.
    pub hub_cpu_cores: Option<f64>,
    /// The same for the broker (over restarts).
    pub broker_cpu_s: Option<f64>,
    /// See [`broker_cpu_s`](Self::broker_cpu_s).
    pub broker_cpu_cores: Option<f64>,
    /// The broker's peak resident set, MB.
    pub broker_rss_mb: Option<f64>,
    /// The same for the simulator itself (its devices, their connections and the tally).
    pub sim_cpu_s: Option<f64>,
    /// See [`sim_cpu_s`](Self::sim_cpu_s).
    pub sim_cpu_cores: Option<f64>,
    /// The simulator's peak resident set, MB.
    pub sim_rss_mb: Option<f64>,
    /// In `revoke`: the limit in the same run: the broker delivering one unsigned message
    /// of a control message's size ([`broker_fanout_bytes`](Self::broker_fanout_bytes)),
    /// published once on [`PROBE_TOPIC`], to every device: publish → arrival, ms, one
    /// value per device, of the round (of [`PROBE_ROUNDS`]) with the median p99.
    pub broker_fanout_ms: Percentiles,
    /// The size of that message: the largest control message a device was revoked by.
    pub broker_fanout_bytes: Option<u64>,
    /// Whether the run used a running broker and hub (`--hub-config`).
    pub external: bool,
    /// The broker the devices connected to, as a URL.
    pub broker: String,
    /// The open-file limit the simulator (and the broker and hub it started) ran with;
    /// `None`: unlimited.
    pub open_files: Option<u64>,
    /// Whether the hub ran for the whole run: still running at the end and not killed.
    /// `None` for a running hub whose pid is not known.
    pub hub_ran_throughout: Option<bool>,
    /// Whether the run was interrupted (Ctrl-C) before its duration.
    pub interrupted: bool,
    /// The hub binary used, and how it was found.
    pub hub_bin: Located,
}

/// The fleet's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clocks {
    /// Devices with `trust_local_clock = false`.
    pub untrusted: usize,
    /// The largest error of an untrusted clock at the start, ms.
    pub untrusted_max_error_ms: u64,
    /// The largest error of a trusted clock at the start, ms.
    pub trusted_max_error_ms: u64,
    /// Times machines moved their idea of the hub's time.
    pub adjustments: u64,
    /// Devices that never held a token, among the untrusted and the trusted.
    pub untrusted_never_held: usize,
    /// See [`untrusted_never_held`](Self::untrusted_never_held).
    pub trusted_never_held: usize,
}

/// What power cuts did.
#[derive(Debug, Clone, Default)]
pub struct Power {
    /// Flash writes cut short (each a reboot).
    pub cuts: u64,
    /// Devices cut at least once.
    pub devices_cut: usize,
    /// Reboots whose flash still held a valid token.
    pub rebooted_holding: u64,
    /// Boot after a cut → a valid token held, ms.
    pub recovery_ms: Percentiles,
    /// Reboots that found written records but none readable.
    pub flash_lost: u64,
    /// Devices the end of the run found off after a cut, or just booted again.
    pub off_at_end: usize,
}

impl Summary {
    /// Attacks refused or ignored.
    pub fn attacks_rejected(&self) -> u64 {
        self.attacks.values().map(|v| v.rejected).sum()
    }

    /// Attacks acted on.
    pub fn attacks_accepted(&self) -> u64 {
        self.attacks.values().map(|v| v.accepted).sum()
    }

    /// The one-line JSON object `--json` prints last.
    pub fn to_json(&self) -> serde_json::Value {
        let attacks: serde_json::Map<String, serde_json::Value> = self
            .attacks
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    json!({
                        "rejected": v.rejected,
                        "accepted": v.accepted,
                        "unanswered": v.unanswered,
                        "codes": v.codes,
                    }),
                )
            })
            .collect();
        let mut summary = json!({
            "scenario": self.scenario.name(),
            "devices": self.devices,
            "lifetime_s": self.lifetime_s,
            "duration_s": self.duration_s,
            "tokens_issued": self.tokens_issued,
            "lapses": self.lapses,
            "lapse_ms": self.lapse_ms,
            "never_held": self.never_held,
            "holding_at_end": self.holding_at_end,
            "min_tokens_per_device": self.min_tokens_per_device,
            "refresh_latency_ms": self.refresh_latency_ms.to_json(),
            "first_token_ms": self.first_token_ms.to_json(),
            "all_holding_ms": self.all_holding_ms,
            "peak_refreshing": self.peak_refreshing,
            "errors": self.errors,
            "device_failures": self.device_failures,
            "devices_retried": self.devices_retried,
            "outage_ms": self.outage_ms,
            "lapses_not_counted_ms": self.lapses_not_counted_ms,
            "revoked": self.revoked,
            "revoked_wiped": self.revoked_wiped,
            "revoked_flash_empty": self.revoked_flash_empty,
            "revoked_unexpectedly": self.revoked_unexpectedly,
            "revoked_before_answer": self.revoked_before_answer,
            "revocation_fanout_ms": self.revocation_fanout_ms.to_json(),
            "revocation_ack_ms": self.revocation_ack_ms.to_json(),
            "clocks": {
                "untrusted": self.clocks.untrusted,
                "untrusted_max_error_ms": self.clocks.untrusted_max_error_ms,
                "trusted_max_error_ms": self.clocks.trusted_max_error_ms,
                "adjustments": self.clocks.adjustments,
                "untrusted_never_held": self.clocks.untrusted_never_held,
                "trusted_never_held": self.clocks.trusted_never_held,
            },
            "power": {
                "cuts": self.power.cuts,
                "devices_cut": self.power.devices_cut,
                "rebooted_holding": self.power.rebooted_holding,
                "recovery_ms": self.power.recovery_ms.to_json(),
                "flash_lost": self.power.flash_lost,
                "off_at_end": self.power.off_at_end,
            },
            "attacks_rejected": self.attacks_rejected(),
            "attacks_accepted": self.attacks_accepted(),
            "attacks_unanswered": self.attacks.values().map(|v| v.unanswered).sum::<u64>(),
            "attacks": attacks,
            "flood": {
                "sent": self.flood.sent,
                "served": self.flood.served,
                "refused": self.flood.refused,
                "rate_limited": self.flood.rate_limited,
                "dropped": self.flood.dropped,
                "garbage_sent": self.flood.garbage_sent,
                "garbage_answered": self.flood.garbage_answered,
            },
            "presentations_legit": {
                "accepted": self.legit_presentations.0,
                "refused": self.legit_presentations.1,
            },
            "hub_rss_mb": self.hub_rss_mb,
            "hub_ran_throughout": self.hub_ran_throughout,
            "interrupted": self.interrupted,
            "hub_bin": self.hub_bin.path.display().to_string(),
            "hub_bin_found": self.hub_bin.how,
        });
        // A second object: one `json!` this large exceeds the macro's recursion limit.
        let usage = json!({
            "hub_cpu_s": self.hub_cpu_s,
            "hub_cpu_cores": self.hub_cpu_cores,
            "broker_cpu_s": self.broker_cpu_s,
            "broker_cpu_cores": self.broker_cpu_cores,
            "broker_rss_mb": self.broker_rss_mb,
            "sim_cpu_s": self.sim_cpu_s,
            "sim_cpu_cores": self.sim_cpu_cores,
            "sim_rss_mb": self.sim_rss_mb,
            "broker_fanout_ms": self.broker_fanout_ms.to_json(),
            "broker_fanout_bytes": self.broker_fanout_bytes,
            "external": self.external,
            "broker": self.broker,
            "open_files": self.open_files,
        });
        if let (Some(all), serde_json::Value::Object(more)) = (summary.as_object_mut(), usage) {
            all.extend(more);
        }
        summary
    }

    /// The summary for people.
    pub fn text(&self) -> String {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| format!("{v} ms"));
        let mut t = String::new();
        let _ = writeln!(
            t,
            "firmware-sim {}: {} devices, {} s token lifetime, {:.1} s{}",
            self.scenario.name(),
            self.devices,
            self.lifetime_s,
            self.duration_s,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            t,
            "  tokens issued {} (at least {} per device); holding at the end {}/{}; never held {}; \
             all holding after {}; at most {} in a token exchange at once",
            self.tokens_issued,
            self.min_tokens_per_device,
            self.holding_at_end,
            self.devices,
            self.never_held,
            ms(self.all_holding_ms),
            self.peak_refreshing
        );
        let _ = writeln!(
            t,
            "  lapses {} ({} ms without a valid token in all)",
            self.lapses, self.lapse_ms
        );
        let _ = writeln!(
            t,
            "  refresh latency p50 {} p99 {} max {} ({} refreshes); first token p50 {} p99 {}",
            ms(self.refresh_latency_ms.p50),
            ms(self.refresh_latency_ms.p99),
            ms(self.refresh_latency_ms.max),
            self.refresh_latency_ms.count,
            ms(self.first_token_ms.p50),
            ms(self.first_token_ms.p99)
        );
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            t,
            "  errors: {}",
            if errors.is_empty() {
                "none".into()
            } else {
                errors.join(", ")
            }
        );
        if let Some(counted_again) = self.lapses_not_counted_ms {
            let _ = writeln!(
                t,
                "  outage {}; lapses not counted for {counted_again} ms; {} devices needed \
                 more than one try",
                ms(self.outage_ms),
                self.devices_retried
            );
        }
        if self.revoked > 0 || self.revoked_unexpectedly > 0 {
            let _ = writeln!(
                t,
                "  revoked {}, wiped {} (flash empty {}; {} before the hub's answer), revoked \
                 unexpectedly {}; fan-out from the request p50 {} p99 {} max {}; hub's answer \
                 p50 {}",
                self.revoked,
                self.revoked_wiped,
                self.revoked_flash_empty,
                self.revoked_before_answer,
                self.revoked_unexpectedly,
                ms(self.revocation_fanout_ms.p50),
                ms(self.revocation_fanout_ms.p99),
                ms(self.revocation_fanout_ms.max),
                ms(self.revocation_ack_ms.p50)
            );
        }
        if self.scenario == Scenario::ClockSkew || self.clocks.untrusted < self.devices {
            let _ = writeln!(
                t,
                "  clocks: {} untrusted (off by up to {} ms), {} trusted (off by up to {} ms); \
                 {} adjustments",
                self.clocks.untrusted,
                self.clocks.untrusted_max_error_ms,
                self.devices - self.clocks.untrusted,
                self.clocks.trusted_max_error_ms,
                self.clocks.adjustments
            );
        }
        if self.scenario == Scenario::PowerLoss {
            let _ = writeln!(
                t,
                "  power cuts {} on {} devices; {} reboots found a valid token; recovery p50 {} \
                 p99 {}; stores lost {}; off (or just booted) at the end {}",
                self.power.cuts,
                self.power.devices_cut,
                self.power.rebooted_holding,
                ms(self.power.recovery_ms.p50),
                ms(self.power.recovery_ms.p99),
                self.power.flash_lost,
                self.power.off_at_end
            );
        }
        if self.scenario == Scenario::Malicious {
            let kinds: Vec<String> = self
                .attacks
                .iter()
                .map(|(k, v)| format!("{k} {}/{}/{}", v.rejected, v.accepted, v.unanswered))
                .collect();
            let _ = writeln!(
                t,
                "  attacks rejected {}, accepted {} (rejected/accepted/unanswered: {}); flood: \
                 {} sent, {} served, {} rate limited, {} dropped; garbage {} sent, {} answered",
                self.attacks_rejected(),
                self.attacks_accepted(),
                kinds.join(", "),
                self.flood.sent,
                self.flood.served,
                self.flood.rate_limited,
                self.flood.dropped,
                self.flood.garbage_sent,
                self.flood.garbage_answered
            );
        }
        if let Some(first) = &self.first_failure {
            let _ = writeln!(t, "  device failures {}: {first}", self.device_failures);
        }
        if self.broker_fanout_ms.count > 0 {
            let _ = writeln!(
                t,
                "  broker's own fan-out of one {}-byte message to {} devices: p50 {} p99 {} \
                 max {}",
                self.broker_fanout_bytes.unwrap_or(0),
                self.broker_fanout_ms.count,
                ms(self.broker_fanout_ms.p50),
                ms(self.broker_fanout_ms.p99),
                ms(self.broker_fanout_ms.max)
            );
        }
        if self.hub_ran_throughout == Some(false) {
            let _ = writeln!(
                t,
                "  the hub did not run throughout (killed, or not running at the end)"
            );
        }
        let mb = |v: Option<f64>| v.map_or_else(|| "-".into(), |mb| format!("{mb:.1} MB"));
        let cpu = |s: Option<f64>, cores: Option<f64>| match (s, cores) {
            (Some(s), Some(c)) => format!("{s:.1} s ({c:.2} cores)"),
            (Some(s), None) => format!("{s:.1} s"),
            _ => "-".into(),
        };
        let _ = writeln!(
            t,
            "  CPU (user + sys) during the run: hub {}, broker {}, simulator {}; peak RSS: hub \
             {}, broker {}, simulator {}",
            cpu(self.hub_cpu_s, self.hub_cpu_cores),
            cpu(self.broker_cpu_s, self.broker_cpu_cores),
            cpu(self.sim_cpu_s, self.sim_cpu_cores),
            mb(self.hub_rss_mb),
            mb(self.broker_rss_mb),
            mb(self.sim_rss_mb)
        );
        let _ = write!(
            t,
            "  {} broker {}; hub CLI {} (found {}); open files {}",
            if self.external { "running" } else { "own" },
            self.broker,
            self.hub_bin.path.display(),
            self.hub_bin.how,
            self.open_files
                .map_or_else(|| "unlimited".into(), |n| n.to_string())
        );
        t
    }
}

/// The broker and hub a run uses.
enum Services {
    /// Started by the run, stopped at its end.
    Own { hub: Box<Hub>, broker: Box<Broker> },
    /// Running already; measured if their pids were given.
    External {
        hub_pid: Option<u32>,
        broker_pid: Option<u32>,
    },
}

/// The broker, hub and fleet a run set up.
struct Setup {
    services: Services,
    /// How devices reach the broker (the client id set per device).
    mqtt: MqttConfig,
    /// The audience of device tokens.
    audience: String,
    /// The device tokens' lifetime, s.
    lifetime_s: u64,
    anchor: PublicKey,
    codes: Vec<(String, String)>,
    /// In `malicious`: the attacker's enrollment code.
    mallory_code: Option<String>,
    /// In `malicious`: the private key (scalar) of the app registered as [`APP`].
    app_key: Option<[u8; 32]>,
    /// In `revoke`: the devices revoked with one `revoke --group`, then those revoked one
    /// by one.
    by_group: Vec<String>,
    one_by_one: Vec<String>,
    hub_bin: Located,
    // Declared last, so dropped last (on an early return too): the processes' files live
    // in it.
    dir: tempfile::TempDir,
}

/// When the simulator's own subscriber saw the operator's requests and the hub's answers
/// to them (Unix ms, in order).
#[derive(Debug, Default)]
struct OperatorSeen {
    requests: Vec<u64>,
    answers: Vec<u64>,
}

/// One device revoked by one command, with the times it is measured from.
#[derive(Debug, Clone)]
struct RevokedBy {
    id: String,
    /// The operator's request seen on the broker.
    requested_at: Option<u64>,
    /// The hub's answer seen on the broker.
    answered_at: Option<u64>,
}

impl Setup {
    fn start(options: &Options) -> Result<Self, Error> {
        let hub_bin = locate_hub(options.hub_bin.clone())?;
        let dir = tempfile::Builder::new()
            .prefix("firmware-sim-")
            .tempdir()
            .map_err(Error::file(std::env::temp_dir()))?;
        if let Some(external) = &options.external {
            return Self::use_running(options, external, hub_bin, dir);
        }
        let lifetime_s = options.lifetime.unwrap_or(DEFAULT_LIFETIME).as_secs();
        let mosquitto = locate_mosquitto(options.mosquitto.clone())?;
        let broker = Broker::start(&mosquitto.path, dir.path())?;
        let mut hub = Hub::init(&hub_bin.path, dir.path(), lifetime_s)?;
        let mut ids = fleet_ids("sim-", options.devices);
        let (by_group, one_by_one) = if options.scenario == Scenario::Revoke {
            revoke_split(&ids, options.revoke_share, options.revoke_by)
        } else {
            (Vec::new(), Vec::new())
        };
        if options.scenario == Scenario::Malicious {
            ids.push(MALLORY.to_string());
        }
        let mut codes = hub.import(&ids, |id| by_group.iter().any(|g| g == id))?;
        let mallory_code = codes
            .iter()
            .position(|(id, _)| id == MALLORY)
            .map(|i| codes.remove(i).1);
        if options.scenario == Scenario::Revoke {
            hub.add_operator()?;
        }
        let app_key = if options.scenario == Scenario::Malicious {
            let scalar = device::generate_key()?;
            hub.add_app(APP, APP_ROLE, &public_pem(&scalar)?)?;
            // Presentations pass only with fresh revocation knowledge: heartbeats every
            // 2 s, so a short run has it (the default, 30 s, is longer than the run).
            hub.set_heartbeat(2)?;
            Some(scalar)
        } else {
            None
        };
        let anchor = hub.trust_anchor()?;
        hub.serve(&broker)?;
        Ok(Self {
            mqtt: MqttConfig::plain(&LOOPBACK.to_string(), broker.port(), "firmware-sim"),
            services: Services::Own {
                hub: Box::new(hub),
                broker: Box::new(broker),
            },
            audience: DEVICE_AUDIENCE.to_string(),
            lifetime_s,
            anchor,
            codes,
            mallory_code,
            app_key,
            by_group,
            one_by_one,
            hub_bin,
            dir,
        })
    }

    /// Uses the running broker and hub `external` names: reads the hub's config and
    /// policy, registers the fleet with one `device import` on its database under ids of
    /// this run's own (see [`crate::external`]).
    fn use_running(
        options: &Options,
        external: &External,
        hub_bin: Located,
        dir: tempfile::TempDir,
    ) -> Result<Self, Error> {
        let hub = ExternalHub::open(&hub_bin.path, external)?;
        if let Some(given) = options.lifetime
            && given.as_secs() != hub.lifetime_s
        {
            return Err(Error::Process(format!(
                "--lifetime {} s: the running hub's policy gives role `{}` {} s tokens, and \
                 firmware-sim cannot change a running hub's policy: drop --lifetime or give \
                 {} s",
                given.as_secs(),
                external.device_role,
                hub.lifetime_s,
                hub.lifetime_s
            )));
        }
        let anchor = hub.trust_anchor()?;
        let run = device::random32()?;
        let prefix = format!("sim-{:02x}{:02x}{:02x}-", run[0], run[1], run[2]);
        let ids = fleet_ids(&prefix, options.devices);
        let codes = hub.import(&ids, dir.path())?;
        Ok(Self {
            services: Services::External {
                hub_pid: external.hub_pid,
                broker_pid: external.broker_pid,
            },
            mqtt: hub.mqtt.clone(),
            audience: hub.audience.clone(),
            lifetime_s: hub.lifetime_s,
            anchor,
            codes,
            mallory_code: None,
            app_key: None,
            by_group: Vec::new(),
            one_by_one: Vec::new(),
            hub_bin,
            dir,
        })
    }

    /// The serving hub's pid, if known.
    fn hub_pid(&self) -> Option<u32> {
        match &self.services {
            Services::Own { hub, .. } => hub.pid(),
            Services::External { hub_pid, .. } => *hub_pid,
        }
    }

    /// The broker's pid, if known.
    fn broker_pid(&self) -> Option<u32> {
        match &self.services {
            Services::Own { broker, .. } => Some(broker.pid()),
            Services::External { broker_pid, .. } => *broker_pid,
        }
    }

    /// Whether the hub runs; `None` when that cannot be known.
    fn hub_running(&mut self) -> Option<bool> {
        match &mut self.services {
            Services::Own { hub, .. } => Some(hub.is_running()),
            Services::External { hub_pid, .. } => hub_pid.map(usage::is_alive),
        }
    }

    /// The broker as a URL, for the summary.
    fn broker_url(&self) -> String {
        let scheme = if self.mqtt.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        };
        let host = if self.mqtt.host.contains(':') {
            format!("[{}]", self.mqtt.host)
        } else {
            self.mqtt.host.clone()
        };
        format!("{scheme}://{host}:{}", self.mqtt.port)
    }

    /// The scenario's event. `hub-crash`, `broker-restart`: takes the hub (or the broker)
    /// away for `outage`, then brings it back and returns once the hub serves again.
    /// `revoke`: revokes the group, then each device of the rest, and returns, for each
    /// device, when the request of the command naming it and the hub's answer to it were
    /// seen on the broker. Blocks.
    fn inject(
        &mut self,
        scenario: Scenario,
        outage: Duration,
        seen: &Mutex<OperatorSeen>,
    ) -> FaultDone {
        // A running hub and broker are never touched (the options were refused).
        let Services::Own { hub, broker } = &mut self.services else {
            return Ok(Vec::new());
        };
        match scenario {
            Scenario::HubCrash => {
                hub.kill();
                std::thread::sleep(outage);
                hub.serve(broker).map(|()| Vec::new())
            }
            Scenario::BrokerRestart => {
                broker.stop();
                std::thread::sleep(outage);
                broker.restart()?;
                hub.await_resubscribed(broker).map(|()| Vec::new())
            }
            Scenario::Revoke => {
                broker.await_subscription(WATCHER, OPERATOR)?;
                let mut revoked = Vec::new();
                let mut command = |what: &[&str], ids: &[String]| -> Result<(), Error> {
                    let before = seen.lock().map(|s| s.requests.len()).unwrap_or(0);
                    hub.revoke(broker, what)?;
                    let (requested_at, answered_at) = await_seen(seen, before);
                    revoked.extend(ids.iter().map(|id| RevokedBy {
                        id: id.clone(),
                        requested_at,
                        answered_at,
                    }));
                    Ok(())
                };
                if !self.by_group.is_empty() {
                    command(&["--group", REVOKE_GROUP], &self.by_group)?;
                }
                for id in &self.one_by_one {
                    command(&["--device", id], std::slice::from_ref(id))?;
                }
                Ok(revoked)
            }
            Scenario::Steady
            | Scenario::Storm
            | Scenario::ClockSkew
            | Scenario::PowerLoss
            | Scenario::Malicious => Ok(Vec::new()),
        }
    }

    /// Stops the hub, then the broker, if the run started them; removes the directory.
    /// Says whether the hub was still running (`None`: not known).
    fn stop(mut self) -> Option<bool> {
        let running = self.hub_running();
        if let Services::Own { hub, broker } = &mut self.services {
            hub.stop();
            broker.stop();
        }
        drop(self.dir);
        running
    }
}

/// `n` device ids: `prefix` and a number of at least four digits, from 1.
fn fleet_ids(prefix: &str, n: usize) -> Vec<String> {
    let width = n.to_string().len().max(4);
    (1..=n).map(|i| format!("{prefix}{i:0width$}")).collect()
}

/// The client id of the simulator's own subscriber to the operator's topics.
const WATCHER: &str = "sim-watcher";

/// The times of the request and the answer after the first `before` requests, once the
/// subscriber has seen both (bounded: the command has returned, so both went through the
/// broker; the subscriber may only lag a little).
fn await_seen(seen: &Mutex<OperatorSeen>, before: usize) -> (Option<u64>, Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (request, answer) = seen.lock().map_or((None, None), |s| {
            (
                s.requests.get(before).copied(),
                s.answers.get(before).copied(),
            )
        });
        if (request.is_some() && answer.is_some()) || Instant::now() >= deadline {
            return (request, answer);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Subscribes to the operator's request and response topics and notes when each message
/// passes, until `stop`.
async fn watch_operator(
    mqtt: MqttConfig,
    seen: Arc<Mutex<OperatorSeen>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let request = format!("tessera/v1/client/{OPERATOR}/req");
    let response = format!("tessera/v1/client/{OPERATOR}/resp");
    let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
    let (client, mut notices) = tessera_mqtt::connect(&mqtt, 64, mqtt_stop_rx)?;
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            notice = notices.recv() => match notice {
                Some(Notice::Connected) => {
                    for t in [&request, &response] {
                        let _ = client.subscribe(t.clone(), QoS::AtLeastOnce).await;
                    }
                }
                Some(Notice::Message(Incoming { topic, .. })) => {
                    let at = device::now_ms();
                    if let Ok(mut s) = seen.lock() {
                        if topic == request {
                            s.requests.push(at);
                        } else if topic == response {
                            s.answers.push(at);
                        }
                    }
                }
                Some(Notice::Disconnected(_)) => {}
                None => break,
            }
        }
    }
    let _ = client.disconnect().await;
    let _ = mqtt_stop.send(true);
    Ok(())
}

/// The machine's settings for token lifetime `lifetime_ms`: requests time out after an
/// eighth of it (within the machine's bounds) and retries back off to at most a quarter,
/// so a lost request is retried well before the token the refresh replaces expires (the
/// refresh starts at 50 to 75 % of its life). The defaults (10 s, 60 s) suit 15-minute
/// tokens, not 6-second ones.
fn agent_config(
    id: &str,
    audience: &str,
    code: &str,
    lifetime_ms: u64,
) -> Result<AgentConfig, Error> {
    let mut config = AgentConfig::new(id, audience).map_err(Error::Core)?;
    config.request_timeout_ms =
        (lifetime_ms / 8).clamp(MIN_REQUEST_TIMEOUT_MS, DEFAULT_REQUEST_TIMEOUT_MS);
    let base = Backoff::default();
    config.backoff = Backoff {
        base_ms: base.base_ms,
        cap_ms: (lifetime_ms / 4).clamp(base.base_ms, base.cap_ms),
    };
    config.enrollment_code_key = Some(EnrollmentCode::derive_key(code));
    Ok(config)
}

/// `share` of `n` rounded to a whole number.
fn share_of(n: usize, share: f64) -> usize {
    // Rounded to a whole device; the share is checked to be within 0..=1.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let k = ((n as f64) * share).round() as usize;
    k.min(n)
}

/// The devices `revoke` revokes: `share` of `ids` (rounded, the last ones); by
/// [`RevokeBy::Mixed`] the first half of them (rounded up) as a group, the rest one by
/// one; by [`RevokeBy::Group`] all as a group.
fn revoke_split(ids: &[String], share: f64, by: RevokeBy) -> (Vec<String>, Vec<String>) {
    let n = share_of(ids.len(), share);
    let revoked = &ids[ids.len() - n..];
    let grouped = match by {
        RevokeBy::Mixed => revoked.len().div_ceil(2),
        RevokeBy::Group => revoked.len(),
    };
    let (group, single) = revoked.split_at(grouped);
    (group.to_vec(), single.to_vec())
}

/// Whether device `i` of `n` distrusts its clock, when `untrusted` of them do: spread
/// evenly over the fleet (and so over its boot ramp).
fn distrusts_clock(i: usize, n: usize, untrusted: usize) -> bool {
    // The i-th device is untrusted when the running count of untrusted devices steps up.
    (i + 1) * untrusted / n.max(1) > i * untrusted / n.max(1)
}

/// How long after the hub serves again a device may still be without an answer through no
/// fault of the hub's: one request timeout (a request sent into the outage is given up),
/// one backoff cap (the wait before the next try), and one more request timeout (the time
/// the retry itself is allowed). Lapses in that window are the outage's, not the hub's.
pub fn retry_window(lifetime_ms: u64) -> Duration {
    let config = agent_config("sim-0", DEVICE_AUDIENCE, "AAAA-AAAA", lifetime_ms);
    config.map_or(Duration::ZERO, |c| {
        Duration::from_millis(
            c.request_timeout_ms
                .saturating_mul(2)
                .saturating_add(c.backoff.cap_ms),
        )
    })
}

fn progress_line(live: &Live, devices: usize, elapsed: Duration) -> String {
    format!(
        "\r{:>5.0} s  connected {}/{devices}  holding {}  refreshing {}  tokens {}  lapses {}  \
         revoked {}  power cuts {}   ",
        elapsed.as_secs_f64(),
        live.connected.load(Ordering::Relaxed),
        live.holding.load(Ordering::Relaxed),
        live.refreshing.load(Ordering::Relaxed),
        live.tokens.load(Ordering::Relaxed),
        live.lapses.load(Ordering::Relaxed),
        live.revoked.load(Ordering::Relaxed),
        live.power_cuts.load(Ordering::Relaxed),
    )
}

/// The SPKI PEM public key of the P-256 private key `scalar`.
fn public_pem(scalar: &[u8; 32]) -> Result<String, Error> {
    use p256::pkcs8::EncodePublicKey as _;
    let secret =
        p256::SecretKey::from_slice(scalar).map_err(|e| Error::Process(format!("app key: {e}")))?;
    secret
        .public_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| Error::Process(format!("app key: {e}")))
}

/// Runs the fleet as `options` say; see the module docs.
pub async fn run(options: Options) -> Result<Summary, Error> {
    if options.devices == 0 {
        return Err(Error::Process("--devices must be at least 1".into()));
    }
    if options.lifetime.is_some_and(|l| l.subsec_nanos() != 0) {
        return Err(Error::Process(
            "--lifetime must be whole seconds (the policy's token_lifetime_s)".into(),
        ));
    }
    if options.external.is_some()
        && let Some(why) = options.scenario.external_refusal()
    {
        return Err(Error::Process(format!(
            "--scenario {} cannot run against a running broker and hub (--hub-config): it \
             {why}. Run it without --hub-config (firmware-sim starts its own)",
            options.scenario.name()
        )));
    }
    for (name, share) in [
        ("--revoke-share", options.revoke_share),
        ("--untrusted-clock-share", options.untrusted_share()),
        ("--power-cut-rate", options.power_cut_rate),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::Process(format!("{name} must be between 0 and 1")));
        }
    }
    // Before anything starts: the broker and hub the run starts inherit the limit.
    let open_files = usage::raise_open_files(options.devices)?;
    let setup = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || Setup::start(&options))
            .await
            .map_err(|e| Error::Process(format!("setup task: {e}")))??
    };
    let lifetime_s = setup.lifetime_s;
    let lifetime_ms = lifetime_s.saturating_mul(1000);

    let live = Arc::new(Live::default());
    live.hub_reachable.store(true, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mqtt = |id: &str| {
        let mut config = setup.mqtt.clone();
        config.client_id = id.to_string();
        config
    };
    let mut fleet = JoinSet::new();
    let ramp = boot_ramp(
        options.scenario,
        Duration::from_secs(lifetime_s),
        options.devices,
    );
    let probe = (options.scenario == Scenario::Revoke).then(|| PROBE_TOPIC.to_string());
    let count = u32::try_from(options.devices).unwrap_or(u32::MAX);
    let untrusted = share_of(options.devices, options.untrusted_share());
    let power_cut_rate = if options.scenario == Scenario::PowerLoss {
        options.power_cut_rate
    } else {
        0.0
    };
    let book = (options.scenario == Scenario::Malicious).then(|| Arc::new(AttackBook::default()));
    let mut dice = Dice::new(u64::from_be_bytes(
        device::random32()?[..8].try_into().unwrap_or([1; 8]),
    ));
    let mut specs = Vec::with_capacity(options.devices);
    let mut links = BTreeMap::new();
    for (i, (id, code)) in setup.codes.iter().enumerate() {
        // The victims' local links, for the attacker's presentations.
        let presentations = (book.is_some() && i < VICTIMS).then(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            links.insert(id.clone(), tx);
            rx
        });
        let mut config = agent_config(id, &setup.audience, code, lifetime_ms)?;
        let distrusts = distrusts_clock(i, options.devices, untrusted);
        config.trust_local_clock = !distrusts;
        let clock = match (options.scenario, distrusts) {
            (Scenario::ClockSkew, true) => DeviceClock::wrong(&mut dice),
            (Scenario::ClockSkew, false) => DeviceClock::disciplined(&mut dice),
            _ => DeviceClock::exact(),
        };
        specs.push(Spec {
            config,
            anchor: setup.anchor,
            mqtt: mqtt(id),
            key: device::generate_key()?,
            device_secret: device::random32()?,
            clock,
            power_cut_rate,
            attacks: book.clone(),
            presentations,
            probe: probe.clone(),
        });
    }
    let mut meters = Meters::default();
    meters.start(setup.hub_pid(), setup.broker_pid());
    let started = Instant::now();
    let started_ms = device::now_ms();
    for (i, spec) in (0u32..).zip(specs) {
        let delay = ramp * i / count;
        let live = live.clone();
        let stop = stop_rx.clone();
        fleet.spawn(async move {
            tokio::time::sleep(delay).await;
            device::run(spec, live, stop).await
        });
    }
    // The attacker, from a third of the way in.
    let attacker = match (&book, &setup.mallory_code, setup.app_key) {
        (Some(book), Some(code), Some(app_key)) => {
            let begin = options.duration / 3;
            Some(tokio::spawn(attack::run(
                Attacker {
                    code: code.clone(),
                    anchor: setup.anchor,
                    mqtt: mqtt(MALLORY),
                    victims: setup
                        .codes
                        .iter()
                        .take(VICTIMS)
                        .map(|(id, _)| id.clone())
                        .collect(),
                    begin_at_ms: started_ms + u64::try_from(begin.as_millis()).unwrap_or(u64::MAX),
                    app_key,
                    links,
                },
                book.clone(),
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    // Who watches the operator's exchange with the hub, for the fan-out's start.
    let operator_seen = Arc::new(Mutex::new(OperatorSeen::default()));
    let watcher = (options.scenario == Scenario::Revoke).then(|| {
        tokio::spawn(watch_operator(
            mqtt(WATCHER),
            operator_seen.clone(),
            stop_rx.clone(),
        ))
    });

    let mut interrupted = false;
    let end = tokio::time::Instant::now() + options.duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The event, a third of the way in: the setup moves into a blocking task for it and
    // comes back when it is over (the hub serves again, the revocations are done).
    let mut fault_at = options
        .scenario
        .has_event()
        .then(|| tokio::time::Instant::now() + options.duration / 3);
    // `revoke` waits for the whole fleet to hold a token (a large fleet may still be
    // enrolling a third of the way in), but not past two thirds of the run.
    let latest_revoke = tokio::time::Instant::now() + options.duration * 2 / 3;
    let mut fault: Option<tokio::task::JoinHandle<(Setup, FaultDone)>> = None;
    let mut revoked_by = Vec::new();
    let mut hub_pid = setup.hub_pid();
    let mut broker_pid = setup.broker_pid();
    let prober_mqtt = mqtt(PROBER);
    let mut setup = Some(setup);
    let mut prober: Option<tokio::task::JoinHandle<Result<u64, Error>>> = None;
    let mut outage_started = None;
    let mut outage_ms = None;
    let mut lapses_not_counted_ms = None;
    let mut counted_again_at: Option<tokio::time::Instant> = None;
    let far = end + Duration::from_secs(3600);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
            () = tokio::time::sleep_until(fault_at.unwrap_or(far)), if fault_at.is_some() => {
                let holding = usize::try_from(live.holding.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
                if options.scenario == Scenario::Revoke
                    && holding < options.devices
                    && tokio::time::Instant::now() < latest_revoke
                {
                    fault_at = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                    continue;
                }
                fault_at = None;
                meters.sample(hub_pid, broker_pid);
                if options.scenario.has_outage() {
                    live.hub_reachable.store(false, Ordering::Relaxed);
                    outage_started = Some(Instant::now());
                }
                if let Some(mut s) = setup.take() {
                    let (scenario, outage) = (options.scenario, options.outage);
                    let seen = operator_seen.clone();
                    fault = Some(tokio::task::spawn_blocking(move || {
                        let done = s.inject(scenario, outage, &seen);
                        (s, done)
                    }));
                }
            }
            joined = async { fault.as_mut().expect("guarded").await }, if fault.is_some() => {
                fault = None;
                let (s, done) =
                    joined.map_err(|e| Error::Process(format!("fault task: {e}")))?;
                hub_pid = s.hub_pid();
                broker_pid = s.broker_pid();
                setup = Some(s);
                revoked_by = done?;
                if probe.is_some() {
                    prober = Some(tokio::spawn(probe_broker(
                        prober_mqtt.clone(),
                        live.clone(),
                        u64::try_from(revoked_by.len()).unwrap_or(u64::MAX),
                        stop_rx.clone(),
                    )));
                }
                if options.scenario.has_outage() {
                    outage_ms = outage_started.map(|t: Instant| elapsed_ms(t));
                    counted_again_at =
                        Some(tokio::time::Instant::now() + retry_window(lifetime_ms));
                }
            }
            () = tokio::time::sleep_until(counted_again_at.unwrap_or(far)), if counted_again_at.is_some() => {
                counted_again_at = None;
                lapses_not_counted_ms = outage_started.map(|t: Instant| elapsed_ms(t));
                live.hub_reachable.store(true, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                // A hub that died takes the blame for the lapses that follow, not the
                // devices (try_wait: does not block).
                if let Some(s) = setup.as_mut() && s.hub_running() == Some(false) {
                    live.hub_reachable.store(false, Ordering::Relaxed);
                    counted_again_at = None;
                }
                meters.sample(hub_pid, broker_pid);
                if options.progress {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(progress_line(&live, options.devices, started.elapsed()).as_bytes());
                    let _ = out.flush();
                }
            }
        }
    }
    if let Some(task) = fault {
        // The run ended during the fault: wait for it (bounded by the start timeouts), so
        // the processes are stopped in order.
        let (s, _) = task
            .await
            .map_err(|e| Error::Process(format!("fault task: {e}")))?;
        hub_pid = s.hub_pid();
        broker_pid = s.broker_pid();
        setup = Some(s);
    }
    // The broker's own fan-out, if it ran to the end within the run.
    let mut probe_bytes = None;
    if let Some(task) = prober {
        if task.is_finished() {
            match task.await {
                Ok(Ok(bytes)) => probe_bytes = Some(bytes),
                Ok(Err(e)) => eprintln!("firmware-sim: the broker's own fan-out: {e}"),
                Err(e) => eprintln!("firmware-sim: the broker's own fan-out task: {e}"),
            }
        } else {
            task.abort();
            eprintln!(
                "firmware-sim: the run ended before the broker's own fan-out was measured \
                 (give it a longer --duration)"
            );
        }
    }
    if lapses_not_counted_ms.is_none() {
        lapses_not_counted_ms = outage_started.map(|t: Instant| elapsed_ms(t));
    }
    let setup = setup.expect("the fault task hands the setup back");
    let duration_s = started.elapsed().as_secs_f64();
    if options.progress {
        println!(
            "{}",
            progress_line(&live, options.devices, started.elapsed())
        );
    }

    let _ = stop_tx.send(true);
    let mut outcomes = Vec::with_capacity(options.devices);
    let mut failures = Vec::new();
    let gathered = tokio::time::timeout(STOP_TIMEOUT, async {
        while let Some(joined) = fleet.join_next().await {
            match joined {
                Ok(Ok(outcome)) => outcomes.push(outcome),
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("device task: {e}")),
            }
        }
    })
    .await;
    if gathered.is_err() {
        failures.push(format!(
            "{} devices did not stop within {STOP_TIMEOUT:?}",
            fleet.len()
        ));
        fleet.abort_all();
    }
    for (what, task) in [("attacker", attacker), ("operator watcher", watcher)] {
        if let Some(task) = task {
            match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failures.push(format!("{what}: {e}")),
                Ok(Err(e)) => failures.push(format!("{what} task: {e}")),
                Err(_) => failures.push(format!("the {what} did not stop")),
            }
        }
    }
    live.hub_reachable.store(false, Ordering::Relaxed);
    meters.sample(hub_pid, broker_pid);
    let metered_s = meters.since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let hub_bin = setup.hub_bin.clone();
    let external = matches!(setup.services, Services::External { .. });
    let broker = setup.broker_url();
    let hub_running_at_end = tokio::task::spawn_blocking(move || setup.stop())
        .await
        .unwrap_or(Some(false));
    let hub_killed = options.scenario == Scenario::HubCrash && outage_started.is_some();

    let mut summary = summarize(
        &options,
        lifetime_s,
        duration_s,
        started_ms,
        &outcomes,
        failures,
        hub_running_at_end.map(|running| running && !hub_killed),
        interrupted,
        hub_bin,
    );
    summary.outage_ms = outage_ms;
    summary.lapses_not_counted_ms = lapses_not_counted_ms;
    summary.hub_rss_mb = meters.hub.rss_mb();
    summary.hub_cpu_s = meters.hub.cpu_s();
    summary.hub_cpu_cores = meters.hub.cores(metered_s);
    summary.broker_cpu_s = meters.broker.cpu_s();
    summary.broker_cpu_cores = meters.broker.cores(metered_s);
    summary.broker_rss_mb = meters.broker.rss_mb();
    summary.sim_cpu_s = meters.sim.cpu_s();
    summary.sim_cpu_cores = meters.sim.cores(metered_s);
    summary.sim_rss_mb = meters.sim.rss_mb();
    summary.external = external;
    summary.broker = broker;
    summary.open_files = open_files.soft;
    if let Some(bytes) = probe_bytes {
        summary.broker_fanout_bytes = Some(bytes);
        summary.broker_fanout_ms = median_round(&outcomes);
    }
    summary.peak_refreshing = live.peak_refreshing.load(Ordering::Relaxed);
    summary.add_revocations(&revoked_by, &outcomes);
    if let Some(book) = book {
        summary.attacks = book.verdicts();
        summary.flood = book.flood();
        summary.legit_presentations = book.legit_presentations();
    }
    Ok(summary)
}

/// What the scenario's event task hands back with the setup.
type FaultDone = Result<Vec<RevokedBy>, Error>;

/// The CPU and memory of the hub, the broker and the simulator during the run.
#[derive(Debug, Default)]
struct Meters {
    hub: Meter,
    broker: Meter,
    sim: Meter,
    /// When the run's measuring started: CPU time is averaged over the time since.
    since: Option<Instant>,
}

impl Meters {
    fn start(&mut self, hub: Option<u32>, broker: Option<u32>) {
        self.hub.start(hub);
        self.broker.start(broker);
        self.sim.start(Some(std::process::id()));
        self.since = Some(Instant::now());
    }

    fn sample(&mut self, hub: Option<u32>, broker: Option<u32>) {
        self.hub.sample(hub);
        self.broker.sample(broker);
        self.sim.sample(Some(std::process::id()));
    }
}

/// The client id of the simulator's publisher of the broker's own fan-out.
const PROBER: &str = "sim-prober";

/// The broker's own fan-out, the limit `revoke`'s is compared with. Once the `revoked`
/// devices have applied their revocation (or after 30 s), and a second more for the last
/// control messages to drain, publishes [`PROBE_ROUNDS`] unsigned messages on
/// [`PROBE_TOPIC`], two seconds apart, each of the size of the largest control message a
/// device was revoked by: its send time (Unix ms, 8 bytes big-endian), its round, zeros.
/// Returns that size.
async fn probe_broker(
    mqtt: MqttConfig,
    live: Arc<Live>,
    revoked: u64,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.revoked.load(Ordering::Relaxed) < revoked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A control message is about 107 bytes; that, if no device saw one.
    let bytes = match live.control_bytes.load(Ordering::Relaxed) {
        0 => 107,
        n => n.max(16),
    };
    let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
    let (client, mut notices) = tessera_mqtt::connect(&mqtt, 16, mqtt_stop_rx)?;
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(notices.recv().await, Some(Notice::Connected) | None) {}
    })
    .await;
    let result = async {
        if connected.is_err() {
            return Err(Error::Process(
                "the prober did not connect to the broker within 10 s".into(),
            ));
        }
        for round in 0..PROBE_ROUNDS {
            let mut payload = vec![0u8; usize::try_from(bytes).unwrap_or(107)];
            payload[..8].copy_from_slice(&device::now_ms().to_be_bytes());
            payload[8] = round;
            client
                .publish(PROBE_TOPIC, QoS::AtLeastOnce, false, payload)
                .await?;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.changed() => break,
            }
        }
        Ok(bytes)
    }
    .await;
    let _ = client.disconnect().await;
    let _ = mqtt_stop.send(true);
    result
}

/// Of the broker's fan-out rounds, the one with the median p99 (of those that reached
/// the most devices): one value per device.
fn median_round(outcomes: &[Outcome]) -> Percentiles {
    let mut rounds: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
    for o in outcomes {
        for (round, ms) in &o.probe_ms {
            rounds.entry(*round).or_default().push(*ms);
        }
    }
    let most = rounds.values().map(Vec::len).max().unwrap_or(0);
    let mut full: Vec<Percentiles> = rounds
        .into_values()
        .filter(|v| v.len() == most)
        .map(Percentiles::of)
        .collect();
    full.sort_by_key(|p| p.p99);
    full.get(full.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// When devices boot: all at once in `storm`; otherwise spread evenly over half a
/// lifetime (at most 5 s), or longer for a fleet too large to boot at [`BOOTS_PER_S`]
/// within that.
fn boot_ramp(scenario: Scenario, lifetime: Duration, devices: usize) -> Duration {
    if scenario == Scenario::Storm {
        return Duration::ZERO;
    }
    let short = (lifetime / 2).min(Duration::from_secs(5));
    let paced = Duration::from_secs(1) * u32::try_from(devices).unwrap_or(u32::MAX) / BOOTS_PER_S;
    short.max(paced)
}

impl Summary {
    /// The `revoke` figures: `revoked` holds, for each device revoked, when the operator's
    /// request and the hub's answer were seen on the broker.
    fn add_revocations(&mut self, revoked: &[RevokedBy], outcomes: &[Outcome]) {
        let by_id: BTreeMap<&str, &RevokedBy> =
            revoked.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut fanout = Vec::new();
        for o in outcomes {
            match (by_id.get(o.id.as_str()), o.revoked_at_ms) {
                (Some(r), Some(applied)) => {
                    self.revoked_wiped += 1;
                    if o.flash_empty_at_end {
                        self.revoked_flash_empty += 1;
                    }
                    if r.answered_at.is_some_and(|at| applied < at) {
                        self.revoked_before_answer += 1;
                    }
                    if let Some(at) = r.requested_at {
                        fanout.push(applied.saturating_sub(at));
                    }
                }
                (None, Some(_)) => self.revoked_unexpectedly += 1,
                _ => {}
            }
        }
        // One figure per command: the devices of one command share its times.
        let mut acks: BTreeMap<u64, u64> = BTreeMap::new();
        for r in revoked {
            if let (Some(req), Some(ans)) = (r.requested_at, r.answered_at) {
                acks.insert(req, ans.saturating_sub(req));
            }
        }
        self.revoked = revoked.len();
        self.revocation_fanout_ms = Percentiles::of(fanout);
        self.revocation_ack_ms = Percentiles::of(acks.into_values().collect());
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[allow(clippy::too_many_arguments)] // one call site, each argument named there
fn summarize(
    options: &Options,
    lifetime_s: u64,
    duration_s: f64,
    started_ms: u64,
    outcomes: &[Outcome],
    failures: Vec<String>,
    hub_ran_throughout: Option<bool>,
    interrupted: bool,
    hub_bin: Located,
) -> Summary {
    let mut errors = BTreeMap::new();
    for o in outcomes {
        for (code, n) in &o.errors {
            *errors.entry(*code).or_default() += n;
        }
    }
    // A device that failed counts as one that received nothing.
    let complete = outcomes.len() == options.devices;
    let min_tokens_per_device = if complete {
        outcomes.iter().map(|o| o.tokens).min().unwrap_or(0)
    } else {
        0
    };
    let never_held = options.devices - outcomes.iter().filter(|o| o.tokens > 0).count();
    let all_holding_ms = (complete && never_held == 0)
        .then(|| {
            outcomes
                .iter()
                .filter_map(|o| o.first_token_at_ms)
                .max()
                .map(|at| at.saturating_sub(started_ms))
        })
        .flatten();
    let max_error = |trusted: bool| {
        outcomes
            .iter()
            .filter(|o| o.trusts_clock == trusted)
            .map(|o| o.clock_error_ms)
            .max()
            .unwrap_or(0)
    };
    let never_held_of = |trusted: bool| {
        outcomes
            .iter()
            .filter(|o| o.trusts_clock == trusted && o.tokens == 0)
            .count()
    };
    Summary {
        scenario: options.scenario,
        devices: options.devices,
        lifetime_s,
        duration_s: (duration_s * 10.0).round() / 10.0,
        tokens_issued: outcomes.iter().map(|o| o.tokens).sum(),
        lapses: outcomes.iter().map(|o| o.lapses).sum(),
        lapse_ms: outcomes.iter().map(|o| o.lapse_ms).sum(),
        never_held,
        holding_at_end: outcomes.iter().filter(|o| o.holding_at_end).count(),
        min_tokens_per_device,
        refresh_latency_ms: Percentiles::of(
            outcomes
                .iter()
                .flat_map(|o| o.refresh_latencies_ms.iter().copied())
                .collect(),
        ),
        first_token_ms: Percentiles::of(outcomes.iter().filter_map(|o| o.first_token_ms).collect()),
        all_holding_ms,
        peak_refreshing: 0,
        errors,
        device_failures: failures.len(),
        devices_retried: outcomes.iter().filter(|o| o.retried).count(),
        outage_ms: None,
        lapses_not_counted_ms: None,
        revoked: 0,
        revoked_wiped: 0,
        revoked_flash_empty: 0,
        revoked_unexpectedly: 0,
        revoked_before_answer: 0,
        revocation_fanout_ms: Percentiles::default(),
        revocation_ack_ms: Percentiles::default(),
        clocks: Clocks {
            untrusted: outcomes.iter().filter(|o| !o.trusts_clock).count(),
            untrusted_max_error_ms: max_error(false),
            trusted_max_error_ms: max_error(true),
            adjustments: outcomes.iter().map(|o| o.clock_adjustments).sum(),
            untrusted_never_held: never_held_of(false),
            trusted_never_held: never_held_of(true),
        },
        power: Power {
            cuts: outcomes.iter().map(|o| o.power_cuts).sum(),
            devices_cut: outcomes.iter().filter(|o| o.power_cuts > 0).count(),
            rebooted_holding: outcomes.iter().map(|o| o.rebooted_holding).sum(),
            recovery_ms: Percentiles::of(
                outcomes
                    .iter()
                    .flat_map(|o| o.reboot_recovery_ms.iter().copied())
                    .collect(),
            ),
            flash_lost: outcomes.iter().map(|o| o.flash_lost).sum(),
            off_at_end: outcomes.iter().filter(|o| o.off_at_end).count(),
        },
        attacks: BTreeMap::new(),
        flood: FloodTally::default(),
        legit_presentations: (0, 0),
        hub_rss_mb: None,
        hub_cpu_s: None,
        hub_cpu_cores: None,
        broker_cpu_s: None,
        broker_cpu_cores: None,
        broker_rss_mb: None,
        sim_cpu_s: None,
        sim_cpu_cores: None,
        sim_rss_mb: None,
        broker_fanout_ms: Percentiles::default(),
        broker_fanout_bytes: None,
        external: false,
        broker: String::new(),
        open_files: None,
        first_failure: failures.into_iter().next(),
        hub_ran_throughout,
        interrupted,
        hub_bin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_absent_without_values() {
        let p = Percentiles::of((1..=100).rev().collect());
        assert_eq!(
            (p.count, p.p50, p.p99, p.max),
            (100, Some(50), Some(99), Some(100))
        );
        let one = Percentiles::of(vec![7]);
        assert_eq!((one.p50, one.p99, one.max), (Some(7), Some(7), Some(7)));
        assert_eq!(Percentiles::of(Vec::new()).p50, None);
    }

    #[test]
    fn a_revoked_share_is_rounded_and_split_half_by_group_half_one_by_one() {
        let ids: Vec<String> = (1..=30).map(|i| format!("sim-{i:04}")).collect();
        let (group, single) = revoke_split(&ids, 0.2, RevokeBy::Mixed);
        assert_eq!(group, ["sim-0025", "sim-0026", "sim-0027"]);
        assert_eq!(single, ["sim-0028", "sim-0029", "sim-0030"]);
        let (group, single) = revoke_split(&ids[..3], 0.2, RevokeBy::Mixed);
        assert_eq!((group.len(), single.len()), (1, 0));
        assert_eq!(
            revoke_split(&ids, 0.0, RevokeBy::Mixed),
            (Vec::new(), Vec::new())
        );
        assert_eq!(revoke_split(&ids, 1.0, RevokeBy::Mixed).0.len(), 15);
        let (group, single) = revoke_split(&ids, 1.0, RevokeBy::Group);
        assert_eq!((group.len(), single.len()), (30, 0));
        assert_eq!(fleet_ids("sim-", 3), ["sim-0001", "sim-0002", "sim-0003"]);
        assert_eq!(fleet_ids("sim-ab12cd-", 10_000)[9_999], "sim-ab12cd-10000");
    }

    #[test]
    fn large_fleets_boot_no_faster_than_the_pace_and_storms_at_once() {
        let minute = Duration::from_secs(60);
        assert_eq!(
            boot_ramp(Scenario::Steady, Duration::from_secs(6), 30),
            Duration::from_secs(3)
        );
        assert_eq!(
            boot_ramp(Scenario::Steady, minute, 2_000),
            Duration::from_secs(5)
        );
        assert_eq!(
            boot_ramp(Scenario::Steady, minute, 10_000),
            Duration::from_secs(20)
        );
        assert_eq!(boot_ramp(Scenario::Storm, minute, 10_000), Duration::ZERO);
    }

    #[test]
    fn the_broker_fanout_reported_is_the_median_round_of_those_that_reached_all() {
        let outcome = |probe_ms: Vec<(u8, u64)>| Outcome {
            probe_ms,
            ..Outcome::default()
        };
        let outcomes = [
            outcome(vec![(0, 5), (1, 50), (2, 9)]),
            outcome(vec![(0, 6), (1, 60), (2, 8)]),
            outcome(vec![(0, 1), (1, 2)]),
        ];
        let p = median_round(&outcomes);
        assert_eq!((p.count, p.max), (3, Some(6)));
        assert_eq!(median_round(&[]), Percentiles::default());
    }

    #[test]
    fn untrusted_clocks_are_the_share_asked_for_spread_over_the_fleet() {
        for (n, k) in [(20, 10), (20, 0), (20, 20), (7, 3), (1, 1)] {
            let picked: Vec<usize> = (0..n).filter(|&i| distrusts_clock(i, n, k)).collect();
            assert_eq!(picked.len(), k, "{n} {k}");
        }
        let half: Vec<usize> = (0..10).filter(|&i| distrusts_clock(i, 10, 5)).collect();
        assert_eq!(half, [1, 3, 5, 7, 9]);
    }

    #[test]
    fn short_lifetimes_get_request_timeouts_and_backoff_well_inside_them() {
        let c = agent_config("sim-0001", DEVICE_AUDIENCE, "ABCD-EFGH", 6_000).expect("valid");
        assert_eq!(c.request_timeout_ms, 750);
        assert_eq!(c.backoff.cap_ms, 1_500);
        let long = agent_config("sim-0001", DEVICE_AUDIENCE, "ABCD-EFGH", 900_000).expect("valid");
        assert_eq!(long.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert_eq!(long.backoff, Backoff::default());
    }
}
