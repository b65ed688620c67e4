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
use crate::processes::{
    Broker, Hub, LOOPBACK, Located, REVOKE_GROUP, locate_hub, locate_mosquitto,
};

/// The audience of device tokens in the default policy (`device_audience`).
pub const DEVICE_AUDIENCE: &str = "tessera";

/// How long the devices may take to disconnect once told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the fleet goes through. Every scenario boots the devices as `steady` does; the
/// others add one fault a third of the way into the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Devices boot spread over a short ramp (half a lifetime, at most 5 s), enroll and
    /// refresh for the whole run; nothing fails on purpose.
    Steady,
    /// The hub is killed (SIGKILL: no drain) and started again after the outage.
    HubCrash,
    /// Mosquitto is stopped and started again on the same port after the outage; devices
    /// and hub reconnect on their own.
    BrokerRestart,
    /// An operator revokes a share of the fleet: half of it (rounded up) registered in
    /// [`REVOKE_GROUP`] with one `revoke --group`, the rest with one `revoke --device` each.
    Revoke,
}

impl Scenario {
    /// Its name on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::HubCrash => "hub-crash",
            Self::BrokerRestart => "broker-restart",
            Self::Revoke => "revoke",
        }
    }

    /// Whether it takes the hub away for a while.
    fn has_outage(self) -> bool {
        matches!(self, Self::HubCrash | Self::BrokerRestart)
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
    /// How long the hub or broker stays down in `hub-crash` and `broker-restart`.
    pub outage: Duration,
    /// The share of the fleet `revoke` revokes, 0 to 1.
    pub revoke_share: f64,
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
    /// In `revoke`: revoked devices that reported it before the command that revoked them
    /// returned (their fan-out counts as 0).
    pub revoked_before_return: usize,
    /// Devices that reported themselves revoked though the operator did not revoke them.
    pub revoked_unexpectedly: usize,
    /// In `revoke`: from the `revoke` command that named the device returning (the
    /// revocation durable) to the device's machine reporting it revoked, ms.
    pub revocation_fanout_ms: Percentiles,
    /// Whether the hub ran for the whole run: still running at the end and not killed.
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
            "devices_retried": self.devices_retried,
            "outage_ms": self.outage_ms,
            "lapses_not_counted_ms": self.lapses_not_counted_ms,
            "revoked": self.revoked,
            "revoked_wiped": self.revoked_wiped,
            "revoked_unexpectedly": self.revoked_unexpectedly,
            "revoked_before_return": self.revoked_before_return,
            "revocation_fanout_ms": self.revocation_fanout_ms.to_json(),
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
                "  revoked {}, wiped {} ({} before the command returned), revoked unexpectedly {}; \
                 fan-out p50 {} p99 {} max {}",
                self.revoked,
                self.revoked_wiped,
                self.revoked_before_return,
                self.revoked_unexpectedly,
                ms(self.revocation_fanout_ms.p50),
                ms(self.revocation_fanout_ms.p99),
                ms(self.revocation_fanout_ms.max)
            );
        }
        if let Some(first) = &self.first_failure {
            let _ = writeln!(t, "  device failures {}: {first}", self.device_failures);
        }
        if !self.hub_ran_throughout {
            let _ = writeln!(
                t,
                "  the hub did not run throughout (killed, or not running at the end)"
            );
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
    /// In `revoke`: the devices revoked with one `revoke --group`, then those revoked one
    /// by one.
    by_group: Vec<String>,
    one_by_one: Vec<String>,
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
        let (by_group, one_by_one) = if options.scenario == Scenario::Revoke {
            revoke_split(&ids, options.revoke_share)
        } else {
            (Vec::new(), Vec::new())
        };
        let codes = hub.import(&ids, |id| by_group.iter().any(|g| g == id))?;
        if options.scenario == Scenario::Revoke {
            hub.add_operator()?;
        }
        let anchor = hub.trust_anchor()?;
        hub.serve(&broker)?;
        Ok(Self {
            hub,
            broker,
            anchor,
            codes,
            by_group,
            one_by_one,
            hub_bin,
            dir,
        })
    }

    /// The scenario's event. `hub-crash`, `broker-restart`: takes the hub (or the broker)
    /// away for `outage`, then brings it back and returns once the hub serves again.
    /// `revoke`: revokes the group, then each device of the rest, and returns when (Unix
    /// ms) the command naming each device returned. Blocks.
    fn inject(&mut self, scenario: Scenario, outage: Duration) -> FaultDone {
        match scenario {
            Scenario::Steady => Ok(Vec::new()),
            Scenario::HubCrash => {
                self.hub.kill();
                std::thread::sleep(outage);
                self.hub.serve(&self.broker).map(|()| Vec::new())
            }
            Scenario::BrokerRestart => {
                self.broker.stop();
                std::thread::sleep(outage);
                self.broker.restart()?;
                self.hub
                    .await_resubscribed(&self.broker)
                    .map(|()| Vec::new())
            }
            Scenario::Revoke => {
                let mut returned = Vec::new();
                if !self.by_group.is_empty() {
                    self.hub.revoke(&self.broker, &["--group", REVOKE_GROUP])?;
                    let at = device::now_ms();
                    returned.extend(self.by_group.iter().map(|id| (id.clone(), at)));
                }
                for id in &self.one_by_one {
                    self.hub.revoke(&self.broker, &["--device", id])?;
                    returned.push((id.clone(), device::now_ms()));
                }
                Ok(returned)
            }
        }
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

/// The devices `revoke` revokes: `share` of `ids` (rounded, the last ones), the first half
/// of them (rounded up) as a group, the rest one by one.
fn revoke_split(ids: &[String], share: f64) -> (Vec<String>, Vec<String>) {
    // Rounded to a whole device; the share is checked to be within 0..=1.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let n = ((ids.len() as f64) * share).round() as usize;
    let revoked = &ids[ids.len() - n.min(ids.len())..];
    let (group, single) = revoked.split_at(revoked.len().div_ceil(2));
    (group.to_vec(), single.to_vec())
}

/// How long after the hub serves again a device may still be waiting to try: one request
/// timeout (a request sent into the outage) plus one backoff cap (the wait before the next
/// try). Lapses in that window are the outage's, not the hub's.
pub fn retry_window(lifetime_ms: u64) -> Duration {
    let config = agent_config("sim-0", "AAAA-AAAA", lifetime_ms);
    config.map_or(Duration::ZERO, |c| {
        Duration::from_millis(c.request_timeout_ms.saturating_add(c.backoff.cap_ms))
    })
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
    if !(0.0..=1.0).contains(&options.revoke_share) {
        return Err(Error::Process(
            "--revoke-share must be between 0 and 1".into(),
        ));
    }
    let lifetime_s = options.lifetime.as_secs();
    let lifetime_ms = lifetime_s.saturating_mul(1000);
    let setup = {
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
    // The fault, a third of the way in: the setup moves into a blocking task for it and
    // comes back when the hub serves again.
    let mut fault_at = (options.scenario != Scenario::Steady)
        .then(|| tokio::time::Instant::now() + options.duration / 3);
    let mut fault: Option<tokio::task::JoinHandle<(Setup, FaultDone)>> = None;
    let mut revoke_returned = Vec::new();
    let mut setup = Some(setup);
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
                fault_at = None;
                if options.scenario.has_outage() {
                    live.hub_reachable.store(false, Ordering::Relaxed);
                    outage_started = Some(Instant::now());
                }
                if let Some(mut s) = setup.take() {
                    let (scenario, outage) = (options.scenario, options.outage);
                    fault = Some(tokio::task::spawn_blocking(move || {
                        let done = s.inject(scenario, outage);
                        (s, done)
                    }));
                }
            }
            joined = async { fault.as_mut().expect("guarded").await }, if fault.is_some() => {
                fault = None;
                let (s, done) =
                    joined.map_err(|e| Error::Process(format!("fault task: {e}")))?;
                setup = Some(s);
                revoke_returned = done?;
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
                if let Some(s) = setup.as_mut() && !s.hub.is_running() {
                    live.hub_reachable.store(false, Ordering::Relaxed);
                    counted_again_at = None;
                }
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
        setup = Some(s);
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
    live.hub_reachable.store(false, Ordering::Relaxed);
    let hub_bin = setup.hub_bin.clone();
    let hub_running_at_end = tokio::task::spawn_blocking(move || setup.stop())
        .await
        .unwrap_or(false);
    let hub_killed = options.scenario == Scenario::HubCrash && outage_started.is_some();

    let mut summary = summarize(
        &options,
        lifetime_s,
        duration_s,
        &outcomes,
        failures,
        hub_running_at_end && !hub_killed,
        interrupted,
        hub_bin,
    );
    summary.outage_ms = outage_ms;
    summary.lapses_not_counted_ms = lapses_not_counted_ms;
    summary.add_revocations(&revoke_returned, &outcomes);
    Ok(summary)
}

/// What the scenario's event task hands back with the setup.
type FaultDone = Result<Vec<(String, u64)>, Error>;

impl Summary {
    /// The `revoke` figures: `returned` holds when the command that revoked each device
    /// returned (Unix ms).
    fn add_revocations(&mut self, returned: &[(String, u64)], outcomes: &[Outcome]) {
        let returned: BTreeMap<&str, u64> =
            returned.iter().map(|(id, at)| (id.as_str(), *at)).collect();
        let mut fanout = Vec::new();
        for o in outcomes {
            match (returned.get(o.id.as_str()), o.revoked_at_ms) {
                (Some(at), Some(wiped)) => {
                    self.revoked_wiped += 1;
                    // The hub tells the devices as it answers the operator, so a device
                    // can hear of it before the command exits: that counts as 0.
                    if wiped < *at {
                        self.revoked_before_return += 1;
                    }
                    fanout.push(wiped.saturating_sub(*at));
                }
                (None, Some(_)) => self.revoked_unexpectedly += 1,
                _ => {}
            }
        }
        self.revoked = returned.len();
        self.revocation_fanout_ms = Percentiles::of(fanout);
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
        devices_retried: outcomes.iter().filter(|o| o.retried).count(),
        outage_ms: None,
        lapses_not_counted_ms: None,
        revoked: 0,
        revoked_wiped: 0,
        revoked_unexpectedly: 0,
        revoked_before_return: 0,
        revocation_fanout_ms: Percentiles::default(),
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
        let (group, single) = revoke_split(&ids, 0.2);
        assert_eq!(group, ["sim-0025", "sim-0026", "sim-0027"]);
        assert_eq!(single, ["sim-0028", "sim-0029", "sim-0030"]);
        let (group, single) = revoke_split(&ids[..3], 0.2);
        assert_eq!((group.len(), single.len()), (1, 0));
        assert_eq!(revoke_split(&ids, 0.0), (Vec::new(), Vec::new()));
        assert_eq!(revoke_split(&ids, 1.0).0.len(), 15);
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
