//! A whole run: the broker and hub set up ([`crate::processes`]), the fleet registered and
//! started, the run's duration waited out with an optional progress line, every device
//! stopped and its [`Outcome`] gathered into a [`Summary`], and everything the run started
//! stopped again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_mqtt::MqttConfig;
use tessera_shared::agent::{AgentConfig, DEFAULT_REQUEST_TIMEOUT_MS, MIN_REQUEST_TIMEOUT_MS};
use tessera_shared::crypto::PublicKey;
use tessera_shared::message::EnrollmentCode;
use tessera_shared::schedule::Backoff;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Error;
use crate::device::{self, Live, Outcome, Spec};
use crate::processes::{Broker, Hub, LOOPBACK, Located, locate_hub, locate_mosquitto};

/// The audience of device tokens in the default policy (`device_audience`).
pub const DEVICE_AUDIENCE: &str = "tessera";

/// How long the devices may take to disconnect once told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the fleet goes through. Only `steady` exists so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Devices boot spread over a short ramp (half a lifetime, at most 5 s), enroll and
    /// refresh for the whole run; nothing fails on purpose.
    Steady,
}

impl Scenario {
    /// Its name on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated devices.
    pub devices: usize,
    /// Lifetime of their device tokens (whole seconds), set in the hub's policy.
    pub lifetime: Duration,
    /// How long the fleet runs once the hub serves.
    pub duration: Duration,
    /// What happens meanwhile.
    pub scenario: Scenario,
    /// `tessera-hub`, if not found by [`locate_hub`]'s search.
    pub hub_bin: Option<PathBuf>,
    /// Mosquitto, if not found by [`locate_mosquitto`]'s search.
    pub mosquitto: Option<PathBuf>,
    /// Print a progress line every second (on a terminal).
    pub progress: bool,
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
    /// reachable, after its first token.
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
    /// Refusals and failures by code, summed over the fleet.
    pub errors: BTreeMap<&'static str, u64>,
    /// Devices whose task failed (not a protocol refusal: a local fault), with the first
    /// such error.
    pub device_failures: usize,
    /// The first device failure.
    pub first_failure: Option<String>,
    /// Whether the hub was still running at the end.
    pub hub_ran_throughout: bool,
    /// Whether the run was interrupted (Ctrl-C) before its duration.
    pub interrupted: bool,
    /// The hub binary used, and how it was found.
    pub hub_bin: Located,
}

impl Summary {
    /// The one-line JSON object `--json` prints last.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
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
            "errors": self.errors,
            "device_failures": self.device_failures,
            "hub_ran_throughout": self.hub_ran_throughout,
            "interrupted": self.interrupted,
            "hub_bin": self.hub_bin.path.display().to_string(),
            "hub_bin_found": self.hub_bin.how,
        })
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
            "  tokens issued {} (at least {} per device); holding at the end {}/{}; never held {}",
            self.tokens_issued,
            self.min_tokens_per_device,
            self.holding_at_end,
            self.devices,
            self.never_held
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
        if let Some(first) = &self.first_failure {
            let _ = writeln!(t, "  device failures {}: {first}", self.device_failures);
        }
        if !self.hub_ran_throughout {
            let _ = writeln!(t, "  the hub was not running at the end");
        }
        let _ = write!(
            t,
            "  hub: {} (found {})",
            self.hub_bin.path.display(),
            self.hub_bin.how
        );
        t
    }
}

/// The broker, hub and fleet a run set up.
struct Setup {
    hub: Hub,
    broker: Broker,
    anchor: PublicKey,
    codes: Vec<(String, String)>,
    hub_bin: Located,
    // Declared last, so dropped last (on an early return too): the processes' files live
    // in it.
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(options: &Options, lifetime_s: u64) -> Result<Self, Error> {
        let hub_bin = locate_hub(options.hub_bin.clone())?;
        let mosquitto = locate_mosquitto(options.mosquitto.clone())?;
        let dir = tempfile::Builder::new()
            .prefix("firmware-sim-")
            .tempdir()
            .map_err(Error::file(std::env::temp_dir()))?;
        let broker = Broker::start(&mosquitto.path, dir.path())?;
        let mut hub = Hub::init(&hub_bin.path, dir.path(), lifetime_s)?;
        let width = options.devices.to_string().len().max(4);
        let ids: Vec<String> = (1..=options.devices)
            .map(|i| format!("sim-{i:0width$}"))
            .collect();
        let codes = hub.import(&ids)?;
        let anchor = hub.trust_anchor()?;
        hub.serve(&broker)?;
        Ok(Self {
            hub,
            broker,
            anchor,
            codes,
            hub_bin,
            dir,
        })
    }

    /// Stops the hub, then the broker; removes the directory. Says whether the hub was
    /// still running.
    fn stop(mut self) -> bool {
        let running = self.hub.is_running();
        self.hub.stop();
        self.broker.stop();
        drop(self.dir);
        running
    }
}

/// The machine's settings for token lifetime `lifetime_ms`: requests time out after an
/// eighth of it (within the machine's bounds) and retries back off to at most a quarter,
/// so a lost request is retried well before the token the refresh replaces expires (the
/// refresh starts at 50 to 75 % of its life). The defaults (10 s, 60 s) suit 15-minute
/// tokens, not 6-second ones.
fn agent_config(id: &str, code: &str, lifetime_ms: u64) -> Result<AgentConfig, Error> {
    let mut config = AgentConfig::new(id, DEVICE_AUDIENCE).map_err(Error::Core)?;
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

fn progress_line(live: &Live, devices: usize, elapsed: Duration) -> String {
    format!(
        "\r{:>5.0} s  connected {}/{devices}  holding {}  tokens {}  lapses {}   ",
        elapsed.as_secs_f64(),
        live.connected.load(Ordering::Relaxed),
        live.holding.load(Ordering::Relaxed),
        live.tokens.load(Ordering::Relaxed),
        live.lapses.load(Ordering::Relaxed),
    )
}

/// Runs the fleet as `options` say; see the module docs.
pub async fn run(options: Options) -> Result<Summary, Error> {
    if options.devices == 0 {
        return Err(Error::Process("--devices must be at least 1".into()));
    }
    if options.lifetime.subsec_nanos() != 0 {
        return Err(Error::Process(
            "--lifetime must be whole seconds (the policy's token_lifetime_s)".into(),
        ));
    }
    let lifetime_s = options.lifetime.as_secs();
    let lifetime_ms = lifetime_s.saturating_mul(1000);
    let mut setup = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || Setup::start(&options, lifetime_s))
            .await
            .map_err(|e| Error::Process(format!("setup task: {e}")))??
    };

    let live = Arc::new(Live::default());
    live.hub_reachable.store(true, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut fleet = JoinSet::new();
    // Steady: boots spread evenly over the ramp.
    let ramp = (options.lifetime / 2).min(Duration::from_secs(5));
    let count = u32::try_from(options.devices).unwrap_or(u32::MAX);
    let started = Instant::now();
    let mut specs = Vec::with_capacity(options.devices);
    for (id, code) in &setup.codes {
        specs.push((
            Spec {
                config: agent_config(id, code, lifetime_ms)?,
                anchor: setup.anchor,
                mqtt: MqttConfig::plain(&LOOPBACK.to_string(), setup.broker.port(), id),
            },
            device::generate_key()?,
        ));
    }
    for (i, (spec, signer)) in (0u32..).zip(specs) {
        let delay = ramp * i / count;
        let live = live.clone();
        let stop = stop_rx.clone();
        fleet.spawn(async move {
            tokio::time::sleep(delay).await;
            device::run(spec, signer, live, stop).await
        });
    }

    let mut interrupted = false;
    let end = tokio::time::Instant::now() + options.duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
            _ = tick.tick() => {
                // A hub that died takes the blame for the lapses that follow, not the
                // devices (try_wait: does not block).
                if !setup.hub.is_running() {
                    live.hub_reachable.store(false, Ordering::Relaxed);
                }
                if options.progress {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(progress_line(&live, options.devices, started.elapsed()).as_bytes());
                    let _ = out.flush();
                }
            }
        }
    }
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
    live.hub_reachable.store(false, Ordering::Relaxed);
    let hub_bin = setup.hub_bin.clone();
    let hub_ran_throughout = tokio::task::spawn_blocking(move || setup.stop())
        .await
        .unwrap_or(false);

    Ok(summarize(
        &options,
        lifetime_s,
        duration_s,
        &outcomes,
        failures,
        hub_ran_throughout,
        interrupted,
        hub_bin,
    ))
}

#[allow(clippy::too_many_arguments)] // one call site, each argument named there
fn summarize(
    options: &Options,
    lifetime_s: u64,
    duration_s: f64,
    outcomes: &[Outcome],
    failures: Vec<String>,
    hub_ran_throughout: bool,
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
    let min_tokens_per_device = if outcomes.len() < options.devices {
        0
    } else {
        outcomes.iter().map(|o| o.tokens).min().unwrap_or(0)
    };
    Summary {
        scenario: options.scenario,
        devices: options.devices,
        lifetime_s,
        duration_s: (duration_s * 10.0).round() / 10.0,
        tokens_issued: outcomes.iter().map(|o| o.tokens).sum(),
        lapses: outcomes.iter().map(|o| o.lapses).sum(),
        lapse_ms: outcomes.iter().map(|o| o.lapse_ms).sum(),
        never_held: options.devices - outcomes.iter().filter(|o| o.tokens > 0).count(),
        holding_at_end: outcomes.iter().filter(|o| o.holding_at_end).count(),
        min_tokens_per_device,
        refresh_latency_ms: Percentiles::of(
            outcomes
                .iter()
                .flat_map(|o| o.refresh_latencies_ms.iter().copied())
                .collect(),
        ),
        first_token_ms: Percentiles::of(outcomes.iter().filter_map(|o| o.first_token_ms).collect()),
        errors,
        device_failures: failures.len(),
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
    fn short_lifetimes_get_request_timeouts_and_backoff_well_inside_them() {
        let c = agent_config("sim-0001", "ABCD-EFGH", 6_000).expect("valid");
        assert_eq!(c.request_timeout_ms, 750);
        assert_eq!(c.backoff.cap_ms, 1_500);
        let long = agent_config("sim-0001", "ABCD-EFGH", 900_000).expect("valid");
        assert_eq!(long.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert_eq!(long.backoff, Backoff::default());
    }
}
